"""The real `megaloop train` step at two commits, in alternating fresh processes: what a change to
the trainer buys.

    PYTHONPATH=. python benchmarks/trainer_ab.py --base HEAD~1 --head HEAD [--rounds 2]
        [--steps 60] [--d-model 512] [--batch 8] [--set model.recurrences=8 ...]

Each commit is checked out into a temporary git worktree. Every run is the same `megaloop train`
of that worktree's configs/runs/tiny.yaml at the given width and batch (sequences of 256 tokens)
on the embedded corpus's shards, prepared once with the current checkout, with MLflow on a sqlite
store. The step time is read back from `train/tokens_per_s`, leaving out the first two logged
intervals (warm-up). Base and head alternate round by round, so that drifts of the machine fall
on both; the ratio is the median over rounds of head / base.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import harness
from benchmarks.trainer_runs import (
    metric_values,
    only_run,
    set_arguments,
    stdlib_shards,
    timed_run_settings,
)

REPO = Path(__file__).resolve().parents[1]
LOG_INTERVAL = 10


def worktree(rev: str, path: Path) -> str:
    """Check `rev` out at `path`; returns its commit hash."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(path),
                    rev], check=True, capture_output=True, text=True)
    return subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()


def train(tree: Path, shards: Path, workdir: Path, args: argparse.Namespace) -> float:
    """One `megaloop train` run of the code in `tree`; the median step time in seconds."""
    settings = {"model.d_model": args.d_model, "model.n_heads": max(args.d_model // 64, 1),
                "train.steps": args.steps, "train.micro_batch": args.batch,
                "train.global_batch": args.batch, "train.log_interval": LOG_INTERVAL,
                **timed_run_settings(workdir, shards, "ab"),
                **dict(item.split("=", 1) for item in args.set)}
    command = [sys.executable, "-m", "megaloop.cli", "train", str(tree / "configs/runs/tiny.yaml"),
               "--no-progress", "--peak-flops", "1e11", *set_arguments(settings)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run(command, cwd=workdir, env=env, check=True, capture_output=True, text=True)
    client, run = only_run(str(settings["track.tracking_uri"]), "ab")
    rates = metric_values(client, run, "train/tokens_per_s", after_step=2 * LOG_INTERVAL)
    return statistics.median(args.batch * 256 / rate for rate in rates)


def main() -> None:
    parser = harness.parser(__doc__, "trainer_ab")
    parser.add_argument("--base", default="HEAD~1", help="the commit to compare against")
    parser.add_argument("--head", default="HEAD", help="the commit with the change")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="sequences of 256 tokens per step")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for both commits' runs (repeatable)")
    args = parser.parse_args()
    if args.steps <= 3 * LOG_INTERVAL:
        raise SystemExit(f"--steps must exceed {3 * LOG_INTERVAL}: the first two logged "
                         "intervals are warm-up")
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"base": Path(tmp) / "base", "head": Path(tmp) / "head"}
        try:
            commits = {side: worktree(getattr(args, side), path) for side, path in trees.items()}
            shards = stdlib_shards(Path(tmp) / "shards")
            steps: dict[str, list[float]] = {"base": [], "head": []}
            for round_ in range(args.rounds):
                for side, tree in trees.items():
                    workdir = Path(tmp) / f"{side}{round_}"
                    workdir.mkdir()
                    steps[side].append(train(tree, shards, workdir, args))
                    print(f"round {round_ + 1} {side} ({commits[side]}): "
                          f"{steps[side][-1]:.4f} s/step", file=sys.stderr)
        finally:
            for path in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                                str(path)], capture_output=True)
    ratios = [h / b for b, h in zip(steps["base"], steps["head"], strict=True)]
    harness.write_report(args.json, {
        "commits": commits, "d_model": args.d_model, "batch": args.batch, "steps": args.steps,
        "overrides": args.set, "step_s": steps, "head_over_base": ratios,
        "head_over_base_median": statistics.median(ratios)})


if __name__ == "__main__":
    main()
