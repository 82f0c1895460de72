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
    key_compile_cache_on_cpu_isa()
    for stack in (model.prelude, model.loop, model.coda):
        for layer in stack:
            layer.compile(**options)
    return model


def key_compile_cache_on_cpu_isa() -> str:
    """Add the CPU vector ISA inductor generates code for to torch.compile's cache key
    (torch.compiler.config.cache_key_tag, after any tag of the user's) and return the tag.

    PyTorch 2.13's FX graph cache key names the GPU but not the CPU ISA. A graph cached where
    inductor picked AVX-512 (16 floats a vector), then loaded where it picks AVX2 (a CPU
    without AVX-512, or ATEN_CPU_CAPABILITY=avx2), has its C++ kernels rebuilt with AVX2
    flags: loops that step 16 floats over 8-float vectors, and the losses are NaN from step 1.
    The same happens with a cache folder shared by unlike nodes. With the ISA in the key each
    ISA gets its own entries. Measured in benchmarks/RESULTS.md (issue 29)."""
    # inductor's own choice (AMX included); imported here, its 1.8 s paid by compiled runs only
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = f"megaloop-cpu-isa={pick_vec_isa()}"
    parts = [part for part in torch.compiler.config.cache_key_tag.split(";")
             if part and not part.startswith("megaloop-cpu-isa=")]
    torch.compiler.config.cache_key_tag = ";".join([*parts, isa])
    return torch.compiler.config.cache_key_tag
