"""The training loop: batch -> loss -> backward -> step, with the schedule, evaluation, metrics,
checkpoints, the non-finite guard and SIGTERM handling. Rank 0 prints and tracks.

It talks to the Engine (engine.py) and never to DeepSpeed, the device or the collectives. The
losses and gradient norms of the steps stay on the device; the host reads them once per sync
point (every `log_interval` steps, and before an evaluation or a checkpoint), in one transfer.
So the non-finite guard and SIGTERM act up to `log_interval` steps late, and a checkpoint is
only ever saved after the guard has seen every step before it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from megaloop.atomic import atomic_write_json, file_digest
from megaloop.ckpt.layout import check_resume_target
from megaloop.cluster import STOP_REPORTS
from megaloop.config import RunConfig
from megaloop.data.dataset import open_run_data
from megaloop.data.loader import TrainLoader, ValLoader, eval_windows, predicted_tokens
from megaloop.display import duration
from megaloop.errors import CheckpointError, ConfigError, TrainingError
from megaloop.model.accounting import account, causal_flops_per_token
from megaloop.track import find_runs, open_tracker, tracking_uri
from megaloop.track.names import Metric, Tag
from megaloop.train.checkpoint import Checkpoints
from megaloop.train.ds_config import batch_geometry, total_steps
from megaloop.train.engine import Engine
from megaloop.train.mfu import peak_flops
from megaloop.train.run_folder import Claim, RunFolder
from megaloop.train.schedule import lr_at


def run_name(config: RunConfig) -> str:
    m = config.model
    return config.track.run_name or f"r{m.recurrences}-d{m.d_model}-{config.hash()}"


def run_folder(config: RunConfig) -> Path:
    return Path(config.train.checkpoint_dir) / run_name(config)


@dataclass
class StepResult:
    """One optimizer step as the device left it: the loss (this rank's mean over its
    micro-batches) and the global gradient norm stay device tensors until the next sync."""

    step: int
    loss: torch.Tensor
    grad_norm: torch.Tensor | None
    recurrences: int
    lr: float


@dataclass
class SyncedStep:
    """A step read back to the host: its loss averaged over the ranks."""

    step: int
    loss: float
    grad_norm: float | None
    recurrences: int
    lr: float


def non_finite_count(norms: list[torch.Tensor]) -> torch.Tensor | float:
    """How many of these device scalars are not finite, on the device."""
    if not norms:
        return 0.0
    return torch.stack([n.reshape(()).float() for n in norms]).isfinite().logical_not().sum()


@dataclass
class ThroughputMeter:
    """Tokens and FLOPs of the training steps since the last report, over the time they took:
    FLOPs as the papers count them (attention in full) and with attention counted causally.
    The loop pauses it right after each sync point (where the host has waited for the device,
    so queued work is counted where it ran) and resumes it when logging, evaluation and the
    checkpoint are done: none of them counts as training time."""

    tokens: int = 0
    flops: float = 0.0
    causal_flops: float = 0.0
    seconds: float = 0.0
    started: float | None = field(default_factory=time.perf_counter)

    def add(self, tokens: int, flops: float, causal_flops: float) -> None:
        self.tokens += tokens
        self.flops += flops
        self.causal_flops += causal_flops

    def pause(self) -> None:
        if self.started is not None:
            self.seconds += time.perf_counter() - self.started
            self.started = None

    def resume(self) -> None:
        self.started = time.perf_counter()

    def report(self) -> tuple[float, float, float]:
        """(tokens/s, FLOP/s, causal FLOP/s) since the last report, which empties the meter;
        it stays paused until `resume`."""
        self.pause()
        per_s = [value / self.seconds if self.seconds > 0 else 0.0
                 for value in (self.tokens, self.flops, self.causal_flops)]
        self.tokens, self.flops, self.causal_flops, self.seconds = 0, 0.0, 0.0, 0.0
        return per_s[0], per_s[1], per_s[2]


class Trainer:
    def __init__(self, config: RunConfig, engine: Engine, *, progress: bool = True,
                 lines: bool | None = None,
                 peak: float | None = None, resume: str | None = None,
                 accept_changes: bool = False, trust_checkpoint: bool = False):
        self.config, self.engine = config, engine
        self.rank, self.world_size = engine.rank, engine.world_size
        self.progress = progress and self.rank == 0
        # a plain line per log interval where no bar is drawn (--no-progress, no terminal);
        # `lines` decides instead (a sweep whose own bar is showing: none)
        wanted = not (progress and sys.stderr.isatty()) if lines is None else lines
        self.plain_lines = self.rank == 0 and wanted
        self.folder = RunFolder(run_folder(config))
        self.resume_from = resume
        # everything that can be checked is checked before the run folder is written
        check_resume_target(resume, trust_checkpoint)
        engine.trust_checkpoints = trust_checkpoint
        self._open_data()
        self.claim = self.claim_folder(resume, accept_changes)
        try:
            self._set_up(peak, trust_checkpoint, accept_changes)
        except BaseException:
            self.release(failed=True)
            raise

    def _open_data(self) -> None:
        """The run's shards and loaders, every check on them done (vocabulary, tokenizer,
        packing, hashes, enough windows in each split); writes nothing but a corpus's prepared
        shards in data.cache_dir."""
        config = self.config
        self.geometry = batch_geometry(config, self.world_size)
        self.total_steps = total_steps(config, self.geometry)
        self.accounting = account(config.model)
        shards = self.shards = open_run_data(config, self.rank, barrier=self.engine.barrier,
                                             progress=self.progress)
        seq, micro = config.model.max_seq_len, self.geometry.micro_batch
        self.train_data = TrainLoader(shards, seq, micro, rank=self.rank,
                                      world_size=self.world_size, seed=config.train.seed)
        self.val_data = ValLoader(shards, seq, micro, rank=self.rank, world_size=self.world_size,
                                  max_batches=config.train.eval_batches,
                                  max_windows=eval_windows(config))

    def _set_up(self, peak: float | None, trust_checkpoint: bool,
               accept_changes: bool) -> None:
        config, engine = self.config, self.engine
        engine.build()
        self.model = engine.model
        self.checkpoints = Checkpoints(self.folder.path, config.train.keep_checkpoints, engine,
                                       trust=trust_checkpoint, reshard=accept_changes)
        self.peak, self.peak_source = peak_flops(peak or config.train.peak_flops,
                                                 engine.precision, engine.hardware)
        self.step = 0
        self.flops_seen = 0.0  # training FLOPs of every step so far (sampled r: each its own)
        self.tracker = None
        self.flops_by_r: dict[int, tuple[float, float]] = {}  # r: (full, causal) per token
        self.intervals: list[dict[str, float]] = []  # throughput per log interval: summary
        self.pending: list[StepResult] = []  # steps since the last sync
        self.stop_signalled = False  # SIGTERM reached this rank
        self.stopping = False  # some rank was signalled, as all ranks agreed at a sync

    def release(self, failed: bool) -> None:
        """Let the run folder go (rank 0 holds its lock). After a failure before the first
        checkpoint, the folder this start made is removed: nothing is left behind, and the run
        name is free for the next attempt."""
        if self.rank == 0 and failed:
            self.folder.remove_if_new()
        self.folder.unlock()

    # ---- set-up ---------------------------------------------------------------------------

    def claim_folder(self, resume: str | None, accept_changes: bool) -> Claim:
        """Rank 0 locks and checks the run folder (train/run_folder.py); every rank gets its
        answer, so that all go on or all stop with its error."""
        claim, error = None, None
        if self.rank == 0:
            try:
                claim = self.folder.claim(self.config, self.world_size, resume, accept_changes,
                                          precision=self.engine.precision)
            except Exception as exc:  # every rank stops with it, none waits in the gather
                error = exc
        answer = self.engine.all_gather_objects(
            (claim, None if error is None else (type(error).__name__, str(error))))[0]
        if error is not None:
            raise error
        if answer[1] is not None:
            kind, text = answer[1]
            raise (ConfigError if kind == "ConfigError" else CheckpointError)(text)
        if answer[0].note:
            self.say(answer[0].note)
        return answer[0]

    def derived_params(self) -> dict[str, Any]:
        return {"n_once": self.accounting["n_once"], "n_rec": self.accounting["n_rec"],
                "recurrences": self.config.model.recurrences,
                "tokens": self.total_steps * self.geometry.tokens_per_step,
                "budget_flops": self.config.train.budget_flops or (
                    self.total_steps * self.geometry.tokens_per_step
                    * self.accounting["flops_per_token"]),
                "flops_per_token": self.accounting["flops_per_token"],
                "config_hash": self.config.hash(), "steps": self.total_steps,
                "global_batch": self.geometry.global_batch, "grad_accum": self.geometry.grad_accum,
                "world_size": self.world_size}

    def start(self) -> None:
        """Load the checkpoint to resume from (if any) and open the MLflow run."""
        which = self.resume_from
        state = self.checkpoints.load(which) if which else None
        run_id = None
        if state is not None:
            self.step = state["step"]
            self.flops_seen = state.get("flops_seen", self.step * self.geometry.tokens_per_step
                                        * self.accounting["flops_per_token"])
            self.train_data.load_state_dict(state["loader"])
            run_id = state.get("mlflow_run_id")
            self.say(f"resumed from step {self.step} ({self.checkpoints.folder})")
        elif which and self.rank == 0 and self.config.track.enabled:
            run_id = self.unfinished_run()
        self.tracker = open_tracker(self.config, rank=self.rank, world_size=self.world_size,
                                    derived=self.derived_params(), resume_run_id=run_id,
                                    resume_step=self.step, changes=self.claim.changes)
        # a tag, not a param: a peak measured at start differs a little on every resume
        self.tracker.set_tags({Tag.PEAK_FLOPS: f"{self.peak:.4g}",
                               Tag.PEAK_FLOPS_SOURCE: self.peak_source,
                               Tag.HOST_ALLOCATOR: self.engine.host_allocator,
                               Tag.DEVICE: self.engine.device_name(),
                               Tag.PRECISION: self.engine.precision,
                               Tag.MATMUL_PRECISION: self.engine.matmul_precision,
                               Tag.CHECKPOINT_DIR: str(self.folder.path.resolve())})
        self.log_dataset()
        self.tracker.log_text(json.dumps(self.engine.ds_config, indent=2), "ds_config.json")
        self.tracker.log_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False),
                              "run_config.yaml")

    def log_dataset(self) -> None:
        """The shards as the run's MLflow input: the manifest's digest, the tokenizer's hash,
        the tokens and documents per split, what a step reads."""

        manifest = self.shards.manifest
        splits = {name: {"tokens": info["tokens"], "documents": info["documents"]}
                  for name, info in manifest["splits"].items()}
        profile = {"splits": splits, "tokenizer_sha256": manifest["tokenizer"]["sha256"],
                   "vocab_size": manifest["tokenizer"]["vocab_size"],
                   "packing": manifest.get("packing", {}).get("mode", "stream"),
                   "corpus": manifest.get("corpus", {}).get("spec"),
                   "tokens_per_step": self.geometry.tokens_per_step}
        digest = file_digest(self.shards.folder / "manifest.json")["sha256"]
        self.tracker.log_dataset(self.shards.folder.name, digest,
                                 str(self.shards.folder.resolve()), profile)

    def unfinished_run(self) -> str | None:
        """The MLflow run of an earlier attempt at this config that died before its first
        checkpoint: continued rather than duplicated."""

        runs = find_runs(self.config.track.experiment, status=None,
                         tracking=tracking_uri(self.config.track),
                         filter_tags={Tag.CONFIG_HASH: self.config.hash()})
        unfinished = [run for run in runs if run["status"] not in ("finished", "superseded")]
        return unfinished[-1]["run_id"] if unfinished else None

    def say(self, text: str) -> None:
        if self.rank == 0:
            tqdm.write(f"megaloop: {text}")

    # ---- the loop ---------------------------------------------------------------------------

    def train_step(self) -> StepResult:
        """One optimizer step over grad_accum micro-batches; nothing is read back."""
        lr = lr_at(self.step, self.total_steps, self.config.train)
        r = self.model.recurrences_for_step(self.step, self.config.train.seed)
        loss = None
        for _ in range(self.geometry.grad_accum):
            tokens, targets = self.train_data.next_batch()
            micro_loss = self.engine.forward_backward(tokens, targets, r)
            loss = micro_loss if loss is None else loss + micro_loss
        norm = self.engine.optimizer_step(lr)
        return StepResult(self.step + 1, loss / self.geometry.grad_accum, norm, r, lr)

    def flops_per_token(self, recurrences: int) -> tuple[float, float]:
        """Training FLOPs per token of a step that ran `recurrences` (sampled r differs from
        the configured mean): as the papers count them, and with attention counted causally."""
        if recurrences not in self.flops_by_r:
            model = dataclasses.replace(self.config.model, recurrences=recurrences)
            self.flops_by_r[recurrences] = (account(model)["flops_per_token"],
                                            causal_flops_per_token(model))
        return self.flops_by_r[recurrences]

    def sync(self) -> SyncedStep:
        """The host sync: every pending step's loss (averaged over ranks) and gradient norm,
        and whether any rank was sent SIGTERM, in one reduction and one transfer. Raises
        TrainingError at the first step whose loss or norm is not finite."""
        steps, self.pending = self.pending, []
        norms = [s.grad_norm for s in steps if s.grad_norm is not None]
        summed, read = self.engine.sum_over_ranks(
            [s.loss for s in steps] + [non_finite_count(norms), float(self.stop_signalled)],
            norms)
        *loss_sums, non_finite_norms, stop = summed
        losses = [loss / self.world_size for loss in loss_sums]
        norm_of = iter(read)
        synced = [SyncedStep(s.step, loss, None if s.grad_norm is None else next(norm_of),
                             s.recurrences, s.lr) for s, loss in zip(steps, losses, strict=True)]
        for step in synced:
            self.check_finite(step)
        if non_finite_norms > 0:  # every rank stops in the same sync, whichever saw it
            self.check_finite(dataclasses.replace(synced[-1], grad_norm=math.nan))
        self.stopping = self.stopping or stop > 0
        return synced[-1]

    def evaluate(self) -> dict[str, float]:
        """Validation loss per predicted token over every rank's batches. A batch that is all
        padding (train.eval_tokens) still runs, since ZeRO-3's forward is collective."""
        total, predicted = None, 0
        with self.engine.evaluating():
            for tokens, targets in self.val_data:
                loss = self.engine.loss(tokens, targets)
                count = predicted_tokens(targets)  # a CPU tensor: no device sync
                if count:
                    weighted = loss.double() * count
                    total = weighted if total is None else total + weighted
                    predicted += count
        (loss_sum, count), _ = self.engine.sum_over_ranks([0.0 if total is None else total,
                                                           predicted])
        loss = loss_sum / count if count else math.nan
        bpb = loss / math.log(2) / self.val_data.bytes_per_token
        return {Metric.VAL_LOSS: loss, Metric.VAL_BPB: bpb}

    def save(self) -> Path:
        self.tracker.flush()  # metrics up to a checkpoint survive a kill that follows it
        state = {"step": self.step, "loader": self.train_data.state_dict(),
                 "mlflow_run_id": self.tracker.run_id, "config": self.config.to_dict(),
                 "flops_seen": self.flops_seen,
                 "config_hash": self.config.hash()}
        return self.checkpoints.save(self.step, state)

    def check_finite(self, step: SyncedStep) -> None:
        norm = step.grad_norm
        if math.isfinite(step.loss) and (norm is None or math.isfinite(norm)):
            return
        latest = self.checkpoints.complete()
        advice = ("Lower train.lr, lengthen train.warmup_steps or set train.grad_clip (e.g. "
                  "1.0), then")
        if latest:
            then = (f"the last good checkpoint is {latest[0]}. {advice} resume from it "
                    "(--resume auto --accept-changes)")
        else:
            then = f"no checkpoint was saved before it. {advice} train the run again"
        raise TrainingError(f"Training diverged at step {step.step}: loss {step.loss}, "
                            f"gradient norm {norm}; {then}.")

    def run(self) -> dict[str, Any]:
        train = self.config.train
        meter = ThroughputMeter()
        bar = tqdm(total=self.total_steps, initial=self.step,
                   disable=not self.progress or self.plain_lines, unit="step",
                   dynamic_ncols=True)
        last_eval: dict[str, float] = {}
        while self.step < self.total_steps and not self.stopping:
            result = self.train_step()
            self.pending.append(result)
            self.step += 1
            tokens = self.geometry.tokens_per_step
            full, causal = self.flops_per_token(result.recurrences)
            flops = tokens * full
            meter.add(tokens, flops, tokens * causal)
            self.flops_seen += flops
            bar.update()
            log_due = self.step % train.log_interval == 0 or self.step == self.total_steps
            eval_due = self.step % train.eval_interval == 0 and self.step < self.total_steps
            save_due = self.step % train.checkpoint_interval == 0
            if not (log_due or eval_due or save_due):
                continue
            synced = self.sync()
            meter.pause()
            if log_due:
                self.log_train(synced, meter)
                bar.set_postfix(loss=f"{synced.loss:.4f}", refresh=False)
            if eval_due and not self.stopping:  # a stop saves at once: its time is short
                last_eval = self.evaluate()
                self.tracker.log_metrics(last_eval, self.step)
            if save_due or self.stopping:
                self.save()
            meter.resume()
        bar.close()
        if self.stopping:
            self.say(f"stopped by SIGTERM at step {self.step}; checkpoint saved, resume with "
                     "--resume auto")
            self.tracker.finish("KILLED")
            return {"step": self.step, "stopped": True, "run_id": self.tracker.run_id}
        last_eval = self.evaluate()
        self.tracker.log_metrics(last_eval, self.step)
        if self.step % train.checkpoint_interval:
            self.save()
        self.tracker.finish("FINISHED")
        self.say(f"finished {self.step} steps: val/loss {last_eval[Metric.VAL_LOSS]:.4f}, "
                 f"val/bpb {last_eval[Metric.VAL_BPB]:.4f}")
        return {"step": self.step, "stopped": False, "run_id": self.tracker.run_id,
                "checkpoint": str(self.checkpoints.folder), **last_eval,
                "intervals": self.intervals}

    def log_train(self, synced: SyncedStep, meter: ThroughputMeter) -> None:
        tokens_per_s, flops_per_s, causal_flops_per_s = meter.report()
        mfu = flops_per_s / (self.peak * self.world_size)
        mfu_causal = causal_flops_per_s / (self.peak * self.world_size)
        memory = self.engine.peak_memory()
        metrics = {Metric.TRAIN_LOSS: synced.loss, Metric.LR: synced.lr,
                   Metric.TOKENS_PER_S: tokens_per_s, Metric.MFU: mfu,
                   Metric.MFU_CAUSAL: mfu_causal,
                   Metric.PEAK_MEM_GIB: memory.allocated_gib,
                   Metric.RECURRENCES: synced.recurrences}
        if memory.reserved_gib is not None:
            metrics[Metric.PEAK_MEM_RESERVED_GIB] = memory.reserved_gib
        self.intervals.append({"step": self.step, "loss": synced.loss,
                               "recurrences": synced.recurrences,
                               "tokens_per_s": tokens_per_s, "mfu": mfu,
                               "mfu_causal": mfu_causal, "peak_mem_gib": memory.allocated_gib,
                               "peak_mem_reserved_gib": memory.reserved_gib})
        if synced.grad_norm is not None:
            metrics[Metric.GRAD_NORM] = synced.grad_norm
        metrics[Metric.TOKENS_SEEN] = self.step * self.geometry.tokens_per_step
        metrics[Metric.FLOPS_SEEN] = self.flops_seen
        self.tracker.log_metrics(metrics, self.step)
        if self.plain_lines:
            self.say(progress_line(self.step, self.total_steps, synced, tokens_per_s, mfu,
                                   self.geometry.tokens_per_step))


def progress_line(step: int, total: int, synced: SyncedStep, tokens_per_s: float, mfu: float,
                  tokens_per_step: int) -> str:
    """One log interval in a line, for logs without a progress bar (sweeps, SLURM tasks); the
    ETA is the steps left at this interval's training rate."""
    eta = (total - step) * tokens_per_step / tokens_per_s if tokens_per_s > 0 else math.nan
    return (f"step {step}/{total}  loss {synced.loss:.4f}  lr {synced.lr:.2e}  "
            f"{tokens_per_s:,.0f} tok/s  MFU {100 * mfu:.2f}%  "
            f"ETA {duration(eta) if math.isfinite(eta) else '?'}")


def write_stop_report(rank: int, step: int) -> None:
    """Tell the launcher (launch.py's run_torchrun) that this rank saved and stopped."""
    reports = os.environ.get(STOP_REPORTS)
    if reports:
        atomic_write_json(Path(reports) / f"rank{rank:05d}.json", {"step": step})


def train(config: RunConfig, *, resume: str | None = None, progress: bool = True,
          lines: bool | None = None,
          peak: float | None = None, summary_json: str | Path | None = None,
          accept_changes: bool = False, trust_checkpoint: bool = False) -> dict[str, Any]:
    """Train one run to its budget (or until SIGTERM); returns a summary on every rank (rank 0
    also writes it to `summary_json`). `resume`: "auto" or a checkpoint folder;
    `accept_changes` and `trust_checkpoint`: see train/run_folder.py and checkpoint.py."""
    engine = Engine(config)
    trainer = None
    failed = True
    previous = signal.getsignal(signal.SIGTERM)
    try:
        trainer = Trainer(config, engine, progress=progress, lines=lines, peak=peak,
                          resume=resume,
                          accept_changes=accept_changes, trust_checkpoint=trust_checkpoint)

        def request_stop(signum, frame):
            trainer.stop_signalled = True

        signal.signal(signal.SIGTERM, request_stop)
        trainer.start()
        summary = trainer.run()
        if summary["stopped"]:
            write_stop_report(engine.rank, summary["step"])
        if summary_json is not None and engine.rank == 0:
            atomic_write_json(summary_json, {**summary, "device": engine.device_name(),
                                             "peak_flops": trainer.peak,
                                             "peak_flops_source": trainer.peak_source})
        failed = False
        return summary
    except BaseException:
        if trainer is not None and trainer.tracker is not None:
            trainer.tracker.finish("FAILED")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if trainer is not None:
            trainer.release(failed)
        engine.close()
