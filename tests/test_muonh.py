"""MuonH (megaloop/train/muonh.py): the orthogonalisation, the sphere invariant, and steps
against a plain float64 reference written from the paper's description."""

from __future__ import annotations

import pytest
import torch

from megaloop.train.muonh import POLAR_EXPRESS_STEPS, MuonH, polar


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
