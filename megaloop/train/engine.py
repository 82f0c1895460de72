"""The Engine: the one room that talks to DeepSpeed, the device and the collectives.

The trainer and its checkpoints ask it for what they need: forward-backward of a micro-batch,
the optimizer step with its lr and the gradient norm, evaluation, save and load of a
checkpoint, the device and the few reductions the loop needs (export reads checkpoints through
megaloop/ckpt/ and never builds an Engine). None of them imports DeepSpeed or asks
`torch.cuda` (cluster.py counts devices for the launcher).

The device and the collective backend come from one place, `megaloop.device.Device`, which
asks DeepSpeed's accelerator (`DS_ACCELERATOR`, else what DeepSpeed detects):
`DS_ACCELERATOR=cpu` means the CPU and gloo everywhere, also on a machine with GPUs. Every
branch on the device's kind is the Device's; the Engine may be given one (the tests give it a
CUDA Device whose tensors stay on the CPU, to run the GPU branches here).

Precision (`train.precision`, resolved here on the training machine: `auto` is bf16 where the
device computes bf16 natively, else fp32; `Engine.precision` and `Engine.config` hold the
resolved value, the run's own config keeps what was asked):
- fp32: fp32 throughout; on CUDA, matmuls and convolutions may use TF32.
- bf16: mixed precision. Weights, gradients and optimizer state stay fp32; matmuls and attention
  run in bf16 under torch.autocast (DeepSpeed's `torch_autocast`, which also gathers linear
  weights and reduces their gradients in bf16 under ZeRO). Autocast's weight cache is off, so
  each of the r recurrences casts the loop weights afresh and their gradients add up in fp32
  on the fp32 weight; the micro-batches' do too (`data_types.grad_accum_dtype`). DeepSpeed's own
  bf16 mode keeps bf16 weights: it would add the recurrences' gradients in bf16, and it refuses
  fp32 accumulation at ZeRO stage 0. RoPE tables are fp32 in either (model/blocks.py).

Facts that shape it (RESEARCH.md section 6): activation checkpointing must be torch's
non-reentrant kind (the model's own boundaries); every rank runs the same r in a step; the
engine and the process group are torn down in that order, or a rank can abort at exit.

DeepSpeed is imported inside the functions that use it, never at the top: its first import can
log to stdout ("Setting accelerator to CPU", without DS_ACCELERATOR), and stdout is megaloop's
output, so that import must happen in the Device's lookup of the accelerator (megaloop/device.py),
which sends it to stderr and keeps DeepSpeed's autotuner from importing MLflow on every rank.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import sys
import tempfile
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megaloop.atomic import atomic_write_hashed
from megaloop.ckpt.reading import DEEPSPEED_PICKLED, load_checkpoint_file, loads_without_code
from megaloop.cluster import loopback_interface
from megaloop.config import RunConfig
from megaloop.device import Device, PeakMemory, resolve_precision
from megaloop.errors import ConfigError
from megaloop.local_ranks import RENDEZVOUS
from megaloop.model.looped import LoopedLM
from megaloop.process_exit import group_formed
from megaloop.train.ds_config import (
    autocast_enabled,
    check_megaloop_needs,
    refused,
    render_ds_config,
    warn_about_zero3_costs,
    zero_stage_of,
)
from megaloop.train.host_memory import tune_for_cpu_training
from megaloop.train.muonh import MuonH, matrix_shape
from megaloop.train.optim import adamw, adamw_settings, muonh, role_groups
from megaloop.train.parallelize import apply_ac, apply_compile

# ---- the process group ------------------------------------------------------------------------

_store_folder: str | None = None  # the file store of this process's group of one


@contextlib.contextmanager
def gloo_on_loopback() -> Iterator[None]:
    """Gloo's socket on the loopback interface: where the hostname resolves to a network
    address, gloo would listen there, though a group of one talks to no one."""
    loopback = loopback_interface()
    before = os.environ.get("GLOO_SOCKET_IFNAME")
    if loopback is not None and before is None:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)


def join_process_group(device: Device | None = None) -> tuple[int, int, bool]:
    """Join the process group set up by a launcher (RANK, WORLD_SIZE, ...), or form a group of
    one for a plain process, on the device's backend (NCCL on CUDA, gloo on the CPU), and make
    this rank's device the current one. Returns (rank, world_size, whether this call created
    the group).

    A group that exists already (several runs in one process) is reused: DeepSpeed keeps
    references to it, so it must outlive the runs."""
    device = device or Device.of_this_process()  # DeepSpeed's first import (megaloop/device.py)
    import deepspeed

    created = not dist.is_initialized()
    if created:
        backend = device.communication_backend()
        if RENDEZVOUS in os.environ:  # the local ranks of launch.sh: a file store, no socket
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                       verbose=False, rank=int(os.environ["RANK"]),
                                       world_size=int(os.environ["WORLD_SIZE"]),
                                       init_method=os.environ[RENDEZVOUS])
        elif "RANK" in os.environ:  # torchrun's ranks: the env:// rendezvous it set up
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                       verbose=False)
        else:
            refuse_ranks_without_a_rendezvous(os.environ)
            # a group of one on a file store: no socket listens (a TCP store would, on every
            # interface); RANK and MASTER_* stay unset, so that a process this one starts (a
            # test's `megaloop train`) forms its own group
            global _store_folder
            _store_folder = tempfile.mkdtemp(prefix="megaloop-group-")
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine and zero.Init read it
            with gloo_on_loopback():
                deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                           verbose=False, rank=0, world_size=1,
                                           init_method=f"file://{_store_folder}/store")
        group_formed()  # this process ends without finalization: process_exit.py says why
    device.make_current()
    return dist.get_rank(), dist.get_world_size(), created


def refuse_ranks_without_a_rendezvous(environ: Mapping[str, str]) -> None:
    """Several processes started by hand (mpirun, a bare WORLD_SIZE) without RANK would each
    form a group of one and train the same run into one folder."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if environ.get(name, "1").strip() not in ("", "0", "1"):
            raise ConfigError(f"{name}={environ[name]} but RANK is unset: these processes were "
                              "started without a rendezvous and would each train alone. Start "
                              "them with launch.sh (it sets RANK, LOCAL_RANK and the "
                              "rendezvous), or unset " + name + " for one process.")


def leave_process_group(created: bool) -> None:
    global _store_folder
    if created and dist.is_initialized():
        dist.destroy_process_group()
    if created and _store_folder is not None:
        shutil.rmtree(_store_folder, ignore_errors=True)
        _store_folder = None


def set_matmul_precision(device: Device, precision: str) -> str:
    """TF32 for fp32 matmuls and convolutions on CUDA (on an H100 about 7x fp32's rate); the
    CPU keeps full fp32. Returns what was set, for the run's tags."""
    if not device.is_cuda or precision != "fp32":
        return "default"
    # the setting every torch reads: torch >= 2.9's per-backend `fp32_precision` makes later
    # reads of the older flags (compilers, libraries) raise
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return "tf32"


def bf16_autocast(device_type: str) -> torch.autocast:
    """How a bf16 step computes: autocast to bf16 without the weight cache, so that each use of
    a weight casts it afresh and the gradients of a reused loop weight add up in fp32."""
    return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False)


# ---- model and optimizer ---------------------------------------------------------------------

def make_optimizer(model: torch.nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """The run's AdamW or MuonH/Muon (optim.py), or DeepSpeed's CPU Adam over AdamW's groups
    when the optimizer state is offloaded (`train.offload`)."""
    if config.train.optimizer in ("muonh", "muon"):
        return muonh(model, config)
    if not config.train.offload:
        return adamw(model, config)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(role_groups(model, config), adamw_mode=True,
                            **adamw_settings(config))


def build_training_model(config: RunConfig, ds_config: dict[str, Any],
                         device: torch.device) -> LoopedLM:
    """The model on `device`. ZeRO 0-2: initialised on the CPU from the seed (the same weights
    on every machine), then moved. ZeRO-3: sharded as it is made, under zero.Init, then
    initialised module by module with its weights gathered."""
    import deepspeed

    torch.manual_seed(config.train.seed)
    if zero_stage_of(ds_config) != 3:
        model = LoopedLM(config.model).to(device)
    else:
        with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=None):
            model = LoopedLM(config.model, init_weights=False)
        model.reset_parameters(gather=gather_each)
        model.rotary.to(device)  # zero.Init made its tables in bf16 when bf16 was on: remade
    apply_ac(model, config.model.activation_checkpointing)
    if config.train.compile:
        apply_compile(model)
    return model


def gather_each(params: list[torch.nn.Parameter]) -> contextlib.ExitStack:
    """ZeRO-3 shards made whole, one GatheredParameters per parameter, for rank 0 to write.
    DeepSpeed before 0.19.8 waits on the last gather only when it gathers a list at once, and on
    gloo another may still be in flight: a two-rank init then read parts of parameters that had
    not arrived (a different step-1 loss now and then; benchmarks/RESULTS.md)."""
    import deepspeed

    stack = contextlib.ExitStack()
    for param in params:
        stack.enter_context(deepspeed.zero.GatheredParameters([param], modifier_rank=0))
    return stack


class ZeroWholeMatrices:
    """Whole matrices out of ZeRO's shards and back, for `MuonH.step_whole_matrices`, through
    DeepSpeed's documented accessors for the time between backward and step."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device

    def grad(self, param: torch.Tensor) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(param).float()

    def weight(self, param: torch.Tensor) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param)

    def set_weight(self, param: torch.Tensor, value: torch.Tensor | None, owner: int) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        if value is None:
            value = torch.empty(matrix_shape(param), dtype=torch.float32, device=self.device)
        dist.broadcast(value, src=owner)
        if not hasattr(param, "ds_id"):
            safe_set_full_fp32_param(param, value)
            return
        # ZeRO-3. DeepSpeed's setter reads past the end of a last shard that padding filled
        # out; this writes each rank's shard itself, within the matrix.
        shard, _ = param._z3_optimizer._get_fp32_opt_state_partition(param,
                                                                     release_swap_buffers=False)
        piece = value.flatten()[shard.numel() * self._shard_rank(param):][:shard.numel()]
        shard[:piece.numel()].copy_(piece)

    @staticmethod
    def _shard_rank(param: torch.Tensor) -> int:
        return param._z3_optimizer._get_param_partition_rank(param)


def check_ds_config(config: RunConfig, ds_config: dict[str, Any]) -> None:
    """DeepSpeed's own parse of the rendered config, before any model is built (it needs the
    process group: batch sizes are checked against the world size), and what megaloop needs."""
    from deepspeed.runtime.config import DeepSpeedConfig

    check_megaloop_needs(config, ds_config)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            DeepSpeedConfig(ds_config)
    except (AssertionError, ValueError, TypeError, KeyError) as exc:
        raise refused(config, exc) from None


# ---- checkpoint files -------------------------------------------------------------------------

def universal_checkpoint(source: Path, target: Path, trust: bool) -> None:
    """DeepSpeed's universal checkpoint of checkpoint folder `source` in `target` (every
    parameter's weights and optimizer moments whole, one folder each), which any number of
    ranks can load. One process: it reads every rank's files. Its chatter goes to stderr."""

    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.checkpoint import ds_to_universal

        args = types.SimpleNamespace(input_folder=str(source), output_folder=str(target),
                                     num_extract_workers=1, num_merge_workers=1,
                                     keep_temp_folder=False, strict=True,
                                     inject_missing_state=True)
        with loads_without_code(trust, checkpoint_pickle_globals()):
            ds_to_universal.main(args)


class CheckpointFiles:
    """DeepSpeed's checkpoint engine with megaloop's file rules: every file written
    write-then-rename with its SHA-256 taken as it passes (`written`), a failed write (a full
    disk) kept in `failure` instead of raised inside DeepSpeed's collective save, and every
    file read by `load_checkpoint_file` with DeepSpeed's own classes allowed. Everything else
    is DeepSpeed's engine's."""

    def __init__(self, inner: Any, trust: bool):
        self._inner, self._trust = inner, trust
        self.written: dict[str, dict[str, Any]] = {}
        self.failure: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def save(self, state_dict: Any, path: str) -> None:
        if self.failure is not None:
            return
        zipped = getattr(self._inner, "zipfile_serialization", True)
        try:
            self.written[path] = atomic_write_hashed(path, lambda handle: torch.save(
                state_dict, handle, _use_new_zipfile_serialization=zipped))
        except Exception as exc:  # OSError, or torch's RuntimeError around it
            self.failure = f"writing {path} failed ({type(exc).__name__}: {exc})"

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_checkpoint_file(path, map_location, self._trust,
                                    allowed=checkpoint_pickle_globals())


# ---- the engine ------------------------------------------------------------------------------

class Engine:
    """One run's model, optimizer and DeepSpeed engine on this rank's device.

    Every rank makes one, builds it, calls the same methods in the same order (they may be
    collective) and closes it. Device tensors stay on the device: megaloop's only host reads are
    the values returned by `sum_over_ranks` (the loop's one sync per log interval) and by
    `consolidated_state_dict` (DeepSpeed's ZeRO 1-3 step also reads, every step, whether its
    gradient norm is finite)."""

    def __init__(self, config: RunConfig, device: Device | None = None):
        """Join the process group on `device` (default: this process's, as DeepSpeed's
        accelerator names it), render the DeepSpeed config; `build` makes the model (so that a
        run's data can be checked first, with `barrier`)."""
        self.hardware = device or Device.of_this_process()
        self.device = self.hardware.tensors  # where the model and the batches go
        self.rank, self.world_size, self._owns_group = join_process_group(self.hardware)
        self._ds: Any = None
        self._whole_matrices: MuonH | None = None
        self._files: CheckpointFiles | None = None
        self.trust_checkpoints = False  # --trust-checkpoint: unpickle checkpoint files fully
        try:
            hardware = self.hardware
            self.precision = resolve_precision(config.train.precision, hardware)
            self.config = config = config.with_precision(self.precision)
            self.host_allocator = (tune_for_cpu_training() if hardware.is_cpu
                                   else hardware.kind.upper())
            self.matmul_precision = set_matmul_precision(hardware, config.train.precision)
            self.ds_config = render_ds_config(config, self.world_size,
                                              pin_memory=hardware.is_cuda)
        except BaseException:
            self.close()
            raise
        self.zero_stage = zero_stage_of(self.ds_config)
        self.autocast = autocast_enabled(self.ds_config)

    def build(self) -> Engine:
        """The model on the device, its optimizer and DeepSpeed's engine around them."""
        import deepspeed

        config = self.config
        if self.rank == 0:
            warn_about_zero3_costs(config, self.zero_stage)
        check_ds_config(config, self.ds_config)
        self.model = build_training_model(config, self.ds_config, self.device)
        optimizer = make_optimizer(self.model, config)
        self._whole_matrices = (optimizer if isinstance(optimizer, MuonH)
                                and optimizer.whole_matrices else None)
        try:
            self._ds, *_ = deepspeed.initialize(model=self.model, optimizer=optimizer,
                                                config=self.ds_config)
        except NotImplementedError as exc:  # e.g. a template's unsupported mix of dtypes
            raise refused(config, exc) from None
        self._files = CheckpointFiles(self._ds.checkpoint_engine, self.trust_checkpoints)
        self._ds.checkpoint_engine = self._files
        return self

    def close(self) -> None:
        """Tear down in the order that lets every rank exit cleanly: engine, then the group
        (only if this engine formed it)."""
        if self._ds is not None:
            self._ds.destroy()
            self._ds = None
        leave_process_group(self._owns_group)
        self._owns_group = False

    # ---- computation ------------------------------------------------------------------------

    def _compute(self) -> contextlib.AbstractContextManager:
        """`bf16_autocast` where this run is bf16, else nothing. DeepSpeed's own autocast,
        entered inside this one, keeps its cache setting."""
        return bf16_autocast(self.device.type) if self.autocast else contextlib.nullcontext()

    def forward_backward(self, tokens: torch.Tensor, targets: torch.Tensor,
                         recurrences: int) -> torch.Tensor:
        """Loss and gradients of one micro-batch (added to those of the step's earlier ones);
        returns the loss, detached, on the device."""
        with self._compute():
            loss = self._ds(self.hardware.to_device(tokens), self.hardware.to_device(targets),
                            recurrences=recurrences)
        self._ds.backward(loss)
        if not self._ds.is_gradient_accumulation_boundary():
            self._ds.step()  # DeepSpeed counts micro-batches in step(); nothing is updated yet
        return loss.detach()

    def optimizer_step(self, lr: float) -> torch.Tensor | None:
        """Update the weights at `lr` (times a group's `lr_scale`, where it has one: MuonH's
        matrices) after the step's last micro-batch; returns the global gradient norm on the
        device (None where DeepSpeed computes none)."""
        for group in self._ds.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        norm = self._local_grad_norm() if self.zero_stage == 0 else None
        if self._whole_matrices is not None:
            self._whole_matrices.step_whole_matrices(
                ZeroWholeMatrices(self.rank, self.world_size, self.device))
        self._ds.step()
        if norm is None:
            norm = self._ds.get_global_grad_norm()
        if norm is None or isinstance(norm, torch.Tensor):
            return norm
        return torch.tensor(float(norm), device=self.device)

    def _local_grad_norm(self) -> torch.Tensor:
        """At ZeRO stage 0 every rank holds whole reduced gradients; DeepSpeed computes their
        norm itself only when it clips."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.nn.utils.get_total_norm(grads)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode without gradients, for `loss`; training mode again afterwards."""
        self._ds.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self._ds.train()

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor,
             recurrences: int | None = None) -> torch.Tensor:
        """The mean loss of a batch, on the device (under `evaluating()` for validation)."""
        with self._compute():
            loss = self._ds(self.hardware.to_device(tokens), self.hardware.to_device(targets),
                            recurrences=recurrences)
        return loss.detach()

    # ---- reductions and the host ------------------------------------------------------------

    def barrier(self) -> None:
        dist.barrier()

    def all_gather_objects(self, value: Any) -> list[Any]:
        """Every rank's `value` (small picklable data), in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def synchronize(self) -> None:
        self.hardware.synchronize()

    def sum_over_ranks(self, summed: Sequence[torch.Tensor | float],
                       read: Sequence[torch.Tensor] = ()) -> tuple[list[float], list[float]]:
        """Each value of `summed` added up over all ranks, and the values of `read` as they
        are, brought to the host in one transfer: the host syncs once, whatever the count."""
        values = torch.stack([self._scalar(value) for value in summed])
        if self.world_size > 1:
            dist.all_reduce(values)
        host = torch.cat([values, *(self._scalar(value).reshape(1) for value in read)]).tolist()
        return host[:len(summed)], host[len(summed):]

    def _scalar(self, value: torch.Tensor | float) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value.detach().reshape(()).to(self.device, torch.float64)
        return torch.tensor(float(value), dtype=torch.float64, device=self.device)

    def peak_memory(self) -> PeakMemory:
        """Peak device memory, allocated and reserved, in GiB (on the CPU: the peak RSS)."""
        return self.hardware.peak_memory()

    def device_name(self) -> str:
        return self.hardware.name()

    def device_rng_state(self) -> torch.Tensor | None:
        return self.hardware.rng_state()

    def set_device_rng_state(self, state: torch.Tensor | None) -> None:
        self.hardware.set_rng_state(state)

    # ---- checkpoints and weights ------------------------------------------------------------

    def save_checkpoint(self, folder: Path, tag: str, client_state: dict[str, Any]
                        ) -> tuple[dict[str, dict[str, Any]], str | None]:
        """Every rank writes its part of `folder/tag/` (weights, optimizer, ZeRO shards).
        Returns the files this rank wrote (path: sha256 and bytes) and why writing failed, or
        None; a failure raises nothing here, so that every rank finishes DeepSpeed's collective
        save and the ranks can agree on it (`all_gather_objects`)."""
        self._files.written, self._files.failure = {}, None
        try:
            self._ds.save_checkpoint(str(folder), tag=tag, client_state=client_state,
                                     save_latest=False)
        except Exception as exc:  # e.g. the folder cannot be made
            self._files.failure = self._files.failure or f"{type(exc).__name__}: {exc}"
        return dict(self._files.written), self._files.failure

    def load_checkpoint(self, folder: Path, tag: str, universal: bool = False
                        ) -> dict[str, Any] | None:
        """Load `folder/tag/` into the model and optimizer; returns the client state saved with
        it, None where DeepSpeed found no engine state. A damaged file raises (any error).
        `universal`: `folder/tag/` is a universal checkpoint (`universal_checkpoint`), saved by
        another number of ranks."""
        def load() -> dict[str, Any] | None:
            loaded, client = self._ds.load_checkpoint(str(folder), tag=tag,
                                                      load_optimizer_states=True,
                                                      load_lr_scheduler_states=False)
            return client if loaded is not None else None

        if not universal:
            return load()
        # DeepSpeed's universal loader gives every group the first saved group's settings
        # (betas, weight decay): megaloop's groups keep their own.
        settings = [{k: v for k, v in group.items() if k != "params"}
                    for group in self._ds.optimizer.param_groups]
        self._ds._config.load_universal_checkpoint = True
        try:
            with loads_without_code(self.trust_checkpoints, checkpoint_pickle_globals()):
                client = load()
        finally:
            self._ds._config.load_universal_checkpoint = False
        for group, kept in zip(self._ds.optimizer.param_groups, settings, strict=True):
            group.update(kept)
        # ... and hands every parameter one shared step-count tensor, which a fused or foreach
        # AdamW then advances once per group in each step: each gets a count of its own
        inner = getattr(self._ds.optimizer, "optimizer", self._ds.optimizer)
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
        return client

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole fp32 weights on the CPU, as `megaloop export` writes them. Every rank calls
        it (under ZeRO-3 each parameter is gathered from all ranks)."""
        if self.zero_stage != 3:
            return {name: p.detach().float().cpu().clone()
                    for name, p in self.model.named_parameters()}
        import deepspeed

        weights = {}
        for name, param in self.model.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                weights[name] = param.detach().float().cpu().clone()
        return weights

    def parameter_count(self) -> int:
        """Parameters of the whole model (ZeRO-3 shards count as their full size)."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())


def checkpoint_pickle_globals() -> list[Any]:
    """The DeepSpeed classes that ZeRO optimizer files pickle (megaloop.ckpt.reading names
    them), for loads whose state goes back to DeepSpeed's engine: the real classes, allowlisted
    so that `torch.load(weights_only=True)` accepts them."""
    with contextlib.redirect_stdout(sys.stderr):
        found = []
        for name in DEEPSPEED_PICKLED:
            module, _, attribute = name.rpartition(".")
            found.append(getattr(importlib.import_module(module), attribute))
    return found
