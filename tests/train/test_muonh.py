"""MuonH (megaloop/train/muonh.py): the orthogonalisation, the sphere invariant, and steps
against a plain float64 reference written from the paper's description."""

from __future__ import annotations

import contextlib
import shutil

import pytest
import torch
from tiny import VARIANTS, engine_run_config, random_tokens

from megaloop import config
from megaloop.errors import ConfigError
from megaloop.model import LoopedLM
from megaloop.train.engine import Engine
from megaloop.train.muonh import POLAR_EXPRESS_STEPS, MuonH, polar
from megaloop.train.optim import block_matrices, muonh


def matrix_with_singular_values(rows: int, cols: int, values: torch.Tensor,
                                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix U diag(values) Vᵀ with random orthonormal U and V, and its polar factor UVᵀ."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(values), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(values), generator=generator, dtype=torch.float64))
    return u @ torch.diag(values.double()) @ v.T, u @ v.T


@pytest.mark.parametrize(("rows", "cols"), [(64, 192), (192, 64), (96, 96)])
def test_polar_express_maps_every_singular_value_near_one_and_keeps_the_singular_vectors(
        rows, cols):
    k = min(rows, cols)
    values = torch.logspace(-1, 1, k)  # a condition number of 100, at scale 10
    matrix, factor = matrix_with_singular_values(rows, cols, values)
    orthogonal = polar(matrix.float()).double()
    singular = torch.linalg.svdvals(orthogonal)
    assert singular.min() > 0.7 and singular.max() < 1.25, (singular.min(), singular.max())
    # The same singular vectors: in the basis of matrix's own, the result is diagonal.
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    inner = u.T @ orthogonal @ vh.T
    off_diagonal = inner - torch.diag(torch.diagonal(inner))
    assert off_diagonal.norm() / inner.norm() < 0.05
    assert (orthogonal - factor).norm() / factor.norm() < 0.2


def test_polar_refuses_a_step_count_it_has_no_coefficients_for():
    with pytest.raises(ValueError, match="1 to 5 steps"):
        polar(torch.ones(4, 4), steps=6)


def reference_step(weight: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor,
                   radius: torch.Tensor, lr: float, momentum: float) -> None:
    """One MuonH step in float64 as the paper describes it, Polar Express in the wide form."""
    buffer.mul_(momentum).add_(grad, alpha=1 - momentum)
    look_ahead = (1 - momentum) * grad + momentum * buffer
    x = look_ahead.T if look_ahead.shape[0] > look_ahead.shape[1] else look_ahead
    x = x / (x.norm() * 1.02 + 1e-6)
    for a, b, c in POLAR_EXPRESS_STEPS:
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    direction = x.T if look_ahead.shape[0] > look_ahead.shape[1] else x
    weight.sub_(lr * radius * direction / direction.norm())
    weight.mul_(radius / weight.norm())


@pytest.mark.parametrize(("polar_dtype", "tolerance"), [(torch.float32, 1e-4),
                                                        (torch.bfloat16, 0.1)])
@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_steps_follow_the_reference_and_stay_on_the_sphere(shape, polar_dtype, tolerance):
    """Each of 10 steps, from the optimizer's own weight and momentum, against the float64
    reference: equal in fp32; bf16's orthogonalisation (the paper's) is off by a few percent
    of the update."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(*shape, generator=generator) / shape[1] ** 0.5)
    radius = weight.detach().double().norm()
    optimizer = MuonH([weight], lr=0.05, momentum=0.95, polar_dtype=polar_dtype)
    for step in range(10):
        grad = torch.randn(*shape, generator=generator)
        before = weight.detach().double().clone()
        state = optimizer.state[weight]
        buffer = state["momentum"].double().clone() if state else torch.zeros_like(before)
        reference = before.clone()
        reference_step(reference, grad.double(), buffer, radius, lr=0.05, momentum=0.95)
        weight.grad = grad.clone()
        optimizer.step()
        got = weight.detach().double()
        assert got.norm() == pytest.approx(radius.item(), rel=1e-6)
        assert torch.allclose(optimizer.state[weight]["momentum"].double(), buffer, atol=1e-6)
        error = (got - reference).norm() / (reference - before).norm()
        assert error < tolerance, (step, error.item())


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_muon_steps_follow_the_reference_off_the_sphere(shape):
    """Muon: the same direction, scaled by √max(1, rows/cols), with decoupled weight decay and
    no projection (the norm is free to change)."""
    generator = torch.Generator().manual_seed(4)
    weight = torch.nn.Parameter(torch.randn(*shape, generator=generator))
    optimizer = MuonH([{"params": [weight], "kind": "muon", "weight_decay": 0.1}], lr=0.05,
                      momentum=0.9, polar_dtype=torch.float32)
    buffer = torch.zeros(shape, dtype=torch.float64)
    norms = []
    for _ in range(5):
        grad = torch.randn(*shape, generator=generator)
        reference = weight.detach().double().clone()
        buffer.mul_(0.9).add_(grad.double(), alpha=0.1)
        look_ahead = 0.1 * grad.double() + 0.9 * buffer
        direction = polar(look_ahead, dtype=torch.float64)
        reference.mul_(1 - 0.05 * 0.1).sub_(0.05 * max(1, shape[0] / shape[1]) ** 0.5 * direction)
        weight.grad = grad
        optimizer.step()
        assert torch.allclose(weight.detach().double(), reference, atol=1e-5)
        norms.append(weight.detach().norm().item())
    assert max(norms) - min(norms) > 1e-3  # not held on a sphere


@pytest.mark.parametrize("kind", ["muonh", "muon"])
def test_a_fused_matrix_steps_as_its_separate_matrices(kind):
    """q, k and v fused in one weight (row_splits) take the steps of three separate matrices,
    each on its own sphere, as the paper's separate c_q, c_k, c_v do."""
    generator = torch.Generator().manual_seed(5)
    rows = (16, 8, 8)
    fused = torch.nn.Parameter(torch.randn(sum(rows), 16, generator=generator))
    separate = [torch.nn.Parameter(piece.detach().clone()) for piece in fused.split(rows)]
    settings = {"kind": kind, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.1}
    a = MuonH([{"params": [fused], "row_splits": [rows], **settings}], polar_dtype=torch.float32)
    b = MuonH([{"params": separate, **settings}], polar_dtype=torch.float32)
    for _ in range(4):
        fused.grad = torch.randn(fused.shape, generator=generator)
        for param, grad in zip(separate, fused.grad.split(rows), strict=True):
            param.grad = grad.clone()
        a.step()
        b.step()
    for got, want in zip(fused.detach().split(rows), separate, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    if kind == "muonh":
        assert a.state[fused]["sphere_norm"].shape == (3,)


def test_muonh_steps_the_fused_qkv_and_swiglu_matrices_piece_by_piece():
    from megaloop.train.optim import block_matrices_with_splits

    model = LoopedLM(config.load(None, ["model.d_model=32", "model.n_heads=4",
                                        "model.n_kv_heads=2", "model.vocab_size=64",
                                        "model.max_seq_len=16"]).model)
    splits = {tuple(p.shape): split for p, split in block_matrices_with_splits(model)}
    assert splits[(32 + 2 * 16, 32)] == (32, 16, 16)  # q, then k and v of two KV heads
    hidden = model.cfg.mlp_hidden
    assert splits[(2 * hidden, 32)] == (hidden, hidden)  # SwiGLU's gate and up
    assert splits[(32, hidden)] is None


def test_a_step_moves_the_weight_by_lr_times_its_norm_along_the_sphere():
    generator = torch.Generator().manual_seed(2)
    start = torch.randn(32, 64, generator=generator)
    weight = torch.nn.Parameter(start.clone())
    weight.grad = torch.randn(32, 64, generator=generator)
    MuonH([weight], lr=0.01, momentum=0.0).step()
    # ‖ΔW‖ ≈ lr ‖W₀‖ before the projection, which changes it only to second order
    moved = (weight.detach() - start).norm() / start.norm()
    assert moved.item() == pytest.approx(0.01, rel=0.02)


def test_muonh_takes_matrices_only():
    with pytest.raises(ValueError, match="belongs to AdamW"):
        MuonH([torch.nn.Parameter(torch.ones(8))])
    with pytest.raises(ValueError, match="momentum"):
        MuonH([torch.nn.Parameter(torch.ones(8, 8))], momentum=1.0)


def test_its_adamw_groups_step_as_torchs_adamw():
    generator = torch.Generator().manual_seed(3)
    start = [torch.randn(16, 8, generator=generator), torch.randn(8, generator=generator)]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    torchs = [torch.nn.Parameter(t.clone()) for t in start]
    settings = {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.1}
    mine = MuonH([{"params": ours, "kind": "adamw", **settings}])
    reference = torch.optim.AdamW(torchs, foreach=False, **settings)
    for _ in range(5):
        grads = [torch.randn(t.shape, generator=generator) for t in start]
        for param, grad in zip(ours + torchs, grads + grads, strict=True):
            param.grad = grad.clone()
        mine.step()
        reference.step()
    for a, b in zip(ours, torchs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="muonh, muon or adamw"):
        MuonH([{"params": [torch.nn.Parameter(torch.ones(2, 2))], "kind": "sgd"}])


# ---- in the run ------------------------------------------------------------------------------

def run_config(**values) -> config.RunConfig:
    return engine_run_config(**{"train.optimizer": "muonh", "train.lr": 3e-3,
                                "train.matrix_lr": 0.02, "train.weight_decay": 0.0, **values})


@pytest.mark.parametrize("variant", ["linear_r3", "hyperloop", "gqa_qknorm_softcap"])
def test_muonh_takes_the_block_matrices_and_adamw_everything_else(variant):
    settings = {f"model.{key}": value for key, value in VARIANTS[variant].items()}
    cfg = run_config(**settings)
    model = LoopedLM(cfg.model)
    optimizer = muonh(model, cfg)
    kinds = {id(p): group["kind"] for group in optimizer.param_groups for p in group["params"]}
    assert sorted(kinds) == sorted(id(p) for p in model.parameters())  # each in one group
    matrices = {id(p) for p in block_matrices(model)}
    assert {i for i, kind in kinds.items() if kind == "muonh"} == matrices
    blocks = cfg.model.prelude_layers + cfg.model.loop_layers + cfg.model.coda_layers
    injection = [model.injection.weight] if model.injection is not None else []
    # qkv, the output projection, the MLP's in and out; the linear injection's [W_e | W_s]
    assert len(matrices) == 4 * blocks + len(injection)
    assert {id(p) for p in injection} <= matrices
    assert all(p.dim() == 2 for p in block_matrices(model))
    for param in (model.embed.weight, model.lm_head.weight):
        assert kinds[id(param)] == "adamw"
    scales = {group["kind"]: group["lr_scale"] for group in optimizer.param_groups}
    assert scales == {"muonh": pytest.approx(0.02 / 3e-3), "adamw": 1.0}
    dtypes = {group["polar_dtype"] for group in optimizer.param_groups if group["kind"] == "muonh"}
    assert dtypes == {torch.bfloat16}
    exact = muonh(model, run_config(**settings, **{"train.polar_precision": "fp32"}))
    assert exact.param_groups[0]["polar_dtype"] == torch.float32


def test_muonh_trains_and_keeps_every_block_matrix_on_its_sphere(process_group):
    cfg = run_config(**{"train.steps": 30})
    tokens = random_tokens(batch=2, seq=33, vocab=64)
    losses = []
    with contextlib.closing(Engine(cfg).build()) as engine:
        start = {id(p): p.detach().norm().item() for p in block_matrices(engine.model)}
        for step in range(30):
            loss = engine.forward_backward(tokens[:, :-1], tokens[:, 1:], 2)
            engine.optimizer_step(3e-3 * (1 - step / 30))
            losses.append(float(loss))
        for param in block_matrices(engine.model):
            assert param.detach().norm().item() == pytest.approx(start[id(param)], rel=1e-5)
        lrs = {g["kind"]: g["lr"] for g in engine._ds.optimizer.param_groups}
    assert losses[-1] < losses[0] - 1.0, losses
    assert lrs["muonh"] == pytest.approx(0.02 * (1 - 29 / 30))


def test_muonh_under_zero_refuses_clipping_and_offload_with_the_fix():
    for stage in (1, 2, 3):
        run_config(**{"train.zero_stage": stage})  # accepted: the matrices step whole
        with pytest.raises(ConfigError, match="Set train.grad_clip: 0"):
            run_config(**{"train.zero_stage": stage, "train.grad_clip": 1.0})
        with pytest.raises(ConfigError, match="Set train.offload: false"):
            run_config(**{"train.zero_stage": stage, "train.offload": "true"})
    run_config(**{"train.grad_clip": 1.0})  # ZeRO-0 clips before MuonH sees the gradients


class OneProcess:
    """WholeMatrices of a process that holds every matrix whole (what ZeRO-0 is)."""

    rank, world_size = 0, 1

    def grad(self, param):
        return param.grad

    def weight(self, param):
        return param.detach().clone()

    def set_weight(self, param, value, owner):
        assert owner == 0
        param.copy_(value)


@pytest.mark.parametrize("kind", ["muonh", "muon"])
def test_whole_matrix_steps_equal_the_plain_step_and_their_state_round_trips(kind):
    """The sharded path's arithmetic is the plain one's; its state (owned momentum and radii)
    goes through state_dict, as DeepSpeed saves it per rank."""
    generator = torch.Generator().manual_seed(3)
    plain = [torch.nn.Parameter(torch.randn(24, 8, generator=generator)) for _ in range(3)]
    whole = [torch.nn.Parameter(p.detach().clone()) for p in plain]
    settings = {"kind": kind, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.1}
    a = MuonH([{"params": plain, **settings}])
    b = MuonH([{"params": whole, **settings, "sharded": True}])
    for step in range(4):
        if step == 2:  # a resumed optimizer carries on with the same state
            b2 = MuonH([{"params": whole, **settings, "sharded": True}])
            b2.load_state_dict(b.state_dict())
            b = b2
        for p, q in zip(plain, whole, strict=True):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        a.step()
        before = [q.detach().clone() for q in whole]
        b.step()  # the flat shards DeepSpeed would hand it: left alone
        assert all(torch.equal(q, x) for q, x in zip(whole, before, strict=True))
        with torch.no_grad():
            b.step_whole_matrices(OneProcess())
        for p, q in zip(plain, whole, strict=True):
            assert torch.equal(p, q)
    assert len(b.whole_state) == 3 and ("sphere_norm" in b.whole_state[0]) == (kind == "muonh")


def test_matrices_are_owned_by_the_least_loaded_rank_largest_first():
    from megaloop.train.muonh import owners_by_size

    owners = owners_by_size([(4, 4), (8, 8), (2, 2), (8, 8)], world_size=2)
    assert owners == [0, 0, 1, 1]  # 64 → 0, 64 → 1, 16 → 0 (a tie: the lower rank), 4 → 1
    assert owners_by_size([(3, 3)] * 5, world_size=8) == [0, 1, 2, 3, 4]


def trained(cfg: config.RunConfig, resume: str | None) -> dict:
    from megaloop.train.trainer import train

    return train(cfg, resume=resume, progress=False)


def test_a_muonh_run_resumes_to_the_same_losses(process_group, stdlib_shards, tmp_path):
    """Its state (momentum, each matrix's sphere radius) goes through DeepSpeed's checkpoint
    and torch.load(weights_only=True) and comes back whole."""
    cfg = run_config(**{"model.vocab_size": 4096, "data.shards": str(stdlib_shards),
                        "data.verify": "false", "train.steps": 8, "train.log_interval": 1,
                        "train.eval_interval": 100, "train.eval_batches": 1,
                        "train.checkpoint_interval": 4, "train.checkpoint_dir": str(tmp_path),
                        "track.enabled": "false"})
    whole = trained(cfg, None)
    (checkpoints,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    shutil.rmtree(checkpoints / "step_00000008")
    resumed = trained(cfg, "auto")
    losses = [i["loss"] for i in whole["intervals"]]
    assert losses[-1] < losses[0]
    assert [i["loss"] for i in resumed["intervals"]] == losses[4:]
