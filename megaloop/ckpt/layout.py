"""The checkpoint on disk: what a step folder holds and how it is found and verified.

A run folder `<train.checkpoint_dir>/<run>/` holds step folders `step_NNNNNNNN/`. Each holds
DeepSpeed's files (`mp_rank_00_model_states.pt` at ZeRO 0-2; at ZeRO-3 every rank's
`zero_pp_rank_R_mp_rank_00_{model,optim}_states.pt`), one `megaloop_rankRRRRR.pt` per rank (its
generator states) and, written last, the marker `megaloop_complete.json` (format
megaloop-checkpoint-v2: each file's sha256, bytes and writer, the step, the ranks, the config
hash). A folder without a marker is an unfinished save; `.damaged`, `.incomplete` and
`.replaced` folders are set aside and never loaded, pruned or overwritten.

The trainer writes through this room (train/checkpoint.py), export and inference read through it
(export/weights.py): none of it needs DeepSpeed or the trainer.
"""

from __future__ import annotations

import json
import re
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from megaloop.atomic import atomic_write_json, file_digest
from megaloop.errors import CheckpointError

MARKER = "megaloop_complete.json"
RESHARDED = "resharded"  # the universal checkpoint of a resume onto another number of ranks
MARKER_FORMAT = "megaloop-checkpoint-v2"  # v1 (no "format" key) recorded sizes only
TAG = re.compile(r"^step_(\d{8})$")
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's, at ZeRO 0-2
ZERO3_MODEL_STATES = "zero_pp_rank_{}_mp_rank_00_model_states.pt"  # and at ZeRO-3, per rank
ZERO3_OPTIM_STATES = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped because it is incomplete or damaged."""


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def read_marker(folder: Path) -> dict[str, Any]:
    """The marker of checkpoint `folder`; CheckpointError when it is missing or unreadable."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        if not isinstance(marker["files"], dict):
            raise TypeError("'files' is not a mapping")
        return marker
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"its marker {MARKER} is unreadable ({exc})") from None


def file_problem(folder: Path, name: str, recorded: Any, sizes_only: bool = False) -> str | None:
    """Why file `name` of checkpoint `folder` is not the one written (missing, another size,
    other bytes), or None. `sizes_only`: a v1 marker's entry (a size)."""
    file = folder / name
    if not file.is_file():
        return f"{name} is missing"
    size = recorded if sizes_only else recorded.get("bytes")
    if file.stat().st_size != size:
        return f"{name} has {file.stat().st_size} bytes, {size} were written"
    if not sizes_only and file_digest(file)["sha256"] != recorded.get("sha256"):
        return f"{name} does not hold the bytes that were written (its SHA-256 differs)"
    return None


def verify_share(folder: Path, rank: int, world_size: int, trust: bool = False) -> str | None:
    """Check this rank's share of checkpoint `folder`'s files (every world_size-th, from
    `rank`) against its marker: the ranks read the checkpoint once between them. Returns the
    first problem found, or None."""
    try:
        marker = read_marker(folder)
    except CheckpointError as exc:
        return str(exc)
    sizes_only = marker.get("format") != MARKER_FORMAT
    if sizes_only and not trust:
        return ("its marker records file sizes only (an older megaloop wrote it), so its "
                "contents cannot be verified; resume with --trust-checkpoint to load it anyway")
    for name in sorted(marker["files"])[rank::world_size]:
        problem = file_problem(folder, name, marker["files"][name], sizes_only)
        if problem is not None:
            return problem
    return None


def step_folders(run: Path, marked_only: bool = False) -> list[Path]:
    """The step_* folders of run folder `run` (only those with a marker: `marked_only`),
    newest first."""
    if not run.is_dir():
        return []
    found = [p for p in run.iterdir()
             if TAG.match(p.name) and (not marked_only or (p / MARKER).exists())]
    return sorted(found, key=lambda p: p.name, reverse=True)


def check_resume_target(which: str | None, trust: bool = False) -> None:
    """`--resume`: `auto`, or a checkpoint folder (with its marker, unless `trust`); else a
    CheckpointError that says which, before a run writes anything."""
    if which is None or which == "auto":
        return
    path = Path(which)
    if not path.is_dir():
        hint = " (did you mean --resume auto?)" if "auto".startswith(which.lower()[:2]) else ""
        raise CheckpointError(f"--resume {which}: there is no folder {path}{hint}. Pass --resume "
                              "auto for the run's newest checkpoint, or a step_* folder of a run.")
    if not (path / MARKER).exists() and not trust:
        raise CheckpointError(f"{path} is not a complete megaloop checkpoint (no {MARKER}); pass "
                              "a step_* folder of a run, or --resume auto.")


def set_aside(path: Path, reason: str) -> Path:
    """Rename checkpoint `path` to `<tag>.<reason>` (a free name): kept for inspection, never
    loaded, pruned or overwritten."""
    target = path.with_name(f"{path.name}.{reason}")
    count = 1
    while target.exists():
        target, count = path.with_name(f"{path.name}.{reason}.{count}"), count + 1
    path.rename(target)
    return target


def write_marker(folder: Path, step: int, world_size: int, config_hash: str | None,
                 files: dict[str, dict[str, Any]]) -> None:
    """The marker of checkpoint `folder`, written last: every file's digest, size and writer."""
    atomic_write_json(folder / MARKER, {
        "format": MARKER_FORMAT, "step": step, "world_size": world_size,
        "config_hash": config_hash, "files": files,
        "saved": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def resolve(path: str | Path) -> Path:
    """The checkpoint that `path` names: a .safetensors file, a step folder, or the newest
    readable complete checkpoint of a run folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a checkpoint folder (step_*), a run "
                              "folder under train.checkpoint_dir or an exported .safetensors file.")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path} is a file but not a .safetensors export; pass a "
                                  "checkpoint folder (step_*), a run folder or a file made by "
                                  "`megaloop export`.")
        return path
    if (path / MARKER).exists():
        problem = verify_share(path, 0, 1, trust=True)
        if problem:
            raise CheckpointError(f"Checkpoint {path} cannot be read: {problem}.")
        return path
    steps = step_folders(path)
    for step in steps:
        if not (step / MARKER).exists():
            continue
        problem = verify_share(step, 0, 1, trust=True)
        if problem is None:
            return step
        warnings.warn(f"Skipping checkpoint {step}: {problem}.", CheckpointWarning, stacklevel=2)
    if steps:
        raise CheckpointError(f"{path} holds no complete, readable checkpoint (step_* folders "
                              f"without {MARKER} are unfinished saves).")
    raise CheckpointError(f"{path} is not a megaloop checkpoint: it has no {MARKER} and no "
                          "step_* folders; pass a step_* folder, a run folder or an exported "
                          ".safetensors file.")
