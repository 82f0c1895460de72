"""Checkpoints: the engine state (DeepSpeed: weights, optimizer, ZeRO shards), the loader state,
every RNG state, the MLflow run id and the resolved config.

A checkpoint is the folder `<run>/step_00000100/`. Every rank writes its part, then rank 0 writes
`megaloop_complete.json` (the sizes of all files) last: without it a checkpoint is incomplete and
never loaded. `--resume auto` takes the newest complete checkpoint whose files have the recorded
sizes and load, skipping others with a warning. Only the newest `keep` complete ones are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megaloop.atomic import atomic_write, atomic_write_json, fsync_files
from megaloop.errors import CheckpointError

MARKER = "megaloop_complete.json"
TAG = re.compile(r"^step_(\d{8})$")


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped because it is incomplete or damaged."""


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def rng_state(engine: Any) -> dict[str, Any]:
    """Every generator this process draws from: torch's, the device's, Python's, numpy's."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "device": engine.device_rng_state(),
        "python": [list(v) if isinstance(v, tuple) else v for v in random.getstate()],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)),
                  *numpy_state[2:]],
    }


def set_rng_state(engine: Any, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    engine.set_device_rng_state(state.get("device"))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def marker_problem(folder: Path) -> str | None:
    """Why the checkpoint `folder` is incomplete or damaged (its marker unreadable, a file
    missing or of another size than was written), or None."""
    try:
        files = json.loads((folder / MARKER).read_text())["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        return f"its marker {MARKER} is unreadable ({exc})"
    for name, size in files.items():
        file = folder / name
        if not file.exists():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


class Checkpoints:
    """The checkpoints of one run, in `folder`, written and read through the run's Engine
    (train/engine.py), which owns DeepSpeed's part of them."""

    def __init__(self, folder: str | Path, keep: int, engine: Any):
        self.folder = Path(folder)
        self.keep, self.engine = keep, engine
        self.rank, self.world_size = engine.rank, engine.world_size

    def barrier(self) -> None:
        self.engine.barrier()

    def _rank_file(self, tag: str, rank: int) -> Path:
        return self.folder / tag / f"megaloop_rank{rank:05d}.pt"

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Every rank calls this; returns the checkpoint folder."""
        tag = tag_of(step)
        self.engine.save_checkpoint(self.folder, tag, {"megaloop": state})
        payload = {"rng": rng_state(self.engine), "step": step}
        atomic_write(self._rank_file(tag, self.rank), lambda handle: torch.save(payload, handle))
        self.barrier()
        if self.rank == 0:
            folder = self.folder / tag
            written = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER]
            fsync_files(written)
            files = {str(p.relative_to(folder)): p.stat().st_size for p in written}
            atomic_write_json(folder / MARKER, {
                "step": step, "world_size": self.world_size, "files": files,
                "saved": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            self._prune()
        self.barrier()
        return self.folder / tag

    def complete(self) -> list[Path]:
        """Complete checkpoints, newest first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if TAG.match(p.name) and (p / MARKER).exists()]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def _prune(self) -> None:
        complete = self.complete()
        if not complete:
            return
        newest = complete[0].name
        stale = list(complete[self.keep:])
        stale += [p for p in self.folder.iterdir()
                  if TAG.match(p.name) and not (p / MARKER).exists() and p.name < newest]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)

    def _problem(self, path: Path) -> str | None:
        """Why the checkpoint at `path` cannot be loaded by this run, or None."""
        problem = marker_problem(path)
        if problem is not None:
            return problem
        saved_by = json.loads((path / MARKER).read_text()).get("world_size")
        if saved_by != self.world_size:
            return f"it was saved by {saved_by} ranks, this run has {self.world_size}"
        return None

    def load(self, which: str) -> dict[str, Any] | None:
        """Load `which` ("auto": the newest loadable one; else a checkpoint folder) into the
        engine and this process; returns the saved megaloop state, None when there is none."""
        if which == "auto":
            candidates = self.complete()
        else:
            path = Path(which)
            if not (path / MARKER).exists():
                raise CheckpointError(f"{path} is not a complete megaloop checkpoint (no {MARKER});"
                                      " pass a step_* folder of a run or --resume auto.")
            candidates = [path]
        for path in candidates:
            problem = self._problem(path)
            if problem is None:
                state = self._load_one(path)
                if isinstance(state, dict):
                    return state
                problem = state
            if which != "auto":
                raise CheckpointError(f"Cannot resume from {path}: {problem}.")
            warnings.warn(f"Skipping checkpoint {path}: {problem}.", CheckpointWarning,
                          stacklevel=2)
        return None

    def _load_one(self, path: Path) -> dict[str, Any] | str:
        try:
            client = self.engine.load_checkpoint(path.parent, path.name)
            payload = torch.load(self._rank_file(path.name, self.rank), weights_only=True)
        except Exception as exc:  # a damaged file surfaces as any error of torch or DeepSpeed
            return f"it does not load ({type(exc).__name__}: {exc})"
        if client is None or "megaloop" not in client:
            return "DeepSpeed found no engine state in it"
        set_rng_state(self.engine, payload["rng"])
        return client["megaloop"]
