"""Loop variants: how the loop's state enters, passes through and leaves the r recurrences.

Every variant has the same three methods, and `LoopedLM._run_loop` is a plain loop over them:

    state = variant.start(e)              # e: the prelude's output
    for i in range(r):
        state = variant.step(state, i, body)
    x = variant.finish(state)             # the coda's input

`body(u)` runs the loop's layers once on u, followed by the recurrence norm where the model has
one (`model.recurrence_norm`). A new variant is one class with these methods; its parameters,
if any, are a module that LoopedLM owns under a fixed name (`injection`, `hyper`), so that
checkpoints, the accounting and the export find them where they always were. The variants with
parameters are LinearInjection (here) and Hyperloop and Lanes (hyper.py); mHC connects every
layer, not the loop, and loops through Passthrough.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

Body = Callable[[torch.Tensor], torch.Tensor]


class LoopVariant(Protocol):
    def start(self, e: torch.Tensor) -> Any: ...

    def step(self, state: Any, index: int, body: Body) -> Any: ...

    def finish(self, state: Any) -> torch.Tensor: ...


class Passthrough:
    """s ← body(s), from s = e: pure recurrence (also the r = 1 model's single pass)."""

    def start(self, e: torch.Tensor) -> torch.Tensor:
        return e

    def step(self, state: torch.Tensor, index: int, body: Body) -> torch.Tensor:
        return body(state)

    def finish(self, state: torch.Tensor) -> torch.Tensor:
        return state


class Additive:
    """s ← body(s + e), from s = 0, so that the first recurrence sees u = e: parameter-free."""

    def start(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(e), e

    def step(self, state: tuple[torch.Tensor, torch.Tensor], index: int,
             body: Body) -> tuple[torch.Tensor, torch.Tensor]:
        s, e = state
        return body(s + e), e

    def finish(self, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return state[0]


class LinearInjection(nn.Linear):
    """s ← body(W [e ; s]), from s = e, with W = [W_e | W_s] of shape (d, 2d), [I | 0] at init.

    W_e e is the same in every recurrence, so `start` computes it once and each step adds
    W_s s: r + 1 matmuls of d x d instead of r of d x 2d. Both halves go through this module's
    call, so that ZeRO-3 gathers the weight."""

    def __init__(self, d: int):
        super().__init__(2 * d, d, bias=False)

    def forward(self, x: torch.Tensor, part: str) -> torch.Tensor:
        d = self.out_features
        return F.linear(x, self.weight[:, :d] if part == "embedding" else self.weight[:, d:])

    def start(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return e, self(e, "embedding")

    def step(self, state: tuple[torch.Tensor, torch.Tensor], index: int,
             body: Body) -> tuple[torch.Tensor, torch.Tensor]:
        s, injected = state
        return body(self(s, "state") + injected), injected

    def finish(self, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return state[0]
