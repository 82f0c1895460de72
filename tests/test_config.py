"""config.load, from_dict and --set overrides: every refusal names the key; the hash is stable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from tiny import REPO, RUN_CONFIGS, TINY, overrides_for

from megaloop import config
from megaloop.config import ModelConfig, RunConfig
from megaloop.errors import ConfigError, MegaloopError

LOOP = {"prelude_layers": 1, "loop_layers": 2, "coda_layers": 1, "recurrences": 3,
        "injection": "passthrough"}


def refuse(values: dict, *fragments: str) -> ConfigError:
    """Load TINY + values and assert a ConfigError whose message holds every fragment."""
    with pytest.raises(ConfigError) as info:
        config.load(None, overrides_for({**TINY, **values}))
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in: {info.value}"
    return info.value


def write_yaml(tmp_path, data, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


# ---- refusals ----------------------------------------------------------------------------------

def test_config_error_is_a_megaloop_error():
    assert issubclass(ConfigError, MegaloopError)


def test_unknown_key_is_named():
    error = refuse({"d_modle": 32}, "model.d_modle")
    assert "d_model" in str(error)  # the message lists the valid keys


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match="'optimiser'"):
        config.from_dict({"optimiser": {"lr": 1e-3}})


def test_unknown_section_in_override_is_named():
    with pytest.raises(ConfigError, match="'optimiser'"):
        config.load(None, ["optimiser.lr=0.1"])


@pytest.mark.parametrize("key, value", [
    ("d_model", "big"),
    ("qk_norm", 1),
    ("mlp_ratio", "x"),
    ("recurrences", 2.5),
    ("recurrences", True),
    ("n_kv_heads", "two"),
    ("bptt_k", 1.0),
    ("logit_softcap", False),
])
def test_wrong_type_is_named(key, value):
    refuse({key: value}, f"model.{key}", "wrong type")


@pytest.mark.parametrize("key, value", [
    ("mlp", "gelu"),
    ("injection", "concat"),
    ("hyper", "hc"),
    ("recurrence_sampling", "uniform"),
    ("attention", "xformers"),
    ("activation_checkpointing", "full"),
    ("mlp", 3),
])
def test_invalid_enum_value_is_named(key, value):
    refuse({key: value}, f"model.{key}", repr(value), "not one of")


def test_d_model_not_divisible_by_n_heads():
    refuse({"d_model": 30, "n_heads": 4}, "model.d_model", "model.n_heads")


def test_n_heads_not_divisible_by_n_kv_heads():
    refuse({"n_heads": 4, "n_kv_heads": 3}, "model.n_heads", "model.n_kv_heads")


def test_more_kv_heads_than_heads():
    refuse({"n_heads": 4, "n_kv_heads": 8}, "model.n_kv_heads")


def test_odd_head_dim():
    refuse({"head_dim": 7}, "head_dim")


@pytest.mark.parametrize("recurrences", [0, -2])
def test_recurrences_below_one(recurrences):
    refuse({"recurrences": recurrences}, "model.recurrences")


def test_recurrences_without_loop_layers():
    refuse({"loop_layers": 0, "recurrences": 2}, "model.recurrences", "model.loop_layers")


@pytest.mark.parametrize("bptt_k", [0, 4, -1])
def test_bptt_k_outside_one_to_recurrences(bptt_k):
    refuse({"recurrences": 3, "bptt_k": bptt_k}, "model.bptt_k", "1..3")


@pytest.mark.parametrize("bptt_k", [1, 3])
def test_bptt_k_at_the_bounds_is_accepted(bptt_k):
    assert config.load(None, overrides_for({**TINY, "recurrences": 3, "bptt_k": bptt_k}))


@pytest.mark.parametrize("hyper", ["hyperloop", "lanes", "mhc"])
def test_hyper_needs_two_streams(hyper):
    refuse({**LOOP, "hyper": hyper, "hyper_streams": 1}, "model.hyper_streams", hyper)


def test_one_stream_is_fine_without_hyper():
    assert config.load(None, overrides_for({**TINY, "hyper_streams": 1})).model.hyper_streams == 1


def test_lanes_refuse_truncated_bptt():
    refuse({**LOOP, "hyper": "lanes", "bptt_k": 2}, "model.hyper", "lanes", "model.bptt_k")


@pytest.mark.parametrize("hyper", ["none", "hyperloop"])
def test_truncated_bptt_refuses_passthrough(hyper):
    """Without injection the detached recurrences would cut the prelude off from every gradient."""
    values = {**LOOP, "injection": "passthrough", "hyper": hyper, "bptt_k": 1}
    refuse(values, "model.bptt_k", "passthrough", "prelude")


@pytest.mark.parametrize("hyper", ["hyperloop", "lanes"])
def test_loop_hyper_needs_loop_layers(hyper):
    refuse({"hyper": hyper, "loop_layers": 0, "injection": "passthrough"}, "model.loop_layers")


@pytest.mark.parametrize("hyper", ["hyperloop", "lanes", "mhc"])
def test_looped_hyper_refuses_injection(hyper):
    refuse({**LOOP, "hyper": hyper, "injection": "linear"}, "model.injection", "passthrough")


@pytest.mark.parametrize("hyper", ["hyperloop", "lanes"])
def test_per_recurrence_hyper_cannot_sample_r(hyper):
    refuse({**LOOP, "hyper": hyper, "recurrence_sampling": "poisson_lognormal"},
           "model.recurrence_sampling")


def test_sampling_needs_a_loop():
    refuse({"loop_layers": 0, "recurrence_sampling": "poisson_lognormal"}, "model.loop_layers")


@pytest.mark.parametrize("ratio", [0, -1.5, float("nan")])
def test_mlp_ratio_must_be_positive(ratio):
    refuse({"mlp_ratio": ratio}, "model.mlp_ratio")


def test_negative_softcap():
    refuse({"logit_softcap": -1.0}, "model.logit_softcap")


@pytest.mark.parametrize("key", ["vocab_size", "d_model", "n_heads", "max_seq_len", "head_dim",
                                 "n_kv_heads", "hyper_streams"])
@pytest.mark.parametrize("value", [0, -4])
def test_sizes_must_be_positive(key, value):
    refuse({key: value}, f"model.{key}", "positive")


@pytest.mark.parametrize("key", ["prelude_layers", "loop_layers", "coda_layers"])
def test_layer_counts_must_not_be_negative(key):
    refuse({key: -1}, f"model.{key}")


def test_a_model_needs_some_layer():
    refuse({"prelude_layers": 0, "loop_layers": 0, "coda_layers": 0}, "model.prelude_layers")


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="'model'"):
        config.from_dict({"model": [1, 2]})


# ---- YAML files ---------------------------------------------------------------------------------

def test_load_yaml_file(tmp_path):
    path = write_yaml(tmp_path, {"model": {**TINY, "recurrences": 3, "mlp_ratio": 4}})
    cfg = config.load(path).model
    assert (cfg.d_model, cfg.recurrences, cfg.vocab_size) == (32, 3, 64)
    assert cfg.mlp_ratio == 4.0 and isinstance(cfg.mlp_ratio, float)
    assert cfg.n_kv_heads is None and cfg.injection == "linear"  # defaults fill the rest


def test_overrides_beat_the_file(tmp_path):
    path = write_yaml(tmp_path, {"model": {**TINY, "recurrences": 3}})
    cfg = config.load(path, ["model.recurrences=2", "model.bptt_k=1"]).model
    assert (cfg.recurrences, cfg.bptt_k) == (2, 1)


def test_empty_file_and_empty_section_give_defaults(tmp_path):
    assert config.load(write_yaml(tmp_path, "")) == RunConfig()
    assert config.load(write_yaml(tmp_path, "model:\n", "b.yaml")) == RunConfig()


def test_override_into_an_empty_section(tmp_path):
    assert config.load(write_yaml(tmp_path, "model:\n"), ["model.d_model=256"]).model.d_model == 256


def test_error_in_file_names_the_key(tmp_path):
    path = write_yaml(tmp_path, {"model": {**TINY, "qk_norm": "yes please"}})
    with pytest.raises(ConfigError, match="model.qk_norm"):
        config.load(path)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        config.load(missing)


def test_file_that_is_not_yaml(tmp_path):
    with pytest.raises(ConfigError, match="bad.yaml"):
        config.load(write_yaml(tmp_path, "model: {d_model: [", "bad.yaml"))


def test_file_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="list.yaml"):
        config.load(write_yaml(tmp_path, "- 1\n- 2\n", "list.yaml"))


@pytest.mark.parametrize("path", sorted(RUN_CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_run_config_loads(path):
    assert isinstance(config.load(path).model, ModelConfig)


# ---- --set overrides ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("model.recurrences=4", 4),
    ("model.mlp_ratio=3.5", 3.5),
    ("model.rope_theta=5e5", 500000.0),  # YAML 1.2 float, not the string '5e5'
    ("model.rope_theta=1.0e+4", 10000.0),
    ("model.qk_norm=true", True),
    ("model.tie_embeddings=false", False),
    ("model.bptt_k=null", None),
    ("model.bptt_k=~", None),
    ("model.bptt_k=", None),
    ("model.mlp=relu2", "relu2"),
    ("  model.mlp = relu2 ", "relu2"),
])
def test_override_values_are_yaml(text, expected):
    section, key, value = config.parse_override(text)
    assert (section, key) == ("model", text.split("=")[0].strip().split(".")[1])
    assert value == expected and type(value) is type(expected)


def test_overrides_reach_the_config():
    cfg = config.load(None, overrides_for(TINY) + [
        "model.recurrences=4", "model.mlp_ratio=4", "model.qk_norm=true", "model.bptt_k=2",
        "model.rope_theta=5e5", "model.n_kv_heads=null"]).model
    assert cfg.recurrences == 4 and cfg.mlp_ratio == 4.0 and cfg.qk_norm is True
    assert cfg.bptt_k == 2 and cfg.rope_theta == 5e5 and cfg.n_kv_heads is None


@pytest.mark.parametrize("text", [
    "model.recurrences",  # no '='
    "recurrences=4",  # no section
    ".recurrences=4",
    "model.=4",
    "model.a.b=4",  # nested key
    "model.recurrences=[1, 2",  # not YAML
])
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="Override"):
        config.parse_override(text)


def test_wrong_type_override_names_the_key():
    with pytest.raises(ConfigError, match="model.d_model"):
        config.load(None, ["model.d_model=big"])


# ---- hash -------------------------------------------------------------------------------------

def test_hash_is_stable_and_order_free(tmp_path):
    forward = {"model": dict(TINY)}
    backward = {"model": dict(reversed(list(TINY.items())))}
    first = config.load(write_yaml(tmp_path, yaml.safe_dump(forward, sort_keys=False), "a.yaml"))
    second = config.load(write_yaml(tmp_path, yaml.safe_dump(backward, sort_keys=False), "b.yaml"))
    third = config.load(None, overrides_for(dict(reversed(list(TINY.items())))))
    assert first.hash() == second.hash() == third.hash() == config.from_dict(forward).hash()
    assert len(first.hash()) == 12 and int(first.hash(), 16) >= 0


def test_hash_counts_defaults_spelled_out():
    assert config.from_dict({"model": {"recurrences": 1}}).hash() == config.from_dict({}).hash()


@pytest.mark.parametrize("key, value", [("recurrences", 2), ("mlp_ratio", 3.0),
                                        ("qk_norm", True), ("bptt_k", 1)])
def test_hash_changes_with_any_value(key, value):
    base = config.load(None, overrides_for(TINY))
    changed = config.load(None, overrides_for({**TINY, key: value}))
    assert base.hash() != changed.hash()


def run_python(code: str) -> str:
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.strip()


def test_hash_is_the_same_in_another_process():
    here = config.load(RUN_CONFIGS / "tiny.yaml", ["model.recurrences=3"]).hash()
    there = run_python("""
        from megaloop import config
        print(config.load("configs/runs/tiny.yaml", ["model.recurrences=3"]).hash())
    """)
    assert there == here


def test_config_errors_come_before_any_tensor():
    """Loading and validating a config never imports torch, so no tensor can exist yet."""
    out = run_python("""
        import sys
        from megaloop import config
        from megaloop.errors import ConfigError
        try:
            config.load(None, ["model.d_model=30", "model.n_heads=4"])
        except ConfigError as error:
            print("refused", "model.d_model" in str(error), "torch" in sys.modules)
    """)
    assert out == "refused True False"


def test_model_validates_before_allocating():
    """A config that skipped load() is refused by the model constructor before any weight."""
    from megaloop.model import LoopedLM

    bad = ModelConfig(**{**TINY, "recurrences": 3, "bptt_k": 5})
    with pytest.raises(ConfigError, match="model.bptt_k"):
        LoopedLM(bad)


# ---- the data, train and track sections ------------------------------------------------------

SECTION_ERRORS = [
    (["train.micro_batch=0"], "train.micro_batch"),
    (["train.steps=-5"], "train.steps"),
    (["train.lr=-1e-3"], "train.lr"),
    (["train.grad_clip=-1"], "train.grad_clip"),
    (["train.min_lr=1", "train.lr=0.1"], "train.min_lr"),
    (["train.beta2=1.0"], "train.beta2"),
    (["train.tokens=1000", "train.steps=10"], "train.tokens"),
    (["train.global_batch=null"], "train.global_batch"),
    (["train.global_batch_tokens=4096"], "train.global_batch_tokens"),
    (["train.zero_stage=4"], "train.zero_stage"),
    (["train.offload=true"], "train.offload"),
    (["train.schedule=exponential"], "train.schedule"),
    (["train.precision=fp16"], "train.precision"),
    (["train.wsd_decay_fraction=0"], "train.wsd_decay_fraction"),
    (["train.eval_interval=0"], "train.eval_interval"),
    (["train.lr=fast"], "train.lr"),
    (["train.steps=2.5"], "train.steps"),
    (["data.val_fraction=1.0"], "data.val_fraction"),
    (["data.workers=0"], "data.workers"),
    (["data.verify=maybe"], "data.verify"),
    (["data.shard=x"], "data.shard"),
    (["track.experiment= "], "track.experiment"),
    (["track.enabled=2"], "track.enabled"),
    (["track.uri=x"], "track.uri"),
]


@pytest.mark.parametrize("overrides, key", SECTION_ERRORS)
def test_new_sections_refuse_bad_values(overrides, key):
    with pytest.raises(ConfigError) as info:
        config.load(None, overrides)
    assert key in str(info.value)


def test_batch_geometry_refuses_a_global_batch_the_ranks_cannot_split():
    from megaloop.train.ds_config import batch_geometry

    cfg = config.load(None, ["train.micro_batch=4", "train.global_batch=12"])
    assert batch_geometry(cfg, 1).grad_accum == 3
    with pytest.raises(ConfigError, match="train.micro_batch x ranks = 4 x 2"):
        batch_geometry(cfg, 2)
    tokens = config.load(None, ["train.global_batch=null", "train.global_batch_tokens=1000",
                                "model.max_seq_len=256"])
    with pytest.raises(ConfigError, match="not a multiple of model.max_seq_len"):
        batch_geometry(tokens, 1)


def test_a_budget_is_required_to_train():
    from megaloop.train.ds_config import batch_geometry, total_steps

    cfg = config.load(None, [])
    with pytest.raises(ConfigError, match="train.tokens or train.steps"):
        total_steps(cfg, batch_geometry(cfg, 1))
    tokens = config.load(None, ["train.tokens=1000000", "model.max_seq_len=256"])
    assert total_steps(tokens, batch_geometry(tokens, 1)) == round(1_000_000 / (32 * 256))


def test_a_missing_ds_config_template_is_refused(tmp_path):
    from megaloop.train.ds_config import render_ds_config

    cfg = config.load(None, [f"train.ds_config={tmp_path / 'mine.json.j2'}",
                             "train.precision=fp32"])
    with pytest.raises(ConfigError, match="mine.json.j2 does not exist"):
        render_ds_config(cfg)
    (tmp_path / "mine.json.j2").write_text('{"train_batch_size": {{ global_batch }}, oops}')
    with pytest.raises(ConfigError, match="invalid JSON"):
        render_ds_config(cfg)
    (tmp_path / "mine.json.j2").write_text('{"train_batch_size": {{ global_batch }}, '
                                           '"zero_optimization": {"stage": {{ stage }}}}')
    rendered = render_ds_config(cfg)
    assert rendered["train_batch_size"] == 32 and rendered["gradient_clipping"] == 0.0


def test_a_config_includes_a_recipe_and_its_own_values_win(tmp_path):
    recipe = tmp_path / "recipes" / "mine.yaml"
    recipe.parent.mkdir()
    recipe.write_text("train: {optimizer: muonh, lr: 0.004, min_lr: 0.0004, warmup_steps: 0}\n"
                      "model: {d_model: 96, n_heads: 3}\n")
    run = tmp_path / "run.yaml"
    run.write_text("include: recipes/mine.yaml\ntrain: {warmup_steps: 7}\n")
    cfg = config.load(run, ["train.lr=0.005"])
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.min_lr, cfg.train.warmup_steps) == (
        "muonh", 0.005, 0.0004, 7)
    assert cfg.model.d_model == 96
    assert "include" not in cfg.to_dict()
    recipe.write_text("include: ../run.yaml\n")
    with pytest.raises(ConfigError, match="includes it again"):
        config.load(run)
    run.write_text("include: {a: 1}\n")
    with pytest.raises(ConfigError, match="include must be a path or a list of paths"):
        config.load(run)
    run.write_text("include: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        config.load(run)


def test_the_two_recipes_are_the_papers():
    iso_config = config.load(REPO / "configs" / "runs" / "isodepth-s10-r4.yaml")
    iso, model = iso_config.train, iso_config.model
    assert iso_config.data.packing == "bos_best_fit"
    assert (model.init, model.embedding_norm, model.recurrence_norm, model.qk_norm_mode) == (
        "isodepth", True, "always", "free_after_rope")
    assert (iso.optimizer, iso.matrix_lr, iso.muon_momentum, iso.embedding_lr, iso.unembedding_lr,
            iso.norm_lr, iso.hyper_lr) == ("muonh", 0.014, 0.95, 0.3, 0.004, 0.005, 0.01)
    assert (iso.beta1, iso.beta2, iso.eps, iso.weight_decay, iso.warmup_steps, iso.schedule,
            iso.grad_clip, iso.min_lr / iso.lr) == (0.8, 0.95, 1e-10, 0.0, 0, "linear", 0.0,
                                                    pytest.approx(0.1))
    hyper = config.load(REPO / "configs" / "runs" / "hyperloop-d1024-hyperloop.yaml").train
    assert (hyper.optimizer, hyper.beta1, hyper.beta2, hyper.weight_decay, hyper.grad_clip,
            hyper.lr, hyper.min_lr, hyper.schedule, hyper.warmup_steps) == (
        "adamw", 0.9, 0.95, 0.1, 1.0, 4e-4, 4e-5, "cosine", 2000)
