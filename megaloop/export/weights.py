"""Trained weights out of checkpoints: find a checkpoint, consolidate its weights in one plain
process (ZeRO-3 shards included), rebuild the model of its saved config, export fp32 safetensors.

`--checkpoint` may name a step folder (`<run>/step_00000100/`), a run folder (its newest complete
checkpoint whose files hold the bytes its marker records) or a `.safetensors` file made by
`megaloop export` (its metadata holds the resolved config).

Where the weights come from:
- ZeRO stage 0-2: the module state of `mp_rank_00_model_states.pt` (whole on every rank). In a
  bf16 run those are the bf16 weights the model computed with, cast to fp32.
- ZeRO stage 3: the fp32 master partitions in every rank's `*_optim_states.pt`, laid out
  parameter after parameter in the order of `param_shapes` (each parameter cut into
  ceil(numel / ranks) pieces, the last one padded), as DeepSpeed's zero_to_fp32 reads them.

Every file is read with `torch.load(weights_only=True)`: no code from a checkpoint runs. DeepSpeed's
optimizer files pickle two DeepSpeed objects (the ZeRO stage enum, the loss scaler), which are
allowlisted by name; no DeepSpeed code is called (train/engine.py names them).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megaloop.config import RunConfig, from_dict, upgrade_saved
from megaloop.errors import CheckpointError, MegaloopError
from megaloop.model.looped import LoopedLM
from megaloop.train.checkpoint import MARKER, CheckpointWarning, step_folders, verify_share
from megaloop.train.engine import checkpoint_pickle_globals

MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO 0-2
ZERO3_MODEL_STATES = "zero_pp_rank_{}_mp_rank_00_model_states.pt"
ZERO3_OPTIM_STATES = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
EXPORT_FORMAT = "megaloop-fp32-v1"


@dataclass
class LoadedCheckpoint:
    """The consolidated fp32 weights of a checkpoint and the config it was trained with."""

    config: RunConfig
    state_dict: dict[str, torch.Tensor]
    path: Path  # the step folder or the .safetensors file
    step: int | None
    world_size: int  # the ranks that trained it (its validation covered that many shards)


# ---- finding a checkpoint --------------------------------------------------------------------

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


# ---- reading weights -------------------------------------------------------------------------

def _torch_load(file: Path, *, allow_deepspeed: bool = False) -> Any:
    try:
        if not allow_deepspeed:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        with torch.serialization.safe_globals(checkpoint_pickle_globals()):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a damaged file surfaces as any error of the unpickler
        raise CheckpointError(f"{file} does not load ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); the checkpoint "
                              "is damaged or not one megaloop wrote.") from None


def _zero3_weights(folder: Path, world_size: int) -> dict[str, torch.Tensor]:
    meta = _torch_load(folder / ZERO3_MODEL_STATES.format(0))
    shapes = {name: shape for group in meta["param_shapes"] for name, shape in group.items()}
    flats = []
    for rank in range(world_size):
        name = ZERO3_OPTIM_STATES.format(rank)
        if not (folder / name).exists():  # bf16 runs prefix the optimizer files
            name = "bf16_" + name
        optim = _torch_load(folder / name, allow_deepspeed=True)
        state = optim["optimizer_state_dict"]
        if state.get("partition_count") != world_size:
            raise CheckpointError(f"{folder} was partitioned over {state.get('partition_count')} "
                                  f"ranks but its marker records {world_size}.")
        flats.append(torch.cat([group.detach().flatten() for group in state["fp32_flat_groups"]]))
    weights, offset = {}, 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        part = math.ceil(numel / world_size)
        pieces = [flat[offset:offset + part] for flat in flats]
        weights[name] = torch.cat(pieces)[:numel].view(shape).clone()
        offset += part
    if offset != flats[0].numel():
        raise CheckpointError(f"The ZeRO-3 partitions in {folder} hold {flats[0].numel()} values "
                              f"per rank, the parameter shapes account for {offset}.")
    for name, source in (meta.get("shared_params") or {}).items():
        weights[name] = weights[source]
    return weights


def _client_state(states: dict[str, Any], file: Path) -> dict[str, Any]:
    client = states.get("megaloop")
    if not isinstance(client, dict) or "config" not in client:
        raise CheckpointError(f"{file} holds no megaloop state (config, step); it was not "
                              "written by `megaloop train`.")
    return client


def _config(raw: Any, where: Path) -> RunConfig:
    try:
        return from_dict(upgrade_saved(raw))
    except MegaloopError as exc:
        raise CheckpointError(f"The config saved in {where} is not valid for this version of "
                              f"megaloop: {exc}") from None


def _load_folder(folder: Path) -> LoadedCheckpoint:
    marker = json.loads((folder / MARKER).read_text())
    world_size = int(marker.get("world_size", 1))
    files = marker["files"]
    if ZERO3_MODEL_STATES.format(0) in files:
        meta_file = folder / ZERO3_MODEL_STATES.format(0)
        client = _client_state(_torch_load(meta_file), meta_file)
        weights = _zero3_weights(folder, world_size)
    elif MODEL_STATES in files:
        states = _torch_load(folder / MODEL_STATES)
        client = _client_state(states, folder / MODEL_STATES)
        weights = {name: tensor.float().clone() for name, tensor in states["module"].items()}
    else:
        raise CheckpointError(f"{folder} has no DeepSpeed model states ({MODEL_STATES} or "
                              f"{ZERO3_MODEL_STATES.format(0)}).")
    weights = {name: tensor.float() for name, tensor in weights.items()}
    return LoadedCheckpoint(_config(client["config"], folder), weights, folder,
                            client.get("step"), world_size)


def _load_file(file: Path) -> LoadedCheckpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

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


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """The consolidated fp32 weights and the config of the checkpoint `path` names."""
    found = resolve(path)
    return _load_file(found) if found.is_file() else _load_folder(found)


def build_model(loaded: LoadedCheckpoint, device: str | torch.device = "cpu") -> LoopedLM:
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
    loaded = load_checkpoint(path)
    return build_model(loaded, device), loaded


# ---- export ----------------------------------------------------------------------------------

def save_safetensors(tensors: dict[str, torch.Tensor], out: Path,
                     metadata: dict[str, str]) -> None:
    """safetensors' save_file to a temporary name beside `out`, then a rename."""
    from safetensors.torch import save_file

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
    return write_export(load_checkpoint(checkpoint), out)


def write_export(loaded: LoadedCheckpoint, out: str | Path) -> dict[str, Any]:
    """Write `loaded` (e.g. a model's state_dict with its RunConfig) as a megaloop export."""
    out = Path(out)
    build_model(loaded)  # refuse weights that do not fit their config before writing anything
    metadata = {"format": EXPORT_FORMAT, "config": json.dumps(loaded.config.to_dict()),
                "config_hash": loaded.config.hash(), "world_size": str(loaded.world_size),
                "step": "" if loaded.step is None else str(loaded.step),
                "source": str(loaded.path)}
    save_safetensors(loaded.state_dict, out, metadata)
    return {"out": str(out), "checkpoint": str(loaded.path), "step": loaded.step,
            "parameters": sum(t.numel() for t in loaded.state_dict.values()),
            "config_hash": loaded.config.hash()}
