"""DeepSpeed: render the config from ds_configs/ templates, start the process group, build the
model (under zero.Init at stage 3), AdamW with parameter groups, deepspeed.initialize.

The only room that talks to DeepSpeed's API. Facts that shape it (RESEARCH.md section 6):
- ZeRO-3 runs the loop block r times per step; the block must stay gathered across its
  recurrences, so stage3_max_reuse_distance and max_live_parameters stay above its size;
- activation checkpointing must be torch's non-reentrant kind (the model's own boundaries);
- DeepSpeed clips gradients at 1.0 unless told otherwise: we always write gradient_clipping.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import torch

from megaloop.config import RunConfig
from megaloop.errors import ConfigError
from megaloop.model.accounting import account
from megaloop.model.looped import LoopedLM

DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"
MIN_REUSE_DISTANCE = 1_000_000_000  # DeepSpeed's default; raised for larger loop blocks


@dataclass(frozen=True)
class BatchGeometry:
    micro_batch: int  # sequences per rank per forward/backward
    grad_accum: int  # micro-batches per optimizer step on each rank
    global_batch: int  # sequences per optimizer step over all ranks
    seq_len: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def batch_geometry(config: RunConfig, world_size: int) -> BatchGeometry:
    train, seq_len = config.train, config.model.max_seq_len
    if train.global_batch_tokens is not None:
        if train.global_batch_tokens % seq_len:
            raise ConfigError(f"train.global_batch_tokens = {train.global_batch_tokens} is not a "
                              f"multiple of model.max_seq_len = {seq_len}.")
        global_batch = train.global_batch_tokens // seq_len
    else:
        global_batch = train.global_batch
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


# ---- DeepSpeed config ------------------------------------------------------------------------

def template_path(config: RunConfig) -> Path:
    if config.train.ds_config is not None:
        path = Path(config.train.ds_config)
        if not path.is_file():
            raise ConfigError(f"train.ds_config = {path} does not exist; point it at a Jinja2 "
                              "template of a DeepSpeed config (see ds_configs/).")
        return path
    return DS_CONFIGS / f"zero{config.train.zero_stage}.json.j2"


def template_variables(config: RunConfig, world_size: int) -> dict[str, Any]:
    geometry = batch_geometry(config, world_size)
    loop_block = account(config.model)["loop"]
    reuse = max(MIN_REUSE_DISTANCE, 2 * loop_block)
    d = config.model.d_model
    return {
        "stage": config.train.zero_stage, "offload": config.train.offload,
        "micro_batch": geometry.micro_batch, "grad_accum": geometry.grad_accum,
        "global_batch": geometry.global_batch, "grad_clip": config.train.grad_clip,
        "bf16": config.train.precision == "bf16", "seed": config.train.seed,
        "pin_memory": torch.cuda.is_available(),
        "reduce_bucket_size": max(d * d, 5_000_000),
        "prefetch_bucket_size": max(int(0.9 * d * d), 1_000_000),
        "persistence_threshold": 10 * d,
        "max_live_parameters": reuse, "max_reuse_distance": reuse,
        "loop_block_parameters": loop_block, "world_size": world_size,
    }


def render_ds_config(config: RunConfig, world_size: int = 1) -> dict[str, Any]:
    """The DeepSpeed config this run uses, rendered from its template (what runs is inspectable)."""
    path = template_path(config)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader([str(path.parent), str(DS_CONFIGS)]),
                             undefined=jinja2.StrictUndefined, autoescape=False)
    try:
        text = env.get_template(path.name).render(**template_variables(config, world_size))
    except jinja2.TemplateError as exc:
        raise ConfigError(f"DeepSpeed template {path} does not render: {exc}") from None
    try:
        rendered = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed template {path} renders invalid JSON ({exc}).") from None
    rendered.setdefault("gradient_clipping", config.train.grad_clip)
    rendered.setdefault("zero_allow_untested_optimizer", True)
    return rendered


# ---- distributed start -----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> tuple[int, int, bool]:
    """Join the process group set up by a launcher (RANK, WORLD_SIZE, ...), or form a group of
    one for a plain process. Returns (rank, world_size, whether this call created the group).

    A group that exists already (several runs in one process) is reused: DeepSpeed keeps
    references to it, so it must outlive the runs."""
    import deepspeed

    created = not torch.distributed.is_initialized()
    if created:
        if "RANK" not in os.environ:
            os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), created


def shutdown(engine: Any | None, destroy_group: bool = True) -> None:
    """Tear down in the order that lets every rank exit cleanly."""
    if engine is not None:
        engine.destroy()
    if destroy_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---- model, optimizer, engine ----------------------------------------------------------------

def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on the matrices of linear layers only: not on norms, biases, embeddings or
    hyper-connection scalars."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    decay, no_decay = [], []
    for param in model.parameters():
        (decay if id(param) in decayed else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_model(config: RunConfig, ds_config: dict[str, Any]) -> LoopedLM:
    """The model, on this rank's device; under ZeRO-3 its weights are sharded as they are made."""
    import deepspeed

    torch.manual_seed(config.train.seed)
    stage3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    if not stage3:
        model = LoopedLM(config.model).to(device)
    else:
        with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=None):
            model = LoopedLM(config.model, init_weights=False)
        model.reset_parameters(
            gather=lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0))
        model.rotary.to(device)
    model.set_activation_checkpointing(config.model.activation_checkpointing)
    if config.train.compile:
        model.compile_blocks()
    return model


def make_optimizer(model: torch.nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    train = config.train
    groups = optimizer_groups(model, train.weight_decay)
    kwargs = {"lr": train.lr, "betas": (train.beta1, train.beta2), "eps": train.eps}
    if train.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=fused_adamw_supported(model), **kwargs)


def fused_adamw_supported(model: torch.nn.Module) -> bool:
    """torch's fused AdamW (one pass over each parameter) where its kernels exist: CUDA and,
    since torch 2.4, the CPU. Without it, on the CPU torch runs AdamW as a Python loop of
    elementwise operations per parameter: three times slower (benchmarks/RESULTS.md)."""
    return all(param.is_floating_point() and param.device.type in ("cpu", "cuda")
               for param in model.parameters())


def build_engine(config: RunConfig, world_size: int) -> tuple[Any, LoopedLM, dict[str, Any]]:
    """deepspeed.initialize over the built model and optimizer; returns (engine, model, config)."""
    import deepspeed

    ds_config = render_ds_config(config, world_size)
    model = build_model(config, ds_config)
    optimizer = make_optimizer(model, config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, model, ds_config


def local_grad_norm(model: torch.nn.Module) -> float:
    """The gradient norm when every rank holds whole gradients (ZeRO stage 0, after the reduce);
    DeepSpeed computes it itself only when it clips."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
