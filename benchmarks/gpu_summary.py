"""summary.json of benchmarks/gpu_session.sh, rewritten after every stage (plain json, no torch:
it runs in a fraction of a second, so that a session cut off at any point leaves a summary).

    python benchmarks/gpu_summary.py --out DIR [--stage NAME --rc RC --seconds S --limit L]
                                     [--train-dir DIR] [--budget S]

It records the stage that just ended (name, exit status, seconds, limit), merges the training
runs' `megaloop train --json` files of `--train-dir` into DIR/train.json (that folder is
temporary; the device returns only $OUT's files), and writes DIR/summary.json: every stage's
record, env/tests/step/rope/train as the stages wrote them, and the issue's targets read off
them. `ok` is false while a stage has failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

PARTS = ("env", "tests", "step", "rope", "train")
STEP_MFU_TARGET = 0.50  # the model step alone, of the dense bf16 peak
TRAIN_MFU_TARGETS = {0: 0.45, 3: 0.40}  # megaloop train at ZeRO-0 and ZeRO-3
LOOPED_PER_FLOP_TARGET = 0.97  # looped r = 4 against the transformer, per executed FLOP


def write_json(path: Path, data: Any) -> None:
    """Write then rename: a reader (or a cut-off) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def training_summary(name: str, summary: dict[str, Any]) -> dict[str, Any]:
    """One `megaloop train --json` summary: throughput as the median over the log intervals
    after the first (which holds the warm-up)."""
    intervals = summary.get("intervals", [])
    steady = intervals[1:] or intervals
    row = {"name": name, "zero_stage": int(name.rsplit("zero", 1)[-1]),
           "steps": summary.get("step"), "val_loss": summary.get("val/loss"),
           "device": summary.get("device"), "peak_flops": summary.get("peak_flops"),
           "peak_flops_source": summary.get("peak_flops_source"), "intervals": intervals}
    if steady:
        reserved = [i["peak_mem_reserved_gib"] for i in intervals
                    if i.get("peak_mem_reserved_gib") is not None]
        row.update(mfu_median=statistics.median(i["mfu"] for i in steady),
                   mfu_causal_median=statistics.median(i["mfu_causal"] for i in steady),
                   tokens_per_s_median=statistics.median(i["tokens_per_s"] for i in steady),
                   first_loss=intervals[0]["loss"], last_loss=intervals[-1]["loss"],
                   peak_memory_allocated_gib=max(i["peak_mem_gib"] for i in intervals),
                   peak_memory_reserved_gib=max(reserved) if reserved else None)
    return row


def merge_training(out: Path, train_dir: Path | None) -> None:
    """DIR/train.json: every finished training run of `train_dir`, each as `training_summary`."""
    if train_dir is None or not train_dir.is_dir():
        return
    runs = []
    for path in sorted(train_dir.glob("*.json")):
        summary = read_json(path)
        if isinstance(summary, dict):
            runs.append(training_summary(path.stem, summary))
    write_json(out / "train.json", {"runs": runs})


def targets(found: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its value and whether it is met (MFU in the papers'
    convention, attention counted in full; the causal figure beside it)."""
    checks = []
    rows = {(r["model"], r["variant"]): r for r in (found.get("step") or {}).get("rows", [])
            if "error" not in r}
    for model in ("transformer", "hyperloop"):
        row = rows.get((model, "eager"))
        if row:
            checks.append({"what": f"model step, {model} d2048 eager: MFU >= {STEP_MFU_TARGET}",
                           "value": row["mfu"], "causal": row.get("mfu_causal"),
                           "target": STEP_MFU_TARGET})
    looped = rows.get(("looped-r4", "eager"))
    if looped and "per_executed_flop_vs_transformer" in looped:
        checks.append({"what": "looped r=4 per executed FLOP vs transformer >= "
                               f"{LOOPED_PER_FLOP_TARGET}",
                       "value": looped["per_executed_flop_vs_transformer"],
                       "target": LOOPED_PER_FLOP_TARGET})
    for run in (found.get("train") or {}).get("runs", []):
        if run["name"].startswith("d2048") and "mfu_median" in run:
            goal = TRAIN_MFU_TARGETS[run["zero_stage"]]
            checks.append({"what": f"megaloop train {run['name']}: MFU >= {goal}",
                           "value": run["mfu_median"], "causal": run["mfu_causal_median"],
                           "target": goal})
    for check in checks:
        check["pass"] = check["value"] >= check["target"]
    return checks


def summarize(out: Path, stage: dict[str, Any] | None, budget: float | None) -> dict[str, Any]:
    summary = read_json(out / "summary.json") or {}
    stages = [s for s in summary.get("stages", []) if stage is None or s["name"] != stage["name"]]
    if stage is not None:
        stages.append(stage)
    found: dict[str, Any] = {"stages": stages}
    if budget is not None or "budget_s" in summary:
        found["budget_s"] = budget if budget is not None else summary["budget_s"]
    for part in PARTS:
        data = read_json(out / f"{part}.json")
        if data is not None:
            found[part] = data
    found["targets"] = targets(found)
    found["ok"] = all(s["rc"] == 0 for s in stages)
    found["seconds"] = sum(s["seconds"] for s in stages)
    write_json(out / "summary.json", found)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stage", help="the stage that just ended")
    parser.add_argument("--rc", type=int, default=0, help="its exit status")
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--limit", type=float)
    parser.add_argument("--train-dir", type=Path)
    parser.add_argument("--budget", type=float, help="the session's time budget, seconds")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    merge_training(args.out, args.train_dir)
    stage = None if args.stage is None else {"name": args.stage, "rc": args.rc,
                                             "seconds": args.seconds, "limit": args.limit}
    summarize(args.out, stage, args.budget)


if __name__ == "__main__":
    main()
