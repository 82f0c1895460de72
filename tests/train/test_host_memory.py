"""The CPU trainer's allocator setting: glibc keeps freed memory, so a step's large tensors
reuse pages instead of faulting in fresh ones; the user's own MALLOC_* settings win."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, torch
from megaloop.train.host_memory import tune_for_cpu_training
print(tune_for_cpu_training())
model = torch.nn.Linear(4096, 4096)  # a 64 MB gradient, above glibc's largest mmap threshold
optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
x = torch.randn(8, 4096)
def step():
    model(x).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # the gradient is allocated afresh every step
def faults_of_a_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for warm_up in range(3):  # until the heap has grown to hold a step
    step()
# the fewest over 8 steps: a few steps now and then fault again (seen on this VM)
print(min(faults_of_a_step() for _ in range(8)))
"""


def probe(**env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_training_steps_freed_memory_is_reused_without_new_page_faults():
    said, faults = probe()
    assert "keeps freed memory" in said
    assert faults < 100  # a fresh 64 MB gradient would be 16,384 faults of 4 kB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_users_malloc_settings_win():
    said, faults = probe(MALLOC_MMAP_MAX_="65536")
    assert said == "glibc malloc as set by MALLOC_MMAP_MAX_"
    assert faults > 4096  # glibc's default: the gradient is mapped afresh and faulted in again
