"""Learning-rate schedules, applied per optimizer step: linear warmup, then cosine, linear, WSD
(warmup-stable-decay: constant, then a linear decay over the last `wsd_decay_fraction` of the
steps) or constant. Every schedule ends at `min_lr` (constant stays at `lr`)."""

from __future__ import annotations

import math

from megaloop.config import TrainConfig


def lr_at(step: int, total_steps: int, train: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps`."""
    peak, floor = train.lr, train.min_lr
    warmup = min(train.warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return peak * (step + 1) / warmup
    if train.schedule == "constant":
        return peak
    decay_steps = max(total_steps - warmup - 1, 1)
    progress = min(max(step - warmup, 0) / decay_steps, 1.0)
    if train.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if train.schedule == "linear":
        return peak + (floor - peak) * progress
    stable = 1.0 - train.wsd_decay_fraction  # wsd
    if progress <= stable:
        return peak
    return peak + (floor - peak) * (progress - stable) / train.wsd_decay_fraction
