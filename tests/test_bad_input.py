"""Bad input, tried as a new user would: each case gets a MegaloopError (or argparse's own
line) that names the problem and the fix, exit 2, no traceback, and nothing left half-written.
The table grows with every case found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny import REPO

from megaloop.cli import main

TINY = str(REPO / "configs" / "runs" / "tiny.yaml")
QUICKSTART = REPO / "configs" / "sweeps" / "quickstart.yaml"
RUNS_CSV = "n_once,n_rec,recurrences,tokens,loss\n1000000,1000000,1,10000000,3.5\n"


def spec(tmp_path: Path, **changes) -> str:
    """The quickstart spec with `changes` (None: the key removed)."""
    values = yaml.safe_load(QUICKSTART.read_text())
    values["base"] = TINY
    values.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def setup_files(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n  d_model: 64\n")
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "runs.csv").write_text(RUNS_CSV)


CASES = [  # (argv, with {tmp} for the test's folder, or a callable of it; what stderr says)
    (["params", "{tmp}/bad.yaml"], "is not valid YAML at line 2"),
    (["params", "{tmp}/a-folder"], "is a folder, not a run config file"),
    (["params", "{tmp}/missing.yaml"], "Run config {tmp}/missing.yaml does not exist"),
    (["sweep", "{tmp}/missing.yaml", "--dry-run"], "Sweep spec {tmp}/missing.yaml does not exist"),
    (["sweep", "{tmp}/a-folder", "--dry-run"], "is a folder, not a sweep spec file"),
    (["sweep", "{tmp}/bad.yaml", "--dry-run"], "Sweep spec {tmp}/bad.yaml is not valid YAML"),
    (["fit", "--runs", "{tmp}/runs.csv", "--fix-phi", "nan"], "nan is not a finite number"),
    (["fit", "--runs", "{tmp}/runs.csv", "--restarts", "0"], "0 is below 1"),
    (["ds-config", TINY, "--world-size", "0"], "--world-size: 0 is below 1"),
    (lambda tmp: ["sweep", spec(tmp), "--jobs", "2", "--executor", "local", "--dry-run"],
     "--jobs 2 trains runs side by side in worker processes of the in-process executor"),
    (lambda tmp: ["sweep", spec(tmp), "--jobs", "0"], "--jobs: 0 is below 1"),
    (["eval", "--checkpoint", "x", "--text", "y", "--batch-size", "0"], "--batch-size: 0 is"),
    (["generate", "--checkpoint", "x", "--prompt", "a", "--early-exit", "kl"], "go together"),
    (["generate", "--checkpoint", "x", "--prompt", "a", "--exit-threshold", "0.1"],
     "go together"),
    (["eval", "--checkpoint", "x", "--text", "y", "--max-batches", "0"], "--max-batches: 0 is"),
    (["generate", "--checkpoint", "x", "--prompt", "y", "--max-new-tokens", "-1"], "below 1"),
    (["train", TINY, "--peak-flops", "inf"], "inf is not a finite number"),
    (["fit", "--runs", "{tmp}/runs.csv", "--report", "{tmp}/a-file"],
     "--report {tmp}/a-file is a file, not a folder"),
    (["fit", "--runs", "{tmp}/runs.csv", "--json", "{tmp}/a-file/fit.json"],
     "{tmp}/a-file is a file, not a folder"),
    (["export", "--checkpoint", "{tmp}/a-folder", "--out", "{tmp}/a-file/w.safetensors"],
     "{tmp}/a-file is a file, not a folder"),
    (["export-hf", "--checkpoint", "{tmp}/a-folder", "--out", "{tmp}/a-file"],
     "--out {tmp}/a-file is a file, not a folder"),
    (["runs", "--tracking-uri", "foo://store"], "Cannot use the MLflow store foo://store"),
    (["runs", "--tracking-uri", "http://127.0.0.1:9"], "check track.tracking_uri"),
    (lambda t: ["sweep", spec(t, lr_scaling={"exponent": -0.5}), "--dry-run"],
     "lr_scaling = {'exponent': -0.5} must be a mapping with a positive reference_width"),
    (lambda t: ["sweep", spec(t, recurrences=4), "--dry-run"],
     "recurrences = 4 must be a list of whole numbers"),
    (lambda t: ["sweep", spec(t, budgets=[1e12, 2e12]), "--dry-run"],
     "budgets = [1000000000000.0, 2000000000000.0] must be a mapping of FLOPs"),
    (lambda t: ["sweep", spec(t, set={"train.warmup_steps": "{{ steps // 0 }}"}), "--dry-run"],
     "ZeroDivisionError"),
    (lambda t: ["sweep", spec(t, seeds=3), "--dry-run"], "seeds = 3 must be a list"),
    (lambda t: ["sweep", spec(t, variants=[1, 2]), "--dry-run"], "variants = [1, 2] must be"),
    (lambda t: ["sweep", spec(t, tokens="many", budgets=None), "--dry-run"],
     "tokens = 'many' must be a positive number"),
]


@pytest.mark.parametrize(("argv", "message"), CASES,
                         ids=[str(i) for i in range(len(CASES))])
def test_bad_input_is_a_clear_error(tmp_path, monkeypatch, capsys, argv, message):
    setup_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = argv(tmp_path) if callable(argv) else [a.replace("{tmp}", str(tmp_path))
                                                   for a in argv]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's refusal of an option's value
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert message.replace("{tmp}", str(tmp_path)) in err, err
    assert "Traceback" not in err
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before, "a refused command left files behind"


# ---- a refused `megaloop train` leaves its working directory as it found it -------------------

@pytest.fixture(scope="module")
def refused_inputs(stdlib_shards, small_tokenizer, tmp_path_factory) -> dict[str, str]:
    """Bad inputs made from real shards: empty, corrupt, truncated and flipped shard folders, a
    garbage tokenizer, an empty config, a folder that is no checkpoint."""
    import shutil

    inputs = tmp_path_factory.mktemp("refused-inputs")
    (inputs / "empty").mkdir()
    (inputs / "corrupt").mkdir()
    (inputs / "corrupt" / "manifest.json").write_text("garbage")
    for name in ("truncated", "flipped"):
        shutil.copytree(stdlib_shards, inputs / name)
    shard = sorted((inputs / "truncated").glob("train_*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    shard = sorted((inputs / "flipped").glob("train_*.bin"))[0]
    data = bytearray(shard.read_bytes())
    data[100:104] = bytes(255 - b for b in data[100:104])
    shard.write_bytes(bytes(data))
    (inputs / "garbage.model").write_text("not a model")
    (inputs / "empty.yaml").write_text("")
    (inputs / "no-checkpoint").mkdir()
    manifest = json.loads((stdlib_shards / "manifest.json").read_text())
    val_tokens = manifest["splits"]["val"]["tokens"]
    return {"shards": str(stdlib_shards), "inputs": str(inputs), "tiny": TINY,
            "small_tokenizer": str(small_tokenizer.path), "long_seq": str(val_tokens // 2)}


S = "data.shards={shards}"
REFUSED_TRAINING = [  # (arguments after `megaloop train`, the problem, the fix the error names)
    (["{tiny}", "--set", S, "--set", "model.vocab_size=1000"],
     "use a tokenizer of 4096 tokens but model.vocab_size = 1000", "set model.vocab_size=4096"),
    (["{tiny}", "--set", "data.shards={inputs}/empty"], "is not a prepared shard folder",
     "Make one with `megaloop data prepare"),
    (["{tiny}", "--set", "data.shards={inputs}/corrupt"], "manifest.json is corrupt",
     "prepare the shards again"),
    (["{tiny}", "--set", "data.shards={inputs}/truncated"], "is truncated or damaged",
     "prepare the shards again"),
    (["{tiny}", "--set", "data.shards={inputs}/flipped"], "its sha256 differs from the manifest",
     "prepare the shards again"),
    (["{tiny}", "--set", S, "--set", "data.tokenizer={small_tokenizer}"],
     "were made with another tokenizer",
     "prepare them again with this tokenizer or use the one they were made with"),
    (["{tiny}", "--set", "data.tokenizer={inputs}/garbage.model"],
     "is not a sentencepiece model", "train one with `megaloop tokenizer train`"),
    (["{inputs}/empty.yaml", "--set", S], "model.vocab_size = 32000",
     "set model.vocab_size=4096"),
    (["{tiny}", "--set", S, "--set", "model.max_seq_len={long_seq}", "--set",
      "train.micro_batch=4", "--set", "train.global_batch=4"],
     "fewer than the 4 one step needs", "Use a shorter model.max_seq_len"),
    (["{tiny}", "--set", S, "--resume", "{inputs}/no-checkpoint"],
     "is not a complete megaloop checkpoint", "pass a step_* folder of a run, or --resume auto"),
    (["{tiny}", "--set", S, "--resume", "{inputs}/missing"], "there is no folder",
     "Pass --resume auto"),
    (["{tiny}", "--set", S, "--resume", "aut"], "(did you mean --resume auto?)",
     "Pass --resume auto"),
    (["{tiny}", "--set", "data.val_fraction=0"], "data.val_fraction = 0 holds out no document",
     "set data.val_fraction (e.g. 0.01)"),
]


@pytest.mark.parametrize(("argv", "problem", "fix"), REFUSED_TRAINING,
                         ids=[str(i) for i in range(len(REFUSED_TRAINING))])
def test_a_refused_training_leaves_its_working_directory_empty(
        refused_inputs, process_group, tmp_path, monkeypatch, capsys, argv, problem, fix):
    """Every check that can run before the run folder is written runs before it: the command
    exits 2 with the error and its mend, no traceback, and the empty working directory it ran
    in (where runs/checkpoints/, runs/data/ and runs/mlflow.db would go) stays empty."""
    monkeypatch.chdir(tmp_path)
    argv = ["train", *(a.format(**refused_inputs) for a in argv), "--no-progress",
            "--set", "train.steps=2"]  # tracking on: runs/mlflow.db must not appear either
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert problem.format(**refused_inputs) in err and fix in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_run_that_fails_before_its_first_checkpoint_removes_its_folder(
        stdlib_shards, process_group, tmp_path, monkeypatch, capsys):
    """The run folder a start made goes when the run fails before any checkpoint (here its
    model cannot be built: an unknown DeepSpeed template key), with the parents it made; a
    folder that holds a checkpoint stays."""
    from megaloop.train.run_folder import RunFolder

    monkeypatch.chdir(tmp_path)
    template = tmp_path.parent / f"{tmp_path.name}-bad.json.j2"
    template.write_text('{"train_batch_size": {{ global_batch }}, "zero_optimization": '
                        '{"stage": 0, "no_such_key": 1}}')
    code = main(["train", TINY, "--no-progress", "--set", f"data.shards={stdlib_shards}",
                 "--set", "train.steps=2", "--set", "track.enabled=false",
                 "--set", f"train.ds_config={template}"])
    err = capsys.readouterr().err
    assert code == 2 and "no_such_key" in err, err  # refused by DeepSpeed, after the claim
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    kept = RunFolder(tmp_path / "a" / "run")
    kept.lock()
    (kept.path / "step_00000002").mkdir()
    assert kept.remove_if_new() is False and kept.path.is_dir()
