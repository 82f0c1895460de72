"""How fast the phi fitter is, against a plain scipy L-BFGS-B fit with numerical gradients.

Two fits (the issue's targets):

  * joint: the 116 runs of the iso-depth paper's grid (megaloop.fit.synthetic, the paper's law,
    log-normal noise 0.004), `fit(restarts=500, bootstrap=200)` and its JSON: the free fit, the
    phi = 0 and phi = 1 comparison fits, one Chinchilla fit per r, 200 bootstrap resamples of
    (budget, r) cells. Target: under 60 s. Also timed: `megaloop fit --runs` end to end.
  * chinchilla: the 240 points of Chinchilla's Figure 4 (../shared/data/chinchilla, Epoch's
    extraction, 5 highest losses dropped) from Hoffmann's grid of 4,500 starts. Target: 30 s.

The speed-up is measured on the same work done both ways ("core"): the joint fit's 500 starts
plus its 200 resamples refitted from the same (at most 3) starts, and the 4,500 starts of the
Chinchilla fit. The plain baseline is what one would write first: a numpy Huber/LSE objective,
`scipy.optimize.minimize(method="L-BFGS-B", bounds=BOX)` without `jac` (finite differences),
one start after another, BLAS threads as the process has them. A second baseline limits BLAS
to one thread (`threadpoolctl`), to show how much of the gain is that alone; it runs on a
tenth of the starts and is extrapolated. `--quick` also runs the first baseline on a tenth.
Wall and CPU seconds are reported, and the CPU seconds other processes took meanwhile (the
machine is shared; see contention.py).

    PYTHONPATH=. python benchmarks/fit_speed.py            # ~10 min on 2 cores (baselines)
    PYTHONPATH=. python benchmarks/fit_speed.py --quick    # ~2 min
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy
from scipy.optimize import minimize

from benchmarks.contention import Monitor
from benchmarks.harness import describe, machine
from megaloop.fit import fitter
from megaloop.fit.inputs import Runs
from megaloop.fit.law import BOX, HUBER_DELTA, LawData
from megaloop.fit.synthetic import simulate

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = Path(__file__).resolve().parent / "out"
CHINCHILLA = ROOT.parent / "shared" / "data" / "chinchilla" / "svg_extracted_data.csv"


class Timer:
    """Wall and CPU seconds of the block (the fitter's own cost; harness.Timer has wall only)."""

    def __enter__(self) -> Timer:
        self._monitor = Monitor().__enter__()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu
        self._monitor.__exit__()
        self.others = self._monitor.last_other_s

    def row(self, **extra) -> dict:
        return {"wall_s": round(self.wall, 3), "cpu_s": round(self.cpu, 3),
                "others_cpu_s": None if self.others is None else round(self.others, 1), **extra}


def plain_objective(params, log_n, log_d, log_loss):
    """Epoch's formulation, as a first version would write it."""
    a, b, e, alpha, beta = params[:5]
    predicted = np.log(np.exp(a - alpha * log_n) + np.exp(b - beta * log_d) + np.exp(e))
    diff = predicted - log_loss
    return np.sum(np.where(np.abs(diff) <= HUBER_DELTA, 0.5 * diff ** 2,
                           HUBER_DELTA * (np.abs(diff) - 0.5 * HUBER_DELTA)))


def plain_looped_objective(params, data: LawData, index=None):
    phi = params[5]
    log_n = np.logaddexp(data.log_n_once, data.log_n_rec + phi * data.log_r)
    if index is not None:
        return plain_objective(params, log_n[index], data.log_tokens[index],
                               data.log_loss[index])
    return plain_objective(params, log_n, data.log_tokens, data.log_loss)


def plain_fits(objective, args_list, starts_list, bounds, stride: int,
               single_thread: bool) -> tuple[Timer, float, int]:
    """L-BFGS-B with numerical gradients from every `stride`-th (args, start) pair; the best
    objective is that of the first args (the full data; the others are bootstrap resamples)."""
    from contextlib import nullcontext

    from threadpoolctl import threadpool_limits

    pairs = [(i == 0, args, start)
             for i, (args, starts) in enumerate(zip(args_list, starts_list, strict=True))
             for start in starts][::stride]
    best = np.inf
    with threadpool_limits(1, "blas") if single_thread else nullcontext(), \
            np.errstate(all="ignore"), Timer() as timer:
        for full, args, start in pairs:
            result = minimize(objective, start[:len(bounds)], args=args, method="L-BFGS-B",
                              bounds=bounds)
            if full and np.isfinite(result.fun):
                best = min(best, result.fun)
    return timer, best, len(pairs)


def baseline(name: str, objective, args_list, starts_list, bounds, stride: int,
             single_thread: bool) -> dict:
    timer, best, count = plain_fits(objective, args_list, starts_list, bounds, stride,
                                    single_thread)
    scale = stride
    print(f"  {name}: {count} local fits in {timer.wall:.1f} s wall"
          + (f" (x{scale} extrapolated: {timer.wall * scale:.0f} s)" if scale > 1 else ""),
          flush=True)
    return timer.row(local_fits=count, extrapolation=scale, best_objective=best,
                     wall_s_full=round(timer.wall * scale, 1),
                     cpu_s_full=round(timer.cpu * scale, 1))


def joint(args) -> dict:
    runs = simulate(noise=0.004, seed=0)
    data = runs.law_data()
    out: dict = {"runs": len(runs), "restarts": 500, "bootstrap": 200}
    print("joint fit: 116 runs, 500 starts, 200 bootstrap resamples", flush=True)
    with Timer() as timer:
        summary = fitter.fit(runs, restarts=500, bootstrap=200, seed=0).to_json()
    out["full"] = timer.row(phi=summary["phi"], phi_ci=summary["phi_ci"], r2=summary["r2"])
    print(f"  full fit + JSON: {timer.wall:.1f} s wall, {timer.cpu:.1f} s CPU; phi "
          f"{summary['phi']:.4f} {summary['phi_ci']}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "runs.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["n_once", "n_rec", "recurrences", "tokens", "loss",
                             "budget_flops"])
            for i in range(len(runs)):
                writer.writerow([runs.n_once[i], runs.n_rec[i], runs.recurrences[i],
                                 float(runs.tokens[i]), float(runs.loss[i]),
                                 float(runs.budget_flops[i])])
        megaloop = Path(sys.executable).with_name("megaloop")
        with Timer() as timer:
            subprocess.run([str(megaloop), "fit", "--runs", str(path), "--json",
                            str(Path(folder) / "fit.json")], check=True, capture_output=True)
        out["cli"] = timer.row(command="megaloop fit --runs runs.csv --json fit.json")
        print(f"  megaloop fit (subprocess, defaults): {timer.wall:.1f} s wall", flush=True)
    # core: the main fit and the bootstrap, ours and plain, on the same starts
    starts = fitter.random_starts(500, 0)
    samples, _ = fitter.bootstrap_samples(runs, 200, 0)
    with Timer() as timer:
        main = fitter.fit_law(data, None, starts)
        fitter._bootstrap(data, main, None, samples)
    near = main.minima[main.minima[:, 0] <= fitter.BOOTSTRAP_NEAR * main.minima[0, 0]]
    boot_starts = near[:fitter.BOOTSTRAP_STARTS, 1:]
    out["core"] = timer.row(local_fits=len(starts) + len(samples) * len(boot_starts),
                            best_objective=main.objective)
    args_list = [(data, None)] + [(data, index) for index in samples]
    starts_list = [starts] + [boot_starts] * len(samples)
    out["plain"] = baseline("plain, default BLAS threads", plain_looped_objective, args_list,
                            starts_list, BOX, 10 if args.quick else 1, False)
    out["plain_1thread"] = baseline("plain, 1 BLAS thread", plain_looped_objective,
                                    args_list, starts_list, BOX, 10, True)
    return out


def chinchilla(args) -> dict | None:
    if not CHINCHILLA.exists():
        print(f"chinchilla: {CHINCHILLA} is absent, skipped")
        return None
    with CHINCHILLA.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    n = np.array([float(r["Model Size"]) for r in rows])
    flops = np.array([float(r["Training FLOP"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    keep = loss < np.sort(loss)[-5]
    runs = Runs(n[keep], np.zeros(keep.sum()), np.ones(keep.sum()),
                flops[keep] / (6 * n[keep]), loss[keep])
    data = runs.law_data()
    print(f"chinchilla: {len(runs)} runs, Hoffmann's 4,500-start grid", flush=True)
    with Timer() as timer:
        summary = fitter.fit(runs, restarts=0, bootstrap=0).to_json()
    out: dict = {"runs": len(runs), "starts": 4500}
    out["full"] = timer.row(**{k: summary[k] for k in ("E", "A", "B", "alpha", "beta",
                                                        "objective")})
    print(f"  full fit + JSON: {timer.wall:.1f} s wall, {timer.cpu:.1f} s CPU; E "
          f"{summary['E']:.4f} alpha {summary['alpha']:.4f} beta {summary['beta']:.4f}",
          flush=True)
    grid = fitter.hoffmann_grid()
    with Timer() as timer:
        best = fitter.fit_law(data, 0.0, grid)
    out["core"] = timer.row(local_fits=len(grid), best_objective=best.objective)
    log_args = [(np.log(n[keep]), data.log_tokens, data.log_loss)]
    out["plain"] = baseline("plain, default BLAS threads", plain_objective, log_args, [grid],
                            BOX[:5], 10 if args.quick else 1, False)
    out["plain_1thread"] = baseline("plain, 1 BLAS thread", plain_objective, log_args, [grid],
                                    BOX[:5], 10, True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="run the plain baseline on a tenth of the starts, extrapolated")
    parser.add_argument("--out", default=str(OUT_DIR / "fit_speed.json"))
    args = parser.parse_args()
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "quick": args.quick,
              "command": "PYTHONPATH=. python benchmarks/fit_speed.py"
                         + (" --quick" if args.quick else ""),
              "joint": joint(args), "chinchilla": chinchilla(args)}
    # after the timed fits: machine() imports torch and DeepSpeed, which the fitter never needs
    result["machine"] = machine(numpy=np.__version__, scipy=scipy.__version__)
    print("\n| fit | ours: full (wall / CPU) | ours: core | plain: core | speed-up (core) | "
          "plain 1-thread: core | target |")
    print("|---|---|---|---|---|---|---|")
    for name, target in (("joint", 60), ("chinchilla", 30)):
        row = result[name]
        if row is None:
            continue
        full, core, plain, one = row["full"], row["core"], row["plain"], row["plain_1thread"]
        row["speedup_core"] = round(plain["wall_s_full"] / core["wall_s"], 1)
        row["speedup_core_vs_1thread"] = round(one["wall_s_full"] / core["wall_s"], 1)
        row["target_s"], row["pass"] = target, full["wall_s"] < target
        print(f"| {name} | {full['wall_s']:.1f} s / {full['cpu_s']:.1f} s | "
              f"{core['wall_s']:.1f} s | {plain['wall_s_full']:.0f} s"
              f"{' (extrapolated)' if plain['extrapolation'] > 1 else ''} | "
              f"{row['speedup_core']:.0f}x | {one['wall_s_full']:.0f} s (extrapolated), "
              f"{row['speedup_core_vs_1thread']:.0f}x | < {target} s: "
              f"{'PASS' if row['pass'] else 'MISS'} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{describe(result['machine'])}; {result['date']}; raw: {out}")


if __name__ == "__main__":
    main()
