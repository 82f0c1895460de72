"""The optimizer's parameter groups: every parameter's role, a learning rate per role
(train.<role>_lr, the iso-depth paper's AdamW groups) that follows the schedule, and weight
decay on matrices only."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny import VARIANTS, engine_run_config

from megaloop import config
from megaloop.errors import ConfigError
from megaloop.model import LoopedLM
from megaloop.train.engine import Engine
from megaloop.train.optim import adamw, parameter_roles

ROLE_LRS = {"train.embedding_lr": 0.3, "train.unembedding_lr": 0.004, "train.norm_lr": 0.005,
            "train.hyper_lr": 0.01, "train.injection_lr": 0.02}


def run_config(variant: str = "linear_r3", **values) -> config.RunConfig:
    variant_settings = {f"model.{key}": value for key, value in VARIANTS[variant].items()}
    return engine_run_config(**{"train.lr": 1e-3, **variant_settings, **values})


def expected_role(name: str) -> str:
    if name == "embed.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "unembedding"
    if name.startswith("injection."):
        return "injection"
    if name.startswith("hyper.") or "_hc." in name:
        return "hyper"
    if name.endswith("norm.weight"):
        return "norm"
    return "matrix"


@pytest.mark.parametrize("variant", ["linear_r3", "hyperloop", "gqa_qknorm_softcap"])
def test_every_parameter_has_its_role(variant):
    model = LoopedLM(run_config(variant).model)
    roles = parameter_roles(model)
    by_name = {name: roles[id(param)] for name, param in model.named_parameters()}
    assert by_name == {name: expected_role(name) for name in by_name}
    assert "matrix" in by_name.values() and "norm" in by_name.values()


def test_mhc_connections_are_hyper_parameters():
    cfg = run_config("linear_r3", **{"model.hyper": "mhc", "model.injection": "passthrough"})
    model = LoopedLM(cfg.model)
    roles = parameter_roles(model)
    hyper = {name for name, param in model.named_parameters() if roles[id(param)] == "hyper"}
    assert hyper and all("_hc." in name for name in hyper)


@pytest.mark.parametrize("variant", ["linear_r3", "hyperloop"])
def test_each_role_gets_its_learning_rate_along_the_schedule(process_group, variant):
    cfg = run_config(variant, **ROLE_LRS)
    want = {"embedding": 0.3, "unembedding": 0.004, "norm": 0.005, "hyper": 0.01,
            "injection": 0.02, "matrix": 1e-3}
    with contextlib.closing(Engine(cfg).build()) as engine:
        roles = parameter_roles(engine.model)
        engine.forward_backward(torch.zeros(2, 8, dtype=torch.long),
                                torch.zeros(2, 8, dtype=torch.long), cfg.model.recurrences)
        engine.optimizer_step(0.5e-3)  # half of train.lr, as a schedule would give
        groups = engine._ds.optimizer.param_groups
        for group in groups:
            (role,) = {roles[id(p)] for p in group["params"]}
            assert group["lr"] == pytest.approx(want[role] / 2), group["name"]
            if group["weight_decay"] > 0:
                assert all(p.dim() == 2 for p in group["params"])
    assert {roles[id(p)] for g in groups for p in g["params"]} >= {"embedding", "norm",
                                                                    "matrix"}


def test_without_role_lrs_every_group_runs_at_train_lr():
    cfg = run_config()
    optimizer = adamw(LoopedLM(cfg.model), cfg)
    assert {group["lr"] for group in optimizer.param_groups} == {1e-3}
    assert {group["lr_scale"] for group in optimizer.param_groups} == {1.0}


def test_role_learning_rates_need_a_schedule_to_follow():
    with pytest.raises(ConfigError, match="needs train.lr > 0"):
        run_config(**{"train.lr": 0, "train.min_lr": 0, "train.norm_lr": 0.005})
    with pytest.raises(ConfigError, match="train.hyper_lr = -1.0"):
        run_config(**{"train.hyper_lr": -1})


ROLE_BETAS_AND_DECAY = {"train.embedding_beta1": 0.5, "train.norm_beta2": 0.9,
                        "train.unembedding_weight_decay": 0.2, "train.norm_weight_decay": 0.3,
                        "train.matrix_weight_decay": 0.05}


@pytest.mark.parametrize("optimizer", ["adamw", "muonh"])
def test_each_role_gets_its_betas_and_weight_decay(process_group, optimizer):
    cfg = run_config(**ROLE_BETAS_AND_DECAY, **{"train.optimizer": optimizer,
                                                "train.weight_decay": 0.1})
    base = (cfg.train.beta1, cfg.train.beta2)
    want_betas = {"embedding": (0.5, base[1]), "norm": (base[0], 0.9)}
    want_decay = {"unembedding": 0.2, "norm": 0.3, "matrix": 0.05, "embedding": 0.0}
    with contextlib.closing(Engine(cfg).build()) as engine:
        roles = parameter_roles(engine.model)
        for group in engine._ds.optimizer.param_groups:
            if group.get("kind", "adamw") != "adamw":  # MuonH's matrices, the injection's too
                assert group["weight_decay"] == want_decay["matrix"]
                continue
            (role,) = {roles[id(p)] for p in group["params"]}
            assert tuple(group["betas"]) == want_betas.get(role, base), group["name"]
            if role in want_decay:
                assert group["weight_decay"] == want_decay[role], group["name"]


def test_a_roles_weight_decay_falls_on_all_its_parameters():
    """The embedding is not a linear layer, so by default it has no weight decay; set, its
    rows that no token touched shrink by (1 - lr · wd) per step."""
    cfg = run_config(**{"train.embedding_weight_decay": 0.5, "train.lr": 0.1})
    model = LoopedLM(cfg.model)
    optimizer = adamw(model, cfg)
    before = model.embed.weight.detach().clone()
    tokens = torch.zeros(2, 8, dtype=torch.long)  # only row 0 gets a gradient
    model(tokens, tokens).backward()
    optimizer.step()
    assert torch.allclose(model.embed.weight[1:], before[1:] * (1 - 0.1 * 0.5))
    default = run_config(**{"train.lr": 0.1})
    groups = adamw(LoopedLM(default.model), default).param_groups
    assert all(g["weight_decay"] == 0 for g in groups if g["name"].startswith("embedding"))


def test_role_betas_and_weight_decay_are_checked():
    with pytest.raises(ConfigError, match=r"train.hyper_beta2 = 1.0 must be in \[0, 1\)"):
        run_config(**{"train.hyper_beta2": 1.0})
    with pytest.raises(ConfigError, match="train.norm_weight_decay = -0.1"):
        run_config(**{"train.norm_weight_decay": -0.1})
    with pytest.raises(ConfigError, match="set train.muon_momentum instead"):
        run_config(**{"train.optimizer": "muonh", "train.matrix_beta1": 0.9})
