"""Typed run configuration: YAML + `--set section.key=value` overrides -> validated dataclasses.

Every problem is refused with a ConfigError naming the key and the fix, before any tensor exists.
`RunConfig` holds four sections (model, data, train, track), each a frozen dataclass that
validates itself. A file may `include` others (a recipe of configs/recipes/) under its own
values; `config_hash` names the resolved config (MLflow, a sweep's finished runs, a resume).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megaloop.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32000
    d_model: int = 512
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: as many as n_heads (no GQA)
    head_dim: int | None = None  # None: d_model // n_heads
    prelude_layers: int = 2
    loop_layers: int = 4
    coda_layers: int = 2
    recurrences: int = 1  # the mean r when recurrence_sampling is poisson_lognormal
    mlp: Literal["swiglu", "relu2"] = "swiglu"
    mlp_ratio: float = 2.75
    qk_norm: bool = False
    qk_norm_mode: Literal["learned_before_rope", "free_after_rope"] = "learned_before_rope"
    tie_embeddings: bool = False
    logit_softcap: float = 0.0  # 0: no soft-cap
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    injection: Literal["linear", "additive", "passthrough"] = "linear"
    hyper: Literal["none", "hyperloop", "lanes", "mhc"] = "none"
    hyper_streams: int = 4
    hyper_write: Literal["output", "update"] = "output"  # what Hyperloop's connection writes to
    #   the streams: the middle block's output F (the paper's) or its update F - input (the
    #   residual increment, megaloop's form before; configs saved without the key meant it)
    bptt_k: int | None = None  # None: every recurrence gets gradients
    recurrence_sampling: Literal["fixed", "poisson_lognormal"] = "fixed"
    attention: Literal["auto", "flash", "sdpa"] = "auto"
    activation_checkpointing: Literal["none", "per_recurrence", "per_layer"] = "none"
    init: Literal["gpt2", "isodepth"] = "gpt2"  # isodepth: the iso-depth paper's (model/looped.py)
    embedding_norm: bool = False  # an RMSNorm after the embedding (the iso-depth paper's)
    recurrence_norm: Literal["linear", "every", "always"] = "linear"  # after each recurrence:
    #   for linear injection only; in every injection mode of a looped model (lanes then take
    #   norm(block(u)), the paper's lanes, instead of block(u) - u); or always, also after the
    #   single pass of an r = 1 model (the iso-depth paper's norm_recur, at every r)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.mlp_ratio * self.d_model))

    @property
    def grad_recurrences(self) -> int:
        """How many of the (mean) recurrences receive gradients."""
        return self.recurrences if self.bptt_k is None else min(self.bptt_k, self.recurrences)

    @property
    def effective_depth(self) -> int:
        return self.prelude_layers + self.recurrences * self.loop_layers + self.coda_layers

    @property
    def is_looped(self) -> bool:
        return self.loop_layers > 0 and (
            self.recurrences > 1 or self.recurrence_sampling != "fixed"
        )

    @property
    def has_loop_norm(self) -> bool:
        """Whether an RMSNorm ends each pass of the loop block (`recurrence_norm`; linear
        injection always has one)."""
        if self.recurrence_norm == "always":
            return self.loop_layers > 0
        return self.is_looped and (self.recurrence_norm == "every" or self.injection == "linear")

    def validate(self) -> None:
        positive = ["vocab_size", "d_model", "n_heads", "max_seq_len", "hyper_streams",
                    "rope_theta"]
        for key in positive + ["n_kv_heads", "head_dim"]:
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"model.{key} = {value} must be positive; set it to a value > 0.")
        if self.hyper_write != "output" and self.hyper != "hyperloop":
            raise ConfigError(f"model.hyper_write = {self.hyper_write} is Hyperloop's choice "
                              f"(model.hyper = hyperloop), not {self.hyper}'s: lanes write "
                              "norm(block(u)) or block(u) - u by model.recurrence_norm. Remove "
                              "model.hyper_write.")
        if self.recurrence_norm != "linear" and self.hyper in ("hyperloop", "mhc"):
            raise ConfigError(f"model.recurrence_norm = {self.recurrence_norm} with model.hyper "
                              f"= {self.hyper}: "
                              "its streams carry the loop's state and add the block's update; "
                              "only lanes take a normalised block output (the iso-depth "
                              "paper's). Set model.recurrence_norm: linear.")
        if self.init == "isodepth" and self.tie_embeddings:
            raise ConfigError("model.init = isodepth draws the embedding from N(0, 1) and the LM "
                              "head from N(0, 0.001): a tied pair cannot be both. Set "
                              "model.tie_embeddings: false, or model.init: gpt2.")
        for key in ["prelude_layers", "loop_layers", "coda_layers"]:
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key} = {getattr(self, key)} must be >= 0.")
        if self.prelude_layers + self.loop_layers + self.coda_layers == 0:
            raise ConfigError("The model has no layers: set model.prelude_layers, "
                              "model.loop_layers or model.coda_layers to at least 1.")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model = {self.d_model} is not divisible by model.n_heads = "
                              f"{self.n_heads}; choose n_heads that divides d_model.")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"model.n_heads = {self.n_heads} is not divisible by model.n_kv_heads"
                              f" = {self.kv_heads}; grouped-query attention needs whole groups.")
        if self.dim_per_head % 2:
            raise ConfigError(f"The head dimension {self.dim_per_head} is odd; RoPE needs an even "
                              "head dimension: set model.head_dim or model.n_heads.")
        if not math.isfinite(self.mlp_ratio) or self.mlp_ratio <= 0:
            raise ConfigError(f"model.mlp_ratio = {self.mlp_ratio} must be > 0 (4.0 for relu2, "
                              "2.75 for swiglu are usual).")
        if not math.isfinite(self.logit_softcap) or self.logit_softcap < 0:
            raise ConfigError(f"model.logit_softcap = {self.logit_softcap} must be >= 0 (0 turns "
                              "the soft-cap off).")
        if self.recurrences < 1:
            raise ConfigError(f"model.recurrences = {self.recurrences} must be >= 1 "
                              "(1 is a plain transformer).")
        if self.loop_layers == 0 and self.recurrences > 1:
            raise ConfigError(f"model.recurrences = {self.recurrences} with model.loop_layers = 0:"
                              " there is no block to loop; set loop_layers >= 1 or recurrences=1.")
        if self.bptt_k is not None and not 1 <= self.bptt_k <= self.recurrences:
            raise ConfigError(f"model.bptt_k = {self.bptt_k} is outside 1..recurrences "
                              f"(1..{self.recurrences}); use null for full backpropagation.")
        self._validate_hyper()
        self._validate_sampling()
        truncated = self.bptt_k is not None and (
            self.bptt_k < self.recurrences or self.recurrence_sampling != "fixed")
        if truncated and self.injection == "passthrough":
            raise ConfigError(f"model.bptt_k = {self.bptt_k} with model.injection = passthrough: "
                              "the detached recurrences would cut every gradient path to the "
                              "prelude and embedding; use injection linear or additive, or "
                              "bptt_k: null.")

    def _validate_hyper(self) -> None:
        if self.hyper == "none":
            return
        if self.hyper_streams < 2:
            raise ConfigError(f"model.hyper_streams = {self.hyper_streams} with model.hyper = "
                              f"{self.hyper}: hyper-connections need at least 2 streams.")
        if self.hyper in ("hyperloop", "lanes") and self.loop_layers == 0:
            raise ConfigError(f"model.hyper = {self.hyper} connects recurrences of the loop, but "
                              "model.loop_layers = 0; set loop_layers >= 1.")
        if self.hyper == "lanes" and self.bptt_k is not None and self.bptt_k < self.recurrences:
            raise ConfigError("model.hyper = lanes cannot be combined with truncated BPTT "
                              f"(model.bptt_k = {self.bptt_k}); set bptt_k to null.")
        if self.is_looped and self.injection != "passthrough":
            raise ConfigError(f"model.hyper = {self.hyper} replaces input injection, but "
                              f"model.injection = {self.injection}; set model.injection="
                              "passthrough.")

    def _validate_sampling(self) -> None:
        if self.recurrence_sampling == "fixed":
            return
        if self.loop_layers == 0:
            raise ConfigError("model.recurrence_sampling = poisson_lognormal needs a loop; "
                              "set model.loop_layers >= 1.")
        if self.hyper in ("hyperloop", "lanes"):
            raise ConfigError(f"model.hyper = {self.hyper} has parameters per recurrence and "
                              "cannot sample r; set model.recurrence_sampling=fixed.")


@dataclass(frozen=True)
class DataConfig:
    shards: str | None = None  # a folder made by `megaloop data prepare`; else corpus below
    corpus: str = "stdlib"  # prepared into cache_dir on first use when shards is null
    tokenizer: str | None = None  # a .model path or a shipped model's name; None: stdlib-4k
    text_field: str = "text"
    val_fraction: float = 0.01
    val_files: str = ""  # comma-separated files of a folder corpus that are the validation split
    #   (their every document; val_fraction is then not used): the iso-depth paper's last two
    cache_dir: str = "runs/data"
    workers: int = 2
    verify: bool = True  # check every shard's sha256 when a run starts
    packing: Literal["stream", "bos_best_fit"] = "stream"  # bos_best_fit: BOS-aligned rows of
    #   model.max_seq_len + 1 tokens packed best-fit (the iso-depth paper's; megaloop.data.packing)
    pack_buffer: int = 1000  # bos_best_fit: documents the packer chooses from

    def validate(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction = {self.val_fraction} must be in [0, 1).")
        if self.shards is None and self.val_fraction == 0 and not self.val_files.strip():
            raise ConfigError(f"data.val_fraction = 0 holds out no document of {self.corpus} "
                              "for validation, and a run needs a validation split: set "
                              "data.val_fraction (e.g. 0.01), or data.val_files, or point "
                              "data.shards at prepared shards.")
        if self.workers < 1:
            raise ConfigError(f"data.workers = {self.workers} must be >= 1.")
        if self.pack_buffer < 1:
            raise ConfigError(f"data.pack_buffer = {self.pack_buffer} must be >= 1 (the paper's "
                              "is 1000).")


LR_ROLES = ("embedding", "unembedding", "norm", "hyper", "injection")  # each has train.<role>_lr
GROUP_ROLES = ("matrix", *LR_ROLES)  # each has train.<role>_beta1, _beta2 and _weight_decay


@dataclass(frozen=True)
class TrainConfig:
    micro_batch: int = 8  # sequences per rank per forward/backward
    global_batch: int | None = 32  # sequences per optimizer step over all ranks
    global_batch_tokens: int | None = None  # alternative to global_batch, in tokens
    tokens: int | None = None  # budget in tokens ...
    steps: int | None = None  # ... or in optimizer steps
    budget_flops: float | None = None  # nominal compute of a sweep cell (recorded, not enforced)
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    wsd_decay_fraction: float = 0.2  # WSD: the last fraction of steps decays to min_lr
    weight_decay: float = 0.1
    optimizer: Literal["adamw", "muon", "muonh"] = "adamw"  # muon(h): on block matrices + AdamW
    matrix_lr: float = 0.014  # Muon(H)'s lr at the schedule's peak (train.lr is AdamW's)
    muon_momentum: float = 0.95
    polar_precision: Literal["bf16", "fp32"] = "bf16"  # Muon(H)'s orthogonalisation; fp32: exact
    #   to float rounding (bf16, the paper's, amplifies a gradient's last-bit differences)
    embedding_lr: float | None = None  # AdamW's peak lr per role of parameter; None: train.lr
    unembedding_lr: float | None = None
    norm_lr: float | None = None  # RMSNorm gains
    hyper_lr: float | None = None  # hyper-connections (Hyperloop, lanes, mHC)
    injection_lr: float | None = None
    # AdamW's betas and the weight decay per role (matrix: the blocks' projections); None:
    # train.beta1 / beta2, and train.weight_decay on linear layers' weights only
    matrix_beta1: float | None = None  # AdamW only: Muon(H) has train.muon_momentum
    matrix_beta2: float | None = None
    matrix_weight_decay: float | None = None  # None: train.weight_decay (MuonH: 0)
    embedding_beta1: float | None = None
    embedding_beta2: float | None = None
    embedding_weight_decay: float | None = None
    unembedding_beta1: float | None = None
    unembedding_beta2: float | None = None
    unembedding_weight_decay: float | None = None
    norm_beta1: float | None = None
    norm_beta2: float | None = None
    norm_weight_decay: float | None = None
    hyper_beta1: float | None = None
    hyper_beta2: float | None = None
    hyper_weight_decay: float | None = None
    injection_beta1: float | None = None
    injection_beta2: float | None = None
    injection_weight_decay: float | None = None
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 0.0  # 0: no clipping (DeepSpeed's default of 1.0 never applies silently)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where the training device
    #   computes it natively (CUDA with bf16, a CPU with AVX512-BF16 or AMX), else fp32
    zero_stage: int = 0
    offload: bool = False  # ZeRO CPU offload of optimizer state (and parameters at stage 3)
    ds_config: str | None = None  # a Jinja2 template of your own instead of resources/ds_configs/
    compile: bool = False  # torch.compile the blocks (for GPUs)
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 20  # validation batches per rank (the set grows with the ranks) ...
    eval_tokens: int | None = None  # ... or the first this many val tokens on any rank count
    checkpoint_interval: int = 500
    keep_checkpoints: int = 3
    checkpoint_dir: str = "runs/checkpoints"
    seed: int = 0
    peak_flops: float | None = None  # per device, for MFU; None: known GPU table or measured

    def validate(self) -> None:
        positive = ["micro_batch", "global_batch", "global_batch_tokens", "tokens", "steps",
                    "log_interval", "eval_interval", "eval_batches", "eval_tokens",
                    "checkpoint_interval", "keep_checkpoints", "peak_flops", "budget_flops"]
        for key in positive:
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"train.{key} = {value} must be positive.")
        for key in ["lr", "min_lr", "weight_decay", "eps", "grad_clip", "warmup_steps"]:
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"train.{key} = {value} must be a finite number >= 0.")
        if self.global_batch is not None and self.global_batch_tokens is not None:
            raise ConfigError("train.global_batch and train.global_batch_tokens are both set; "
                              "set one of them (the other to null).")
        if self.global_batch is None and self.global_batch_tokens is None:
            raise ConfigError("Set train.global_batch (sequences) or train.global_batch_tokens.")
        if self.tokens is not None and self.steps is not None:
            raise ConfigError("train.tokens and train.steps are both set; the budget is one of "
                              "them: set the other to null.")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr = {self.min_lr} exceeds train.lr = {self.lr}.")
        betas = ["beta1", "beta2", *(f"{role}_beta{i}" for role in GROUP_ROLES for i in (1, 2))]
        for key in betas:
            value = getattr(self, key)
            if value is not None and not 0 <= value < 1:
                raise ConfigError(f"train.{key} = {value} must be in [0, 1).")
        if self.optimizer != "adamw" and (self.matrix_beta1, self.matrix_beta2) != (None, None):
            raise ConfigError(f"train.matrix_beta1 / matrix_beta2 are AdamW's, but "
                              f"train.optimizer = {self.optimizer} steps the matrices with "
                              "momentum: set train.muon_momentum instead (or null them).")
        if not 0 < self.wsd_decay_fraction <= 1:
            raise ConfigError(f"train.wsd_decay_fraction = {self.wsd_decay_fraction} must be in "
                              "(0, 1].")
        role_lrs = [f"{role}_lr" for role in LR_ROLES]
        for key in [*role_lrs, *(f"{role}_weight_decay" for role in GROUP_ROLES)]:
            value = getattr(self, key)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ConfigError(f"train.{key} = {value} must be a finite number >= 0.")
        if self.lr <= 0 and any(getattr(self, key) is not None for key in role_lrs):
            raise ConfigError("train.<role>_lr needs train.lr > 0: each role's lr follows "
                              "train.lr's schedule in proportion.")
        if not math.isfinite(self.matrix_lr) or self.matrix_lr <= 0:
            raise ConfigError(f"train.matrix_lr = {self.matrix_lr} must be a finite number > 0.")
        if not 0 <= self.muon_momentum < 1:
            raise ConfigError(f"train.muon_momentum = {self.muon_momentum} must be in [0, 1).")
        if self.optimizer != "adamw" and self.lr <= 0:
            raise ConfigError(f"train.optimizer = {self.optimizer} needs train.lr > 0: the "
                              "schedule scales train.matrix_lr by train.lr's curve.")
        if self.optimizer != "adamw" and self.zero_stage > 0 and self.grad_clip > 0:
            raise ConfigError(f"train.optimizer = {self.optimizer} at train.zero_stage = "
                              f"{self.zero_stage} with train.grad_clip = {self.grad_clip} is "
                              "refused: under ZeRO the matrices take their step whole, before "
                              "DeepSpeed's step, where it clips. Set train.grad_clip: 0 (the "
                              "iso-depth recipe has none) or train.zero_stage: 0.")
        if self.optimizer != "adamw" and self.offload:
            raise ConfigError(f"train.optimizer = {self.optimizer} with train.offload is refused:"
                              " the offloaded optimizer is DeepSpeed's CPU Adam. Set "
                              "train.offload: false, or train.optimizer: adamw.")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage = {self.zero_stage} must be 0, 1, 2 or 3.")
        if self.offload and self.zero_stage == 0:
            raise ConfigError("train.offload needs ZeRO: set train.zero_stage to 1, 2 or 3.")


RUN_NAME = re.compile(r"^[^./\\\x00-\x1f-][^/\\\x00-\x1f]{0,199}$")


@dataclass(frozen=True)
class TrackConfig:
    experiment: str = "default"
    run_name: str | None = None  # None: derived from the config
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db
    enabled: bool = True
    system_metrics_interval: float = 10.0  # seconds between system/* samples (rank 0); 0: off

    def validate(self) -> None:
        if not self.experiment.strip():
            raise ConfigError("track.experiment must not be empty.")
        if not (math.isfinite(self.system_metrics_interval)
                and self.system_metrics_interval >= 0):
            raise ConfigError(f"track.system_metrics_interval = {self.system_metrics_interval} "
                              "must be a number of seconds >= 0 (0: no system metrics).")
        name = self.run_name
        if name is not None and (not RUN_NAME.match(name) or name in (".", "..")):
            raise ConfigError(f"track.run_name = {name!r} is not a name: it names the run's "
                              "folder in train.checkpoint_dir, so it may not hold '/', '\\', "
                              "control characters or start with '.' or '-' (at most 200 "
                              "characters). Choose a plain name such as 'r4-d512'.")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def validate(self) -> None:
        for section in (self.model, self.data, self.train, self.track):
            section.validate()
        if self.model.attention == "flash" and self.train.precision == "fp32":
            raise ConfigError("model.attention = flash needs train.precision = bf16: flash-attn "
                              "has no fp32 kernels, and an fp32 run would silently use SDPA; set "
                              "train.precision=bf16 or model.attention=auto.")

    def with_precision(self, precision: str) -> RunConfig:
        """This config with `train.precision` resolved (device.resolve_precision), as the
        Engine trains it; the run's own config, and its hash, keep what was asked."""
        config = dataclasses.replace(
            self, train=dataclasses.replace(self.train, precision=precision))
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`{"model.d_model": 512, ...}`: the names MLflow params and `--set` use."""
        return {f"{section}.{key}": value
                for section, values in self.to_dict().items() for key, value in values.items()}

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step reads over all ranks: train.global_batch_tokens, else
        train.global_batch sequences of model.max_seq_len."""
        return self.train.global_batch_tokens or self.train.global_batch * self.model.max_seq_len

    def hash(self) -> str:
        return config_hash(self)


SECTIONS: dict[str, type] = typing.get_type_hints(RunConfig)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e18`, `5e-1` and `1.5e3` as floats, as YAML 1.2 does
    (PyYAML's YAML 1.1 rules read them as strings, so `rope_theta: 5e5` would be refused)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # safe: _Loader is a SafeLoader


def config_hash(config: RunConfig) -> str:
    """A stable 12-hex-digit hash of the resolved configuration (key order does not matter)."""
    canonical = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " | ".join(str(a) for a in typing.get_args(annotation))
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args:
        return f"{args[0].__name__} or null"
    return annotation.__name__


def _coerce(section: str, key: str, value: Any, annotation: Any) -> Any:
    """Check one value against its annotation; ints are accepted where floats are expected."""
    name = f"{section}.{key}"
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{name} = {value!r} is not one of: {', '.join(choices)}.")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(section, key, value, args[0])
    wrong = ConfigError(f"{name} = {value!r} has the wrong type: expected {_describe(annotation)},"
                        f" got {type(value).__name__}.")
    if annotation is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise wrong
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {name}")  # a bug, not user input


def _build_section(section: str, cls: type, values: Any) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"Section '{section}' must be a mapping of keys to values, "
                          f"got {type(values).__name__}.")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"Unknown key {section}.{unknown[0]}; the keys of '{section}' are: "
                          f"{', '.join(hints)}.")
    kwargs = {key: _coerce(section, key, value, hints[key]) for key, value in values.items()}
    return cls(**kwargs)


def upgrade_saved(raw: Any) -> Any:
    """A config saved by an earlier megaloop (a checkpoint, an export, a run folder's record)
    with the keys added since filled in as that version trained: a Hyperloop model saved
    without `model.hyper_write` wrote the block's update."""
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        return raw
    model = raw["model"]
    if model.get("hyper") == "hyperloop" and "hyper_write" not in model:
        return {**raw, "model": {**model, "hyper_write": "update"}}
    return raw


def from_dict(raw: Any) -> RunConfig:
    """Build and validate a RunConfig from plain data (as read from YAML)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("A run config must be a mapping of sections (model: ...), "
                          f"got {type(raw).__name__}.")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"Unknown section '{unknown[0]}'; the sections are: "
                          f"{', '.join(SECTIONS)}.")
    config = RunConfig(**{name: _build_section(name, cls, raw.get(name))
                          for name, cls in SECTIONS.items()})
    config.validate()
    return config


def parse_override(text: str) -> tuple[str, str, Any]:
    """`"model.recurrences=4"` -> ("model", "recurrences", 4); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"Override '{text}' has no '='; write --set section.key=value.")
    path, _, raw_value = text.partition("=")
    section, dot, key = path.strip().partition(".")
    if not dot or not section or not key or "." in key:
        raise ConfigError(f"Override '{text}' must name section.key, e.g. model.recurrences=4.")
    try:
        value = _yaml(raw_value) if raw_value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Override '{text}': the value is not valid YAML ({exc}).") from None
    return section, key, value


def read_yaml(path: str | Path, what: str = "run config", examples: str = "configs/runs/") -> Any:
    """A YAML file's contents; a ConfigError naming the file, what it should be (`what`, with
    `examples` to copy) and the fix when it is missing, a folder or not YAML."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a {what} file; pass the path of a YAML "
                          f"{what} (see {examples}).")
    if not path.is_file():
        raise ConfigError(f"{what.capitalize()} {path} does not exist; pass the path of a YAML "
                          f"{what} (see {examples}).")
    try:
        return _yaml(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{what.capitalize()} {path} is not text; pass a YAML {what} (see "
                          f"{examples}).") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{what.capitalize()} {path} is not valid YAML{where}: {problem}. "
                          "Fix that line (a missing closing bracket or quote, or a tab for "
                          "indentation, are the usual causes).") from None


def read_sections(path: Path, including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A run config file's sections, over those of the files it `include`s (paths relative
    to it, read in order, each over the one before): a recipe such as configs/recipes/
    isodepth.yaml is such a file. The file's own values win."""
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of sections (model: ...).")
    includes = raw.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"Config file {path}: include must be a path or a list of paths of "
                          "config files (relative to it), e.g. include: ../recipes/isodepth.yaml")
    merged: dict[str, Any] = {}
    for name in includes:
        included = (path.parent / name).resolve()
        if included in (*including, path.resolve()):
            raise ConfigError(f"Config file {path} includes {name}, which includes it again; "
                              "remove one of the two includes.")
        for section, values in read_sections(included, (*including, path.resolve())).items():
            merged[section] = {**(merged.get(section) or {}), **(values or {})}
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = dict(values) if isinstance(values, dict) else values
    return merged


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or the defaults) with the files it includes, apply `--set`
    overrides, validate."""
    raw = read_sections(Path(path)) if path is not None else {}
    for text in overrides or []:
        section, key, value = parse_override(text)
        if section not in SECTIONS:
            raise ConfigError(f"Override '{text}' names unknown section '{section}'; the sections"
                              f" are: {', '.join(SECTIONS)}.")
        target = raw.setdefault(section, {})
        if target is None:
            target = raw[section] = {}
        target[key] = value
    return from_dict(raw)
