"""MuonH against AdamW on a CPU-sized run: the validation loss at equal tokens, and the step time.

Both train configs/runs/tiny.yaml (d 128, 1 + 2x2 + 1) on the embedded corpus for the same
steps and tokens, in fresh `megaloop train` processes that alternate round by round, and
validate on the same fixed set (train.eval_tokens). AdamW is megaloop's default recipe (lr
3e-3 cosine to 3e-4 after a warm-up, weight decay 0.1, clip 1.0); MuonH takes the iso-depth
paper's optimizer settings (matrix lr 0.014, AdamW groups at the paper's lrs x (d/640)^-0.5 with
betas 0.8/0.95 and eps 1e-10, no weight decay, no warm-up, linear decay to 0.1x, no clipping).
`muonh` changes only the optimizer and its schedule (the model keeps megaloop's init and
norms); `muonh_paper_model` adds the paper's model details (configs/recipes/isodepth.yaml's
model section: its init, the norms after the embedding and after every recurrence, QK-norm
without gains after RoPE where QK-norm is on), so it is the paper's recipe at tiny scale;
`adamw_paper_model` is megaloop's AdamW on that model, which separates the optimizer's effect
from the model's.

    PYTHONPATH=. python benchmarks/optimizer_compare.py [--steps 300] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.trainer_runs import set_arguments, stdlib_shards
from megaloop.atomic import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "runs" / "tiny.yaml"
D_MODEL = 128
WIDTH_FACTOR = (D_MODEL / 640) ** -0.5

RECIPES: dict[str, dict[str, object]] = {
    "adamw": {"train.optimizer": "adamw", "train.lr": 3e-3, "train.min_lr": 3e-4,
              "train.warmup_steps": 20, "train.schedule": "cosine", "train.grad_clip": 1.0},
    "muonh": {"train.optimizer": "muonh", "train.matrix_lr": 0.014,
              "train.lr": 0.005 * WIDTH_FACTOR, "train.min_lr": 0.0005 * WIDTH_FACTOR,
              "train.embedding_lr": 0.3 * WIDTH_FACTOR,
              "train.unembedding_lr": 0.004 * WIDTH_FACTOR,
              "train.norm_lr": 0.005 * WIDTH_FACTOR,
              "train.beta1": 0.8, "train.beta2": 0.95, "train.eps": 1e-10,
              "train.weight_decay": 0.0, "train.warmup_steps": 0, "train.schedule": "linear",
              "train.grad_clip": 0.0},
}
PAPER_MODEL = {"model.init": "isodepth", "model.embedding_norm": True,
               "model.recurrence_norm": "every", "model.qk_norm_mode": "free_after_rope"}
RECIPES["muonh_paper_model"] = {**RECIPES["muonh"], **PAPER_MODEL}
RECIPES["adamw_paper_model"] = {**RECIPES["adamw"], **PAPER_MODEL}  # separates the two effects


def train(name: str, shards: Path, workdir: Path, args: argparse.Namespace) -> dict:
    summary = workdir / "summary.json"
    settings = {"train.steps": args.steps, "train.micro_batch": 8, "train.global_batch": 8,
                "train.log_interval": 10, "train.eval_interval": 10**6,
                "train.eval_tokens": 64 * 256, "train.checkpoint_interval": 10**6,
                "train.checkpoint_dir": workdir / "ckpt", "data.shards": shards,
                "data.verify": False, "track.enabled": False, **RECIPES[name]}
    command = [sys.executable, "-m", "megaloop.cli", "train", str(TINY), "--no-progress",
               "--json", str(summary), *set_arguments(settings)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(summary.read_text())
    intervals = result["intervals"][2:]  # the first two are warm-up
    return {"val_loss": result["val/loss"], "val_bpb": result["val/bpb"],
            "train_loss_last": result["intervals"][-1]["loss"],
            "step_s": statistics.median(8 * 256 / i["tokens_per_s"] for i in intervals)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=str(REPO / "benchmarks/out/optimizer_compare.json"))
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {name: [] for name in RECIPES}
    with tempfile.TemporaryDirectory() as tmp:
        shards = stdlib_shards(Path(tmp) / "shards")
        for round_ in range(args.rounds):
            for name in RECIPES:
                workdir = Path(tmp) / f"{name}{round_}"
                workdir.mkdir()
                runs[name].append(train(name, shards, workdir, args))
                print(f"round {round_ + 1} {name}: {runs[name][-1]}", file=sys.stderr)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "PYTHONPATH=. python benchmarks/optimizer_compare.py "
                         + " ".join(sys.argv[1:]),
              "steps": args.steps, "tokens": args.steps * 8 * 256, "recipes": RECIPES,
              "runs": runs,
              "muonh_over_adamw_step_s": statistics.median(
                  m["step_s"] / a["step_s"] for m, a in zip(runs["muonh"], runs["adamw"],
                                                            strict=True)),
              "paper_model_over_adamw_step_s": statistics.median(
                  m["step_s"] / a["step_s"]
                  for m, a in zip(runs["muonh_paper_model"], runs["adamw"], strict=True))}
    atomic_write_json(args.json, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
