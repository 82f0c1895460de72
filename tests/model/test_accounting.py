"""Parameter groups against the papers and a real model; training FLOPs per token by hand."""

from __future__ import annotations

import resource
import time

import pytest
import torch
from tiny import RUN_CONFIGS, VARIANTS, make_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megaloop import config
from megaloop.model import LoopedLM
from megaloop.model.accounting import (
    GROUPS,
    account,
    count_parameters,
    executed_flops_per_token,
    place,
)

# (run config, what the paper counts, millions). Hyperloop paper: all parameters but the input
# embedding (LM head included). Iso-depth paper: unique non-embedding parameters, n_once + n_rec.
PAPER_COUNTS = [
    ("hyperloop-d1024-transformer", "non_embedding", 238.0),
    ("hyperloop-d1024-mhc", "non_embedding", 241.0),
    ("hyperloop-d1024-looped", "non_embedding", 135.5),
    ("hyperloop-d1024-hyperloop", "non_embedding", 135.7),
    ("hyperloop-d2048-transformer", "non_embedding", 990.5),
    ("hyperloop-d2048-looped", "non_embedding", 579.4),
    ("hyperloop-d2048-hyperloop", "non_embedding", 579.7),
    ("hyperloop-d2048-transformer-depth38", "non_embedding", 2018.0),
    ("hyperloop-d2048-hyperloop-depth38", "non_embedding", 990.8),
    ("isodepth-s10-r1", "unique", 98.3),
    ("isodepth-s10-r2", "unique", 59.8),
    ("isodepth-s10-r4", "unique", 40.2),
    ("isodepth-s10-r8", "unique", 30.3),
]

ALL_RUNS = sorted(path.stem for path in RUN_CONFIGS.glob("*.yaml"))


def run_config(name: str):
    return config.load(RUN_CONFIGS / f"{name}.yaml").model


def paper_metric(counts: dict, metric: str) -> float:
    if metric == "non_embedding":
        return counts["total"] - counts["embedding"]
    return counts["n_once"] + counts["n_rec"]


@pytest.mark.parametrize("name, metric, millions", PAPER_COUNTS, ids=[c[0] for c in PAPER_COUNTS])
def test_counts_match_the_papers(name, metric, millions):
    counted = paper_metric(account(run_config(name)), metric) / 1e6
    assert counted == pytest.approx(millions, rel=5e-3)


def test_every_paper_config_is_counted():
    assert {name for name, _, _ in PAPER_COUNTS} == set(ALL_RUNS) - {"tiny"}


@pytest.mark.parametrize("name", ALL_RUNS)
def test_group_invariants(name):
    cfg = run_config(name)
    counts = account(cfg)
    assert counts["total"] == sum(counts[group] for group in GROUPS)
    assert counts["n_once"] + counts["n_rec"] + counts["embedding"] + counts["lm_head"] == (
        counts["total"])
    assert counts["embedding"] == cfg.vocab_size * cfg.d_model
    if not cfg.is_looped:
        assert counts["injection"] == 0
    if cfg.loop_layers == 0:
        assert counts["n_rec"] == 0


def test_tied_embeddings_have_no_lm_head(tiny_config):
    tied, untied = account(tiny_config(tie_embeddings=True)), account(tiny_config())
    assert tied["lm_head"] == 0 and untied["lm_head"] == 64 * 32
    assert tied["total"] == untied["total"] - 64 * 32


# ---- against a real model and a hand count ----------------------------------------------------

def block_parameters(cfg) -> int:
    d, hd = cfg.d_model, cfg.dim_per_head
    q, kv = cfg.n_heads * hd, cfg.kv_heads * hd
    attention = d * (q + 2 * kv) + q * d + (2 * hd if cfg.qk_norm else 0)
    mlp_in = 2 * cfg.mlp_hidden if cfg.mlp == "swiglu" else cfg.mlp_hidden
    return attention + d * mlp_in + cfg.mlp_hidden * d + 2 * d  # + the two block norms


def hyperloop_parameters(n: int, d: int) -> int:
    """Per loop: RMSNorm(n d), W (n d -> 3n), bias 3n, alpha 3, loop embedding d."""
    return n * d + n * d * 3 * n + 3 * n + 3 + d


@pytest.mark.parametrize("variant", ["plain", "linear_r3", "gqa_qknorm_softcap", "hyperloop",
                                     "lanes", "mhc", "mhc_looped"])
def test_account_matches_a_real_model(variant):
    cfg = make_config(**VARIANTS[variant])
    model = LoopedLM(cfg)
    counts = account(cfg)
    real = count_parameters(model)
    assert {k: v for k, v in real.items() if not k.startswith("_")} == {
        k: v for k, v in counts.items() if k != "flops_per_token"}
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["hyper"] == sum(p.numel() for n, p in model.named_parameters()
                                  if n.startswith("hyper.") or "_hc." in n)


@pytest.mark.parametrize("variant", ["plain", "linear_r3", "gqa_qknorm_softcap", "hyperloop"])
def test_groups_by_hand(variant):
    cfg = make_config(**VARIANTS[variant])
    counts, block, d = account(cfg), block_parameters(cfg), cfg.d_model
    linear = cfg.is_looped and cfg.injection == "linear"
    hyper = cfg.recurrences * hyperloop_parameters(4, d) if cfg.hyper == "hyperloop" else 0
    assert counts["prelude"] == cfg.prelude_layers * block
    assert counts["loop"] == cfg.loop_layers * block
    assert counts["coda"] == cfg.coda_layers * block
    assert counts["injection"] == (2 * d * d if linear else 0)
    assert counts["norms"] == d * (2 if linear else 1)
    assert counts["hyper"] == hyper
    assert counts["n_once"] == (cfg.prelude_layers + cfg.coda_layers) * block + d
    assert counts["n_rec"] == cfg.loop_layers * block + counts["injection"] + hyper + d * linear


# ---- FLOPs per token --------------------------------------------------------------------------

def attention_flops(cfg, layers_backprop: int, layers_forward: int) -> int:
    return cfg.max_seq_len * cfg.d_model * (12 * layers_backprop + 4 * layers_forward)


def test_flops_of_full_backprop():
    cfg = make_config(**VARIANTS["linear_r3"])
    counts, r = account(cfg), cfg.recurrences
    head = cfg.vocab_size * cfg.d_model
    expected = (6 * (counts["n_once"] + r * counts["n_rec"] + head)
                + 12 * cfg.effective_depth * cfg.max_seq_len * cfg.d_model)
    assert counts["flops_per_token"] == pytest.approx(expected, rel=1e-12)


def test_flops_of_an_unlooped_transformer_is_6n_plus_attention():
    cfg = make_config(loop_layers=0, prelude_layers=3, tie_embeddings=True)
    counts = account(cfg)
    non_embedding_with_head = counts["n_once"] + cfg.vocab_size * cfg.d_model
    expected = 6 * non_embedding_with_head + attention_flops(cfg, 4, 0)
    assert counts["flops_per_token"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("k", [1, 2])
def test_flops_of_truncated_bptt(k):
    full = make_config(**VARIANTS["linear_r3"])
    cfg = make_config(**VARIANTS["linear_r3"], bptt_k=k)
    counts, r, head = account(cfg), cfg.recurrences, cfg.vocab_size * cfg.d_model
    backprop_layers = cfg.prelude_layers + cfg.coda_layers + k * cfg.loop_layers
    expected = (6 * (counts["n_once"] + k * counts["n_rec"] + head) + 2 * (r - k) * counts["n_rec"]
                + attention_flops(cfg, backprop_layers, (r - k) * cfg.loop_layers))
    assert counts["flops_per_token"] == pytest.approx(expected, rel=1e-12)
    assert counts["flops_per_token"] < account(full)["flops_per_token"]


def test_flops_of_hyperloop_count_each_loop_once():
    """Loop-specific parameters run once per token each; the shared block runs r times."""
    cfg = make_config(**VARIANTS["hyperloop"])
    counts, r, head = account(cfg), cfg.recurrences, cfg.vocab_size * cfg.d_model
    k = r
    shared, per_loop = counts["loop"], counts["hyper"] // r
    backprop = counts["n_once"] + head + k * (shared + per_loop)
    forward_only = (r - k) * (shared + per_loop)
    backprop_layers = cfg.prelude_layers + cfg.coda_layers + k * cfg.loop_layers
    expected = (6 * backprop + 2 * forward_only
                + attention_flops(cfg, backprop_layers, (r - k) * cfg.loop_layers))
    assert counts["flops_per_token"] == pytest.approx(expected, rel=1e-12)


def test_flops_follow_the_paper_formula_at_s10():
    """RESEARCH.md: F = 6 (N executed per token + head) + 12 L_eff T d, with L_eff = 20."""
    for r in (1, 2, 4, 8):
        cfg = run_config(f"isodepth-s10-r{r}")
        counts = account(cfg)
        executed = counts["n_once"] + r * counts["n_rec"] + cfg.vocab_size * cfg.d_model
        expected = 6 * executed + 12 * 20 * cfg.max_seq_len * cfg.d_model
        assert counts["flops_per_token"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("variant, bptt_k", [
    ("plain", None), ("linear_r3", None), ("linear_r3", 1), ("additive_r3", None),
    ("additive_r3", 2),
    ("passthrough_r3", None), ("gqa_qknorm_softcap", None)])
def test_executed_flops_are_what_torch_counts(variant, bptt_k):
    """torch's FlopCounterMode over a real forward and backward counts every matmul (attention
    too, on SDPA's math backend). The convention also counts each norm gain, a 1-D parameter, at
    6 FLOPs per token, where the model multiplies elementwise; nothing else may differ."""
    cfg = make_config(**VARIANTS[variant], **({"bptt_k": bptt_k} if bptt_k else {}))
    model = LoopedLM(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens, tokens).backward()
    counted = counter.get_total_flops() / tokens.numel()
    r, k = cfg.recurrences, cfg.grad_recurrences
    uses = {"shared": 6 * k + 2 * (r - k), "once": 6}
    gains = sum(p.numel() * uses[place(name).role]
                for name, p in model.named_parameters() if p.ndim == 1)
    assert counted == pytest.approx(executed_flops_per_token(cfg) - gains, rel=1e-12)
    if cfg.injection == "linear" and r > 1:
        assert executed_flops_per_token(cfg) < account(cfg)["flops_per_token"]


# ---- the meta device ---------------------------------------------------------------------------

def test_two_billion_parameters_are_counted_without_memory():
    cfg = run_config("hyperloop-d2048-transformer-depth38")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    counts = account(cfg)
    elapsed = time.perf_counter() - start
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert counts["total"] > 2e9  # 8 GB in fp32 had it been allocated
    assert elapsed < 10
    assert grown_mib < 512


def test_account_leaves_the_default_device_alone():
    account(make_config())
    assert torch.empty(1).device.type == "cpu"
