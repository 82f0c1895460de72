"""The Python stages of benchmarks/gpu_session.sh, each writing one JSON file under --out.

    python benchmarks/gpu_session.py env  --out DIR [--smoke]   # GPU, torch, bf16 matmul peak
    python benchmarks/gpu_session.py step --out DIR [--smoke]   # the model step alone
    python benchmarks/gpu_session.py rope --out DIR [--smoke]   # RoPE under zero.Init, bf16
    python benchmarks/gpu_session.py summarize --out DIR        # every figure in one table

`step` times forward + backward + fused AdamW of the d2048 models of the Hyperloop paper
(transformer 18 layers; looped and Hyperloop 3 -> 4 x 3 -> 3) as the Engine computes a bf16
step (fp32 weights, bf16 autocast without its weight cache), with SDPA held to its flash or
cuDNN kernels (a step that would need another kernel fails, and says so), eager and with
`apply_compile`, and the looped model at sampled r. MFU is against the vendor's dense bf16 peak
(megaloop/train/mfu.py) and against the bf16 matmul rate measured by `env`; per executed FLOP
(megaloop.model.accounting.executed_flops_per_token). `--smoke` runs the same code on the CPU at
toy sizes (the script's own test), where flash is SDPA's only fast kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "configs" / "runs"
MODELS = {"transformer": "hyperloop-d2048-transformer.yaml",
          "looped": "hyperloop-d2048-looped.yaml",
          "hyperloop": "hyperloop-d2048-hyperloop.yaml"}
TOY = {"d_model": 64, "n_heads": 4, "vocab_size": 256, "max_seq_len": 64}


def device_of(smoke: bool) -> torch.device:
    return torch.device("cpu" if smoke else "cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def write(out: Path, name: str, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(out / name)
    print(json.dumps(data, indent=2, default=str))


# ---- env -------------------------------------------------------------------------------------

def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Mean FLOP/s of `repeats` square products after three warm-ups (random data)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def stage_env(args: argparse.Namespace) -> None:
    device = device_of(args.smoke)
    size, repeats = (256, 5) if args.smoke else (8192, 20)
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": str(device),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                    memory_gib=props.total_memory / 2**30, sms=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}")
    for module in ("deepspeed", "mlflow", "flash_attn", "sentencepiece"):
        try:
            info[module] = __import__(module).__version__
        except Exception as exc:  # absent, or broken: either is worth knowing
            info[module] = f"absent ({type(exc).__name__})"
    info["bf16_matmul_flops"] = matmul_rate(device, torch.bfloat16, size, repeats)
    info["fp32_matmul_flops"] = matmul_rate(device, torch.float32, size, repeats // 4 or 1)
    write(args.out, "env.json", info)


# ---- step ------------------------------------------------------------------------------------

def model_config(name: str, smoke: bool, **changes):
    from megaloop import config

    overrides = [f"model.{k}={v}" for k, v in (TOY if smoke else {}).items()]
    overrides += [f"model.{k}={v}" for k, v in changes.items()]
    return config.load(RUNS / MODELS[name], overrides).model


@contextlib.contextmanager
def fast_attention_only(device: torch.device):
    """SDPA restricted to its flash and cuDNN kernels (flash alone on the CPU): where neither
    can run the step raises instead of silently taking the math or efficient kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION]
    if device.type == "cuda":
        backends.append(SDPBackend.CUDNN_ATTENTION)
    with sdpa_kernel(backends):
        yield


def time_steps(model, cfg, device, batch: int, warmup: int, steps: int,
               sampled: bool) -> dict:
    from megaloop.train.engine import bf16_autocast

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    seq = cfg.max_seq_len
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    times, rs = [], []
    for step in range(warmup + steps):
        r = model.recurrences_for_step(step) if sampled else cfg.recurrences
        sync(device)
        start = time.perf_counter()
        with fast_attention_only(device), bf16_autocast(device.type):
            loss = model(tokens[:, :-1], tokens[:, 1:], recurrences=r)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
            rs.append(r)
    return {"times_s": times, "recurrences": rs, "loss": float(loss)}


def measure_model(name: str, variant: str, args: argparse.Namespace, peak: float,
                  measured_peak: float) -> dict:
    from megaloop.model.accounting import account, executed_flops_per_token
    from megaloop.model.looped import LoopedLM
    from megaloop.train.parallelize import apply_compile

    device = device_of(args.smoke)
    sampled = variant == "sampled"
    changes = {"recurrence_sampling": "poisson_lognormal"} if sampled else {}
    cfg = model_config(name, args.smoke, **changes)
    torch.manual_seed(0)
    model = LoopedLM(cfg).to(device)
    if variant == "compiled":
        apply_compile(model, backend=args.compile_backend)
    start = time.perf_counter()
    timing = time_steps(model, cfg, device, args.batch, args.warmup, args.steps, sampled)
    row = {"model": name, "variant": variant, "layout": f"{cfg.prelude_layers} + "
           f"{cfg.loop_layers}x{cfg.recurrences} + {cfg.coda_layers}",
           "parameters": sum(p.numel() for p in model.parameters()),
           "tokens_per_step": args.batch * cfg.max_seq_len,
           "wall_s": time.perf_counter() - start, **timing}
    tokens = row["tokens_per_step"]
    # FLOPs of the r each step ran (sampled r differs step to step)
    flops = [tokens * account(dataclasses.replace(cfg, recurrences=r))["flops_per_token"]
             for r in timing["recurrences"]]
    executed = [tokens * executed_flops_per_token(dataclasses.replace(cfg, recurrences=r))
                for r in timing["recurrences"]]
    seconds = sum(timing["times_s"])
    row.update(median_step_s=statistics.median(timing["times_s"]),
               tokens_per_s=tokens * len(flops) / seconds,
               mfu=sum(flops) / seconds / peak, mfu_executed=sum(executed) / seconds / peak,
               of_measured_matmul=sum(executed) / seconds / measured_peak,
               executed_flops_per_s=sum(executed) / seconds)
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return row


def stage_step(args: argparse.Namespace) -> None:
    from megaloop.train.mfu import known_gpu_peak

    device = device_of(args.smoke)
    env = json.loads((args.out / "env.json").read_text()) if (args.out / "env.json").exists() \
        else {}
    measured = env.get("bf16_matmul_flops") or matmul_rate(device, torch.bfloat16, 256, 5)
    peak = measured if device.type == "cpu" else \
        known_gpu_peak(torch.cuda.get_device_name(0)) or measured
    plan = [("transformer", "eager"), ("looped", "eager"), ("hyperloop", "eager"),
            ("looped", "sampled"), ("hyperloop", "compiled"), ("transformer", "compiled")]
    rows: list[dict] = []
    report = {"peak_flops": peak, "measured_bf16_matmul_flops": measured, "batch": args.batch,
              "warmup": args.warmup, "steps": args.steps, "compile_backend": args.compile_backend,
              "rows": rows}
    for name, variant in plan:
        try:
            rows.append(measure_model(name, variant, args, peak, measured))
        except Exception as exc:  # one failed row must not cost the others
            rows.append({"model": name, "variant": variant, "error": f"{type(exc).__name__}: "
                         f"{str(exc)[:500]}", "traceback": traceback.format_exc()[-2000:]})
        write(args.out, "step.json", report)  # after every row: a timeout keeps what ran
        if device.type == "cuda":
            torch.cuda.empty_cache()
    by = {(r["model"], r["variant"]): r for r in rows if "error" not in r}
    base = by.get(("transformer", "eager"))
    for row in rows:
        if base and "error" not in row:
            row["per_executed_flop_vs_transformer"] = (row["executed_flops_per_s"]
                                                       / base["executed_flops_per_s"])
    write(args.out, "step.json", report)


# ---- rope ------------------------------------------------------------------------------------

def stage_rope(args: argparse.Namespace) -> None:
    """The d2048 Hyperloop's RoPE tables as the Engine builds the model under zero.Init with
    DeepSpeed's own bf16 (the case that rounded positions) and with megaloop's bf16."""
    from megaloop import config
    from megaloop.model.blocks import Rotary
    from megaloop.train.ds_config import render_ds_config
    from megaloop.train.engine import Engine, build_model

    overrides = [f"model.{k}={v}" for k, v in (TOY | {"max_seq_len": 2048}).items()] \
        if args.smoke else []
    cfg = config.load(RUNS / MODELS["hyperloop"], [*overrides, "train.zero_stage=3",
                                                   "train.precision=bf16", "train.micro_batch=1",
                                                   "train.global_batch=1"])
    fresh = Rotary(cfg.model.dim_per_head, cfg.model.max_seq_len, cfg.model.rope_theta)
    results = {}
    engine = Engine(cfg)  # joins the process group (NCCL on CUDA) and chooses the device
    try:
        ds_config = render_ds_config(cfg)
        ds_config["bf16"] = {"enabled": True}
        ds_config.pop("torch_autocast")
        model = build_model(cfg, ds_config, engine.device)
        model.bfloat16()  # as DeepSpeed's bf16 engine does
        results["deepspeed_bf16_zero_init"] = rope_check(model.rotary, fresh)
        del model
        engine.build()
        results["megaloop_bf16_engine"] = rope_check(engine.model.rotary, fresh)
        results["device"] = str(engine.device)
    finally:
        engine.close()
    results["ok"] = all(r["exact"] for k, r in results.items() if isinstance(r, dict))
    write(args.out, "rope.json", results)


def rope_check(rotary, fresh) -> dict:
    cos, sin = rotary.cos.cpu(), rotary.sin.cpu()
    return {"dtype": str(rotary.cos.dtype), "positions": int(cos.shape[0]),
            "exact": bool(torch.equal(cos, fresh.cos) and torch.equal(sin, fresh.sin)),
            "max_error": float((cos - fresh.cos).abs().max())}


# ---- summary ---------------------------------------------------------------------------------

def stage_summarize(args: argparse.Namespace) -> None:
    """Everything the stages wrote, with the issue's targets read off it."""
    out = args.out
    found = {name: json.loads((out / f"{name}.json").read_text())
             for name in ("env", "step", "rope") if (out / f"{name}.json").exists()}
    found["train"] = {"runs": [training_summary(path) for path in
                               sorted(Path(args.train_dir).glob("*.json"))]} \
        if args.train_dir else {}
    targets = []
    step_rows = {(r["model"], r["variant"]): r for r in found.get("step", {}).get("rows", [])
                 if "error" not in r}
    if ("hyperloop", "eager") in step_rows:
        row = step_rows[("hyperloop", "eager")]
        targets.append(("model step, Hyperloop d2048 eager: MFU >= 0.50", row["mfu"], 0.50))
    if ("hyperloop", "compiled") in step_rows:
        row = step_rows[("hyperloop", "compiled")]
        targets.append(("model step, Hyperloop d2048 compiled: MFU >= 0.50", row["mfu"], 0.50))
    if ("looped", "eager") in step_rows and "per_executed_flop_vs_transformer" in \
            step_rows[("looped", "eager")]:
        targets.append(("looped per executed FLOP vs transformer >= 0.97",
                        step_rows[("looped", "eager")]["per_executed_flop_vs_transformer"],
                        0.97))
    for run in found.get("train", {}).get("runs", []):
        if run.get("name", "").startswith("d2048") and "mfu_median" in run:
            goal = 0.45 if run["zero_stage"] == 0 else 0.40
            targets.append((f"megaloop train {run['name']}: MFU >= {goal}", run["mfu_median"],
                            goal))
    found["targets"] = [{"what": what, "value": value, "target": goal, "pass": value >= goal}
                        for what, value, goal in targets]
    write(out, "summary.json", found)


def training_summary(path: Path) -> dict:
    """One `megaloop train --json` summary: throughput as the median over the log intervals
    after the first (which holds the warm-up)."""
    summary = json.loads(path.read_text())
    intervals = summary.get("intervals", [])
    steady = intervals[1:] or intervals
    row = {"name": path.stem, "zero_stage": int(path.stem.rsplit("zero", 1)[-1]),
           "steps": summary.get("step"), "val_loss": summary.get("val/loss"),
           "device": summary.get("device"), "peak_flops": summary.get("peak_flops"),
           "peak_flops_source": summary.get("peak_flops_source"), "intervals": intervals}
    if steady:
        row.update(mfu_median=statistics.median(i["mfu"] for i in steady),
                   tokens_per_s_median=statistics.median(i["tokens_per_s"] for i in steady),
                   first_loss=intervals[0]["loss"], last_loss=intervals[-1]["loss"],
                   peak_memory_gib=max(i["peak_mem_gb"] for i in intervals))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["env", "step", "rope", "summarize"])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")))
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--compile-backend", default=None)
    parser.add_argument("--train-dir", type=Path, help="summarize: the trainings' --json files")
    args = parser.parse_args()
    defaults = {"batch": 2, "warmup": 1, "steps": 2, "compile_backend": "eager"} if args.smoke \
        else {"batch": 8, "warmup": 3, "steps": 8, "compile_backend": "inductor"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.smoke:
        torch.set_num_threads(1)
    {"env": stage_env, "step": stage_step, "rope": stage_rope,
     "summarize": stage_summarize}[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
