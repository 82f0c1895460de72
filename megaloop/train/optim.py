"""The optimizer of a run: AdamW over two parameter groups (weight decay on the matrices only),
or MuonH on the transformer blocks' matrices with AdamW on the rest (`train.optimizer`)."""

from __future__ import annotations

from typing import Any

import torch

from megaloop.config import RunConfig
from megaloop.model.blocks import MLP, Attention
from megaloop.train.muonh import MuonH


def optimizer_groups(model: torch.nn.Module, weight_decay: float,
                     params: list[torch.nn.Parameter] | None = None) -> list[dict[str, Any]]:
    """Weight decay on the matrices of linear layers only: not on norms, biases, embeddings or
    hyper-connection scalars. `params`: a subset of the model's (all of them by default)."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    decay, no_decay = [], []
    for param in model.parameters() if params is None else params:
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


def block_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights of the attention and MLP projections of every transformer block: MuonH's.
    The embedding, the LM head, the injection, norms and hyper-connections stay with AdamW."""
    return [linear.weight for module in model.modules() if isinstance(module, (Attention, MLP))
            for linear in module.modules() if isinstance(linear, torch.nn.Linear)]


def muonh(model: torch.nn.Module, config: RunConfig) -> MuonH:
    """MuonH on the block matrices, AdamW (train.lr, betas, eps, weight decay) on the rest.
    Every group carries `lr_scale`, its lr over train.lr: the Engine sets each group's lr to
    the schedule's lr times it."""
    train = config.train
    matrices = block_matrices(model)
    chosen = {id(param) for param in matrices}
    rest = [param for param in model.parameters() if id(param) not in chosen]
    adamw_groups = [{**group, "kind": "adamw", "lr_scale": 1.0, **adamw_settings(config)}
                    for group in optimizer_groups(model, train.weight_decay, rest)]
    return MuonH([{"params": matrices, "kind": "muonh", "name": "matrices", "lr": train.matrix_lr,
                   "lr_scale": train.matrix_lr / train.lr, "momentum": train.muon_momentum},
                  *adamw_groups])
