"""The peak FLOP/s that MFU is measured against: given, a table of known GPUs (dense bf16), or
the matmul peak measured on this device at start (the CPU, or a GPU in fp32)."""

from __future__ import annotations

import time

import torch

# Dense bf16 tensor-core peaks per device, from the vendors' data sheets.
KNOWN_GPU_PEAKS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def known_gpu_peak(name: str) -> float | None:
    for key, peak in KNOWN_GPU_PEAKS.items():
        if key in name.upper():
            return peak
    return None


def measure_matmul_peak(dtype: torch.dtype = torch.float32, size: int = 1024,
                        seconds: float = 0.3) -> float:
    """Best FLOP/s of square matmuls on the current device over about `seconds`."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best, deadline = 0.0, time.perf_counter() + seconds
    torch.mm(a, b)  # warm-up
    while time.perf_counter() < deadline or best == 0.0:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def peak_flops(given: float | None, precision: str) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if given is not None:
        return given, "given"
    if torch.cuda.is_available() and precision == "bf16":
        name = torch.cuda.get_device_name()
        table = known_gpu_peak(name)
        if table is not None:
            return table, f"table ({name})"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    size = 4096 if torch.cuda.is_available() else 1024
    return measure_matmul_peak(dtype, size), "measured matmul peak"
