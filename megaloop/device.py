"""Which device this process computes on, as DeepSpeed's accelerator names it
(`DS_ACCELERATOR`, else what DeepSpeed detects): `cuda:<local rank>` or `cpu`. The Engine trains
there; evaluation and generation (infer/) run there by default. The one place that asks the
accelerator about the device; the Engine (train/engine.py) also asks it for the collectives.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import torch


def accelerator() -> Any:
    """DeepSpeed's accelerator (its import logs to stdout, which belongs to our output)."""
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.accelerator import get_accelerator

        return get_accelerator()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def default_device() -> torch.device:
    """This process's device as DeepSpeed's accelerator names it: `cuda:<local rank>` or `cpu`.
    Evaluation and generation run there too."""
    return torch.device(accelerator().device_name(local_rank()))


# The CPU flags of native bf16 matmuls (oneDNN's fast bf16 paths); without them bf16 is emulated.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (Linux's /proc/cpuinfo flags; False where the
    flags cannot be read, as on macOS)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                cpuinfo = handle.read()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def resolve_precision(requested: str, device: torch.device) -> str:
    """`train.precision` on this machine: `auto` is bf16 where the device computes bf16
    natively (a CUDA device with bf16, a CPU with AVX512-BF16 or AMX), else fp32; fp32 and
    bf16 stay as they are. Resolved where the run trains, never where a sweep plans it."""
    if requested != "auto":
        return requested
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "bf16" if accelerator().is_bf16_supported() else "fp32"


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (nothing to wait for on the CPU)."""
    if device.type != "cpu":
        accelerator().synchronize()
