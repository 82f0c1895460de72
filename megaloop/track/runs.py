"""Runs already in an MLflow store: finding training runs by status and tags (for sweeps, the
fitter, resume and browsing), and logging a scaling-law fit as a run of its own."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from megaloop.config import TrackConfig
from megaloop.errors import MegaloopError
from megaloop.track.mlflow_tracker import (
    MAX_METRICS_PER_BATCH,
    experiment_id_of,
    log_batch,
    open_client,
    run_tags,
    sqlite_path,
    tracking_uri,
)
from megaloop.track.names import Tag


def find_runs(experiment: str, *, tracking: str | None = None, status: str | None = "finished",
              filter_tags: dict | None = None) -> list[dict]:
    """Runs of `experiment` whose tag megaloop.status is `status` (None: any) and whose tags
    match `filter_tags`, oldest first: {run_id, name, status, run_status, experiment_id,
    start_time, end_time, params, metrics (latest values), tags}."""
    uri = tracking or tracking_uri(TrackConfig(), create=False)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return []  # no store, no runs (and no empty store made as a side effect)
    client = open_client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    wanted = {key: str(value) for key, value in (filter_tags or {}).items()}
    if status is not None:
        wanted[Tag.STATUS] = status
    plain = {k: v for k, v in wanted.items() if not set("'\"`\\") & set(k + v)}  # quotable
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in plain.items())
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], filter_string=query, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return [{"run_id": run.info.run_id, "name": run.info.run_name,
             "status": run.data.tags.get(Tag.STATUS), "run_status": run.info.status,
             "experiment_id": run.info.experiment_id, "start_time": run.info.start_time,
             "end_time": run.info.end_time, "params": dict(run.data.params),
             "metrics": dict(run.data.metrics), "tags": dict(run.data.tags)}
            for run in runs if all(run.data.tags.get(k) == v for k, v in wanted.items())]




def set_experiment_tag(experiment: str, key: str, value: str, *,
                       tracking: str | None = None) -> None:
    """Tag `experiment` (made if it does not exist yet)."""
    uri = tracking or tracking_uri(TrackConfig())
    client = open_client(uri)
    client.set_experiment_tag(experiment_id_of(client, experiment, uri), key, value)


def experiment_tags(experiment: str, *, tracking: str | None = None) -> dict[str, str]:
    """The tags of `experiment`; {} where it or the store does not exist."""
    uri = tracking or tracking_uri(TrackConfig(), create=False)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return {}
    found = open_client(uri).get_experiment_by_name(experiment)
    return dict(found.tags) if found is not None else {}


def log_fit_run(experiment: str, *, params: dict, metrics: dict[str, float],
                artifact_dir: str | Path | None = None, tags: dict | None = None,
                tracking: str | None = None, run_name: str | None = None) -> str:
    """Log a scaling-law fit as a finished MLflow run of its own in `experiment`: params,
    metrics (non-finite ones left out), the files of `artifact_dir` as artifacts. The run is
    tagged megaloop.kind=fit and carries no megaloop.status, so searches for training runs
    never return it. Returns the run id."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    uri = tracking or tracking_uri(TrackConfig())
    client = open_client(uri)
    try:
        experiment_id = experiment_id_of(client, experiment, uri)
        run_id = client.create_run(experiment_id, run_name=run_name or "fit",
                                   tags={**run_tags(1), **(tags or {}),
                                         Tag.KIND: "fit"}).info.run_id
    except MlflowException as exc:
        raise MegaloopError(f"MLflow at {uri} refused the fit run: {exc.message}") from exc
    try:
        log_batch(client, run_id, params={k: v for k, v in params.items() if v is not None})
        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, 0) for k, v in metrics.items() if _finite(v)]
        for i in range(0, len(values), MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=values[i:i + MAX_METRICS_PER_BATCH])
        if artifact_dir is not None:
            client.log_artifacts(run_id, str(artifact_dir))
    except BaseException as exc:
        client.set_terminated(run_id, "FAILED")
        if isinstance(exc, MlflowException):
            raise MegaloopError(f"MLflow at {uri} refused the fit run {run_id}: "
                                f"{exc.message}") from exc
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
