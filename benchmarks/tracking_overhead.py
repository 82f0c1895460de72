"""What MLflow tracking costs a training step: megaloop.track on an sqlite store, CPU, fp32.

Times forward + backward + AdamW steps of the tiny LoopedLM (configs/runs/tiny.yaml, batch 8 x
seq 256) without tracking and with 6 metrics logged every step through a `Tracker` (the worst
case: log_interval = 1), in interleaved blocks so that machine noise falls on both alike. Both
modes compute the same values (loss.item(), grad norm); only `log_metrics` differs. Reported:

  * end to end: mean step time with / without tracking (the tracked blocks also pay the flush
    that ends each block, so no sending spills into a baseline block), over all blocks and over
    the round pairs in which no other process took CPU time (benchmarks/contention.py);
  * direct cost: over consecutive tracked steps (metrics sent as in training, no forced
    flush), the time spent in `log_metrics` on the training thread (as a fraction of the
    fastest tenth of the baseline steps) plus the CPU time of the sending thread (its own CPU
    clock) per second of wall time, and its bound: CPU per log_batch call x at most one call per
    second. This is what tracking adds, unblurred by the noise of a shared machine, and an upper
    bound: it counts the sending thread as if it stalled training;
  * a stress test without a model: 6 metrics x 20000 steps logged as fast as possible, giving
    the cost per logged value on either thread.

    PYTHONPATH=. python benchmarks/tracking_overhead.py            # ~3 min on 2 quiet cores
    PYTHONPATH=. python benchmarks/tracking_overhead.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.contention import Monitor
from benchmarks.harness import describe, machine
from megaloop import config as cfg
from megaloop.model import build
from megaloop.model.accounting import account
from megaloop.track import open_tracker

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = Path(__file__).resolve().parent / "out"
TARGET = 0.02  # tracking may cost at most 2% of a step
INTERVAL_S = 1.0  # the Tracker sends at most one batch per second below 1000 values per second


def sender_cpu(tracker) -> float:
    """CPU seconds the tracker's sending thread has used (Linux: its pthread CPU clock)."""
    thread = tracker._sender._thread
    if not thread.is_alive():
        return 0.0
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def train(steps: int, rounds: int, steady_steps: int, uri: str) -> dict:
    run = cfg.load(ROOT / "configs/runs/tiny.yaml", [f"track.tracking_uri={uri}",
                                                      "track.experiment=overhead"])
    torch.manual_seed(0)
    model = build(run.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    batch = torch.randint(0, run.model.vocab_size, (8, 257))
    acc = account(run.model)
    derived = {"n_once": acc["n_once"], "n_rec": acc["n_rec"], "tokens": 0, "budget_flops": 0,
               "flops_per_token": acc["flops_per_token"]}
    tracker = open_tracker(run, rank=0, world_size=1, derived=derived)
    off_steps: list[float] = []
    call_s, step = 0.0, 0

    def one_step(track: bool) -> None:
        nonlocal call_s, step
        start = time.perf_counter()
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        values = {"train/loss": loss.item(), "train/lr": 3e-4, "train/grad_norm": norm.item(),
                  "train/tokens_per_s": 8 * 256 / max(time.perf_counter() - start, 1e-9),
                  "train/mfu": 0.0, "train/peak_mem_gib": 0.0}
        if track:
            called = time.perf_counter()
            tracker.log_metrics(values, step=step)
            call_s += time.perf_counter() - called
        else:
            off_steps.append(time.perf_counter() - start)
        step += 1

    one_step(False)  # warm-up, not counted
    off_steps.clear()
    # 1. end to end: interleaved blocks (ABBA), each tracked block ends with a flush
    monitor, rounds_s = Monitor(), []
    for round_ in range(rounds):
        rounds_s.append({})
        for track in ((False, True) if round_ % 2 == 0 else (True, False)):
            start = time.perf_counter()
            with monitor:
                for _ in range(steps):
                    one_step(track)
                if track:
                    flushed = time.perf_counter()
                    tracker.flush()
                    rounds_s[-1]["flush"] = time.perf_counter() - flushed
            rounds_s[-1]["on" if track else "off"] = time.perf_counter() - start
            rounds_s[-1]["contended"] = rounds_s[-1].get("contended", False) or (
                (monitor.last_other_s or 0.0) > monitor.threshold_s * steps)
    clean = [r for r in rounds_s if not r["contended"]]
    # 2. direct cost in steady state: consecutive tracked steps, sent as training would
    call_s, cpu_before = 0.0, sender_cpu(tracker)
    batches_before, start = tracker._sender.batches, time.perf_counter()
    for _ in range(steady_steps):
        one_step(True)
    steady_wall = time.perf_counter() - start
    thread_cpu = sender_cpu(tracker) - cpu_before
    batches = tracker._sender.batches - batches_before
    start = time.perf_counter()
    tracker.finish("FINISHED")
    finish_s = time.perf_counter() - start
    quiet_step = statistics.quantiles(off_steps, n=10)[0]  # the fastest tenth: least disturbed
    return {
        "baseline_steps": len(off_steps), "metrics_per_step": 6,
        "step_s_median": statistics.median(off_steps), "step_s_p10": quiet_step,
        "rounds": rounds, "steps_per_block": steps, "uncontended_rounds": len(clean),
        "end_to_end_overhead": sum(r["on"] for r in rounds_s) / sum(r["off"] for r in rounds_s)
        - 1,
        "end_to_end_overhead_median_round": statistics.median(
            r["on"] / r["off"] for r in rounds_s) - 1,
        "end_to_end_overhead_uncontended": sum(r["on"] for r in clean) / sum(
            r["off"] for r in clean) - 1 if len(clean) >= 3 else None,
        "flush_s_per_block_median": statistics.median(r["flush"] for r in rounds_s),
        "rounds_s": rounds_s,
        "steady_steps": steady_steps, "steady_log_batch_calls": batches,
        "log_metrics_s_per_step": call_s / steady_steps,
        "sender_cpu_s_per_step": thread_cpu / steady_steps, "finish_s": finish_s,
        "steady_wall_s": steady_wall, "sender_cpu_s_per_batch": thread_cpu / max(batches, 1),
        # the training thread's share, and the sender's CPU per second of training as if it
        # stalled training (an upper bound: on >= 2 cores it mostly runs beside it)
        "caller_overhead": call_s / steady_steps / quiet_step,
        "sender_overhead": thread_cpu / steady_wall,
        "sender_overhead_bound": thread_cpu / max(batches, 1) / INTERVAL_S,
        "direct_overhead": call_s / steady_steps / quiet_step + thread_cpu / steady_wall,
    }


def stress(n_steps: int, uri: str) -> dict:
    run = cfg.load(ROOT / "configs/runs/tiny.yaml", [f"track.tracking_uri={uri}",
                                                      "track.experiment=stress"])
    tracker = open_tracker(run, rank=0, world_size=1, derived={})
    cpu_before = sender_cpu(tracker)
    start = time.perf_counter()
    for step in range(n_steps):
        tracker.log_metrics({f"train/m{i}": float(step + i) for i in range(6)}, step=step)
    calls = time.perf_counter() - start
    tracker.flush()
    total = time.perf_counter() - start
    thread_cpu = sender_cpu(tracker) - cpu_before
    batches = tracker._sender.batches
    tracker.finish("FINISHED")
    values = 6 * n_steps
    return {"values": values, "log_batch_calls": batches,
            "caller_us_per_value": 1e6 * calls / values,
            "sender_cpu_us_per_value": 1e6 * thread_cpu / values,
            "values_per_s_sent": values / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="steps per block")
    parser.add_argument("--rounds", type=int, default=16, help="blocks per mode, interleaved")
    parser.add_argument("--steady-steps", type=int, default=40,
                        help="consecutive tracked steps for the direct cost")
    parser.add_argument("--stress-steps", type=int, default=20000)
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds, args.steady_steps, args.stress_steps = 2, 2, 4, 2000
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        start = time.perf_counter()
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=uri).search_experiments()  # a new store: its migrations
        migrate_s = time.perf_counter() - start
        result = {"train": train(args.steps, args.rounds, args.steady_steps, uri),
                  "stress": stress(args.stress_steps, uri)}
    result.update({"new_store_s": migrate_s, "target": TARGET, "machine": machine(),
                   "date": datetime.date.today().isoformat(),
                   "command": "PYTHONPATH=. python benchmarks/tracking_overhead.py"
                              + (" --quick" if args.quick else "")})
    OUT_DIR.mkdir(exist_ok=True)
    name = "tracking_overhead_quick.json" if args.quick else "tracking_overhead.json"
    (OUT_DIR / name).write_text(json.dumps(result, indent=2) + "\n")
    t, s = result["train"], result["stress"]
    print(f"machine: {describe(result['machine'])}, {result['date']}")
    print(f"step without tracking: median {1e3 * t['step_s_median']:.0f} ms, fastest tenth "
          f"{1e3 * t['step_s_p10']:.0f} ms over {t['baseline_steps']} steps")
    clean = t["end_to_end_overhead_uncontended"]
    print(f"end to end ({t['rounds']} rounds of {t['steps_per_block']}-step blocks): "
          f"{100 * t['end_to_end_overhead']:+.2f}% in all, median round "
          f"{100 * t['end_to_end_overhead_median_round']:+.2f}%, "
          + ("too few uncontended rounds" if clean is None else
             f"{100 * clean:+.2f}% over {t['uncontended_rounds']} uncontended rounds")
          + f"; flush ending a block: median {1e3 * t['flush_s_per_block_median']:.0f} ms")
    print(f"direct cost over {t['steady_steps']} consecutive tracked steps "
          f"({t['steady_wall_s']:.0f} s, {t['steady_log_batch_calls']} log_batch calls): "
          f"{1e6 * t['log_metrics_s_per_step']:.1f} us per step in log_metrics "
          f"({100 * t['caller_overhead']:.3f}% of a fast step) + sender CPU "
          f"{1e3 * t['sender_cpu_s_per_batch']:.1f} ms per batch = "
          f"{100 * t['sender_overhead']:.2f}% of the wall time (at most "
          f"{100 * t['sender_overhead_bound']:.2f}% at one batch per second); total "
          f"{100 * t['direct_overhead']:.2f}% (target < {100 * TARGET:.0f}%); "
          f"finish {1e3 * t['finish_s']:.0f} ms once")
    print(f"stress: {s['values']} values in {s['log_batch_calls']} log_batch calls, "
          f"{s['caller_us_per_value']:.2f} us/value on the caller, "
          f"{s['sender_cpu_us_per_value']:.1f} us/value sender CPU, "
          f"{s['values_per_s_sent']:.0f} values/s sent")
    print(f"a new sqlite store (MLflow migrations) took {migrate_s:.1f} s once")


if __name__ == "__main__":
    main()
