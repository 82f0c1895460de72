"""LoopedLM on real tiny fp32 models: causality, equality with an independent reference, truncated
BPTT, activation checkpointing, initialisations, hyper-connections, sampled r, attention, loss."""

from __future__ import annotations

import dataclasses
import statistics

import pytest
import torch
import torch.nn.functional as F
from reference import (
    ReferenceTransformer,
    causal_attention,
    rms_norm,
    stack_names,
    unrolled_order,
)
from tiny import REPO, VARIANTS, make_config, make_model, random_tokens

from megaloop.errors import ConfigError
from megaloop.model import LoopedLM
from megaloop.model.blocks import MLP, Attention, native_gqa, sdpa_attention
from megaloop.model.hyper import MHCConnection, sinkhorn
from megaloop.train.parallelize import apply_ac

VOCAB = 64


def exact(a: torch.Tensor, b: torch.Tensor, atol: float, what: str = "") -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")


def loss_and_grads(model, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {name: None if p.grad is None else p.grad.clone()
             for name, p in model.named_parameters()}
    return loss.detach(), grads


def assert_same_grads(ours: dict, theirs: dict, atol: float) -> None:
    """Equal gradients; a missing gradient (None) equals an all-zero one."""
    assert ours.keys() == theirs.keys()
    for name, grad in ours.items():
        other = theirs[name]
        if grad is None or other is None:
            present = grad if other is None else other
            assert present is None or not present.any(), f"{name}: gradient on one side only"
        else:
            exact(grad, other, atol, name)


def tokens_and_targets(seq: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = random_tokens(seq=seq + 1)
    return tokens[:, :-1].clone(), tokens[:, 1:].clone()


# ---- causality --------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("position", [1, 9])
def test_future_tokens_never_change_earlier_logits(variant, position):
    model = make_model(perturb=0.05, **VARIANTS[variant])
    tokens = random_tokens(seq=16)
    changed = tokens.clone()
    changed[:, position:] = (changed[:, position:] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    exact(after[:, :position], before[:, :position], atol=1e-6, what=variant)
    assert not torch.allclose(after[:, position], before[:, position], atol=1e-4)


# ---- equality with the reference transformer --------------------------------------------------

REFERENCE_CASES = {
    "swiglu": {},
    "relu2": {"mlp": "relu2", "mlp_ratio": 4.0},
    "gqa_qknorm_softcap": {"n_kv_heads": 2, "qk_norm": True, "logit_softcap": 3.0},
    "mqa_tied": {"n_kv_heads": 1, "tie_embeddings": True},
    "wide_heads_theta": {"head_dim": 16, "rope_theta": 500.0},
    "isodepth_norms": {"mlp": "relu2", "mlp_ratio": 4.0, "qk_norm": True,
                       "qk_norm_mode": "free_after_rope", "embedding_norm": True,
                       "init": "isodepth"},
}


def reference_of(model) -> ReferenceTransformer:
    return ReferenceTransformer(model.state_dict(), model.cfg)


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_r1_equals_plain_reference_transformer(case):
    model = make_model(perturb=0.1, **REFERENCE_CASES[case])
    tokens = random_tokens(seq=20)
    with torch.no_grad():
        ours = model(tokens)
    theirs = reference_of(model)(tokens, unrolled_order(model.cfg))
    assert theirs.std() > 0.1  # logits of a size where 1e-5 means something
    exact(ours, theirs, atol=1e-5, what=case)


@pytest.mark.parametrize("recurrences", [None, 1, 5])
def test_passthrough_loop_equals_unrolled_reference(recurrences):
    model = make_model(perturb=0.1, **VARIANTS["passthrough_r3"])
    tokens = random_tokens(seq=10)
    with torch.no_grad():
        ours = model(tokens, recurrences=recurrences)
    order = unrolled_order(model.cfg, recurrences)
    assert order.count("loop.1") == (recurrences or 3)
    exact(ours, reference_of(model)(tokens, order), atol=1e-5)


def hand_loop_logits(model, tokens, start, inject, finish) -> torch.Tensor:
    """prelude -> r x (u = inject(e, s); s = finish(loop(u))) -> coda, with reference blocks."""
    ref, cfg = reference_of(model), model.cfg
    e = ref.layers(ref.embed(tokens), stack_names("prelude", cfg.prelude_layers))
    s = start(e)
    for _ in range(cfg.recurrences):
        s = finish(ref, ref.layers(inject(ref, e, s), stack_names("loop", cfg.loop_layers)))
    return ref.logits(ref.layers(s, stack_names("coda", cfg.coda_layers)))


@pytest.mark.parametrize("injection", ["additive", "passthrough"])
def test_a_norm_after_every_recurrence_in_every_injection_mode(injection):
    """model.recurrence_norm = every: RMSNorm(loop(u)) after each recurrence, as linear
    injection always has; the parameter-free QK-norm after RoPE has no parameters to count."""
    model = make_model(perturb=0.1, recurrences=3, injection=injection, recurrence_norm="every",
                       qk_norm=True, qk_norm_mode="free_after_rope")
    assert not any("q_norm" in name for name, _ in model.named_parameters())
    tokens = random_tokens(seq=10)
    additive = injection == "additive"
    expected = hand_loop_logits(
        model, tokens, start=lambda e: torch.zeros_like(e) if additive else e,
        inject=lambda ref, e, s: s + e if additive else s,
        finish=lambda ref, s: rms_norm(s, ref.weights["loop_norm.weight"]))
    with torch.no_grad():
        exact(model(tokens), expected, atol=1e-5)
    with pytest.raises(ConfigError, match="Set model.recurrence_norm: linear"):
        make_config(recurrences=3, hyper="hyperloop", injection="passthrough",
                    recurrence_norm="every")


def papers_forward(ref: ReferenceTransformer, cfg, tokens: torch.Tensor,
                   norm_recur: bool = True) -> torch.Tensor:
    """The iso-depth paper's forward pass (kschwethelm/looped-lm-scaling, nanochat/gpt.py), from
    its equations: x = norm_emb(wte(idx)); prelude; e = x; s = None; r times: u = state
    transfer(e, s) (linear: inject([e ; s]) with s = e at first; additive: s + e from s = 0;
    passthrough: s, from e), the recurrent blocks, s = norm_recur(u); then the coda, norm_final,
    the LM head and the soft-cap. The r = 1 model runs its single pass through norm_recur too."""
    x = ref.embed(tokens)
    e = ref.layers(x, stack_names("prelude", cfg.prelude_layers))
    s = None
    for _ in range(cfg.recurrences):
        if cfg.recurrences > 1 and cfg.injection == "linear":
            u = torch.cat([e, e if s is None else s], dim=-1) @ ref.weights["injection.weight"].T
        elif cfg.recurrences > 1 and cfg.injection == "additive":
            u = (torch.zeros_like(e) if s is None else s) + e
        else:
            u = e if s is None else s
        u = ref.layers(u, stack_names("loop", cfg.loop_layers))
        s = rms_norm(u, ref.weights["loop_norm.weight"]) if norm_recur else u
    return ref.logits(ref.layers(s, stack_names("coda", cfg.coda_layers)))


PAPER_MODEL = {"recurrence_norm": "always", "embedding_norm": True, "init": "isodepth",
               "qk_norm": True, "qk_norm_mode": "free_after_rope", "mlp": "relu2",
               "mlp_ratio": 4.0, "logit_softcap": 15.0, "tie_embeddings": False}


@pytest.mark.parametrize(("layout", "injection"), [
    ((0, 4, 1, 0), "passthrough"),  # the paper's r = 1: 0-L-0 blocks, then norm_recur
    ((1, 2, 2, 1), "linear"), ((1, 1, 4, 1), "linear"), ((1, 2, 2, 1), "additive")])
def test_the_isodepth_model_is_the_papers_at_every_r(layout, injection):
    """recurrence_norm = always (the isodepth recipe's): the same weights give the logits of
    the paper's forward pass, r = 1 included, where a norm ends the single pass too."""
    prelude, loop, r, coda = layout
    model = make_model(perturb=0.1, **PAPER_MODEL, prelude_layers=prelude, loop_layers=loop,
                       recurrences=r, coda_layers=coda, injection=injection)
    assert "loop_norm.weight" in model.state_dict()
    tokens = random_tokens(seq=12)
    with torch.no_grad():
        ours = model(tokens)
    theirs = papers_forward(reference_of(model), model.cfg, tokens)
    assert theirs.std() > 0.1
    exact(ours, theirs, atol=1e-5, what=str(layout))


def test_an_r1_model_without_the_papers_norm_stays_selectable():
    """recurrence_norm = every keeps today's r = 1 model for other recipes: no norm after its
    single pass, and its logits differ from the paper's form with the same weights."""
    paper = make_model(perturb=0.1, **PAPER_MODEL, prelude_layers=0, loop_layers=4,
                       coda_layers=0, recurrences=1, injection="passthrough")
    plain = make_model(perturb=0.1, **{**PAPER_MODEL, "recurrence_norm": "every"},
                       prelude_layers=0, loop_layers=4, coda_layers=0, recurrences=1,
                       injection="passthrough")
    assert "loop_norm.weight" not in plain.state_dict()
    plain.load_state_dict({k: v for k, v in paper.state_dict().items() if k != "loop_norm.weight"})
    tokens = random_tokens(seq=12)
    with torch.no_grad():
        exact(plain(tokens), papers_forward(reference_of(plain), plain.cfg, tokens,
                                            norm_recur=False), atol=1e-5)
        assert not torch.allclose(plain(tokens), paper(tokens), atol=1e-3)


def hyperloop_by_the_papers_equations(model, tokens: torch.Tensor, write: str) -> torch.Tensor:
    """Hyperloop written out from the paper's equations with reference blocks: y = n copies of
    the begin block's output; per loop l, z = RMSNorm(flatten(y)), H_pre = sigma(a_pre W_pre z +
    b_pre), H_post = 2 sigma(...), H_res = diag(sigma(...)), y <- H_res y + H_post (F(H_pre y)
    + e_l), F the middle block's output (write = "output") or its update F - input ("update");
    the end block reads the mean of the streams."""
    ref, cfg = reference_of(model), model.cfg
    n = cfg.hyper_streams
    y = ref.layers(ref.embed(tokens), stack_names("prelude", cfg.prelude_layers))
    y = torch.stack([y] * n, dim=-2)
    for i in range(cfg.recurrences):
        w = {k[len(f"hyper.loops.{i}."):]: v for k, v in ref.weights.items()
             if k.startswith(f"hyper.loops.{i}.")}
        z = rms_norm(y.flatten(-2), w["gates.norm.weight"])
        logits = z @ w["gates.proj.weight"].T
        pre, post, res = (w["gates.alpha"][g] * logits[..., g * n:(g + 1) * n]
                          + w["gates.bias"][g * n:(g + 1) * n] for g in range(3))
        u = (torch.sigmoid(pre).unsqueeze(-1) * y).sum(dim=-2)
        out = ref.layers(u, stack_names("loop", cfg.loop_layers))
        f = (out if write == "output" else out - u) + w["loop_embedding"]
        y = torch.sigmoid(res).unsqueeze(-1) * y + 2 * torch.sigmoid(post).unsqueeze(-1) * \
            f.unsqueeze(-2)
    return ref.logits(ref.layers(y.mean(dim=-2), stack_names("coda", cfg.coda_layers)))


def test_hyperloop_writes_the_middle_blocks_output_as_the_paper_does():
    """model.hyper_write: output (the default) is the paper's y <- H_res y + H_post (F(H_pre y) +
    e_l); `update` writes F - input, megaloop's form before; the two differ."""
    model = make_model(perturb=0.1, **VARIANTS["hyperloop"])
    assert model.cfg.hyper_write == "output"
    tokens = random_tokens(seq=10)
    with torch.no_grad():
        ours = model(tokens)
        exact(ours, hyperloop_by_the_papers_equations(model, tokens, "output"), atol=1e-5)
        update = make_model(perturb=0.1, **VARIANTS["hyperloop"], hyper_write="update")
        update.load_state_dict(model.state_dict())
        exact(update(tokens), hyperloop_by_the_papers_equations(model, tokens, "update"),
              atol=1e-5)
        assert not torch.allclose(update(tokens), ours, atol=1e-3)
    with pytest.raises(ConfigError, match="Remove model.hyper_write"):
        make_config(**VARIANTS["lanes"], hyper_write="update")


def test_a_hyperloop_saved_before_hyper_write_loads_as_it_trained():
    """A config saved without model.hyper_write (an older checkpoint, export or run record)
    meant the update form; upgrade_saved says so, and leaves other models and new saves be."""
    from megaloop.config import upgrade_saved

    saved = {"model": {"hyper": "hyperloop", "recurrences": 3}, "train": {"steps": 5}}
    assert upgrade_saved(saved)["model"]["hyper_write"] == "update"
    assert "hyper_write" not in saved["model"]  # the caller's dict is left as it was
    assert upgrade_saved({"model": {"hyper": "lanes"}}) == {"model": {"hyper": "lanes"}}
    new = {"model": {"hyper": "hyperloop", "hyper_write": "output"}}
    assert upgrade_saved(new) == new


def test_the_papers_lanes_take_the_normalised_block_output():
    """lanes <- M lanes + beta (x) norm(block(u)), u = alpha . lanes (the iso-depth paper's lanes,
    model.recurrence_norm = every), against a hand-written loop of reference blocks; megaloop's
    other lanes take block(u) - u."""
    model = make_model(perturb=0.1, **{**VARIANTS["lanes"], "recurrence_norm": "every"})
    tokens = random_tokens(seq=10)
    ref, cfg = reference_of(model), model.cfg
    alpha, mix, beta = (ref.weights[f"hyper.{name}"] for name in ("read", "mix", "write"))
    e = ref.layers(ref.embed(tokens), stack_names("prelude", cfg.prelude_layers))
    lanes = [e.clone() for _ in range(cfg.hyper_streams)]
    for i in range(cfg.recurrences):
        u = sum(alpha[i, k] * lanes[k] for k in range(len(lanes)))
        out = rms_norm(ref.layers(u, stack_names("loop", cfg.loop_layers)),
                       ref.weights["loop_norm.weight"])
        lanes = [sum(mix[i, j, k] * lanes[k] for k in range(len(lanes))) + beta[i, j] * out
                 for j in range(len(lanes))]
    expected = ref.logits(ref.layers(sum(lanes), stack_names("coda", cfg.coda_layers)))
    with torch.no_grad():
        exact(model(tokens), expected, atol=1e-5)
        other = make_model(perturb=0.1, **VARIANTS["lanes"])
        other.load_state_dict({k: v for k, v in model.state_dict().items()
                               if not k.startswith("loop_norm")})
        assert not torch.allclose(other(tokens), expected, atol=1e-3)


def test_linear_injection_equals_hand_written_loop():
    model = make_model(perturb=0.1, **VARIANTS["linear_r3"])
    tokens = random_tokens(seq=10)
    expected = hand_loop_logits(
        model, tokens, start=lambda e: e,
        inject=lambda ref, e, s: torch.cat([e, s], dim=-1) @ ref.weights["injection.weight"].T,
        finish=lambda ref, s: rms_norm(s, ref.weights["loop_norm.weight"]))
    with torch.no_grad():
        exact(model(tokens), expected, atol=1e-5)


def test_additive_injection_equals_hand_written_loop():
    model = make_model(perturb=0.1, **VARIANTS["additive_r3"])
    tokens = random_tokens(seq=10)
    expected = hand_loop_logits(model, tokens, start=torch.zeros_like,
                                inject=lambda ref, e, s: s + e, finish=lambda ref, s: s)
    with torch.no_grad():
        exact(model(tokens), expected, atol=1e-5)


def test_lanes_at_init_are_a_passthrough_loop_with_k_times_the_state():
    """At init every lane holds the same state, so the coda reads K x the passthrough state."""
    model = make_model(**VARIANTS["lanes"])
    lanes = model.cfg.hyper_streams
    tokens = random_tokens(seq=10)
    ref, cfg = reference_of(model), model.cfg
    loop = stack_names("prelude", cfg.prelude_layers) + stack_names("loop", 2) * cfg.recurrences
    state = ref.layers(ref.embed(tokens), loop)
    expected = ref.logits(ref.layers(lanes * state, stack_names("coda", cfg.coda_layers)))
    with torch.no_grad():
        exact(model(tokens), expected, atol=1e-5)


# ---- truncated BPTT ---------------------------------------------------------------------------

def manual_loss(model, tokens, targets, detach_after: int | None) -> torch.Tensor:
    """The forward pass written out with the model's own modules; the loop state is detached
    after recurrence `detach_after` (None: full backpropagation)."""
    x = model.embed(tokens)
    rope = model.rotary(tokens.shape[1], x.dtype)
    for layer in model.prelude:
        x = layer(x, rope)
    e = x
    state = model.hyper.start(e) if model.hyper is not None else e
    if model.cfg.injection == "additive":
        state = torch.zeros_like(e)
    for i in range(model.cfg.recurrences):
        state = manual_recurrence(model, state, e, rope, i)
        if i == detach_after:
            state = state.detach()
    x = model.hyper.finish(state) if model.hyper is not None else state
    for layer in model.coda:
        x = layer(x, rope)
    logits = model.lm_head(model.final_norm(x))
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def manual_recurrence(model, state, e, rope, index):
    def loop(u):
        for layer in model.loop:
            u = layer(u, rope)
        return u

    if model.hyper is not None:  # Hyperloop writes the block's output (hyper_write = output)
        return model.hyper.loops[index](state, loop)
    if model.cfg.injection == "additive":
        return loop(state + e)
    if model.injection is None:
        return loop(state)
    return model.loop_norm(loop(F.linear(torch.cat([e, state], dim=-1), model.injection.weight)))


BPTT_CASES = [
    ("linear_r3", 1), ("linear_r3", 2), ("linear_r3", 3),
    ("additive_r3", 1), ("additive_r3", 2),
]


@pytest.mark.parametrize("variant, k", BPTT_CASES)
def test_truncated_bptt_equals_hand_detached_loop(variant, k):
    model = make_model(perturb=0.05, bptt_k=k, **VARIANTS[variant])
    tokens, targets = tokens_and_targets()
    r = model.cfg.recurrences
    loss, grads = loss_and_grads(model, lambda: model(tokens, targets))
    manual, manual_grads = loss_and_grads(model,
                                          lambda: manual_loss(model, tokens, targets, r - k - 1))
    exact(loss, manual, atol=1e-6)
    assert_same_grads(grads, manual_grads, atol=1e-6)


@pytest.mark.parametrize("variant", ["linear_r3", "passthrough_r3", "hyperloop"])
def test_truncation_changes_the_shared_loop_gradient(variant):
    """The hand-detached gradient differs from full backpropagation, so the test above can tell."""
    model = make_model(perturb=0.05, **VARIANTS[variant])
    tokens, targets = tokens_and_targets()
    _, full = loss_and_grads(model, lambda: model(tokens, targets))
    _, manual_full = loss_and_grads(model, lambda: manual_loss(model, tokens, targets, None))
    _, truncated = loss_and_grads(model, lambda: manual_loss(model, tokens, targets, 1))
    assert_same_grads(full, manual_full, atol=1e-6)
    name = "loop.0.attn.qkv.weight"
    assert (full[name] - truncated[name]).abs().max() > 1e-4


@pytest.mark.parametrize("variant", ["linear_r3", "additive_r3"])
def test_truncated_bptt_still_trains_the_prelude(variant):
    """Injection carries the gradient from the loop's last recurrences back to the prelude."""
    model = make_model(perturb=0.05, bptt_k=1, **VARIANTS[variant])
    tokens, targets = tokens_and_targets()
    model(tokens, targets).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.any(), f"{name} got no gradient"


def test_detached_recurrences_build_no_graph():
    """Each recurrence with gradients saves the same tensors for backward; one without saves
    none. (r = 4 and k < r, so that the first recurrence with gradients always starts from a
    detached state.)"""
    def saved_tensors(k):
        model = make_model(bptt_k=k, **{**VARIANTS["linear_r3"], "recurrences": 4})
        tokens, targets = tokens_and_targets()
        return count_saved_tensors(lambda: model(tokens, targets))

    per_recurrence = saved_tensors(2) - saved_tensors(1)
    assert per_recurrence > 0
    assert saved_tensors(3) == saved_tensors(2) + per_recurrence


# ---- activation checkpointing -----------------------------------------------------------------

CHECKPOINT_CASES = {
    "linear_r3": VARIANTS["linear_r3"],
    "linear_bptt": {**VARIANTS["linear_r3"], "bptt_k": 2},
    "hyperloop": VARIANTS["hyperloop"],
    "lanes": VARIANTS["lanes"],
    "mhc": VARIANTS["mhc"],
    "mhc_looped": VARIANTS["mhc_looped"],
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
@pytest.mark.parametrize("mode", ["per_recurrence", "per_layer"])
def test_activation_checkpointing_changes_nothing(case, mode):
    model = make_model(perturb=0.05, **CHECKPOINT_CASES[case])
    tokens, targets = tokens_and_targets()
    loss, grads = loss_and_grads(model, lambda: model(tokens, targets))
    apply_ac(model, mode)
    checkpointed_loss, checkpointed = loss_and_grads(model, lambda: model(tokens, targets))
    exact(checkpointed_loss, loss, atol=1e-6)
    assert_same_grads(checkpointed, grads, atol=1e-6)


def count_saved_tensors(run) -> int:
    """How many tensors autograd saves for backward outside checkpointed regions."""
    count = 0

    def pack(tensor):
        nonlocal count
        count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return count


@pytest.mark.parametrize("mode", ["per_recurrence", "per_layer"])
def test_activation_checkpointing_saves_fewer_tensors(mode):
    model = make_model(**VARIANTS["linear_r3"])
    tokens, targets = tokens_and_targets()
    plain = count_saved_tensors(lambda: model(tokens, targets))
    apply_ac(model, mode)
    assert count_saved_tensors(lambda: model(tokens, targets)) < plain / 2


def test_checkpointing_is_applied_from_outside_and_changes_no_names():
    """apply_ac wraps one seam of one instance: the parameter names (checkpoints, export) stay,
    a second call replaces the first, and `none` takes it off."""
    model = make_model(**VARIANTS["linear_r3"])
    names = list(model.state_dict())
    tokens, targets = tokens_and_targets()
    plain = count_saved_tensors(lambda: model(tokens, targets))
    apply_ac(model, "per_layer")
    assert list(model.state_dict()) == names
    per_layer = count_saved_tensors(lambda: model(tokens, targets))
    apply_ac(model, "per_recurrence")
    per_recurrence = count_saved_tensors(lambda: model(tokens, targets))
    assert per_layer < per_recurrence < plain
    apply_ac(model, "none")
    assert count_saved_tensors(lambda: model(tokens, targets)) == plain
    assert count_saved_tensors(lambda: make_model(**VARIANTS["linear_r3"])(tokens, targets)) \
        == plain  # other instances never had it


class Doubling:
    """A loop variant written for this test: s <- body(2 s), from s = e."""

    def start(self, e):
        return e

    def step(self, state, index, body):
        return body(2 * state)

    def finish(self, state):
        return state


def test_a_new_loop_variant_is_one_class():
    model = make_model(perturb=0.1, **VARIANTS["passthrough_r3"])
    model._plain_variant = Doubling()
    tokens = random_tokens(seq=10)
    expected = hand_loop_logits(model, tokens, start=lambda e: e,
                                inject=lambda ref, e, s: 2 * s, finish=lambda ref, s: s)
    with torch.no_grad():
        exact(model(tokens), expected, atol=1e-5)


def test_unknown_checkpointing_mode_is_refused(tiny_model):
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        apply_ac(tiny_model(), "everything")


# ---- initialisation ---------------------------------------------------------------------------

def test_linear_injection_starts_as_identity_on_e():
    model = make_model(**VARIANTS["linear_r3"])
    d = model.cfg.d_model
    assert torch.equal(model.injection.weight, torch.cat([torch.eye(d), torch.zeros(d, d)], 1))
    assert torch.equal(model.loop_norm.weight, torch.ones(d))


def test_plain_and_hyper_models_have_no_injection():
    for variant in ["plain", "additive_r3", "passthrough_r3", "hyperloop", "lanes", "mhc"]:
        assert make_model(**VARIANTS[variant]).injection is None, variant


def random_streams(n: int, d: int = 32) -> torch.Tensor:
    return torch.randn(2, 5, n, d, generator=torch.Generator().manual_seed(3))


def test_hyperloop_gates_at_init():
    model = make_model(**VARIANTS["hyperloop"])
    n = model.cfg.hyper_streams
    streams = random_streams(n)
    for loop in model.hyper.loops:
        assert torch.equal(loop.loop_embedding, torch.zeros(model.cfg.d_model))
        assert torch.allclose(loop.gates.alpha, torch.full((3,), 0.01))
        for tolerance in (1e-2, 1e-6):  # dynamic part small; then zeroed: the bias alone
            h_pre, h_post, h_res = loop.mixing(streams)
            exact(h_pre, torch.full_like(h_pre, 1 / n), tolerance, "H_pre")
            exact(h_post, torch.ones_like(h_post), tolerance, "H_post")
            exact(h_res, torch.full_like(h_res, 0.99), tolerance, "H_res")
            with torch.no_grad():
                loop.gates.proj.weight.zero_()


def test_lanes_at_init():
    model = make_model(**VARIANTS["lanes"])
    lanes, r = model.cfg.hyper_streams, model.cfg.recurrences
    for i in range(r):
        assert torch.equal(model.hyper.read[i], F.one_hot(torch.tensor(i % lanes), lanes).float())
    assert torch.equal(model.hyper.mix, torch.eye(lanes).expand(r, lanes, lanes))
    assert torch.equal(model.hyper.write, torch.ones(r, lanes))


def test_mhc_starts_near_the_identity():
    connection = MHCConnection(4, 32)
    h_pre, h_post, h_res = connection.mixing(random_streams(4))
    exact(h_pre, torch.full_like(h_pre, 0.25), 1e-2, "H_pre")
    exact(h_post, torch.ones_like(h_post), 1e-2, "H_post")
    exact(h_res, torch.eye(4).expand_as(h_res), 1e-2, "H_res")


# ---- mHC --------------------------------------------------------------------------------------

def test_mhc_residual_mixing_is_doubly_stochastic():
    torch.manual_seed(0)
    connection = MHCConnection(4, 32)
    with torch.no_grad():  # random gates far from the init
        connection.gates.proj.weight.normal_(std=0.05)
        connection.gates.bias.normal_()
        connection.gates.alpha.fill_(1.0)
    _, _, h_res = connection.mixing(random_streams(4))
    assert h_res.shape == (2, 5, 4, 4) and (h_res >= 0).all()
    exact(h_res.sum(dim=-1), torch.ones(2, 5, 4), 1e-3, "rows")
    exact(h_res.sum(dim=-2), torch.ones(2, 5, 4), 1e-3, "columns")
    off_diagonal = h_res * (1 - torch.eye(4))
    assert off_diagonal.amax() > 0.05  # really mixing, not the identity


def test_sinkhorn_converges_on_peaked_logits():
    """20 iterations (mHC's choice) are approximate on peaked logits; more iterations converge,
    so the projection itself is right. Columns are normalised last and always sum to 1."""
    logits = 2.0 * torch.randn(64, 4, 4, generator=torch.Generator().manual_seed(0))
    exact(sinkhorn(logits).sum(dim=-2), torch.ones(64, 4), 1e-6, "columns")
    converged = sinkhorn(logits, iterations=500)
    exact(converged.sum(dim=-1), torch.ones(64, 4), 1e-5, "rows")
    exact(converged.sum(dim=-2), torch.ones(64, 4), 1e-5, "columns")


# ---- hyper-connection streams in bf16 ---------------------------------------------------------

STREAM_VARIANTS = ["hyperloop", "lanes", "mhc_looped"]
R8 = {"recurrences": 8, "d_model": 64, "vocab_size": 256, "max_seq_len": 64}


def bf16_logits(model: LoopedLM, tokens: torch.Tensor) -> torch.Tensor:
    """Logits under the Engine's bf16 autocast, with SDPA's math kernel (the same on every CPU
    kernel set; the streams, not attention, are what these tests are about)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), torch.no_grad(), \
            torch.autocast("cpu", torch.bfloat16, cache_enabled=False):
        return model(tokens)


@pytest.mark.parametrize("variant", STREAM_VARIANTS)
def test_hyper_connection_streams_stay_fp32_under_bf16_autocast(variant):
    """At r = 8 every loop state (the n streams), and the input of every layer (what the loop's
    block reads from them; mHC's layers take the streams), is fp32: autocast rounds none."""
    model = make_model(perturb=0.05, **{**VARIANTS[variant], **R8})
    dtypes = []
    step, layer = model.run_recurrence, model.run_layer

    def run_recurrence(variant_, state, *args, **kwargs):
        dtypes.append(("state", state.dtype))
        out = step(variant_, state, *args, **kwargs)
        dtypes.append(("state", out.dtype))
        return out

    def run_layer(module, x, *args, **kwargs):
        dtypes.append(("layer input", x.dtype))
        return layer(module, x, *args, **kwargs)

    model.run_recurrence, model.run_layer = run_recurrence, run_layer
    bf16_logits(model, random_tokens(batch=2, seq=16, vocab=256))
    assert sum(kind == "state" for kind, _ in dtypes) == 2 * 8
    assert {dtype for _, dtype in dtypes} == {torch.float32}, dtypes


def test_fp32_streams_bring_bf16_closer_to_fp32(monkeypatch):
    """The logits of bf16 autocast against fp32 at r = 8, with the streams mixed in fp32 and, as
    before, under autocast (`stream_precision` made a no-op). Both share the bf16 matmuls of
    the blocks, which dominate the error; bf16 streams add a rounding of 2^-9 relative at
    every loop (and Hyperloop's update subtracts two such numbers). Measured on AVX512-BF16
    and under ATEN_CPU_CAPABILITY=avx2 (benchmarks/RESULTS.md): fp32 streams have 0.66-0.86x
    the error per variant, so each variant's mean over four seeds must be lower, and the mean
    over all below 0.9x."""
    import contextlib

    from megaloop.model import hyper

    errors = {"fp32 streams": {}, "bf16 streams": {}}
    for variant in STREAM_VARIANTS:
        for seed in range(4):
            model = make_model(seed=seed, perturb=0.05, **{**VARIANTS[variant], **R8})
            tokens = random_tokens(batch=4, seq=64, vocab=256, seed=seed)
            with torch.no_grad():
                want = model(tokens).double()
            for label in errors:
                with monkeypatch.context() as patch:
                    if label == "bf16 streams":
                        patch.setattr(hyper, "stream_precision",
                                      lambda streams: contextlib.nullcontext())
                    got = bf16_logits(model, tokens).double()
                error = ((got - want).norm() / want.norm()).item()
                errors[label].setdefault(variant, []).append(error)
    mean = {label: {v: sum(e) / len(e) for v, e in by.items()} for label, by in errors.items()}
    for variant in STREAM_VARIANTS:
        assert mean["fp32 streams"][variant] < mean["bf16 streams"][variant], mean
    overall = {label: sum(by.values()) / len(by) for label, by in mean.items()}
    assert overall["fp32 streams"] < 0.9 * overall["bf16 streams"], overall


def test_bf16_attention_runs_where_the_cpus_kernels_are_held_below_avx512():
    """ATEN_CPU_CAPABILITY=avx2 on a CPU with AVX512 (how CI emulates one without): SDPA's
    flash kernel refuses bf16 there, so bf16 attention takes the math kernel; a bf16 step runs
    and its loss is the default kernels' within bf16's rounding (0.02 nats: a few units in
    bf16's 8-bit mantissa on a loss of about 4)."""
    import json
    import os
    import subprocess
    import sys

    script = (
        "import json, sys, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "from tiny import make_model, random_tokens\n"
        "model = make_model(perturb=0.05, recurrences=2, injection='linear')\n"
        "tokens = random_tokens(seq=17)\n"
        "with torch.autocast('cpu', torch.bfloat16, cache_enabled=False):\n"
        "    loss = model(tokens[:, :-1], tokens[:, 1:])\n"
        "loss.backward()\n"
        "print(json.dumps({'loss': loss.item(),\n"
        "                  'capability': torch.backends.cpu.get_cpu_capability()}))\n")
    results = {}
    for capability in ("avx2", None):
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        results[capability] = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["avx2"]["capability"] == "AVX2"
    assert results["avx2"]["loss"] == pytest.approx(results[None]["loss"], abs=0.02)


# ---- sampled recurrences ----------------------------------------------------------------------

SAMPLED = {"loop_layers": 1, "recurrences": 4, "recurrence_sampling": "poisson_lognormal"}


def test_sampled_recurrences_are_lockstep_and_near_the_mean():
    first, second = make_model(seed=0, **SAMPLED), make_model(seed=1, **SAMPLED)
    draws = [first.recurrences_for_step(step) for step in range(2000)]
    assert draws[:100] == [second.recurrences_for_step(step) for step in range(100)]
    assert min(draws) >= 1 and len(set(draws)) >= 5
    assert abs(statistics.mean(draws) - 4) / 4 < 0.15


def test_sampling_leaves_the_global_generator_alone():
    model = make_model(**SAMPLED)
    state = torch.get_rng_state()
    model.recurrences_for_step(7)
    assert torch.equal(torch.get_rng_state(), state)


def test_fixed_sampling_returns_the_configured_r():
    model = make_model(**VARIANTS["linear_r3"])
    assert {model.recurrences_for_step(step) for step in range(20)} == {3}


def test_sampled_model_runs_any_drawn_r():
    model = make_model(perturb=0.05, **SAMPLED)
    tokens, targets = tokens_and_targets()
    losses = {r: model(tokens, targets, recurrences=r).item() for r in (1, 2, 7)}
    assert len(set(losses.values())) == 3


# ---- attention ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_sdpa_equals_reference_attention(kv_heads):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 10, 8, generator=generator)
    k, v = torch.randn(2, 2, kv_heads, 10, 8, generator=generator)
    exact(sdpa_attention(q, k, v), causal_attention(q, k, v), atol=1e-5)


def test_grouped_heads_reach_sdpa_as_they_are_only_where_its_flash_kernel_reads_them():
    """Elsewhere `enable_gqa` sends SDPA to its math kernel; repeated K/V keep the fused ones
    (tests/test_gpu.py runs fp32 GQA with the math kernel switched off)."""
    half = torch.zeros(1, 4, 8, 64, dtype=torch.bfloat16)
    assert native_gqa(half, masked=False)
    assert not native_gqa(half.float(), masked=False)
    assert not native_gqa(half, masked=True)
    assert not native_gqa(torch.zeros(1, 4, 8, 512, dtype=torch.bfloat16), masked=False)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 10, 8, generator=generator)
    k, v = torch.randn(2, 2, 2, 10, 8, generator=generator)
    want = causal_attention(q, k, v)
    got = sdpa_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()
    exact(got, want, atol=3e-2)


# ---- initialisation ----------------------------------------------------------------------------

def test_weights_are_drawn_from_the_cpu_generator_on_any_device():
    """ZeRO-3 initialises gathered weights where they live (a GPU); ZeRO 0-2 on the CPU. The
    same seed must give both the same weights, so every draw comes from the CPU generator."""
    states = []
    for device in ("cpu", "meta"):
        with torch.device(device):
            model = LoopedLM(make_config(**VARIANTS["hyperloop"]), init_weights=False)
        torch.manual_seed(0)
        model.reset_parameters()
        states.append(torch.get_rng_state())
    assert torch.equal(*states)
    assert not torch.equal(states[0], torch.manual_seed(0).get_state())  # it did draw


# ---- loss and refusals ------------------------------------------------------------------------

def test_loss_is_the_cross_entropy_of_the_logits():
    model = make_model(perturb=0.05, **VARIANTS["linear_r3"])
    tokens, targets = tokens_and_targets()
    loss = model(tokens, targets)
    assert loss.dim() == 0
    logits = model(tokens)
    exact(loss, F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1)), atol=1e-6)


def test_loss_ignores_minus_one():
    model = make_model(perturb=0.05)
    tokens, targets = tokens_and_targets()
    targets[0, :5] = -1
    targets[1, -3:] = -1
    keep = targets >= 0
    log_probs = torch.log_softmax(model(tokens), dim=-1)
    expected = -log_probs[keep].gather(-1, targets[keep][:, None]).mean()
    exact(model(tokens, targets), expected, atol=1e-6)


def test_softcap_bounds_the_logits():
    model = make_model(perturb=0.5, logit_softcap=2.0)
    assert model(random_tokens()).abs().max() <= 2.0


def test_sequence_longer_than_max_seq_len_is_refused():
    model = make_model()
    with pytest.raises(ConfigError, match="max_seq_len"):
        model(random_tokens(seq=33))


@pytest.mark.parametrize("variant", ["hyperloop", "lanes"])
@pytest.mark.parametrize("recurrences", [2, 4])
def test_per_recurrence_hyper_refuses_another_r(variant, recurrences):
    model = make_model(**VARIANTS[variant])
    with pytest.raises(ConfigError, match="model.hyper"):
        model(random_tokens(), recurrences=recurrences)


def test_zero_recurrences_is_refused():
    with pytest.raises(ConfigError, match="recurrences"):
        make_model(**VARIANTS["linear_r3"])(random_tokens(), recurrences=0)


def test_the_isodepth_init_draws_the_papers_distributions():
    """Block matrices uniform with std 1/√fan_in (so bounded by √3 of it), the embedding N(0, 1),
    the LM head N(0, 0.001), the linear injection [I | 0]; the same draws from the seed."""
    cfg = make_config(d_model=64, recurrences=3, injection="linear", mlp="relu2",
                      mlp_ratio=4.0, init="isodepth")
    torch.manual_seed(0)
    model = LoopedLM(cfg)
    for module in model.modules():
        if isinstance(module, (Attention, MLP)):
            for linear in (m for m in module.modules() if isinstance(m, torch.nn.Linear)):
                w, std = linear.weight, linear.in_features ** -0.5
                assert w.std().item() == pytest.approx(std, rel=0.05)
                assert w.abs().max().item() <= 3 ** 0.5 * std
    assert model.embed.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.05)
    d = cfg.d_model
    assert torch.equal(model.injection.weight, torch.cat([torch.eye(d), torch.zeros(d, d)], 1))
    torch.manual_seed(0)
    again = LoopedLM(cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(),
                                                 strict=True))
    gpt2 = LoopedLM(dataclasses.replace(cfg, init="gpt2"))
    assert gpt2.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    with pytest.raises(ConfigError, match="Set model.tie_embeddings: false"):
        make_config(init="isodepth", tie_embeddings=True)
