"""The optimizer of a run: AdamW over two parameter groups, weight decay on the matrices only."""

from __future__ import annotations

from typing import Any

import torch

from megaloop.config import RunConfig


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on the matrices of linear layers only: not on norms, biases, embeddings or
    hyper-connection scalars."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    decay, no_decay = [], []
    for param in model.parameters():
        (decay if id(param) in decayed else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def adamw_settings(config: RunConfig) -> dict[str, Any]:
    train = config.train
    return {"lr": train.lr, "betas": (train.beta1, train.beta2), "eps": train.eps}


def fused_adamw_supported(model: torch.nn.Module) -> bool:
    """torch's fused AdamW (one pass over each parameter) where its kernels exist: CUDA and,
    since torch 2.4, the CPU. Without it, on the CPU torch runs AdamW as a Python loop of
    elementwise operations per parameter: three times slower (benchmarks/RESULTS.md)."""
    return all(param.is_floating_point() and param.device.type in ("cpu", "cuda")
               for param in model.parameters())


def adamw(model: torch.nn.Module, config: RunConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(optimizer_groups(model, config.train.weight_decay),
                             fused=fused_adamw_supported(model), **adamw_settings(config))
