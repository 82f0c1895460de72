"""Bad input, tried as a new user would: each case gets a MegaloopError (or argparse's own
line) that names the problem and the fix, exit 2, no traceback, and nothing left half-written.
The table grows with every case found."""

from __future__ import annotations

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
