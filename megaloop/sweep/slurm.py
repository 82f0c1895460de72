"""A sweep as a SLURM array: task i trains run config i through launch.sh's logic (`python -m
megaloop.launch`, in the environment that submits), on one node with a
GPU per rank, and comes back after a preemption or its time limit.

The batch script (`slurm_script`, printed by `megaloop sweep ... --executor slurm --dry-run`):
- asks for what the spec's `slurm:` mapping and the CLI give (`SlurmResources`): GPUs per node
  (default one per rank), CPUs per task (default `cpus_for`: the ranks and their data workers,
  where a cluster's default of one CPU per task would put every rank on one core), time limit,
  partition, account, and extra `#SBATCH` options;
- gets SIGTERM 120 s before its time limit (`--signal=B:TERM@120`: to the batch shell only)
  and traps it: the signal goes on to the job step (srun passes it to the launcher, whose ranks
  save a checkpoint and exit 0), the shell waits for the step, then requeues the task
  (`scontrol requeue`), which continues with `--resume auto`.
A hand-written script rather than submitit: it is text a user can read, change and submit by
hand, it runs the launcher's rank tree as any other job does, and no pickled callable travels
between nodes.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from megaloop.atomic import atomic_write_bytes
from megaloop.errors import ConfigError

OPTION = re.compile(r"^--[a-z][a-z0-9-]*(=[^\s'\"\\]+)?$")  # one sbatch option, no shell
TIME = re.compile(r"^(\d+-)?\d+(:\d{2}){0,2}$")  # minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]
NAME = re.compile(r"^[A-Za-z0-9_.,-]+$")
CPUS_PER_RANK = 4  # a rank's process, its host-side threads (OMP_NUM_THREADS = cores / ranks)


def cpus_for(nproc: int, data_workers: int) -> int:
    """CPUs a task asks for unless told: CPUS_PER_RANK per rank, and at least the encoding
    workers (data.workers) that a run preparing its corpus starts besides its ranks."""
    return nproc * CPUS_PER_RANK + max(0, data_workers - CPUS_PER_RANK)


@dataclass
class SlurmResources:
    """What each array task asks for. None: SLURM's default (gpus_per_node: one per rank)."""

    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    extra: list[str] = field(default_factory=list)  # more options: "--qos=high", "--exclusive"

    @classmethod
    def from_spec(cls, raw: Any) -> SlurmResources:
        """The spec's `slurm:` mapping (keys as the fields, e.g. gpus_per_node: 8)."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ConfigError(f"Sweep spec: slurm = {raw!r} must be a mapping, e.g. "
                              "slurm: {gpus_per_node: 8, time: '24:00:00', partition: gpu}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"Sweep spec: slurm has unknown key {unknown[0]!r}; the keys are "
                              f"{', '.join(sorted(known))}.")
        extra = raw.get("extra", [])
        resources = cls(**{**raw, "extra": [extra] if isinstance(extra, str) else list(extra)})
        resources.check("slurm.")
        return resources

    def overridden(self, **cli: Any) -> SlurmResources:
        """These resources with the CLI's values where it gives one (its extras added)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({key: value for key, value in cli.items()
                       if value is not None and key != "extra"})
        values["extra"] = [*self.extra, *(cli.get("extra") or [])]
        resources = SlurmResources(**values)
        resources.check("--")
        return resources

    def check(self, prefix: str) -> None:
        """Every value is one plain sbatch token: nothing reaches the script as shell."""
        def name(key: str) -> str:
            return f"{prefix}{key}" if prefix != "--" else f"--{key.replace('_', '-')}"

        for key in ("gpus_per_node", "cpus_per_task"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise ConfigError(f"{name(key)} = {value!r} must be a whole number >= 0.")
        if self.cpus_per_task == 0:
            raise ConfigError(f"{name('cpus_per_task')} = 0: ask for at least 1 CPU per task.")
        if self.time is not None and not TIME.match(str(self.time)):
            raise ConfigError(f"{name('time')} = {self.time!r} is not a SLURM time limit: "
                              "minutes, HH:MM:SS or D-HH:MM:SS, e.g. 24:00:00.")
        for key in ("partition", "account"):
            value = getattr(self, key)
            if value is not None and not NAME.match(str(value)):
                raise ConfigError(f"{name(key)} = {value!r} is not a SLURM name (letters, "
                                  "digits, _ . , -).")
        for option in self.extra:
            if not isinstance(option, str) or not OPTION.match(option):
                raise ConfigError(f"{name('extra') if prefix != '--' else '--sbatch'} "
                                  f"{option!r} is not one sbatch option: write it as "
                                  "--name or --name=value, without spaces or quotes.")

    def sbatch_lines(self, nproc: int, data_workers: int = 0) -> list[str]:
        gpus = nproc if self.gpus_per_node is None else self.gpus_per_node
        lines = [f"#SBATCH --gpus-per-node={gpus}"] if gpus else []
        cpus = self.cpus_per_task or cpus_for(nproc, data_workers)
        lines.append(f"#SBATCH --cpus-per-task={cpus}")
        for key in ("time", "partition", "account"):
            value = getattr(self, key)
            if value is not None:
                lines.append(f"#SBATCH --{key.replace('_', '-')}={value}")
        return lines + [f"#SBATCH {option}" for option in self.extra]


def slurm_script(experiment: str, listing: Path, count: int, nproc: int, log_folder: Path,
                 resources: SlurmResources | None = None, data_workers: int = 0) -> str:
    """The array script: task i trains the config on line i + 1 of `listing`."""
    resources = resources or SlurmResources()
    cpu_ranks = resources.gpus_per_node == 0  # asked for no GPU: CPU ranks on purpose
    launch = [sys.executable, "-m", "megaloop.launch", "train", '"$config"', "--resume", "auto",
              "--no-progress", "--nproc", str(nproc)]
    quoted = " ".join(part if part == '"$config"' else shlex.quote(part) for part in launch)
    env = "DS_ACCELERATOR=cpu " if cpu_ranks else ""
    lines = [
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name={shlex.quote('megaloop-' + experiment)}",
        f"#SBATCH --array=0-{count - 1}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        *resources.sbatch_lines(nproc, data_workers),
        "#SBATCH --requeue",
        "#SBATCH --signal=B:TERM@120",
        f"#SBATCH --output={shlex.quote(str(log_folder.resolve()))}/slurm-%A_%a.out",
        "set -uo pipefail",
        f"cd {shlex.quote(str(Path.cwd().resolve()))} || exit 1",
        f"config=$(sed -n \"$((SLURM_ARRAY_TASK_ID + 1))p\" {shlex.quote(str(listing.resolve()))})",
        "",
        "# SIGTERM (120 s before the time limit, or a preemption) reaches this shell only: pass",
        "# it on to the job step, whose ranks save a checkpoint and exit 0, then requeue the",
        "# task, which resumes from that checkpoint (--resume auto).",
        "stopped=0",
        "step=",
        "# shellcheck disable=SC2329  # forward_term is the trap's",
        'forward_term() { stopped=1; [[ -n "$step" ]] && kill -TERM "$step" 2>/dev/null; }',
        "trap forward_term TERM",
        f"{env}srun --ntasks-per-node=1 {quoted} &",
        "step=$!",
        'while wait "$step"; code=$?; kill -0 "$step" 2>/dev/null; do :; done',
        'if [[ $stopped == 1 ]]; then',
        '  echo "megaloop: task ${SLURM_ARRAY_TASK_ID} stopped after its checkpoint'
        ' (exit $code); requeueing job ${SLURM_JOB_ID}"',
        '  scontrol requeue "$SLURM_JOB_ID" || echo "megaloop: scontrol requeue failed:'
        ' resubmit the sweep, finished runs are skipped" >&2',
        "  exit 0",
        "fi",
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"


def submit_slurm(folder: Path, experiment: str, config_paths: list[Path], nproc: int,
                 resources: SlurmResources, dry_run: bool, data_workers: int = 0) -> str:
    """Write the listing and the script into the sweep's `folder`; sbatch it unless
    `dry_run`. Returns the script. `data_workers`: the most any run prepares its data with."""
    listing = folder / "runs.txt"
    atomic_write_bytes(listing, "".join(f"{p.resolve()}\n" for p in config_paths).encode())
    script = slurm_script(experiment, listing, len(config_paths), nproc, folder, resources,
                          data_workers)
    script_path = folder / "sweep.sbatch"
    atomic_write_bytes(script_path, script.encode())
    if not dry_run:
        if shutil.which("sbatch") is None:
            raise ConfigError(f"sbatch is not on this machine; the script is at {script_path}: "
                              "submit it from a SLURM login node, or use --executor local.")
        subprocess.run(["sbatch", str(script_path)], check=True)
    return script
