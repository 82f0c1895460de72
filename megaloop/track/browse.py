"""Browsing the MLflow store: a table of runs (`megaloop runs`) and MLflow's own UI over the same
store (`megaloop ui`). The store is the one runs are tracked in: `--tracking-uri`, else
$MLFLOW_TRACKING_URI, else `sqlite:///runs/mlflow.db` under the working directory."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from megaloop.config import TrackConfig
from megaloop.display import duration
from megaloop.errors import MegaloopError
from megaloop.track.mlflow_tracker import open_client, sqlite_path, tracking_uri
from megaloop.track.names import Metric, Tag
from megaloop.track.runs import find_runs

DEFAULT_UI_PORT = 5000  # MLflow's own default
COLUMNS = ["name", "run_id", "status", "r", "d_model", "n_once", "n_rec", "tokens", "budget",
           Metric.VAL_LOSS, "duration"]


def store_uri(tracking: str | None = None) -> str:
    """The tracking URI to browse; MegaloopError when it names an sqlite file that is absent."""
    uri = tracking or tracking_uri(TrackConfig(), create=False)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        raise MegaloopError(f"There is no MLflow store at {uri} (no file {db}); train a run first, "
                            "or point --tracking-uri (or MLFLOW_TRACKING_URI) at the store.")
    return uri


def _experiment_names(client: Any) -> list[str]:
    names, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        names += [experiment.name for experiment in page]
        token = page.token
        if not token:
            return names


def _int(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _row(experiment: str, run: dict[str, Any]) -> dict[str, Any]:
    params, start, end = run["params"], run["start_time"], run["end_time"]
    finished = end if end else time.time() * 1000  # a running run: its duration so far
    duration = None if start is None else (finished - start) / 1000
    return {"experiment": experiment, "run_id": run["run_id"], "name": run["name"],
            "status": run["status"] or str(run["run_status"]).lower(),
            "recurrences": _int(params.get("recurrences")),
            "d_model": _int(params.get("model.d_model")), "n_once": _int(params.get("n_once")),
            "n_rec": _int(params.get("n_rec")), "tokens": _int(params.get("tokens")),
            "budget_flops": _float(params.get("budget_flops")),
            Metric.VAL_LOSS: run["metrics"].get(Metric.VAL_LOSS), "duration_s": duration}


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def list_runs(experiment: str | None = None, tracking: str | None = None) -> list[dict[str, Any]]:
    """The runs of `experiment` (None: of every experiment), oldest first within an experiment:
    {experiment, run_id, name, status, recurrences, d_model, n_once, n_rec, tokens,
    budget_flops, val/loss, duration_s}; fit runs are left out."""
    uri = store_uri(tracking)
    client = open_client(uri)
    names = _experiment_names(client)
    if experiment is not None:
        if experiment not in names:
            raise MegaloopError(f"There is no experiment '{experiment}' in {uri}; the experiments "
                                f"are: {', '.join(sorted(names)) or 'none'}.")
        names = [experiment]
    return [_row(name, run) for name in names
            for run in find_runs(name, tracking=uri, status=None)
            if run["tags"].get(Tag.KIND) != "fit"]  # fits are runs of their own kind


def _count(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def _duration(seconds: float | None) -> str:
    return "-" if seconds is None else duration(seconds)


def format_runs(rows: list[dict[str, Any]]) -> str:
    """A plain-text table, one block per experiment."""
    if not rows:
        return "no runs"
    blocks = []
    for experiment in dict.fromkeys(row["experiment"] for row in rows):
        cells = [[row["name"], row["run_id"][:8], row["status"], str(row["recurrences"] or "-"),
                  str(row["d_model"] or "-"), _count(row["n_once"]), _count(row["n_rec"]),
                  _count(row["tokens"]),
                  "-" if row["budget_flops"] is None else f"{row['budget_flops']:.3g}",
                  "-" if row[Metric.VAL_LOSS] is None else f"{row[Metric.VAL_LOSS]:.4f}",
                  _duration(row["duration_s"])]
                 for row in rows if row["experiment"] == experiment]
        widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(COLUMNS)]
        lines = [f"experiment {experiment}: {len(cells)} run{'s' if len(cells) != 1 else ''}",
                 "  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)).rstrip()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                  for line in cells]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# ---- the UI ----------------------------------------------------------------------------------

def ui_command(port: int, tracking: str | None = None) -> tuple[list[str], str, str]:
    """(argv of `mlflow ui` on 127.0.0.1:port over the store, its URL, the store URI)."""
    uri = store_uri(tracking)
    argv = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    db = sqlite_path(uri)
    if db is not None:  # artifacts of new experiments beside the store, as the tracker puts them
        argv += ["--artifacts-destination", (db.parent / "artifacts").as_uri()]
    return argv, f"http://127.0.0.1:{port}", uri


def serve_ui(port: int = DEFAULT_UI_PORT, tracking: str | None = None,
             announce: Callable[[str], None] = print) -> int:
    """Run MLflow's UI in the foreground until Ctrl-C (or SIGTERM); returns its exit status."""
    if not 0 < port < 65536:
        raise MegaloopError(f"--port {port} is not a TCP port (1-65535).")
    argv, url, uri = ui_command(port, tracking)
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise MegaloopError(f"Port {port} on 127.0.0.1 is in use; choose another with "
                                "--port.") from None
    # MLflow's background job runner (a dozen processes, for GenAI features) is not needed to
    # browse runs; the user's environment may still turn it on.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    # Its own process group: mlflow starts a server process of its own, and both must stop.
    process = subprocess.Popen(argv, env=env, start_new_session=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    announce(f"MLflow UI over {uri}: {url}  (Ctrl-C stops it)")
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_group(process)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the UI's process group, then SIGKILL to whatever of it is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
