"""`megaloop export-hf` as Llama: the folder loads in `transformers` as LlamaForCausalLM with a
tokenizer that encodes like sentencepiece, and gives the loss `megaloop eval` gives; a model Llama
cannot express is refused as Llama naming every feature, and written as the megaloop model by
default (tests/export/test_hf_model.py tests that one). The declared BOS is the documents' start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megaloop import config
from megaloop.cli import main
from megaloop.data.loader import ValLoader
from megaloop.data.shards import TokenShards
from megaloop.data.tokenizer import DEFAULT_TOKENIZER, Tokenizer
from megaloop.export.llama import llama_lacks
from megaloop.export.weights import LoadedCheckpoint, write_export
from megaloop.model import LoopedLM

transformers = pytest.importorskip("transformers")

SMALL = ["model.vocab_size=4096", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
         "model.max_seq_len=64", "model.prelude_layers=1", "model.loop_layers=2",
         "model.coda_layers=1", "train.micro_batch=2", "train.eval_batches=3"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def exported(tmp_path: Path, *overrides: str) -> Path:
    """A perturbed tiny model of the given config, written as a `megaloop export` file."""
    run = config.load(None, [*SMALL, *overrides])
    torch.manual_seed(0)
    model = LoopedLM(run.model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    out = tmp_path / "model.safetensors"
    write_export(LoadedCheckpoint(run, model.state_dict(), Path("in-memory"), 0, 1), out)
    return out


@pytest.mark.parametrize("overrides", [
    ["model.recurrences=1"],
    ["model.recurrences=3", "model.injection=passthrough", "model.tie_embeddings=true"],
], ids=["r1", "passthrough_r3_tied"])
def test_llama_export_gives_the_loss_of_megaloop_eval(tmp_path, capsys, stdlib_shards, overrides):
    checkpoint, out = exported(tmp_path, *overrides), tmp_path / "hf"
    assert main(["export-hf", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert main(["eval", "--checkpoint", str(checkpoint), "--shards", str(stdlib_shards),
                 "--json"]) == 0
    want = json.loads(capsys.readouterr().out.split("\n", 1)[1])["results"][0]["loss"]

    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    run = config.load(None, [*SMALL, *overrides])
    assert hf.config.num_hidden_layers == (1 + 2 * run.model.recurrences + 1)
    batches = ValLoader(TokenShards(stdlib_shards), 64, 2, max_batches=3)
    with torch.no_grad():
        losses = [F.cross_entropy(hf(tokens).logits.flatten(0, 1), targets.flatten()).double()
                  for tokens, targets in batches]
    assert float(sum(losses) / len(losses)) == pytest.approx(want, abs=1e-4)

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = Path(json.__file__).read_text()
    assert tokenizer.encode(text, add_special_tokens=False) == \
        Tokenizer.load(DEFAULT_TOKENIZER).encode(text)
    assert tokenizer.eos_token_id == 2 and tokenizer.decode(tokenizer.encode(text)) == text


def test_a_model_llama_cannot_express_is_refused_as_llama_naming_every_feature(tmp_path,
                                                                              capsys):
    checkpoint, out = exported(tmp_path, "model.recurrences=2", "model.injection=linear",
                               "model.mlp=relu2", "model.qk_norm=true",
                               "model.logit_softcap=15"), tmp_path / "hf"
    assert main(["export-hf", "--checkpoint", str(checkpoint), "--out", str(out),
                 "--format", "llama"]) == 2
    err = capsys.readouterr().err
    for feature in ("the relu2 MLP", "QK-norm", "the logit soft-cap", "linear input injection",
                    "the RMSNorm that ends each pass of the loop"):
        assert feature in err, feature
    assert "--format megaloop" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("overrides, feature", [
    (["model.recurrences=3", "model.injection=passthrough", "model.hyper=hyperloop"],
     "hyper-connections (model.hyper = hyperloop)"),
    (["model.hyper=mhc"], "hyper-connections (model.hyper = mhc)"),
    (["model.recurrences=2", "model.injection=additive"], "additive input injection"),
    (["model.embedding_norm=true"], "the RMSNorm after the embedding"),
    (["model.recurrences=3", "model.injection=passthrough", "model.recurrence_norm=every"],
     "the RMSNorm that ends each pass of the loop"),
    (["model.recurrences=1", "model.recurrence_norm=always"],
     "the RMSNorm that ends each pass of the loop"),
    (["model.recurrences=2", "model.recurrence_sampling=poisson_lognormal",
      "model.injection=additive"], "sampled recurrences"),
])
def test_what_llama_lacks(overrides, feature):
    lacking = llama_lacks(config.load(None, [*SMALL, *overrides]).model)
    assert any(feature in line for line in lacking), lacking
    assert llama_lacks(config.load(None, SMALL).model) == []


def test_auto_writes_the_megaloop_model_where_llama_cannot(tmp_path, capsys):
    checkpoint, out = exported(tmp_path, "model.mlp=relu2"), tmp_path / "hf"
    assert main(["export-hf", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert "as MegaloopForCausalLM" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "megaloop" and saved["mlp"] == "relu2"
    assert (out / "modeling_megaloop.py").is_file()


def test_the_declared_bos_is_the_token_the_documents_followed(tmp_path):
    """Stream-packed documents follow EOS: the export's BOS (what lm-eval puts first) is EOS,
    not sentencepiece's unused <s>; bos_best_fit rows start with BOS, which stays."""
    for packing, want in (("stream", "</s>"), ("bos_best_fit", "<s>")):
        checkpoint = exported(tmp_path, f"data.packing={packing}")
        out = tmp_path / f"hf-{packing}"
        assert main(["export-hf", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
        tokenizer = transformers.AutoTokenizer.from_pretrained(out)
        assert tokenizer.bos_token == want
        assert json.loads((out / "config.json").read_text())["bos_token_id"] == \
            tokenizer.bos_token_id
