"""A copied or moved sqlite store finds its artifacts again.

MLflow records every experiment's artifact location, and every run's artifact URI, as an
absolute URI; megaloop puts them beside the store (`<store folder>/artifacts/<experiment>`,
mlflow_tracker._artifact_location). A copy of that folder still points into the original's,
and MLflow resolves a relative location against the working directory, not the store, so a
location cannot travel with it. `relocate_artifacts` rewrites, in one transaction, each
location that no longer exists to the same place under this store's `artifacts/`, where that
place exists.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from urllib.parse import unquote, urlparse

from megaloop.errors import MegaloopError
from megaloop.track.mlflow_tracker import open_client, sqlite_path

ARTIFACTS = "artifacts"
COLUMNS = (("experiments", "experiment_id", "artifact_location"),
           ("runs", "run_uuid", "artifact_uri"))


def _local_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        return None  # a server's or a cloud bucket's: not ours to move
    return Path(unquote(parsed.path))


def _moved(uri: str, artifacts: Path) -> str | None:
    """`uri` rewritten into `artifacts`, when it points into another store's artifacts folder
    that is gone and the same place exists here; else None."""
    path = _local_path(uri)
    if path is None or path.exists() or ARTIFACTS not in path.parts:
        return None
    parts = path.parts
    for at, part in enumerate(parts):  # the store's artifacts folder: the first that fits
        rest = parts[at + 1:]
        if part == ARTIFACTS and rest and (artifacts / rest[0]).is_dir():
            return artifacts.joinpath(*rest).as_uri()
    return None


def relocate_artifacts(uri: str) -> int:
    """Point the sqlite store at `uri` at the artifacts folder beside it; returns how many
    locations were rewritten."""
    db = sqlite_path(uri)
    if db is None or not db.exists():
        raise MegaloopError(f"{uri} is not an sqlite store on this machine: only a copied or "
                            "moved sqlite:///PATH store can be relocated.")
    open_client(uri)  # the tables as MLflow set them up (and its own checks of the file)
    artifacts = db.parent / ARTIFACTS
    changed = 0
    with sqlite3.connect(db) as con:  # one transaction: all rewritten, or none
        for table, key, column in COLUMNS:
            for row_id, location in con.execute(f"SELECT {key}, {column} FROM {table}").fetchall():
                new = _moved(location or "", artifacts)
                if new is not None:
                    con.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?",
                                (new, row_id))
                    changed += 1
    return changed


def stale_locations(uri: str) -> int:
    """How many experiments of the sqlite store at `uri` point at artifacts that are gone and
    would be found beside the store (what `megaloop runs --relocate` mends)."""
    db = sqlite_path(uri)
    if db is None or not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT artifact_location FROM experiments").fetchall()
    return sum(_moved(location or "", db.parent / ARTIFACTS) is not None for (location,) in rows)
