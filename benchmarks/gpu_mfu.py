"""MFU of the real trainer on one GPU: the d=2048 Hyperloop model in bf16 with ZeRO-3, flash-attn
against PyTorch SDPA (trainer issue; target: at least 50% MFU on an H200).

Each attention backend trains in a fresh `megaloop train` process (world size 1, DeepSpeed
ZeRO-3, tracking off: the run's `--json` summary holds every log interval, so no MLflow store
is needed). MFU is the trainer's own: training FLOPs per token from the accounting times
tokens/s over the device's dense bf16 peak (megaloop/train/mfu.py's table: 989 TFLOP/s for an
H100 or H200 SXM), in both conventions: `mfu` counts attention in full (the papers' FLOPs,
PaLM's MFU), `mfu_causal` its causal half. Reported: the medians over the log intervals after
`--warmup` steps, tokens/s, and peak memory allocated and reserved (GiB).

The data must match the model's 32,000-piece vocabulary. Prepare it once (on any machine; the
shards of the embedded corpus are about 16 MB) and pass the folder:

    megaloop tokenizer train --corpus stdlib --vocab-size 32000 --out /tmp/sp32k.model
    megaloop data prepare --corpus stdlib --tokenizer /tmp/sp32k.model --out shards-32k
    PYTHONPATH=. python benchmarks/gpu_mfu.py --shards shards-32k [--steps 30] [--json OUT]

`--quick` is a smoke run of this script on the CPU (tiny model, fp32, ZeRO-0, SDPA only, the
default tokenizer's shards prepared on the fly): it checks the harness, not a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import harness
from benchmarks.trainer_runs import set_arguments, stdlib_shards

REPO = Path(__file__).resolve().parents[1]
PAPER_MODEL = REPO / "configs" / "runs" / "hyperloop-d2048-hyperloop.yaml"
MFU_TARGET = 0.50


def backends(quick: bool) -> list[str]:
    """flash-attn where it can run (installed, CUDA), and always PyTorch SDPA."""
    if quick:
        return ["sdpa"]
    import torch

    usable = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    return ["flash", "sdpa"] if usable else ["sdpa"]


def settings_for(args: argparse.Namespace, attention: str, shards: Path,
                 workdir: Path) -> dict[str, object]:
    settings: dict[str, object] = {
        "model.attention": attention, "train.precision": args.precision,
        "train.zero_stage": args.zero_stage, "train.steps": args.steps,
        "train.micro_batch": args.micro_batch, "train.global_batch": args.micro_batch,
        "train.warmup_steps": 1, "train.log_interval": 1,
        "model.activation_checkpointing": args.checkpointing, "data.verify": False,
        "train.eval_interval": 10**6, "train.eval_batches": 1,
        "train.checkpoint_interval": 10**6, "data.shards": str(shards),
        "train.checkpoint_dir": str(workdir / "ckpt"), "track.enabled": False,
    }
    if args.quick:
        settings["model.max_seq_len"] = 128
    return settings


def train_once(config: Path, settings: dict[str, object], workdir: Path, warmup: int) -> dict:
    workdir.mkdir(parents=True)
    summary_path = workdir / "summary.json"
    argv = [sys.executable, "-m", "megaloop.cli", "train", str(config), "--no-progress",
            "--json", str(summary_path), *set_arguments(settings)]
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}
    done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"training with {settings['model.attention']} failed:\n"
                         f"{done.stderr[-4000:]}")
    summary = json.loads(summary_path.read_text())
    intervals = [i for i in summary["intervals"] if i["step"] > warmup]

    def median(key: str) -> float:
        return statistics.median(i[key] for i in intervals)

    reserved = [i["peak_mem_reserved_gib"] for i in summary["intervals"]
                if i.get("peak_mem_reserved_gib") is not None]
    return {"mfu": median("mfu"), "mfu_causal": median("mfu_causal"),
            "tokens_per_s": median("tokens_per_s"),
            "peak_mem_gib": max(i["peak_mem_gib"] for i in summary["intervals"]),
            "peak_mem_reserved_gib": max(reserved) if reserved else None,
            "peak_flops": summary["peak_flops"], "peak_source": summary["peak_flops_source"],
            "device": summary["device"], "steps_measured": len(intervals)}


def main() -> None:
    parser = harness.parser(__doc__, "gpu_mfu")
    parser.add_argument("--config", type=Path, default=PAPER_MODEL)
    parser.add_argument("--shards", type=Path, help="prepared shards of the model's vocabulary")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="logged steps left out")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--zero-stage", type=int, default=3)
    parser.add_argument("--checkpointing", default="none",
                        help="model.activation_checkpointing: none, per_recurrence, per_layer")
    parser.add_argument("--quick", action="store_true", help="a CPU smoke run of the harness")
    args = parser.parse_args()
    if args.quick:
        args.config = REPO / "configs" / "runs" / "tiny.yaml"
        args.precision, args.zero_stage, args.micro_batch = "fp32", 0, 2
        args.steps, args.warmup = min(args.steps, 6), min(args.warmup, 2)
    elif args.shards is None:
        parser.error("--shards is required (see the module docstring for how to prepare them), "
                     "or --quick for a CPU smoke run")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = stdlib_shards(tmp / "shards") if args.quick else args.shards.resolve()
        results = {attention: train_once(args.config, settings_for(args, attention, shards,
                                                                   tmp / attention),
                                         tmp / attention, args.warmup)
                   for attention in backends(args.quick)}
    report = {"device": next(iter(results.values()))["device"],
              "config": str(args.config.relative_to(REPO)),
              "settings": {k: str(v) if isinstance(v, Path) else v
                           for k, v in vars(args).items()},
              "results": results,
              "target": {"mfu_at_least": MFU_TARGET,
                         "met": {k: r["mfu"] >= MFU_TARGET for k, r in results.items()}}}
    if "flash" in results:
        report["flash_vs_sdpa_tokens_per_s"] = (results["flash"]["tokens_per_s"]
                                                / results["sdpa"]["tokens_per_s"])
    harness.write_report(args.json, report, quiet=True)
    print(f"{report['device']}, {report['config']}, {args.precision}, ZeRO-{args.zero_stage}, "
          f"micro batch {args.micro_batch}")
    print("| attention | MFU (attention in full) | MFU (causal) | tokens/s | peak allocated |")
    print("|---|---|---|---|---|")
    for attention, r in results.items():
        print(f"| {attention} | {r['mfu']:.1%} | {r['mfu_causal']:.1%} | "
              f"{r['tokens_per_s']:,.0f} | {r['peak_mem_gib']:.1f} GiB |")


if __name__ == "__main__":
    main()
