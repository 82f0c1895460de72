"""The DeepSpeed config of a run: its batch geometry and the JSON rendered from a Jinja2 template
of the shipped ones (megaloop/resources/ds_configs/) or the user's `train.ds_config`. It reads
the run config only, never DeepSpeed, apart from `render_on_this_machine` (`megaloop ds-config`),
which asks this machine's Device (DeepSpeed's accelerator) what `auto` precision resolves to and
whether offloaded state is pinned, as the Engine does.

Facts that shape the templates (RESEARCH.md section 6):
- ZeRO-3 runs the loop block r times per step; the block must stay gathered across its
  recurrences, so stage3_max_reuse_distance and max_live_parameters stay above its size;
- DeepSpeed clips gradients at 1.0 unless told otherwise: gradient_clipping is always written;
- bf16 is DeepSpeed's `torch_autocast` (fp32 weights, gradients and optimizer state, bf16
  matmuls) with gradients accumulated in fp32 (`data_types.grad_accum_dtype`); see engine.py.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox

from megaloop.config import RunConfig
from megaloop.device import Device, resolve_precision
from megaloop.errors import ConfigError
from megaloop.model.accounting import account
from megaloop.resources import shipped
from megaloop.templating import render_or_refuse

DS_CONFIGS = shipped("ds_configs")  # the templates megaloop ships
MIN_REUSE_DISTANCE = 1_000_000_000  # DeepSpeed's default; raised for larger loop blocks


@dataclass(frozen=True)
class BatchGeometry:
    micro_batch: int  # sequences per rank per forward/backward
    grad_accum: int  # micro-batches per optimizer step on each rank
    global_batch: int  # sequences per optimizer step over all ranks
    seq_len: int

    @property
    def tokens_per_step(self) -> int:
        """RunConfig.tokens_per_step, which batch_geometry splits into whole sequences."""
        return self.global_batch * self.seq_len


def batch_geometry(config: RunConfig, world_size: int) -> BatchGeometry:
    train, seq_len = config.train, config.model.max_seq_len
    if config.tokens_per_step % seq_len:
        raise ConfigError(f"train.global_batch_tokens = {train.global_batch_tokens} is not a "
                          f"multiple of model.max_seq_len = {seq_len}.")
    global_batch = config.tokens_per_step // seq_len
    per_pass = train.micro_batch * world_size
    if global_batch % per_pass:
        raise ConfigError(f"The global batch of {global_batch} sequences is not a multiple of "
                          f"train.micro_batch x ranks = {train.micro_batch} x {world_size}; "
                          "change train.global_batch or train.micro_batch.")
    return BatchGeometry(train.micro_batch, global_batch // per_pass, global_batch, seq_len)


def total_steps(config: RunConfig, geometry: BatchGeometry) -> int:
    """The budget in optimizer steps: train.steps, or train.tokens in whole global batches."""
    train = config.train
    if train.steps is not None:
        return train.steps
    if train.tokens is None:
        raise ConfigError("Set a budget: train.tokens or train.steps.")
    return max(1, round(train.tokens / geometry.tokens_per_step))


def template_path(config: RunConfig) -> Path:
    if config.train.ds_config is not None:
        path = Path(config.train.ds_config)
        if not path.is_file():
            raise ConfigError(f"train.ds_config = {path} does not exist; point it at a Jinja2 "
                              "template of a DeepSpeed config (the shipped ones are in "
                              f"{DS_CONFIGS}).")
        return path
    return DS_CONFIGS / f"zero{config.train.zero_stage}.json.j2"


def template_variables(config: RunConfig, world_size: int,
                       pin_memory: bool = False) -> dict[str, Any]:
    geometry = batch_geometry(config, world_size)
    loop_block = account(config.model)["loop"]
    reuse = max(MIN_REUSE_DISTANCE, 2 * loop_block)
    d = config.model.d_model
    return {
        "stage": config.train.zero_stage, "offload": config.train.offload,
        "micro_batch": geometry.micro_batch, "grad_accum": geometry.grad_accum,
        "global_batch": geometry.global_batch, "grad_clip": config.train.grad_clip,
        "bf16": config.train.precision == "bf16", "seed": config.train.seed,
        "pin_memory": pin_memory,
        "reduce_bucket_size": max(d * d, 5_000_000),
        "prefetch_bucket_size": max(int(0.9 * d * d), 1_000_000),
        "persistence_threshold": 10 * d,
        "max_live_parameters": reuse, "max_reuse_distance": reuse,
        "loop_block_parameters": loop_block, "world_size": world_size,
    }


def render_on_this_machine(config: RunConfig, world_size: int = 1) -> dict[str, Any]:
    """The DeepSpeed config `config` trains with on this machine: its precision resolved on
    this device (auto: bf16 where it is native), offloaded state pinned on a GPU."""
    device = Device.of_this_process()
    config = config.with_precision(resolve_precision(config.train.precision, device))
    return render_ds_config(config, world_size, pin_memory=device.is_cuda)


def render_ds_config(config: RunConfig, world_size: int = 1,
                     pin_memory: bool = False) -> dict[str, Any]:
    """The DeepSpeed config this run uses, rendered from its template (what runs is inspectable).
    `pin_memory`: offloaded state in page-locked host memory (the engine sets it on GPUs)."""
    if config.train.precision == "auto":  # a caller's mistake, not the user's
        raise ValueError("train.precision = auto must be resolved on the training machine "
                         "first: config.with_precision(device.resolve_precision(...))")
    path = template_path(config)
    # the sandbox: a shared template is data, never code (no attribute of Python's internals)
    env = jinja2.sandbox.SandboxedEnvironment(
        loader=jinja2.FileSystemLoader([str(path.parent), str(DS_CONFIGS)]),
        undefined=jinja2.StrictUndefined, autoescape=False)
    text = render_or_refuse(lambda: env.get_template(path.name).render(
        **template_variables(config, world_size, pin_memory)), f"DeepSpeed template {path}")
    try:
        rendered = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed template {path} renders invalid JSON ({exc}).") from None
    rendered.setdefault("gradient_clipping", config.train.grad_clip)
    rendered.setdefault("zero_allow_untested_optimizer", True)
    return rendered


def zero_stage_of(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def autocast_enabled(ds_config: dict[str, Any]) -> bool:
    return bool(ds_config.get("torch_autocast", {}).get("enabled", False))


# ---- what megaloop needs of a rendered config, and what ZeRO-3 costs -------------------------

class ZeroPrefetchWarning(UserWarning):
    """Sampled recurrences under ZeRO-3: the parameter prefetch is lost."""


class ZeroCompileWarning(UserWarning):
    """`train.compile` under ZeRO-3: each block compiles into one graph per layer."""


def check_megaloop_needs(config: RunConfig, ds_config: dict[str, Any]) -> None:
    """What megaloop itself needs of a template (DeepSpeed's own parse is the Engine's)."""
    if ds_config.get("zero_optimization", {}).get("compute_grad_norm") is False:
        raise ConfigError(f"{template_path(config)} sets zero_optimization.compute_grad_norm "
                          "to false: without the gradient norm a non-finite gradient reaches "
                          "the weights unseen, and a checkpoint could save them. Remove the "
                          "key.")


def warn_about_zero3_costs(config: RunConfig, stage: int) -> None:
    """What ZeRO-3 costs two of our features (benchmarks/zero3_costs.py measures both).

    Sampled r: ZeRO-3 records the order in which modules fetch their parameters on the first
    step and prefetches along it afterwards; a step with another r runs another order, which
    discards the trace. Compile: ZeRO-3 gathers each layer's weights in hooks that DeepSpeed
    hides from torch.compile, so a compiled block breaks into one graph per layer, with no
    fusion across layers; it still computes what eager does."""
    if stage != 3:
        return
    if config.model.recurrence_sampling != "fixed":
        warnings.warn("model.recurrence_sampling with train.zero_stage = 3: every step that runs "
                      "another r than the step before discards ZeRO-3's prefetch trace, so "
                      "parameters are fetched on demand (slower steps; see benchmarks/RESULTS.md"
                      "). ZeRO-2 keeps whole parameters on every rank and does not lose it.",
                      ZeroPrefetchWarning, stacklevel=3)
    if config.train.compile:
        warnings.warn("train.compile with train.zero_stage = 3: ZeRO-3's parameter gathers "
                      "break each compiled block into one graph per layer (no fusion across "
                      "layers), and torch.compile gives up on DeepSpeed's hooks after its "
                      "recompile limit (its warnings are expected). Losses equal eager's; the "
                      "speed is measured in benchmarks/RESULTS.md. ZeRO-2 compiles each block "
                      "whole.", ZeroCompileWarning, stacklevel=3)


def refused(config: RunConfig, exc: Exception) -> ConfigError:
    return ConfigError(f"DeepSpeed refused the config rendered from {template_path(config)}: "
                       f"{exc}. `megaloop ds-config CONFIG` prints it; mend the template or the "
                       "train.* keys.")
