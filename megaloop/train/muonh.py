"""MuonH: Muon on a Frobenius sphere, the iso-depth paper's optimizer for block matrices.

Per matrix W, with gradient G, momentum buffer M and ‖W₀‖ the matrix's Frobenius norm when
training began (its initialisation):

    M ← μ M + (1 − μ) G                    momentum (μ = 0.95)
    U ← (1 − μ) G + μ M                    Nesterov's look-ahead
    O ← polar(U)                           ≈ the orthogonal factor of U (Polar Express, 5 steps)
    W ← W − lr · ‖W₀‖ · O / ‖O‖            an update as large as the matrix itself
    W ← ‖W₀‖ · W / ‖W‖                     back onto the sphere: ‖W‖ = ‖W₀‖ for the whole run

No weight decay: on the sphere it would change nothing to first order. The other parameters
(embeddings, the LM head, norms, hyper-connection scalars) belong to AdamW, not here.

Polar Express (Amsel, Persson, Musco and Gower, arXiv:2505.16932) maps every singular value
of U, after U is scaled so that its spectral norm is at most 1, towards 1 with one odd
polynomial per step; the coefficients are the paper's for 5 steps (safety factor 2e-2, cushion
2). It runs in bf16 like Muon's Newton-Schulz iteration, since the result need not be exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

POLAR_EXPRESS_STEPS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
SPECTRAL_SAFETY = 1.02  # the Frobenius norm bounds the spectral norm; 2% more keeps it below 1


def polar(update: torch.Tensor, steps: int = 5,
          dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The orthogonal polar factor of a matrix, approximately (singular values near 1),
    computed in `dtype`. Each step is X ← aX + (bA + cA²)X with A = XXᵀ, on the smaller side
    of the matrix."""
    if not 1 <= steps <= len(POLAR_EXPRESS_STEPS):
        raise ValueError(f"Polar Express has coefficients for 1 to {len(POLAR_EXPRESS_STEPS)} "
                         f"steps, not {steps}")
    tall = update.shape[-2] > update.shape[-1]
    x = update.to(dtype)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * SPECTRAL_SAFETY + 1e-6)
    for a, b, c in POLAR_EXPRESS_STEPS[:steps]:
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if tall else x


class MuonH(torch.optim.Optimizer):
    """MuonH over the matrices of its "muonh" groups and AdamW over its "adamw" groups (the
    paper's pairing: embeddings, the LM head, norms and hyper-connection scalars), as one
    optimizer for DeepSpeed to hold. A group's `kind` says which; "muonh" is the default.

    MuonH's `lr` is the step on the unit sphere (0.014 in the paper at 2^18 tokens per step,
    scaled with the batch and the run's tokens by the recipe). AdamW groups take `lr`,
    `betas`, `eps` and `weight_decay` (decoupled)."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
                 lr: float = 0.014, momentum: float = 0.95, steps: int = 5,
                 polar_dtype: torch.dtype = torch.bfloat16,
                 betas: tuple[float, float] = (0.8, 0.95), eps: float = 1e-10,
                 weight_decay: float = 0.0):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"MuonH momentum {momentum}: give a value in [0, 1)")
        super().__init__(params, {"kind": "muonh", "lr": lr, "momentum": momentum,
                                  "steps": steps, "polar_dtype": polar_dtype, "betas": betas,
                                  "eps": eps, "weight_decay": weight_decay})
        for group in self.param_groups:
            if group["kind"] not in ("muonh", "adamw"):
                raise ValueError(f"optimizer group kind {group['kind']!r}: muonh or adamw")
            for param in group["params"]:
                if group["kind"] == "muonh" and param.dim() != 2:
                    raise ValueError(f"MuonH updates matrices; a parameter of shape "
                                     f"{tuple(param.shape)} belongs to AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            update = self._muonh if group["kind"] == "muonh" else self._adamw
            for param in group["params"]:
                if param.grad is not None:
                    update(param, group)
        return loss

    def _muonh(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        state, momentum = self.state[param], group["momentum"]
        if not state:
            state["momentum"] = torch.zeros_like(param)
            state["sphere_norm"] = param.norm()  # ‖W₀‖, kept for the whole run
        buffer, radius = state["momentum"], state["sphere_norm"]
        buffer.lerp_(param.grad, 1 - momentum)
        look_ahead = param.grad.lerp(buffer, momentum)
        direction = polar(look_ahead, group["steps"], group["polar_dtype"]).to(param.dtype)
        direction.mul_(radius / direction.norm().clamp_min(1e-10))
        param.sub_(direction, alpha=group["lr"])
        param.mul_(radius / param.norm().clamp_min(1e-10))

    def _adamw(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        state["step"] += 1
        (beta1, beta2), step, grad = group["betas"], state["step"], param.grad
        param.mul_(1 - group["lr"] * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denominator = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
        param.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / (1 - beta1 ** step))
