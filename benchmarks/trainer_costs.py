"""Costs of the trainer on this CPU, measured in one run:

1. ZeRO-3 against ZeRO-0 on two ranks: the same run (the tiny model's layout, r = 2, at each of
   `--zero-widths`) trained through `launch.sh --nproc 2` at both stages; step time from the
   logged tokens/s (median after the first steps).
2. Checkpoint save and load time against model size: megaloop's Checkpoints (DeepSpeed engine
   state with AdamW's moments after one step, loader, RNG, each file hashed as it is written,
   write-then-rename, fsync, marker) for models of increasing width, one process, ZeRO-0.
   References in the same run: DeepSpeed's own save of the same state (its checkpoint engine:
   no hash, no rename, no fsync), and the time a second read to hash the saved files would
   add. The load includes the verification of every file against the marker.

    PYTHONPATH=. python benchmarks/trainer_costs.py [--steps 30] [--json OUT]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
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
TINY = REPO / "configs" / "runs" / "tiny.yaml"


def width_settings(width: int) -> dict[str, int]:
    return {"model.d_model": width, "model.n_heads": max(1, width // 64)}


def zero_run(stage: int, width: int, steps: int, shards: Path, workdir: Path) -> float:
    """Median seconds per optimizer step of a two-rank run at ZeRO `stage`."""
    workdir.mkdir(parents=True, exist_ok=True)
    settings = {**width_settings(width), "train.zero_stage": stage, "train.steps": steps,
                "train.micro_batch": 4, "train.global_batch": 8, "train.log_interval": 1,
                "data.verify": "false", **timed_run_settings(workdir, shards, f"zero{stage}")}
    argv = [str(REPO / "launch.sh"), "train", str(TINY), "--nproc", "2", "--no-progress",
            *set_arguments(settings)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    subprocess.run(argv, check=True, cwd=workdir, env=env, capture_output=True)
    client, run = only_run(str(settings["track.tracking_uri"]), f"zero{stage}")
    tokens_per_step = 8 * 256
    rates = metric_values(client, run, "train/tokens_per_s", after_step=3)
    return statistics.median(tokens_per_step / rate for rate in rates)


def deepspeed_own_save(engine, folder: Path, state: dict) -> float:
    """Seconds of DeepSpeed's save of the same state through its own checkpoint engine (the
    reference: megaloop's Engine wraps it, `CheckpointFiles`)."""
    ds, files = engine._ds, engine._files  # a benchmark may look inside the Engine
    ds.checkpoint_engine = files._inner
    try:
        start = time.perf_counter()
        ds.save_checkpoint(str(folder), tag="step_00000001", client_state={"megaloop": state},
                           save_latest=False)
        return time.perf_counter() - start
    finally:
        ds.checkpoint_engine = files


def checkpoint_costs(widths: list[int], shards: Path, workdir: Path) -> list[dict]:
    """Save and load time of a complete checkpoint for models of several widths."""
    import torch

    from megaloop import config
    from megaloop.atomic import file_digest
    from megaloop.train.checkpoint import Checkpoints
    from megaloop.train.engine import Engine, join_process_group, leave_process_group

    rows = []
    *_, created = join_process_group()
    for width in widths:
        overrides = [f"{k}={v}" for k, v in width_settings(width).items()]
        cfg = config.load(TINY, [*overrides, f"data.shards={shards}", "train.steps=1",
                                 "train.micro_batch=1", "train.global_batch=1"])
        engine = Engine(cfg).build()
        params = engine.parameter_count()
        tokens = torch.randint(0, cfg.model.vocab_size, (1, cfg.model.max_seq_len + 1))
        engine.forward_backward(tokens[:, :-1], tokens[:, 1:], cfg.model.recurrences)
        engine.optimizer_step(cfg.train.lr)  # so that the optimizer holds its moments
        checkpoints = Checkpoints(workdir / f"d{width}", keep=1, engine=engine)
        state = {"step": 0, "loader": {}, "mlflow_run_id": None, "config": cfg.to_dict(),
                 "config_hash": cfg.hash()}
        start = time.perf_counter()
        folder = checkpoints.save(1, state)
        saved = time.perf_counter() - start
        files = [p for p in folder.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        start = time.perf_counter()
        for file in files:
            file_digest(file)
        rehash = time.perf_counter() - start
        deepspeed_save = deepspeed_own_save(engine, workdir / f"ds{width}", state)
        start = time.perf_counter()
        checkpoints.load("auto")
        loaded = time.perf_counter() - start
        rows.append({"d_model": width, "parameters": params, "bytes": size, "save_s": saved,
                     "deepspeed_save_s": deepspeed_save, "second_read_hash_s": rehash,
                     "save_over_deepspeed": saved / deepspeed_save,
                     "load_s": loaded, "save_mb_per_s": size / saved / 1e6,
                     "load_mb_per_s": size / loaded / 1e6})
        engine.close()
    leave_process_group(created)
    return rows


def main() -> None:
    parser = harness.parser(__doc__, "trainer_costs")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--zero-widths", default="128,512", help="'' to skip this part")
    parser.add_argument("--widths", default="128,256,512,1024")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = stdlib_shards(tmp / "shards")
        zero = []
        for width in (int(w) for w in args.zero_widths.split(",") if w):
            times = {f"zero{stage}": zero_run(stage, width, args.steps, shards,
                                              (tmp / f"z{stage}_{width}").resolve())
                     for stage in (0, 3)}
            zero.append({"d_model": width, **times, "ratio": times["zero3"] / times["zero0"]})
        widths = [int(w) for w in args.widths.split(",")]
        checkpoints = checkpoint_costs(widths, shards, tmp / "ckpt")
    harness.write_report(args.json, {"two_ranks_step_s": zero, "checkpoints": checkpoints})


if __name__ == "__main__":
    main()
