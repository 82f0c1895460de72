"""Helpers for the training tests: real `megaloop train` processes (DeepSpeed on CPU with gloo),
a real sqlite MLflow store, and the metric history read back from it (or, without MLflow, the
summary `megaloop train --json` writes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = REPO / "configs" / "runs" / "tiny.yaml"

# A very small model on the default tokenizer (vocab 4096), fast enough for many short runs.
SMALL = {
    "model.d_model": 64, "model.n_heads": 4, "model.prelude_layers": 1, "model.loop_layers": 1,
    "model.coda_layers": 1, "model.recurrences": 2, "model.max_seq_len": 64,
    "train.micro_batch": 4, "train.global_batch": 8, "train.steps": 8, "train.lr": 3e-3,
    "train.warmup_steps": 2, "train.log_interval": 1, "train.eval_interval": 4,
    "train.eval_batches": 2, "train.checkpoint_interval": 4,
    "train.precision": "fp32",  # the same arithmetic on every CPU (auto: bf16 where native)
}


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def overrides(shards: Path, workdir: Path, **values) -> list[str]:
    """--set arguments for a run in `workdir` on prepared `shards`."""
    settings = {**SMALL, "data.shards": str(shards), "data.verify": False,
                "train.checkpoint_dir": str(workdir / "checkpoints"),
                "track.tracking_uri": f"sqlite:///{workdir}/mlflow.db",
                "track.experiment": "tests", **values}
    args = []
    for key, value in settings.items():
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) \
            else str(value)
        args += ["--set", f"{key}={text}"]
    return args


def train_command(shards: Path, workdir: Path, *extra: str, nproc: int = 1, **values) -> list[str]:
    megaloop = [sys.executable, "-m", "megaloop.cli", "train", str(TINY_RUN), "--no-progress"]
    if nproc > 1:
        megaloop = [sys.executable, "-m", "megaloop.launch", "--local-ranks", str(nproc),
                    "-m", "megaloop.cli", "train", str(TINY_RUN), "--no-progress"]
    return [*megaloop, *overrides(shards, workdir, **values), *extra]


def run_training(shards: Path, workdir: Path, *extra: str, nproc: int = 1, timeout: int = 300,
                 **values) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(train_command(shards, workdir, *extra, nproc=nproc, **values),
                          cwd=workdir, env=child_env(), capture_output=True, text=True,
                          timeout=timeout)


def start_training(shards: Path, workdir: Path, *extra: str, nproc: int = 1,
                   **values) -> subprocess.Popen:
    """A training in the background, in a session of its own (os.killpg reaches every rank)."""
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(train_command(shards, workdir, *extra, nproc=nproc, **values),
                            cwd=workdir, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def stop_group(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to a process started in a session of its own, SIGKILL if it outlives `timeout`."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"training ended before {path} appeared:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def client(workdir: Path):
    from mlflow.tracking import MlflowClient  # here: the GPU tests run on machines without it

    return MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")


def all_runs(workdir: Path) -> list:
    mlflow = client(workdir)
    experiment = mlflow.get_experiment_by_name("tests")
    return mlflow.search_runs([experiment.experiment_id])


def only_run(workdir: Path):
    """The one MLflow run of the workdir that no later run continues."""
    runs = [run for run in all_runs(workdir)
            if run.data.tags.get("megaloop.status") != "superseded"]
    assert len(runs) == 1, f"expected one run, found {len(runs)}"
    return runs[0]


def history(workdir: Path, key: str = "train/loss") -> dict[int, list[float]]:
    """Every value logged for `key`, by step (one per step, after a resume too)."""
    run = only_run(workdir)
    values: dict[int, list[float]] = {}
    for metric in client(workdir).get_metric_history(run.info.run_id, key):
        values.setdefault(metric.step, []).append(metric.value)
    return values


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-6000:]}"


def assert_same_losses(want_dir: Path, got_dir: Path, steps: int,
                       tolerance: float) -> dict[int, list[float]]:
    """The run in `got_dir` logged the train/loss of the run in `want_dir` at steps 1..`steps`,
    within `tolerance`; returns its history."""
    want, got = history(want_dir), history(got_dir)
    for step in range(1, steps + 1):
        assert got[step][0] == pytest.approx(want[step][0], abs=tolerance), step
    return got
