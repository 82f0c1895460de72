"""torch.compile's cache on disk is keyed on the CPU's vector ISA (parallelize.py,
key_compile_cache_on_cpu_isa): without it PyTorch 2.13 serves kernels generated for AVX-512 to
an AVX2 process, and a compiled training's losses are NaN from step 1 (issue 29)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import REPO

from megaloop.train.parallelize import key_compile_cache_on_cpu_isa


def compile_in(cache: str, capability: str | None) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "compiled_under_isa.py")],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                    reason="needs a CPU with AVX-512, whose kernels an AVX2 process must not get")
@pytest.mark.parametrize("order", [
    (None, "avx2"),
    # this small function came out right in this order even unkeyed, a compiled training did
    # not (NaN losses); slow, as two more compiling processes
    pytest.param(("avx2", None), marks=pytest.mark.slow)],
    ids=["avx512-then-avx2", "avx2-then-avx512"])
def test_a_compile_cache_filled_under_one_isa_serves_another_correctly(tmp_path, order):
    """The second process compiles the same function into the folder the first one filled. An
    ISA-blind key hands it the other ISA's kernels: under PyTorch 2.13 the AVX2 process got a gap
    of 18.5 to eager. Tolerance 1e-4: the sums are of 200 fp32 terms of size about 1, which a
    fused kernel adds in another order (about 200 * 6e-8 apart, 1.2e-5); the wrong kernels are
    off by whole units."""
    runs = [compile_in(str(tmp_path / "inductor"), capability) for capability in order]
    assert [run["capability"] for run in runs] == \
        ["AVX2" if capability else "AVX512" for capability in order]
    assert runs[0]["tag"] != runs[1]["tag"]
    for run in runs:
        assert run["gap"] < 1e-4, run


def test_the_isa_tag_keeps_the_users_tag_and_is_set_once(monkeypatch):
    monkeypatch.setattr(torch.compiler.config, "cache_key_tag", "my-cluster")
    first = key_compile_cache_on_cpu_isa()
    assert first.startswith("my-cluster;megaloop-cpu-isa=")
    assert key_compile_cache_on_cpu_isa() == first
    assert torch.compiler.config.cache_key_tag == first
