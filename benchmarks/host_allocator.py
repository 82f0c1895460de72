"""The CPU trainer with and without megaloop's glibc setting (keep freed memory: no mmap of
large blocks, no trim), measured on the real `megaloop train` with MLflow tracking.

Each variant trains the same run in a fresh process; the other variant is glibc's own default
behaviour, chosen with MALLOC_MMAP_MAX_=65536 (glibc's default value, which megaloop leaves as
the user set it). Reported: median step time after warm-up, minor page faults per step, and the
peak RSS at each logged step, so that a heap that keeps growing (fragmentation, since freed
memory is never returned) would show.

    PYTHONPATH=. python benchmarks/host_allocator.py [--steps 200] [--d-model 256]
"""

from __future__ import annotations

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
VARIANTS = {"megaloop (reuse freed memory)": {}, "glibc defaults": {"MALLOC_MMAP_MAX_": "65536"}}


def train(variant_env: dict[str, str], args, shards: Path, workdir: Path) -> dict:
    settings = {"model.d_model": args.d_model, "model.n_heads": args.d_model // 64,
                "train.steps": args.steps, "train.micro_batch": 8, "train.global_batch": 8,
                "train.log_interval": 10, **timed_run_settings(workdir, shards, "allocator")}
    cli_args = ["train", str(REPO / "configs/runs/tiny.yaml"), "--no-progress",
                "--peak-flops", "1e11", *set_arguments(settings)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    probe = ("import resource, runpy, sys; sys.argv = ['megaloop', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('megaloop.cli', run_name='__main__')\n"
             "finally:\n    u = resource.getrusage(resource.RUSAGE_SELF)\n"
             "    print('FAULTS', u.ru_minflt, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe, *cli_args], cwd=workdir, check=True,
                          env={**env, **variant_env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True)
    faults = int(next(line.split()[1] for line in done.stderr.splitlines()
                      if line.startswith("FAULTS")))
    client, run = only_run(str(settings["track.tracking_uri"]), "allocator")
    history = {name: metric_values(client, run, name)
               for name in ("train/tokens_per_s", "train/peak_mem_gib")}
    tokens_per_step = 8 * 256
    step_s = [tokens_per_step / rate for rate in history["train/tokens_per_s"][2:]]
    return {"step_s_median": statistics.median(step_s),
            "minor_faults_per_step": faults / args.steps,
            "peak_rss_gb_by_log": history["train/peak_mem_gib"],
            "host_allocator_tag": run.data.tags.get("megaloop.host_allocator")}


def main() -> None:
    parser = harness.parser(__doc__, "host_allocator")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--d-model", type=int, default=256)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = stdlib_shards(Path(tmp) / "shards")
        for name, env in VARIANTS.items():
            workdir = Path(tmp) / f"v{len(results)}"
            workdir.mkdir()
            results[name] = train(env, args, shards, workdir)
    reuse, system = (results[name] for name in VARIANTS)
    harness.write_report(args.json, {
        "model": {"layout": "tiny.yaml (1 + 2x2 + 1)", "d_model": args.d_model,
                  "batch": [8, 256], "steps": args.steps},
        "variants": results,
        "step_time_ratio_reuse_vs_glibc": reuse["step_s_median"] / system["step_s_median"]})


if __name__ == "__main__":
    main()
