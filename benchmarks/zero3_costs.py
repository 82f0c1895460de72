"""What ZeRO-3 costs two of megaloop's features, on the CPU (DeepSpeed with gloo).

1. train.compile under ZeRO-3. ZeRO-3 gathers each submodule's parameters in forward hooks that
   DeepSpeed marks `torch.compiler.disable`. torch._dynamo.explain counts the graphs and graph
   breaks of one compiled loop block at ZeRO-0 and at ZeRO-3, and one process times the step
   eager and with `apply_compile` at both stages and compares their losses on one batch (the
   trainer warns of compile at ZeRO-3 with these figures).

2. Sampled r under ZeRO-3. ZeRO-3 records the order in which modules fetch their parameters on
   a step and prefetches along it; a step with another r runs another order and discards the
   trace. Two ranks (torchrun) train with fixed r and with Poisson log-normal r of the same
   mean, at ZeRO-3 and at ZeRO-2 (which keeps whole parameters and has no trace); throughput is
   the trainer's own MFU against one fixed peak (so: FLOPs of the r each step ran over its
   time), median over the steps after the warm-up; DeepSpeed's trace-cache warnings are
   counted.

    PYTHONPATH=. python benchmarks/zero3_costs.py [--steps 30] [--d-model 256] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.trainer_runs import set_arguments, stdlib_shards

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "runs" / "tiny.yaml"
FIXED_PEAK = 1e12  # every run's MFU against the same peak: proportional to its FLOP/s
RANKS = 2


def model_settings(args: argparse.Namespace) -> dict[str, object]:
    return {"model.d_model": args.d_model, "model.n_heads": args.d_model // 64,
            "model.prelude_layers": 1, "model.loop_layers": 2, "model.coda_layers": 1,
            "model.recurrences": 3, "model.max_seq_len": args.seq}


# ---- 1. compile -----------------------------------------------------------------------------

def compile_costs(args: argparse.Namespace) -> dict:
    import torch

    from megaloop import config
    from megaloop.train.engine import Engine, join_process_group, leave_process_group
    from megaloop.train.parallelize import apply_compile

    *_, created = join_process_group()
    results = {}
    try:
        for stage in (0, 3):
            settings = {**model_settings(args), "train.zero_stage": stage,
                        "train.micro_batch": args.batch, "train.global_batch": args.batch}
            cfg = config.load(TINY, [f"{k}={v}" for k, v in settings.items()])
            row = {}
            for variant in ("eager", "compiled"):
                engine = Engine(cfg).build()
                model = engine.model
                if variant == "compiled":
                    torch._dynamo.reset()
                    block = model.loop[0]
                    x = torch.randn(args.batch, args.seq, args.d_model)
                    explained = torch._dynamo.explain(block)(x, model.rotary(args.seq, x.dtype))
                    row["graphs"] = explained.graph_count
                    row["graph_breaks"] = explained.graph_break_count
                    row["break_reasons"] = sorted({str(r.reason).splitlines()[0][:160]
                                                   for r in explained.break_reasons})
                    torch._dynamo.reset()
                    apply_compile(model)
                generator = torch.Generator().manual_seed(0)  # the same batch for both
                tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1),
                                       generator=generator)
                times, losses = [], []
                for step in range(args.compile_warmup + args.compile_steps):
                    start = time.perf_counter()
                    loss = engine.forward_backward(tokens[:, :-1], tokens[:, 1:], 3)
                    engine.optimizer_step(1e-3)
                    losses.append(float(loss))
                    if step >= args.compile_warmup:
                        times.append(time.perf_counter() - start)
                row[f"{variant}_step_s"] = statistics.median(times)
                row[f"{variant}_losses"] = losses
                engine.close()
            row["compiled_over_eager"] = row["compiled_step_s"] / row["eager_step_s"]
            row["largest_loss_difference"] = max(
                abs(a - b) for a, b in zip(row["eager_losses"], row["compiled_losses"],
                                           strict=True))
            results[f"zero{stage}"] = row
            print(f"compile at ZeRO-{stage}: {row}", file=sys.stderr, flush=True)
    finally:
        leave_process_group(created)
    return results


# ---- 2. sampled r ----------------------------------------------------------------------------

def traced_template(folder: Path, stage: int) -> Path:
    """Our ZeRO template with DeepSpeed's trace-cache warnings switched on."""
    text = (REPO / "ds_configs" / f"zero{stage}.json.j2").read_text()
    text = text.replace(f'"stage": {stage},', f'"stage": {stage},\n    '
                        '"log_trace_cache_warnings": true,', 1)
    path = folder / f"zero{stage}-traced.json.j2"
    path.write_text(text)
    return path


def sampled_run(args: argparse.Namespace, stage: int, sampling: str, shards: Path,
                folder: Path) -> dict:
    name = f"zero{stage}-{sampling}"
    summary = folder / f"{name}.json"
    settings = {**model_settings(args), "model.recurrence_sampling": sampling,
                "train.zero_stage": stage, "train.ds_config": traced_template(folder, stage),
                "train.steps": args.steps, "train.log_interval": 1,
                "train.micro_batch": args.batch, "train.global_batch": 2 * args.batch,
                "train.eval_interval": 10**6, "train.checkpoint_interval": 10**6,
                "train.checkpoint_dir": folder / f"ckpt-{name}", "data.shards": shards,
                "data.verify": False, "track.enabled": False}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={RANKS}",
            "-m", "megaloop.cli", "train", str(TINY), "--no-progress", "--json", str(summary),
            "--peak-flops", str(FIXED_PEAK),
            *set_arguments(settings)]
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}
    done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
    intervals = json.loads(summary.read_text())["intervals"][args.warmup:]
    output = done.stdout + done.stderr
    mfu = statistics.median(i["mfu"] for i in intervals)
    return {"flops_per_s_median": FIXED_PEAK * RANKS * mfu,
            "tokens_per_s_median": statistics.median(i["tokens_per_s"] for i in intervals),
            "steps_measured": len(intervals),
            "trace_invalidations": output.count("Invalidate trace cache")}


def sampling_costs(args: argparse.Namespace, folder: Path) -> dict:
    shards = stdlib_shards(folder / "shards")
    results = {}
    for stage in (2, 3):
        for sampling in ("fixed", "poisson_lognormal"):
            results[f"zero{stage}_{sampling}"] = row = sampled_run(args, stage, sampling, shards,
                                                                   folder)
            print(f"ZeRO-{stage} {sampling}: {row}", file=sys.stderr, flush=True)
        results[f"zero{stage}_sampled_over_fixed"] = (
            results[f"zero{stage}_poisson_lognormal"]["flops_per_s_median"]
            / results[f"zero{stage}_fixed"]["flops_per_s_median"])
    results["prefetch_cost"] = 1 - (results["zero3_sampled_over_fixed"]
                                    / results["zero2_sampled_over_fixed"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    parser.add_argument("--steps", type=int, default=30, help="steps of each sampled-r run")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the medians")
    parser.add_argument("--compile-warmup", type=int, default=2)
    parser.add_argument("--compile-steps", type=int, default=10)
    parser.add_argument("--skip", choices=["compile", "sampling"], action="append", default=[])
    parser.add_argument("--json", default="benchmarks/out/zero3_costs.json")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from benchmarks.harness import machine

    torch.set_num_threads(2)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "PYTHONPATH=. python benchmarks/zero3_costs.py " + " ".join(sys.argv[1:]),
              "machine": machine(),
              "settings": vars(args)}
    if "compile" not in args.skip:
        result["compile"] = compile_costs(args)
    if "sampling" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            result["sampled_recurrences"] = sampling_costs(args, Path(tmp))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
