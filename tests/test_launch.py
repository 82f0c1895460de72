"""launch.sh: each mode's command (dry runs of the real script), the errors, real runs of
`megaloop params` as one process, as two local ranks and through DeepSpeed's launcher."""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess

import pytest
from tiny import REPO, shellcheck

from megaloop import launch
from megaloop.cluster import LaunchError, expand_hostlist, parse_hostfile

LAUNCH = str(REPO / "launch.sh")
CONFIG = "configs/runs/tiny.yaml"
TORCHRUN = ["-m", "megaloop.launch", "--torchrun"]
LOCAL_RANKS = ["-m", "megaloop.launch", "--local-ranks"]
CLI = ["-m", "megaloop.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without SLURM or the variables the launcher decides, plus `extra`."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("SLURM_") and key not in ("DS_ACCELERATOR", "OMP_NUM_THREADS")}
    return {**env, **extra}


def run(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([LAUNCH, *args], cwd=REPO, env=clean_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def dry(*args: str, **env: str) -> tuple[dict[str, str], list[str], list[str]]:
    """The environment it sets, the argv (without the Python) and the notes of a dry run."""
    proc = run(*args, "--dry-run", **env)
    assert proc.returncode == 0, proc.stderr
    command, *notes = proc.stdout.splitlines()
    words = shlex.split(command)
    assignments = [word for word in words if "=" in word and word.split("=")[0].isupper()]
    assert words[:len(assignments)] == assignments
    argv = words[len(assignments):]
    assert os.path.basename(argv[0]).startswith("python")
    assert all(note.startswith("# ") for note in notes)
    return dict(word.split("=", 1) for word in assignments), argv[1:], notes


def plan(*args: str, environ: dict[str, str] | None = None, devices: int = 0,
         cores: int = 8) -> launch.Launch:
    parsed, megaloop_argv = launch.parse([*args])
    return launch.plan(parsed, megaloop_argv, environ=environ or {}, devices=devices,
                       cores=cores, python="python")


def json_objects(text: str) -> list[dict]:
    """Every JSON object that starts a line of `text` (log lines around them are skipped)."""
    decoder, objects, index = json.JSONDecoder(), [], 0
    while index < len(text):
        if text[index] == "{" and (index == 0 or text[index - 1] == "\n"):
            obj, index = decoder.raw_decode(text, index)
            objects.append(obj)
        else:
            index += 1
    return objects


# -- the modes ------------------------------------------------------------------------------


def test_one_process_runs_megaloop_without_a_launcher():
    env, argv, notes = dry("train", CONFIG, "--set", "model.recurrences=4")
    assert argv == [*CLI, "train", CONFIG, "--set", "model.recurrences=4"]
    assert env == {"DS_ACCELERATOR": "cpu"}  # this machine has no CUDA
    assert "world size 1" in notes[-1]


def test_local_ranks_are_started_by_megaloop():
    env, argv, notes = dry("train", CONFIG, "--nproc", "2", "--set", "model.recurrences=4")
    assert argv == [*LOCAL_RANKS, "2", *CLI, "train", CONFIG, "--set", "model.recurrences=4"]
    assert env == {"DS_ACCELERATOR": "cpu",
                   "OMP_NUM_THREADS": str(max(1, launch.cpu_cores() // 2))}
    assert "loopback only" in notes[-1]


def test_unknown_options_pass_through_in_order():
    _, argv, _ = dry("eval", CONFIG, "--checkpoint", "runs/x", "--set", "a.b=1", "--json")
    assert argv == [*CLI, "eval", CONFIG, "--set", "a.b=1", "--checkpoint", "runs/x", "--json"]


def test_the_environment_a_user_set_is_kept():
    launched = plan("train", CONFIG, "--nproc", "4", "--master-port", "29555",
                    environ={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "3",
                             "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300"})
    assert launched.env == {}
    assert plan("train", CONFIG, "--nproc", "4", cores=6).env["OMP_NUM_THREADS"] == "1"
    assert plan("train", CONFIG, "--nproc", "2", cores=6).env["OMP_NUM_THREADS"] == "3"
    assert "OMP_NUM_THREADS" not in plan("train", CONFIG).env  # one process takes every core
    assert "DS_ACCELERATOR" not in plan("train", CONFIG, "--nproc", "2", devices=2).env


def test_a_master_address_or_port_makes_the_rendezvous_static():
    _, argv, _ = dry("train", CONFIG, "--nproc", "2", "--master-port", "29555")
    assert argv[:len(TORCHRUN) + 6] == [*TORCHRUN, "--nproc-per-node", "2", "--master-addr",
                                        "127.0.0.1", "--master-port", "29555"]


def test_one_launch_per_node():
    _, argv, notes = dry("train", CONFIG, "--nproc", "2", "--nnodes", "2", "--node-rank", "1",
                         "--master-addr", "node01", "--master-port", "1234", "--json")
    assert argv == [*TORCHRUN, "--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "1",
                    "--master-addr", "node01", "--master-port", "1234",
                    *CLI, "train", CONFIG, "--json"]
    assert "world size 4" in notes[-1]
    _, argv, _ = dry("train", CONFIG, "--nnodes", "2", "--node-rank", "0", "--master-addr", "h")
    assert argv[:len(TORCHRUN) + 10] == [*TORCHRUN, "--nproc-per-node", "1", "--nnodes", "2",
                                         "--node-rank", "0", "--master-addr", "h",
                                         "--master-port", "29500"]


def decode(payload: str) -> list[str]:
    return json.loads(base64.urlsafe_b64decode(payload))


def test_a_hostfile_runs_deepspeeds_launcher(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two workers\nworker-1 slots=4  # the first\n\nworker-2 slots=2\n")
    env, argv, notes = dry("train", CONFIG, "--hostfile", str(hostfile), "--set", "x.y=1")
    assert argv[:-1] == ["-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
                         "--master_addr", "worker-1", "--master_port", "29500",
                         "--no_local_rank", "--module", "megaloop.launch", "--rank-argv"]
    assert decode(argv[-1]) == ["train", CONFIG, "--set", "x.y=1"]
    assert env == {"DS_ACCELERATOR": "cpu"}
    assert "world size 6" in notes[0] and "train configs/runs/tiny.yaml --set x.y=1" in notes[1]
    _, argv, _ = dry("train", CONFIG, "--hostfile", str(hostfile), "--nproc", "2",
                     "--master-addr", "10.0.0.1", "--master-port", "4000")
    assert argv[4:12] == ["--master_addr", "10.0.0.1", "--master_port", "4000",
                          "--num_gpus", "2", "--no_local_rank", "--module"]


def test_a_one_host_hostfile_checks_ssh_only_where_it_matters(tmp_path):
    (tmp_path / "local").write_text("localhost slots=2\n")
    (tmp_path / "remote").write_text("gpu-a1 slots=8\n")
    assert "--no_ssh_check" in plan("train", CONFIG, "--hostfile", str(tmp_path / "local")).argv
    assert "--force_multi" in plan("train", CONFIG, "--hostfile", str(tmp_path / "remote")).argv


def test_slurm_gives_nodes_rank_and_master():
    env, argv, notes = dry("train", CONFIG, SLURM_JOB_ID="4242", SLURM_NNODES="2",
                           SLURM_NODEID="1", SLURM_JOB_NODELIST="node[07-08]")
    assert argv == [*TORCHRUN, "--nproc-per-node", "1", "--nnodes", "2", "--node-rank", "1",
                    "--master-addr", "node07", "--master-port", str(20000 + 4242),
                    *CLI, "train", CONFIG]
    assert env == {"DS_ACCELERATOR": "cpu", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}
    assert "SLURM job 4242: node 1 of 2" in notes[0]


def test_slurm_numbers_and_overrides():
    job = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "3", "SLURM_NODEID": "2",
           "SLURM_JOB_NODELIST": "gpu-a[1-3]", "SLURM_GPUS_ON_NODE": "4"}
    argv = plan("train", CONFIG, "--master-port", "5000", environ=job, devices=4).argv
    assert argv[4:14] == ["--nproc-per-node", "4", "--nnodes", "3", "--node-rank", "2",
                          "--master-addr", "gpu-a1", "--master-port", "5000"]
    step = {**job, "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "gpu-a[2-3]",
            "SLURM_NODEID": "1"}
    assert plan("train", CONFIG, environ=step, devices=4).argv[6:12] == [
        "--nnodes", "2", "--node-rank", "1", "--master-addr", "gpu-a2"]
    one_node = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "gpu-a1"}
    assert plan("train", CONFIG, environ=one_node, devices=2).argv[1:6] == [
        *LOCAL_RANKS, "2", "-m"]
    assert plan("train", CONFIG, environ=one_node).argv[1:3] == CLI  # CPU: one process
    assert plan("train", CONFIG, "--nnodes", "1", "--allow-cpu",
                environ=job).argv[1:3] == CLI  # SLURM ignored


def test_gpus_asked_for_and_none_visible_is_refused_unless_on_purpose():
    """A task that was given GPUs but whose CUDA sees none (a broken driver, a missing module)
    stops, instead of training on CPU ranks for days."""
    job = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "gpu-a1",
           "SLURM_GPUS_ON_NODE": "8"}
    with pytest.raises(LaunchError, match="SLURM_GPUS_ON_NODE=8.*CUDA sees none.*--allow-cpu"):
        plan("train", CONFIG, "--nproc", "8", environ=job)
    with pytest.raises(LaunchError, match="CUDA_VISIBLE_DEVICES=0,1"):
        plan("train", CONFIG, environ={"CUDA_VISIBLE_DEVICES": "0,1"})
    on_purpose = plan("train", CONFIG, "--nproc", "2", "--allow-cpu", environ=job)
    assert on_purpose.env["DS_ACCELERATOR"] == "cpu"
    chosen = plan("train", CONFIG, "--nproc", "2", environ={**job, "DS_ACCELERATOR": "cpu"})
    assert "--local-ranks" in chosen.argv
    assert plan("train", CONFIG, "--nproc", "2", environ={"CUDA_VISIBLE_DEVICES": ""}).argv


@pytest.mark.parametrize(("nodelist", "hosts"), [
    ("node07", ["node07"]),
    ("node[07-08]", ["node07", "node08"]),
    ("node[01-03,07],gpu-a1", ["node01", "node02", "node03", "node07", "gpu-a1"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("a1,b[2],c-x[003-004]", ["a1", "b2", "c-x003", "c-x004"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),
])
def test_hostlist_expansion(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[01-", "node]1[", "node[3-1]", "node[a-b]", "", "a b"])
def test_bad_hostlists_are_refused(nodelist):
    with pytest.raises(LaunchError, match="SLURM node list"):
        expand_hostlist(nodelist)


def test_hostfile_parsing(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=1\n  # comment\n10.0.0.2\tslots=16 # ib\nnode_3.lan slots=2\n")
    assert parse_hostfile(str(hostfile)) == {"a": 1, "10.0.0.2": 16, "node_3.lan": 2}


# -- nothing a user typed reaches a shell ---------------------------------------------------


def test_shell_metacharacters_stay_one_argument(tmp_path):
    marker = tmp_path / "pwned"
    nasty = f"track.run_name=$(touch {marker}); rm -rf x `touch {marker}` | &&"
    _, argv, _ = dry("train", CONFIG, "--nproc", "2", "--set", nasty, "--name", "a b;c")
    assert argv[-5:] == [CONFIG, "--set", nasty, "--name", "a b;c"]
    hostfile = tmp_path / "hosts"
    hostfile.write_text("w1 slots=1\nw2 slots=1\n")
    _, argv, _ = dry("train", CONFIG, "--hostfile", str(hostfile), "--set", nasty)
    assert decode(argv[-1]) == ["train", CONFIG, "--set", nasty]
    assert set(argv[-1]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")
    proc = run("params", CONFIG, "--set", f"model.d_model=$(touch {marker})")  # really runs
    assert proc.returncode == 2 and f"$(touch {marker})" in proc.stderr
    assert not marker.exists()


# -- errors: one line, exit 2, nothing started ----------------------------------------------


HOSTFILES = {
    "bad_slots": ("worker-1 slots=2\nworker-2 slots=two\n",
                  "{dir}/bad_slots:2: expected 'HOSTNAME slots=N' with N a positive integer"),
    "no_slots": ("worker-1\n", "{dir}/no_slots:1: expected 'HOSTNAME slots=N'"),
    "zero_slots": ("worker-1 slots=0\n", "{dir}/zero_slots:1: expected 'HOSTNAME slots=N'"),
    "shell_host": ("work$(id) slots=2\n", "{dir}/shell_host:1: expected 'HOSTNAME slots=N'"),
    "duplicate": ("w slots=1\n\nw slots=2\n",
                  "{dir}/duplicate:3: host w is listed again (first on line 1)"),
    "empty": ("# nothing\n\n", "hostfile {dir}/empty lists no hosts"),
    "HOSTS": ("w1 slots=4\nw2 slots=2\n", ""),
}


@pytest.mark.parametrize(("args", "env", "message"), [
    (["train", "configs/runs/missing.yaml"], {},
     "config configs/runs/missing.yaml not found: pass a YAML run config, see configs/runs/"),
    (["train"], {}, "no run config given"),
    (["Train;ls", CONFIG], {}, "is not a megaloop command"),
    (["train", CONFIG, "--nproc", "0"], {}, "--nproc 0: give 1 or more"),
    (["train", CONFIG, "--nproc", "two"], {}, "invalid int value"),
    (["train", CONFIG, "--nnodes", "0"], {}, "--nnodes 0: give 1 or more"),
    (["train", CONFIG, "--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], {},
     "--node-rank 2 is outside 0..1"),
    (["train", CONFIG, "--nnodes", "2", "--node-rank", "-1", "--master-addr", "h"], {},
     "--node-rank -1 is outside 0..1"),
    (["train", CONFIG, "--node-rank", "1"], {}, "--node-rank needs --nnodes"),
    (["train", CONFIG, "--nproc", "2", "--master-port", "70000"], {}, "outside 1..65535"),
    (["train", CONFIG, "--nproc", "2", "--master-port", "0"], {}, "outside 1..65535"),
    (["train", CONFIG, "--nnodes", "2", "--node-rank", "0"], {}, "needs --master-addr"),
    (["train", CONFIG, "--nnodes", "2", "--node-rank", "0", "--master-addr", "a;b"], {},
     "'a;b' is not a host name"),
    (["train", CONFIG, "--hostfile", "{dir}/HOSTS", "--nnodes", "2"], {},
     "--hostfile lists the nodes"),
    (["train", CONFIG, "--hostfile", "{dir}/HOSTS", "--nproc", "3"], {},
     "--nproc 3 but {dir}/HOSTS gives w2 only 2 slots"),
    (["train", CONFIG, "--hostfile", "missing-hosts"], {}, "hostfile missing-hosts not found"),
    (["train", CONFIG], {"SLURM_JOB_ID": "1", "SLURM_NNODES": "2", "SLURM_NODEID": "5",
                         "SLURM_JOB_NODELIST": "n[1-2]"}, "SLURM_NODEID=5 is outside 0..1"),
    (["train", CONFIG], {"SLURM_JOB_ID": "1", "SLURM_NNODES": "2",
                         "SLURM_JOB_NODELIST": "n[1-2]"}, "no SLURM_NODEID"),
    (["train", CONFIG], {"SLURM_JOB_ID": "1", "SLURM_NNODES": "2", "SLURM_NODEID": "0",
                         "SLURM_JOB_NODELIST": "n[1-3]"}, "has 3 hosts but the job step has 2"),
    (["train", CONFIG], {"SLURM_JOB_ID": "1", "SLURM_NNODES": "2", "SLURM_NODEID": "0",
                         "SLURM_JOB_NODELIST": "n[1-"}, "unbalanced brackets"),
    (["train", CONFIG], {"SLURM_JOB_ID": "1", "SLURM_NNODES": "1",
                         "SLURM_JOB_NODELIST": "n1", "SLURM_LOCALID": "1"},
     "srun --ntasks-per-node=1"),
    (["train", CONFIG], {"SLURM_JOB_ID": "1", "SLURM_NNODES": "1",
                         "SLURM_JOB_NODELIST": "n1", "SLURM_GPUS_ON_NODE": "8"},
     "GPUs were asked for (SLURM_GPUS_ON_NODE=8) but CUDA sees none"),
    *[(["train", CONFIG, "--hostfile", f"{{dir}}/{name}"], {}, message)
      for name, (_, message) in HOSTFILES.items() if message],
])
def test_errors_exit_2_and_start_nothing(tmp_path, args, env, message):
    for name, (text, _) in HOSTFILES.items():
        (tmp_path / name).write_text(text)
    args = [arg.replace("{dir}", str(tmp_path)) for arg in args]
    proc = run(*args, "--dry-run", **env)
    assert proc.returncode == 2
    assert proc.stdout == ""  # no command printed, nothing started
    assert proc.stderr.startswith("launch.sh: ") and "error:" in proc.stderr
    assert message.replace("{dir}", str(tmp_path)) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_launcher_options_may_come_before_the_config():
    assert plan("train", "--nproc", "2", CONFIG).argv[-2:] == ["train", CONFIG]
    with pytest.raises(LaunchError, match=f"the run config {CONFIG} must come right after"):
        launch.parse(["train", "--resume", "auto", CONFIG])


def test_too_many_ranks_for_the_gpus():
    with pytest.raises(LaunchError, match="this node has 2 CUDA devices"):
        plan("train", CONFIG, "--nproc", "4", devices=2)


def test_help_and_the_script_itself():
    proc = run("--help")
    assert proc.returncode == 0 and "--hostfile" in proc.stdout and "srun" in proc.stdout
    for script in (LAUNCH, str(REPO / "scripts" / "slurm_example.sbatch")):
        assert subprocess.run(["bash", "-n", script]).returncode == 0


# -- real runs ------------------------------------------------------------------------------


def test_real_run_of_one_process():
    proc = run("params", CONFIG, "--json", "--set", "model.recurrences=3", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json_objects(proc.stdout)[0]["n_rec"] > 0
    assert "-m megaloop.cli params" in proc.stderr  # the command is logged before the exec


def test_real_run_of_two_local_ranks():
    proc = run("params", CONFIG, "--nproc", "2", "--json", timeout=180)
    assert proc.returncode == 0, proc.stderr
    objects = json_objects(proc.stdout)
    assert len(objects) == 2 and objects[0] == objects[1]  # both ranks ran and printed


def test_a_rank_of_the_deepspeed_launcher_decodes_its_argv(monkeypatch, capsys):
    for key in ("DS_ACCELERATOR", "OMP_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "2")
    payload = base64.urlsafe_b64encode(json.dumps(["params", CONFIG, "--json"]).encode())
    monkeypatch.chdir(REPO)
    assert launch.main([launch.RANK_ARGV, payload.decode()]) == 0
    assert "flops_per_token" in json.loads(capsys.readouterr().out)
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    assert os.environ["OMP_NUM_THREADS"] == str(max(1, launch.cpu_cores() // 2))


@pytest.mark.slow
def test_real_run_through_deepspeeds_launcher(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    proc = run("params", CONFIG, "--hostfile", str(hostfile), "--set", "model.recurrences=3",
               "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    objects = json_objects(proc.stdout)
    assert len(objects) == 2 and objects[0] == objects[1]


def test_every_shell_script_passes_shellcheck():
    """launch.sh, the set-up and test scripts, the sbatch example and the GPU session."""
    scripts = [REPO / "launch.sh", REPO / ".ci" / "run", REPO / "scripts" / "slurm_example.sbatch",
               *sorted((REPO / "scripts").glob("*.sh")),
               *sorted((REPO / "benchmarks").glob("*.sh"))]
    checked = shellcheck(*map(str, scripts))
    assert checked.returncode == 0, checked.stdout[-4000:]
