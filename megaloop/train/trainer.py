"""The training loop: batch -> loss -> backward -> step, with the schedule, evaluation, metrics,
checkpoints, the non-finite guard and SIGTERM handling. Rank 0 prints and tracks."""

from __future__ import annotations

import json
import math
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from megaloop.config import RunConfig
from megaloop.data.dataset import open_run_data
from megaloop.data.loader import TrainLoader, ValLoader
from megaloop.errors import TrainingError
from megaloop.model.accounting import account
from megaloop.track import open_tracker
from megaloop.train import engine as ds
from megaloop.train.checkpoint import Checkpoints
from megaloop.train.host_memory import tune_for_cpu_training
from megaloop.train.mfu import peak_flops
from megaloop.train.schedule import lr_at


def run_name(config: RunConfig) -> str:
    m = config.model
    return config.track.run_name or f"r{m.recurrences}-d{m.d_model}-{config.hash()}"


def run_folder(config: RunConfig) -> Path:
    return Path(config.train.checkpoint_dir) / run_name(config)


@dataclass
class StepMeter:
    """Tokens and time since the last report, for tokens/s and MFU."""

    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        self.tokens, self.start = 0, time.perf_counter()
        return rate


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    factor = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * factor / 2**30


class Trainer:
    def __init__(self, config: RunConfig, rank: int, world_size: int, *, progress: bool = True,
                 peak: float | None = None):
        self.config, self.rank, self.world_size = config, rank, world_size
        self.progress = progress and rank == 0
        self.host_allocator = "CUDA" if torch.cuda.is_available() else tune_for_cpu_training()
        self.geometry = ds.batch_geometry(config, world_size)
        self.total_steps = ds.total_steps(config, self.geometry)
        self.accounting = account(config.model)
        shards = open_run_data(config, rank, barrier=dist.barrier, progress=self.progress)
        seq, micro = config.model.max_seq_len, self.geometry.micro_batch
        self.train_data = TrainLoader(shards, seq, micro, rank=rank, world_size=world_size,
                                      seed=config.train.seed)
        self.val_data = ValLoader(shards, seq, micro, rank=rank, world_size=world_size,
                                  max_batches=config.train.eval_batches)
        self.engine, self.model, self.ds_config = ds.build_engine(config, world_size)
        self.checkpoints = Checkpoints(run_folder(config), config.train.keep_checkpoints, rank,
                                       world_size, dist.barrier)
        self.peak, self.peak_source = peak_flops(peak or config.train.peak_flops,
                                                 config.train.precision)
        self.step = 0
        self.tracker = None
        self.stop_requested = False

    # ---- set-up ---------------------------------------------------------------------------

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

    def resume(self, which: str | None) -> None:
        state = self.checkpoints.load(self.engine, which) if which else None
        run_id = None
        if state is not None:
            self.step = state["step"]
            self.train_data.load_state_dict(state["loader"])
            run_id = state.get("mlflow_run_id")
            self.say(f"resumed from step {self.step} ({self.checkpoints.folder})")
        elif which and self.rank == 0 and self.config.track.enabled:
            run_id = self.unfinished_run()
        self.tracker = open_tracker(self.config, rank=self.rank, world_size=self.world_size,
                                    derived=self.derived_params(), resume_run_id=run_id)
        # a tag, not a param: a peak measured at start differs a little on every resume
        self.tracker.set_tags({"megaloop.peak_flops": f"{self.peak:.4g}",
                               "megaloop.peak_flops_source": self.peak_source,
                               "megaloop.host_allocator": self.host_allocator})
        self.tracker.log_text(json.dumps(self.ds_config, indent=2), "ds_config.json")
        self.tracker.log_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False),
                              "run_config.yaml")

    def unfinished_run(self) -> str | None:
        """The MLflow run of an earlier attempt at this config that died before its first
        checkpoint: continued rather than duplicated."""
        from megaloop.track import find_runs, tracking_uri

        runs = find_runs(self.config.track.experiment, status=None,
                         tracking=tracking_uri(self.config.track),
                         filter_tags={"megaloop.config_hash": self.config.hash()})
        unfinished = [run for run in runs if run["status"] != "finished"]
        return unfinished[-1]["run_id"] if unfinished else None

    def say(self, text: str) -> None:
        if self.rank == 0:
            tqdm.write(f"megaloop: {text}")

    # ---- the loop ---------------------------------------------------------------------------

    def train_step(self) -> tuple[float, float | None, int]:
        """One optimizer step over grad_accum micro-batches; returns (loss, grad norm, r)."""
        lr = lr_at(self.step, self.total_steps, self.config.train)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        r = self.model.recurrences_for_step(self.step, self.config.train.seed)
        loss_sum = torch.zeros((), dtype=torch.float64)
        manual_norm = None
        for micro in range(self.geometry.grad_accum):
            tokens, targets = self.train_data.next_batch()
            device = self.engine.device
            loss = self.engine(tokens.to(device), targets.to(device), recurrences=r)
            self.engine.backward(loss)
            loss_sum += loss.detach().double().cpu()
            if micro == self.geometry.grad_accum - 1 and self.config.train.zero_stage == 0:
                manual_norm = ds.local_grad_norm(self.model)
            self.engine.step()
        flags = torch.tensor([loss_sum.item() / self.geometry.grad_accum,
                              float(self.stop_requested)], dtype=torch.float64)
        dist.all_reduce(flags)
        self.stop_requested = flags[1].item() > 0
        norm = self.engine.get_global_grad_norm() if manual_norm is None else manual_norm
        return flags[0].item() / self.world_size, None if norm is None else float(norm), r

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for tokens, targets in self.val_data:
            device = self.engine.device
            total[0] += self.engine(tokens.to(device), targets.to(device)).double().cpu()
            total[1] += 1
        self.engine.train()
        dist.all_reduce(total)
        loss = (total[0] / total[1]).item()
        return {"val/loss": loss, "val/bpb": loss / math.log(2) / self.val_data.bytes_per_token}

    def save(self) -> Path:
        self.tracker.flush()  # metrics up to a checkpoint survive a kill that follows it
        state = {"step": self.step, "loader": self.train_data.state_dict(),
                 "mlflow_run_id": self.tracker.run_id, "config": self.config.to_dict(),
                 "config_hash": self.config.hash()}
        return self.checkpoints.save(self.engine, self.step, state)

    def check_finite(self, loss: float, norm: float | None) -> None:
        bad = not math.isfinite(loss) or (norm is not None and not math.isfinite(norm))
        if not bad:
            return
        latest = self.checkpoints.complete()
        kept = f"the last good checkpoint is {latest[0]}" if latest else "no checkpoint was saved"
        raise TrainingError(
            f"Training diverged at step {self.step}: loss {loss}, gradient norm {norm}; {kept}. "
            "Lower train.lr, lengthen train.warmup_steps or set train.grad_clip (e.g. 1.0), "
            "then resume from that checkpoint.")

    def run(self) -> dict[str, Any]:
        train = self.config.train
        meter = StepMeter()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress,
                   unit="step", dynamic_ncols=True)
        last_eval: dict[str, float] = {}
        while self.step < self.total_steps and not self.stop_requested:
            loss, norm, r = self.train_step()
            self.check_finite(loss, norm)
            self.step += 1
            meter.tokens += self.geometry.tokens_per_step
            bar.update()
            if self.step % train.log_interval == 0 or self.step == self.total_steps:
                self.log_train(loss, norm, r, meter)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if self.step % train.eval_interval == 0 and self.step < self.total_steps:
                last_eval = self.evaluate()
                self.tracker.log_metrics(last_eval, self.step)
            if self.step % train.checkpoint_interval == 0 or self.stop_requested:
                self.save()
        bar.close()
        if self.stop_requested:
            self.say(f"stopped by SIGTERM at step {self.step}; checkpoint saved, resume with "
                     "--resume auto")
            self.tracker.finish("KILLED")
            return {"step": self.step, "stopped": True, "run_id": self.tracker.run_id}
        last_eval = self.evaluate()
        self.tracker.log_metrics(last_eval, self.step)
        if self.step % train.checkpoint_interval:
            self.save()
        self.tracker.finish("FINISHED")
        self.say(f"finished {self.step} steps: val/loss {last_eval['val/loss']:.4f}, "
                 f"val/bpb {last_eval['val/bpb']:.4f}")
        return {"step": self.step, "stopped": False, "run_id": self.tracker.run_id,
                "checkpoint": str(self.checkpoints.folder), **last_eval}

    def log_train(self, loss: float, norm: float | None, r: int, meter: StepMeter) -> None:
        tokens_per_s = meter.rate()
        metrics = {"train/loss": loss, "train/lr": lr_at(self.step - 1, self.total_steps,
                                                         self.config.train),
                   "train/tokens_per_s": tokens_per_s,
                   "train/mfu": tokens_per_s * self.accounting["flops_per_token"]
                   / (self.peak * self.world_size),
                   "train/peak_mem_gb": peak_memory_gb(), "train/recurrences": r}
        if norm is not None:
            metrics["train/grad_norm"] = norm
        self.tracker.log_metrics(metrics, self.step)


def train(config: RunConfig, *, resume: str | None = None, progress: bool = True,
          peak: float | None = None) -> dict[str, Any]:
    """Train one run to its budget (or until SIGTERM); returns a summary on every rank."""
    rank, world_size, created_group = ds.init_distributed()
    trainer = None
    previous = signal.getsignal(signal.SIGTERM)
    try:
        trainer = Trainer(config, rank, world_size, progress=progress, peak=peak)

        def request_stop(signum, frame):
            trainer.stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)
        trainer.resume(resume)
        return trainer.run()
    except BaseException:
        if trainer is not None and trainer.tracker is not None:
            trainer.tracker.finish("FAILED")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        ds.shutdown(trainer.engine if trainer is not None else None, destroy_group=created_group)
