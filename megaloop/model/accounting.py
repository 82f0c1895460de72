"""Parameter groups (n_once, n_rec, ...) and training FLOPs per token, counted on the meta device.

Groups (DESIGN.md): embedding, lm_head, prelude, loop, coda, injection, hyper, norms, total,
n_once, n_rec. `n_once` = non-embedding parameters executed once per token (prelude, coda, final
norm, hyper-connection parameters outside the loop); `n_rec` = parameters inside the loop (loop
blocks, injection, the per-recurrence norm, hyper-connection parameters of the loop). Neither
counts `embedding` or `lm_head`.

Training FLOPs per token (RESEARCH.md section 2):
    F = 6 * (parameters executed per token, loop counted r times, + LM head) + 12 * L_eff * T * d
where a recurrence run without gradients (truncated BPTT) costs only its forward pass: 2 FLOPs
per parameter and 4 T d per attention layer. Parameters that exist once per recurrence
(Hyperloop, lanes) run once per token each. The attention term counts every query against every
key of the sequence (the papers' convention, and PaLM's for MFU); a causal model computes about
half of it, which `causal_flops_per_token` counts instead.

`executed_flops_per_token` is what LoopedLM's training step runs under the same convention: with
linear injection it computes W_e e once per forward pass, not once per recurrence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megaloop.config import ModelConfig
from megaloop.model.looped import LoopedLM

GROUPS = ["embedding", "lm_head", "prelude", "loop", "coda", "injection", "hyper", "norms"]


@dataclass(frozen=True)
class Placement:
    group: str
    role: str  # "embedding" | "head" | "once" | "shared" (reused r times) | "per_recurrence"


def place(name: str) -> Placement:
    """Which group a parameter belongs to and how often it runs per token, from its name."""
    top = name.split(".", 1)[0]
    if top == "embed":
        return Placement("embedding", "embedding")
    if top == "lm_head":
        return Placement("lm_head", "head")
    if top in ("prelude", "coda", "loop"):
        group = "hyper" if "_hc." in name else top
        return Placement(group, "shared" if top == "loop" else "once")
    if top == "injection":
        return Placement("injection", "shared")
    if top == "loop_norm":
        return Placement("norms", "shared")
    if top in ("final_norm", "embed_norm"):
        return Placement("norms", "once")
    if top == "hyper":
        return Placement("hyper", "per_recurrence")
    raise ValueError(f"parameter {name} has no accounting placement")  # a bug: new module


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    counts = {group: 0 for group in GROUPS}
    roles = {"once": 0, "shared": 0, "per_recurrence": 0}
    for name, param in model.named_parameters():
        where = place(name)
        counts[where.group] += param.numel()
        if where.role in roles:
            roles[where.role] += param.numel()
    counts["total"] = sum(counts[g] for g in GROUPS)
    counts["n_once"] = roles["once"]
    counts["n_rec"] = roles["shared"] + roles["per_recurrence"]
    counts["_shared"] = roles["shared"]
    counts["_per_recurrence"] = roles["per_recurrence"]
    return counts


def training_flops_per_token(cfg: ModelConfig, counts: dict[str, int]) -> float:
    r, k = cfg.recurrences, cfg.grad_recurrences
    head = cfg.vocab_size * cfg.d_model  # the logits matmul runs whether or not it is tied
    shared, per_rec = counts["_shared"], counts["_per_recurrence"]
    backprop_params = counts["n_once"] + head + k * shared + per_rec * k / r
    forward_only_params = (r - k) * shared + per_rec * (r - k) / r
    return 6 * backprop_params + 2 * forward_only_params + attention_flops_per_token(cfg)


def attention_flops_per_token(cfg: ModelConfig) -> float:
    """The attention scores and their weighted sum, every query against all T keys: 12 T d
    per layer with gradients, 4 T d without."""
    r, k = cfg.recurrences, cfg.grad_recurrences
    attn_width = cfg.n_heads * cfg.dim_per_head
    attn_layers_backprop = cfg.prelude_layers + cfg.coda_layers + k * cfg.loop_layers
    attn_layers_forward = (r - k) * cfg.loop_layers
    return attn_width * cfg.max_seq_len * (12 * attn_layers_backprop + 4 * attn_layers_forward)


def causal_flops_per_token(cfg: ModelConfig) -> float:
    """`flops_per_token` with attention counted causally: query t attends to t keys, so the
    attention term is half the full count (what a causal kernel computes, the diagonal aside).
    MFU under this count is the lower, stricter figure."""
    return account(cfg)["flops_per_token"] - attention_flops_per_token(cfg) / 2


def executed_flops_per_token(cfg: ModelConfig) -> float:
    """`flops_per_token` less the matmuls that LoopedLM's training step does not run with linear
    injection: W_e e is computed once, with gradients (6 d^2), where the convention counts it in
    every recurrence (6 d^2 with gradients, 2 d^2 without); and under truncated BPTT the first
    recurrence with gradients needs no gradient of the state it receives (2 d^2 for W_s s).
    Other models without hyper-connections run what the convention counts (truncated BPTT
    needs linear or additive injection, and additive's u = s + e carries a gradient into the
    first recurrence). Hyper-connection models also run their stream mixing, O(n^2 d) per
    connection and token, which neither count includes."""
    flops = account(cfg)["flops_per_token"]
    if not (cfg.is_looped and cfg.injection == "linear"):
        return flops
    r, k, d2 = cfg.recurrences, cfg.grad_recurrences, cfg.d_model**2
    embedding_half = 6 * k * d2 + 2 * (r - k) * d2 - 6 * d2
    boundary = 2 * d2 if k < r else 0
    return flops - embedding_half - boundary


def account(cfg: ModelConfig) -> dict[str, float | int]:
    """Parameter groups and FLOPs per token of a config; the model is built on the meta device,
    so a 2B model costs no memory."""
    with torch.device("meta"):
        model = LoopedLM(cfg)
    counts = count_parameters(model)
    result: dict[str, float | int] = {k: v for k, v in counts.items() if not k.startswith("_")}
    result["flops_per_token"] = training_flops_per_token(cfg, counts)
    return result


def format_table(cfg: ModelConfig, result: dict[str, float | int], title: str = "") -> str:
    """A readable table of the parameter groups and FLOPs per token."""
    layout = (f"{cfg.prelude_layers} -> {cfg.loop_layers} x {cfg.recurrences} -> "
              f"{cfg.coda_layers}")
    lines = [f"{title}  (d_model {cfg.d_model}, layers {layout}, effective depth "
             f"{cfg.effective_depth}, hyper {cfg.hyper})".strip()]
    rows = [*GROUPS, "total", "n_once", "n_rec"]
    lines.append(f"  {'group':<12}{'parameters':>16}{'millions':>12}")
    for name in rows:
        if name == "total":
            lines.append("  " + "-" * 40)
        value = int(result[name])
        lines.append(f"  {name:<12}{value:>16,}{value / 1e6:>12.2f}")
    grad = cfg.grad_recurrences
    lines.append(f"  training FLOPs per token: {result['flops_per_token']:.4g} "
                 f"(r = {cfg.recurrences}, {grad} with gradients, sequence {cfg.max_seq_len})")
    return "\n".join(lines)
