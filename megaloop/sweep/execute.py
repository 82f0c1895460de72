"""Run a sweep plan: in this process, through launch.sh on local ranks, or as a SLURM array.

Idempotent: a run whose config hash is finished in the experiment is skipped; an interrupted run
resumes from its newest checkpoint (`--resume auto`) and continues its MLflow run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from megaloop.atomic import atomic_write_bytes
from megaloop.errors import ConfigError, MegaloopError
from megaloop.sweep.plan import PlannedRun
from megaloop.sweep.slurm import SlurmResources, submit_slurm

REPO = Path(__file__).resolve().parents[2]
SWEEPS_DIR = Path("runs") / "sweeps"


@dataclass
class SweepOutcome:
    experiment: str
    planned: int
    skipped: list[str]
    trained: list[str]
    script: str | None = None


def sweep_folder(experiment: str) -> Path:
    return SWEEPS_DIR / experiment


def finished_hashes(experiment: str, tracking: str | None) -> set[str]:
    from megaloop.track import find_runs

    return {run["params"].get("config_hash") for run in find_runs(experiment, tracking=tracking)}


def write_run_configs(experiment: str, runs: list[PlannedRun]) -> list[Path]:
    """Each run's resolved config as YAML (what launch.sh and SLURM tasks train)."""
    folder = sweep_folder(experiment) / "configs"
    paths = []
    for run in runs:
        path = folder / f"{run.name}.yaml"
        text = yaml.safe_dump(run.config.to_dict(), sort_keys=False)
        atomic_write_bytes(path, text.encode())
        paths.append(path)
    return paths


def run_inprocess(runs: list[PlannedRun], progress: bool) -> list[str]:
    from megaloop.train import engine
    from megaloop.train.trainer import train

    done = []
    *_, created = engine.join_process_group()  # one process group for all the runs
    try:
        bar = tqdm(runs, desc="sweep", unit="run", disable=not progress)
        for run in bar:
            bar.set_postfix_str(run.name)
            if train(run.config, resume="auto", progress=False).get("stopped"):
                break  # SIGTERM: the run saved a checkpoint; the whole sweep stops here
            done.append(run.name)
    finally:
        engine.leave_process_group(created)
    return done


def die_with_parent(parent: int):
    """A `preexec_fn`: the child gets SIGTERM when the sweep that started it dies, even by
    SIGKILL (Linux's PR_SET_PDEATHSIG, kept across exec), so a killed sweep leaves no training
    behind: the run saves a checkpoint and stops. Elsewhere it does nothing."""
    def arm() -> None:
        if not sys.platform.startswith("linux"):
            return
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the sweep died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def run_local(runs: list[PlannedRun], experiment: str, nproc: int, progress: bool) -> list[str]:
    done = []
    paths = write_run_configs(experiment, runs)
    bar = tqdm(list(zip(runs, paths, strict=True)), desc="sweep", unit="run",
               disable=not progress)
    for run, path in bar:
        bar.set_postfix_str(run.name)
        argv = [str(REPO / "launch.sh"), "train", str(path), "--resume", "auto", "--no-progress",
                "--nproc", str(nproc)]
        code = subprocess.call(argv, preexec_fn=die_with_parent(os.getpid()))
        if code != 0:
            raise MegaloopError(f"Run {run.name} failed (exit {code}); fix the cause and run the "
                                "sweep again: finished runs are skipped, this one resumes.")
        done.append(run.name)
    return done


def execute(runs: list[PlannedRun], experiment: str, *, executor: str = "inprocess",
            nproc: int = 1, dry_run: bool = False, progress: bool = True,
            tracking: str | None = None, borrow: list[dict[str, Any]] | None = None,
            slurm: SlurmResources | None = None) -> SweepOutcome:
    """Train (or submit) the runs not yet finished. `borrow` (the spec's) is recorded on the
    experiment, so that every later fit of it also takes those runs of other experiments."""
    if tracking is None and runs:
        from megaloop.track import tracking_uri

        tracking = tracking_uri(runs[0].config.track)
    if borrow and not dry_run:
        from megaloop.track.runs import BORROW_TAG, set_experiment_tag

        set_experiment_tag(experiment, BORROW_TAG, json.dumps(borrow), tracking=tracking)
    finished = finished_hashes(experiment, tracking)
    todo = [run for run in runs if run.config.hash() not in finished]
    skipped = [run.name for run in runs if run.config.hash() in finished]
    outcome = SweepOutcome(experiment, len(runs), skipped, [])
    if executor == "slurm":
        if todo:
            outcome.script = submit_slurm(sweep_folder(experiment), experiment,
                                          write_run_configs(experiment, todo), nproc,
                                          slurm or SlurmResources(), dry_run)
        return outcome
    if dry_run or not todo:
        return outcome
    start = time.perf_counter()
    if executor == "inprocess":
        outcome.trained = run_inprocess(todo, progress)
    elif executor == "local":
        outcome.trained = run_local(todo, experiment, nproc, progress)
    else:
        raise ConfigError(f"Unknown executor {executor!r}; use inprocess, local or slurm.")
    if progress:
        elapsed = time.perf_counter() - start
        print(f"sweep {experiment}: trained {len(todo)} runs in {elapsed:.0f} s", file=sys.stderr)
    return outcome
