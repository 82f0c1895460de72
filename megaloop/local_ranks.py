"""The ranks of a one-node run, started and watched by megaloop itself (`launch.sh --nproc N`).

torchrun would serve, but its agent hosts the rendezvous on a TCP store that listens on every
interface of the machine (the store has no bind address), so anyone on the network could reach
a workstation's run. Here the ranks meet on a file store in a private temporary folder and talk
over the loopback (gloo's and NCCL's sockets on `lo`): nothing listens beyond 127.0.0.1.
Several nodes still rendezvous through torchrun (launch.py), where a network store is the point.

What this process does, in the role of torchrun's agent:
- starts rank 0..N-1 as `python ARGS...` with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and
  the file store in `RENDEZVOUS` (train/engine.py's join_process_group reads it); each rank is in
  a session of its own and gets SIGTERM if this process dies, even by SIGKILL;
- passes SIGTERM, SIGINT and SIGHUP on to every rank and waits up to `SIGTERM_GRACE_S` for them
  to save and stop, then kills what is left; a second signal kills them at once. It exits 0
  when every rank reported its save in $MEGALOOP_STOP_REPORTS, else 128 + the signal;
- when a rank fails, says which, stops the others (SIGTERM, SIGKILL after `FAILURE_GRACE_S`)
  and exits with that rank's status, so a bad config still exits 2.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megaloop.cluster import STOP_REPORTS, loopback_interface

RENDEZVOUS = "MEGALOOP_RENDEZVOUS"  # file:// URL of the store every rank of the node joins
SIGTERM_GRACE_S = 120  # to save the last checkpoint of a large model; SLURM signals 120 s ahead
FAILURE_GRACE_S = 20  # the others wait on the failed rank in a collective: nothing to save
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PROG = "launch.sh"


def rank_environment(environ: dict[str, str], rank: int, nproc: int, folder: Path
                     ) -> dict[str, str]:
    """The environment of local rank `rank`: this one's, with the rendezvous and the loopback."""
    env = {key: value for key, value in environ.items()
           if key not in ("MASTER_ADDR", "MASTER_PORT")}  # nothing may rendezvous over env://
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
               LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", NODE_RANK="0",
               **{RENDEZVOUS: f"file://{folder}/store", STOP_REPORTS: str(folder / "stopped")})
    loopback = loopback_interface()
    if loopback is not None:
        for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            env.setdefault(name, loopback)
    return env


def die_with_parent(parent: int):
    """A `preexec_fn`: the child gets SIGTERM when `parent` (a sweep, this launcher) dies, even
    by SIGKILL (Linux's PR_SET_PDEATHSIG, kept across exec), so a killed parent leaves no
    training behind: the run saves a checkpoint and stops. Elsewhere it does nothing."""
    def arm() -> None:
        if not sys.platform.startswith("linux"):
            return

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


class LocalRanks:
    """N rank processes and what happened to them."""

    def __init__(self, nproc: int, command: list[str]):
        self.nproc, self.command = nproc, command
        self.folder = Path(tempfile.mkdtemp(prefix="megaloop-ranks-"))  # mode 0700
        (self.folder / "stopped").mkdir()
        self.ranks: list[subprocess.Popen] = []
        self.signals: list[int] = []

    def start(self) -> None:
        for rank in range(self.nproc):
            env = rank_environment(dict(os.environ), rank, self.nproc, self.folder)
            self.ranks.append(subprocess.Popen(self.command, env=env, start_new_session=True,
                                               preexec_fn=die_with_parent(os.getpid())))

    def on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)
        for process in self.ranks:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL if len(self.signals) > 1 else signum)

    def stop_the_rest(self, grace_s: float) -> None:
        """SIGTERM to the ranks still running, SIGKILL to those alive after `grace_s`."""
        for process in self.ranks:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        self.wait_all(grace_s)

    def wait_all(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.ranks):
            time.sleep(0.05)
        for process in self.ranks:
            if process.poll() is None:
                process.kill()
                process.wait()

    def first_failure(self) -> tuple[int, int] | None:
        """(rank, exit status) of the first rank found to have failed."""
        for rank, process in enumerate(self.ranks):
            code = process.poll()
            if code is not None and code != 0:
                return rank, code
        return None

    def stopped_reports(self) -> int:
        return len(list((self.folder / "stopped").glob("rank*.json")))


def exit_status(code: int) -> int:
    """A rank's returncode as a shell reports it: a death by signal is 128 + the signal."""
    return 128 - code if code < 0 else code


def stop_exit_status(signum: int, stopped: int, nproc: int) -> int:
    """One line on a stop by `signum` and the node's exit status: 0 when all `nproc` ranks
    reported their save (`stopped` of them did), else 128 + the signal."""
    name = signal.Signals(signum).name
    if stopped == nproc:
        print(f"{PROG}: stopped by {name}: every rank saved its checkpoint (resume with "
              "--resume auto)", file=sys.stderr)
        return 0
    print(f"{PROG}: stopped by {name}: {stopped} of {nproc} ranks saved a checkpoint and "
          "stopped; resume with --resume auto from the last complete one", file=sys.stderr)
    return 128 + signum


def run(nproc: int, command: list[str]) -> int:
    """Run `command` as `nproc` local ranks to the end; returns the exit status for the node."""
    ranks = LocalRanks(nproc, command)
    previous = {signum: signal.signal(signum, ranks.on_signal) for signum in FORWARDED}
    try:
        ranks.start()
        while not ranks.signals and any(p.poll() is None for p in ranks.ranks):
            if (failed := ranks.first_failure()) is not None:
                rank, code = failed
                print(f"{PROG}: rank {rank} exited with status {exit_status(code)}: stopping "
                      "the other ranks (its error is above)", file=sys.stderr, flush=True)
                ranks.stop_the_rest(FAILURE_GRACE_S)
                return exit_status(code)
            time.sleep(0.05)
        if not ranks.signals:
            failed = ranks.first_failure()
            return 0 if failed is None else exit_status(failed[1])
        ranks.wait_all(SIGTERM_GRACE_S)
        return stop_exit_status(ranks.signals[0], ranks.stopped_reports(), nproc)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        ranks.wait_all(0)  # kills what is left: an exception (a failed start) leaves no rank
        shutil.rmtree(ranks.folder, ignore_errors=True)
