"""The `megaloop` command: params table and JSON, and errors printed without a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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


@pytest.mark.slow  # builds a wheel: about 30 s
def test_a_wheel_installed_outside_the_checkout_trains_and_renders_configs(tmp_path):
    """`pip install .` without the checkout: the wheel carries the DeepSpeed templates and the
    shipped tokenizers (megaloop/resources), names megaloop-launch as a console script, and from
    a fresh venv in a folder of its own `megaloop ds-config` and `megaloop train` of a shipped
    config (the embedded corpus and the shipped tokenizer) work. The venv borrows this one's
    dependencies through a .pth file, which imports none of the checkout's megaloop."""
    import sysconfig
    import zipfile

    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                            "--no-build-isolation", "-w", str(tmp_path / "dist"), str(REPO)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("megaloop-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "megaloop/resources/ds_configs/zero3.json.j2" in names
    assert "megaloop/resources/tokenizer/stdlib-4k.model" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "megaloop-launch = megaloop.launch:main" in zipfile.ZipFile(wheel).read(
        entry_points).decode()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True)
    site_packages = Path(site.stdout.strip())
    (site_packages / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                                "--target", str(site_packages), str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = elsewhere / "tiny.yaml"
    config.write_text((RUN_CONFIGS / "tiny.yaml").read_text())
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["DS_ACCELERATOR"] = "cpu"

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(python), *argv], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=600)

    where = run("-c", "import megaloop; print(megaloop.__file__)")
    assert where.returncode == 0 and str(site_packages) in where.stdout, where
    rendered = run("-m", "megaloop.cli", "ds-config", str(config), "--set",
                   "train.precision=fp32", "--set", "train.zero_stage=3")
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    assert json.loads(rendered.stdout)["zero_optimization"]["stage"] == 3
    trained = run("-m", "megaloop.cli", "train", str(config), "--no-progress", "--json",
                  "summary.json", "--set", "train.steps=2", "--set", "train.log_interval=1",
                  "--set", "model.d_model=32", "--set", "model.max_seq_len=32",
                  "--set", "track.enabled=false", "--set", "train.precision=fp32")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert json.loads((elsewhere / "summary.json").read_text())["step"] == 2
    launched = run("-m", "megaloop.launch", "train", str(config), "--dry-run")
    assert launched.returncode == 0 and "megaloop.cli train" in launched.stdout, launched
