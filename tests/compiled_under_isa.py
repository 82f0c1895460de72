"""Compile an RMS norm and SiLU with inductor, in a cache folder the test names, after keying
the compile cache on the CPU ISA as apply_compile does; print the CPU capability and the
largest gap to eager. Run as a script, one process per ISA (tests/train/test_compile_cache.py)."""

import json

import torch
import torch.nn.functional as F

from megaloop.train.parallelize import key_compile_cache_on_cpu_isa


def norm_silu_sum(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    return F.silu(normed).sum(-1)


if __name__ == "__main__":
    tag = key_compile_cache_on_cpu_isa()
    torch.manual_seed(0)
    x, weight = torch.randn(37, 200), torch.randn(200)  # 200: whole vectors and a tail
    gap = (torch.compile(norm_silu_sum)(x, weight) - norm_silu_sum(x, weight)).abs().max()
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "tag": tag,
                      "gap": gap.item()}))
