"""Hyper-connections: Hyperloop (once per loop), static lanes (iso-depth paper), mHC (per layer).

Conventions shared by all three (RESEARCH.md sections 2-4):
- streams have shape (B, T, n, C); they start as n copies of the hidden state;
- the function F that a connection wraps returns its *update* (output minus input), because the
  connection itself carries the residual path (through H_res, M or the lane mix), except where a
  paper writes the whole output: Hyperloop's default (`model.hyper_write: output`) and the
  iso-depth paper's lanes (norm(block(u)));
- at initialisation each variant computes what the plain residual network computes, so training
  starts from the baseline and learns to depart from it;
- the streams are the residual stream: they are read, mixed and written in their own dtype (fp32
  in a bf16 run), with autocast off (`stream_precision`), so that bf16 autocast rounds them at no
  loop or layer; only the wrapped function (the block, a sub-layer) computes in bf16.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn

from megaloop.model.blocks import KVCache, RMSNorm

Update = Callable[[torch.Tensor], torch.Tensor]

DYNAMIC_SCALE_INIT = 0.01  # alpha: the input-dependent part starts small, as in mHC
RESIDUAL_KEEP_INIT = 0.99  # Hyperloop's diagonal H_res starts near the identity


def stream_precision(streams: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on the streams' device: gates, reads, mixes and writes compute in the
    streams' dtype. Without it, autocast would run each einsum in bf16 and hand the block a
    bf16 residual stream."""
    return torch.autocast(streams.device.type, enabled=False)


def expand_streams(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]).contiguous()


def sinkhorn(logits: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """Project exp(logits) (..., n, n) onto doubly-stochastic matrices (in log space, stable)."""
    log_p = logits
    for _ in range(iterations):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)  # rows sum to 1
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)  # columns sum to 1
    return log_p.exp()


class DynamicGates(nn.Module):
    """Token-wise gate logits `alpha * W RMSNorm(flatten(y)) + b` for several gate groups."""

    def __init__(self, n: int, dim: int, sizes: list[int], bias_init: list[torch.Tensor]):
        super().__init__()
        self.sizes = sizes
        self.norm = RMSNorm(n * dim)
        self.proj = nn.Linear(n * dim, sum(sizes), bias=False)
        self.bias = nn.Parameter(torch.cat([b.flatten() for b in bias_init]).float())
        self.alpha = nn.Parameter(torch.full((len(sizes),), DYNAMIC_SCALE_INIT))

    def forward(self, streams: torch.Tensor) -> list[torch.Tensor]:
        dynamic = self.proj(self.norm(streams.flatten(-2))).split(self.sizes, dim=-1)
        biases = self.bias.split(self.sizes)
        return [a * d + b for a, d, b in zip(self.alpha, dynamic, biases, strict=True)]


class HyperloopConnection(nn.Module):
    """One loop of Hyperloop: y <- H_res y + H_post (F(H_pre y) + e_l), H_res diagonal, where F
    is what the loop's `write` function returns (the block's output, the paper's, or its update).

    H_pre = sigma(.) starts at 1/n (the block reads the mean of the streams), H_post = 2 sigma(.)
    starts at 1 (F reaches every stream), H_res = sigma(.) starts at 0.99.
    """

    def __init__(self, n: int, dim: int):
        super().__init__()
        n_float = float(n)
        self.gates = DynamicGates(n, dim, [n, n, n], [
            torch.full((n,), -math.log(n_float - 1.0)),  # sigma = 1/n
            torch.zeros(n),  # 2 sigma = 1
            torch.full((n,), math.log(RESIDUAL_KEEP_INIT / (1 - RESIDUAL_KEEP_INIT))),
        ])
        self.loop_embedding = nn.Parameter(torch.zeros(dim))

    def mixing(self, streams: torch.Tensor):
        pre, post, res = self.gates(streams)
        return torch.sigmoid(pre), 2 * torch.sigmoid(post), torch.sigmoid(res)

    def forward(self, streams: torch.Tensor, update: Update) -> torch.Tensor:
        with stream_precision(streams):
            h_pre, h_post, h_res = self.mixing(streams)
            x = torch.einsum("btn,btnc->btc", h_pre, streams)
        out = (update(x) + self.loop_embedding).to(streams.dtype)
        with stream_precision(streams):
            return h_res.unsqueeze(-1) * streams + h_post.unsqueeze(-1) * out.unsqueeze(-2)


class Hyperloop(nn.Module):
    """Hyper-connections applied once per loop, with loop-specific parameters. `write`: what
    the connection adds to the streams, the middle block's output F(u) (the paper's, "output")
    or its update F(u) - u ("update")."""

    def __init__(self, n: int, dim: int, recurrences: int, write: str = "output"):
        super().__init__()
        self.n, self.write = n, write
        self.loops = nn.ModuleList(HyperloopConnection(n, dim) for _ in range(recurrences))

    def start(self, x: torch.Tensor) -> torch.Tensor:
        return expand_streams(x, self.n)

    def step(self, streams: torch.Tensor, index: int, body: Update) -> torch.Tensor:
        if self.write == "output":
            return self.loops[index](streams, body)
        return self.loops[index](streams, lambda u: body(u) - u)

    def finish(self, streams: torch.Tensor) -> torch.Tensor:
        return streams.mean(dim=-2)


class Lanes(nn.Module):
    """Static hyper-connection lanes of the iso-depth paper, one set of scalars per recurrence.

    Per recurrence i: u = alpha_i . lanes; lanes <- M_i lanes + beta_i (x) F(u), where F(u) is
    the loop block's update block(u) - u, or, with `whole_output`, norm(block(u))
    (model.recurrence_norm = every: the paper's lanes; the norm is the body's). Cyclic init
    alpha_i = e_(i mod K), M_i = I, beta_i = 1; the coda gets the sum of the lanes.
    """

    def __init__(self, n: int, recurrences: int, whole_output: bool = False):
        super().__init__()
        self.n, self.whole_output = n, whole_output
        read = torch.zeros(recurrences, n)
        read[torch.arange(recurrences), torch.arange(recurrences) % n] = 1.0
        self.read = nn.Parameter(read)
        self.mix = nn.Parameter(torch.eye(n).repeat(recurrences, 1, 1))
        self.write = nn.Parameter(torch.ones(recurrences, n))

    def start(self, x: torch.Tensor) -> torch.Tensor:
        return expand_streams(x, self.n)

    def step(self, lanes: torch.Tensor, index: int, body: Update) -> torch.Tensor:
        with stream_precision(lanes):
            u = torch.einsum("k,btkc->btc", self.read[index], lanes)
            mixed = torch.einsum("jk,btkc->btjc", self.mix[index], lanes)
        written = (body(u) if self.whole_output else body(u) - u).to(lanes.dtype)
        with stream_precision(lanes):
            return mixed + self.write[index].unsqueeze(-1) * written.unsqueeze(-2)

    def finish(self, lanes: torch.Tensor) -> torch.Tensor:
        return lanes.sum(dim=-2)


class MHCConnection(nn.Module):
    """mHC around one sub-layer: y <- H_res y + H_post^T f(H_pre y), H_res doubly stochastic."""

    def __init__(self, n: int, dim: int, sinkhorn_iterations: int = 20):
        super().__init__()
        self.n, self.iterations = n, sinkhorn_iterations
        off_diagonal = torch.full((n, n), -8.0).fill_diagonal_(0.0)  # Sinkhorn of it ~ identity
        self.gates = DynamicGates(n, dim, [n, n, n * n], [
            torch.full((n,), -math.log(float(n) - 1.0)), torch.zeros(n), off_diagonal])

    def mixing(self, streams: torch.Tensor):
        pre, post, res = self.gates(streams)
        h_res = sinkhorn(res.unflatten(-1, (self.n, self.n)), self.iterations)
        return torch.sigmoid(pre), 2 * torch.sigmoid(post), h_res

    def forward(self, streams: torch.Tensor, sublayer: Update) -> torch.Tensor:
        with stream_precision(streams):
            h_pre, h_post, h_res = self.mixing(streams)
            x = torch.einsum("btn,btnc->btc", h_pre, streams)
            mixed = torch.einsum("btij,btjc->btic", h_res, streams)
        out = sublayer(x).to(streams.dtype)
        with stream_precision(streams):
            return mixed + h_post.unsqueeze(-1) * out.unsqueeze(-2)


class MHCBlock(nn.Module):
    """A transformer Block whose two residual connections are mHC connections over n streams."""

    def __init__(self, block: nn.Module, n: int, dim: int):
        super().__init__()
        self.block = block
        self.attn_hc = MHCConnection(n, dim)
        self.mlp_hc = MHCConnection(n, dim)

    def forward(self, streams: torch.Tensor, rope, cache: KVCache | None = None) -> torch.Tensor:
        streams = self.attn_hc(streams, lambda x: self.block.attn_update(x, rope, cache))
        return self.mlp_hc(streams, self.block.mlp_update)
