"""How a megaloop process ends once it has formed a process group: as Python would, minus the
interpreter's finalization.

PyTorch's gloo backend frees a finished collective's work on its own worker thread, shortly after
the collective has completed. Where Python has already dropped a tensor of that work (ZeRO-3 does
with its gathered parameters and reduced gradients), freeing it takes the GIL. If the worker gets
there while the interpreter finalizes, Python ends the thread with pthread_exit, whose unwinding
through C++ `noexcept` frames calls std::terminate: the process aborts with exit status 134,
"terminate called without an active exception", after a run that had finished and saved
everything (a core dump shows `AsyncAllgatherWork::~AsyncAllgatherWork` -> `decref_pyobject` ->
`take_gil` -> `pthread_exit`). `destroy_process_group` joins the workers only when nothing else
holds the group, and DeepSpeed does. `benchmarks/exit_abort.py` measures how often it happens.

So a process that formed a group runs its exit handlers (logging's among them), flushes stdio,
and leaves with `os._exit`; one that did not exits normally.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from typing import NoReturn

_formed_a_group = False


def group_formed() -> None:
    """Called where this process forms a process group (engine.join_process_group)."""
    global _formed_a_group
    _formed_a_group = True


def exit_process(code: int | None) -> NoReturn:
    """End this process with `code` (None: 0), as `sys.exit(code)` would."""
    code = 0 if code is None else code
    if not _formed_a_group:
        sys.exit(code)
    atexit._run_exitfuncs()  # what sys.exit would run: logging's flush, MLflow's, ...
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed stream: nothing left to say
            stream.flush()
    os._exit(code)
