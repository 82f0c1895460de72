"""Sampling from a trained model, with the KV cache (prompt once, then one position per token)
or without it (the whole sequence again for every token). Both give the same tokens.

Deterministic under a seed: one torch.Generator draws every sample. Temperature 0 is greedy.
Test-time compute (Sampling): `kv_budget` keeps the keys of the last k recurrences only, and
`early_exit` stops each new token's recurrences once its state (latent) or its next-token
distribution (kl) changes by less than `exit_threshold`; the result then reports the mean
recurrences per token.
The prompt follows the token the run's documents follow (EOS in stream packing), as in training;
sampling stops at the first EOS or after `max_new_tokens`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megaloop.data.dataset import document_start_id, tokenizer_path
from megaloop.data.tokenizer import Tokenizer, check_vocab
from megaloop.device import default_device
from megaloop.errors import ConfigError, DataError
from megaloop.export.weights import load_model
from megaloop.model.early_exit import EarlyExit
from megaloop.model.looped import LoopedLM


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None  # None: the whole vocabulary
    seed: int = 0
    recurrences: int | None = None  # None: the trained r
    stop_at_eos: bool = True
    kv_budget: int | None = None  # keep the last k recurrences' keys (None: all; KVCache)
    early_exit: str | None = None  # latent or kl: per-token exit (model/early_exit.py)
    exit_threshold: float = 0.0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens} must be >= 1.")
        if not self.temperature >= 0:
            raise ConfigError(f"--temperature {self.temperature} must be >= 0 (0 is greedy).")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"--top-k {self.top_k} must be >= 1.")
        if self.recurrences is not None and self.recurrences < 1:
            raise ConfigError(f"--recurrences {self.recurrences} is below 1; a model runs its "
                              "loop at least once.")
        if self.kv_budget is not None and self.kv_budget < 1:
            raise ConfigError(f"--kv-budget {self.kv_budget} must be >= 1.")
        self.exit_rule()

    def exit_rule(self) -> EarlyExit | None:
        if self.early_exit is None:
            return None
        return EarlyExit(self.early_exit, self.exit_threshold)


def sample_next(logits: torch.Tensor, sampling: Sampling,
                generator: torch.Generator) -> torch.Tensor:
    """The next token (B, 1) from the logits (B, V) of the last position."""
    logits = logits.float()
    if sampling.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


@torch.no_grad()
def generate(model: LoopedLM, prompt: list[int], sampling: Sampling, *, eos_id: int | None,
             use_cache: bool = True, start_id: int | None = None) -> dict:
    """New token ids after `prompt` (ids, without the token a document starts after, which is
    added here: `start_id`, else `eos_id`); returns {"tokens", "seconds", "tokens_per_s"}."""
    sampling.validate()
    r = model.check_recurrences(sampling.recurrences)
    start_id = eos_id if start_id is None else start_id
    context = ([start_id] if start_id is not None else []) + list(prompt)
    if not context:
        raise DataError("The prompt has no tokens; give a non-empty --prompt.")
    limit = model.cfg.max_seq_len
    if len(context) + sampling.max_new_tokens - 1 > limit:  # the last token is not read back
        raise ConfigError(f"The prompt ({len(context)} tokens with the leading start token) and "
                          f"--max-new-tokens {sampling.max_new_tokens} exceed model.max_seq_len "
                          f"= {limit}; shorten the prompt or ask for at most "
                          f"{max(limit - len(context) + 1, 0)} new tokens.")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    sequence = torch.tensor([context], dtype=torch.long, device=device)
    if not use_cache and (sampling.kv_budget is not None or sampling.early_exit is not None):
        raise ConfigError("--kv-budget and --early-exit act on the KV cache: drop --no-cache.")
    cache = model.new_cache(sampling.kv_budget, sampling.exit_rule()) if use_cache else None
    step_input = sequence
    new: list[int] = []
    start = time.perf_counter()
    for _ in range(sampling.max_new_tokens):
        logits = model(step_input if use_cache else sequence, recurrences=r, cache=cache)
        token = sample_next(logits[:, -1], sampling, generator)
        new.append(int(token.item()))
        if sampling.stop_at_eos and new[-1] == eos_id:
            break
        sequence = torch.cat([sequence, token], dim=1)
        step_input = token
    seconds = time.perf_counter() - start
    out = {"tokens": new, "seconds": seconds,
           "tokens_per_s": len(new) / seconds if seconds > 0 else None}
    if cache is not None and cache.early_exit is not None:
        # the first token comes from the prompt's pass, which runs every recurrence
        used = [r] + [int(step[0]) for step in cache.recurrences_used]
        out["recurrences_per_token"] = sum(used[:len(new)]) / len(new)
    return out


def generate_text(checkpoint: str | Path, prompt: str, sampling: Sampling, *,
                  tokenizer: str | Path | None = None, device: str | None = None,
                  use_cache: bool = True) -> dict:
    """`megaloop generate`: load the checkpoint and its tokenizer, sample a continuation."""

    sampling.validate()
    model, loaded = load_model(checkpoint, device or default_device())
    encoder = Tokenizer.load(tokenizer or tokenizer_path(loaded.config))
    check_vocab(encoder, loaded.config.model.vocab_size)
    ids = encoder.encode(prompt)
    if not ids:
        raise DataError("The prompt has no tokens; give a non-empty --prompt.")
    out = generate(model, ids, sampling, eos_id=encoder.eos_id, use_cache=use_cache,
                   start_id=document_start_id(loaded.config, encoder))
    text_ids = [t for t in out["tokens"] if t != encoder.eos_id]
    return {"checkpoint": str(loaded.path), "prompt": prompt, "text": encoder.decode(text_ids),
            "prompt_tokens": ids, **out, "recurrences": model.check_recurrences(
                sampling.recurrences), "cache": use_cache}
