"""For benchmarks that run the real `megaloop train` in a subprocess: its `--set` arguments, and
the run and metrics it logged to MLflow, read back."""

from __future__ import annotations

from typing import Any


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
