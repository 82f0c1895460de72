"""DeepSpeed's checkpoint files, read as whole fp32 weights in one plain process.

- ZeRO stage 0-2: the module state of `mp_rank_00_model_states.pt` (whole on every rank). In a
  bf16 run those are the bf16 weights the model computed with, cast to fp32.
- ZeRO stage 3: the fp32 master partitions in every rank's `*_optim_states.pt`, laid out
  parameter after parameter in the order of `param_shapes` (each parameter cut into
  ceil(numel / ranks) pieces, the last one padded), as DeepSpeed's zero_to_fp32 reads them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from megaloop.ckpt.layout import MARKER, MODEL_STATES, ZERO3_MODEL_STATES, ZERO3_OPTIM_STATES
from megaloop.ckpt.reading import load_weights_file
from megaloop.errors import CheckpointError


def zero3_weights(folder: Path, world_size: int) -> dict[str, torch.Tensor]:
    meta = load_weights_file(folder / ZERO3_MODEL_STATES.format(0))
    shapes = {name: shape for group in meta["param_shapes"] for name, shape in group.items()}
    flats = []
    for rank in range(world_size):
        name = ZERO3_OPTIM_STATES.format(rank)
        if not (folder / name).exists():  # bf16 runs prefix the optimizer files
            name = "bf16_" + name
        optim = load_weights_file(folder / name)
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


def client_state(states: dict[str, Any], file: Path) -> dict[str, Any]:
    client = states.get("megaloop")
    if not isinstance(client, dict) or "config" not in client:
        raise CheckpointError(f"{file} holds no megaloop state (config, step); it was not "
                              "written by `megaloop train`.")
    return client


def read_zero_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """(fp32 weights, the megaloop state saved with them, the ranks that saved them) of the
    verified checkpoint `folder`."""
    marker = json.loads((folder / MARKER).read_text())
    world_size = int(marker.get("world_size", 1))
    files = marker["files"]
    if ZERO3_MODEL_STATES.format(0) in files:
        meta_file = folder / ZERO3_MODEL_STATES.format(0)
        client = client_state(load_weights_file(meta_file), meta_file)
        weights = zero3_weights(folder, world_size)
    elif MODEL_STATES in files:
        states = load_weights_file(folder / MODEL_STATES)
        client = client_state(states, folder / MODEL_STATES)
        weights = {name: tensor.float().clone() for name, tensor in states["module"].items()}
    else:
        raise CheckpointError(f"{folder} has no DeepSpeed model states ({MODEL_STATES} or "
                              f"{ZERO3_MODEL_STATES.format(0)}).")
    return {name: tensor.float() for name, tensor in weights.items()}, client, world_size
