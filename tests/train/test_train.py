"""The trainer for real: `megaloop train` processes with DeepSpeed on CPU (gloo), a real sqlite
MLflow store, the embedded corpus. Exact resume, ZeRO-3 on two ranks, the guards."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from tiny import RUN_CONFIGS, free_port
from training import (
    assert_ok,
    assert_same_losses,
    client,
    history,
    only_run,
    run_training,
    start_training,
    wait_for,
)

from megaloop import config
from megaloop.model import LoopedLM
from megaloop.model.accounting import account
from megaloop.train.ds_config import render_ds_config
from megaloop.train.optim import adamw, optimizer_groups
from megaloop.train.schedule import lr_at


def test_loss_falls_on_the_embedded_corpus(stdlib_shards, tmp_path):
    """In the default precision (auto: bf16 on a CPU with native bf16, fp32 elsewhere), which
    the run records as this machine resolved it."""
    from megaloop.device import CPU, resolve_precision

    proc = run_training(stdlib_shards, tmp_path, **{"train.steps": 30, "train.eval_interval": 10,
                                                    "train.precision": "auto"})
    assert_ok(proc)
    resolved = resolve_precision("auto", CPU)
    run = only_run(tmp_path)
    assert run.data.params["train.precision"] == "auto"
    assert run.data.tags["megaloop.precision"] == resolved
    record = tmp_path / "checkpoints" / run.info.run_name / "megaloop_run.json"
    assert json.loads(record.read_text())["precision"] == resolved
    losses = history(tmp_path)
    assert sorted(losses) == list(range(1, 31))
    first, last = losses[1][0], losses[30][0]
    assert first > math.log(4096) - 0.5  # starts near uniform over the vocabulary
    assert last < first - 1.5, f"loss fell only from {first:.3f} to {last:.3f}"
    val = history(tmp_path, "val/loss")
    assert sorted(val) == [10, 20, 30] and val[30][0] < val[10][0]


def test_run_is_tracked_with_the_documented_names(stdlib_shards, tmp_path):
    proc = run_training(stdlib_shards, tmp_path, **{"track.system_metrics_interval": 0.25})
    assert_ok(proc)
    # --no-progress: one plain line per log interval (every step here), rank 0 only
    lines = [line for line in proc.stdout.splitlines() if line.startswith("megaloop: step ")]
    assert [line.split()[2] for line in lines] == [f"{step}/8" for step in range(1, 9)]
    assert all(" loss " in line and " tok/s " in line and " MFU " in line and " ETA " in line
               for line in lines)
    run = only_run(tmp_path)
    params, tags = run.data.params, run.data.tags
    cfg = config.load(None, ["model.d_model=64", "model.n_heads=4", "model.prelude_layers=1",
                             "model.loop_layers=1", "model.coda_layers=1", "model.recurrences=2",
                             "model.max_seq_len=64", "model.vocab_size=4096"])
    counts = account(cfg.model)
    assert params["model.d_model"] == "64" and params["recurrences"] == "2"
    assert int(params["n_once"]) == counts["n_once"] and int(params["n_rec"]) == counts["n_rec"]
    assert int(params["tokens"]) == 8 * 8 * 64 and "config_hash" in params
    assert tags["megaloop.status"] == "finished" and run.info.status == "FINISHED"
    for key in ("train/loss", "val/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
                "train/mfu"):
        assert key in run.data.metrics, key
    assert 0 < run.data.metrics["train/mfu"] < 1
    assert 0 <= run.data.metrics["system/cpu_utilization_percentage"] <= 100 * os.cpu_count()
    assert run.data.metrics["system/system_memory_usage_megabytes"] > 0
    assert tags["megaloop.checkpoint_dir"] == str(tmp_path / "checkpoints" / run.info.run_name)
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == stdlib_shards.name
    assert dataset.tags[0].value == "training"
    profile = json.loads(dataset.dataset.profile)
    manifest = json.loads((stdlib_shards / "manifest.json").read_text())
    assert profile["splits"]["train"]["tokens"] == manifest["splits"]["train"]["tokens"]
    assert profile["tokenizer_sha256"] == manifest["tokenizer"]["sha256"]
    tokens_seen, flops_seen = history(tmp_path, "train/tokens_seen"), history(tmp_path,
                                                                             "train/flops_seen")
    assert tokens_seen == {step: [step * 8 * 64] for step in range(1, 9)}
    assert flops_seen[8][0] == pytest.approx(8 * 8 * 64 * counts["flops_per_token"])
    artifacts = {a.path for a in client(tmp_path).list_artifacts(run.info.run_id)}
    assert {"ds_config.json", "run_config.yaml"} <= artifacts
    lrs = history(tmp_path, "train/lr")
    train = config.load(None, ["train.steps=8", "train.lr=3e-3", "train.warmup_steps=2"]).train
    for step, values in lrs.items():
        assert values[0] == pytest.approx(lr_at(step - 1, 8, train))


def test_sigkill_and_resume_logs_the_same_losses(stdlib_shards, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    values = {"train.checkpoint_interval": 2, "train.steps": 8}
    assert_ok(run_training(stdlib_shards, straight, **values))

    process = start_training(stdlib_shards, killed, **values)
    marker = next_checkpoint_marker(killed, 4)
    wait_for(marker, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    proc = run_training(stdlib_shards, killed, "--resume", "auto", **values)
    assert_ok(proc)
    assert "resumed from step" in proc.stderr + proc.stdout

    want, got = history(straight), history(killed)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert len(got[step]) == 1, step  # steps trained twice (before the kill and after)
        assert got[step][0] == pytest.approx(want[step][0], abs=1e-6), step
    assert only_run(killed).data.tags["megaloop.status"] == "finished"


def next_checkpoint_marker(workdir, step):
    from megaloop.ckpt.layout import MARKER, tag_of

    run_dirs = workdir / "checkpoints"
    return _Lazy(run_dirs, tag_of(step), MARKER)


class _Lazy:
    """The marker path of a run folder whose name is known only once the run starts."""

    def __init__(self, root, tag, marker):
        self.root, self.tag, self.marker = root, tag, marker

    def exists(self) -> bool:
        return any((run / self.tag / self.marker).exists() for run in self.root.glob("*")) \
            if self.root.exists() else False

    def __str__(self) -> str:
        return f"{self.root}/*/{self.tag}/{self.marker}"


@pytest.mark.slow  # test_run_folder.py's damage that keeps the size runs in the default suite
def test_a_corrupt_latest_checkpoint_is_skipped(stdlib_shards, tmp_path):
    values = {"train.checkpoint_interval": 2, "train.steps": 6, "train.keep_checkpoints": 5}
    assert_ok(run_training(stdlib_shards, tmp_path, **values))
    (run_dir,) = (tmp_path / "checkpoints").iterdir()
    latest = run_dir / "step_00000006" / "mp_rank_00_model_states.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    proc = run_training(stdlib_shards, tmp_path, "--resume", "auto", **values)
    assert_ok(proc)
    assert "Skipping checkpoint" in proc.stderr and "step_00000006" in proc.stderr
    assert "resumed from step 4" in proc.stdout
    assert sorted(history(tmp_path)) == list(range(1, 7))


def test_non_finite_loss_stops_and_marks_the_run_failed(stdlib_shards, tmp_path):
    proc = run_training(stdlib_shards, tmp_path, **{"train.lr": 1e6, "train.warmup_steps": 0,
                                                    "train.steps": 20,
                                                    "train.checkpoint_interval": 1})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "diverged" in proc.stderr and "Traceback" not in proc.stderr
    run = only_run(tmp_path)
    assert run.info.status == "FAILED" and run.data.tags["megaloop.status"] == "failed"
    (run_dir,) = (tmp_path / "checkpoints").iterdir()
    kept = sorted(p.name for p in run_dir.iterdir())
    assert kept, "the last good checkpoint must be kept"
    assert f"the last good checkpoint is {run_dir / kept[-1]}" in proc.stderr


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(stdlib_shards, tmp_path):
    values = {"train.steps": 400, "train.checkpoint_interval": 2, "train.keep_checkpoints": 50}
    process = start_training(stdlib_shards, tmp_path, **values)
    wait_for(next_checkpoint_marker(tmp_path, 2), process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert "stopped by SIGTERM" in output
    (run_dir,) = (tmp_path / "checkpoints").iterdir()
    steps = sorted(int(p.name.split("_")[1]) for p in run_dir.iterdir()
                   if (p / "megaloop_complete.json").exists())
    last_logged = max(history(tmp_path))
    assert steps[-1] == last_logged < 400  # the step it stopped at was saved
    run = only_run(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags["megaloop.status"] == "killed"


def test_ds_config_command_shows_what_runs(capsys):
    from megaloop.cli import main

    assert main(["ds-config", "configs/runs/hyperloop-d2048-hyperloop.yaml", "--set",
                 "train.zero_stage=3", "--set", "train.global_batch=256", "--set",
                 "train.micro_batch=4", "--world-size", "8"]) == 0
    rendered = json.loads(capsys.readouterr().out)
    loop_block = account(config.load("configs/runs/hyperloop-d2048-hyperloop.yaml").model)["loop"]
    zero = rendered["zero_optimization"]
    assert zero["stage"] == 3 and rendered["gradient_clipping"] == 1.0  # the recipe's clip
    assert zero["stage3_max_reuse_distance"] >= 2 * loop_block
    assert zero["stage3_max_live_parameters"] >= 2 * loop_block
    assert rendered["gradient_accumulation_steps"] == 256 // (4 * 8)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_template_renders_with_and_without_offload(stage):
    for offload in ([False, True] if stage else [False]):
        cfg = config.load("configs/runs/tiny.yaml", [f"train.zero_stage={stage}",
                                                      f"train.offload={str(offload).lower()}",
                                                      "train.precision=fp32"])
        rendered = render_ds_config(cfg, 2)
        assert rendered["zero_optimization"]["stage"] == stage
        assert ("offload_optimizer" in rendered["zero_optimization"]) == offload
        assert rendered["train_batch_size"] == 32


def test_the_optimizer_is_fused_adamw_with_the_same_steps_as_torchs_loop():
    """On the CPU the trainer takes torch's fused AdamW; its updates are AdamW's, groups and
    weight decay included, to float32 rounding."""
    run = config.load(RUN_CONFIGS / "tiny.yaml", ["train.weight_decay=0.1", "train.lr=1e-2"])
    torch.manual_seed(0)
    model, twin = LoopedLM(run.model), LoopedLM(run.model)
    twin.load_state_dict(model.state_dict())
    start = model.embed.weight.detach().clone()
    fused = adamw(model, run)
    looped = torch.optim.AdamW(optimizer_groups(twin, run.train.weight_decay), lr=run.train.lr,
                               betas=(run.train.beta1, run.train.beta2), eps=run.train.eps,
                               foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fused.step()
        looped.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name
    assert (model.embed.weight - start).abs().mean() > 1e-3  # the steps moved the weights


@pytest.mark.slow
def test_two_ranks_zero3_match_one_process(stdlib_shards, tmp_path):
    values = {"model.recurrences": 4, "model.activation_checkpointing": "per_recurrence",
              "train.steps": 5, "train.micro_batch": 2, "train.global_batch": 8}
    single, double = tmp_path / "one", tmp_path / "two"
    assert_ok(run_training(stdlib_shards, single, **values))
    assert_ok(run_training(stdlib_shards, double, nproc=2,
                           **{**values, "train.zero_stage": 3}))
    assert_same_losses(single, double, steps=5, tolerance=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_ranks_with_muonh_match_one_process(stage, stdlib_shards, tmp_path):
    """ZeRO-0: each rank orthogonalises its copy of the reduced gradient. ZeRO 1-3: each matrix's
    owning rank takes its step whole and sends the new weight to every rank's shard. Polar
    Express in fp32: in bf16 (the default) the two ranks' reduced gradient, which differs from
    one process's in its last bits, rounds differently, and the linear injection's steps carry
    that to 1e-3 in the loss by step 5 (benchmarks/RESULTS.md); in fp32 both agree to 1e-6."""
    values = {"train.optimizer": "muonh", "train.weight_decay": 0.0, "train.steps": 5,
              "train.micro_batch": 2, "train.global_batch": 8, "train.polar_precision": "fp32"}
    single, double = tmp_path / "one", tmp_path / "two"
    assert_ok(run_training(stdlib_shards, single, **values))
    assert_ok(run_training(stdlib_shards, double, nproc=2,
                           **{**values, "train.zero_stage": stage}))
    assert_same_losses(single, double, steps=5, tolerance=1e-5)


@pytest.mark.slow
def test_two_ranks_zero3_sigkill_and_resume_match(stdlib_shards, tmp_path):
    values = {"train.zero_stage": 3, "train.checkpoint_interval": 2, "train.steps": 6,
              "train.micro_batch": 2, "train.global_batch": 8, "train.keep_checkpoints": 5}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert_ok(run_training(stdlib_shards, straight, nproc=2, **values))
    process = start_training(stdlib_shards, killed, nproc=2, **values)
    wait_for(next_checkpoint_marker(killed, 4), process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert_ok(run_training(stdlib_shards, killed, "--resume", "auto", nproc=2, **values))
    want, got = history(straight), history(killed)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        for value in got[step]:
            assert value == pytest.approx(want[step][0], abs=1e-6), step


@pytest.mark.slow
def test_two_nodes_on_loopback_train_together(stdlib_shards, tmp_path):
    """launch.sh --nnodes 2 --node-rank 0|1 --master-addr 127.0.0.1: one process per node."""
    from training import REPO, TINY_RUN, child_env, overrides

    port = str(free_port())
    args = overrides(stdlib_shards, tmp_path, **{"train.steps": 4, "train.micro_batch": 2,
                                                 "train.global_batch": 4})
    nodes = [subprocess.Popen(
        [str(REPO / "launch.sh"), "train", str(TINY_RUN), *args, "--no-progress", "--nproc", "1",
         "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
         "--master-port", port], cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-3000:]
    run = only_run(tmp_path)
    assert run.data.params["world_size"] == "2"
    assert run.data.tags["megaloop.status"] == "finished"
    assert sorted(history(tmp_path)) == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_cpu_offload_trains_like_the_device_optimizer(stdlib_shards, tmp_path, stage):
    """train.offload: DeepSpeedCPUAdam on the offloaded optimizer state (and, at stage 3, the
    parameters) gives the losses of torch's AdamW without offload."""
    values = {"train.zero_stage": stage, "train.steps": 4, "train.eval_interval": 10**6,
              "train.checkpoint_interval": 10**6}
    plain, offloaded = tmp_path / "plain", tmp_path / "offload"
    assert_ok(run_training(stdlib_shards, plain, **values))
    assert_ok(run_training(stdlib_shards, offloaded, timeout=900,
                           **{**values, "train.offload": True}))
    rendered = client(offloaded).download_artifacts(only_run(offloaded).info.run_id,
                                                    "ds_config.json", str(tmp_path))
    ds_config = json.loads(Path(rendered).read_text())
    assert ds_config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    got = assert_same_losses(plain, offloaded, steps=4, tolerance=1e-4)
    assert sorted(got) == [1, 2, 3, 4]


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(stdlib_shards, tmp_path):
    """train.compile: torch.compile of the blocks (inductor's C++ backend on CPU) gives the
    losses of the eager model."""
    values = {"train.steps": 4, "train.eval_interval": 10**6, "train.checkpoint_interval": 10**6}
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert_ok(run_training(stdlib_shards, eager, **values))
    assert_ok(run_training(stdlib_shards, compiled, timeout=900,
                           **{**values, "train.compile": True}))
    got = assert_same_losses(eager, compiled, steps=4, tolerance=1e-4)
    assert sorted(got) == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_two_ranks_in_bf16_track_fp32_at_1024_positions(stdlib_shards, tmp_path, stage):
    """bf16 as a GPU cluster runs it, on the CPU: two ranks (gloo), ZeRO-0 or ZeRO-3, 1024
    positions (bf16 RoPE tables would have rounded every position above 256), gradients
    accumulated over two micro-batches per rank. Its losses stay within 0.02 nats of one fp32
    process's."""
    values = {"model.max_seq_len": 1024, "model.recurrences": 3, "train.steps": 6,
              "train.micro_batch": 1, "train.global_batch": 4, "train.eval_interval": 10**6,
              "train.checkpoint_interval": 10**6, "train.log_interval": 1}
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    assert_ok(run_training(stdlib_shards, fp32, **values))
    assert_ok(run_training(stdlib_shards, bf16, nproc=2, timeout=900,
                           **{**values, "train.zero_stage": stage, "train.precision": "bf16"}))
    want = assert_same_losses(fp32, bf16, steps=6, tolerance=0.02)
    assert want[6][0] < want[1][0] - 0.5  # it learns, so the comparison means something
    rendered = client(bf16).download_artifacts(only_run(bf16).info.run_id, "ds_config.json",
                                               str(tmp_path))
    ds_config = json.loads(Path(rendered).read_text())
    assert ds_config["torch_autocast"]["enabled"] and ds_config["gradient_accumulation_steps"] == 2
    assert ds_config["data_types"]["grad_accum_dtype"] == "fp32"
