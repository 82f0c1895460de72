"""The `megaloop` command: params table and JSON, and errors printed without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

from tiny import REPO, RUN_CONFIGS

from megaloop.cli import main
from megaloop.model.accounting import GROUPS


def test_params_json_has_every_group(capsys):
    assert main(["params", str(RUN_CONFIGS / "isodepth-s10-r4.yaml"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = {*GROUPS, "total", "n_once", "n_rec", "flops_per_token"}
    assert set(result) == expected
    d, blocks = 640, 2 + 4 + 2
    per_block = 12 * d * d + 2 * d  # attention + ReLU^2 MLP, two norms (QK-norm has no gains)
    injection, loop_norm, final_norm, embedding_norm = 2 * d * d, d, d, d
    non_embedding = blocks * per_block + injection + loop_norm + final_norm + embedding_norm
    assert result["n_once"] + result["n_rec"] == non_embedding
    assert result["injection"] == injection


def test_params_overrides_change_the_table(capsys):
    config = str(RUN_CONFIGS / "tiny.yaml")
    assert main(["params", config, "--json"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert main(["params", config, "--set", "model.recurrences=4", "--json"]) == 0
    looped = json.loads(capsys.readouterr().out)
    assert looped["n_rec"] == base["n_rec"]
    assert looped["flops_per_token"] > base["flops_per_token"]


def test_params_table_is_readable(capsys):
    assert main(["params", str(RUN_CONFIGS / "hyperloop-d1024-hyperloop.yaml")]) == 0
    out = capsys.readouterr().out
    for word in ("n_once", "n_rec", "hyper", "training FLOPs per token", "2 -> 4 x 3 -> 2"):
        assert word in out


def test_config_error_exits_2_without_traceback(capsys):
    code = main(["params", str(RUN_CONFIGS / "tiny.yaml"), "--set", "model.d_model=130"])
    err = capsys.readouterr().err
    assert code == 2
    assert "model.d_model" in err and "n_heads" in err
    assert "Traceback" not in err


def test_debug_shows_the_traceback(capsys):
    code = main(["params", "--set", "model.colour=red", "--debug"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" in err and "model.colour" in err


def test_console_command_runs():
    """The installed entry point (python -m megaloop.cli stands in for the console script)."""
    proc = subprocess.run([sys.executable, "-m", "megaloop.cli", "params", "--set",
                           "model.recurrences=0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "model.recurrences" in proc.stderr and "Traceback" not in proc.stderr


def test_version_names_the_release_and_the_commit(tmp_path):
    done = subprocess.run([sys.executable, "-m", "megaloop.cli", "--version"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    from megaloop import __version__

    assert done.stdout.startswith(f"megaloop {__version__} (")
    own = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    assert (f"git {own[:12]}" if own else "installed") in done.stdout
