"""LoopedLM: embed -> prelude -> loop x r -> coda -> norm -> LM head.

One class covers the standard transformer (r = 1), the looped model with linear, additive or
passthrough injection, truncated BPTT, Huginn's sampled recurrences, and the hyper-connection
variants (Hyperloop, lanes, mHC). How the loop's state enters and leaves each recurrence is a
loop variant (loops.py, hyper.py): `_run_loop` is a plain loop over its start, step and finish.
Activation checkpointing and compilation are applied from outside (train/parallelize.py) through
two seams, `run_layer` and `run_recurrence`, that run one layer and one recurrence. For
incremental decoding a `KVCache` (blocks.py) is threaded through every attention call.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megaloop.config import ModelConfig
from megaloop.errors import ConfigError
from megaloop.model.blocks import MLP, Attention, Block, KVCache, RMSNorm, Rotary
from megaloop.model.early_exit import EarlyExit, decode_with_early_exit
from megaloop.model.hyper import DynamicGates, Hyperloop, Lanes, MHCBlock, expand_streams
from megaloop.model.loops import Additive, Body, LinearInjection, LoopVariant, Passthrough

RECURRENCE_SIGMA = 0.5  # Huginn's log-normal spread of the sampled recurrence count


def _normal_(weight: torch.Tensor, std: float) -> None:
    """`nn.init.normal_`'s numbers on the CPU (the same draws), written to `weight` anywhere."""
    weight.copy_(torch.empty(weight.shape, dtype=weight.dtype).normal_(0.0, std))


def _uniform_(weight: torch.Tensor, std: float) -> None:
    """Uniform with standard deviation `std` (bound √3 std: no outliers), drawn on the CPU."""
    bound = 3 ** 0.5 * std
    weight.copy_(torch.empty(weight.shape, dtype=weight.dtype).uniform_(-bound, bound))


class LoopedLM(nn.Module):
    def __init__(self, cfg: ModelConfig, init_weights: bool = True):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.embed_norm = RMSNorm(d) if cfg.embedding_norm else None
        self.prelude = self._stack(cfg.prelude_layers)
        self.loop = self._stack(cfg.loop_layers)
        self.coda = self._stack(cfg.coda_layers)
        linear_injection = cfg.is_looped and cfg.injection == "linear"
        self.injection = LinearInjection(d) if linear_injection else None
        self.loop_norm = RMSNorm(d) if cfg.has_loop_norm else None
        self.hyper = None
        if cfg.hyper == "hyperloop":
            self.hyper = Hyperloop(cfg.hyper_streams, d, cfg.recurrences, cfg.hyper_write)
        elif cfg.hyper == "lanes":
            self.hyper = Lanes(cfg.hyper_streams, cfg.recurrences,
                               whole_output=self.loop_norm is not None)
        self._plain_variant = Additive() if cfg.is_looped and cfg.injection == "additive" \
            else Passthrough()
        self.final_norm = RMSNorm(d)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(d, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.dim_per_head, cfg.max_seq_len, cfg.rope_theta)
        if init_weights:  # False under ZeRO-3's zero.Init: the engine initialises gathered weights
            self.reset_parameters()

    def _stack(self, n_layers: int) -> nn.ModuleList:
        cfg = self.cfg
        if cfg.hyper == "mhc":
            return nn.ModuleList(MHCBlock(Block(cfg), cfg.hyper_streams, cfg.d_model)
                                 for _ in range(n_layers))
        return nn.ModuleList(Block(cfg) for _ in range(n_layers))

    def reset_parameters(self, gather: Callable[[list[nn.Parameter]], Any] | None = None) -> None:
        """Initialise every weight, one module at a time in a fixed order.

        `gather(params)` is a context manager that makes sharded parameters whole while they are
        written (ZeRO-3's GatheredParameters, see train/engine.py); None for a plain model."""
        for module in self.modules():
            if self._initialises(module):
                with gather(list(module.parameters())) if gather else contextlib.nullcontext():
                    self._init_module(module)

    def _initialises(self, module: nn.Module) -> bool:
        return (isinstance(module, (Attention, MLP, DynamicGates))
                or any(module is m for m in (self.embed, self.lm_head, self.injection)))

    @torch.no_grad()
    def _init_module(self, module: nn.Module) -> None:
        """`model.init`, module by module; linear injection [I | 0] in both. Drawn from the CPU
        generator whatever the device, so the seed gives the same weights to a model made on
        the CPU and moved (ZeRO 0-2) and to one made on the GPU under zero.Init (ZeRO-3).

        gpt2: normal(0.02), residual output projections scaled by the effective depth.
        isodepth (the paper's code): every block matrix uniform with std 1/√fan_in (1/√d, the
        MLP's down-projection 1/√(4d)), the embedding N(0, 1), the LM head N(0, 0.001). Under
        MuonH these norms are the matrices' spheres for the whole run."""
        if module is self.injection:  # u = e at the start of training
            d = self.cfg.d_model
            module.weight.zero_()
            module.weight[:, :d].copy_(torch.eye(d))
        elif self.cfg.init == "isodepth" and not isinstance(module, DynamicGates):
            if module is self.embed:
                _normal_(module.weight, std=1.0)
            elif module is self.lm_head:
                _normal_(module.weight, std=0.001)
            else:  # Attention, MLP
                for linear in (m for m in module.modules() if isinstance(m, nn.Linear)):
                    _uniform_(linear.weight, std=linear.in_features ** -0.5)
        else:
            self._init_gpt2(module)

    def _init_gpt2(self, module: nn.Module) -> None:
        std = 0.02
        residual_std = std / math.sqrt(2 * self.cfg.effective_depth)
        if module is self.embed or module is self.lm_head:
            _normal_(module.weight, std=std)
        elif isinstance(module, Attention):
            _normal_(module.qkv.weight, std=std)
            _normal_(module.out.weight, std=residual_std)
        elif isinstance(module, MLP):
            _normal_(module.inp.weight, std=std)
            _normal_(module.out.weight, std=residual_std)
        elif isinstance(module, DynamicGates):
            _normal_(module.proj.weight, std=std)

    def recurrences_for_step(self, step: int, seed: int = 0) -> int:
        """r for a training step: fixed, or drawn Poisson log-normal from a step-seeded generator
        so that every rank draws the same r in the same step."""
        cfg = self.cfg
        if cfg.recurrence_sampling == "fixed":
            return cfg.recurrences
        generator = torch.Generator().manual_seed(1_000_003 * seed + step)
        mean = float(cfg.recurrences)
        tau = torch.normal(math.log(mean) - RECURRENCE_SIGMA**2 / 2, RECURRENCE_SIGMA, (1,),
                           generator=generator)
        r = int(torch.poisson(tau.exp(), generator=generator).item())
        return max(1, min(r, 4 * cfg.recurrences))

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                recurrences: int | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, V), or the mean cross-entropy when targets are given (-1 is ignored).

        With a `cache` (see `new_cache`), `tokens` continue the positions cached so far and the
        cache is extended by them."""
        r = self.check_recurrences(recurrences)
        seq_len = tokens.shape[1]
        start = 0 if cache is None else cache.begin(seq_len, r)
        if start + seq_len > self.cfg.max_seq_len:
            raise ConfigError(f"Sequence length {start + seq_len} exceeds model.max_seq_len = "
                              f"{self.cfg.max_seq_len}; raise max_seq_len or shorten the input.")
        x = self.embed(tokens)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        rope = self.rotary(seq_len, x.dtype, start)
        if self.cfg.hyper == "mhc":
            x = expand_streams(x, self.cfg.hyper_streams)
        x = self._run_stack(self.prelude, x, rope, cache)
        decoding = (cache is not None and cache.early_exit is not None and seq_len == 1
                    and start > 0)  # a prompt (even of one token) runs every recurrence
        if decoding and r > 1 and self.loop and not torch.is_grad_enabled():
            logits = decode_with_early_exit(self, x, rope, r, cache)
        else:
            logits = self.output(self._run_loop(x, rope, r, cache), rope, r, cache)
            if decoding:  # nothing to exit from (r = 1, no loop): every row ran all r
                cache.recurrences_used.append(torch.full((x.shape[0],), r))
        if cache is not None:
            cache.end(seq_len)
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)

    def new_cache(self, kv_budget: int | None = None,
                  early_exit: EarlyExit | None = None) -> KVCache:
        """An empty KV cache for incremental decoding of up to model.max_seq_len positions;
        `kv_budget`: keep the last k recurrences' keys (KVCache); `early_exit`: stop each
        decoded token's recurrences by this rule (model/early_exit.py)."""
        return KVCache(self.cfg.max_seq_len, kv_budget, early_exit)

    def output(self, x: torch.Tensor, rope, r: int, cache: KVCache | None = None
               ) -> torch.Tensor:
        """The logits of the loop's output `x`: coda, final norm, LM head."""
        if cache is not None:
            cache.seek(self.recurrence_slot(cache.loop_slots(r)))  # the coda's, after the loop's
        x = self._run_stack(self.coda, x, rope, cache)
        if self.cfg.hyper == "mhc":
            x = x.mean(dim=-2)
        x = self.final_norm(x)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, weight).float()  # soft-cap and loss in fp32, also under autocast
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def check_recurrences(self, recurrences: int | None) -> int:
        """The r a forward pass runs (None: the configured r); ConfigError for an r this model
        cannot run."""
        r = self.cfg.recurrences if recurrences is None else int(recurrences)
        if r < 1:
            raise ConfigError(f"recurrences = {r} must be >= 1.")
        if r != self.cfg.recurrences and self.hyper is not None:
            raise ConfigError(f"model.hyper = {self.cfg.hyper} has parameters for exactly "
                              f"{self.cfg.recurrences} recurrences; it cannot run {r}.")
        if r > 1 and not self.loop:
            raise ConfigError(f"recurrences = {r} but the model has no loop layers.")
        return r

    # ---- the two seams of train/parallelize.py ----------------------------------------------

    def run_layer(self, layer: nn.Module, x: torch.Tensor, rope,
                  cache: KVCache | None = None) -> torch.Tensor:
        """One transformer layer (apply_ac's per_layer checkpointing wraps this)."""
        return layer(x, rope, cache)

    def run_recurrence(self, variant: LoopVariant, state: Any, index: int, body: Body,
                       cache: KVCache | None = None) -> Any:
        """One recurrence of the loop (apply_ac's per_recurrence checkpointing wraps this);
        `body` already holds `cache`, which is given to say that one is being filled."""
        return variant.step(state, index, body)

    # ---- the loop ---------------------------------------------------------------------------

    def loop_variant(self) -> LoopVariant:
        """The hyper-connection, else the linear injection, else additive or passthrough."""
        if self.hyper is not None:
            return self.hyper
        return self.injection if self.injection is not None else self._plain_variant

    def _run_stack(self, stack: nn.ModuleList, x: torch.Tensor, rope,
                   cache: KVCache | None = None) -> torch.Tensor:
        for layer in stack:
            x = self.run_layer(layer, x, rope, cache=cache)
        return x

    def _run_loop(self, e: torch.Tensor, rope, r: int,
                  cache: KVCache | None = None) -> torch.Tensor:
        """r recurrences of the loop block; only the last k (bptt_k) build an autograd graph."""
        if not self.loop:
            return e
        k = r if self.cfg.bptt_k is None else min(self.cfg.bptt_k, r)
        grad_on = torch.is_grad_enabled()
        variant, body = self.loop_variant(), self.loop_body(rope, cache)
        state = variant.start(e)
        for i in range(r):
            if cache is not None:  # recurrence i's slots: i mod the budget
                cache.seek(self.recurrence_slot(i % cache.loop_slots(r)))
            with torch.set_grad_enabled(grad_on and i >= r - k):
                state = self.run_recurrence(variant, state, i, body, cache=cache)
        return variant.finish(state)

    def recurrence_slot(self, kept: int) -> int:
        """The cache slot of the first loop layer in the `kept`-th kept recurrence: the prelude's
        slots come first, then one per loop layer and kept recurrence, then the coda's."""
        return len(self.prelude) + len(self.loop) * kept

    def loop_body(self, rope, cache: KVCache | None = None) -> Body:
        """body(u): the loop's layers once on u, then the recurrence norm where there is one."""
        def body(u: torch.Tensor) -> torch.Tensor:
            out = self._run_stack(self.loop, u, rope, cache)
            return self.loop_norm(out) if self.loop_norm is not None else out

        return body


def build(cfg: ModelConfig, device: str | torch.device | None = None,
          init_weights: bool = True) -> LoopedLM:
    """Build a model from a validated config (on `device`, default the current one)."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return LoopedLM(cfg, init_weights=init_weights)
