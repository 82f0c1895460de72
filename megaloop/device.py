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


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (nothing to wait for on the CPU)."""
    if device.type != "cpu":
        accelerator().synchronize()
