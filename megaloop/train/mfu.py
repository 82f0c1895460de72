"""The peak FLOP/s that MFU is measured against: given, a table of known GPUs (dense bf16), or
the matmul peak measured on the run's device at start (the CPU, a GPU in fp32, or a GPU the
table does not know)."""

from __future__ import annotations

import time

import torch

from megaloop.device import CPU, Device

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
                        seconds: float = 0.3, device: Device = CPU) -> float:
    """Best FLOP/s of square matmuls on `device` over about `seconds` (its queued work waited
    for around each product)."""
    a = torch.randn(size, size, dtype=dtype, device=device.tensors)
    b = torch.randn(size, size, dtype=dtype, device=device.tensors)
    best, deadline = 0.0, time.perf_counter() + seconds
    torch.mm(a, b)  # warm-up
    while time.perf_counter() < deadline or best == 0.0:
        device.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        device.synchronize()
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def peak_flops(given: float | None, precision: str, device: Device = CPU) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from): given, the table's dense bf16
    peak of a known CUDA card in bf16, else the matmul rate measured on the device (in bf16,
    the faster of the bf16 and fp32 products)."""
    if given is not None:
        return given, "given"
    if device.is_cuda and precision == "bf16":
        name = device.name()
        table = known_gpu_peak(name)
        if table is not None:
            return table, f"table ({name})"
    size = 1024 if device.is_cpu else 4096
    fp32 = measure_matmul_peak(torch.float32, size, device=device)
    if precision != "bf16":
        return fp32, "measured matmul peak"
    # A CPU without bf16 units (AMD before Zen 4, older Intel) ran bf16 products at 2% of fp32's
    # rate, and a bf16 step, faster than that, read as MFU > 1: the peak is the faster product.
    bf16 = measure_matmul_peak(torch.bfloat16, size, device=device)
    if bf16 >= fp32:
        return bf16, "measured matmul peak"
    return fp32, "measured matmul peak (fp32, faster than bf16 here)"
