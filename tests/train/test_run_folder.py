"""Run folders that cannot lie: checkpoints verified by content before anything is loaded, one
decision for all ranks, a folder that belongs to one run (its config, its world size, one
process at a time), and checkpoint loading that runs no code."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import free_port
from training import (
    all_runs,
    assert_ok,
    client,
    history,
    only_run,
    run_training,
    start_training,
    wait_for,
)

from megaloop import config
from megaloop.ckpt.layout import MARKER, tag_of
from megaloop.errors import CheckpointError, ConfigError
from megaloop.train.run_folder import LOCK, RECORD, RunFolder

RUN = "the-run"  # every run here has this name: one folder, whatever its config


def run_dir(workdir: Path) -> Path:
    return workdir / "checkpoints" / RUN


def train(shards: Path, workdir: Path, *extra: str, **values) -> subprocess.CompletedProcess:
    return run_training(shards, workdir, *extra, **{"track.run_name": RUN, **values})


def flip_bytes(path: Path, offset: int | None = None) -> None:
    """Damage `path` and keep its size: what a bad disk or a torn copy does."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at:at + 64] = bytes(b ^ 0xFF for b in data[at:at + 64])
    path.write_bytes(bytes(data))


def rehash(checkpoint: Path) -> None:
    """Rewrite the marker's digests for the files as they are now (as a forger would)."""
    from megaloop.atomic import file_digest

    marker = json.loads((checkpoint / MARKER).read_text())
    for name, entry in marker["files"].items():
        entry.update(file_digest(checkpoint / name))
    (checkpoint / MARKER).write_text(json.dumps(marker))


# ---- checkpoints verified by content ------------------------------------------------------


def test_damage_that_keeps_the_size_is_found_before_loading(stdlib_shards, tmp_path):
    values = {"train.checkpoint_interval": 2, "train.steps": 6, "train.keep_checkpoints": 5}
    assert_ok(train(stdlib_shards, tmp_path, **values))
    (straight,) = all_runs(tmp_path)
    newest = run_dir(tmp_path) / tag_of(6)
    flip_bytes(newest / "mp_rank_00_model_states.pt")
    proc = train(stdlib_shards, tmp_path, "--resume", "auto", **values)
    assert_ok(proc)
    assert "mp_rank_00_model_states.pt does not hold the bytes that were written" in proc.stderr
    assert "resumed from step 4" in proc.stdout
    assert (newest.parent / f"{newest.name}.damaged").is_dir()  # kept aside, never loaded
    assert (newest / MARKER).exists()  # step 6 trained again and saved afresh
    want = {m.step: m.value for m in client(tmp_path).get_metric_history(straight.info.run_id,
                                                                          "train/loss")}
    got = history(tmp_path)  # the run that continues the first, from step 4
    assert sorted(got) == list(range(1, 7))
    for step in (5, 6):  # resumed from a good state: the first run's losses
        assert got[step] == pytest.approx([want[step]], abs=1e-6), step


@pytest.mark.slow
def test_a_damaged_rank_file_is_found_before_the_engine_loads_anything(stdlib_shards, tmp_path):
    """The only checkpoint's megaloop_rank00000.pt is damaged: the run starts afresh, with
    fresh weights (its first loss is a fresh run's), not the damaged checkpoint's."""
    values = {"train.checkpoint_interval": 2, "train.steps": 2}
    fresh = tmp_path / "fresh"
    assert_ok(train(stdlib_shards, fresh, **values))
    assert_ok(train(stdlib_shards, tmp_path, **values))
    flip_bytes(run_dir(tmp_path) / tag_of(2) / "megaloop_rank00000.pt")
    summary = tmp_path / "summary.json"
    proc = train(stdlib_shards, tmp_path, "--resume", "auto", "--json", str(summary), **values)
    assert_ok(proc)
    assert "megaloop_rank00000.pt does not hold the bytes" in proc.stderr
    run_id = json.loads(summary.read_text())["run_id"]
    first = client(tmp_path).get_metric_history(run_id, "train/loss")
    assert [m.step for m in first] == [1, 2]
    assert first[0].value == pytest.approx(history(fresh)[1][0], abs=1e-6)


@pytest.mark.slow
def test_keep_one_with_a_damaged_newest_keeps_what_is_saved_after_it(stdlib_shards, tmp_path):
    """keep_checkpoints: 1 and the one kept is damaged: the run starts afresh and keeps its
    new checkpoints (the damaged one no longer counts as the newest), so a second kill loses
    only the steps since the last of them."""
    values = {"train.checkpoint_interval": 10, "train.steps": 40, "train.keep_checkpoints": 1,
              "train.eval_interval": 1000}
    assert_ok(train(stdlib_shards, tmp_path, **values))
    flip_bytes(run_dir(tmp_path) / tag_of(40) / "mp_rank_00_model_states.pt")
    process = start_training(stdlib_shards, tmp_path, "--resume", "auto",
                             **{"track.run_name": RUN, **values})
    wait_for(run_dir(tmp_path) / tag_of(10) / MARKER, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    proc = train(stdlib_shards, tmp_path, "--resume", "auto", **values)
    assert_ok(proc)
    assert "resumed from step 10" in proc.stdout
    assert sorted(p.name for p in run_dir(tmp_path).iterdir() if p.name.startswith("step_")) \
        == [tag_of(40), f"{tag_of(40)}.damaged"]


@pytest.mark.slow
def test_an_unmarked_newest_checkpoint_is_skipped_with_a_warning(stdlib_shards, tmp_path):
    values = {"train.checkpoint_interval": 2, "train.steps": 4, "train.keep_checkpoints": 5}
    assert_ok(train(stdlib_shards, tmp_path, **values))
    (run_dir(tmp_path) / tag_of(4) / MARKER).unlink()
    proc = train(stdlib_shards, tmp_path, "--resume", "auto", **values)
    assert_ok(proc)
    assert f"Skipping checkpoint {run_dir(tmp_path) / tag_of(4)}: it has no marker" in proc.stderr
    assert "resumed from step 2" in proc.stdout
    assert (run_dir(tmp_path) / f"{tag_of(4)}.incomplete").is_dir()


@pytest.mark.slow
def test_resume_auto_with_nothing_to_resume_says_so(stdlib_shards, tmp_path):
    proc = train(stdlib_shards, tmp_path, "--resume", "auto", **{"train.steps": 2})
    assert_ok(proc)
    assert "nothing to resume" in proc.stdout + proc.stderr


# ---- loading runs no code ---------------------------------------------------------------------


class Payload:
    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (Path(self.sentinel),))


def test_a_checkpoint_that_would_run_code_is_refused(stdlib_shards, tmp_path):
    values = {"train.checkpoint_interval": 2, "train.steps": 2}
    assert_ok(train(stdlib_shards, tmp_path, **values))
    checkpoint = run_dir(tmp_path) / tag_of(2)
    states = checkpoint / "mp_rank_00_model_states.pt"
    sentinel = tmp_path / "code-ran"
    saved = torch.load(states, weights_only=False)
    saved["payload"] = Payload(str(sentinel))
    torch.save(saved, states)
    rehash(checkpoint)  # the attacker also forges the marker
    proc = train(stdlib_shards, tmp_path, "--resume", "auto", **values)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--trust-checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert not sentinel.exists()


def test_deepspeeds_own_loads_run_no_code_while_a_checkpoint_is_resharded(tmp_path):
    """DeepSpeed's universal-checkpoint conversion and loader call torch.load with
    weights_only=False themselves; inside `loads_without_code` they are refused code."""
    from megaloop.ckpt.reading import loads_without_code

    sentinel, path = tmp_path / "code-ran", tmp_path / "optim_states.pt"
    torch.save({"state": torch.ones(2), "payload": Payload(str(sentinel))}, path)
    refused = pytest.raises(CheckpointError, match="--trust-checkpoint")
    with loads_without_code(trust=False), refused:
        torch.load(path, weights_only=False)
    assert not sentinel.exists()
    with loads_without_code(trust=False):  # tensors and plain data load as ever
        torch.save({"state": torch.ones(2)}, path)
        assert torch.load(path, weights_only=False)["state"].sum() == 2
    assert torch.load is torch.serialization.load  # torch's own again afterwards


# ---- a run folder belongs to one run ----------------------------------------------------------


@pytest.mark.slow
def test_resume_with_another_config_is_refused_and_names_the_change(stdlib_shards, tmp_path):
    assert_ok(train(stdlib_shards, tmp_path, **{"train.steps": 4}))
    before = (run_dir(tmp_path) / RECORD).read_text()
    proc = train(stdlib_shards, tmp_path, "--resume", "auto", **{"model.d_model": 128,
                                                                  "train.steps": 4})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "model.d_model: 64 -> 128" in proc.stderr and "Traceback" not in proc.stderr
    assert (run_dir(tmp_path) / RECORD).read_text() == before
    assert len(all_runs(tmp_path)) == 1 and only_run(tmp_path).info.status == "FINISHED"


@pytest.mark.slow
def test_train_without_resume_refuses_a_folder_with_checkpoints(stdlib_shards, tmp_path):
    assert_ok(train(stdlib_shards, tmp_path, **{"train.steps": 4}))
    proc = train(stdlib_shards, tmp_path, **{"train.steps": 4, "train.lr": 1e-3})
    assert proc.returncode == 2 and "another run's checkpoints" in proc.stderr
    assert "--resume auto" in proc.stderr
    assert len(all_runs(tmp_path)) == 1


def test_a_change_on_purpose_is_trained_and_recorded_as_trained(stdlib_shards, tmp_path):
    values = {"train.steps": 4, "train.checkpoint_interval": 4}
    assert_ok(train(stdlib_shards, tmp_path, **values))
    more = {**values, "train.steps": 6, "train.lr": 2e-3, "model.recurrences": 3}
    refused = train(stdlib_shards, tmp_path, "--resume", "auto", **more)
    assert refused.returncode == 2 and "--accept-changes" in refused.stderr
    assert "train.steps: 4 -> 6" in refused.stderr
    proc = train(stdlib_shards, tmp_path, "--resume", "auto", "--accept-changes", **more)
    assert_ok(proc)
    run = only_run(tmp_path)
    assert run.data.params["recurrences"] == "3" and run.data.params["train.steps"] == "6"
    assert int(run.data.params["tokens"]) == 6 * 8 * 64
    assert "model.recurrences: 2 -> 3" in run.data.tags["megaloop.changes"]
    assert sorted(history(tmp_path)) == list(range(1, 7))
    record = json.loads((run_dir(tmp_path) / RECORD).read_text())
    assert record["config"]["train"]["steps"] == 6
    assert record["continuations"][0]["changes"]["train.lr"] == [3e-3, 2e-3]


@pytest.mark.slow
def test_a_second_process_on_the_same_run_is_refused(stdlib_shards, tmp_path):
    values = {"train.steps": 400, "train.checkpoint_interval": 2, "train.keep_checkpoints": 2}
    first = start_training(stdlib_shards, tmp_path, **{"track.run_name": RUN, **values})
    try:
        wait_for(run_dir(tmp_path) / tag_of(2) / MARKER, first)
        second = train(stdlib_shards, tmp_path, "--resume", "auto", **values)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by process {first.pid}" in second.stderr or "in use" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 0
    assert not (run_dir(tmp_path) / LOCK).exists()  # released at the end


def test_a_run_name_is_a_name_not_a_path():
    for name in ("../../../x", "a/b", ".", "..", ".hidden"):
        with pytest.raises(ConfigError, match="is not a name"):
            config.load(None, [f"track.run_name={name}"])


def test_a_checkpoint_dir_that_cannot_be_written_is_found_at_start(stdlib_shards, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = train(stdlib_shards, tmp_path, **{"train.checkpoint_dir": str(blocker / "ckpt"),
                                             "train.steps": 50, "train.checkpoint_interval": 40})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.checkpoint_dir" in proc.stderr
    assert "train.checkpoint_dir" in proc.stderr and "step 40" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # refused before an MLflow run was made


# ---- the run folder's rules, one by one (no training) -----------------------------------------


def tiny(**values) -> config.RunConfig:
    return config.load(None, [f"{k}={v}" for k, v in values.items()])


def test_a_stale_lock_is_taken_over_and_a_live_one_refuses(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    import socket

    (folder.lock_file).write_text(json.dumps({"host": socket.gethostname(),
                                              "pid": int(dead.stdout), "started": "then"}))
    folder.lock()  # the owner is gone: taken over
    assert json.loads(folder.lock_file.read_text())["pid"] == os.getpid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder.unlock()
        folder.lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid,
                                                "started": "now"}))
        with pytest.raises(CheckpointError, match=f"in use by process {live.pid}"):
            RunFolder(folder.path).lock()
    finally:
        live.kill()
        live.wait()


def test_a_requeued_slurm_task_takes_over_its_own_lock(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.lock_file.write_text(json.dumps({"host": "another-node", "pid": 1, "slurm": "77:3"}))
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    folder.lock()
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    folder.unlock()
    folder.lock_file.write_text(json.dumps({"host": "another-node", "pid": 1, "slurm": "77:3"}))
    with pytest.raises(CheckpointError, match="in use"):
        RunFolder(folder.path).lock()


def test_the_resolved_precision_is_recorded_and_another_on_resume_is_a_change(tmp_path):
    cfg = tiny(**{"train.checkpoint_dir": str(tmp_path)})  # train.precision: auto
    folder = RunFolder(tmp_path / "run")
    folder.claim(cfg, world_size=1, resume=None, precision="bf16")
    folder.unlock()
    record = folder.record()
    assert record["precision"] == "bf16" and record["config"]["train"]["precision"] == "auto"
    assert record["config_hash"] == cfg.hash()
    assert folder.claim(cfg, world_size=1, resume="auto", precision="bf16").changes == {}
    folder.unlock()
    with pytest.raises(ConfigError, match="precision: 'bf16' -> 'fp32'.*--accept-changes"):
        folder.claim(cfg, world_size=1, resume="auto", precision="fp32")
    claim = folder.claim(cfg, world_size=1, resume="auto", accept_changes=True,
                         precision="fp32")
    folder.unlock()
    assert claim.changes == {"precision": ("bf16", "fp32")}
    assert folder.record()["precision"] == "fp32"
    assert folder.record()["continuations"][-1]["changes"] == {"precision": ["bf16", "fp32"]}


def test_the_world_size_changes_on_purpose_and_locked_keys_cannot_change(tmp_path):
    cfg = tiny(**{"train.checkpoint_dir": str(tmp_path)})
    folder = RunFolder(tmp_path / "run")
    folder.claim(cfg, world_size=2, resume=None)
    folder.unlock()
    with pytest.raises(CheckpointError, match="trained on 2 ranks; this start has 1.*"
                                              "--accept-changes to reshard"):
        folder.claim(cfg, world_size=1, resume="auto")
    muonh = tiny(**{"train.checkpoint_dir": str(tmp_path), "train.optimizer": "muonh",
                    "train.zero_stage": 1, "train.grad_clip": 0.0})
    muonh_folder = RunFolder(tmp_path / "muonh")
    muonh_folder.claim(muonh, world_size=2, resume=None)
    muonh_folder.unlock()
    with pytest.raises(CheckpointError, match="reshards Adam's moments only"):
        muonh_folder.claim(muonh, world_size=1, resume="auto", accept_changes=True)
    claim = folder.claim(cfg, world_size=1, resume="auto", accept_changes=True)
    assert claim.changes == {"world_size": (2, 1)}
    assert "train.eval_tokens keeps one set" in claim.note
    folder.unlock()
    record = folder.record()
    assert record["world_size"] == 1
    assert record["continuations"][-1]["changes"] == {"world_size": [2, 1]}
    folder.claim(cfg, world_size=2, resume="auto", accept_changes=True)  # and back
    folder.unlock()
    wider = tiny(**{"train.checkpoint_dir": str(tmp_path), "train.zero_stage": 3})
    with pytest.raises(ConfigError, match="train.zero_stage: 0 -> 3"):
        folder.claim(wider, world_size=2, resume="auto", accept_changes=True)
    freely = tiny(**{"train.checkpoint_dir": str(tmp_path), "train.log_interval": 1})
    claim = folder.claim(freely, world_size=2, resume="auto")
    assert list(claim.changes) == ["train.log_interval"]
    folder.unlock()


# ---- signals on several ranks -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["local", "torchrun"])
def test_sigterm_on_two_ranks_exits_0_once_both_saved(stdlib_shards, tmp_path, rendezvous):
    """SIGTERM to the whole job (as SLURM sends it): the launcher passes it on, both ranks save
    and stop, and launch.sh exits 0 with one line, no traceback: megaloop's local ranks, and
    torchrun's (a static address, as on several nodes)."""
    from training import REPO, TINY_RUN, child_env, overrides

    values = {"track.run_name": RUN, "train.steps": 400, "train.checkpoint_interval": 2,
              "train.keep_checkpoints": 50, "train.micro_batch": 2}
    address = [] if rendezvous == "local" else ["--master-port", str(free_port())]
    command = [str(REPO / "launch.sh"), "train", str(TINY_RUN), "--nproc", "2", *address,
               "--no-progress", *overrides(stdlib_shards, tmp_path, **values)]
    process = subprocess.Popen(command, cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(run_dir(tmp_path) / tag_of(2) / MARKER, process)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output[-4000:]
    assert "every rank saved its checkpoint" in output and "Traceback" not in output
    run = only_run(tmp_path)
    assert run.info.status == "KILLED"
    marked = [p for p in run_dir(tmp_path).iterdir() if (p / MARKER).exists()]
    newest = max(marked, key=lambda p: p.name)
    marker = json.loads((newest / MARKER).read_text())
    assert {entry["rank"] for entry in marker["files"].values()} == {0, 1}


@pytest.mark.slow
def test_two_zero3_ranks_resume_from_the_one_checkpoint_both_find_whole(stdlib_shards, tmp_path):
    """Rank 1's optimizer shard of the newest checkpoint is damaged: both ranks skip it and
    resume from the one before, so the losses are a straight run's."""
    values = {"track.run_name": RUN, "train.zero_stage": 3, "train.checkpoint_interval": 2,
              "train.steps": 6, "train.micro_batch": 2, "train.keep_checkpoints": 5}
    straight = tmp_path / "straight"
    assert_ok(run_training(stdlib_shards, straight, nproc=2, **values))
    assert_ok(run_training(stdlib_shards, tmp_path, nproc=2, **values))
    newest = run_dir(tmp_path) / tag_of(6)
    flip_bytes(newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    proc = run_training(stdlib_shards, tmp_path, "--resume", "auto", nproc=2, **values)
    assert_ok(proc)
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt does not hold the bytes" in proc.stderr
    assert proc.stdout.count("resumed from step 4") == 1  # rank 0 speaks for both
    want, got = history(straight), history(tmp_path)
    for step in (5, 6):
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    marker = json.loads((newest / MARKER).read_text())
    assert {entry["rank"] for entry in marker["files"].values()} == {0, 1}
    assert only_run(tmp_path).data.tags["megaloop.status"] == "finished"


@pytest.mark.slow
@pytest.mark.parametrize(("saved_by", "resumed_on", "stage"), [(2, 1, 3), (1, 2, 1)])
def test_a_checkpoint_is_resharded_onto_another_number_of_ranks_on_purpose(
        stdlib_shards, tmp_path, saved_by, resumed_on, stage):
    """The run is stopped after step 4's checkpoint and continued on another number of ranks
    (DeepSpeed's universal checkpoint): its losses are those of a straight run, and MLflow
    holds one run with one entry per step and the world size in force."""
    values = {"track.run_name": RUN, "train.zero_stage": stage, "train.checkpoint_interval": 2,
              "train.steps": 6, "train.micro_batch": 2, "train.keep_checkpoints": 5}
    straight = tmp_path / "straight"
    assert_ok(run_training(stdlib_shards, straight, nproc=saved_by, **values))
    assert_ok(run_training(stdlib_shards, tmp_path, nproc=saved_by, **values))
    shutil.rmtree(run_dir(tmp_path) / tag_of(6))  # as if stopped after step 4's checkpoint
    refused = run_training(stdlib_shards, tmp_path, "--resume", "auto", nproc=resumed_on,
                           **values)
    assert refused.returncode == 2  # a rank's refusal is the node's exit status
    assert f"trained on {saved_by} ranks; this start has {resumed_on}" in refused.stderr
    assert "--accept-changes" in refused.stderr
    proc = run_training(stdlib_shards, tmp_path, "--resume", "auto", "--accept-changes",
                        nproc=resumed_on, **values)
    assert_ok(proc)
    assert f"world_size: {saved_by} -> {resumed_on}" in proc.stdout
    assert "resumed from step 4" in proc.stdout
    want, got = history(straight), history(tmp_path)
    assert sorted(got) == list(range(1, 7)) and all(len(v) == 1 for v in got.values())
    for step in (5, 6):
        assert got[step] == pytest.approx(want[step], abs=1e-5), step
    assert not (run_dir(tmp_path) / "resharded").exists()
    marker = json.loads((run_dir(tmp_path) / tag_of(6) / MARKER).read_text())
    assert marker["world_size"] == resumed_on
    run = only_run(tmp_path)
    assert run.data.params["world_size"] == str(resumed_on)
    assert json.loads((run_dir(tmp_path) / RECORD).read_text())["world_size"] == resumed_on


def limit_file_size(limit: int):
    """A child's files cannot outgrow `limit` bytes: its writes beyond fail as on a full disk
    (EFBIG; SIGXFSZ ignored), while the MLflow store, under 1 MB, is written as usual."""
    import resource

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_a_save_that_fails_stops_the_run_and_keeps_the_last_checkpoint(stdlib_shards, tmp_path):
    from training import child_env, train_command

    values = {"track.run_name": RUN, "train.checkpoint_interval": 2, "train.steps": 4,
              "train.keep_checkpoints": 5}
    assert_ok(run_training(stdlib_shards, tmp_path, **values))
    longer = {**values, "train.steps": 8}
    command = train_command(stdlib_shards, tmp_path, "--resume", "auto", "--accept-changes",
                            **longer)
    full = subprocess.run(command, cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                          timeout=300, preexec_fn=limit_file_size(3 * 2**20))
    assert full.returncode == 2, full.stderr[-3000:]
    assert f"Saving checkpoint {run_dir(tmp_path) / tag_of(6)} failed on rank 0" in full.stderr
    assert "Traceback" not in full.stderr
    assert not (run_dir(tmp_path) / tag_of(6) / MARKER).exists()  # never loaded
    assert (run_dir(tmp_path) / tag_of(4) / MARKER).exists()
    assert only_run(tmp_path).info.status == "FAILED"
    again = run_training(stdlib_shards, tmp_path, "--resume", "auto", **longer)
    assert_ok(again)
    assert "resumed from step 4" in again.stdout


def test_r_cannot_change_where_hyper_connections_have_parameters_per_recurrence(tmp_path):
    values = {"train.checkpoint_dir": str(tmp_path), "model.hyper": "hyperloop",
              "model.injection": "passthrough", "model.recurrences": 3}
    folder = RunFolder(tmp_path / "run")
    folder.claim(tiny(**values), world_size=1, resume=None)
    folder.unlock()
    with pytest.raises(ConfigError, match="model.recurrences: 3 -> 4"):
        folder.claim(tiny(**{**values, "model.recurrences": 4}), world_size=1, resume="auto",
                     accept_changes=True)
