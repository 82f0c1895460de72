"""The Python stages of benchmarks/gpu_session.sh, each writing one JSON file under --out as it
goes (benchmarks/gpu_summary.py gathers them into summary.json after every stage).

    python benchmarks/gpu_session.py env   --out DIR [--smoke]   # GPU, torch, matmul rates
    python benchmarks/gpu_session.py tests --out DIR [--smoke]   # tests/test_gpu.py, per test
    python benchmarks/gpu_session.py step  --out DIR [--smoke]   # the model step alone
    python benchmarks/gpu_session.py rope  --out DIR [--smoke]   # RoPE under zero.Init, bf16

`step` times forward + backward + fused AdamW of the d2048 models of the Hyperloop paper
(transformer 18 layers; looped and Hyperloop 3 -> 4 x 3 -> 3; the looped model at r = 4 too,
3 -> 3 x 4 -> 3, iso-depth) as the Engine computes a bf16 step (fp32 weights, bf16 autocast
without its weight cache), with SDPA held to its flash or cuDNN kernels (a step that would need
another kernel fails, and says so), eager and with `apply_compile`, and the looped model at
sampled r (its batch cut so that its deepest step holds no more layer-rows than the fixed
rows: it fits where they do, an H100 as well as an H200). MFU is against the vendor's dense
bf16 peak (megaloop/train/mfu.py) in two conventions, labelled: `mfu` counts attention in full
(the papers' FLOPs, PaLM's MFU), `mfu_causal` its causal half; `mfu_executed` and
`of_measured_matmul` count what the step executes (megaloop.model.accounting), the latter
against the faster of the measured bf16 and fp32 products (also the peak on a CPU). Memory: the
peak allocated and reserved, in GiB. The device's questions go through megaloop.device.Device,
whose GPU branches the CPU tests prove. `--smoke` runs the same code on the CPU at toy sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "configs" / "runs"
MODELS = {"transformer": ("hyperloop-d2048-transformer.yaml", {}),
          "looped": ("hyperloop-d2048-looped.yaml", {}),
          "looped-r4": ("hyperloop-d2048-looped.yaml", {"loop_layers": 3, "recurrences": 4}),
          "hyperloop": ("hyperloop-d2048-hyperloop.yaml", {})}
PLAN = [("transformer", "eager"), ("looped", "eager"), ("looped-r4", "eager"),
        ("hyperloop", "eager"), ("looped", "sampled"), ("hyperloop", "compiled"),
        ("transformer", "compiled")]
TOY = {"d_model": 64, "n_heads": 4, "vocab_size": 256, "max_seq_len": 64}
# RoPE tables in fp32 against fp64: angle t * f rounds to 2^-24 relative, f itself too, so the
# error is at most about 2^-23 * T (2.4e-4 at T = 2048) plus the cosine's own rounding; twice
# that is the bound. A table built in bf16 is off by 1e-2 and more above position 256.
ROPE_TOLERANCE_PER_POSITION = 2.0**-22


def this_device(smoke: bool):
    from megaloop.device import CPU, Device

    return CPU if smoke else Device.of_this_process()


def write(out: Path, name: str, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(out / name)
    print(json.dumps(data, indent=2, default=str)[:4000])


# ---- env -------------------------------------------------------------------------------------

def matmul_rate(device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Mean FLOP/s of `repeats` square products after three warm-ups (random data)."""
    a = torch.randn(size, size, device=device.tensors, dtype=dtype)
    b = torch.randn(size, size, device=device.tensors, dtype=dtype)
    for _ in range(3):
        a @ b
    device.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    device.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def stage_env(args: argparse.Namespace) -> None:
    device = this_device(args.smoke)
    size, repeats = (256, 5) if args.smoke else (8192, 20)
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": str(device.tensors), "kind": device.kind,
            "name": device.name(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if device.is_cuda:
        props = torch.cuda.get_device_properties(device.index)
        info.update(gpus=torch.cuda.device_count(), memory_gib=props.total_memory / 2**30,
                    sms=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    if args.checkpoint_dir:
        info["checkpoint_dir"] = str(args.checkpoint_dir)
        info["checkpoint_dir_free_gib"] = shutil.disk_usage(args.checkpoint_dir).free / 2**30
    for module in ("deepspeed", "mlflow", "flash_attn", "sentencepiece"):
        try:
            info[module] = __import__(module).__version__
        except Exception as exc:  # absent, or broken: either is worth knowing
            info[module] = f"absent ({type(exc).__name__})"
    info["bf16_matmul_flops"] = matmul_rate(device, torch.bfloat16, size, repeats)
    info["fp32_matmul_flops"] = matmul_rate(device, torch.float32, size, repeats // 4 or 1)
    write(args.out, "env.json", info)


# ---- tests -----------------------------------------------------------------------------------

class Outcomes:
    """A pytest plugin that keeps each test's outcome (and the first lines of a failure)."""

    def __init__(self):
        self.tests: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            entry = {"outcome": report.outcome, "seconds": round(report.duration, 3)}
            if report.failed:
                entry["error"] = str(report.longrepr)[-1500:]
            self.tests[report.nodeid] = entry


def stage_tests(args: argparse.Namespace) -> int:
    import pytest

    outcomes = Outcomes()
    code = pytest.main(["-q", "-p", "no:cacheprovider", "-m", "gpu",
                        str(REPO / "tests" / "test_gpu.py")], plugins=[outcomes])
    counts = {kind: sum(t["outcome"] == kind for t in outcomes.tests.values())
              for kind in ("passed", "failed", "skipped")}
    write(args.out, "tests.json", {"exit": int(code), **counts, "tests": outcomes.tests})
    return 0 if int(code) in (0, 5) and counts["failed"] == 0 else 1  # 5: none collected


# ---- step ------------------------------------------------------------------------------------

def model_config(name: str, smoke: bool, **changes):
    from megaloop import config

    path, shape = MODELS[name]
    values = {**shape, **(TOY if smoke else {}), **changes}
    return config.load(RUNS / path, [f"model.{k}={v}" for k, v in values.items()]).model


@contextlib.contextmanager
def fast_attention_only(device):
    """SDPA restricted to its flash and cuDNN kernels (flash alone on the CPU): where neither
    can run the step raises instead of silently taking the math or efficient kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION]
    if device.is_cuda:
        backends.append(SDPBackend.CUDNN_ATTENTION)
    with sdpa_kernel(backends):
        yield


def planned_recurrences(model, cfg, steps: int, sampled: bool) -> list[int]:
    return [model.recurrences_for_step(step) if sampled else cfg.recurrences
            for step in range(steps)]


def time_steps(model, cfg, device, batch: int, warmup: int, rs: list[int]) -> dict:
    from megaloop.train.engine import bf16_autocast

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len + 1),
                           device=device.tensors)
    times = []
    for step, r in enumerate(rs):
        device.synchronize()
        start = time.perf_counter()
        with fast_attention_only(device), bf16_autocast(device.tensors.type):
            loss = model(tokens[:, :-1], tokens[:, 1:], recurrences=r)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        device.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return {"times_s": times, "recurrences": rs[warmup:], "loss": float(loss)}


def layer_rows(cfg, r: int, batch: int) -> int:
    return batch * (cfg.prelude_layers + r * cfg.loop_layers + cfg.coda_layers)


def measure_model(name: str, variant: str, args: argparse.Namespace, peak: float,
                  measured_peak: float) -> dict:
    from megaloop.model.accounting import (
        account,
        causal_flops_per_token,
        executed_flops_per_token,
    )
    from megaloop.model.looped import LoopedLM
    from megaloop.train.parallelize import apply_compile

    device = this_device(args.smoke)
    sampled = variant == "sampled"
    cfg = model_config(name, args.smoke,
                       **({"recurrence_sampling": "poisson_lognormal"} if sampled else {}))
    torch.manual_seed(0)
    model = LoopedLM(cfg).to(device.tensors)
    if variant == "compiled":
        apply_compile(model, backend=args.compile_backend)
    rs = planned_recurrences(model, cfg, args.warmup + args.steps, sampled)
    batch = args.batch
    if sampled:  # no more layer-rows in its deepest step than a fixed row holds
        fixed = layer_rows(cfg, cfg.recurrences, args.batch)
        batch = max(1, fixed // layer_rows(cfg, max(rs), 1))
    device.reset_peak_memory()
    start = time.perf_counter()
    timing = time_steps(model, cfg, device, batch, args.warmup, rs)
    tokens = batch * cfg.max_seq_len
    row = {"model": name, "variant": variant, "layout": f"{cfg.prelude_layers} + "
           f"{cfg.loop_layers}x{cfg.recurrences} + {cfg.coda_layers}", "batch": batch,
           "parameters": sum(p.numel() for p in model.parameters()),
           "tokens_per_step": tokens, "wall_s": time.perf_counter() - start, **timing}

    def per_step(count) -> float:  # FLOPs of the r each timed step ran
        return sum(tokens * count(dataclasses.replace(cfg, recurrences=r))
                   for r in timing["recurrences"])

    seconds = sum(timing["times_s"])
    full = per_step(lambda c: account(c)["flops_per_token"])
    executed = per_step(executed_flops_per_token)
    memory = device.peak_memory()
    row.update(median_step_s=statistics.median(timing["times_s"]),
               tokens_per_s=tokens * len(timing["times_s"]) / seconds,
               mfu=full / seconds / peak, mfu_causal=per_step(causal_flops_per_token) / seconds
               / peak, mfu_executed=executed / seconds / peak,
               of_measured_matmul=executed / seconds / measured_peak,
               executed_flops_per_s=executed / seconds,
               peak_memory_allocated_gib=memory.allocated_gib,
               peak_memory_reserved_gib=memory.reserved_gib)
    return row


def stage_step(args: argparse.Namespace) -> int:
    from megaloop.train.mfu import known_gpu_peak

    device = this_device(args.smoke)
    env = json.loads((args.out / "env.json").read_text()) if (args.out / "env.json").exists() \
        else {}
    # The faster of the two measured products: bf16 on a GPU; on a CPU without bf16 units (AMD,
    # older Intel) bf16 ran at 2% of fp32, and the autocast step, faster than that, read as MFU > 1.
    rates = {"bf16": env.get("bf16_matmul_flops") or matmul_rate(device, torch.bfloat16, 256, 5),
             "fp32": env.get("fp32_matmul_flops") or matmul_rate(device, torch.float32, 256, 2)}
    measured_dtype = max(rates, key=rates.get)
    measured = rates[measured_dtype]
    peak = (known_gpu_peak(device.name()) if device.is_cuda else None) or measured
    rows: list[dict] = []
    report = {"peak_flops": peak, "measured_matmul_flops": rates,
              "measured_matmul_dtype": measured_dtype, "batch": args.batch,
              "warmup": args.warmup, "steps": args.steps, "compile_backend": args.compile_backend,
              "rows": rows}
    for name, variant in PLAN:
        try:
            rows.append(measure_model(name, variant, args, peak, measured))
        except Exception as exc:  # one failed row must not cost the others
            rows.append({"model": name, "variant": variant, "error": f"{type(exc).__name__}: "
                         f"{str(exc)[:500]}", "traceback": traceback.format_exc()[-2000:]})
        by = {(r["model"], r["variant"]): r for r in rows if "error" not in r}
        base = by.get(("transformer", "eager"))
        for row in by.values():
            if base:
                row["per_executed_flop_vs_transformer"] = (row["executed_flops_per_s"]
                                                           / base["executed_flops_per_s"])
        write(args.out, "step.json", report)  # after every row: a cut-off keeps what ran
        device.release_cached_memory()
    return 1 if any("error" in row for row in rows) else 0


# ---- rope ------------------------------------------------------------------------------------

def stage_rope(args: argparse.Namespace) -> int:
    """The d2048 Hyperloop's RoPE tables as the Engine builds the model under zero.Init with
    DeepSpeed's own bf16 (the case that rounded positions) and with megaloop's bf16, against
    fp64 tables."""
    from megaloop import config
    from megaloop.train.ds_config import render_ds_config
    from megaloop.train.engine import Engine, build_training_model

    overrides = [f"model.{k}={v}" for k, v in (TOY | {"max_seq_len": 2048}).items()] \
        if args.smoke else []
    path, _ = MODELS["hyperloop"]
    cfg = config.load(RUNS / path, [*overrides, "train.zero_stage=3", "train.precision=bf16",
                                    "train.micro_batch=1", "train.global_batch=1"])
    results = {}
    engine = Engine(cfg)  # joins the process group (NCCL on CUDA) and chooses the device
    try:
        ds_config = render_ds_config(cfg)
        ds_config["bf16"] = {"enabled": True}
        ds_config.pop("torch_autocast")
        model = build_training_model(cfg, ds_config, engine.device)
        model.bfloat16()  # as DeepSpeed's bf16 engine does
        results["deepspeed_bf16_zero_init"] = rope_check(model.rotary)
        del model
        engine.build()
        results["megaloop_bf16_engine"] = rope_check(engine.model.rotary)
        results["device"] = str(engine.device)
    finally:
        engine.close()
    results["ok"] = all(r["within"] for r in results.values() if isinstance(r, dict))
    write(args.out, "rope.json", results)
    return 0 if results["ok"] else 1


def rope_check(rotary) -> dict:
    """The tables against fp64 ones computed from the same formula."""
    positions = rotary.max_seq_len
    half = torch.arange(0, rotary.head_dim, 2, dtype=torch.float64) / rotary.head_dim
    angles = torch.outer(torch.arange(positions, dtype=torch.float64),
                         1.0 / rotary.theta ** half)
    angles = torch.cat([angles, angles], dim=-1)
    error = max(float((rotary.cos.cpu().double() - angles.cos()).abs().max()),
                float((rotary.sin.cpu().double() - angles.sin()).abs().max()))
    tolerance = ROPE_TOLERANCE_PER_POSITION * positions
    return {"dtype": str(rotary.cos.dtype), "device": str(rotary.cos.device),
            "positions": positions, "max_error_vs_fp64": error, "tolerance": tolerance,
            "within": rotary.cos.dtype == torch.float32 and math.isfinite(error)
            and error <= tolerance}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["env", "tests", "step", "rope"])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")))
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--compile-backend", default=None)
    parser.add_argument("--checkpoint-dir", type=Path, help="env: where the trainings save")
    args = parser.parse_args()
    defaults = {"batch": 2, "warmup": 1, "steps": 2, "compile_backend": "eager"} if args.smoke \
        else {"batch": 8, "warmup": 3, "steps": 8, "compile_backend": "inductor"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.smoke:
        torch.set_num_threads(1)
    stages = {"env": stage_env, "tests": stage_tests, "step": stage_step, "rope": stage_rope}
    return stages[args.stage](args) or 0


if __name__ == "__main__":
    sys.exit(main())
