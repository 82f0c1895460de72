"""Per-token early exit: in decoding, a token stops iterating the loop once another recurrence
would change little (Huginn's zero-shot adaptive compute), so easy tokens cost fewer
recurrences than hard ones.

Criteria, checked after each recurrence i (the threshold is `EarlyExit.threshold`):
- latent: |x_i - x_(i-1)| / |x_i| below it, where x_i is the loop's output after recurrence i
  (the coda's input) and x_(-1) what the loop variant gives before any recurrence (the prelude's
  output for passthrough, zeros for additive injection);
- kl: KL(p_i || p_(i-1)) in nats below it, where p_i is the model's next-token distribution
  from x_i (the coda runs after every recurrence; the earliest exit is after two).

A row of the batch that exits is left alone: the later recurrences compute only the rows still
going (the cache's `rows`), and the exited row's slots of the recurrences it skipped take the
keys and values of its last one, so that later tokens attending to it read its final state
(under a KV budget k only the slots no recurrence it ran has written: k slots hold its last k
recurrences' keys). It
acts on single-token steps of a cached decode only; a prompt runs every recurrence. The
recurrences each row used are appended to the cache's `recurrences_used`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megaloop.errors import ConfigError

EXIT_CRITERIA = ("latent", "kl")


@dataclass(frozen=True)
class EarlyExit:
    criterion: str  # latent or kl
    threshold: float

    def __post_init__(self) -> None:
        if self.criterion not in EXIT_CRITERIA:
            raise ConfigError(f"early exit criterion {self.criterion!r}: choose one of "
                              f"{', '.join(EXIT_CRITERIA)}.")
        if not self.threshold >= 0:
            raise ConfigError(f"early exit threshold {self.threshold} must be >= 0 (0 never "
                              "exits).")


def _take(state: Any, rows: torch.Tensor) -> Any:
    return tuple(t[rows] for t in state) if isinstance(state, tuple) else state[rows]


def _put(state: Any, rows: torch.Tensor, part: Any) -> None:
    for whole, piece in zip(*((state, part) if isinstance(state, tuple) else
                              ((state,), (part,))), strict=True):
        whole[rows] = piece


def _clone(state: Any) -> Any:
    return tuple(t.clone() for t in state) if isinstance(state, tuple) else state.clone()


def decode_with_early_exit(model: nn.Module, e: torch.Tensor, rope, r: int,
                           cache) -> torch.Tensor:
    """The logits of one decoding step from the prelude's output `e`, each row stopping its
    recurrences by `cache.early_exit` (see the module docstring)."""
    rule, variant = cache.early_exit, model.loop_variant()
    batch, device = e.shape[0], e.device
    state = variant.start(e)
    active = torch.arange(batch, device=device)
    used = torch.full((batch,), r, dtype=torch.long)
    previous = variant.finish(state) if rule.criterion == "latent" else None
    logits = log_p = None
    slots, body = cache.loop_slots(r), model.loop_body(rope, cache)
    for i in range(r):
        every = len(active) == batch  # then no row is taken out or put back
        cache.rows = None if every else active
        cache.seek(model.recurrence_slot(i % slots))
        part = model.run_recurrence(variant, state if every else _take(state, active), i, body,
                                    cache=cache)
        if every:
            state = part
        else:
            _put(state, active, part)
        x = variant.finish(part)
        if rule.criterion == "kl":
            out = model.output(x, rope, r, cache)  # the coda for the same rows
            new_log_p = torch.log_softmax(out.float(), dim=-1)
            if logits is None:  # recurrence 0: nothing to compare with yet
                logits = out.new_empty((batch, *out.shape[1:]))
                log_p = new_log_p.new_empty((batch, *new_log_p.shape[1:]))
                done = torch.zeros(len(active), dtype=torch.bool, device=device)
            else:
                kl = (new_log_p.exp() * (new_log_p - log_p[active])).sum(-1)
                done = kl.amax(dim=-1) < rule.threshold
            logits[active], log_p[active] = out, new_log_p
        else:
            before = previous if every else previous[active]
            change = (x - before).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30)
            done = change.flatten(1).amax(dim=-1) < rule.threshold
            if every:
                previous = x
            else:
                previous[active] = x
        if i == r - 1:
            break
        if bool(done.any()):
            exited = active[done]
            used[exited.cpu()] = i + 1
            if i + 1 < slots:  # the slots of the recurrences it skips: its last keys
                for layer in range(len(model.loop)):
                    cache.copy_slots(exited, model.recurrence_slot(i % slots) + layer,
                                     [model.recurrence_slot(c) + layer
                                      for c in range(i + 1, slots)])
            if len(active) == batch:  # from here on rows are written back in place
                state = _clone(state)
                previous = None if previous is None else previous.clone()
            active = active[~done]
            if not len(active):
                break
    if rule.criterion == "latent":
        cache.rows = None
        logits = model.output(variant.finish(state), rope, r, cache)
    cache.recurrences_used.append(used)
    return logits
