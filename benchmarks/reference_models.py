"""The two baselines megaloop's training step is compared against.

`ReferenceTransformer` is a minimal Llama-shaped transformer written the plain way (nn.Linear
q/k/v/o, SwiGLU with separate gate/up/down projections, RMSNorm, rotate-half RoPE, causal
F.scaled_dot_product_attention, untied LM head): what a competent PyTorch user writes in an
afternoon, with no tricks in either direction. `ReferenceLooped` is the same written as a looped
model (prelude, loop block run r times with the linear injection and an RMSNorm after every
recurrence, coda), the plain way: the same computation as megaloop's looped model. `HFLlama`
builds `transformers.LlamaForCausalLM` of the plain shape. All return the mean next-token
cross-entropy from `loss(tokens, targets)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RefAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class RefMLP(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class RefBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.RMSNorm(d_model, eps=1e-6)
        self.attn = RefAttention(d_model, n_heads)
        self.norm2 = nn.RMSNorm(d_model, eps=1e-6)
        self.mlp = RefMLP(d_model, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class ReferenceTransformer(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, hidden: int,
                 max_seq_len: int, rope_theta: float = 10000.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(RefBlock(d_model, n_heads, hidden) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d_model, eps=1e-6)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        head_dim = d_model // n_heads
        inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        freqs = torch.outer(torch.arange(max_seq_len).float(), inv_freq)
        freqs = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("o.weight", "down.weight"))\
                    else 0.02
                nn.init.normal_(p, std=std)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class ReferenceLooped(ReferenceTransformer):
    """prelude -> (u = W [e ; s], loop blocks, s = RMSNorm(u)) x r -> coda, W = [I | 0] at init."""

    def __init__(self, vocab_size: int, d_model: int, layout: tuple[int, int, int],
                 recurrences: int, n_heads: int, hidden: int, max_seq_len: int,
                 rope_theta: float = 10000.0):
        super().__init__(vocab_size, d_model, sum(layout), n_heads, hidden, max_seq_len,
                         rope_theta)
        self.layout, self.recurrences = layout, recurrences
        self.inject = nn.Linear(2 * d_model, d_model, bias=False)
        self.loop_norm = nn.RMSNorm(d_model, eps=1e-6)
        with torch.no_grad():
            self.inject.weight.zero_()
            self.inject.weight[:, :d_model].copy_(torch.eye(d_model))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        prelude, loop, _ = self.layout
        x = self.embed(tokens)
        for block in self.blocks[:prelude]:
            x = block(x, cos, sin)
        e = state = x
        for _ in range(self.recurrences):
            u = self.inject(torch.cat([e, state], dim=-1))
            for block in self.blocks[prelude:prelude + loop]:
                u = block(u, cos, sin)
            state = self.loop_norm(u)
        x = state
        for block in self.blocks[prelude + loop:]:
            x = block(x, cos, sin)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class HFLlama(nn.Module):
    """`transformers.LlamaForCausalLM` behind the same `loss(tokens, targets)` call. Hugging Face
    shifts the labels itself, so it is given the input tokens as labels (T - 1 targets per row)."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, hidden: int,
                 max_seq_len: int, rope_theta: float = 10000.0):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=d_model, intermediate_size=hidden,
            num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
            max_position_embeddings=max_seq_len, rms_norm_eps=1e-6, tie_word_embeddings=False,
            attention_dropout=0.0, attention_bias=False, mlp_bias=False, use_cache=False,
            rope_theta=rope_theta, attn_implementation="sdpa")
        self.model = LlamaForCausalLM(config)
        if self.model.config._attn_implementation != "sdpa":  # pragma: no cover - a version drift
            raise RuntimeError("transformers did not select the sdpa attention implementation")

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, labels=tokens, use_cache=False).loss
