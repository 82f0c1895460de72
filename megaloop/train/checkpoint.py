"""Checkpoints as a run saves and resumes them: the engine state (DeepSpeed: weights, optimizer,
ZeRO shards), the loader state, every RNG state, the MLflow run id and the resolved config. What
a checkpoint is on disk (its layout, marker and verification) is megaloop/ckpt's; this module
writes and loads it through the run's Engine and agrees on it across the ranks.

A checkpoint is the folder `<run>/step_00000100/`. Every rank writes its files write-then-rename,
taking each file's SHA-256 as it is written; the ranks then agree that all of them succeeded,
and rank 0 writes `megaloop_complete.json` last, with every file's digest, size and writer.
Without that marker a checkpoint is incomplete and never loaded.

Resuming is one decision for all ranks: the ranks check the newest marked checkpoint's files
against its marker before anything is loaded (each rank hashes its share of the files), and
all load the first checkpoint that every rank found whole. A checkpoint that fails is set aside
as `step_....damaged` with a warning that names the file; an unmarked one newer than the chosen
one as `step_....incomplete`; a marked one that a run trained again (resumed from an older step)
reaches as `step_....replaced`. None of them is loaded, counted by pruning or overwritten. Only
the newest `keep` marked checkpoints are kept.

A checkpoint saved by another number of ranks loads only where resharding is allowed (the run
folder accepted the change): its ZeRO shards are converted to DeepSpeed's universal checkpoint
in `<run>/resharded/<tag>/` (rank 0, once), which every rank loads and rank 0 then removes;
rank r takes the loader and RNG state of saved rank r mod the saved world size.
"""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megaloop.atomic import atomic_write_hashed, file_digest, fsync_files
from megaloop.ckpt.layout import (
    MARKER,
    RESHARDED,
    CheckpointWarning,
    check_resume_target,
    read_marker,
    set_aside,
    step_folders,
    tag_of,
    verify_share,
    write_marker,
)
from megaloop.ckpt.reading import load_checkpoint_file
from megaloop.errors import CheckpointError
from megaloop.train.engine import universal_checkpoint


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


class Checkpoints:
    """The checkpoints of one run, in `folder`, written and read through the run's Engine
    (train/engine.py), which owns DeepSpeed's part of them and the collectives."""

    def __init__(self, folder: str | Path, keep: int, engine: Any, trust: bool = False,
                 reshard: bool = False):
        self.folder = Path(folder)
        self.keep, self.engine, self.trust, self.reshard = keep, engine, trust, reshard
        self.rank, self.world_size = engine.rank, engine.world_size

    @staticmethod
    def _rank_file(checkpoint: Path, rank: int) -> Path:
        return checkpoint / f"megaloop_rank{rank:05d}.pt"

    # ---- saving -----------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Every rank calls this; returns the checkpoint folder. CheckpointError on every rank
        when a rank failed to write its part: the checkpoint stays unmarked (never loaded) and
        the earlier ones are left as they are."""
        tag = tag_of(step)
        folder = self.folder / tag
        def clear() -> None:  # a step trained again: never write over a checkpoint
            if (folder / MARKER).exists():
                set_aside(folder, "replaced")
            elif folder.exists():
                shutil.rmtree(folder)  # a save cut short: nothing in it can be loaded

        self._on_rank0(clear)
        written, failure = self.engine.save_checkpoint(self.folder, tag, {"megaloop": state})
        if failure is None:
            payload = {"rng": rng_state(self.engine), "step": step}
            try:
                rank_file = self._rank_file(folder, self.rank)
                written[str(rank_file)] = atomic_write_hashed(
                    rank_file, lambda handle: torch.save(payload, handle))
            except Exception as exc:
                failure = f"writing {rank_file} failed ({type(exc).__name__}: {exc})"
        files = {str(Path(path).relative_to(folder)): digest for path, digest in written.items()}
        reports = self.engine.all_gather_objects({"files": files, "failure": failure})
        self._raise_failures(folder, reports)
        failure = None
        if self.rank == 0:
            try:
                self._mark(folder, step, reports, state.get("config_hash"))
                self._prune()
            except Exception as exc:
                failure = f"writing its marker failed ({type(exc).__name__}: {exc})"
        self._raise_failures(folder, self.engine.all_gather_objects({"failure": failure}))
        return folder

    def _raise_failures(self, folder: Path, reports: list[dict[str, Any]]) -> None:
        failed = [(rank, report["failure"]) for rank, report in enumerate(reports)
                  if report["failure"] is not None]
        if failed:
            rank, why = failed[0]
            raise CheckpointError(
                f"Saving checkpoint {folder} failed on rank {rank}: {why}. It is left unmarked, "
                "so it is never loaded, and the earlier checkpoints are intact. Free space on "
                "that disk (or point train.checkpoint_dir at another), then continue with "
                "--resume auto.")

    def _mark(self, folder: Path, step: int, reports: list[dict[str, Any]],
              config_hash: str | None) -> None:
        """Rank 0, once every rank's files are written: the marker, with the digest and writer
        of each file; files written outside DeepSpeed's checkpoint engine (its recovery
        script) are read once here."""
        files = {name: {**digest, "rank": rank} for rank, report in enumerate(reports)
                 for name, digest in report["files"].items()}
        others = [p for p in sorted(folder.rglob("*"))
                  if p.is_file() and p.name != MARKER and str(p.relative_to(folder)) not in files]
        fsync_files(others)
        files.update({str(p.relative_to(folder)): {**file_digest(p), "rank": 0} for p in others})
        write_marker(folder, step, self.world_size, config_hash, files)

    def complete(self) -> list[Path]:
        """Marked checkpoints, newest first."""
        return step_folders(self.folder, marked_only=True)

    def all_tags(self) -> list[Path]:
        """Every step_* folder, marked or not, newest first."""
        return step_folders(self.folder)

    def _prune(self) -> None:
        complete = self.complete()
        if not complete:
            return
        newest = complete[0].name
        stale = list(complete[self.keep:])
        stale += [p for p in self.all_tags() if not (p / MARKER).exists() and p.name < newest]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)

    # ---- resuming ---------------------------------------------------------------------------

    def _candidates(self, which: str) -> list[Path]:
        """The checkpoints to try, newest first: the same list on every rank, or an error."""
        if which != "auto":
            check_resume_target(which, self.trust)
            return [Path(which)]
        names = [p.name for p in self.complete()]
        seen = self.engine.all_gather_objects(names)
        if any(other != names for other in seen):
            raise CheckpointError(
                f"The ranks see different checkpoints in {self.folder} (rank 0: {seen[0]}, "
                f"{[f'rank {r}: {s}' for r, s in enumerate(seen) if s != seen[0]][0]}): "
                "train.checkpoint_dir must be one folder shared by every rank.")
        return [self.folder / name for name in names]

    def _agreed_problem(self, path: Path) -> str | None:
        """The first problem any rank found in its share of `path`'s files, the same answer
        on every rank (every rank reads the same marker, so all take the same branch)."""
        if not (path / MARKER).exists():  # an explicit folder with --trust-checkpoint
            return None
        try:
            saved_by = read_marker(path).get("world_size")
        except CheckpointError as exc:
            return str(exc)
        if saved_by != self.world_size and not self.reshard:
            raise CheckpointError(f"Checkpoint {path} was saved by {saved_by} ranks; this run "
                                  f"has {self.world_size}. Resume it on {saved_by} ranks, or "
                                  "pass --accept-changes to reshard it onto these.")
        problems = self.engine.all_gather_objects(
            verify_share(path, self.rank, self.world_size, self.trust))
        return next((problem for problem in problems if problem is not None), None)

    def load(self, which: str) -> dict[str, Any] | None:
        """Load `which` ("auto": the newest checkpoint that every rank finds whole; else one
        checkpoint folder) into the engine and this process; returns the saved megaloop state,
        None when there is none. Checkpoints skipped, and unmarked ones newer than the one
        loaded, are set aside."""
        chosen = None
        for path in self._candidates(which):
            problem = self._agreed_problem(path)
            if problem is None:
                chosen = path
                break
            if which != "auto":
                raise CheckpointError(f"Cannot resume from {path}: {problem}.")
            self._skip(path, problem, "damaged")
        if which == "auto":
            self._set_aside_newer_than(chosen)
        return None if chosen is None else self._load_verified(chosen)

    def _on_rank0(self, action: Any, doing: str | None = None) -> None:
        """Run `action` on rank 0 only; every rank raises its error, so none waits forever.
        `doing`: what the action does, for the message (else it changes the folder)."""
        failure = None
        if self.rank == 0:
            try:
                action()
            except Exception as exc:
                failure = f"{type(exc).__name__}: {exc}"
        failures = self.engine.all_gather_objects(failure)
        if failures[0] is None:
            return
        if doing is not None:
            raise CheckpointError(f"{doing} failed on rank 0 ({failures[0]}). Resume it on the "
                                  "number of ranks that saved it.")
        raise CheckpointError(f"Cannot change the checkpoints in {self.folder}: "
                              f"{failures[0]}. Check that the folder is writable.")

    def _skip(self, path: Path, problem: str, reason: str) -> None:
        def move_aside() -> None:
            moved = set_aside(path, reason)
            warnings.warn(f"Skipping checkpoint {path}: {problem}. It is kept as {moved} and "
                          "never loaded.", CheckpointWarning, stacklevel=4)

        self._on_rank0(move_aside)

    def _set_aside_newer_than(self, chosen: Path | None) -> None:
        """Unmarked checkpoints newer than the one resumed (a save that never finished): set
        aside, so that this run writes those steps afresh."""
        newer = [p for p in self.all_tags() if chosen is None or p.name > chosen.name]
        for path in newer:
            self._skip(path, f"it has no marker {MARKER} (its save did not finish)",
                       "incomplete")

    def _load_verified(self, path: Path) -> dict[str, Any]:
        marker = read_marker(path) if (path / MARKER).exists() else None
        saved_by = (marker or {}).get("world_size") or self.world_size
        try:
            if saved_by != self.world_size:
                client = self._load_resharded(path, marker)
            else:
                client = self.engine.load_checkpoint(path.parent, path.name)
            payload = load_checkpoint_file(self._rank_file(path, self.rank % saved_by),
                                           trust=self.trust)
        except CheckpointError:
            raise
        except Exception as exc:  # whole files that do not load: nothing can be taken back
            raise CheckpointError(
                f"Checkpoint {path} holds the files that were written but does not load "
                f"({type(exc).__name__}: {exc}). Part of it may be in the engine already, so "
                "the run stops here; check that megaloop, DeepSpeed and the config are those "
                "that saved it.") from exc
        if client is None or "megaloop" not in client:
            raise CheckpointError(f"Checkpoint {path}: DeepSpeed found no engine state in it.")
        set_rng_state(self.engine, payload["rng"])
        return client["megaloop"]

    def _load_resharded(self, path: Path, marker: dict[str, Any]) -> dict[str, Any] | None:
        """Load verified checkpoint `path` (its `marker`), saved by another number of ranks,
        through its universal checkpoint; ZeRO stage 0 (no shards: every rank's optimizer
        state whole in the model file) loads as it is."""
        if not any(name.endswith("optim_states.pt") for name in marker["files"]):
            return self.engine.load_checkpoint(path.parent, path.name)

        universal = self.folder / RESHARDED
        def convert() -> None:
            shutil.rmtree(universal, ignore_errors=True)
            universal_checkpoint(path, universal / path.name, self.trust)

        self._on_rank0(convert, f"Converting checkpoint {path} for another number of ranks")
        try:
            return self.engine.load_checkpoint(universal, path.name, universal=True)
        finally:
            self._on_rank0(lambda: shutil.rmtree(universal))
