"""The two papers' findings on a 2-core CPU, with seeds and intervals (issue 28), in one command:

    PYTHONPATH=. python benchmarks/cpu_findings.py [--work runs/cpu-findings] [--jobs 2]
        [--out benchmarks/figures/cpu-findings] [--skip-training]

1. The iso-depth case studies: `configs/sweeps/cpu-findings-plain.yaml` (the baseline, 144 runs:
   r 1, 2, 4, 8 x 3 budgets x 4 widths x 3 seeds), `-lanes` (the paper's K = 2 lanes) and
   `-truncbptt` (k = ceil(r/2)), each 108 looped runs borrowing the baseline's r = 1. Each arm's
   phi with its 95% bootstrap interval over (budget, r) cells (all seeds pooled), and each case
   study's Δφ against the baseline with a paired interval (the same cells drawn for both) and
   Δφ seed by seed with its sign test (megaloop.fit.compare).
2. The Hyperloop paper's Table 1: `configs/sweeps/cpu-findings-table1.yaml` (Transformer, mHC,
   Looped, Hyperloop with the output and the update write; 3 seeds; equal tokens): the mean and
   standard deviation of the final val/loss per model, and whether Hyperloop beats Looped and
   matches the Transformer outside the seed spread (the seeds' ranges do not overlap).

Each sweep runs as `megaloop sweep SPEC --jobs N` in `--work` (MLflow in work/runs/mlflow.db; a
sweep run again skips its finished runs, so an interrupted set resumes), timed. The results go to
`--out`: findings.json, phi.png/svg (phi per arm), delta_phi.png/svg (Δφ with its interval and the
seeds' points) and table1.png/svg (val/loss per model with the seeds' points).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "configs" / "sweeps"
BASELINE = "cpu-findings-plain"
CASE_STUDIES = {"cpu-findings-lanes": ("lanes, K = 2", "+0.19 (0.46 -> 0.65)"),
                "cpu-findings-truncbptt": ("truncated BPTT, k = ceil(r/2)",
                                           "-0.08 (0.46 -> 0.38)")}
TABLE = "cpu-findings-table1"
TABLE_MODELS = ["transformer", "mhc", "looped", "hyperloop", "hyperloop-update"]


def run_sweep(name: str, work: Path, jobs: int) -> float:
    """`megaloop sweep` of one spec in `work`; its wall seconds."""
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (work / f"{name}.log").open("a") as log:
        done = subprocess.run([sys.executable, "-m", "megaloop.cli", "sweep",
                               str(SWEEPS / f"{name}.yaml"), "--jobs", str(jobs),
                               "--no-progress"], cwd=work, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"sweep {name} failed (exit {done.returncode}): see {work}/{name}.log")
    return time.monotonic() - start


def lanes_overhead() -> dict:
    """The lanes' parameters against the loop block's, over the lanes runs (the smaller the
    share, the less of Δφ is the lanes' own capacity)."""
    from megaloop.model.accounting import account
    from megaloop.sweep.plan import plan, read_spec

    shares = []
    for run in plan(read_spec(SWEEPS / "cpu-findings-lanes.yaml")):
        counts = account(run.config.model)
        shares.append(counts["hyper"] / counts["loop"])
    return {"lanes_over_loop_block_min": min(shares), "lanes_over_loop_block_max": max(shares)}


def iso_depth(tracking: str) -> dict:
    from megaloop.fit import fit
    from megaloop.fit.compare import compare
    from megaloop.fit.inputs import read_mlflow

    runs = {name: read_mlflow(name, tracking=tracking) for name in [BASELINE, *CASE_STUDIES]}
    arms = {}
    for name, arm_runs in runs.items():
        summary = fit(arm_runs).to_json()
        arms[name] = {"phi": summary["phi"], "phi_ci": summary["phi_ci"], "r2": summary["r2"],
                      "trusted": summary["trusted"], "distrust": summary["distrust"],
                      "n_runs": summary["n_runs"], "in_short": summary["in_short"]}
    deltas = {name: compare(runs[BASELINE], runs[name], names=(BASELINE, name))
              for name in CASE_STUDIES}
    return {"arms": arms, "delta_phi": deltas, **lanes_overhead()}


def table1(tracking: str) -> dict:
    from megaloop.track import find_runs

    losses: dict[str, list[float]] = {model: [] for model in TABLE_MODELS}
    params: dict[str, int] = {}
    for run in find_runs(TABLE, tracking=tracking):
        model = run["name"].rsplit("-seed", 1)[0]
        losses[model].append(run["metrics"]["val/loss"])
        params[model] = int(float(run["params"]["n_once"]) + float(run["params"]["n_rec"]))
    rows = {model: {"mean": statistics.mean(v), "std": statistics.stdev(v), "seeds": v,
                    "non_embedding_parameters": params[model]}
            for model, v in losses.items() if len(v) >= 2}

    def below(a: str, b: str) -> bool:  # every seed of a under every seed of b
        return max(rows[a]["seeds"]) < min(rows[b]["seeds"])

    def overlaps(a: str, b: str) -> bool:
        return max(rows[a]["seeds"]) >= min(rows[b]["seeds"]) and \
            max(rows[b]["seeds"]) >= min(rows[a]["seeds"])

    claims = {}
    for write in ("hyperloop", "hyperloop-update"):
        if write in rows and "looped" in rows and "transformer" in rows:
            claims[write] = {"beats_looped_outside_seed_spread": below(write, "looped"),
                             "below_transformer_outside_seed_spread": below(write, "transformer"),
                             "matches_transformer_within_seed_spread": overlaps(write,
                                                                                "transformer")}
    return {"rows": rows, "claims": claims}


def plots(found: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name):
        for suffix in ("png", "svg"):
            fig.savefig(out / f"{name}.{suffix}", dpi=130, bbox_inches="tight")
        plt.close(fig)

    iso = found.get("iso_depth")
    if iso:
        names = list(iso["arms"])
        phi = [iso["arms"][n]["phi"] for n in names]
        lo = [p - iso["arms"][n]["phi_ci"][0] for n, p in zip(names, phi, strict=True)]
        hi = [iso["arms"][n]["phi_ci"][1] - p for n, p in zip(names, phi, strict=True)]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.errorbar(range(len(names)), phi, yerr=[lo, hi], fmt="o", capsize=4)
        ax.set_xticks(range(len(names)), [n.replace("cpu-findings-", "") for n in names])
        ax.axhline(0, color="grey", lw=0.5)
        ax.axhline(1, color="grey", lw=0.5, ls="--")
        ax.set_ylabel("phi (95% bootstrap interval)")
        save(fig, "phi")
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for i, d in enumerate(iso["delta_phi"].values()):
            lo_, hi_ = d["delta_phi_ci"]
            ax.bar(i, d["delta_phi"], color="#8ab", width=0.5)
            ax.errorbar(i, d["delta_phi"], yerr=[[d["delta_phi"] - lo_], [hi_ - d["delta_phi"]]],
                        color="k", capsize=4)
            seeds = [row["delta_phi"] for row in d.get("per_seed", [])]
            ax.plot([i + 0.3] * len(seeds), seeds, "k.", alpha=0.7)
        ax.set_xticks(range(len(iso["delta_phi"])),
                      [n.replace("cpu-findings-", "") for n in iso["delta_phi"]])
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_ylabel("delta phi vs plain (paired 95%; dots: seeds)")
        save(fig, "delta_phi")
    table = found.get("table1")
    if table:
        rows = table["rows"]
        fig, ax = plt.subplots(figsize=(6.5, 3.2))
        for i, model in enumerate(rows):
            ax.bar(i, rows[model]["mean"], color="#bca", width=0.6)
            ax.plot([i] * len(rows[model]["seeds"]), rows[model]["seeds"], "k.")
        means = [r["mean"] for r in rows.values()]
        spread = max(max(r["seeds"]) for r in rows.values()) - min(means)
        ax.set_ylim(min(min(r["seeds"]) for r in rows.values()) - spread,
                    max(max(r["seeds"]) for r in rows.values()) + 0.3 * spread)
        ax.set_xticks(range(len(rows)), list(rows), rotation=15)
        ax.set_ylabel("final val/loss (dots: seeds)")
        save(fig, "table1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "cpu-findings")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "figures" /
                        "cpu-findings")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--skip-training", action="store_true",
                        help="fit and tabulate the runs already in --work")
    parser.add_argument("--only", choices=["iso-depth", "table1"], help="one of the two parts")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tracking = f"sqlite:///{(args.work / 'runs' / 'mlflow.db').resolve()}"
    sweeps = ([] if args.only == "table1" else [BASELINE, *CASE_STUDIES]) + \
        ([] if args.only == "iso-depth" else [TABLE])
    seconds = {}
    if not args.skip_training:
        for name in sweeps:
            seconds[name] = run_sweep(name, args.work, args.jobs)
            print(f"{name}: {seconds[name] / 60:.1f} min", flush=True)
    found: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "sweep_seconds": seconds, "jobs": args.jobs}
    started = time.monotonic()
    if args.only != "table1":
        found["iso_depth"] = iso_depth(tracking)
    if args.only != "iso-depth":
        found["table1"] = table1(tracking)
    found["analysis_seconds"] = time.monotonic() - started
    (args.out / "findings.json").write_text(json.dumps(found, indent=2, default=str))
    plots(found, args.out)
    print(json.dumps(found, indent=2, default=str)[:6000])


if __name__ == "__main__":
    main()
