"""The KV cache: logits of incremental decoding equal the full forward pass for every variant of
the loop, and generation with the cache equals generation without it (greedy and seeded)."""

from __future__ import annotations

import pytest
import torch
from tiny import VARIANTS, make_model, random_tokens

from megaloop.errors import ConfigError
from megaloop.infer.generate import Sampling, generate
from megaloop.model.blocks import sdpa_attention
from megaloop.model.early_exit import EarlyExit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_logits_equal_the_full_forward(variant):
    model = make_model(perturb=0.05, **VARIANTS[variant]).eval()
    tokens = random_tokens(batch=2, seq=20)
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        # a prompt, single tokens, then a chunk of several positions after cached ones
        pieces = [tokens[:, :7], tokens[:, 7:8], tokens[:, 8:9], tokens[:, 9:14], tokens[:, 14:]]
        stepped = torch.cat([model(piece, cache=cache) for piece in pieces], dim=1)
    assert cache.length == 20
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["plain", "linear_r3", "hyperloop", "mhc"])
@pytest.mark.parametrize("sampling", [Sampling(max_new_tokens=8, temperature=0),
                                      Sampling(max_new_tokens=8, temperature=0.9, top_k=16,
                                               seed=7)], ids=["greedy", "seeded"])
def test_generation_with_the_cache_equals_generation_without(variant, sampling):
    model = make_model(perturb=0.05, **VARIANTS[variant]).eval()
    prompt = [5, 9, 11, 3]
    cached = generate(model, prompt, sampling, eos_id=None, use_cache=True)["tokens"]
    uncached = generate(model, prompt, sampling, eos_id=None, use_cache=False)["tokens"]
    assert cached == uncached and len(cached) == 8
    assert generate(model, prompt, sampling, eos_id=None)["tokens"] == cached  # same seed


def test_the_seed_decides_the_sample():
    model = make_model(perturb=0.05, recurrences=3, injection="linear").eval()
    runs = [generate(model, [1, 2, 3], Sampling(max_new_tokens=12, seed=seed),
                     eos_id=None)["tokens"] for seed in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_generation_stops_at_eos_and_runs_at_other_recurrences():
    model = make_model(perturb=0.05, recurrences=2, injection="linear").eval()
    endless = Sampling(max_new_tokens=8, temperature=0, stop_at_eos=False)
    for eos in range(64):  # an EOS id that greedy decoding emits after the EOS-prefixed prompt
        tokens = generate(model, [4, 5], endless, eos_id=eos)["tokens"]
        if eos in tokens:
            break
    stopped = generate(model, [4, 5], Sampling(max_new_tokens=8, temperature=0), eos_id=eos)
    assert stopped["tokens"] == tokens[:tokens.index(eos) + 1]
    deeper = Sampling(max_new_tokens=6, temperature=0, recurrences=5)
    assert generate(model, [4, 5], deeper, eos_id=None)["tokens"] == \
        generate(model, [4, 5], deeper, eos_id=None, use_cache=False)["tokens"]


def test_a_cache_is_tied_to_its_recurrences_and_length():
    model = make_model(recurrences=2, injection="linear").eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(random_tokens(1, 30), cache=cache)
        with pytest.raises(ConfigError, match="filled with 2 recurrences"):
            model(random_tokens(1, 1), recurrences=3, cache=cache)
        with pytest.raises(ConfigError, match="max_seq_len"):
            model(random_tokens(1, 3), cache=cache)
    with pytest.raises(ConfigError, match="exceed model.max_seq_len"):
        generate(model, list(range(20)), Sampling(max_new_tokens=20), eos_id=None)
    with pytest.raises(ConfigError, match="below 1"):
        generate(model, [1], Sampling(recurrences=0), eos_id=None)


def test_attention_over_cached_keys_is_causal_from_the_last_key():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    got = sdpa_attention(q, k, v)
    keys, values = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = q @ keys.transpose(-1, -2) / 8 ** 0.5
    allowed = torch.ones(3, 7, dtype=torch.bool).tril(4)  # query i sits at key position 4 + i
    want = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ values
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(sdpa_attention(q[:, :, -1:], k, v), want[:, :, -1:], atol=1e-6,
                               rtol=0)


# ---- test-time compute: KV budget and early exit ----------------------------------------------

LOOPED = ["linear_r3", "additive_r3", "passthrough_r3", "hyperloop", "lanes", "mhc_looped"]


@pytest.mark.parametrize("variant", LOOPED)
def test_a_kv_budget_keeps_the_prompt_exact_and_fewer_slots(variant):
    model = make_model(perturb=0.05, **VARIANTS[variant]).eval()
    tokens = random_tokens(batch=2, seq=12)
    r = model.cfg.recurrences
    with torch.no_grad():
        full = model(tokens)
        whole, budget = model.new_cache(), model.new_cache(kv_budget=1)
        torch.testing.assert_close(model(tokens[:, :8], cache=budget), full[:, :8], atol=1e-5,
                                   rtol=0)
        model(tokens[:, :8], cache=whole)
        assert len(budget.slots) == len(whole.slots) - (r - 1) * len(model.loop)
        same = model.new_cache(kv_budget=r)  # a budget of r is no budget
        model(tokens[:, :8], cache=same)
        for step in range(8, 12):
            token = tokens[:, step:step + 1]
            torch.testing.assert_close(model(token, cache=same), model(token, cache=whole),
                                       atol=1e-6, rtol=0)
            approximate = model(token, cache=budget)
            assert torch.isfinite(approximate).all()
        assert (approximate - full[:, 11:]).abs().max() > 1e-6  # older keys of another depth


def decode(model, tokens, prompt_len, **cache_settings):
    """Logits of each single-token step after a prompt, and the cache."""
    cache = model.new_cache(**cache_settings)
    with torch.no_grad():
        model(tokens[:, :prompt_len], cache=cache)
        steps = [model(tokens[:, i:i + 1], cache=cache) for i in range(prompt_len,
                                                                        tokens.shape[1])]
    return torch.cat(steps, dim=1), cache


@pytest.mark.parametrize("criterion", ["latent", "kl"])
@pytest.mark.parametrize("variant", LOOPED)
def test_early_exit_at_threshold_0_is_the_full_recurrence(variant, criterion):
    model = make_model(perturb=0.05, **VARIANTS[variant]).eval()
    tokens = random_tokens(batch=2, seq=12)
    full, _ = decode(model, tokens, 6)
    never, cache = decode(model, tokens, 6, early_exit=EarlyExit(criterion, 0.0))
    torch.testing.assert_close(never, full, atol=1e-5, rtol=0)
    assert all(used.tolist() == [model.cfg.recurrences] * 2 for used in cache.recurrences_used)


@pytest.mark.parametrize("criterion, earliest", [("latent", 1), ("kl", 2)])
def test_an_exited_token_costs_fewer_recurrences_and_leaves_its_last_keys(criterion, earliest):
    model = make_model(perturb=0.05, recurrences=4, injection="linear").eval()
    tokens = random_tokens(batch=1, seq=10)
    _, cache = decode(model, tokens, 6, early_exit=EarlyExit(criterion, float("inf")))
    assert [used.tolist() for used in cache.recurrences_used] == [[earliest]] * 4
    first, loop = len(model.prelude), len(model.loop)
    for layer in range(loop):  # the skipped recurrences' slots hold the last one's keys
        last = cache.slots[first + loop * (earliest - 1) + layer][0][:, :, 6:10]
        for skipped in range(earliest, 4):
            assert torch.equal(cache.slots[first + loop * skipped + layer][0][:, :, 6:10], last)


@pytest.mark.parametrize("criterion", ["latent", "kl"])
@pytest.mark.parametrize("variant", ["linear_r3", "hyperloop", "lanes"])
def test_rows_that_exit_at_different_recurrences_equal_each_row_alone(variant, criterion):
    """Exit times differ between rows (a threshold between their changes): the batch gives each
    row what decoding it alone gives, so the rows left iterating see only their own keys."""
    model = make_model(perturb=0.3, **{**VARIANTS[variant], "recurrences": 6}).eval()
    tokens = random_tokens(batch=3, seq=10)
    rules = [EarlyExit(criterion, float(threshold)) for threshold in torch.logspace(-4, 1, 16)]
    mixed = False
    for rule in rules:
        batched, cache = decode(model, tokens, 5, early_exit=rule)
        used = torch.stack(cache.recurrences_used)
        mixed |= len(set(used.flatten().tolist())) > 1
        for row in range(3):
            alone, alone_cache = decode(model, tokens[row:row + 1], 5, early_exit=rule)
            torch.testing.assert_close(batched[row:row + 1], alone, atol=1e-4, rtol=1e-5)
            assert torch.equal(torch.stack(alone_cache.recurrences_used)[:, 0], used[:, row])
    assert mixed, "no threshold made the rows exit at different times"


def test_generate_reports_recurrences_per_token_and_refuses_settings_without_a_cache():
    model = make_model(perturb=0.05, recurrences=4, injection="linear").eval()
    greedy = Sampling(max_new_tokens=6, temperature=0)
    full = generate(model, [4, 5, 6], greedy, eos_id=None)
    exiting = generate(model, [4, 5, 6], Sampling(max_new_tokens=6, temperature=0,
                                                  early_exit="latent", exit_threshold=1e9),
                       eos_id=None)
    assert exiting["recurrences_per_token"] == pytest.approx((4 + 5 * 1) / 6)
    never = generate(model, [4, 5, 6], Sampling(max_new_tokens=6, temperature=0,
                                                early_exit="kl", exit_threshold=0.0),
                     eos_id=None)
    assert never["tokens"] == full["tokens"] and never["recurrences_per_token"] == 4
    with pytest.raises(ConfigError, match="drop --no-cache"):
        generate(model, [4], Sampling(max_new_tokens=4, kv_budget=1), eos_id=None,
                 use_cache=False)
    with pytest.raises(ConfigError, match="choose one of latent, kl"):
        generate(model, [4], Sampling(early_exit="entropy"), eos_id=None)


def test_a_one_token_prompt_runs_every_recurrence_and_r_1_reports_one_per_token():
    model = make_model(perturb=0.05, recurrences=4, injection="linear").eval()
    eager = Sampling(max_new_tokens=5, temperature=0, early_exit="latent", exit_threshold=1e9)
    started = generate(model, [7], eager, eos_id=None)  # the prompt is one token, no start one
    assert started["recurrences_per_token"] == pytest.approx((4 + 4 * 1) / 5)
    shallow = Sampling(max_new_tokens=5, temperature=0, recurrences=1, early_exit="kl",
                       exit_threshold=1e9)
    assert generate(model, [7, 8], shallow, eos_id=None)["recurrences_per_token"] == 1
