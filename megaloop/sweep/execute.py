"""Run a sweep plan: in this process (`--jobs N`: N worker processes), on local ranks through
launch.sh's logic (`python -m megaloop.launch`), or as a SLURM array.

Idempotent: a run whose config hash is finished in the experiment is skipped; an interrupted run
resumes from its newest checkpoint (`--resume auto`) and continues its MLflow run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from megaloop.atomic import atomic_write_bytes
from megaloop.display import duration
from megaloop.errors import ConfigError, MegaloopError
from megaloop.local_ranks import die_with_parent
from megaloop.sweep.parallel import check_jobs, run_parallel
from megaloop.sweep.plan import PlannedRun
from megaloop.sweep.slurm import SlurmResources, submit_slurm
from megaloop.track import find_runs, tracking_uri
from megaloop.track.names import Tag
from megaloop.track.runs import set_experiment_tag

LAUNCH = (sys.executable, "-m", "megaloop.launch")  # launch.sh's logic, in this environment
SWEEPS_DIR = Path("runs") / "sweeps"


@dataclass
class SweepOutcome:
    experiment: str
    planned: int
    skipped: list[str]
    trained: list[str]
    script: str | None = None
    interrupted: str | None = None  # the run SIGTERM stopped (it saved a checkpoint)
    left: list[str] = field(default_factory=list)  # runs SIGTERM kept from starting

    @property
    def stopped(self) -> bool:
        return self.interrupted is not None or bool(self.left)


class StopRequest:
    """SIGTERM to the sweep: the run in progress saves and stops (the signal reaches it: an
    in-process run's own handler, or the local child it is passed on to), and no other run
    starts. Only the main thread can take signals; elsewhere it changes nothing."""

    def __init__(self) -> None:
        self.requested = False
        self.child: subprocess.Popen | None = None
        self.children: list[int] = []  # the pids of --jobs workers
        self._previous: Any = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):  # it has ended already
                os.kill(pid, signal.SIGTERM)

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def sweep_folder(experiment: str) -> Path:
    return SWEEPS_DIR / experiment


def finished_hashes(experiment: str, tracking: str | None) -> set[str]:

    return {run["params"].get("config_hash") for run in find_runs(experiment, tracking=tracking)}


def write_run_configs(experiment: str, runs: list[PlannedRun]) -> list[Path]:
    """Each run's resolved config as YAML (what the launcher and SLURM tasks train)."""
    folder = sweep_folder(experiment) / "configs"
    paths = []
    for run in runs:
        path = folder / f"{run.name}.yaml"
        text = yaml.safe_dump(run.config.to_dict(), sort_keys=False)
        atomic_write_bytes(path, text.encode())
        paths.append(path)
    return paths


def run_inprocess(runs: list[PlannedRun], progress: bool, outcome: SweepOutcome,
                  stop: StopRequest) -> None:
    # the trainer (torch, DeepSpeed: seconds) only where runs train, not for a plan or a dry run
    from megaloop.train import engine
    from megaloop.train.trainer import train

    *_, created = engine.join_process_group()  # one process group for all the runs
    try:
        bar = compute_bar(runs, progress)
        for index, run in enumerate(runs):
            if stop.requested:  # between runs: none was in progress
                outcome.left = [r.name for r in runs[index:]]
                break
            bar.set_postfix_str(run.name)
            # the sweep's bar, or (--no-progress) each run's plain lines
            if train(run.config, resume="auto", progress=False,
                     lines=not progress).get("stopped"):
                outcome.interrupted = run.name  # it saved a checkpoint; the sweep stops here
                outcome.left = [r.name for r in runs[index + 1:]]
                break
            outcome.trained.append(run.name)
            bar.update(run.compute)
        bar.close()
    finally:
        engine.leave_process_group(created)


def compute_bar(runs: list[PlannedRun], progress: bool) -> tqdm:
    """The sweep's progress in training FLOPs, not runs: a run at 10x the budget takes about
    10x as long, and the ETA says so."""
    return tqdm(total=sum(run.compute for run in runs), desc=f"sweep ({len(runs)} runs)",
                unit="FLOP", unit_scale=True, disable=not progress,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} FLOPs [{elapsed}<{remaining}]")


def run_local(runs: list[PlannedRun], experiment: str, nproc: int, progress: bool,
              outcome: SweepOutcome, stop: StopRequest) -> None:
    paths = write_run_configs(experiment, runs)
    bar = compute_bar(runs, progress)
    for index, (run, path) in enumerate(zip(runs, paths, strict=True)):
        if stop.requested:
            outcome.left = [r.name for r in runs[index:]]
            return
        bar.set_postfix_str(run.name)
        argv = [*LAUNCH, "train", str(path), "--resume", "auto", "--no-progress",
                "--nproc", str(nproc)]
        stop.child = subprocess.Popen(argv, preexec_fn=die_with_parent(os.getpid()))
        code = stop.child.wait()
        stop.child = None
        if stop.requested:  # the run got SIGTERM: it saved a checkpoint (or had finished)
            outcome.interrupted = run.name
            outcome.left = [r.name for r in runs[index + 1:]]
            return
        if code != 0:
            raise MegaloopError(f"Run {run.name} failed (exit {code}); fix the cause and run the "
                                "sweep again: finished runs are skipped, this one resumes.")
        outcome.trained.append(run.name)
        bar.update(run.compute)
    bar.close()


def execute(runs: list[PlannedRun], experiment: str, *, executor: str = "inprocess",
            nproc: int = 1, jobs: int = 1, dry_run: bool = False, progress: bool = True,
            tracking: str | None = None, borrow: list[dict[str, Any]] | None = None,
            slurm: SlurmResources | None = None) -> SweepOutcome:
    """Train (or submit) the runs not yet finished. `borrow` (the spec's) is recorded on the
    experiment, so that every later fit of it also takes those runs of other experiments.
    `jobs` > 1 trains that many runs at once in worker processes (CPU only; sweep/parallel.py)."""
    check_jobs(jobs, executor)
    if tracking is None and runs:

        tracking = tracking_uri(runs[0].config.track)
    if borrow and not dry_run:

        set_experiment_tag(experiment, Tag.BORROW, json.dumps(borrow), tracking=tracking)
    finished = finished_hashes(experiment, tracking)
    todo = [run for run in runs if run.config.hash() not in finished]
    skipped = [run.name for run in runs if run.config.hash() in finished]
    outcome = SweepOutcome(experiment, len(runs), skipped, [])
    if executor == "slurm":
        if todo:
            outcome.script = submit_slurm(sweep_folder(experiment), experiment,
                                          write_run_configs(experiment, todo), nproc,
                                          slurm or SlurmResources(), dry_run,
                                          max(run.config.data.workers for run in todo))
        return outcome
    if dry_run or not todo:
        return outcome
    start = time.perf_counter()
    with StopRequest() as stop:
        if executor == "inprocess" and jobs > 1:
            bar = compute_bar(todo, progress)
            run_parallel(todo, jobs, sweep_folder(experiment) / "logs", bar, outcome, stop)
            bar.close()
        elif executor == "inprocess":
            run_inprocess(todo, progress, outcome, stop)
        elif executor == "local":
            run_local(todo, experiment, nproc, progress, outcome, stop)
        else:
            raise ConfigError(f"Unknown executor {executor!r}; use inprocess, local or slurm.")
    if progress:
        elapsed = duration(time.perf_counter() - start)
        print(f"sweep {experiment}: trained {len(outcome.trained)} runs in {elapsed}",
              file=sys.stderr)
    return outcome
