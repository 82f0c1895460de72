"""What users do with a trained model and its runs: `megaloop eval`, `generate`, `export`, `runs`
and `ui`, on a real checkpoint of a short `megaloop train` run (DeepSpeed on CPU, sqlite MLflow)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny import free_port
from training import assert_ok, child_env, history, run_training, stop_group

from megaloop import config
from megaloop.cli import main
from megaloop.data.tokenizer import DEFAULT_TOKENIZER, Tokenizer
from megaloop.export.weights import LoadedCheckpoint, read_checkpoint, write_export
from megaloop.model import LoopedLM

TEXT = Path(json.__file__).parent / "decoder.py"  # real source, ~10 kB


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(stdlib_shards, tmp_path_factory):
    """A tiny looped model (r = 2, linear injection) trained 8 steps; checkpoints at 4 and 8."""
    workdir = tmp_path_factory.mktemp("trained")
    assert_ok(run_training(stdlib_shards, workdir))
    (run_dir,) = (workdir / "checkpoints").iterdir()
    return SimpleNamespace(workdir=workdir, run_dir=run_dir, shards=stdlib_shards,
                           uri=f"sqlite:///{workdir}/mlflow.db")


def megaloop(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def eval_json(capsys, *argv: str) -> dict:
    code, out, err = megaloop(capsys, "eval", *argv, "--json")
    assert code == 0, err
    return json.loads(out)


WITHOUT_THE_TRAINER = """
import json, sys
import megaloop.export.hf, megaloop.export.weights, megaloop.infer.evaluate
import megaloop.infer.generate
from megaloop.export.weights import read_checkpoint
loaded = read_checkpoint(sys.argv[1])
print(json.dumps({"parameters": sum(t.numel() for t in loaded.state_dict.values()),
                  "loaded": sorted(m for m in sys.modules
                                   if m.split(".")[0] == "deepspeed" or
                                   m.startswith("megaloop.train"))}))
"""


def load_without_the_trainer(checkpoint) -> dict:
    """A checkpoint read by export and inference in a fresh process: what that imported."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", WITHOUT_THE_TRAINER, str(checkpoint)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_export_and_inference_read_a_checkpoint_without_the_trainer_or_deepspeed(trained):
    """The checkpoint on disk has its own room (megaloop/ckpt): reading one imports neither
    megaloop.train nor any of DeepSpeed (its pickled objects come back as plain data)."""
    found = load_without_the_trainer(trained.run_dir)
    assert found["parameters"] > 0 and found["loaded"] == []


def test_eval_equals_the_trainers_last_validation_loss(trained, capsys):
    summary = eval_json(capsys, "--checkpoint", trained.run_dir, "--shards", trained.shards)
    assert summary["checkpoint"].endswith("step_00000008") and summary["step"] == 8
    (result,) = summary["results"]
    assert result["recurrences"] == 2
    assert result["loss"] == pytest.approx(history(trained.workdir, "val/loss")[8][0], abs=1e-6)
    assert result["bpb"] == pytest.approx(history(trained.workdir, "val/bpb")[8][0], abs=1e-6)
    assert summary["tokens"] == 2 * 4 * 64  # train.eval_batches x micro_batch x max_seq_len


def test_a_validation_set_in_tokens_is_what_eval_measures(stdlib_shards, tmp_path, capsys):
    """train.eval_tokens of 5 windows in batches of 4: most of the last batch is padding, which
    counts for nothing in the trainer's validation loss and in `megaloop eval`'s."""
    assert_ok(run_training(stdlib_shards, tmp_path, **{"train.eval_tokens": 5 * 64 + 10,
                                                       "train.steps": 4}))
    (run_dir,) = (tmp_path / "checkpoints").iterdir()
    summary = eval_json(capsys, "--checkpoint", run_dir, "--shards", stdlib_shards)
    assert summary["tokens"] == 5 * 64 and summary["batches"] == 2
    assert summary["results"][0]["loss"] == pytest.approx(
        history(tmp_path, "val/loss")[4][0], abs=1e-6)


def test_eval_at_other_recurrences_and_on_a_text(trained, capsys):
    step4 = trained.run_dir / "step_00000004"
    summary = eval_json(capsys, "--checkpoint", step4, "--shards", trained.shards,
                        "--recurrences", "1,2,4")
    assert [row["recurrences"] for row in summary["results"]] == [1, 2, 4]
    assert summary["results"][1]["loss"] == pytest.approx(
        history(trained.workdir, "val/loss")[4][0], abs=1e-6)
    assert len({round(row["loss"], 6) for row in summary["results"]}) == 3

    text = eval_json(capsys, "--checkpoint", step4, "--text", TEXT)
    tokens = len(Tokenizer.load(DEFAULT_TOKENIZER).encode(TEXT.read_text()))  # each once
    (row,) = text["results"]
    assert text["tokens"] == tokens
    assert row["bpb"] == pytest.approx(row["loss"] / math.log(2) * tokens
                                       / len(TEXT.read_bytes()), rel=1e-9)
    code, out, _ = megaloop(capsys, "eval", "--checkpoint", step4, "--text", TEXT)
    assert code == 0 and "bits/byte" in out and f"{row['loss']:.4f}" in out


def test_export_holds_the_weights_and_the_config(trained, capsys, tmp_path):
    out = tmp_path / "model.safetensors"
    code, _, err = megaloop(capsys, "export", "--checkpoint", trained.run_dir, "--out", out)
    assert code == 0, err
    exported, original = read_checkpoint(out), read_checkpoint(trained.run_dir)
    assert exported.config == original.config and exported.step == 8
    assert exported.state_dict.keys() == original.state_dict.keys()
    for name, tensor in original.state_dict.items():
        assert exported.state_dict[name].dtype == torch.float32
        assert torch.equal(exported.state_dict[name], tensor), name
    from_file = eval_json(capsys, "--checkpoint", out, "--shards", trained.shards)
    from_folder = eval_json(capsys, "--checkpoint", trained.run_dir, "--shards", trained.shards)
    assert from_file["results"] == [{**r, "tokens_per_s": from_file["results"][0]["tokens_per_s"]}
                                    for r in from_folder["results"]]


def test_generate_is_seeded_and_the_cache_changes_nothing(trained, capsys):
    args = ["generate", "--checkpoint", trained.run_dir, "--prompt", "def main(", "--seed", "3",
            "--max-new-tokens", "12", "--top-k", "50", "--no-stop", "--json"]
    runs = []
    for extra in ([], [], ["--no-cache"]):
        code, out, err = megaloop(capsys, *args, *extra)
        assert code == 0, err
        runs.append(json.loads(out))
    assert runs[0]["tokens"] == runs[1]["tokens"] == runs[2]["tokens"]
    assert len(runs[0]["tokens"]) == 12 and runs[0]["cache"] and not runs[2]["cache"]
    code, out, _ = megaloop(capsys, *args[:-1])
    assert code == 0 and out.startswith("def main(" + runs[0]["text"])


def test_bad_inputs_are_refused_clearly(trained, capsys, tmp_path):
    step = trained.run_dir / "step_00000008"
    cases = [
        (["--checkpoint", tmp_path / "absent", "--shards", trained.shards], "does not exist"),
        (["--checkpoint", trained.shards, "--shards", trained.shards],
         "is not a megaloop checkpoint"),
        (["--checkpoint", step, "--shards", trained.shards, "--recurrences", "2,0"], "below 1"),
        (["--checkpoint", step, "--shards", trained.shards, "--recurrences", "two"],
         "not an integer"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases.append((["--checkpoint", step, "--text", empty], "has no tokens"))

    damaged = tmp_path / "damaged" / step.name
    shutil.copytree(step, damaged)
    states = damaged / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])
    cases.append((["--checkpoint", damaged, "--shards", trained.shards], "cannot be read"))

    exported = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(step), "--out", str(exported)]) == 0
    from safetensors.torch import load_file, safe_open, save_file

    with safe_open(str(exported), framework="pt") as handle:
        metadata = handle.metadata()
    raw = json.loads(metadata["config"])
    raw["model"]["d_model"] = 128
    other = tmp_path / "other.safetensors"
    save_file(load_file(str(exported)), str(other), {**metadata, "config": json.dumps(raw)})
    cases.append((["--checkpoint", other, "--shards", trained.shards], "incompatible config"))

    hyperloop = config.load(None, ["model.vocab_size=4096", "model.d_model=32",
                                   "model.n_heads=2", "model.max_seq_len=64",
                                   "model.recurrences=3", "model.injection=passthrough",
                                   "model.hyper=hyperloop"])
    looped = tmp_path / "hyperloop.safetensors"
    write_export(LoadedCheckpoint(hyperloop, LoopedLM(hyperloop.model).state_dict(), looped, 0, 1),
                 looped)
    cases.append((["--checkpoint", looped, "--shards", trained.shards, "--recurrences", "2,3"],
                  "cannot run 2"))

    for args, message in cases:
        code, _, err = megaloop(capsys, "eval", *args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)


def test_runs_lists_the_tracked_runs(trained, capsys):
    code, out, err = megaloop(capsys, "runs", "--tracking-uri", trained.uri, "--json")
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["experiment"] == "tests" and row["status"] == "finished"
    assert (row["recurrences"], row["d_model"], row["tokens"]) == (2, 64, 8 * 8 * 64)
    assert row["val/loss"] == pytest.approx(history(trained.workdir, "val/loss")[8][0])
    assert row["n_once"] > 0 and row["n_rec"] > 0 and row["duration_s"] > 0
    code, table, _ = megaloop(capsys, "runs", "--tracking-uri", trained.uri)
    assert code == 0 and row["name"] in table and "finished" in table and "val/loss" in table
    code, _, err = megaloop(capsys, "runs", "--tracking-uri", trained.uri, "--experiment", "x")
    assert code == 2 and "no experiment 'x'" in err


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_ui_answers_and_its_api_lists_the_runs_megaloop_prints(trained, capsys):
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "megaloop.cli", "ui", "--port", str(port),
                           "--tracking-uri", trained.uri], cwd=trained.workdir, env=child_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert ui.poll() is None, ui.stdout.read()
            try:
                with urllib.request.urlopen(base + "/", timeout=5) as response:
                    assert response.status == 200
                break
            except OSError:
                assert time.monotonic() < deadline, "the UI did not answer in 180 s"
                time.sleep(0.5)
        experiments = _post(base + "/api/2.0/mlflow/experiments/search", {"max_results": 100})
        ids = [e["experiment_id"] for e in experiments["experiments"]]
        listed = _post(base + "/api/2.0/mlflow/runs/search", {"experiment_ids": ids})["runs"]
    finally:
        stop_group(ui, timeout=30)
    code, out, _ = megaloop(capsys, "runs", "--tracking-uri", trained.uri, "--json")
    printed = {row["run_id"]: row for row in json.loads(out)}
    served = {run["info"]["run_id"]: run for run in listed}
    assert served.keys() == printed.keys() and printed
    for run_id, run in served.items():
        assert run["info"]["run_name"] == printed[run_id]["name"]
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert metrics["val/loss"] == pytest.approx(printed[run_id]["val/loss"])
    assert base in ui.stdout.read()
    with pytest.raises(OSError):  # stopping `megaloop ui` stopped MLflow's server too
        urllib.request.urlopen(base + "/", timeout=5)


@pytest.mark.slow
def test_a_zero3_two_rank_checkpoint_evaluates_in_one_process(stdlib_shards, tmp_path, capsys):
    values = {"train.zero_stage": 3, "train.micro_batch": 2, "train.global_batch": 8,
              "train.steps": 4}
    assert_ok(run_training(stdlib_shards, tmp_path, nproc=2, **values))
    (run_dir,) = (tmp_path / "checkpoints").iterdir()
    assert (run_dir / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()
    summary = eval_json(capsys, "--checkpoint", run_dir, "--shards", stdlib_shards)
    assert load_without_the_trainer(run_dir)["loaded"] == []  # ZeRO-3's DeepSpeed objects too
    two_ranks = history(tmp_path, "val/loss")[4][0]
    assert summary["results"][0]["loss"] == pytest.approx(two_ranks, abs=1e-5)
    out = tmp_path / "zero3.safetensors"
    code, _, err = megaloop(capsys, "export", "--checkpoint", run_dir, "--out", out)
    assert code == 0, err
    again = eval_json(capsys, "--checkpoint", out, "--shards", stdlib_shards)
    assert again["results"][0]["loss"] == summary["results"][0]["loss"]


@pytest.mark.parametrize("length", [2, 3, 5, 9, 10, 11, 17])
def test_rolling_windows_predict_every_token_once_with_whole_contexts(length):
    """`eval --text` rows (lm-eval's rolling windows): each token after the first is a target
    exactly once, after the token before it; every row but a lone short one is seq_len long."""
    from megaloop.infer.evaluate import rolling_windows

    stream = np.arange(100, 100 + length)
    rows = rolling_windows(stream, 4)
    scored = [int(t) for _, targets in rows for t in targets if t >= 0]
    assert scored == list(range(101, 100 + length))
    for inputs, targets in rows:
        assert len(inputs) == len(targets) == (4 if length > 4 else length - 1)
        assert all(t < 0 or t == i + 1 for i, t in zip(inputs, targets, strict=True))
