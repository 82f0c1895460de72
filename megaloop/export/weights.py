"""Trained weights out of checkpoints: consolidate a checkpoint's weights in one plain process
(megaloop/ckpt: its layout, its files read without code, ZeRO-3 shards made whole), rebuild the
model of its saved config, export fp32 safetensors.

`--checkpoint` may name a step folder (`<run>/step_00000100/`), a run folder (its newest complete
checkpoint whose files hold the bytes its marker records) or a `.safetensors` file made by
`megaloop export` (its metadata holds the resolved config). Nothing here imports the trainer or
DeepSpeed.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from megaloop.ckpt.layout import resolve
from megaloop.ckpt.zero import read_zero_weights
from megaloop.config import RunConfig, from_dict, upgrade_saved
from megaloop.errors import CheckpointError, MegaloopError
from megaloop.model.looped import LoopedLM

EXPORT_FORMAT = "megaloop-fp32-v1"


@dataclass
class LoadedCheckpoint:
    """The consolidated fp32 weights of a checkpoint and the config it was trained with."""

    config: RunConfig
    state_dict: dict[str, torch.Tensor]
    path: Path  # the step folder or the .safetensors file
    step: int | None
    world_size: int  # the ranks that trained it (its validation covered that many shards)


# ---- reading weights -------------------------------------------------------------------------

def _config(raw: Any, where: Path) -> RunConfig:
    try:
        return from_dict(upgrade_saved(raw))
    except MegaloopError as exc:
        raise CheckpointError(f"The config saved in {where} is not valid for this version of "
                              f"megaloop: {exc}") from None


def _load_folder(folder: Path) -> LoadedCheckpoint:
    weights, client, world_size = read_zero_weights(folder)
    return LoadedCheckpoint(_config(client["config"], folder), weights, folder,
                            client.get("step"), world_size)


def _load_file(file: Path) -> LoadedCheckpoint:

    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        weights = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file ({exc}).") from None
    if metadata.get("format") != EXPORT_FORMAT or "config" not in metadata:
        raise CheckpointError(f"{file} is not a `megaloop export` file (its metadata has no "
                              "megaloop config); export a checkpoint with `megaloop export`.")
    step = metadata.get("step")
    return LoadedCheckpoint(_config(json.loads(metadata["config"]), file),
                            {name: tensor.float() for name, tensor in weights.items()}, file,
                            int(step) if step not in (None, "") else None,
                            int(metadata.get("world_size", 1)))


def read_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """The consolidated fp32 weights and the config of the checkpoint `path` names."""
    found = resolve(path)
    return _load_file(found) if found.is_file() else _load_folder(found)


def model_of(loaded: LoadedCheckpoint, device: str | torch.device = "cpu") -> LoopedLM:
    """The model of the checkpoint's config with its weights, in eval mode."""
    model = LoopedLM(loaded.config.model, init_weights=False)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(loaded.state_dict))
    unexpected = sorted(set(loaded.state_dict) - set(expected))
    wrong = sorted(name for name in set(expected) & set(loaded.state_dict)
                   if expected[name].shape != loaded.state_dict[name].shape)
    if missing or unexpected or wrong:
        details = "; ".join(f"{label}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                            for label, names in (("missing", missing), ("unexpected", unexpected),
                                                 ("wrong shape", wrong)) if names)
        raise CheckpointError(f"The weights in {loaded.path} do not fit the model of its config "
                              f"({details}): the checkpoint comes from an incompatible config "
                              "or version of megaloop.")
    model.load_state_dict(loaded.state_dict)
    model.rotary.reset()
    return model.to(device).eval()


def load_model(path: str | Path,
               device: str | torch.device = "cpu") -> tuple[LoopedLM, LoadedCheckpoint]:
    loaded = read_checkpoint(path)
    return model_of(loaded, device), loaded


# ---- export ----------------------------------------------------------------------------------

def save_safetensors(tensors: dict[str, torch.Tensor], out: Path,
                     metadata: dict[str, str]) -> None:
    """safetensors' save_file to a temporary name beside `out`, then a rename."""

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file({name: t.contiguous() for name, t in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_safetensors(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the consolidated fp32 weights of `checkpoint` to `out` with the resolved config in
    the metadata; returns a summary."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"--out {out} must end in .safetensors.")
    return write_export(read_checkpoint(checkpoint), out)


def write_export(loaded: LoadedCheckpoint, out: str | Path) -> dict[str, Any]:
    """Write `loaded` (e.g. a model's state_dict with its RunConfig) as a megaloop export."""
    out = Path(out)
    model_of(loaded)  # refuse weights that do not fit their config before writing anything
    metadata = {"format": EXPORT_FORMAT, "config": json.dumps(loaded.config.to_dict()),
                "config_hash": loaded.config.hash(), "world_size": str(loaded.world_size),
                "step": "" if loaded.step is None else str(loaded.step),
                "source": str(loaded.path)}
    save_safetensors(loaded.state_dict, out, metadata)
    return {"out": str(out), "checkpoint": str(loaded.path), "step": loaded.step,
            "parameters": sum(t.numel() for t in loaded.state_dict.values()),
            "config_hash": loaded.config.hash()}
