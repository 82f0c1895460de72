"""Two measures of the activation memory of one forward + backward pass.

`saved_tensor_bytes`: the bytes of the tensors autograd keeps for the backward pass, summed over
distinct storages (parameters and buffers excluded), through `saved_tensors_hooks`. It is
deterministic. With non-reentrant checkpointing the tensors saved inside a checkpointed region
go to checkpoint's own (inner) hooks and are dropped, so only the region inputs are counted, as
they should be.

`peak_rss_increase`: the peak resident set size during forward + backward above the resident set
just before it (parameters, gradients and optimizer state already allocated), from Linux's
VmHWM after resetting it through /proc/self/clear_refs. It includes every transient (recomputed
activations, gradients of activations, kernel workspaces), but depends on the allocator.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Callable

import torch
from torch.autograd.graph import saved_tensors_hooks


def saved_tensor_bytes(module: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> int:
    """Bytes saved for backward by one forward of `loss_fn`; runs the backward to free them."""
    state = {t.untyped_storage().data_ptr() for t in module.parameters()}
    state |= {t.untyped_storage().data_ptr() for t in module.buffers()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in state and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    loss.backward()
    return sum(seen.values())


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_rss_increase(step: Callable[[], None]) -> int | None:
    """Peak RSS above the current RSS while `step` runs, in bytes; None where Linux's peak reset
    is unavailable. Freed heap is returned to the system first so that it cannot hide growth."""
    _trim_heap()
    if not _reset_peak_rss():
        return None
    before = _status_kib("VmRSS")
    step()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return (peak - before) * 1024
