"""The benchmarks run end to end on tiny shapes: the training step (train_step.py --quick), the
GPU harnesses on the CPU (gpu_mfu.py --quick, gpu_session.sh --cpu-smoke), trainer_ab.py,
optimizer_compare.py and packing_speed.py (slow)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def benchmark_json(tmp_path: Path, script: str, *args: str, **env: str) -> dict:
    """Run benchmarks/`script` with `args` and `--json`; its exit must be 0; its JSON."""
    out = tmp_path / f"{Path(script).stem}.json"
    done = subprocess.run([sys.executable, f"benchmarks/{script}", *args, "--json", str(out)],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), **env),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def run_quick(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "benchmarks/train_step.py", "--quick", "--out", str(out), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| megaloop r=1 |" in done.stdout
    return json.loads(out.read_text())


def test_quick_benchmark_reports_every_model(tmp_path):
    report = run_quick(tmp_path, "--no-hf")
    names = [row["name"] for row in report["rows"]]
    assert names == ["megaloop r=1", "megaloop r=2", "megaloop r=4", "megaloop r=8",
                     "megaloop r=8 ckpt", "reference", "reference r=2", "reference r=4",
                     "reference r=8"]
    reference_executed = report["rows"][names.index("reference")]["executed_flops_per_token"]
    for row in report["rows"]:
        assert row["tokens_per_s"] > 0 and row["achieved_flops"] > 0
        assert row["steps_run"] >= 3
        assert row["vs_reference"] > 0
        assert ("vs_looped_reference" in row) == row["name"].startswith("megaloop")
        assert row["vs_reference_per_flop"] == pytest.approx(
            row["vs_reference"] * row["executed_flops_per_token"] / reference_executed)
    rows = {row["name"]: row for row in report["rows"]}
    # linear injection runs W_e e once, not r times: fewer FLOPs than the convention's count
    assert rows["megaloop r=8"]["executed_flops_per_token"] < rows["megaloop r=8"][
        "flops_per_token"]
    assert rows["reference r=8"]["executed_flops_per_token"] == rows["reference r=8"][
        "flops_per_token"]
    layouts = {row["name"]: row["layout"] for row in report["rows"]}
    assert layouts["megaloop r=2"] == "2 + 2x2 + 2"
    assert layouts["megaloop r=8"] == "0 + 1x8 + 0" == layouts["reference r=8"]
    assert report["matmul_peak"]["peak_flops"] > 0
    memory = report["memory"]
    assert memory["recurrences"] == 8
    # checkpointing each recurrence keeps only its inputs: far fewer bytes saved for backward
    assert memory["per_recurrence"]["saved_tensor_bytes"] < memory["none"]["saved_tensor_bytes"]
    assert {check["what"] for check in report["targets"]} >= {"megaloop r=1 mfu"}


def test_quick_benchmark_times_bf16_against_fp32(tmp_path):
    report = run_quick(tmp_path, "--no-hf", "--recurrences", "1,4", "--no-checkpoint-row",
                       "--no-memory", "--bf16")
    rows = {row["name"]: row for row in report["rows"]}
    assert {"megaloop r=1 bf16", "megaloop r=4 bf16"} <= set(rows)
    for r in (1, 4):
        bf16 = rows[f"megaloop r={r} bf16"]
        assert bf16["dtype"] == "bf16" and bf16["vs_fp32"] > 0
        assert bf16["flops_per_token"] == rows[f"megaloop r={r}"]["flops_per_token"]
    assert report["matmul_peak"]["bf16"]["peak_flops"] > 0
    assert not any("bf16" in check["what"] for check in report["targets"])


@pytest.mark.slow
def test_quick_benchmark_with_hugging_face(tmp_path):
    pytest.importorskip("transformers")
    report = run_quick(tmp_path, "--recurrences", "1,2", "--no-checkpoint-row", "--no-memory",
                       "--compile")
    names = [row["name"] for row in report["rows"]]
    assert names == ["megaloop r=1", "megaloop r=2", "reference", "reference r=2", "hf llama",
                     "megaloop r=1 compiled", "megaloop r=2 compiled", "hf llama compiled"]
    rows = {row["name"]: row for row in report["rows"]}
    assert rows["megaloop r=1"]["vs_hf"] > 0 and rows["megaloop r=2"]["vs_hf_per_flop"] > 0
    assert rows["megaloop r=2 compiled"]["vs_hf_compiled"] > 0
    assert "vs_hf_compiled" not in rows["megaloop r=2"]
    # the targets judge the trainer's default (eager) step only
    assert not any("compiled" in check["what"] for check in report["targets"])


@pytest.mark.slow  # tens of seconds: the default suite stays under 10 min on 2 cores
@pytest.mark.serial  # MFU against the CPU's peak measured at start: a loaded CPU reads >1
def test_gpu_mfu_harness_runs_on_the_cpu(tmp_path):
    """benchmarks/gpu_mfu.py --quick: the real trainer, the MFU read from its --json summary
    (no MLflow store)."""
    out = tmp_path / "gpu_mfu.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    done = subprocess.run([sys.executable, "benchmarks/gpu_mfu.py", "--quick", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    sdpa = report["results"]["sdpa"]
    assert 0 < sdpa["mfu"] < 1 and sdpa["tokens_per_s"] > 0
    assert 0 < sdpa["mfu_causal"] < sdpa["mfu"] and sdpa["peak_mem_gib"] > 0
    assert sdpa["steps_measured"] == 4  # 6 steps, the first 2 left out
    assert "| sdpa |" in done.stdout


@pytest.mark.slow  # tens of seconds: the default suite stays under 10 min on 2 cores
@pytest.mark.serial  # it times itself: alone, not beside another test
def test_trainer_ab_times_two_commits_and_cleans_up(tmp_path):
    """benchmarks/trainer_ab.py: the real trainer at two commits (here both HEAD), in worktrees
    that are removed afterwards."""
    result = benchmark_json(tmp_path, "trainer_ab.py", "--base", "HEAD", "--head", "HEAD",
                            "--rounds", "1", "--steps", "31", "--d-model", "64")
    assert result["commits"]["base"] == result["commits"]["head"]
    assert all(len(times) == 1 and times[0] > 0 for times in result["step_s"].values())
    assert 0.5 < result["head_over_base_median"] < 2  # the same code, run twice
    trees = subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True,
                           text=True, check=True).stdout
    assert "/base " not in trees and "/head " not in trees


def gpu_session_limits() -> dict[str, object]:
    """The GPU branch's stage limits, deadline and per-stage extras, read from the script."""
    text = (REPO / "benchmarks" / "gpu_session.sh").read_text()
    gpu = text[text.index("else\n  budget=${GPU_SESSION_BUDGET:-"):]
    budget = int(re.search(r"GPU_SESSION_BUDGET:-(\d+)", gpu).group(1))
    limits = [int(x) for x in re.search(r"limits=\(([\d ]+)\)", gpu).group(1).split()]
    summary = int(re.search(r"SUMMARY_LIMIT=(\d+)", text).group(1))
    return {"budget": budget, "limits": limits, "summary": summary}


def test_the_gpu_session_plans_its_stages_within_540_seconds():
    """Every GPU stage, install included, with the summary after each, fits the 540 s the
    device command leaves for it (its limit is 600 s; the deadline clamps a late stage)."""
    plan = gpu_session_limits()
    assert plan["budget"] == 540
    assert len(plan["limits"]) == 9  # install, env, tests, step, rope, four trainings
    assert sum(plan["limits"]) + len(plan["limits"]) * plan["summary"] <= plan["budget"], plan


def python_on_path(folder: Path) -> dict[str, str]:
    """An environment whose `python3` is this interpreter, not the checkout's .venv by name:
    the script must take whatever Python it is started with."""
    folder.mkdir()
    wrapper = folder / "python3"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHON", None)
    return env


@pytest.mark.slow  # about a minute: the default suite stays under 8 minutes on CI's 2 cores
def test_the_gpu_session_runs_every_stage_on_the_cpu(tmp_path):
    """benchmarks/gpu_session.sh --cpu-smoke: the one-shot GPU check at toy sizes on the CPU,
    with the `python3` of PATH, so that the script a device session runs cannot rot (run it
    before a device session: `scripts/test.sh --slow -k gpu_session`)."""
    out = tmp_path / "out"
    env = {**python_on_path(tmp_path / "bin"), "OUT": str(out)}
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--cpu-smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    log = (out / "log.txt").read_text()
    assert done.returncode == 0, log[-4000:]
    assert str(tmp_path / "bin" / "python3") in log
    stages = [line for line in log.splitlines() if line.startswith("== ") and ": exit" in line]
    assert len(stages) == 8 and all(": exit 0 " in line for line in stages), stages
    assert sorted(p.name for p in out.iterdir()) == ["env.json", "log.txt", "rope.json",
                                                     "step.json", "summary.json", "tests.json",
                                                     "train.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is True and len(summary["stages"]) == 8
    assert summary["env"]["bf16_matmul_flops"] > 0
    assert summary["tests"]["failed"] == 0 and summary["tests"]["skipped"] > 0  # no CUDA here
    rows = summary["step"]["rows"]
    assert [(r["model"], r["variant"]) for r in rows] == [
        ("transformer", "eager"), ("looped", "eager"), ("looped-r4", "eager"),
        ("hyperloop", "eager"), ("looped", "sampled"), ("hyperloop", "compiled"),
        ("transformer", "compiled")]
    assert all("error" not in r and 0 < r["mfu_causal"] < r["mfu"] < 1 for r in rows), rows
    assert rows[1]["recurrences"] == [3, 3] and rows[2]["recurrences"] == [4, 4]
    sampled = rows[4]
    assert sampled["batch"] * (2 + 2 + 4 * max(sampled["recurrences"])) <= 2 * (2 + 2 + 4 * 3) \
        or sampled["batch"] == 1  # no more layer-rows than a fixed row
    assert summary["rope"]["ok"] is True
    for check in ("deepspeed_bf16_zero_init", "megaloop_bf16_engine"):
        rope = summary["rope"][check]
        assert rope["dtype"] == "torch.float32" and rope["max_error_vs_fp64"] < rope["tolerance"]
    runs = {run["name"]: run for run in summary["train"]["runs"]}
    assert sorted(runs) == ["d2048-hyperloop-zero0", "d2048-hyperloop-zero3", "tiny-zero0",
                            "tiny-zero3"]
    for run in runs.values():
        assert run["steps"] == 4 and len(run["intervals"]) == 2 and 0 < run["mfu_median"] < 1
        assert 0 < run["mfu_causal_median"] < run["mfu_median"]
        assert run["peak_memory_allocated_gib"] > 0
    # ZeRO-0 and ZeRO-3 train the same model from the same seed: the same losses
    assert runs["tiny-zero3"]["last_loss"] == pytest.approx(runs["tiny-zero0"]["last_loss"],
                                                            abs=1e-3)
    assert {t["what"].split(":")[0] for t in summary["targets"]} >= {
        "model step, hyperloop d2048 eager", "megaloop train d2048-hyperloop-zero3"}


@pytest.mark.slow  # about 25 s
@pytest.mark.serial  # it times itself: alone, not beside another test
def test_a_gpu_session_past_its_budget_stops_in_time_and_says_so(tmp_path):
    """A budget too short for every stage: the late stages are skipped (each recorded with exit
    124), summary.json is there, the script exits non-zero, and it ends near its deadline."""
    import time

    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_SESSION_BUDGET": "25"}
    start = time.monotonic()
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--cpu-smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    assert done.returncode != 0
    assert took < 25 + 10, took  # the deadline holds (bash and the last lines aside)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is False and summary["budget_s"] == 25
    assert any(stage["rc"] == 124 for stage in summary["stages"]), summary["stages"]
    assert "skipped, the session's 25 s are spent" in (out / "log.txt").read_text()


@pytest.mark.slow
def test_optimizer_compare_trains_both_optimizers(tmp_path):
    """benchmarks/optimizer_compare.py on 30 steps: both optimizers train and are timed."""
    result = benchmark_json(tmp_path, "optimizer_compare.py", "--steps", "30", "--rounds", "1",
                            DS_ACCELERATOR="cpu")
    for name in ("adamw", "muonh", "muonh_paper_model"):
        (run,) = result["runs"][name]
        assert run["val_loss"] < 8.3 and run["step_s"] > 0  # below ln(4096): it learned
    assert result["runs"]["adamw"][0]["val_loss"] != result["runs"]["muonh"][0]["val_loss"]


@pytest.mark.slow
def test_packing_speed_compares_the_packers_on_the_same_rows(tmp_path):
    result = benchmark_json(tmp_path, "packing_speed.py", "--docs", "3000", "--scan-docs", "500")
    assert result["rows"] > 0 and result["scan_over_bisect"] > 0
    assert result["stream_batch_s"] > 0 and result["packed_batch_s"] > 0


def test_generate_speed_measures_early_exit_and_kv_budgets(tmp_path):
    out = tmp_path / "generate_speed.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/generate_speed.py", "--quick", "--recurrences", "3",
         "--config", "configs/runs/tiny.yaml", "--text", str(Path(json.__file__)),
         "--decode-tokens", "24", "--latent", "0,1e9", "--kl", "1e9", "--out", str(out)],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["setting"]: row for row in json.loads(out.read_text())["test_time"]}
    assert set(rows) == {"full recurrence", "latent < 0", "latent < 1e9",
                         "kl < 1e9", "kv budget 1"}
    assert rows["latent < 0"]["loss_vs_full"] == pytest.approx(0, abs=1e-5)
    assert rows["latent < 0"]["recurrences_per_token"] == 2  # tiny.yaml's r
    assert rows["latent < 1e9"]["recurrences_per_token"] == 1
    assert rows["kl < 1e9"]["recurrences_per_token"] == 2  # KL compares two
    assert "| kv budget 1 |" in done.stdout
