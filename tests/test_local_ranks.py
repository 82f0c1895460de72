"""The ranks of a one-node run as launch.sh starts them (megaloop/local_ranks.py): real
processes, a real gloo group on the file store, real signals."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import REPO

from megaloop.local_ranks import RENDEZVOUS, rank_environment

LOCAL_RANKS = [sys.executable, "-m", "megaloop.launch", "--local-ranks"]


def start(nproc: int, script: str, tmp_path: Path) -> subprocess.Popen:
    """`script` as `nproc` local ranks, in a session of its own."""
    path = tmp_path / "rank.py"
    path.write_text(script)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", RENDEZVOUS):
        env.pop(key, None)
    return subprocess.Popen([*LOCAL_RANKS, str(nproc), str(path)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_files(paths: list[Path], process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"none of {paths} appeared"
        time.sleep(0.05)


def test_every_socket_of_two_ranks_is_on_the_loopback(tmp_path):
    """The ranks meet on a file store and gloo talks over `lo`: nothing listens on a network
    interface (torchrun's store would listen on every one), and the collectives work."""
    script = (
        "import psutil, torch, torch.distributed as dist\n"
        "from megaloop.train.engine import join_process_group\n"
        "rank, world, _ = join_process_group()\n"
        "total = torch.tensor([rank + 1.0]); dist.all_reduce(total)\n"
        "dist.barrier()\n"
        "me = psutil.Process()\n"
        "lines = [f'LISTEN {c.laddr.ip}' for c in me.parent().net_connections(kind='inet')\n"
        "         + me.net_connections(kind='inet') if c.status == psutil.CONN_LISTEN]\n"
        "lines.append(f'SUM {rank} {world} {total.item()}')\n"
        "open(f'out{rank}', 'w').write('\\n'.join(lines))\n"
        "dist.barrier()\n")
    process = start(2, script, tmp_path)
    _, err = process.communicate(timeout=180)
    assert process.returncode == 0, err[-3000:]
    out = (tmp_path / "out0").read_text() + "\n" + (tmp_path / "out1").read_text()
    sums = sorted(line.split()[1:] for line in out.splitlines() if line.startswith("SUM"))
    assert sums == [["0", "2", "3.0"], ["1", "2", "3.0"]]
    listening = [line.split()[1] for line in out.splitlines() if line.startswith("LISTEN")]
    assert listening and all(ipaddress.ip_address(ip).is_loopback for ip in listening), listening


def test_a_failed_rank_stops_the_others_and_its_status_is_the_nodes(tmp_path):
    script = (
        "import os, sys, time\n"
        "if os.environ['RANK'] == '1':\n"
        "    sys.exit(2)\n"
        "time.sleep(300)\n")
    began = time.monotonic()
    process = start(2, script, tmp_path)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "rank 1 exited with status 2: stopping the other ranks" in err
    assert time.monotonic() - began < 30  # rank 0 was stopped, not waited for


SAVES_ON_SIGTERM = (
    "import json, os, signal, sys, time\n"
    "from pathlib import Path\n"
    "rank = int(os.environ['RANK'])\n"
    "def stop(signum, frame):\n"
    "    if rank == 0 or not os.environ.get('ONLY_RANK_0_SAVES'):\n"
    "        Path(os.environ['MEGALOOP_STOP_REPORTS'], f'rank{rank:05d}.json')"
    ".write_text('{}')\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, stop)\n"
    "Path(f'started{rank}').touch()\n"
    "time.sleep(300)\n")


@pytest.mark.parametrize("all_save", [True, False])
def test_sigterm_reaches_every_rank_and_the_exit_says_whether_all_saved(tmp_path, all_save):
    script = SAVES_ON_SIGTERM if all_save else \
        "import os\nos.environ['ONLY_RANK_0_SAVES'] = '1'\n" + SAVES_ON_SIGTERM
    process = start(2, script, tmp_path)
    wait_for_files([tmp_path / "started0", tmp_path / "started1"], process)
    os.kill(process.pid, signal.SIGTERM)  # the launcher alone: the ranks have sessions of their own
    _, err = process.communicate(timeout=60)
    if all_save:
        assert process.returncode == 0, err
        assert "stopped by SIGTERM: every rank saved its checkpoint" in err
    else:
        assert process.returncode == 128 + signal.SIGTERM, err
        assert "1 of 2 ranks saved a checkpoint" in err


def test_ranks_get_sigterm_when_the_launcher_is_killed(tmp_path):
    script = (
        "import os, signal, sys, time\n"
        "from pathlib import Path\n"
        "rank = os.environ['RANK']\n"
        "signal.signal(signal.SIGTERM, lambda *_: (Path(f'term{rank}').touch(), sys.exit(0)))\n"
        "Path(f'started{rank}').touch()\n"
        "time.sleep(300)\n")
    process = start(2, script, tmp_path)
    wait_for_files([tmp_path / "started0", tmp_path / "started1"], process)
    process.kill()
    process.wait()
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"term{rank}").exists() for rank in (0, 1)):
        assert time.monotonic() < deadline, "a rank outlived its launcher without SIGTERM"
        time.sleep(0.05)


def test_rank_environment_has_the_rendezvous_and_no_master(tmp_path):
    env = rank_environment({"MASTER_ADDR": "node01", "MASTER_PORT": "29500",
                            "NCCL_SOCKET_IFNAME": "ib0"}, 1, 4, tmp_path)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == \
        ("1", "1", "4", "4")
    assert env[RENDEZVOUS] == f"file://{tmp_path}/store"
    assert "MASTER_ADDR" not in env and "MASTER_PORT" not in env
    assert env["NCCL_SOCKET_IFNAME"] == "ib0"  # what the user set is kept
    assert env["GLOO_SOCKET_IFNAME"].startswith("lo")
