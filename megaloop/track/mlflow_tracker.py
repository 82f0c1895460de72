"""MLflow tracking of one run: params, batched metrics, system metrics, the dataset as an input,
text artifacts, resume (or a continuation run). Tag names are track/names.py's.

Rank 0 opens a `Tracker`; other ranks (and `track.enabled: false`) get a `NullTracker`. Metrics
are queued by `log_metrics` (microseconds, never blocking on MLflow) and sent by a daemon thread
with `MlflowClient.log_batch`, up to 1000 values per call or every second. A failure of the
thread is reported as a `MegaloopError` by the next `flush()` or by `finish()`, never lost.
Non-finite values are logged as they are: NaN is stored as NaN (a diverging loss is worth
seeing); MLflow stores +-inf as +-1.797e308. Only `MlflowClient` is used, never the fluent
global run, so several trackers may live in one process. mlflow is imported where it is used
(about 1.7 s): importing track/ (as export, inference and the fitter do) does not load it.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import logging
import os
import platform
import posixpath
import re
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from megaloop import __version__
from megaloop.config import RunConfig, TrackConfig, config_hash
from megaloop.errors import MegaloopError
from megaloop.track.names import Tag
from megaloop.version import source_commit

DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"  # relative to the working directory
STATUSES = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "killed"}
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch
MAX_PARAMS_PER_BATCH = 100  # the same for params and for tags
_METRIC_NAME = re.compile(r"^[/\w.\- :]+$")  # what MLflow accepts (it also refuses "a/../b")


def tracking_uri(track: TrackConfig, create: bool = True) -> str:
    """`track.tracking_uri`, else $MLFLOW_TRACKING_URI, else an sqlite store in ./runs/ (made
    unless `create` is false)."""
    if track.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return track.tracking_uri or os.environ["MLFLOW_TRACKING_URI"]
    runs = Path.cwd().resolve() / "runs"
    if create:
        runs.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{runs / 'mlflow.db'}"


def run_params(config: RunConfig, derived: dict) -> dict[str, str]:
    """The flattened config (`model.d_model`, ...) plus the derived quantities (`n_once`,
    `n_rec`, `recurrences`, `tokens`, `budget_flops`, `flops_per_token`, `config_hash`)."""
    values: dict[str, Any] = dict(config.flat())
    values.update({"recurrences": config.model.recurrences, "config_hash": config_hash(config)})
    values.update(derived)
    return {key: str(value) for key, value in values.items()}


def _version(package: str) -> str:

    module = sys.modules.get(package)
    if module is not None and getattr(module, "__version__", None):
        return str(module.__version__)
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def run_tags(world_size: int) -> dict[str, str]:
    """Where and with what a run ran: the git commit of megaloop's own source tree (megaloop/
    version.py), host, world size, versions. `mlflow.source.git.commit` is MLflow's own name,
    shown by its UI."""

    found, dirty = source_commit()
    commit = found or "unknown"
    tags = {
        Tag.GIT_COMMIT: commit,
        Tag.GIT_DIRTY: "unknown" if dirty is None else str(dirty).lower(),
        Tag.HOST: socket.gethostname(),
        Tag.WORLD_SIZE: str(world_size),
        Tag.VERSION + "python": platform.python_version(),
        Tag.VERSION + "torch": _version("torch"),
        Tag.VERSION + "deepspeed": _version("deepspeed"),
        Tag.VERSION + "mlflow": _version("mlflow"),
        Tag.VERSION + "megaloop": __version__,
    }
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def sqlite_path(uri: str) -> Path | None:
    """The database file of an `sqlite:///` URI (relative paths are under the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?")[0]
    return None if not path or path == ":memory:" else Path(path).resolve()


def open_client(uri: str) -> Any:
    """A client of the store at `uri`. An sqlite store is made (its folder too) under an
    exclusive file lock: MLflow sets up its tables on first use, and two processes doing so at
    once collide ("duplicate column")."""
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is None:
        return _reachable_client(uri)
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.parent / f".{db.name}.setup-lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)  # the tables, made now if missing
            return client
    except OSError as exc:
        raise MegaloopError(f"Cannot open the MLflow store {uri} ({exc.strerror or exc}): point "
                            "track.tracking_uri (or MLFLOW_TRACKING_URI) at a folder you can "
                            "write.") from None


def _reachable_client(uri: str) -> Any:
    """A client of a store that is not a local sqlite file, asked once, with no retries, that
    it answers: a wrong address fails in seconds with the fix named, not after MLflow's
    minutes of retries (which stay in force for the run itself)."""
    from mlflow.tracking import MlflowClient

    fix = ("check track.tracking_uri (or MLFLOW_TRACKING_URI): an sqlite:///PATH file, or the "
           "http(s):// address of a running `mlflow server` (`megaloop ui` starts one); or set "
           "track.enabled false to train without tracking")
    probe = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {name: os.environ.get(name) for name in probe}
    os.environ.update(probe)
    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
        return client
    except Exception as exc:  # MLflow's many kinds: a scheme it lacks, a refused connection
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise MegaloopError(f"Cannot use the MLflow store {uri} ({reason}): {fix}.") from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def log_batch(client: Any, run_id: str, *, params: dict | None = None,
              tags: dict | None = None) -> None:
    """Params or tags in log_batch calls of at most 100 each (MLflow's limit)."""
    from mlflow.entities import Param, RunTag

    entries = ([Param(k, str(v)) for k, v in (params or {}).items()]
               + [RunTag(k, str(v)) for k, v in (tags or {}).items()])
    for i in range(0, len(entries), MAX_PARAMS_PER_BATCH):
        chunk = entries[i:i + MAX_PARAMS_PER_BATCH]
        client.log_batch(run_id, params=[e for e in chunk if isinstance(e, Param)],
                         tags=[e for e in chunk if isinstance(e, RunTag)])


class _Sender:
    """A daemon thread that sends queued metric values in batches and keeps its errors."""

    def __init__(self, client: Any, run_id: str, interval: float, max_batch: int,
                 retry_delays: tuple[float, ...]):
        self._client, self._run_id = client, run_id
        self._interval, self._max_batch, self._retry_delays = interval, max_batch, retry_delays
        self._cond = threading.Condition()
        self._pending: list[tuple[str, float, int, int]] = []
        self._queued = self._handled = self._lost = 0
        self._urgent = self._closing = False
        self._error: BaseException | None = None
        self.batches = 0  # log_batch calls made (for tests and the benchmark)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"megaloop-mlflow-{run_id[:8]}")
        self._thread.start()

    def put(self, items: list[tuple[str, float, int, int]]) -> None:
        with self._cond:
            self._pending.extend(items)
            self._queued += len(items)
            if len(self._pending) >= self._max_batch:
                self._cond.notify_all()

    def _send(self, batch: list[tuple[str, float, int, int]]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key, value, timestamp, step) for key, value, timestamp, step in batch]
        for delay in (*self._retry_delays, None):
            try:
                self._client.log_batch(self._run_id, metrics=metrics)
                self.batches += 1
                return
            except Exception as exc:  # kept and reported by flush()/finish()
                if delay is None:
                    with self._cond:
                        self._lost += len(batch)
                        self._error = self._error or exc
                    return
                time.sleep(delay)

    def _run(self) -> None:
        try:
            while True:  # wait for a full batch, a flush, the close or `interval` seconds
                with self._cond:
                    deadline = time.monotonic() + self._interval
                    while (len(self._pending) < self._max_batch and not self._urgent
                           and not self._closing and time.monotonic() < deadline):
                        self._cond.wait(max(0.0, deadline - time.monotonic()))
                    batch = self._pending[:self._max_batch]
                    del self._pending[:self._max_batch]
                    self._urgent = self._urgent and bool(self._pending)
                    if self._closing and not batch:
                        return
                if batch:
                    self._send(batch)
                with self._cond:
                    self._handled += len(batch)
                    self._cond.notify_all()
        except BaseException as exc:  # a bug in this thread must not hang flush()
            with self._cond:
                self._error = self._error or exc
                self._cond.notify_all()

    def flush(self, close: bool = False) -> None:
        with self._cond:
            target = self._queued
            self._urgent = True
            self._closing = self._closing or close
            self._cond.notify_all()
            while self._handled < target and self._thread.is_alive():
                self._cond.wait(0.5)
            lost = self._lost + max(0, target - self._handled)  # > 0: the thread died
            error, self._error, self._lost = self._error, None, 0
            self._handled = max(self._handled, target)
        if close:
            self._thread.join()
        if error is not None or lost:
            raise MegaloopError(
                f"{lost} metric values could not be sent to MLflow run {self._run_id}: "
                f"{error!r}. Check that the tracking store is reachable and writable (a tracking "
                "server running, an sqlite file not locked by another writer).") from error


class Tracker:
    """One MLflow run seen from rank 0; made by `open_tracker`."""

    def __init__(self, client: Any, run_id: str, *, interval: float = 1.0,
                 max_batch: int = MAX_METRICS_PER_BATCH,
                 retry_delays: tuple[float, ...] = (0.2, 1.0)):
        self.client = client
        self.run_id: str = run_id
        self._sender = _Sender(client, run_id, interval, max_batch, retry_delays)
        self._names: set[str] = set()
        self._finished = False
        self._system: Any = None

    def watch_system(self, uri: str, interval: float, resume: bool) -> None:
        """MLflow's system metrics (`system/cpu_utilization_percentage`, memory, disk, network;
        `system/gpu_*` where NVML is installed) of this node every `interval` seconds, in a
        thread of MLflow's own, until `finish`. `resume`: go on from the run's last sample."""
        if interval <= 0:
            return

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self._system = SystemMetricsMonitor(self.run_id, sampling_interval=interval,
                                            resume_logging=resume, tracking_uri=uri)
        self._system.start()

    def log_dataset(self, name: str, digest: str, source: str, profile: dict[str, Any],
                    context: str = "training") -> None:
        """The run's dataset as an MLflow input (the UI's Datasets column): its name, a
        digest of what it holds, where it is, and a profile (tokens, documents, tokenizer)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:36], source_type="local",
                          source=json.dumps({"uri": source}),
                          profile=json.dumps(profile, sort_keys=True))
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(
            dataset, tags=[InputTag("mlflow.data.context", context)])])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue values for `step`; they are sent by the background thread."""
        if self._finished:
            raise RuntimeError(f"log_metrics after finish() of MLflow run {self.run_id}")
        timestamp, step = int(time.time() * 1000), int(step)
        items = []
        for key, value in metrics.items():
            if key not in self._names:  # checked here once: in the thread it would be lost
                if not (isinstance(key, str) and _METRIC_NAME.match(key)
                        and posixpath.normpath(key) == key and not key.startswith("/")):
                    raise ValueError(f"Metric name {key!r} is not accepted by MLflow: use "
                                     "letters, digits, _ - . : space and / (no '..', '//', "
                                     "leading or trailing '/').")
                self._names.add(key)
            items.append((key, float(value), timestamp, step))
        self._sender.put(items)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        log_batch(self.client, self.run_id, tags=tags)

    def flush(self) -> None:
        """Block until every queued value is sent; raise MegaloopError if some were lost."""
        self._sender.flush()

    def finish(self, status: str) -> None:
        """Send what is queued, tag `megaloop.status` and end the run. Idempotent."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        if self._finished:
            return
        self._finished = True
        if self._system is not None:
            self._system.finish()
        try:
            self._sender.flush(close=True)
        finally:
            self.client.set_tag(self.run_id, Tag.STATUS, STATUSES[status])
            self.client.set_terminated(self.run_id, status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        killed = exc_type is not None and issubclass(exc_type, (KeyboardInterrupt, SystemExit))
        self.finish("FINISHED" if exc_type is None else "KILLED" if killed else "FAILED")


class NullTracker:
    """The tracker of ranks other than 0 and of `track.enabled: false`: does nothing."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def watch_system(self, uri: str, interval: float, resume: bool) -> None: ...
    def log_dataset(self, name: str, digest: str, source: str, profile: dict[str, Any],
                    context: str = "training") -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def flush(self) -> None: ...
    def finish(self, status: str) -> None: ...
    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None: ...
    def __enter__(self) -> NullTracker: return self


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of an sqlite store live beside it (runs/artifacts/<experiment>), not in the
    cwd's ./mlruns (MLflow's default); a server (http) decides for itself."""
    db = sqlite_path(uri)
    if db is None:
        return None
    slug = re.sub(r"[^\w.-]+", "_", experiment).strip("._") or "experiment"
    return (db.parent / "artifacts" / slug).as_uri()


def experiment_id_of(client: Any, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(uri, name))
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # made meanwhile by another process
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise MegaloopError(f"MLflow experiment '{name}' in {uri} is deleted: restore it (mlflow "
                            f"experiments restore --experiment-id {experiment.experiment_id}) or "
                            "choose another track.experiment.")
    return experiment.experiment_id


def _resumable_run(client: Any, run_id: str, experiment: str, uri: str) -> Any:
    """The MLflow run `run_id` to continue, or a MegaloopError that says how to mend."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise MegaloopError(f"Cannot resume MLflow run {run_id}: it is not in {uri} "
                            f"({exc.message}). Point track.tracking_uri (or MLFLOW_TRACKING_URI) "
                            "at the store that holds it, or start a new run.") from None
    if run.info.lifecycle_stage == "deleted":
        raise MegaloopError(f"Cannot resume MLflow run {run_id}: it is deleted; restore it "
                            f"(mlflow runs restore --run-id {run_id}) or start a new run.")
    name = client.get_experiment(run.info.experiment_id).name
    if name != experiment:
        warnings.warn(f"Resuming MLflow run {run_id} of experiment '{name}', not of "
                      f"track.experiment = '{experiment}'.", stacklevel=3)
    return run


def _metric_history(client: Any, run: Any) -> list[Any]:
    return [metric for key in run.data.metrics
            for metric in client.get_metric_history(run.info.run_id, key)]


def _continue_run(client: Any, run: Any, params: dict[str, str], tags: dict[str, str],
                  resume_step: int, changes: dict[str, tuple[Any, Any]] | None) -> str:
    """Continue MLflow run `run` from `resume_step`. The same run where nothing it records
    changes; else a new run that continues it: its params are the config in force, its metric
    history the old one's up to `resume_step` (so no step is logged twice), and tags
    megaloop.continues / megaloop.resumed_at_step / megaloop.changes say where it came from.
    The old run is then KILLED, tagged superseded and megaloop.continued_in."""
    old_id, old_params = run.info.run_id, run.data.params
    history = _metric_history(client, run)
    changed = {key for key, value in params.items() if key in old_params
               and old_params[key] != value}
    later = any(metric.step > resume_step for metric in history)
    tags[Tag.RESUMES] = str(int(run.data.tags.get(Tag.RESUMES, "0")) + 1)
    if not changed and not later:
        client.update_run(old_id, status="RUNNING")
        log_batch(client, old_id, params={k: v for k, v in params.items() if k not in old_params},
                  tags=tags)
        return old_id
    tags.update({Tag.CONTINUES: old_id, Tag.RESUMED_AT_STEP: str(resume_step)})
    if changes:
        tags[Tag.CHANGES] = "; ".join(
            f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())[:5000]
    new = client.create_run(run.info.experiment_id, run_name=run.info.run_name, tags=tags)
    new_id = new.info.run_id
    log_batch(client, new_id, params=params)
    kept = [metric for metric in history if metric.step <= resume_step]
    for i in range(0, len(kept), MAX_METRICS_PER_BATCH):
        client.log_batch(new_id, metrics=kept[i:i + MAX_METRICS_PER_BATCH])
    log_batch(client, old_id, tags={Tag.CONTINUED_IN: new_id, Tag.STATUS: "superseded"})
    client.set_terminated(old_id, "KILLED")
    return new_id


def open_tracker(config: RunConfig, *, rank: int, world_size: int, derived: dict,
                 resume_run_id: str | None = None, resume_step: int = 0,
                 changes: dict[str, tuple[Any, Any]] | None = None) -> Tracker | NullTracker:
    """Rank 0 of an enabled config: a new run (or `resume_run_id` continued from step
    `resume_step`, `_continue_run`) in experiment `track.experiment`, created if missing;
    everyone else: a NullTracker. `changes`: the config's changes on resume, for the record."""
    if rank != 0 or not config.track.enabled:
        return NullTracker()
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(config.track)
    client = open_client(uri)
    params = run_params(config, derived)
    tags = {**run_tags(world_size), Tag.STATUS: "running",
            Tag.CONFIG_HASH: params["config_hash"]}
    try:
        if resume_run_id:
            run = _resumable_run(client, resume_run_id, config.track.experiment, uri)
            run_id = _continue_run(client, run, params, tags, resume_step, changes)
        else:
            experiment_id = experiment_id_of(client, config.track.experiment, uri)
            name = config.track.run_name or (
                f"r{config.model.recurrences}-d{config.model.d_model}-{params['config_hash']}")
            run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
            log_batch(client, run_id, params=params)
        tracker = Tracker(client, run_id)
        tracker.watch_system(uri, config.track.system_metrics_interval,
                             resume=resume_run_id == run_id)
        return tracker
    except MlflowException as exc:
        raise MegaloopError(f"MLflow at {uri} refused the run: {exc.message}") from exc
