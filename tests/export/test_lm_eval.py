"""lm-evaluation-harness on an exported looped model: the real `lm_eval` command, `--model hf`
with trust_remote_code and recurrences, on two local tasks made from files (no download): a
rolling log-likelihood whose bits per byte equal `megaloop eval --text`, and a multiple-choice
task whose log-likelihoods are the model's own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import export_tiny

from megaloop.cli import main
from megaloop.data.tokenizer import DEFAULT_TOKENIZER, Tokenizer

pytest.importorskip("lm_eval")
LM_EVAL = shutil.which("lm_eval", path=str(Path(sys.executable).parent)) or "lm_eval"

MODEL = {"recurrences": 3, "injection": "linear", "mlp": "relu2", "qk_norm": True,
         "max_seq_len": 64}  # the paper's features, which Llama lacks; texts span many windows
QUESTIONS = [
    {"question": "def square(x):\n    return", "choices": [" x * x", " the moon"], "answer": 0},
    {"question": "import", "choices": [" os", " yesterday and"], "answer": 0},
    {"question": "for i in", "choices": [" range(10):", " Paris, France"], "answer": 0},
    {"question": "The end of the", "choices": [" file", " ()):\n"], "answer": 0},
]


def task_folder(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "tasks"
    folder.mkdir()
    (tmp_path / "doc.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    common = "dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
    (folder / "rolling.yaml").write_text(
        f"task: megaloop_rolling\n{common}dataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'doc.jsonl'}\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: bits_per_byte\n')
    (folder / "mc.yaml").write_text(
        f"task: megaloop_mc\n{common}dataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'mc.jsonl'}\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n")
    return folder


def continuation_loglikelihood(model, tokenizer: Tokenizer, context: str, continuation: str,
                               r: int) -> float:
    """log p(continuation | context), split into tokens as lm-eval splits them."""
    whole, head = tokenizer.encode(context + continuation), tokenizer.encode(context)
    tokens = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens[:, :-1], recurrences=r).double(), dim=-1)
    picked = logp[0, torch.arange(len(whole) - 1), tokens[0, 1:]]
    return float(picked[len(head) - 1:].sum())


def test_lm_eval_runs_on_an_exported_looped_model(tmp_path, capsys):
    model, source, folder = export_tiny(tmp_path, "paper_r3", MODEL)
    text = Path(json.__file__).read_text()[:5000]
    (tmp_path / "doc.txt").write_text(text)
    tasks, out, r = task_folder(tmp_path, text), tmp_path / "results", 4
    # an in-process test's group of one leaves LOCAL_RANK set, which accelerate would take for
    # a launcher's rank
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    done = subprocess.run([LM_EVAL, "--model", "hf", "--model_args",
                           f"pretrained={folder},trust_remote_code=True,recurrences={r}",
                           "--tasks", "megaloop_rolling,megaloop_mc", "--include_path",
                           str(tasks), "--device", "cpu", "--batch_size", "1", "--output_path",
                           str(out), "--log_samples"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]

    assert main(["eval", "--checkpoint", str(source), "--text", str(tmp_path / "doc.txt"),
                 "--recurrences", str(r), "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)["results"][0]
    assert ours["recurrences"] == r
    assert results["megaloop_rolling"]["bits_per_byte,none"] == pytest.approx(ours["bpb"],
                                                                             rel=1e-6)

    (samples_file,) = out.rglob("samples_megaloop_mc_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    tokenizer, correct = Tokenizer.load(DEFAULT_TOKENIZER), 0
    for sample in samples:
        doc = sample["doc"]
        theirs = [float(resp[0][0]) for resp in sample["resps"]]
        mine = [continuation_loglikelihood(model, tokenizer, doc["question"], " " + choice, r)
                for choice in doc["choices"]]
        assert theirs == pytest.approx(mine, abs=1e-4)
        correct += max(range(len(mine)), key=mine.__getitem__) == doc["answer"]
    assert results["megaloop_mc"]["acc,none"] == pytest.approx(correct / len(samples))
