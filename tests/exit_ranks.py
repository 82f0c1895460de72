"""One gloo rank that ends the way a ZeRO-3 rank does: its group held elsewhere (DeepSpeed keeps
references), asynchronous all-gathers whose tensors it drops at once, the group destroyed, then
the end of the process by `sys.exit` or by megaloop's `exit_process`.

    python tests/exit_ranks.py RANK WORLD INIT_METHOD sys.exit|exit_process [STATUS]

Prints "done" before it ends; ends with STATUS (default 0). Used by tests/test_process_exit.py
and benchmarks/exit_abort.py.
"""

import atexit
import sys
import time

import torch
import torch.distributed as dist

from megaloop.process_exit import exit_process, group_formed

rank, world, init_method, ending = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
status = int(sys.argv[5]) if len(sys.argv) > 5 else 0
dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
group_formed()
held = dist.group.WORLD  # what DeepSpeed's groups and partitioned parameters do
for step in range(5):
    part = torch.randn(1_000_000)
    gathered = torch.empty(world * part.numel())
    if rank == 0 and step == 4:
        time.sleep(0.3)  # the other ranks wait in the last gather, as ranks do for the slowest
    work = dist.all_gather_into_tensor(gathered, part, async_op=True)
    del part, gathered  # only the work holds them now: its worker thread frees them
    work.wait()
    del work
dist.destroy_process_group()
atexit.register(print, "exit handler ran", flush=True)
print("done", end="")  # no newline, no flush: the ending must flush it
if ending == "exit_process":
    exit_process(status)
sys.exit(status)
