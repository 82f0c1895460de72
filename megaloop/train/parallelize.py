"""What the trainer applies to a model from outside it: activation checkpointing and
torch.compile (torchtitan's apply_ac / apply_compile). The model offers two seams, LoopedLM's
`run_layer` and `run_recurrence`; these functions wrap them on one model instance, so the
model's code has no flag for either and its parameter names do not change."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from megaloop.errors import ConfigError
from megaloop.model.looped import LoopedLM

AC_MODES = ("none", "per_recurrence", "per_layer")


def apply_ac(model: LoopedLM, mode: str) -> LoopedLM:
    """Activation checkpointing: `per_recurrence` keeps one loop state per recurrence and
    recomputes the recurrence in backward; `per_layer` does so for every layer (prelude, loop and
    coda). Torch's non-reentrant kind: safe with ZeRO-3 on the reused loop block (RESEARCH.md
    section 6). Skipped without gradients and while a KV cache fills (generation)."""
    if mode not in AC_MODES:
        raise ConfigError(f"activation_checkpointing = {mode!r} is not one of: "
                          f"{', '.join(AC_MODES)}.")
    for seam in ("run_layer", "run_recurrence"):  # a second call replaces the first
        model.__dict__.pop(seam, None)
    if mode == "none":
        return model
    seam = "run_layer" if mode == "per_layer" else "run_recurrence"
    plain = getattr(model, seam)

    @functools.wraps(plain)
    def checkpointed(*args: Any, cache: Any = None) -> Any:
        if not torch.is_grad_enabled() or cache is not None:
            return plain(*args, cache=cache)
        return checkpoint(plain, *args, use_reentrant=False)

    setattr(model, seam, checkpointed)
    return model


def apply_compile(model: LoopedLM, **options: Any) -> LoopedLM:
    """torch.compile every transformer block in place (train.compile; `options` go to
    torch.compile). Per block, not the whole model: the loop's block compiles once whatever r a
    step runs, where a whole-model graph unrolls the loop and would recompile for every sampled
    r."""
    for stack in (model.prelude, model.loop, model.coda):
        for layer in stack:
            layer.compile(**options)
    return model
