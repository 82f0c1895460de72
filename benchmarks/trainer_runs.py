"""For benchmarks that run the real `megaloop train` in a subprocess: the shards it trains on, its
`--set` arguments, and the run and metrics it logged to MLflow, read back."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def stdlib_shards(folder: Path) -> Path:
    """The embedded corpus prepared into `folder` with the default tokenizer; returns `folder`."""
    from megaloop.data.corpus import open_corpus
    from megaloop.data.shards import prepare
    from megaloop.data.tokenizer import DEFAULT_TOKENIZER, Tokenizer

    prepare(open_corpus("stdlib"), Tokenizer.load(DEFAULT_TOKENIZER), folder, progress=False)
    return folder


def timed_run_settings(workdir: Path, shards: Path, experiment: str) -> dict[str, object]:
    """The settings every timed run shares: train on `shards`, no evaluation or checkpoint
    during the run, MLflow on a sqlite store in `workdir`."""
    return {"train.eval_interval": 10**6, "train.eval_batches": 1,
            "train.checkpoint_interval": 10**6, "data.shards": str(shards),
            "train.checkpoint_dir": str(workdir / "ckpt"),
            "track.tracking_uri": f"sqlite:///{workdir}/mlflow.db", "track.experiment": experiment}


def set_arguments(settings: dict[str, object]) -> list[str]:
    """`--set key=value` for each setting (booleans as YAML's true/false)."""
    args: list[str] = []
    for key, value in settings.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        args += ["--set", f"{key}={text}"]
    return args


def only_run(uri: str, experiment: str) -> tuple[Any, Any]:
    """(client, run) of the single run of `experiment` in the store at `uri`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def metric_values(client: Any, run: Any, name: str, after_step: int = 0) -> list[float]:
    """The values logged for `name` at steps after `after_step`, in step order."""
    points = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
    return [m.value for m in points if m.step > after_step]
