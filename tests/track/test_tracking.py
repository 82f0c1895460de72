"""megaloop.track against real MLflow: sqlite stores under tmp_path and a real `mlflow server`.

Creating an MLflow sqlite store runs its migrations (~10 s on 2 cores), so one migrated store is
made per session and each test works on its own copy.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from tiny import REPO, free_port
from training import stop_group

from megaloop import config as cfg
from megaloop.errors import MegaloopError
from megaloop.track import (
    NullTracker,
    Tracker,
    find_runs,
    open_tracker,
    run_params,
    run_tags,
    tracking_uri,
)

ROOT = Path(__file__).resolve().parents[2]
DERIVED = {"n_once": 1000, "n_rec": 2000, "tokens": 65536, "budget_flops": 1.5e12,
           "flops_per_token": 30000.0}
TINY = {"vocab_size": 4096, "d_model": 128, "n_heads": 4, "prelude_layers": 1, "loop_layers": 2,
        "recurrences": 2, "coda_layers": 1, "max_seq_len": 256}


def make_config(uri: str, **track) -> cfg.RunConfig:
    return cfg.from_dict({"model": TINY, "track": {"experiment": "test", "tracking_uri": uri,
                                                   **track}})


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory) -> Path:
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, migrated_store) -> str:
    shutil.copy(migrated_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(uri).get_metric_history(run_id, key)]


def test_run_records_params_metrics_tags_and_artifacts(store, tmp_path):
    config = make_config(store)
    tracker = open_tracker(config, rank=0, world_size=2, derived=DERIVED)
    assert isinstance(tracker, Tracker)
    for step in range(5):
        tracker.log_metrics({"train/loss": 5.0 - step, "train/lr": 1e-4 * step,
                             "train/tokens_per_s": 1000.0, "train/mfu": 0.1}, step=step)
    tracker.log_metrics({"train/grad_norm": float("nan"), "train/peak_mem_gib": 1.5}, step=4)
    tracker.log_metrics({"val/loss": 3.25, "val/bpb": 1.1}, step=4)
    tracker.log_text("train:\n  lr: 0.0003\n", "run_config.yaml")
    tracker.log_text(json.dumps({"zero_optimization": {"stage": 0}}), "ds_config.json")
    tracker.set_tags({"note": "hello", "attempt": 1})
    tracker.finish("FINISHED")
    tracker.finish("FINISHED")  # idempotent

    run = client(store).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"r2-d128-{config.hash()}"
    params = run.data.params
    assert params == run_params(config, DERIVED)
    assert params["model.d_model"] == "128" and params["train.lr"] == "0.0003"
    assert params["n_once"] == "1000" and params["n_rec"] == "2000"
    assert params["recurrences"] == "2" and params["tokens"] == "65536"
    assert float(params["budget_flops"]) == 1.5e12 and params["config_hash"] == config.hash()
    assert history(store, tracker.run_id, "train/loss") == [(s, 5.0 - s) for s in range(5)]
    assert run.data.metrics["val/loss"] == 3.25 and run.data.metrics["val/bpb"] == 1.1
    assert math.isnan(run.data.metrics["train/grad_norm"])  # non-finite values are kept
    tags = run.data.tags
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip() or "unknown"
    assert tags["megaloop.git_commit"] == commit
    assert tags["megaloop.host"] == socket.gethostname()
    assert tags["megaloop.world_size"] == "2"
    assert tags["megaloop.version.python"] == platform.python_version()
    import mlflow
    import torch

    assert tags["megaloop.version.mlflow"] == mlflow.__version__
    assert tags["megaloop.version.torch"] == torch.__version__
    assert tags["megaloop.version.deepspeed"]
    assert tags["megaloop.version.megaloop"] == "0.1.0"
    assert tags["megaloop.status"] == "finished" and tags["megaloop.config_hash"] == config.hash()
    assert tags["note"] == "hello" and tags["attempt"] == "1"
    files = {f.path for f in client(store).list_artifacts(tracker.run_id)}
    assert files == {"run_config.yaml", "ds_config.json"}
    local = client(store).download_artifacts(tracker.run_id, "run_config.yaml", str(tmp_path))
    assert Path(local).read_text() == "train:\n  lr: 0.0003\n"
    # artifacts live beside the sqlite store, not in the working directory's ./mlruns
    assert run.info.artifact_uri.startswith((tmp_path / "artifacts").as_uri())
    with pytest.raises(RuntimeError):
        tracker.log_metrics({"train/loss": 1.0}, step=5)


def test_failed_and_killed_runs(store):
    with pytest.raises(ZeroDivisionError), open_tracker(make_config(store), rank=0, world_size=1,
                                                        derived=DERIVED) as tracker:
        tracker.log_metrics({"train/loss": 4.0}, step=0)
        1 / 0  # noqa: B018
    run = client(store).get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.tags["megaloop.status"] == "failed"
    assert run.data.metrics["train/loss"] == 4.0
    killed = open_tracker(make_config(store, run_name="k"), rank=0, world_size=1, derived=DERIVED)
    killed.finish("KILLED")
    run = client(store).get_run(killed.run_id)
    assert run.info.status == "KILLED" and run.data.tags["megaloop.status"] == "killed"
    assert run.info.run_name == "k"
    with pytest.raises(ValueError):
        killed.finish("DONE")


RESUME = textwrap.dedent("""
    import sys
    from megaloop import config
    from megaloop.track import open_tracker
    uri, run_id = sys.argv[1], sys.argv[2]
    run = config.from_dict({"model": %r, "train": {"steps": 2000},
                            "track": {"experiment": "test", "tracking_uri": uri}})
    tracker = open_tracker(run, rank=0, world_size=1, derived=%r, resume_run_id=run_id,
                           resume_step=2)
    for step in range(3, 6):
        tracker.log_metrics({"train/loss": 10.0 + step}, step=step)
    tracker.finish("FINISHED")
""") % (TINY, DERIVED)


def test_resume_continues_the_same_run_in_a_new_process(store):
    first = open_tracker(make_config(store), rank=0, world_size=1, derived=DERIVED)
    for step in range(3):
        first.log_metrics({"train/loss": 10.0 + step}, step=step)
    first.finish("KILLED")
    assert client(store).get_run(first.run_id).info.status == "KILLED"

    done = subprocess.run([sys.executable, "-c", RESUME, store, first.run_id], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    # train.steps changed: MLflow keeps a param's first value, so a new run continues the old
    old = client(store).get_run(first.run_id)
    new_id = old.data.tags["megaloop.continued_in"]
    assert old.info.status == "KILLED" and old.data.tags["megaloop.status"] == "superseded"
    run = client(store).get_run(new_id)
    assert run.info.status == "FINISHED" and run.data.tags["megaloop.status"] == "finished"
    assert history(store, new_id, "train/loss") == [(s, 10.0 + s) for s in range(6)]
    assert run.data.params["train.steps"] == "2000"  # the config in force
    assert run.data.tags["megaloop.continues"] == first.run_id
    assert run.data.tags["megaloop.resumes"] == "1"
    assert run.info.run_name == old.info.run_name


def killed_after_step_4_and_resumed(store: str, resume_step: int) -> tuple[Tracker, Tracker]:
    first = open_tracker(make_config(store), rank=0, world_size=1, derived=DERIVED)
    for step in range(1, 5):
        first.log_metrics({"train/loss": 10.0 + step}, step=step)
    first.finish("KILLED")
    return first, open_tracker(make_config(store), rank=0, world_size=1, derived=DERIVED,
                               resume_run_id=first.run_id, resume_step=resume_step)


def test_a_resume_of_the_same_config_continues_the_same_run(store):
    first, again = killed_after_step_4_and_resumed(store, resume_step=4)
    assert again.run_id == first.run_id
    again.log_metrics({"train/loss": 15.0}, step=5)
    again.finish("FINISHED")
    assert history(store, first.run_id, "train/loss") == [(s, 10.0 + s) for s in range(1, 6)]


def test_steps_retrained_after_a_kill_are_logged_once(store):
    """A kill after step 4 but before its next checkpoint (step 2 here): steps 3 and 4 are
    trained again. The continuing run holds steps 1-2 of the first and its own 3-4, once."""
    first, again = killed_after_step_4_and_resumed(store, resume_step=2)
    assert again.run_id != first.run_id
    for step in (3, 4):
        again.log_metrics({"train/loss": 20.0 + step}, step=step)
    again.finish("FINISHED")
    assert history(store, again.run_id, "train/loss") == [(1, 11.0), (2, 12.0), (3, 23.0),
                                                           (4, 24.0)]
    finished = find_runs("test", tracking=store)
    assert [run["run_id"] for run in finished] == [again.run_id]


def test_resume_of_an_unknown_run_says_how_to_mend(store):
    with pytest.raises(MegaloopError, match="not in"):
        open_tracker(make_config(store), rank=0, world_size=1, derived=DERIVED,
                     resume_run_id="0123456789abcdef0123456789abcdef")


def test_null_tracker_creates_nothing(store, tmp_path):
    unused = tmp_path / "unused" / "mlflow.db"
    for config, rank in [(make_config(store), 1), (make_config(store, enabled=False), 0),
                         (make_config(f"sqlite:///{unused}"), 3)]:
        tracker = open_tracker(config, rank=rank, world_size=4, derived=DERIVED)
        assert isinstance(tracker, NullTracker) and tracker.run_id is None
        with tracker:
            tracker.log_metrics({"train/loss": 1.0}, step=0)
            tracker.log_text("x", "a.txt")
            tracker.set_tags({"a": "b"})
            tracker.flush()
        tracker.finish("FINISHED")
    assert not unused.parent.exists()
    assert client(store).get_experiment_by_name("test") is None
    experiments = [e.experiment_id for e in client(store).search_experiments()]
    assert client(store).search_runs(experiments) == []


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = cfg.TrackConfig()
    assert tracking_uri(default) == f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db"
    assert (tmp_path / "runs").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert tracking_uri(default) == "http://127.0.0.1:9"
    assert tracking_uri(cfg.TrackConfig(tracking_uri="sqlite:///x.db")) == "sqlite:///x.db"


@pytest.mark.parametrize("where", ["outside any repository", "inside another repository"])
def test_the_commit_is_megaloops_own_wherever_it_runs(tmp_path, monkeypatch, where):
    """The commit tag names the code that trained: megaloop's checkout, not the working
    directory's repository (a user's project) and not 'unknown' outside one."""
    monkeypatch.chdir(tmp_path)
    if where == "inside another repository":
        subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=x", "-c", "user.email=x@x",
                        "commit", "-q", "--allow-empty", "-m", "theirs"], check=True)
    own = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    if not own:
        pytest.skip("megaloop runs from an installed copy here, not a checkout")
    tags = run_tags(8)
    assert tags["megaloop.git_commit"] == own == tags["mlflow.source.git.commit"]
    assert tags["megaloop.world_size"] == "8"


def test_an_installed_copy_names_no_commit(tmp_path, monkeypatch):
    from megaloop import version

    monkeypatch.setattr(version, "PACKAGE", tmp_path / "site-packages" / "megaloop")
    assert version.source_commit() == (None, None)
    assert "installed" in version.describe()
    assert run_tags(1)["megaloop.git_commit"] == "unknown"


def test_find_runs_returns_finished_runs_with_params_and_latest_metrics(store, tmp_path):
    ids = {}
    for name, status, loss in [("a", "FINISHED", 3.0), ("b", "FAILED", 9.0),
                               ("c", "FINISHED", 2.5)]:
        tracker = open_tracker(make_config(store, run_name=name), rank=0, world_size=1,
                               derived=DERIVED)
        tracker.log_metrics({"val/loss": loss + 1}, step=1)
        tracker.log_metrics({"val/loss": loss}, step=2)
        if name == "c":
            tracker.set_tags({"sweep.cell": "c'1"})
        tracker.finish(status)
        ids[name] = tracker.run_id
    running = open_tracker(make_config(store, run_name="d"), rank=0, world_size=1,
                           derived=DERIVED)

    runs = find_runs("test", tracking=store)
    assert [r["name"] for r in runs] == ["a", "c"]
    assert runs[0]["run_id"] == ids["a"] and runs[0]["status"] == "finished"
    assert runs[0]["metrics"] == {"val/loss": 3.0} and runs[1]["metrics"] == {"val/loss": 2.5}
    assert runs[0]["params"]["n_once"] == "1000" and runs[0]["tags"]["megaloop.host"]
    assert [r["name"] for r in find_runs("test", tracking=store, status="failed")] == ["b"]
    assert [r["name"] for r in find_runs("test", tracking=store, status=None)] == list("abcd")
    assert [r["name"] for r in find_runs("test", tracking=store, status="running")] == ["d"]
    hashed = find_runs("test", tracking=store, filter_tags={"megaloop.config_hash":
                                                             runs[0]["params"]["config_hash"]})
    assert [r["name"] for r in hashed] == ["a"]  # the run name is part of the config hash
    quoted = find_runs("test", tracking=store, filter_tags={"sweep.cell": "c'1"})
    assert [r["name"] for r in quoted] == ["c"]
    assert find_runs("nope", tracking=store) == []
    missing = tmp_path / "missing.db"
    assert find_runs("test", tracking=f"sqlite:///{missing}") == [] and not missing.exists()
    running.finish("FINISHED")


@pytest.mark.serial  # it times itself: alone, not beside another test
def test_log_metrics_is_queued_and_sent_in_batches(store):
    tracker = open_tracker(make_config(store), rank=0, world_size=1, derived=DERIVED)
    start = time.perf_counter()
    for step in range(1000):
        tracker.log_metrics({"train/loss": float(step)}, step=step)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.1, f"1000 log_metrics calls took {elapsed:.3f} s on the calling thread"
    tracker.flush()
    assert history(store, tracker.run_id, "train/loss") == [(s, float(s)) for s in range(1000)]
    assert tracker._sender.batches <= 5  # one log_batch per <= 1000 values or per second
    for step in range(1000, 1500):
        tracker.log_metrics({"train/loss": float(step), "train/lr": 0.1}, step=step)
    tracker.finish("FINISHED")
    values = history(store, tracker.run_id, "train/loss")
    assert values == [(s, float(s)) for s in range(1500)]
    assert tracker._sender.batches <= 8


def test_errors_of_the_sending_thread_are_reported(store):
    tracker = open_tracker(make_config(store), rank=0, world_size=1, derived=DERIVED)
    with pytest.raises(ValueError, match="not accepted"):
        tracker.log_metrics({"train/../loss": 1.0}, step=0)
    client(store).delete_run(tracker.run_id)  # MLflow now refuses the run's metrics
    tracker.log_metrics({"train/loss": 1.0, "train/lr": 0.1}, step=0)
    with pytest.raises(MegaloopError, match="2 metric values could not be sent"):
        tracker.flush()
    client(store).restore_run(tracker.run_id)
    tracker.log_metrics({"train/loss": 2.0}, step=1)
    tracker.finish("FINISHED")  # the error was reported once; later values arrive
    assert history(store, tracker.run_id, "train/loss") == [(1, 2.0)]


# --- a real tracking server over the same store -----------------------------------------------


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def server(store, tmp_path):
    """`mlflow server` (uvicorn, one worker) over the test's sqlite store; its base URL."""
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--artifacts-destination", str(tmp_path / "mlartifacts")],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).read()
                break
            except (urllib.error.URLError, OSError):
                log_text = (tmp_path / "server.log").read_text()[-3000:]
                assert proc.poll() is None, f"mlflow server exited:\n{log_text}"
                assert time.monotonic() < deadline, f"mlflow server did not answer:\n{log_text}"
                time.sleep(0.2)
        yield url
    finally:
        stop_group(proc, timeout=15)
        log.close()


def test_mlflow_server_serves_runs_and_takes_a_tracker(store, server, tmp_path):
    local = open_tracker(make_config(store, run_name="local"), rank=0, world_size=1,
                         derived=DERIVED)
    for step in range(3):
        local.log_metrics({"train/loss": 4.0 - step, "val/loss": 4.5 - step}, step=step)
    local.finish("FINISHED")

    got = _get(f"{server}/api/2.0/mlflow/runs/get?run_id={local.run_id}")["run"]
    assert got["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in got["data"]["params"]}
    assert params["model.d_model"] == "128" and params["n_rec"] == "2000"
    metrics = {m["key"]: m["value"] for m in got["data"]["metrics"]}
    assert metrics == {"train/loss": 2.0, "val/loss": 2.5}
    tags = {t["key"]: t["value"] for t in got["data"]["tags"]}
    assert tags["megaloop.status"] == "finished"

    remote = open_tracker(make_config(server, experiment="served", run_name="remote"), rank=0,
                          world_size=1, derived=DERIVED)
    for step in range(20):
        remote.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    remote.log_metrics({"val/loss": 0.5}, step=19)
    remote.log_text("{}", "ds_config.json")
    remote.finish("FINISHED")

    served = client(store).get_experiment_by_name("served")  # the server wrote our store
    found = _post(f"{server}/api/2.0/mlflow/runs/search",
                  {"experiment_ids": [served.experiment_id],
                   "filter": "tags.`megaloop.status` = 'finished'"})["runs"]
    assert [r["info"]["run_id"] for r in found] == [remote.run_id]
    assert {m["key"]: m["value"] for m in found[0]["data"]["metrics"]} == {
        "train/loss": 1.0 / 20, "val/loss": 0.5}
    assert len(history(store, remote.run_id, "train/loss")) == 20
    assert list((tmp_path / "mlartifacts").rglob("ds_config.json"))  # proxied artifact upload
    assert [r["name"] for r in find_runs("served", tracking=server)] == ["remote"]


def test_processes_that_open_a_fresh_store_at_once_all_succeed(tmp_path):
    """MLflow makes its tables on first use; four processes at once on one new sqlite file
    (a sweep's first runs) must not collide in that set-up."""
    uri = f"sqlite:///{tmp_path}/fresh/mlflow.db"
    script = ("import sys; from megaloop.track.mlflow_tracker import open_client; "
              "c = open_client(sys.argv[1]); print(len(c.search_experiments()))")
    processes = [subprocess.Popen([sys.executable, "-c", script, uri], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-2000:]
        assert out.strip() == "1"  # MLflow's Default experiment


def test_a_store_that_cannot_be_written_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(MegaloopError, match="Cannot open the MLflow store"):
        open_tracker(make_config(f"sqlite:///{blocker}/runs/mlflow.db"), rank=0, world_size=1,
                     derived=DERIVED)


def test_a_copied_store_finds_its_artifacts_after_relocate(tmp_path, migrated_store, capsys):
    """A store folder copied elsewhere (and the original gone) still points into the
    original's artifacts; `megaloop runs` says so and `--relocate` mends it."""
    from megaloop.cli import main

    original = tmp_path / "original"
    original.mkdir()
    shutil.copy(migrated_store, original / "mlflow.db")
    uri = f"sqlite:///{original}/mlflow.db"
    tracker = open_tracker(make_config(uri, system_metrics_interval=0), rank=0, world_size=1,
                           derived=DERIVED)
    tracker.log_text("hello", "note.txt")
    tracker.finish("FINISHED")
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    moved = f"sqlite:///{copy}/mlflow.db"
    assert main(["runs", "--tracking-uri", moved]) == 0
    assert "--relocate" in capsys.readouterr().err  # the stale locations are named
    assert main(["runs", "--tracking-uri", moved, "--relocate"]) == 0
    err = capsys.readouterr().err
    assert "2 artifact location(s)" in err and "warning" not in err
    path = client(moved).download_artifacts(tracker.run_id, "note.txt", str(tmp_path / "got"))
    assert Path(path).read_text() == "hello"
    assert str(copy) in client(moved).get_run(tracker.run_id).info.artifact_uri


def test_every_tag_and_metric_name_is_spelled_in_track_names_only():
    """Tracking's vocabulary lives in one table (megaloop/track/names.py): no other module of
    megaloop spells a tag or metric name as a string of its own."""
    import ast

    from tiny import REPO

    from megaloop.track.names import Metric, Tag

    names = {value for cls in (Tag, Metric) for key, value in vars(cls).items()
             if key.isupper()}
    spelled = []
    for path in (REPO / "megaloop").rglob("*.py"):
        if path.name == "names.py" and path.parent.name == "track":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                spelled.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value}")
    assert not spelled, spelled
