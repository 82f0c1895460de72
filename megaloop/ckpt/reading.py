"""Reading a checkpoint's files without running code: `torch.load(weights_only=True)` with an
allow-list of the few DeepSpeed classes its optimizer files pickle (data only: the ZeRO stage
enum, the loss scaler's settings, a fragment's offset and size).

Where megaloop only reads weights (export, evaluation), those classes are stood in for by
`Pickled`, so no DeepSpeed code is imported or run; where the trainer hands the state back to
DeepSpeed's engine, the engine allows the real classes (train/engine.py,
`checkpoint_pickle_globals`, by the names listed here).
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from megaloop.errors import CheckpointError

# The DeepSpeed objects that ZeRO optimizer files pickle, by the name they are pickled under.
DEEPSPEED_PICKLED = ("deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.utils.tensor_fragment.fragment_address")


class Pickled:
    """A DeepSpeed object of a checkpoint file, read as plain data: its constructor arguments
    and its attributes, never its class's code."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


def stand_ins() -> list[tuple[type, str]]:
    """The allow-list of a reader: `Pickled` under each of DEEPSPEED_PICKLED's names."""
    return [(Pickled, name) for name in DEEPSPEED_PICKLED]


_torch_load = torch.load  # torch's own, also while `loads_without_code` stands in for it


def load_checkpoint_file(path: str | Path, map_location: Any = None, trust: bool = False,
                         allowed: Sequence[Any] | None = None) -> Any:
    """`torch.load` of a checkpoint file that runs no code: tensors, plain data and the
    `allowed` globals (default: the stand-ins). `trust`: unpickle fully (for a checkpoint of
    another tool, whose source the user trusts)."""
    try:
        with torch.serialization.safe_globals(list(stand_ins() if allowed is None
                                                   else allowed)):
            return _torch_load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as exc:
        lines = str(exc).strip().splitlines()
        reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])
        raise CheckpointError(
            f"{path} holds pickled objects beyond tensors and plain data ({reason}). megaloop "
            "loads no code from a checkpoint and writes none into its own; if you trust where "
            "this one came from, resume with --trust-checkpoint.") from None


@contextlib.contextmanager
def loads_without_code(trust: bool, allowed: Sequence[Any] | None = None) -> Iterator[None]:
    """Every `torch.load` inside runs no code (`load_checkpoint_file`'s rule), unless `trust`.
    DeepSpeed's universal-checkpoint conversion and loader unpickle fully and take no
    checkpoint engine, so this is the one place to hold them to it."""
    if trust:
        yield
        return

    def load(path: Any, map_location: Any = None, **_: Any) -> Any:
        return load_checkpoint_file(path, map_location, allowed=allowed)

    torch.load = load
    try:
        yield
    finally:
        torch.load = _torch_load


def load_weights_file(file: Path) -> Any:
    """One file of a checkpoint, memory-mapped on the CPU, read for its weights: no code runs
    (DeepSpeed's pickled objects come back as `Pickled`); a file that does not load is damaged."""
    try:
        with torch.serialization.safe_globals(stand_ins()):
            return _torch_load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a damaged file surfaces as any error of the unpickler
        raise CheckpointError(f"{file} does not load ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); the checkpoint "
                              "is damaged or not one megaloop wrote.") from None
