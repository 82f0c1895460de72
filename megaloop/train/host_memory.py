"""glibc's allocator on CPU training: keep freed memory for the next step.

With glibc's defaults every large tensor (above its mmap threshold, such as the logits and their
gradient) is mapped and unmapped each step, and the gradients that `zero_grad(set_to_none=True)`
frees come back as fresh pages: each step faults in and the kernel zeroes hundreds of MB. On the
CPU benchmark of the model issue that was 14% of the step (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)
GLIBC_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                  "MALLOC_TOP_PAD_")


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the system: no mmap for
    large blocks, no trimming of the heap top. Process-wide; the peak memory stays reserved.
    Equivalent to MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large> in the environment.
    Returns False where glibc's mallopt is unavailable (macOS, musl)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def tune_for_cpu_training() -> str:
    """`reuse_freed_memory()` unless the user set glibc's own MALLOC_* variables, which win.
    Returns what was done, for the log."""
    chosen = [name for name in GLIBC_SETTINGS if name in os.environ]
    if chosen:
        return f"glibc malloc as set by {', '.join(chosen)}"
    if reuse_freed_memory():
        return "glibc malloc keeps freed memory (no mmap, no trim; set MALLOC_MMAP_MAX_ to opt out)"
    return "system allocator (glibc's mallopt unavailable)"
