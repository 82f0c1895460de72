"""Transformer building blocks: RMSNorm, RoPE, attention (flash-attn or SDPA), MLP, Block, and the
KV cache that attention fills during incremental decoding."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from megaloop.config import ModelConfig
from megaloop.errors import ConfigError

try:  # optional: the `gpu` extra
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None


def flash_installed() -> bool:
    """flash-attn is importable (it runs only on CUDA tensors in bf16 or fp16)."""
    return flash_attn_func is not None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's where it is on (bf16 training), else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


QK_NORM_EPS = 1e-6


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the gain in x's dtype: a bf16 activation under autocast meets an fp32 parameter here
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class Rotary(nn.Module):
    """RoPE tables, rotate-half convention (as `transformers` Llama); not saved in checkpoints.

    The tables are always fp32 and exact: a cast or move of the model (`.to`, `.bfloat16()`,
    DeepSpeed's bf16 engine, `to_empty`) recomputes them on the new device instead of casting
    them, since a bf16 position table rounds positions above 256 to steps of 2, 4, 8. A build
    under ZeRO-3's `zero.Init` (whose tensor constructors make bf16) calls `reset` after it."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos, sin = self._tables(None)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device):
        inv_freq = 1.0 / self.theta ** (
            torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim)
        t = torch.arange(self.max_seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        freqs = torch.cat([freqs, freqs], dim=-1)
        return freqs.cos(), freqs.sin()

    def reset(self) -> None:
        """Recompute the tables in fp32 on the buffers' device."""
        cos, sin = self._tables(self.cos.device)
        self.cos, self.sin = cos, sin

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.reset()
        return self

    def forward(self, seq_len: int, dtype: torch.dtype,
                start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables of positions start .. start + seq_len - 1."""
        end = start + seq_len
        return self.cos[start:end].to(dtype), self.sin[start:end].to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (T, D)."""
    return x * cos + _rotate_half(x) * sin


FUSED_GQA_DTYPES = (torch.float16, torch.bfloat16)
FUSED_GQA_MAX_HEAD_DIM = 256


def native_gqa(q: torch.Tensor, masked: bool) -> bool:
    """Whether SDPA gets grouped K/V heads as they are (`enable_gqa`) rather than repeated.
    Only the flash kernel reads grouped heads: in fp32, with a mask or above its head size,
    `enable_gqa` would send SDPA to its math kernel (quadratic memory), which repeated K/V
    avoid."""
    return (q.dtype in FUSED_GQA_DTYPES and not masked
            and q.shape[-1] <= FUSED_GQA_MAX_HEAD_DIM)


@functools.cache
def cpu_bf16_flash_refused() -> bool:
    """Whether SDPA's CPU flash kernel refuses bf16 here: on a CPU with AVX512 whose kernels
    ATEN_CPU_CAPABILITY holds below it (as the tests emulate a CPU without AVX512), torch 2.13
    raises "pack_vnni2 is only supported when avx512 is supported". A CPU that lacks AVX512
    takes another path and is not affected."""
    try:
        return bool(torch.cpu._is_avx512_supported()) and \
            "AVX512" not in torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # a torch without these probes
        return False


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over (B, H, T, D) tensors; k and v may have fewer (grouped) heads.

    k and v may be longer than q (cached past positions): query i is the key position
    len(k) - len(q) + i and sees keys up to it. One query (decoding) sees every key."""
    q_len, k_len = q.shape[2], k.shape[2]
    causal = q_len == k_len
    mask = None
    if not causal and q_len > 1:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    gqa = k.shape[1] != q.shape[1]
    if gqa and not native_gqa(q, masked=mask is not None):
        repeats = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        gqa = False
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and cpu_bf16_flash_refused():
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                  enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=gqa)


class KVCache:
    """Keys and values of the positions seen so far, for incremental decoding.

    A looped model holds one slot per (stack, layer, recurrence): the loop's layers run r times,
    at r different depths, and each run attends to the keys of its own depth. The model says
    which slot an attention call fills (`seek`; then each call takes the next one): prelude
    layers first, then the loop's, then the coda's. With a `kv_budget` k the loop keeps k
    recurrences' slots and recurrence i uses slot i mod k (the iso-depth paper's code): a prompt
    is still exact, and a new token reads the older positions' keys of the last recurrence
    congruent to i. A cache is tied to the number of recurrences it was filled with.

    `rows` (None: all) names the rows of the batch an attention call computes, so that a row can
    stop iterating while the others go on (early exit, model/early_exit.py); `copy_slots` then
    gives its skipped recurrences' slots the keys of its last one. Slots are buffers of
    `max_len` positions, allocated on first use and written in place."""

    def __init__(self, max_len: int, kv_budget: int | None = None, early_exit=None):
        if kv_budget is not None and kv_budget < 1:
            raise ConfigError(f"kv_budget = {kv_budget} must be >= 1 (None keeps every "
                              "recurrence's keys).")
        self.max_len, self.kv_budget, self.early_exit = max_len, kv_budget, early_exit
        self.length = 0  # positions cached
        self.recurrences: int | None = None
        self.slots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rows: torch.Tensor | None = None
        self.recurrences_used: list[torch.Tensor] = []  # per decoded token, per row (early exit)
        self._cursor = 0
        self._new = 0  # positions of the pass in progress

    def begin(self, seq_len: int, recurrences: int) -> int:
        """Start a forward pass over `seq_len` new positions; returns the first one's index."""
        if self.recurrences is not None and recurrences != self.recurrences:
            raise ConfigError(f"This KV cache was filled with {self.recurrences} recurrences; "
                              f"it cannot continue with {recurrences}: use a new cache.")
        if self.length + seq_len > self.max_len:
            raise ConfigError(f"{self.length} cached + {seq_len} new positions exceed the cache "
                              f"length {self.max_len} (model.max_seq_len).")
        self.recurrences, self._cursor, self._new, self.rows = recurrences, 0, seq_len, None
        return self.length

    def loop_slots(self, recurrences: int) -> int:
        """How many recurrences keep slots of their own: the budget, at most r."""
        return recurrences if self.kv_budget is None else min(self.kv_budget, recurrences)

    def seek(self, slot: int) -> None:
        """The next attention call fills slot `slot`."""
        self._cursor = slot

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys and values (B, H, T, D) of this attention call into its slot;
        return all of the slot's keys and values so far (of `rows` only, when set)."""
        if self._cursor not in self.slots:
            if self.length or self.rows is not None:
                raise RuntimeError(f"KV cache: slot {self._cursor} was not filled by the first "
                                   "pass")
            shape = (*k.shape[:2], self.max_len, k.shape[-1])
            self.slots[self._cursor] = (k.new_empty(shape), v.new_empty(shape))
        keys, values = self.slots[self._cursor]
        self._cursor += 1
        end = self.length + k.shape[2]
        if self.rows is None:
            keys[:, :, self.length:end] = k
            values[:, :, self.length:end] = v
            return keys[:, :, :end], values[:, :, :end]
        rows = self.rows.to(keys.device)  # layers may sit on other devices (device_map)
        keys[rows, :, self.length:end] = k
        values[rows, :, self.length:end] = v
        return keys[rows, :, :end], values[rows, :, :end]

    def copy_slots(self, rows: torch.Tensor, source: int, targets: list[int]) -> None:
        """The new positions of `rows` in slots `targets` take those of slot `source`."""
        new = slice(self.length, self.length + self._new)
        keys, values = self.slots[source]
        rows = rows.to(keys.device)
        for target in targets:
            target_keys, target_values = self.slots[target]
            target_keys[rows, :, new] = keys[rows, :, new]
            target_values[rows, :, new] = values[rows, :, new]

    def end(self, seq_len: int) -> None:
        self.length += seq_len
        self.rows = None

    def reorder_cache(self, order: torch.Tensor) -> None:
        """Rows in a new order, some repeated (beam search keeps the best beams)."""
        order = order.to(next(iter(self.slots.values()))[0].device) if self.slots else order
        self.slots = {slot: (keys.index_select(0, order), values.index_select(0, order))
                      for slot, (keys, values) in self.slots.items()}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        self.backend = cfg.attention
        if self.backend == "flash" and flash_attn_func is None:
            raise ConfigError("model.attention = flash but flash-attn is not installed; install "
                              "megaloop[gpu] on a CUDA machine or set model.attention=auto.")
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=False)
        self.out = nn.Linear(q_dim, cfg.d_model, bias=False)
        learned = cfg.qk_norm and cfg.qk_norm_mode == "learned_before_rope"
        self.q_norm = RMSNorm(self.head_dim) if learned else None
        self.k_norm = RMSNorm(self.head_dim) if learned else None
        self.free_qk_norm = cfg.qk_norm and cfg.qk_norm_mode == "free_after_rope"

    def _use_flash(self, q: torch.Tensor) -> bool:
        return (self.backend != "sdpa" and flash_attn_func is not None and q.is_cuda
                and q.dtype in (torch.float16, torch.bfloat16))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: KVCache | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.free_qk_norm:  # the iso-depth paper's: no gain, after the rotation
            q = F.rms_norm(q, (self.head_dim,), eps=QK_NORM_EPS)
            k = F.rms_norm(k, (self.head_dim,), eps=QK_NORM_EPS)
        # RoPE runs in fp32 under autocast (fp32 tables); attention in the matmul dtype
        dtype = compute_dtype(x)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if cache is not None:
            k, v = cache.extend(k, v)
        if self._use_flash(q):  # causal masks of flash-attn >= 2.1 align to the last key
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                causal=True)
        else:
            y = sdpa_attention(q, k, v).transpose(1, 2)
        return self.out(y.reshape(batch, seq, q_dim))


class MLP(nn.Module):
    """SwiGLU (gate and up projections fused in one matmul) or ReLU^2."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, hidden = cfg.mlp, cfg.mlp_hidden
        width = 2 * hidden if self.kind == "swiglu" else hidden
        self.inp = nn.Linear(cfg.d_model, width, bias=False)
        self.out = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.relu(h).square()
        return self.out(h)


class Block(nn.Module):
    """Pre-norm transformer block. The two residual updates are exposed for hyper-connections."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def attn_update(self, x: torch.Tensor, rope, cache: KVCache | None = None) -> torch.Tensor:
        return self.attn(self.attn_norm(x), rope, cache)

    def mlp_update(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.mlp_norm(x))

    def forward(self, x: torch.Tensor, rope, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn_update(x, rope, cache)
        return x + self.mlp_update(x)
