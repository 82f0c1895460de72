"""`megaloop export-hf --format megaloop`: every model variant loads in transformers as
MegaloopForCausalLM (trust_remote_code) in a fresh process where megaloop cannot be imported,
and gives the training model's logits (fp32, 1e-5) at the trained r and at another r, and its
greedy tokens through `generate` with the KV cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import VARIANTS, export_tiny

from megaloop.cli import main
from megaloop.data.tokenizer import DEFAULT_TOKENIZER, Tokenizer
from megaloop.export.remote_code import ALLOWED_IMPORTS, check_standalone, modeling_source
from megaloop.infer.generate import Sampling, generate

transformers = pytest.importorskip("transformers")

# every variant of tiny.py, and those the loop options add, on the default tokenizer's vocab
HF_VARIANTS = {
    **VARIANTS,
    "truncated_bptt": {"recurrences": 4, "injection": "linear", "bptt_k": 2},
    "sampled_r": {"recurrences": 3, "injection": "additive",
                  "recurrence_sampling": "poisson_lognormal"},
    "tied_head": {"recurrences": 2, "injection": "linear", "tie_embeddings": True},
}
PROMPT = [5, 9, 11, 3, 200]
NEW_TOKENS = 12
FIXED_R = {"hyperloop", "lanes"}  # parameters for exactly the trained r

# Runs in a fresh interpreter: megaloop is made unimportable before anything is loaded.
LOADER = r"""
import json, sys
sys.modules["megaloop"] = None
import torch, transformers
cases = json.loads(sys.argv[1])
out = {"transformers": transformers.__version__}
for name, case in cases.items():
    model = transformers.AutoModelForCausalLM.from_pretrained(
        case["folder"], trust_remote_code=True).eval()
    ref = torch.load(case["reference"], weights_only=True)
    seen = []
    forward = model.forward
    def recording(*args, **kwargs):
        seen.append(int(kwargs["input_ids"].shape[1]))
        return forward(*args, **kwargs)
    with torch.no_grad():
        logits = model(ref["tokens"]).logits
        result = {"type": type(model).__name__,
                  "error": (logits - ref["logits"]).abs().max().item()}
        if "logits_other_r" in ref:
            other = model(ref["tokens"], recurrences=ref["other_r"]).logits
            result["error_other_r"] = (other - ref["logits_other_r"]).abs().max().item()
        model.forward = recording
        prompt = torch.tensor([ref["prompt"]])
        tokens = model.generate(prompt, max_new_tokens=ref["new_tokens"], do_sample=False,
                                eos_token_id=None, pad_token_id=0)
        result["greedy"] = tokens[0, prompt.shape[1]:].tolist()
        result["fed"] = seen
    out[name] = result
print("RESULTS " + json.dumps(out))
"""


def fresh_env(tmp_path: Path, transformers_path: str | None = None) -> dict[str, str]:
    """The environment of the fresh process; `transformers_path`: a folder holding another
    transformers release (pip install --target), found before the venv's."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    if transformers_path:
        env["PYTHONPATH"] = transformers_path
    return env


def export_variant(tmp_path: Path, name: str, overrides: dict) -> dict:
    """The variant exported as MegaloopForCausalLM, with its reference outputs."""
    model, _, folder = export_tiny(tmp_path, name, overrides)
    tokens = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(1))
    reference = {"tokens": tokens, "prompt": PROMPT, "new_tokens": NEW_TOKENS}
    with torch.no_grad():
        reference["logits"] = model(tokens)
        if name not in FIXED_R:
            reference["other_r"] = model.cfg.recurrences + 2
            reference["logits_other_r"] = model(tokens, recurrences=model.cfg.recurrences + 2)
    torch.save(reference, tmp_path / f"{name}.pt")
    greedy = generate(model, PROMPT, Sampling(max_new_tokens=NEW_TOKENS, temperature=0),
                      eos_id=None)["tokens"]
    return {"folder": str(folder), "reference": str(tmp_path / f"{name}.pt"), "greedy": greedy}


def load_in_fresh_process(tmp_path: Path, transformers_path: str | None = None
                          ) -> tuple[dict, dict]:
    """Every variant exported, then loaded and run by transformers in one fresh process:
    (the cases with megaloop's greedy tokens, what transformers gave)."""
    cases = {name: export_variant(tmp_path, name, overrides)
             for name, overrides in HF_VARIANTS.items()}
    done = subprocess.run([sys.executable, "-c", LOADER, json.dumps(cases)], cwd=tmp_path,
                          env=fresh_env(tmp_path, transformers_path), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULTS "))
    return cases, json.loads(line[len("RESULTS "):])


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_in_fresh_process(tmp_path_factory.mktemp("hf-model"))


def check_variant(cases: dict, results: dict, name: str) -> None:
    result = results[name]
    assert result["type"] == "MegaloopForCausalLM"
    assert result["error"] < 1e-5
    if name not in FIXED_R:
        assert result["error_other_r"] < 1e-5
    assert result["greedy"] == cases[name]["greedy"]
    # generate fed the prompt once, then one new token per step: the cache was used
    assert result["fed"] == [len(PROMPT)] + [1] * (NEW_TOKENS - 1)


@pytest.mark.parametrize("name", list(HF_VARIANTS))
def test_every_variant_runs_in_transformers_as_it_trained(loaded, name):
    check_variant(*loaded, name)


def test_the_modeling_file_needs_only_torch_and_transformers():
    source = modeling_source()
    check_standalone(source, "modeling_megaloop.py")
    assert "megaloop." not in "".join(line for line in source.splitlines()
                                      if line.startswith(("import", "from")))
    with pytest.raises(RuntimeError, match="would import numpy"):
        check_standalone("import numpy\n", "x.py")
    assert "numpy" not in ALLOWED_IMPORTS


def test_recurrences_is_a_config_field_and_a_forward_argument(tmp_path):
    case = export_variant(tmp_path, "linear_r3", VARIANTS["linear_r3"])
    reference = torch.load(case["reference"], weights_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        case["folder"], trust_remote_code=True, recurrences=reference["other_r"]).eval()
    assert model.config.recurrences == 5 and model.config.trained_recurrences == 3
    with torch.no_grad():
        assert torch.allclose(model(reference["tokens"]).logits, reference["logits_other_r"],
                              atol=1e-5)
        assert torch.allclose(model(reference["tokens"], recurrences=3).logits,
                              reference["logits"], atol=1e-5)


def test_a_fixed_r_variant_refuses_another_r_and_padding_is_refused(tmp_path):
    case = export_variant(tmp_path, "hyperloop", VARIANTS["hyperloop"])
    model = transformers.AutoModelForCausalLM.from_pretrained(
        case["folder"], trust_remote_code=True).eval()
    tokens = torch.tensor([PROMPT])
    with torch.no_grad(), pytest.raises(ValueError, match="exactly 3 recurrences"):
        model(tokens, recurrences=4)
    with torch.no_grad(), pytest.raises(ValueError, match="padding"):
        model(tokens, attention_mask=torch.tensor([[0, 1, 1, 1, 1]]))


def test_the_cli_says_how_to_load_it(tmp_path, capsys):
    case = export_variant(tmp_path, "lanes", VARIANTS["lanes"])
    out = tmp_path / "again"
    assert main(["export-hf", "--checkpoint", str(tmp_path / "lanes.safetensors"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "as MegaloopForCausalLM" in printed and "trust_remote_code=True" in printed
    assert (out / "modeling_megaloop.py").read_text() == \
        (Path(case["folder"]) / "modeling_megaloop.py").read_text()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    text = Path(json.__file__).read_text()[:3000]
    assert tokenizer.encode(text, add_special_tokens=False) == \
        Tokenizer.load(DEFAULT_TOKENIZER).encode(text)
    assert tokenizer.bos_token == "</s>"  # stream-packed documents follow EOS


@pytest.mark.parametrize("settings", [{"kv_budget": 1},
                                      {"early_exit": "latent", "exit_threshold": 1e9},
                                      {"early_exit": "kl", "exit_threshold": 1e9}],
                         ids=["kv_budget", "latent", "kl"])
def test_test_time_compute_reaches_generate_as_arguments_and_as_config(tmp_path, settings):
    model, _, folder = export_tiny(tmp_path, "linear_r4", {"recurrences": 4,
                                                           "injection": "linear"})
    greedy = {"max_new_tokens": NEW_TOKENS, "temperature": 0}
    full = generate(model, PROMPT, Sampling(**greedy), eos_id=None)
    ours = generate(model, PROMPT, Sampling(**greedy, **settings), eos_id=None)
    if "early_exit" in settings:
        assert ours["recurrences_per_token"] < 4
    hf_settings = {("early_exit_threshold" if key == "exit_threshold" else key): value
                   for key, value in settings.items()}
    prompt = torch.tensor([PROMPT])
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    configured = transformers.AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, **hf_settings)
    with torch.no_grad():
        as_arguments = hf.eval().generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                                          eos_token_id=None, pad_token_id=0, **hf_settings)
        as_config = configured.eval().generate(prompt, max_new_tokens=NEW_TOKENS,
                                               do_sample=False, eos_token_id=None, pad_token_id=0)
        plain = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    assert ours["tokens"] != full["tokens"]  # the setting changed what was generated
    assert as_arguments[0, len(PROMPT):].tolist() == ours["tokens"]
    assert as_config[0, len(PROMPT):].tolist() == ours["tokens"]
    assert plain[0, len(PROMPT):].tolist() == full["tokens"]


# Optional integrations transformers probes at import, which pip does not install with it: the
# venv's copy is newer than an older release knows (kernels 0.19 makes transformers 5.0.0's
# hub_kernels raise ValueError at import, which its `except ImportError` does not catch).
NEWER_OPTIONAL_PACKAGES = ("kernels",)


def hide_newer_optional_packages(target: Path) -> None:
    """Shadow each optional package in `target` (found first) with one that fails to import,
    as where it is not installed, unless pip installed it there for this release."""
    for name in NEWER_OPTIONAL_PACKAGES:
        if not (target / name).exists():
            (target / name).mkdir()
            (target / name / "__init__.py").write_text(
                f"raise ImportError('{name} is hidden: newer than this transformers release')\n")


@pytest.mark.slow
@pytest.mark.parametrize("release", ["4.45.2", "4.57.6", "5.0.0"])
def test_other_transformers_releases_run_every_variant(tmp_path, release):
    """The declared range (pyproject: transformers>=4.45,<6), beyond the suite's own release:
    each is installed from PyPI into a folder of its own and found before the venv's."""
    target = tmp_path / f"transformers-{release}"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target",
                           str(target), f"transformers=={release}"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    hide_newer_optional_packages(target)
    cases, results = load_in_fresh_process(tmp_path, str(target))
    assert results["transformers"] == release
    for name in HF_VARIANTS:
        check_variant(cases, results, name)


def test_beam_search_a_fresh_model_and_a_mistyped_argument(tmp_path):
    _, _, folder = export_tiny(tmp_path, "linear_r3", {**VARIANTS["linear_r3"],
                                                       "attention": "sdpa"})
    assert json.loads((folder / "config.json").read_text())["attention"] == "auto"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder,
                                                              trust_remote_code=True).eval()
    prompt = torch.tensor([PROMPT])
    with torch.no_grad():
        beams = [model.generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False,
                                eos_token_id=None, pad_token_id=0, use_cache=cached)
                 for cached in (True, False)]
        assert beams[0].tolist() == beams[1].tolist()  # the cache reordered with the beams
        with pytest.raises(TypeError, match="got recurrence"):
            model(prompt, recurrence=8)
    fresh = type(model)(model.config)  # megaloop's own initialisation, not torch.empty
    embedding = fresh.model.embed.weight
    assert torch.isfinite(embedding).all() and embedding.std().item() == pytest.approx(0.02,
                                                                                     rel=0.1)
