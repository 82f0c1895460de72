"""The optimizer of a run: AdamW, or MuonH (Muon) on the transformer blocks' matrices with AdamW
on the rest (`train.optimizer`). Every parameter has a role (matrix, embedding, unembedding,
norm, hyper, injection), and each role its own lr (train.<role>_lr), betas
(train.<role>_beta1 / _beta2) and weight decay (train.<role>_weight_decay); by default weight
decay falls on linear layers' weights only."""

from __future__ import annotations

from typing import Any

import torch

from megaloop.config import GROUP_ROLES, LR_ROLES, RunConfig
from megaloop.model.blocks import MLP, Attention, RMSNorm
from megaloop.model.hyper import DynamicGates, Hyperloop, HyperloopConnection, Lanes, MHCConnection
from megaloop.train.muonh import MuonH

HYPER_MODULES = (DynamicGates, Hyperloop, HyperloopConnection, Lanes, MHCConnection)
ROLES = LR_ROLES


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


def parameter_roles(model: torch.nn.Module) -> dict[int, str]:
    """Each parameter's role, by id: embedding, unembedding, norm (gains of RMSNorms),
    hyper (hyper-connections, their norms included), injection, or matrix (the rest: the
    blocks' projections)."""
    roles: dict[int, str] = {}
    owners = [(model.get_submodule("embed"), "embedding")]
    if getattr(model, "lm_head", None) is not None:
        owners.append((model.lm_head, "unembedding"))
    if getattr(model, "injection", None) is not None:
        owners.append((model.injection, "injection"))
    for module in model.modules():  # outer modules first: a hyper module claims its norms
        if isinstance(module, HYPER_MODULES):
            owners.append((module, "hyper"))
    for owner, role in owners:
        for param in owner.parameters():
            roles.setdefault(id(param), role)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            for param in module.parameters():
                roles.setdefault(id(param), "norm")
    for param in model.parameters():
        roles.setdefault(id(param), "matrix")
    return roles


def role_lr(config: RunConfig, role: str) -> float:
    """A role's peak lr: train.<role>_lr where set, else train.lr."""
    value = getattr(config.train, f"{role}_lr", None) if role in ROLES else None
    return config.train.lr if value is None else value


def role_betas(config: RunConfig, role: str) -> tuple[float, float]:
    """A role's AdamW betas: train.<role>_beta1 / _beta2 where set, else train.beta1 / beta2."""
    train = config.train
    own = [getattr(train, f"{role}_beta{i}", None) if role in GROUP_ROLES else None
           for i in (1, 2)]
    return (train.beta1 if own[0] is None else own[0], train.beta2 if own[1] is None else own[1])


def role_weight_decay(config: RunConfig, role: str) -> float | None:
    """A role's weight decay on all its parameters (train.<role>_weight_decay), or None: the
    default, train.weight_decay on linear layers' weights only."""
    return getattr(config.train, f"{role}_weight_decay", None) if role in GROUP_ROLES else None


def role_groups(model: torch.nn.Module, config: RunConfig,
                params: list[torch.nn.Parameter] | None = None) -> list[dict[str, Any]]:
    """AdamW's groups: one per role and weight decay, each with its `lr`, `betas`,
    `weight_decay` and `lr_scale` (its lr over train.lr; the Engine sets lr = schedule ×
    lr_scale)."""
    roles = parameter_roles(model)
    chosen = list(model.parameters()) if params is None else params
    groups = []
    for role in dict.fromkeys(roles[id(p)] for p in chosen):
        members = [p for p in chosen if roles[id(p)] == role]
        lr, decay = role_lr(config, role), role_weight_decay(config, role)
        split = (optimizer_groups(model, config.train.weight_decay, members) if decay is None
                 else [{"params": members, "weight_decay": decay, "name": "decay"}])
        for group in split:
            if group["params"]:
                scale = lr / config.train.lr if config.train.lr > 0 else 1.0
                groups.append({**group, "name": f"{role}/{group['name']}", "lr": lr,
                               "betas": role_betas(config, role), "lr_scale": scale})
    return groups


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
    return torch.optim.AdamW(role_groups(model, config), fused=fused_adamw_supported(model),
                             **adamw_settings(config))


def block_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights of the attention and MLP projections of every transformer block, and the
    linear injection's [W_e | W_s]: Muon(H)'s, as in the iso-depth paper's code. The embedding,
    the LM head, norms and hyper-connections stay with AdamW."""
    return [param for param, _ in block_matrices_with_splits(model)]


def block_matrices_with_splits(
        model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, tuple[int, ...] | None]]:
    """`block_matrices`, each with the row counts of the matrices fused in it (q, k and v; the
    SwiGLU gate and up projection), which Muon(H) steps as separate matrices, as the paper's
    code has them."""
    matrices: list[tuple[torch.nn.Parameter, tuple[int, ...] | None]] = []
    for module in model.modules():
        if isinstance(module, Attention):
            q_dim, kv_dim = (module.n_heads * module.head_dim,
                             module.n_kv_heads * module.head_dim)
            matrices += [(module.qkv.weight, (q_dim, kv_dim, kv_dim)), (module.out.weight, None)]
        elif isinstance(module, MLP):
            hidden = module.out.in_features
            fused = (hidden, hidden) if module.kind == "swiglu" else None
            matrices += [(module.inp.weight, fused), (module.out.weight, None)]
    injection = getattr(model, "injection", None)
    return matrices + ([(injection.weight, None)] if injection is not None else [])


def muonh(model: torch.nn.Module, config: RunConfig) -> MuonH:
    """MuonH or Muon (train.optimizer) on the block matrices, AdamW (train.lr, betas, eps,
    weight decay) on the rest. Every group carries `lr_scale`, its lr over train.lr: the Engine
    sets each group's lr to the schedule's lr times it. Under ZeRO (stages 1-3) the matrices'
    group is `sharded`: the Engine steps them whole (muonh.py)."""
    train = config.train
    matrices, splits = zip(*block_matrices_with_splits(model), strict=True)
    chosen = {id(param) for param in matrices}
    rest = [param for param in model.parameters() if id(param) not in chosen]
    adamw_groups = [{**group, "kind": "adamw", "eps": train.eps}
                    for group in role_groups(model, config, rest)]
    decay = train.matrix_weight_decay
    if decay is None:  # by default none on MuonH's sphere, where it changes nothing to first order
        decay = train.weight_decay if train.optimizer == "muon" else 0.0
    return MuonH([{"params": list(matrices), "row_splits": list(splits),
                   "kind": train.optimizer, "name": "matrices",
                   "lr": train.matrix_lr, "lr_scale": train.matrix_lr / train.lr,
                   "momentum": train.muon_momentum, "weight_decay": decay,
                   "polar_dtype": torch.float32 if train.polar_precision == "fp32"
                   else torch.bfloat16,
                   "sharded": train.zero_stage > 0},
                  *adamw_groups])
