"""The launcher behind `./launch.sh`: one entry for every scale.

    ./launch.sh COMMAND CONFIG [--set SECTION.KEY=VALUE ...] [megaloop options ...]
                [--nproc N] [--nnodes N --node-rank I --master-addr A [--master-port P]]
                [--hostfile FILE] [--dry-run]

COMMAND is a megaloop subcommand (train, eval, params, ...) and CONFIG a YAML run config
(configs/runs/). The `--set` values and every option the launcher does not know are handed to
`megaloop COMMAND CONFIG` unchanged, one argv item each, after CONFIG. The launcher builds an argv
list and execs it: no user string is ever read by a shell. `--dry-run` prints the command (shell
quoted, with the environment variables it sets in front) and starts nothing. Any problem
(missing config, malformed hostfile, impossible numbers) is one `launch.sh: error:` line and
exit status 2, before anything starts.

How it runs:

1. One process on one node (no --nproc above 1, no --nnodes, --hostfile or SLURM):
   `python -m megaloop.cli COMMAND CONFIG ...`, a plain process without a launcher (no RANK or
   WORLD_SIZE in its environment: world size 1).
2. Local ranks, `--nproc N`: megaloop starts and watches them itself (local_ranks.py): they
   meet on a file store and talk over the loopback, so nothing listens beyond 127.0.0.1, and
   on SIGTERM the node exits 0 once every rank has saved. With --master-addr or --master-port,
   torchrun (`torch.distributed.run`, run in the launcher's process, with the same SIGTERM
   rule) at that static address instead (127.0.0.1 and 29500 by default). Several nodes, one
   launch.sh on each: `--nnodes N --node-rank I --master-addr A [--master-port P]` (P defaults
   to 29500), torchrun's static rendezvous at A:P, whose store listens on node 0's network.
3. A hostfile (`--hostfile FILE`, lines `HOSTNAME slots=N`, `#` comments, blank lines): one
   launch.sh on the first node starts every rank through DeepSpeed's launcher (pdsh and
   passwordless ssh to the other hosts; a shared file system with the repo at the same path).
   The master address defaults to the first host, the port to 29500. `--nproc N` uses N ranks on
   every host (DeepSpeed's --num_gpus) and must not exceed any host's slots; without it each host
   runs its slots. `--nnodes` and `--node-rank` are refused: the hostfile lists the nodes.
   pdsh hands its command to a remote shell, so the megaloop argv travels base64-encoded and
   each rank decodes it (`python -m megaloop.launch --rank-argv B64`); hostnames and the master
   address are checked to be plain names.
4. SLURM (SLURM_JOB_ID set and no --nnodes or --hostfile): one launch.sh per node reads the
   node count (SLURM_STEP_NUM_NODES or SLURM_NNODES), its node rank (SLURM_NODEID), the master
   address (first host of SLURM_STEP_NODELIST or SLURM_JOB_NODELIST, hostlist syntax expanded
   by cluster.py) and runs mode 2. The master port is --master-port or 20000 + job id % 20000;
   the ranks per node --nproc, else SLURM_GPUS_ON_NODE, else the CUDA devices, else 1 (CPU). A
   one-node job runs as on a workstation. `--nnodes 1` ignores SLURM. An sbatch script runs one
   task per node (see scripts/slurm_example.sbatch):

       #!/usr/bin/env bash
       #SBATCH --nodes=2
       #SBATCH --ntasks-per-node=1        # one launch.sh per node; it starts the ranks
       #SBATCH --gpus-per-node=8
       #SBATCH --signal=TERM@120          # time to checkpoint before the end of the job
       srun --ntasks-per-node=1 ./launch.sh train configs/runs/x.yaml --set model.recurrences=4

Environment of the ranks. Without CUDA the launcher sets DS_ACCELERATOR=cpu (DeepSpeed on gloo)
unless it is set. With several ranks on a node it sets OMP_NUM_THREADS to the node's cores
divided by its ranks (at least 1) unless it is set. torchrun and DeepSpeed's launcher both give
each rank RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (torchrun also
LOCAL_WORLD_SIZE, DeepSpeed LOCAL_SIZE); a plain process (mode 1) has none of them. Local
ranks (mode 2 without an address) get RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and the
file store in MEGALOOP_RENDEZVOUS, with GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME on the
loopback unless set; no MASTER_ADDR.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from megaloop import local_ranks
from megaloop.cli import main as megaloop_main
from megaloop.cluster import (
    HOST,
    STOP_REPORTS,
    LaunchError,
    cpu_cores,
    cuda_device_count,
    parse_hostfile,
    slurm_placement,
)
from megaloop.local_ranks import SIGTERM_GRACE_S, stop_exit_status

PROG = "launch.sh"
DEFAULT_PORT = 29500
RANK_ARGV = "--rank-argv"  # hidden entry of every rank started by DeepSpeed's launcher
TORCHRUN = "--torchrun"  # hidden entry: torchrun in this process (`run_torchrun`)
LOCAL_RANKS = "--local-ranks"  # hidden entry: one node's ranks, started by local_ranks.py
COMMAND = re.compile(r"[a-z][a-z0-9_-]*")
SHELL_SAFE = re.compile(r"[\w@%+=:,./-]+")  # what DeepSpeed's pdsh runner leaves unquoted


@dataclass
class Launch:
    """What to exec: the argv, the variables it adds to the environment, and notes for people."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def command_line(self) -> str:
        """The command as one line a user can paste into a shell."""
        assignments = [f"{key}={shlex.quote(value)}" for key, value in self.env.items()]
        return " ".join([*assignments, shlex.join(self.argv)])


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one error line, like every other
        raise LaunchError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a megaloop command on one process, local ranks, several nodes, a\n"
                    "hostfile or a SLURM job. Options the launcher does not know go to megaloop.",
        epilog="examples:\n"
               "  ./launch.sh train configs/runs/tiny.yaml                  # one process\n"
               "  ./launch.sh train configs/runs/tiny.yaml --nproc 2        # 2 local ranks\n"
               "  ./launch.sh train CONFIG --nproc 8 --nnodes 2 --node-rank 0 "
               "--master-addr node01\n"
               "  ./launch.sh train CONFIG --hostfile hosts.txt             # DeepSpeed launcher\n"
               "  srun --ntasks-per-node=1 ./launch.sh train CONFIG         # SLURM, per node\n"
               "  ./launch.sh train CONFIG --set model.recurrences=4 --dry-run\n"
               "See megaloop/launch.py for the modes, the environment and an sbatch script.")
    parser.add_argument("command", help="megaloop subcommand to run (train, eval, params, ...)")
    parser.add_argument("config", nargs="?", help="YAML run config (see configs/runs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="config override for megaloop "
                                                          "(repeatable, passed through)")
    parser.add_argument("--nproc", type=int, help="ranks per node (default 1; under SLURM "
                                                  "SLURM_GPUS_ON_NODE or the CUDA devices)")
    parser.add_argument("--nnodes", type=int, help="nodes; run one launch.sh per node")
    parser.add_argument("--node-rank", type=int, help="this node's rank, 0 .. nnodes-1")
    parser.add_argument("--master-addr", help="address of node 0 (rank 0)")
    parser.add_argument("--master-port", type=int,
                        help=f"port on node 0 (default {DEFAULT_PORT}; SLURM: from the job id)")
    parser.add_argument("--hostfile", help="'HOST slots=N' lines: start every host from here "
                                           "with DeepSpeed's launcher (pdsh/ssh)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run CPU ranks although GPUs were asked for (SLURM, "
                             "CUDA_VISIBLE_DEVICES) and none is visible")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the command and the environment it sets; start nothing")
    return parser


def gpus_asked_for(environ: Mapping[str, str]) -> str | None:
    """The variable that says this process was given GPUs (SLURM's, CUDA_VISIBLE_DEVICES), as
    NAME=VALUE, or None."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_JOB_GPUS",
                 "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES"):
        value = environ.get(name, "").strip()
        if value and value not in ("0", "-1", "none", "NoDevFiles"):
            return f"{name}={value}"
    return None


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's options, and the megaloop argv (COMMAND CONFIG --set ... extras)."""
    args, extras = build_parser().parse_known_intermixed_args(argv)
    if not COMMAND.fullmatch(args.command):
        raise LaunchError(f"{args.command!r} is not a megaloop command: start with one such as "
                          "train, e.g. ./launch.sh train configs/runs/tiny.yaml")
    misplaced = next((word for word in [args.config or "", *extras]
                      if word.endswith((".yaml", ".yml")) and Path(word).is_file()), None)
    if misplaced is not None and misplaced != args.config:
        raise LaunchError(f"the run config {misplaced} must come right after the command, "
                          f"before megaloop's own options: ./launch.sh {args.command} "
                          f"{misplaced} [options]")
    if args.config is None:
        raise LaunchError("no run config given: pass a YAML run config after the command, "
                          "see configs/runs/")
    if not Path(args.config).is_file():
        raise LaunchError(f"config {args.config} not found: pass a YAML run config, "
                          "see configs/runs/")
    megaloop_argv = [args.command, args.config]
    for override in args.overrides:
        megaloop_argv += ["--set", override]
    return args, megaloop_argv + extras


def plan(args: argparse.Namespace, megaloop_argv: list[str], *,
         environ: Mapping[str, str] | None = None, devices: int | None = None,
         cores: int | None = None, python: str | None = None) -> Launch:
    """The launch for these options: pure apart from reading the hostfile and, when `devices`
    or `cores` is None, asking this machine."""
    environ = os.environ if environ is None else environ
    devices = cuda_device_count() if devices is None else devices
    cores = cpu_cores() if cores is None else cores
    python = python or sys.executable
    _check_numbers(args)
    env: dict[str, str] = {}
    if devices == 0 and "DS_ACCELERATOR" not in environ:
        asked = gpus_asked_for(environ)
        if asked and not args.allow_cpu:
            raise LaunchError(f"GPUs were asked for ({asked}) but CUDA sees none on this node: "
                              "check its driver and CUDA modules (nvidia-smi), or pass "
                              "--allow-cpu (or set DS_ACCELERATOR=cpu) to run CPU ranks on "
                              "purpose")
        env["DS_ACCELERATOR"] = "cpu"
    if args.hostfile is not None:
        return _hostfile_launch(args, megaloop_argv, python, env)

    notes: list[str] = []
    nnodes, node_rank, addr, port = args.nnodes, args.node_rank, args.master_addr, args.master_port
    nproc = args.nproc
    if nnodes is None and environ.get("SLURM_JOB_ID"):
        nnodes, node_rank, slurm_addr, slurm_port, slurm_nproc = slurm_placement(environ)
        if nnodes > 1:  # a one-node job runs as on a workstation: --standalone, a free port
            addr, port = addr or slurm_addr, port or slurm_port
        nproc = nproc or slurm_nproc or devices or 1
        notes.append(f"SLURM job {environ['SLURM_JOB_ID']}: node {node_rank} of {nnodes}")
    nnodes, node_rank, nproc = nnodes or 1, node_rank or 0, nproc or 1
    uses_cuda = devices > 0 and environ.get("DS_ACCELERATOR", "cuda") == "cuda"
    if uses_cuda and nproc > devices:
        raise LaunchError(f"--nproc {nproc} but this node has {devices} CUDA devices: "
                          f"use --nproc {devices} or fewer")
    if nproc > 1 and "OMP_NUM_THREADS" not in environ:
        env["OMP_NUM_THREADS"] = str(max(1, cores // nproc))

    if nnodes == 1 and nproc == 1:
        notes.append("one process, world size 1")
        return Launch([python, "-m", "megaloop.cli", *megaloop_argv], env, notes)
    if nnodes == 1 and addr is None and port is None:
        notes.append(f"{nproc} local ranks on a file store, sockets on the loopback only")
        return Launch([python, "-m", "megaloop.launch", LOCAL_RANKS, str(nproc),
                       "-m", "megaloop.cli", *megaloop_argv], env, notes)
    if "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in environ:
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(SIGTERM_GRACE_S)
    argv = [python, "-m", "megaloop.launch", TORCHRUN, "--nproc-per-node", str(nproc)]
    if nnodes > 1:
        if addr is None:
            raise LaunchError(f"--nnodes {nnodes} needs --master-addr: the address of node 0, "
                              "the same on every node")
        argv += ["--nnodes", str(nnodes), "--node-rank", str(node_rank)]
    addr, port = addr or "127.0.0.1", port or DEFAULT_PORT
    _check_host(addr, "--master-addr")
    argv += ["--master-addr", addr, "--master-port", str(port)]
    notes.append(f"master {addr}:{port}")
    notes.append(f"torchrun: {nnodes} node(s) x {nproc} ranks = world size {nnodes * nproc}")
    return Launch([*argv, "-m", "megaloop.cli", *megaloop_argv], env, notes)


def _check_numbers(args: argparse.Namespace) -> None:
    if args.nproc is not None and args.nproc < 1:
        raise LaunchError(f"--nproc {args.nproc}: give 1 or more ranks per node")
    if args.nnodes is not None and args.nnodes < 1:
        raise LaunchError(f"--nnodes {args.nnodes}: give 1 or more nodes")
    if args.node_rank is not None:
        if args.nnodes is None and args.hostfile is None:
            raise LaunchError("--node-rank needs --nnodes (and --master-addr): the node count "
                              "and this node's place in it")
        if args.nnodes is not None and not 0 <= args.node_rank < args.nnodes:
            raise LaunchError(f"--node-rank {args.node_rank} is outside 0..{args.nnodes - 1} "
                              f"for --nnodes {args.nnodes}")
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        raise LaunchError(f"--master-port {args.master_port} is outside 1..65535")
    if args.hostfile is not None and (args.nnodes is not None or args.node_rank is not None):
        raise LaunchError("--hostfile lists the nodes and starts all of them from here: drop "
                          "--nnodes/--node-rank (or drop --hostfile and run one launch.sh per "
                          "node)")


def _check_host(addr: str, what: str) -> None:
    if not HOST.fullmatch(addr):
        raise LaunchError(f"{what} {addr!r} is not a host name or IP address")


def _hostfile_launch(args: argparse.Namespace, megaloop_argv: list[str], python: str,
                     env: dict[str, str]) -> Launch:
    hosts = parse_hostfile(args.hostfile)
    if args.nproc is not None and args.nproc > min(hosts.values()):
        small = min(hosts, key=hosts.__getitem__)
        raise LaunchError(f"--nproc {args.nproc} but {args.hostfile} gives {small} only "
                          f"{hosts[small]} slots: use --nproc {hosts[small]} or fewer, or omit "
                          "--nproc to run every host's slots")
    addr = args.master_addr or next(iter(hosts))
    _check_host(addr, "--master-addr")
    if len(hosts) > 1:  # DeepSpeed writes these into the command pdsh gives a remote shell
        for what, value in (("the working directory", os.getcwd()), ("the Python", python),
                            ("PYTHONPATH", os.environ.get("PYTHONPATH", ""))):
            if value and not SHELL_SAFE.fullmatch(value):
                raise LaunchError(f"{what} {value!r} holds characters a remote shell would "
                                  "read: move it to a plain path (letters, digits, ./_-)")
    port = args.master_port or DEFAULT_PORT
    argv = [python, "-m", "deepspeed.launcher.runner", "--hostfile", args.hostfile,
            "--master_addr", addr, "--master_port", str(port)]
    if args.nproc is not None:
        argv += ["--num_gpus", str(args.nproc)]
    if len(hosts) == 1:  # DeepSpeed runs one host in place, after an ssh check, wherever it is
        local = {"localhost", "127.0.0.1", socket.gethostname(), socket.gethostname().split(".")[0]}
        argv += ["--no_ssh_check"] if next(iter(hosts)) in local else ["--force_multi"]
    payload = base64.urlsafe_b64encode(json.dumps(megaloop_argv).encode()).decode()
    argv += ["--no_local_rank", "--module", "megaloop.launch", RANK_ARGV, payload]
    per_host = {host: args.nproc or slots for host, slots in hosts.items()}
    notes = [f"DeepSpeed launcher: {len(hosts)} host(s), world size {sum(per_host.values())}, "
             f"master {addr}:{port}",
             f"each rank runs: megaloop {shlex.join(megaloop_argv)}"]
    return Launch(argv, env, notes)


def run_rank(payload: str) -> int:
    """Entry of a rank started by DeepSpeed's launcher: decode the megaloop argv, set this
    node's defaults (DS_ACCELERATOR, OMP_NUM_THREADS) and run megaloop in this process."""
    argv = json.loads(base64.urlsafe_b64decode(payload.encode()))
    if "DS_ACCELERATOR" not in os.environ and cuda_device_count() == 0:
        os.environ["DS_ACCELERATOR"] = "cpu"
    local_ranks = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    if local_ranks > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, cpu_cores() // local_ranks))

    return megaloop_main(argv)


def run_torchrun(torchrun_argv: list[str]) -> int:
    """torchrun (`torch.distributed.run`) in this process. On SIGTERM (a job's end, a
    preemption) torchrun passes the signal to its ranks, waits for them and raises; here that
    ends in one line and exit 0 when every local rank saved its checkpoint and stopped (each
    leaves a report in $MEGALOOP_STOP_REPORTS), else 128 + the signal."""

    # torch is imported here, not at the top, so that a refused launch line fails in a blink
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    nproc = int(torchrun_argv[torchrun_argv.index("--nproc-per-node") + 1])
    reports = Path(tempfile.mkdtemp(prefix="megaloop-stop-"))
    os.environ[STOP_REPORTS] = str(reports)
    try:
        torchrun_main(torchrun_argv)
        return 0
    except SignalException as exc:
        return stop_exit_status(int(exc.sigval), len(list(reports.glob("rank*.json"))), nproc)
    except ChildFailedError as exc:  # a rank failed: its error is above, torchrun's table here
        print(exc.format_msg(), file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(reports, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [RANK_ARGV] and len(argv) == 2:
        return run_rank(argv[1])
    if argv[:1] == [TORCHRUN]:
        return run_torchrun(argv[1:])
    if argv[:1] == [LOCAL_RANKS] and len(argv) > 2 and argv[1].isdigit():

        return local_ranks.run(int(argv[1]), [sys.executable, *argv[2:]])
    try:
        args, megaloop_argv = parse(argv)
        launch = plan(args, megaloop_argv)
    except LaunchError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(launch.command_line())
        for note in launch.notes:
            print(f"# {note}")
        return 0
    print(f"{PROG}: {launch.command_line()}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execvpe(launch.argv[0], launch.argv, {**os.environ, **launch.env})
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
