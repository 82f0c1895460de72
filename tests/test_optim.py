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
