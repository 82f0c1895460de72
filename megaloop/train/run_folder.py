"""A run folder, `<train.checkpoint_dir>/<run name>/`, belongs to one run.

- `megaloop_run.json` records the run: its name, the config in force and its hash, the world
  size, the precision it trains in (`train.precision: auto` as the training machine resolved
  it), and each continuation with the changes it made.
- `megaloop.lock` is held by rank 0 while the run trains (host, pid, start, SLURM job): a second
  process refuses. A lock whose owner is gone (the same host and its pid dead, or the same SLURM
  job and task, requeued) is stale and taken over.

The rules a start follows (`claim`, on rank 0; every rank gets its answer):
- `train` without `--resume` refuses a folder that holds checkpoints.
- `--resume` continues the recorded config only. A change that alters what is trained (more
  steps, another lr, another r: `CHANGES_ON_PURPOSE`) needs `--accept-changes` and is recorded;
  a change of what a checkpoint holds (the model's shape, the data, the optimizer, ZeRO) is
  refused; log and checkpoint intervals, workers and the like change freely.
- Another world size is a change on purpose too: at ZeRO 1-3 the checkpoint is resharded
  through DeepSpeed's universal checkpoint (train/checkpoint.py), which reshards Adam's
  optimizer state only; at ZeRO-0 every rank's state is whole and loads as it is.
- So is another resolved precision (`auto` resumed on a machine without native bf16).
- `--resume auto` with nothing to resume says so and starts fresh.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from megaloop.atomic import atomic_write_json
from megaloop.ckpt.layout import step_folders
from megaloop.config import GROUP_ROLES, LR_ROLES, RunConfig, upgrade_saved
from megaloop.errors import CheckpointError, ConfigError

RECORD = "megaloop_run.json"
LOCK = "megaloop.lock"

CHANGES_FREE = frozenset({  # how a run is watched and stored, not what it trains
    "train.log_interval", "train.checkpoint_interval", "train.keep_checkpoints",
    "train.peak_flops", "train.compile", "data.workers", "data.verify", "track.enabled",
    "track.system_metrics_interval",
    "model.activation_checkpointing", "model.attention"})
CHANGES_ON_PURPOSE = frozenset({  # what is trained from here on: --accept-changes
    "train.tokens", "train.steps", "train.budget_flops", "train.lr", "train.min_lr",
    "train.warmup_steps", "train.schedule", "train.wsd_decay_fraction", "train.weight_decay",
    "train.matrix_lr", "train.muon_momentum", "train.polar_precision", "train.beta1",
    "train.beta2", "train.eps", "train.grad_clip", "train.eval_interval", "train.eval_batches",
    "train.eval_tokens", "train.precision", "model.recurrences", "model.bptt_k",
    "model.recurrence_sampling", "world_size",
    "precision",  # train.precision as resolved: auto on a machine without native bf16
    *(f"train.{role}_lr" for role in LR_ROLES),
    *(f"train.{role}_{key}" for role in GROUP_ROLES
      for key in ("beta1", "beta2", "weight_decay"))})


def config_changes(recorded: dict[str, Any], config: RunConfig) -> dict[str, tuple[Any, Any]]:
    """`{"train.steps": (20, 30), ...}`: the flat keys whose value differs from the record."""
    before = {f"{section}.{key}": value for section, values in upgrade_saved(recorded).items()
              for key, value in values.items()}
    now = config.flat()
    return {key: (before.get(key), now.get(key)) for key in sorted(set(before) | set(now))
            if before.get(key) != now.get(key)}


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _slurm_task() -> str | None:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    return None if job is None else f"{job}:{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"


@dataclass
class Claim:
    """What `claim` decided: `changes` made on purpose or freely (recorded), `note` a line
    to print."""

    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    note: str | None = None


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock_file = self.path / LOCK
        self._locked = False
        self._made: list[Path] = []  # the folders taking the lock created, innermost first

    # ---- the lock ---------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the folder's lock or raise CheckpointError naming its owner."""
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(),
                 "slurm": _slurm_task()}
        try:
            made = [p for p in (self.path, *self.path.parents) if not p.exists()]
            self.path.mkdir(parents=True, exist_ok=True)
            self._made = self._made or made
            fd, draft = tempfile.mkstemp(prefix=".megaloop.lock.", dir=self.path)
        except OSError as exc:
            raise CheckpointError(
                f"Cannot write the run folder {self.path} ({exc.strerror or exc}): point "
                "train.checkpoint_dir at a folder you can write.") from None
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(owner, handle)
            for _ in range(2):
                try:
                    os.link(draft, self.lock_file)  # atomic, and fails where a lock exists
                    self._locked = True
                    return
                except FileExistsError:
                    held = self._owner()
                    if not self._stale(held):
                        raise CheckpointError(
                            f"Run folder {self.path} is in use by process {held.get('pid')} on "
                            f"{held.get('host')} since {held.get('started')} (lock "
                            f"{self.lock_file}). One process trains a run at a time: wait for "
                            f"it, or if it is gone, delete {self.lock_file}.") from None
                    self.lock_file.unlink(missing_ok=True)
        finally:
            Path(draft).unlink(missing_ok=True)
        raise CheckpointError(f"Could not take the lock {self.lock_file}: another process keeps "
                              "taking it. Check what else trains this run.")

    def _owner(self) -> dict[str, Any]:
        try:
            return json.loads(self.lock_file.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    @staticmethod
    def _stale(owner: dict[str, Any]) -> bool:
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
            return owner["pid"] != os.getpid() and not _pid_alive(owner["pid"])
        ours = _slurm_task()
        return ours is not None and owner.get("slurm") == ours  # this job, requeued

    def unlock(self) -> None:
        if self._locked and self._owner().get("pid") == os.getpid():
            self.lock_file.unlink(missing_ok=True)
        self._locked = False

    def remove_if_new(self) -> bool:
        """After a start that failed before its first checkpoint: remove the folder if this
        start made it (and the parents it made, where nothing else has arrived in them since),
        so that the run name is free again and nothing is left behind. A folder that held a
        run before, or holds a checkpoint now, stays. Returns whether it was removed."""
        self.unlock()
        if not self._made or not self.path.is_dir() or step_folders(self.path):
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        for parent in self._made[1:]:
            try:
                parent.rmdir()  # only if empty: another run may have arrived meanwhile
            except OSError:
                break
        self._made = []
        return True

    # ---- the record -------------------------------------------------------------------------

    def record(self) -> dict[str, Any] | None:
        path = self.path / RECORD
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"The run record {path} is unreadable ({exc}); restore it or "
                                  "move the folder away.") from None

    def checkpoints(self) -> list[str]:
        return [p.name for p in step_folders(self.path, marked_only=True)]

    def _write_record(self, config: RunConfig, world_size: int, precision: str | None,
                      previous: dict | None, changes: dict[str, tuple[Any, Any]]) -> None:
        record = previous or {"run_name": self.path.name, "created": _now(),
                              "continuations": []}
        if previous is not None and changes:
            record["continuations"].append(
                {"at": _now(), "changes": {k: list(v) for k, v in changes.items()}})
        record.update({"config": config.to_dict(), "config_hash": config.hash(),
                       "world_size": world_size,
                       "precision": precision or config.train.precision})
        atomic_write_json(self.path / RECORD, record)

    def claim(self, config: RunConfig, world_size: int, resume: str | None,
              accept_changes: bool = False, precision: str | None = None) -> Claim:
        """Lock the folder and check that this start may use it (the rules above); records
        the run, with the precision it trains in (`train.precision` as this machine resolved
        it; None: as the config says). Raises CheckpointError (ConfigError for a refused
        change) otherwise."""
        self.lock()
        try:
            return self._claim(config, world_size, precision or config.train.precision, resume,
                               accept_changes)
        except BaseException:
            self.unlock()
            raise

    def _claim(self, config: RunConfig, world_size: int, precision: str, resume: str | None,
               accept_changes: bool) -> Claim:
        record, saved = self.record(), self.checkpoints()
        if resume is None:
            if saved:
                whose = ("this config's" if record and record.get("config_hash") == config.hash()
                         else "another run's")
                raise CheckpointError(
                    f"{self.path} holds {whose} checkpoints (newest {saved[0]}). Continue them "
                    "with --resume auto, or train a new run under another track.run_name (or "
                    "train.checkpoint_dir), or delete the folder.")
            self._write_record(config, world_size, precision, None, {})
            return Claim()
        if record is None:
            self._write_record(config, world_size, precision, None, {})
            note = (f"nothing to resume in {self.path}: starting fresh"
                    if resume == "auto" and not saved else None)
            return Claim(note=note)
        changes = config_changes(record.get("config", {}), config)
        if record.get("world_size") != world_size:
            self._check_reshard(record.get("world_size"), world_size, accept_changes, config)
            changes["world_size"] = (record.get("world_size"), world_size)
        recorded_precision = record.get("precision", record.get("config", {}).get(
            "train", {}).get("precision"))
        if recorded_precision not in (None, "auto", precision):
            changes["precision"] = (recorded_precision, precision)
        self._check_changes(changes, accept_changes, config)
        self._write_record(config, world_size, precision, record, changes)
        note = f"resuming with changes: {describe(changes)}" if changes else None
        if "world_size" in changes and config.train.eval_tokens is None:
            note += ("; val/loss is over train.eval_batches per rank, so its set changes with "
                     "the ranks (train.eval_tokens keeps one set on any number)")
        return Claim(changes=changes, note=note)

    def _check_reshard(self, saved: int | None, now: int, accept: bool,
                       config: RunConfig) -> None:
        """Another world size: on purpose only, and only where DeepSpeed's universal
        checkpoint can reshard the optimizer state (Adam's moments)."""
        if config.train.optimizer != "adamw" and config.train.zero_stage > 0:
            raise CheckpointError(
                f"{self.path} was trained on {saved} ranks; this start has {now}. Its "
                f"{config.train.optimizer} state is sharded by ZeRO stage "
                f"{config.train.zero_stage}, and DeepSpeed's universal checkpoint reshards "
                f"Adam's moments only: resume it on {saved} ranks.")
        if not accept:
            raise CheckpointError(
                f"{self.path} was trained on {saved} ranks; this start has {now}. Resume it on "
                f"{saved} ranks, or pass --accept-changes to reshard its checkpoint onto {now} "
                "(DeepSpeed's universal checkpoint; the global batch stays the same).")

    def _check_changes(self, changes: dict[str, tuple[Any, Any]], accept: bool,
                       config: RunConfig) -> None:
        shaped_by_r = config.model.hyper != "none"  # hyper-connections: parameters per recurrence
        locked = {k: v for k, v in changes.items()
                  if (k not in CHANGES_FREE and k not in CHANGES_ON_PURPOSE)
                  or (k == "model.recurrences" and shaped_by_r)}
        if locked:
            raise ConfigError(
                f"{self.path} holds a run that this config cannot continue: {describe(locked)} "
                "would change what its checkpoints hold. Resume with the recorded config "
                f"({self.path / RECORD}), or train a new run under another track.run_name.")
        on_purpose = {k: v for k, v in changes.items() if k in CHANGES_ON_PURPOSE}
        if on_purpose and not accept:
            raise ConfigError(
                f"{self.path} holds a run with another config: {describe(on_purpose)}. Pass "
                "--accept-changes to continue it with these values (recorded in the run folder "
                "and in MLflow), or resume with the recorded config.")
