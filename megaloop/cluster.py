"""What the cluster says about itself: SLURM's environment and compressed hostlists, DeepSpeed
hostfiles, this machine's cores, CUDA devices and loopback interface. Used by the launcher
(launch.py, local_ranks.py); the Engine takes the loopback from here, and the trainer
`STOP_REPORTS`, where a rank stopped by SIGTERM says that it saved."""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path

from megaloop.errors import MegaloopError

HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*|\[[0-9A-Fa-f:.]+\]")  # name, IPv4 or [IPv6]
HOSTFILE_FORM = "'HOSTNAME slots=N' with N a positive integer ('#' starts a comment)"
STOP_REPORTS = "MEGALOOP_STOP_REPORTS"  # a folder where each rank stopped by SIGTERM reports


def loopback_interface() -> str | None:
    """The name of this machine's loopback interface (`lo` on Linux), or None."""
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)


class LaunchError(MegaloopError):
    """A launch that cannot start: missing file, malformed hostfile, impossible numbers."""


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed hostlist: 'node[01-03,07],gpu-a1' -> node01 .. node07, gpu-a1.

    Several bracket groups in one name expand as a product ('r[1-2]n[1-2]' -> r1n1 r1n2 ...);
    zero padding follows the lower bound ('[08-10]' -> 08 09 10).
    """
    hosts: list[str] = []
    for name in _split_top_level(nodelist):
        hosts += _expand_name(name, nodelist)
    if not hosts:
        raise LaunchError(f"empty SLURM node list {nodelist!r}")
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    names, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if depth not in (0, 1):
            raise LaunchError(f"unbalanced brackets in SLURM node list {nodelist!r}")
        if char == "," and depth == 0:
            names.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise LaunchError(f"unbalanced brackets in SLURM node list {nodelist!r}")
    names.append(nodelist[start:])
    return [name.strip() for name in names if name.strip()]


def _expand_name(name: str, nodelist: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", name)
    if match is None:
        if not HOST.fullmatch(name):
            raise LaunchError(f"bad host {name!r} in SLURM node list {nodelist!r}")
        return [name]
    head, tail = name[:match.start()], name[match.end():]
    expanded = []
    for item in match.group(1).split(","):
        bounds = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if bounds is None or (bounds.group(2) and int(bounds.group(2)) < int(bounds.group(1))):
            raise LaunchError(f"bad range {item!r} in SLURM node list {nodelist!r}: expected "
                              "N or LO-HI with LO <= HI, e.g. node[01-04,07]")
        low, high = bounds.group(1), bounds.group(2) or bounds.group(1)
        for number in range(int(low), int(high) + 1):
            expanded += _expand_name(f"{head}{number:0{len(low)}d}{tail}", nodelist)
    return expanded


def parse_hostfile(path: str) -> dict[str, int]:
    """Hosts and their slots, in file order; refuses anything DeepSpeed or a shell might misread."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise LaunchError(f"hostfile {path} not found: write one line {HOSTFILE_FORM} "
                          "per host") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LaunchError(f"cannot read hostfile {path}: {exc}") from None
    hosts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = re.fullmatch(r"(\S+)\s+slots=(\d+)", text)
        if match is None or not HOST.fullmatch(match.group(1)) or int(match.group(2)) < 1:
            raise LaunchError(f"{path}:{number}: expected {HOSTFILE_FORM}, got {line.strip()!r}")
        host = match.group(1)
        if host in hosts:
            raise LaunchError(f"{path}:{number}: host {host} is listed again (first on line "
                              f"{first_line[host]}): give each host one line")
        hosts[host] = int(match.group(2))
        first_line[host] = number
    if not hosts:
        raise LaunchError(f"hostfile {path} lists no hosts: write one line {HOSTFILE_FORM} "
                          "per host")
    return hosts


def cuda_device_count() -> int:
    """CUDA (or ROCm) devices torch sees; a CPU-only torch answers without being imported."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return 0
    try:
        version = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    except OSError:
        version = ""
    if all(re.search(rf"^{name}\b.*=\s*None\s*$", version, re.MULTILINE)
           for name in ("cuda", "hip")):
        return 0
    import torch  # here only: a CPU build of torch is answered above without its import

    return torch.cuda.device_count()


def cpu_cores() -> int:
    """Cores this process may run on (taskset, cgroups and SLURM bindings included)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def slurm_placement(environ: Mapping[str, str]) -> tuple[int, int, str, int, int | None]:
    """nnodes, node rank, master address and port, ranks per node (None: not given)."""

    def number(*names: str) -> int | None:
        for name in names:
            if environ.get(name):
                try:
                    return int(environ[name])
                except ValueError:
                    raise LaunchError(f"{name}={environ[name]!r} is not a number: is this "
                                      "launch.sh inside a SLURM job?") from None
        return None

    if environ.get("SLURM_LOCALID", "0") != "0":
        raise LaunchError("several launch.sh tasks run on this node (SLURM_LOCALID="
                          f"{environ['SLURM_LOCALID']}): start one per node, e.g. "
                          "srun --ntasks-per-node=1 ./launch.sh ...")
    job_id = number("SLURM_JOB_ID")
    nnodes = number("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES") or 1
    node_rank = number("SLURM_NODEID")
    if node_rank is None and nnodes > 1:
        raise LaunchError(f"SLURM job of {nnodes} nodes but no SLURM_NODEID: start launch.sh on "
                          "every node with srun --ntasks-per-node=1 ./launch.sh ...")
    node_rank = node_rank or 0
    nodelist = next((environ[name] for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST",
                                                "SLURM_NODELIST") if environ.get(name)), None)
    if nodelist is None:
        raise LaunchError("SLURM_JOB_ID is set but no SLURM_JOB_NODELIST: run launch.sh inside "
                          "the job (srun), or pass --nnodes 1 to ignore SLURM")
    hosts = expand_hostlist(nodelist)
    if len(hosts) != nnodes:
        raise LaunchError(f"SLURM node list {nodelist!r} has {len(hosts)} hosts but the job "
                          f"step has {nnodes} nodes")
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"SLURM_NODEID={node_rank} is outside 0..{nnodes - 1}")
    return nnodes, node_rank, hosts[0], 20000 + job_id % 20000, number("SLURM_GPUS_ON_NODE")
