"""The Engine on the CPU, where the GPU path is proven: DeepSpeed's real engine with gloo in this
process. RoPE tables that stay fp32 and exact in bf16 and under zero.Init, gradients that add up
in fp32 (over micro-batches and over the recurrences of a reused loop weight), bf16 losses that
track fp32, one host sync per log interval, and the walls around DeepSpeed and torch.cuda."""

from __future__ import annotations

import ast
import contextlib
import ipaddress
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from tiny import REPO, engine_run_config, make_config, random_tokens, run_trainer, trainer_config

from megaloop import config
from megaloop.errors import ConfigError
from megaloop.model import LoopedLM
from megaloop.model.blocks import Rotary
from megaloop.train.ds_config import ZeroCompileWarning, ZeroPrefetchWarning, render_ds_config
from megaloop.train.engine import Engine, build_training_model

LONG = 1024  # positions: bf16 tables would round every position above 256


run_config = engine_run_config


@contextlib.contextmanager
def engine_of(cfg: config.RunConfig):
    engine = Engine(cfg).build()
    try:
        yield engine
    finally:
        engine.close()


def exact_tables(max_seq_len: int, head_dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    fresh = Rotary(head_dim, max_seq_len, 10000.0)
    return fresh.cos, fresh.sin


def assert_exact_rope(model: LoopedLM) -> None:
    rotary = model.rotary
    cos, sin = exact_tables(rotary.max_seq_len, rotary.head_dim)
    assert rotary.cos.dtype == rotary.sin.dtype == torch.float32
    assert torch.equal(rotary.cos.cpu(), cos) and torch.equal(rotary.sin.cpu(), sin)


# ---- RoPE ------------------------------------------------------------------------------------

def test_casts_and_moves_keep_the_rope_tables_fp32_and_exact():
    model = LoopedLM(make_config(max_seq_len=LONG))
    bf16_positions = torch.arange(LONG, dtype=torch.bfloat16).float()
    assert (bf16_positions != torch.arange(LONG)).sum() > 500  # what a bf16 table would hold
    for move in (lambda m: m.bfloat16(), lambda m: m.half(), lambda m: m.to(torch.float64),
                 lambda m: m.to("meta").to_empty(device="cpu")):
        model = move(model)
        assert_exact_rope(model)


@pytest.mark.parametrize("stage", [0, 3])
def test_the_engines_build_keeps_rope_exact_under_deepspeeds_bf16(process_group, stage):
    """zero.Init with DeepSpeed's bf16 makes every floating constructor return bf16 (arange
    included), and its bf16 engine casts the module: neither may reach the tables."""
    cfg = run_config(**{"model.max_seq_len": LONG, "train.zero_stage": stage})
    ds_config = render_ds_config(cfg)
    ds_config["bf16"] = {"enabled": True}
    ds_config.pop("torch_autocast")
    model = build_training_model(cfg, ds_config, torch.device("cpu"))
    assert_exact_rope(model)
    model.bfloat16()  # what deepspeed.initialize does to a bf16 model
    assert_exact_rope(model)


def test_a_bf16_zero3_engine_trains_with_exact_rope(process_group):
    cfg = run_config(**{"model.max_seq_len": LONG, "train.zero_stage": 3,
                        "train.precision": "bf16"})
    with engine_of(cfg) as engine:
        assert engine.zero_stage == 3 and engine.autocast
        assert_exact_rope(engine.model)


# ---- precision -------------------------------------------------------------------------------

def losses_of(cfg: config.RunConfig, steps: int, seq: int) -> list[float]:
    """Losses of `steps` steps on one repeated batch (which the model learns)."""
    batch = random_tokens(batch=2, seq=seq + 1, vocab=cfg.model.vocab_size)
    losses = []
    with engine_of(cfg) as engine:
        for _ in range(steps):
            loss = engine.forward_backward(batch[:, :-1], batch[:, 1:], cfg.model.recurrences)
            engine.optimizer_step(1e-2)
            losses.append(float(loss))
    return losses


def test_bf16_losses_track_fp32_at_long_sequences(process_group):
    settings = {"model.max_seq_len": LONG}
    fp32 = losses_of(run_config(**settings), steps=6, seq=LONG)
    bf16 = losses_of(run_config(**settings, **{"train.precision": "bf16"}), steps=6, seq=LONG)
    assert fp32[-1] < fp32[0] - 0.1  # it learns, so the comparison means something
    for a, b in zip(fp32, bf16, strict=True):
        assert b == pytest.approx(a, abs=0.02)


def test_auto_precision_is_bf16_where_the_cpu_computes_it_natively():
    from megaloop.device import CPU, cpu_has_native_bf16, resolve_precision

    zen4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
    sapphire_rapids = "flags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n"
    skylake = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
    uncapped: dict[str, str] = {}  # oneDNN free to use what the CPU has
    assert cpu_has_native_bf16(zen4, uncapped) and cpu_has_native_bf16(sapphire_rapids, uncapped)
    assert not cpu_has_native_bf16(skylake, uncapped) and not cpu_has_native_bf16("", uncapped)
    # oneDNN held below bf16 emulates it even where the flags are (CI's AVX2 pass, a user's cap)
    for cap in ("AVX2", "avx512_core", "AVX512_CORE_VNNI"):
        assert not cpu_has_native_bf16(zen4, {"ONEDNN_MAX_CPU_ISA": cap})
    assert not cpu_has_native_bf16(sapphire_rapids, {"DNNL_MAX_CPU_ISA": "AVX2"})
    for cap in ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "ALL", ""):
        assert cpu_has_native_bf16(sapphire_rapids, {"ONEDNN_MAX_CPU_ISA": cap})
    assert resolve_precision("auto", CPU) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"


def test_the_engine_trains_auto_as_this_machine_resolves_it(process_group):
    from megaloop.device import CPU, resolve_precision

    cfg = run_config(**{"train.precision": "auto"})
    resolved = resolve_precision("auto", CPU)
    with engine_of(cfg) as engine:
        assert engine.precision == resolved and engine.config.train.precision == resolved
        assert engine.autocast == (resolved == "bf16")
        assert engine.ds_config["torch_autocast"]["enabled"] == (resolved == "bf16")
    assert cfg.train.precision == "auto"  # the run's own config, and its hash, keep auto
    with pytest.raises(ValueError, match="must be resolved on the training machine"):
        render_ds_config(cfg)


def test_flash_attention_with_auto_is_refused_only_where_auto_means_fp32():
    cfg = run_config(**{"model.attention": "flash", "train.precision": "auto"})
    assert cfg.with_precision("bf16").train.precision == "bf16"
    with pytest.raises(ConfigError, match="needs train.precision = bf16"):
        cfg.with_precision("fp32")


def full_grad(param: torch.nn.Parameter, stage: int) -> torch.Tensor:
    if stage != 3:
        return param.grad.double()
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(param).double()


@pytest.mark.parametrize("stage", [0, 3])
def test_bf16_gradients_accumulate_over_micro_batches_in_fp32(process_group, stage):
    """Eight micro-batches: the engine's accumulated gradient equals the fp64 sum of the eight
    gradients (each computed in bf16), to fp32's precision; a bf16 sum is off by ~1e-3."""
    micro = 8
    cfg = run_config(**{"train.precision": "bf16", "train.zero_stage": stage,
                        "train.micro_batch": 1, "train.global_batch": micro})
    tokens = random_tokens(batch=micro, seq=33, vocab=64)
    with engine_of(cfg) as engine:
        weights = engine.consolidated_state_dict()
        for i in range(micro):
            engine.forward_backward(tokens[i:i + 1, :-1], tokens[i:i + 1, 1:], 2)
        got = full_grad(engine.model.embed.weight, stage)
    reference = LoopedLM(cfg.model)
    reference.load_state_dict(weights)
    want = torch.zeros_like(got)
    for i in range(micro):
        reference.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, cache_enabled=False):
            loss = reference(tokens[i:i + 1, :-1], tokens[i:i + 1, 1:])
        (loss / micro).backward()
        want += reference.embed.weight.grad.double()
    error = ((got - want).norm() / want.norm()).item()
    assert error < 1e-6, error


@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.slow),
                                   pytest.param(2, marks=pytest.mark.slow), 3])
def test_bf16_gradients_are_reduced_over_two_ranks_in_fp32(stage):
    """DeepSpeed's autocast would reduce the gradients of Linear weights in bf16 at ZeRO 1-3
    (relative error 1.8e-3 here); the rendered config keeps the reduction in fp32."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", str(REPO / "tests/two_rank_gradients.py"),
                           str(stage)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    error = json.loads(done.stdout.strip().splitlines()[-1])["relative_error"]
    assert error < 1e-6, error


def test_a_reused_loop_weight_adds_its_recurrences_gradients_in_fp32(process_group):
    """A passthrough loop of one block run 4 times equals the 4-block model that unrolls it.
    The loop weight's gradient must equal the fp64 sum of the unrolled blocks' gradients to
    fp32's precision: autocast's weight cache would add the four in bf16 (~1e-3 off)."""
    r = 4
    cfg = run_config(**{"train.precision": "bf16", "model.recurrences": r,
                        "model.injection": "passthrough"})
    tokens = random_tokens(batch=2, seq=17, vocab=64)
    with engine_of(cfg) as engine:
        weights = engine.consolidated_state_dict()
        engine.forward_backward(tokens[:, :-1], tokens[:, 1:], r)
        got = engine.model.loop[0].mlp.inp.weight.grad.double()
    unrolled_cfg = run_config(**{"model.recurrences": 1, "model.loop_layers": r}).model
    unrolled = LoopedLM(unrolled_cfg)
    state = {}
    for name, tensor in weights.items():
        if name.startswith("loop.0."):
            for i in range(r):
                state[name.replace("loop.0.", f"loop.{i}.")] = tensor
        else:
            state[name] = tensor
    unrolled.load_state_dict(state)
    with torch.autocast("cpu", torch.bfloat16, cache_enabled=False):
        loss = unrolled(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    want = sum(unrolled.loop[i].mlp.inp.weight.grad.double() for i in range(r))
    error = ((got - want).norm() / want.norm()).item()
    assert error < 1e-6, error


def test_the_rendered_config_keeps_weights_and_gradients_in_fp32():
    rendered = render_ds_config(run_config(**{"train.precision": "bf16"}))
    assert rendered["torch_autocast"] == {"enabled": True, "dtype": "bfloat16",
                                          "lower_precision_safe_modules": []}
    assert rendered["bf16"]["enabled"] is False and rendered["fp16"]["enabled"] is False
    assert rendered["data_types"]["grad_accum_dtype"] == "fp32"
    assert render_ds_config(run_config())["torch_autocast"]["enabled"] is False


def test_fp32_on_cuda_allows_tf32_and_every_reader_of_the_flags_still_works():
    """Set through the one API whose flags torch's older and newer readers both accept (the
    newer per-backend setter makes a later read of `allow_tf32` raise)."""
    from megaloop.device import CPU, Device
    from megaloop.train.engine import set_matmul_precision

    cuda = Device("cuda", 0, torch.device("cuda", 0))
    before = torch.get_float32_matmul_precision()
    try:
        assert set_matmul_precision(CPU, "fp32") == "default"
        assert torch.get_float32_matmul_precision() == before
        assert set_matmul_precision(cuda, "bf16") == "default"
        assert set_matmul_precision(cuda, "fp32") == "tf32"
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)


def test_flash_attention_without_bf16_is_refused():
    with pytest.raises(ConfigError, match="needs train.precision = bf16"):
        run_config(**{"model.attention": "flash"})


@pytest.mark.parametrize("name", ["WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"])
def test_ranks_started_without_a_rendezvous_are_refused(name):
    from megaloop.train.engine import refuse_ranks_without_a_rendezvous

    refuse_ranks_without_a_rendezvous({name: "1"})
    with pytest.raises(ConfigError, match=f"{name}=4 but RANK is unset"):
        refuse_ranks_without_a_rendezvous({name: "4"})


def test_a_template_without_the_gradient_norm_is_refused(process_group):
    from megaloop.train.engine import check_ds_config

    cfg = run_config(**{"train.zero_stage": 2})
    rendered = render_ds_config(cfg, 1)
    check_ds_config(cfg, rendered)
    rendered["zero_optimization"]["compute_grad_norm"] = False
    with pytest.raises(ConfigError, match="compute_grad_norm"):
        check_ds_config(cfg, rendered)


def test_zero3_warns_of_what_sampled_r_and_compile_cost_and_zero2_does_not(process_group):
    sampled = {"model.recurrence_sampling": "poisson_lognormal", "train.compile": "true"}
    with pytest.warns(ZeroPrefetchWarning) as caught:
        Engine(run_config(**sampled, **{"train.zero_stage": 3})).build().close()
    assert {type(w.message) for w in caught} >= {ZeroPrefetchWarning, ZeroCompileWarning}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ZeroPrefetchWarning)
        warnings.simplefilter("error", ZeroCompileWarning)
        Engine(run_config(**sampled, **{"train.zero_stage": 2})).build().close()


@pytest.mark.slow  # tens of seconds: the default suite stays under 10 min on 2 cores
def test_compiled_blocks_under_zero3_compute_what_eager_does(process_group):
    zero3 = {"train.zero_stage": 3}
    eager = losses_of(run_config(**zero3), steps=3, seq=16)
    torch._dynamo.reset()
    try:
        with pytest.warns(ZeroCompileWarning):
            compiled = losses_of(run_config(**zero3, **{"train.compile": "true"}), steps=3,
                                 seq=16)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs > 3  # compiled, in pieces: one graph per layer between ZeRO-3's gathers
    assert eager[-1] < eager[0]
    assert compiled == pytest.approx(eager, abs=1e-4)


@pytest.mark.parametrize("init", ["gpt2", "isodepth"])
def test_consolidated_weights_are_whole_under_zero3(init, process_group):
    """Also the init: zero.Init's gathered module-by-module init draws the plain model's."""
    options = {"model.init": init, "model.embedding_norm": "true"}
    cfg = run_config(**options)
    with engine_of(cfg) as engine:
        plain = engine.consolidated_state_dict()
    with engine_of(run_config(**options, **{"train.zero_stage": 3})) as engine:
        sharded = engine.consolidated_state_dict()
    assert plain.keys() == sharded.keys()
    for name, tensor in plain.items():
        assert torch.equal(tensor, sharded[name]), name


# ---- host syncs ------------------------------------------------------------------------------

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


@contextlib.contextmanager
def host_reads_by_megaloop(trainer):
    """Record (trainer.step, call site) for every read of a tensor's values to the host that
    megaloop's own code makes (DeepSpeed's and torch's are theirs); on a GPU each one is a
    device sync."""
    package = str(REPO / "megaloop")
    seen: list[tuple[int, str]] = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(package):
                seen.append((trainer.step, f"{Path(caller.f_code.co_filename).name}:"
                                           f"{caller.f_lineno} {name}"))
            return original(self, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield seen
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_the_loop_reads_the_device_once_per_log_interval(process_group, stdlib_shards, tmp_path):
    cfg = trainer_config(stdlib_shards, tmp_path, **{"train.steps": 12, "train.log_interval": 4,
                                                     "train.global_batch": 4})
    _, summary, reads = run_trainer(cfg, watch=host_reads_by_megaloop)
    assert summary["step"] == 12 and math.isfinite(summary["val/loss"])
    at = sorted({step for step, _ in reads})
    assert at == [4, 8, 12], reads
    per_sync = [sum(1 for step, _ in reads if step == s) for s in (4, 8)]
    assert per_sync == [1, 1], reads  # one transfer per sync, whatever it carries


# ---- MFU -------------------------------------------------------------------------------------

def test_mfu_counts_the_flops_of_the_r_each_step_ran(process_group, stdlib_shards, tmp_path):
    """Sampled r: each logged interval (one step each here) is credited with the FLOPs per
    token of the r it ran, not of the configured mean."""
    import dataclasses

    from megaloop.model.accounting import account

    cfg = trainer_config(stdlib_shards, tmp_path, **{
        "model.recurrences": 3, "model.recurrence_sampling": "poisson_lognormal",
        "train.steps": 8, "train.log_interval": 1})
    trainer, summary, _ = run_trainer(cfg)
    intervals = summary["intervals"]
    ran = [i["recurrences"] for i in intervals]
    assert len(set(ran)) > 1, ran  # the draw varied, so the test can tell the r apart
    for interval in intervals:
        flops_per_token = interval["mfu"] * trainer.peak / interval["tokens_per_s"]
        r_model = dataclasses.replace(cfg.model, recurrences=interval["recurrences"])
        assert flops_per_token == pytest.approx(account(r_model)["flops_per_token"], rel=1e-9)


def test_the_throughput_meter_leaves_paused_time_out():
    from megaloop.train.trainer import ThroughputMeter

    meter = ThroughputMeter()
    meter.add(tokens=1000, flops=1e9, causal_flops=6e8)
    time.sleep(0.05)
    meter.pause()  # an evaluation or a checkpoint
    time.sleep(0.5)
    meter.resume()
    tokens_per_s, flops_per_s, causal_per_s = meter.report()
    assert tokens_per_s > 1000 / 0.3 and flops_per_s == pytest.approx(tokens_per_s * 1e6)
    assert causal_per_s == pytest.approx(tokens_per_s * 6e5)
    assert (meter.tokens, meter.flops, meter.causal_flops) == (0, 0.0, 0.0)  # starts empty
    time.sleep(0.5)  # logging after the report is not training time either
    meter.resume()
    meter.add(tokens=1000, flops=1e9, causal_flops=6e8)
    time.sleep(0.05)
    assert meter.report()[0] > 1000 / 0.3


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA H800 PCIe", 756e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA B200", 2250e12), ("NVIDIA GB200", 2500e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA GeForce RTX 4090", None)])
def test_gpu_peaks_tell_the_pcie_and_nvl_parts_from_the_sxm(name, peak):
    from megaloop.train.mfu import known_gpu_peak

    assert known_gpu_peak(name) == peak


def test_a_bf16_peak_on_a_cpu_without_bf16_units_is_fp32s_rate():
    """oneDNN held to AVX2 (ONEDNN_MAX_CPU_ISA, as on an AMD CPU before Zen 4) multiplies bf16
    at about 2% of fp32's rate here, and a bf16 step then read as MFU 2.4: a bf16 run's
    measured peak is the faster of the two products, and its source says which."""
    code = ("import json, torch; from megaloop.train.mfu import measure_matmul_peak, peak_flops; "
            "peak, source = peak_flops(None, 'bf16'); "
            "print(json.dumps({'peak': peak, 'source': source, "
            "'bf16': measure_matmul_peak(torch.bfloat16), 'fp32': measure_matmul_peak()}))")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ,
                          "ONEDNN_MAX_CPU_ISA": "AVX2"}, capture_output=True, text=True,
                          timeout=120, check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["bf16"] < got["fp32"] / 4, got  # what the variable does to this CPU's kernels
    assert got["source"] == "measured matmul peak (fp32, faster than bf16 here)"
    # the best of 0.3 s of products each time, against another such measurement: a factor
    # of 2 leaves room for the other worker's load and still tells fp32's rate from bf16's
    assert got["peak"] > got["fp32"] / 2 and got["peak"] > 2 * got["bf16"]


# ---- walls -----------------------------------------------------------------------------------

def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_the_engine_talks_to_deepspeed_and_the_device():
    """The Engine alone imports DeepSpeed and torch.distributed; device.py asks DeepSpeed's
    accelerator about the device, and torch.cuda only for the card's name, which the
    accelerator does not give; cluster.py counts devices for the launcher."""
    package = REPO / "megaloop"
    engine, device = package / "train" / "engine.py", package / "device.py"
    assert {m for m in imported_modules(device) if m.startswith("deepspeed")} == \
        {"deepspeed.accelerator"}
    assert re.findall(r"torch\.cuda\.\w+", device.read_text()) == ["torch.cuda.get_device_name"]
    for path in package.rglob("*.py"):
        text = path.read_text()
        modules = imported_modules(path)
        if path not in (engine, device):
            assert not any(m == "deepspeed" or m.startswith("deepspeed.") for m in modules), path
            assert "torch.distributed" not in modules and "import torch.distributed" not in text, \
                path
            assert "torch.cuda" not in text or path.name == "cluster.py", path
        if path != device:
            assert "accelerator()" not in text, path  # every accelerator call is the Device's
    cluster = (package / "cluster.py").read_text()
    assert cluster.count("torch.cuda") == 1 and "torch.cuda.device_count()" in cluster


def test_a_group_of_one_listens_on_no_network_interface():
    """A plain `megaloop train` forms a process group of one: its store is a file and gloo's
    socket is on the loopback, so nothing on the network can reach the process."""
    script = (
        "import psutil\n"
        "from megaloop.train.engine import join_process_group\n"
        "join_process_group()\n"
        "for c in psutil.Process().net_connections(kind='inet'):\n"
        "    if c.status == psutil.CONN_LISTEN:\n"
        "        print('LISTEN', c.laddr.ip)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    listening = [line.split()[1] for line in done.stdout.splitlines()
                 if line.startswith("LISTEN")]
    assert all(ipaddress.ip_address(ip).is_loopback for ip in listening), listening


@pytest.mark.parametrize("attack", [
    "{{ cycler.__init__.__globals__.os.popen('touch SENTINEL').read() }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system("
    "'touch SENTINEL') }}",
])
def test_a_shared_ds_config_template_is_data(tmp_path, attack):
    sentinel = tmp_path / "code-ran"
    template = tmp_path / "ds.json.j2"
    template.write_text('{"train_batch_size": {{ global_batch }}, "x": "'
                        + attack.replace("SENTINEL", str(sentinel)) + '"}')
    cfg = config.load(overrides=[f"train.ds_config={template}", "train.precision=fp32"])
    with pytest.raises(ConfigError, match="sandbox"):
        render_ds_config(cfg)
    assert not sentinel.exists()
