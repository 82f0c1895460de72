"""The device this process computes on, and every question megaloop asks of it.

`Device.of_this_process()` asks DeepSpeed's accelerator (`DS_ACCELERATOR`, else what DeepSpeed
detects): its kind (`cuda`, `cpu`, ...) and where this rank's tensors live (`cuda:<local rank>`
or `cpu`). The Engine trains there; evaluation and generation (infer/) run there by default.
Every accelerator call megaloop makes is a method here, and each exists on DeepSpeed's
`CUDA_Accelerator` with the arguments given (tests/test_device.py checks both by reading the
source and by running every method against the real class). The card's name is the one thing
the accelerator does not tell: it comes from `torch.cuda`.

A Device's kind decides its branches, and its `tensors` decides where tensors go; on a real
machine the two agree. The tests build a CUDA Device whose tensors stay on the CPU, so that the
GPU branches run here against DeepSpeed's CUDA accelerator class.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch


def accelerator() -> Any:
    """DeepSpeed's accelerator."""
    with deepspeeds_first_import():
        from deepspeed.accelerator import get_accelerator
    return get_accelerator()


@contextlib.contextmanager
def deepspeeds_first_import() -> Iterator[None]:
    """Around DeepSpeed's first import in this process (a no-op once it is imported):

    - It can log to stdout ("Setting accelerator to CPU"), and stdout is megaloop's output: the
      import's output goes to stderr.
    - Its autotuner imports MLflow, if installed, at import time, for autotuning, which megaloop
      never runs. That is 4.7 s of CPU on every rank (benchmarks/RESULTS.md), where only rank 0
      with tracking on uses MLflow (and imports it itself, in megaloop/track/). So, unless MLflow
      is imported already, it is hidden during the import (the autotuner then records that it
      has none). The hiding is process-wide, so it is done only while no other thread runs.
    """
    if "deepspeed" in sys.modules:
        yield
        return
    hide = "mlflow" not in sys.modules and threading.active_count() == 1
    with contextlib.redirect_stdout(sys.stderr):
        if hide:
            sys.modules["mlflow"] = None  # import mlflow: ModuleNotFoundError, which DS handles
        try:
            yield
        finally:
            if hide and "mlflow" in sys.modules and sys.modules["mlflow"] is None:
                del sys.modules["mlflow"]


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


# The CPU flags of native bf16 matmuls (oneDNN's fast bf16 paths); without them bf16 is emulated.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# oneDNN's ISA levels without bf16 instructions: ONEDNN_MAX_CPU_ISA at one of them keeps oneDNN
# off the CPU's bf16 units, and bf16 matmuls then run emulated (at 2% of fp32's rate, measured in
# benchmarks/RESULTS.md), as on a CPU without the flags.
ONEDNN_ISAS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE",
                                      "AVX512_CORE_VNNI"})


def cpu_has_native_bf16(cpuinfo: str | None = None,
                        environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this CPU computes bf16 natively for this process: Linux's /proc/cpuinfo flags
    (False where they cannot be read, as on macOS), unless oneDNN is held below bf16
    (ONEDNN_MAX_CPU_ISA, or its older name DNNL_MAX_CPU_ISA)."""
    cap = environ.get("ONEDNN_MAX_CPU_ISA") or environ.get("DNNL_MAX_CPU_ISA") or ""
    if cap.strip().upper() in ONEDNN_ISAS_WITHOUT_BF16:
        return False
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


class PeakMemory(NamedTuple):
    """Peak memory in GiB (2^30 bytes): what tensors held (allocated) and what the device's
    caching allocator held (reserved; None on the CPU, where it is the process's peak RSS)."""

    allocated_gib: float
    reserved_gib: float | None


def peak_rss_gib() -> float:
    factor = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, else KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * factor / 2**30


@dataclass(frozen=True)
class Device:
    kind: str  # the accelerator's name for itself: cuda, cpu, xpu, ...
    index: int  # the device of this rank: its local rank
    tensors: torch.device  # where this rank's tensors live

    @classmethod
    def of_this_process(cls) -> Device:
        found = accelerator()
        index = local_rank()
        return cls(found.device_name(), index, torch.device(found.device_name(index)))

    @property
    def is_cpu(self) -> bool:
        return self.kind == "cpu"

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def communication_backend(self) -> str:
        """The collectives' backend: NCCL on CUDA, gloo on the CPU."""
        return accelerator().communication_backend_name()

    def make_current(self) -> None:
        """This rank's device becomes the current one (a no-op on the CPU)."""
        if not self.is_cpu:
            accelerator().set_device(self.index)

    def name(self) -> str:
        """The card, as its vendor names it ("NVIDIA H100 80GB HBM3"), or the device."""
        if self.is_cuda:
            return torch.cuda.get_device_name(self.index)
        return "cpu" if self.is_cpu else accelerator().device_name(self.index)

    def bf16_native(self) -> bool:
        """Whether the device computes bf16 natively (a CPU: AVX512-BF16 or AMX)."""
        if self.is_cpu:
            return cpu_has_native_bf16()
        return bool(accelerator().is_bf16_supported())

    def synchronize(self) -> None:
        """Wait for the work queued on the device (nothing to wait for on the CPU)."""
        if not self.is_cpu:
            accelerator().synchronize(self.index)

    def peak_memory(self) -> PeakMemory:
        if self.is_cpu:
            return PeakMemory(peak_rss_gib(), None)
        found = accelerator()
        return PeakMemory(found.max_memory_allocated(self.index) / 2**30,
                          found.max_memory_reserved(self.index) / 2**30)

    def reset_peak_memory(self) -> None:
        """Start `peak_memory` afresh (the CPU's peak RSS cannot be reset)."""
        if not self.is_cpu:
            accelerator().reset_peak_memory_stats(self.index)

    def release_cached_memory(self) -> None:
        """Give the caching allocator's free blocks back to the device."""
        if not self.is_cpu:
            accelerator().empty_cache()

    def rng_state(self) -> torch.Tensor | None:
        """The device's generator state (None on the CPU, whose generator is torch's own)."""
        return None if self.is_cpu else accelerator().get_rng_state(self.index)

    def set_rng_state(self, state: torch.Tensor | None) -> None:
        if state is not None and not self.is_cpu:
            accelerator().set_rng_state(state, self.index)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host batch on the device. On a GPU it goes through page-locked memory, so that the
        copy runs asynchronously (the caching host allocator keeps the pinned buffer until
        the copy has finished)."""
        if self.is_cpu:
            return tensor.to(self.tensors)
        return tensor.pin_memory().to(self.tensors, non_blocking=True)


CPU = Device("cpu", 0, torch.device("cpu"))


def default_device() -> torch.device:
    """Where this process's tensors go: `cuda:<local rank>` or `cpu`. Evaluation and
    generation run there."""
    return Device.of_this_process().tensors


def resolve_precision(requested: str, device: Device) -> str:
    """`train.precision` on this machine: `auto` is bf16 where the device computes bf16
    natively (a CUDA device with bf16, a CPU with AVX512-BF16 or AMX), else fp32; fp32 and
    bf16 stay as they are. Resolved where the run trains, never where a sweep plans it."""
    if requested != "auto":
        return requested
    return "bf16" if device.bf16_native() else "fp32"
