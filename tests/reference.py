"""An independent reference transformer, written out by hand, that runs a LoopedLM's weights.

Nothing here imports megaloop's model code: RMSNorm, RoPE (rotate-half convention, written with
explicit halves), causal attention (explicit mask and softmax, grouped K/V heads by index), and
the SwiGLU / ReLU^2 MLPs are re-derived from their definitions. Weights are copied out of a
LoopedLM state_dict; a layer named twice in a layer order is the same weights run twice, which is
how a loop unrolls.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-6


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + EPS) * weight


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x (B, H, T, D) by angle t * theta^(-2i/D)."""
    seq, dim = x.shape[-2], x.shape[-1]
    half = dim // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / dim)
    angle = torch.arange(seq, dtype=torch.float64)[:, None] * freq[None, :]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v for q (B, H, T, D) and k, v (B, H_kv, T, D);
    query head h reads key/value head h // (H / H_kv)."""
    n_heads, n_kv_heads, seq, dim = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    kv_index = torch.arange(n_heads) // (n_heads // n_kv_heads)
    k, v = k[:, kv_index], v[:, kv_index]
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim)
    future = torch.ones(seq, seq, dtype=torch.bool).triu(diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


class ReferenceBlock:
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, weights: dict[str, torch.Tensor], cfg):
        self.w, self.cfg = weights, cfg

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        cfg, w = self.cfg, self.w
        batch, seq, _ = x.shape
        head_dim = cfg.dim_per_head
        q_dim, kv_dim = cfg.n_heads * head_dim, cfg.kv_heads * head_dim
        qkv = x @ w["attn.qkv.weight"].T
        q, k, v = qkv[..., :q_dim], qkv[..., q_dim:q_dim + kv_dim], qkv[..., q_dim + kv_dim:]
        q = q.reshape(batch, seq, cfg.n_heads, head_dim).transpose(1, 2)
        k = k.reshape(batch, seq, cfg.kv_heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, seq, cfg.kv_heads, head_dim).transpose(1, 2)
        after_rope = cfg.qk_norm and cfg.qk_norm_mode == "free_after_rope"
        if cfg.qk_norm and not after_rope:
            q, k = rms_norm(q, w["attn.q_norm.weight"]), rms_norm(k, w["attn.k_norm.weight"])
        q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
        if after_rope:  # no gain
            q, k = rms_norm(q, 1.0), rms_norm(k, 1.0)
        y = causal_attention(q, k, v).transpose(1, 2).reshape(batch, seq, q_dim)
        return y @ w["attn.out.weight"].T

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w["mlp.inp.weight"].T
        if self.cfg.mlp == "swiglu":
            hidden = self.cfg.mlp_hidden
            gate, up = h[..., :hidden], h[..., hidden:]
            h = gate * torch.sigmoid(gate) * up
        else:
            h = torch.clamp(h, min=0) ** 2
        return h @ self.w["mlp.out.weight"].T

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(rms_norm(x, self.w["attn_norm.weight"]))
        return x + self.mlp(rms_norm(x, self.w["mlp_norm.weight"]))


class ReferenceTransformer:
    """Embedding -> named blocks in a given order -> final RMSNorm -> LM head (soft-capped)."""

    def __init__(self, state_dict: dict[str, torch.Tensor], cfg):
        self.cfg = cfg
        self.weights = {name: t.detach().clone() for name, t in state_dict.items()}
        self.blocks: dict[str, ReferenceBlock] = {}
        for name in self.weights:
            stack, index, *rest = name.split(".")
            if stack in ("prelude", "loop", "coda") and rest:
                prefix = f"{stack}.{index}."
                own = {k[len(prefix):]: v for k, v in self.weights.items() if k.startswith(prefix)}
                self.blocks.setdefault(f"{stack}.{index}", ReferenceBlock(own, cfg))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.weights["embed.weight"][tokens]
        if "embed_norm.weight" in self.weights:
            x = rms_norm(x, self.weights["embed_norm.weight"])
        return x

    def layers(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        for name in names:
            x = self.blocks[name](x)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        head = self.weights.get("lm_head.weight", self.weights["embed.weight"])
        logits = rms_norm(x, self.weights["final_norm.weight"]) @ head.T
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def __call__(self, tokens: torch.Tensor, names: list[str]) -> torch.Tensor:
        return self.logits(self.layers(self.embed(tokens), names))


def stack_names(stack: str, n_layers: int) -> list[str]:
    return [f"{stack}.{i}" for i in range(n_layers)]


def unrolled_order(cfg, recurrences: int | None = None) -> list[str]:
    """prelude, the loop layers repeated r times, coda: the layer order of an unrolled loop."""
    r = cfg.recurrences if recurrences is None else recurrences
    return (stack_names("prelude", cfg.prelude_layers) + stack_names("loop", cfg.loop_layers) * r
            + stack_names("coda", cfg.coda_layers))
