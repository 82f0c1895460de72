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

Muon (`kind: "muon"`) is the same step without the sphere: the update scaled by
√max(1, rows/cols) (Keller Jordan's Muon) and decoupled weight decay.

Where ZeRO shards the matrices (stages 1-3), DeepSpeed hands this optimizer flat pieces of
them, on which no polar factor can be taken. Such a group is marked `sharded`: `step` leaves it
alone, and the Engine calls `step_whole_matrices` before DeepSpeed's step instead. Each matrix
then has one owning rank (round robin by size), which alone keeps its momentum, receives the
whole gradient and weight, takes the step, and sends the new weight to every rank's shard.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

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


def orthogonal_step(weight: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
                    group: dict[str, Any], row_splits: tuple[int, ...] | None = None) -> None:
    """One Muon or MuonH step of a whole matrix, in place on `weight` and `state` (its momentum
    buffer and, for MuonH, its sphere's radius ‖W₀‖, both made at the first step).

    `row_splits`: the matrix is several matrices stacked by rows (a fused q/k/v projection,
    SwiGLU's gate and up): each is orthogonalised and kept on its own sphere, as if separate."""
    momentum = group["momentum"]
    pieces = (lambda t: t.split(row_splits, dim=0)) if row_splits else (lambda t: (t,))
    if not state:
        state["momentum"] = torch.zeros_like(weight)
        if group["kind"] == "muonh":  # ‖W₀‖ of each piece, kept for the whole run
            state["sphere_norm"] = torch.stack([piece.norm() for piece in pieces(weight)])
    buffer = state["momentum"]
    buffer.lerp_(grad, 1 - momentum)
    look_ahead = grad.lerp(buffer, momentum)
    if group["kind"] == "muon":
        weight.mul_(1 - group["lr"] * group["weight_decay"])
    radii = state["sphere_norm"].reshape(-1) if group["kind"] == "muonh" else None
    for index, (piece, direction_of) in enumerate(zip(pieces(weight), pieces(look_ahead),
                                                      strict=True)):
        direction = polar(direction_of, group["steps"], group["polar_dtype"]).to(weight.dtype)
        if radii is None:  # Muon
            rows, cols = piece.shape
            piece.sub_(direction, alpha=group["lr"] * max(1.0, rows / cols) ** 0.5)
            continue
        radius = radii[index]
        direction.mul_(radius / direction.norm().clamp_min(1e-10))
        piece.sub_(direction, alpha=group["lr"])
        piece.mul_(radius / piece.norm().clamp_min(1e-10))


class WholeMatrices(Protocol):
    """How `MuonH.step_whole_matrices` reaches matrices that ZeRO shards (the Engine's). Every
    method is collective: all ranks call it for the same parameter in the same order."""

    rank: int
    world_size: int

    def grad(self, param: torch.Tensor) -> torch.Tensor:
        """The whole reduced gradient, on every rank."""

    def weight(self, param: torch.Tensor) -> torch.Tensor:
        """The whole fp32 weight, on every rank."""

    def set_weight(self, param: torch.Tensor, value: torch.Tensor | None, owner: int) -> None:
        """`value` (given on rank `owner` only) becomes the weight's fp32 shard on every rank."""


ORTHOGONAL_KINDS = ("muonh", "muon")


def matrix_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's whole shape, also where ZeRO-3 left only a shard of it on this rank."""
    return tuple(getattr(param, "ds_shape", param.shape))


def owners_by_size(shapes: list[tuple[int, ...]], world_size: int) -> list[int]:
    """The rank that owns each matrix: the least loaded so far, largest matrices first."""
    load, owners = [0] * world_size, [0] * len(shapes)
    for index in sorted(range(len(shapes)), key=lambda i: -torch.Size(shapes[i]).numel()):
        owners[index] = min(range(world_size), key=lambda rank: load[rank])
        load[owners[index]] += torch.Size(shapes[index]).numel()
    return owners


class MuonH(torch.optim.Optimizer):
    """MuonH (or Muon) over the matrices of its "muonh" ("muon") groups and AdamW over its
    "adamw" groups (the paper's pairing: embeddings, the LM head, norms and hyper-connection
    scalars), as one optimizer for DeepSpeed to hold. A group's `kind` says which; "muonh" is
    the default.

    MuonH's `lr` is the step on the unit sphere (0.014 in the paper at 2^18 tokens per step,
    scaled with the batch and the run's tokens by the recipe). AdamW groups take `lr`,
    `betas`, `eps` and `weight_decay` (decoupled), as do Muon's (betas and eps unused).
    A group with `sharded: True` is stepped by `step_whole_matrices` (see the module's doc)."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
                 lr: float = 0.014, momentum: float = 0.95, steps: int = 5,
                 polar_dtype: torch.dtype = torch.bfloat16,
                 betas: tuple[float, float] = (0.8, 0.95), eps: float = 1e-10,
                 weight_decay: float = 0.0):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"MuonH momentum {momentum}: give a value in [0, 1)")
        super().__init__(params, {"kind": "muonh", "lr": lr, "momentum": momentum,
                                  "steps": steps, "polar_dtype": polar_dtype, "betas": betas,
                                  "eps": eps, "weight_decay": weight_decay, "sharded": False})
        self.whole_matrices: list[tuple[int, torch.Tensor]] = []  # (group index, matrix)
        self.row_splits: dict[int, tuple[int, ...]] = {}  # by id(param); see orthogonal_step
        for group_index, group in enumerate(self.param_groups):
            splits = group.pop("row_splits", None) or [None] * len(group["params"])
            if len(splits) != len(group["params"]):
                raise ValueError("row_splits: one entry (a tuple of row counts, or None) per "
                                 "parameter of the group")
            for param, split in zip(group["params"], splits, strict=True):
                if split is not None:
                    self.row_splits[id(param)] = tuple(split)
            if group["kind"] not in (*ORTHOGONAL_KINDS, "adamw"):
                raise ValueError(f"optimizer group kind {group['kind']!r}: muonh, muon or adamw")
            if group["sharded"] and group["kind"] not in ORTHOGONAL_KINDS:
                raise ValueError("only muonh and muon groups are stepped as whole matrices")
            for param in group["params"]:
                if group["kind"] in ORTHOGONAL_KINDS and len(matrix_shape(param)) != 2:
                    raise ValueError(f"{group['kind']} updates matrices; a parameter of shape "
                                     f"{matrix_shape(param)} belongs to AdamW")
                if group["sharded"]:
                    self.whole_matrices.append((group_index, param))
        self.whole_state: dict[int, dict[str, Any]] = {}  # by index in whole_matrices
        self._owners: list[int] | None = None  # each whole matrix's rank, at the first step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["sharded"]:
                continue  # DeepSpeed's flat shards: step_whole_matrices took their step
            for param in group["params"]:
                if param.grad is None:
                    continue
                if group["kind"] == "adamw":
                    self._adamw(param, group)
                else:
                    orthogonal_step(param, param.grad, self.state[param], group,
                                    self.row_splits.get(id(param)))
        return loss

    @torch.no_grad()
    def step_whole_matrices(self, whole: WholeMatrices) -> None:
        """The step of the sharded groups' matrices, one at a time, each on its owning rank
        (called on every rank after the step's last backward, before DeepSpeed's step)."""
        if self._owners is None:  # the world size is the run's: the same for every step
            self._owners = owners_by_size([matrix_shape(p) for _, p in self.whole_matrices],
                                          whole.world_size)
        owners = self._owners
        for index, ((group_index, param), owner) in enumerate(zip(self.whole_matrices, owners,
                                                                  strict=True)):
            grad, weight = whole.grad(param), whole.weight(param)
            if whole.rank == owner:
                state = self.whole_state.setdefault(index, {})
                orthogonal_step(weight, grad.to(weight.dtype), state,
                                self.param_groups[group_index], self.row_splits.get(id(param)))
            whole.set_weight(param, weight if whole.rank == owner else None, owner)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["whole_matrices"] = self.whole_state  # this rank's own: DeepSpeed saves per rank
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        whole = state_dict.pop("whole_matrices", {})
        super().load_state_dict(state_dict)
        self.whole_state = {int(index): dict(entry) for index, entry in whole.items()}

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
