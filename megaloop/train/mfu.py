"""The peak FLOP/s that MFU is measured against: given, a table of known GPUs (dense bf16), or
the matmul peak measured on the run's device at start (the CPU, or a GPU in fp32)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

# Dense bf16 tensor-core peaks per GPU from the vendors' data sheets (half the "with sparsity"
# figures). A name matches an entry when it holds all of the entry's words; the first match
# wins, so the PCIe and NVL parts come before their SXM namesakes (which CUDA names plainly:
# "NVIDIA H100 80GB HBM3", "NVIDIA H200").
KNOWN_GPU_PEAKS: list[tuple[tuple[str, ...], float]] = [
    (("GH200",), 989e12),
    (("H100", "PCIE"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),
    (("H200", "NVL"), 835e12),
    (("H200",), 989e12),
    (("H800", "PCIE"), 756e12),
    (("H800",), 989e12),
    (("GB200",), 2500e12),
    (("B200",), 2250e12),
    (("A100",), 312e12),
    (("A800",), 312e12),
    (("L40S",), 362e12),
]


def known_gpu_peak(name: str) -> float | None:
    words = name.upper()
    for keys, peak in KNOWN_GPU_PEAKS:
        if all(key in words for key in keys):
            return peak
    return None


def measure_matmul_peak(dtype: torch.dtype = torch.float32, size: int = 1024,
                        seconds: float = 0.3, device: torch.device | str = "cpu",
                        synchronize: Callable[[], None] = lambda: None) -> float:
    """Best FLOP/s of square matmuls on `device` over about `seconds`; `synchronize` waits for
    the device's queued work (the engine's, for a GPU)."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best, deadline = 0.0, time.perf_counter() + seconds
    torch.mm(a, b)  # warm-up
    while time.perf_counter() < deadline or best == 0.0:
        synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize()
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def peak_flops(given: float | None, precision: str, device: torch.device | str = "cpu",
               device_name: str = "cpu",
               synchronize: Callable[[], None] = lambda: None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if given is not None:
        return given, "given"
    device = torch.device(device)
    if device.type == "cuda" and precision == "bf16":
        table = known_gpu_peak(device_name)
        if table is not None:
            return table, f"table ({device_name})"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    size = 1024 if device.type == "cpu" else 4096
    return measure_matmul_peak(dtype, size, device=device, synchronize=synchronize), \
        "measured matmul peak"
