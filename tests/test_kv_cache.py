"""The KV cache: logits of incremental decoding equal the full forward pass for every variant of
the loop, and generation with the cache equals generation without it (greedy and seeded)."""

from __future__ import annotations

import pytest
import torch
from tiny import VARIANTS, make_model, random_tokens

from megaloop.errors import ConfigError
from megaloop.infer.generate import Sampling, generate
from megaloop.model.blocks import sdpa_attention

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
