"""Δφ: does variant B raise what a recurrence is worth over variant A? The question the
iso-depth paper's case studies ask (truncated BPTT, hyper-connections against the plain loop).

Both sets of runs are fitted with the same law and settings. Where both hold the same (budget, r)
cells (a case study that trains the baseline's grid again with one change, and borrows its r = 1
runs), the bootstrap is paired: the i-th resample draws the same cells for A and for B, so what
the two share (the borrowed runs, a hard cell) cancels in φ_B − φ_A. Elsewhere each set's cells
are resampled on their own. The differences of the i-th resamples are draws from the bootstrap
distribution of φ_B − φ_A, whose percentile interval answers the question: an interval that
excludes 0 says the variants differ.

Where both sets carry training seeds (MLflow's train.seed, a CSV's seed column) and share two or
more, each seed is also fitted on its own (A's and B's runs of that seed) and the signs of the
per-seed Δφ are put to a two-sided sign test.
"""

from __future__ import annotations

import math

import numpy as np

from megaloop.errors import FitError
from megaloop.fit.fitter import FitResult, cells_of, fit
from megaloop.fit.inputs import Runs
from megaloop.fit.readout import LEVEL, distrust

PHI = 5  # phi's place in theta


def compare(runs_a: Runs, runs_b: Runs, *, restarts: int = 500, bootstrap: int = 200,
            seed: int = 0, names: tuple[str, str] = ("A", "B"),
            paired: bool | None = None) -> dict:
    """φ of both, φ_B − φ_A with its bootstrap interval, and what it says. `paired`: draw the
    same cells for both (default: wherever both hold the same cells; False: independently)."""
    if bootstrap < 2:
        raise FitError(f"--bootstrap {bootstrap}: Δφ's interval needs resamples; give 100 or "
                       "more.")
    cells = cells_of(runs_a)
    same_cells = cells is not None and cells == cells_of(runs_b)
    if paired and not same_cells:
        raise FitError("A paired bootstrap draws the same (budget, r) cells for both sets, but "
                       "their cells differ (or a budget is unknown): compare them unpaired.")
    paired = same_cells if paired is None else paired
    fits: list[FitResult] = []
    for runs, offset, name in ((runs_a, 0, names[0]), (runs_b, 1, names[1])):
        result = fit(runs, restarts=restarts, bootstrap=bootstrap,
                     seed=seed if paired else seed + offset, per_r=False)
        if not result.phi_identifiable:
            raise FitError(f"The runs of {name} identify no phi (no run with r > 1 and a loop): "
                           "Δφ compares two looped experiments.")
        fits.append(result)
    a, b = fits
    both = np.isfinite(a.bootstrap[:, PHI]) & np.isfinite(b.bootstrap[:, PHI])
    deltas = b.bootstrap[both, PHI] - a.bootstrap[both, PHI]
    delta = float(b.fit.theta[PHI] - a.fit.theta[PHI])
    if len(deltas) < 2:
        raise FitError(f"Only {len(deltas)} of {bootstrap} bootstrap resamples could be fitted "
                       "in both experiments: too few for an interval. Add runs.")
    tail = 100 * (1 - LEVEL) / 2
    lo, hi = (float(v) for v in np.percentile(deltas, [tail, 100 - tail]))
    excludes_zero = lo > 0 or hi < 0
    untrusted = {name: distrust(result) for name, result in zip(names, fits, strict=True)}
    summary = {
        "a": names[0], "b": names[1],
        "phi_a": float(a.fit.theta[PHI]), "phi_b": float(b.fit.theta[PHI]),
        "delta_phi": delta, "delta_phi_ci": [lo, hi], "ci_level": LEVEL,
        "excludes_zero": excludes_zero, "resamples": int(both.sum()),
        "bootstrap_unit": {names[0]: a.bootstrap_unit, names[1]: b.bootstrap_unit},
        "paired": paired,
        "n_runs": {names[0]: len(runs_a), names[1]: len(runs_b)},
        "distrust": {name: reasons for name, reasons in untrusted.items() if reasons},
        "settings": {"restarts": restarts, "bootstrap": bootstrap, "seed": seed},
    }
    shared_seeds = sorted(set(runs_a.seed_values()) & set(runs_b.seed_values()))
    if len(shared_seeds) >= 2:
        summary.update(per_seed_deltas(runs_a, runs_b, shared_seeds, restarts, names))
    summary["verdict"] = verdict(summary)
    return summary


def per_seed_deltas(runs_a: Runs, runs_b: Runs, seeds: list[float], restarts: int,
                    names: tuple[str, str]) -> dict:
    """φ_A, φ_B and Δφ fitted seed by seed, and the sign test over the seeds' Δφ."""
    rows = []
    for value in seeds:
        a, b = (fit(runs.subset(runs.seeds == value), restarts=restarts, bootstrap=0,
                    per_r=False) for runs in (runs_a, runs_b))
        phi_a, phi_b = float(a.fit.theta[PHI]), float(b.fit.theta[PHI])
        rows.append({"seed": int(value) if float(value).is_integer() else value,
                     "phi_a": phi_a, "phi_b": phi_b, "delta_phi": phi_b - phi_a,
                     "trusted": not (distrust(a) or distrust(b))})
    positive = sum(row["delta_phi"] > 0 for row in rows)
    negative = sum(row["delta_phi"] < 0 for row in rows)
    return {"per_seed": rows, "sign_test": {"positive": positive, "negative": negative,
                                            "p_two_sided": sign_test(positive, negative)}}


def sign_test(positive: int, negative: int) -> float:
    """Two-sided p of `positive` of `positive + negative` signs under a fair coin (ties
    dropped): with 3 seeds, 3 of 3 alike gives p = 0.25, the least it can."""
    n = positive + negative
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(positive, negative) + 1)) / 2**n
    return min(1.0, 2 * tail)


def verdict(s: dict) -> str:
    lo, hi = s["delta_phi_ci"]
    pairing = "paired resamples of the same cells" if s.get("paired") else \
        f"{s['resamples']} resamples of each"
    head = (f"phi({s['b']}) - phi({s['a']}) = {s['delta_phi']:+.3f} [{lo:+.3f}, {hi:+.3f}] "
            f"({100 * s['ci_level']:.0f}%, {pairing}): ")
    if "sign_test" in s:
        test = s["sign_test"]
        head += (f"seed by seed {test['positive']} up, {test['negative']} down (sign test p = "
                 f"{test['p_two_sided']:.2g}); ")
    if s["distrust"]:
        which = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in
                          s["distrust"].items())
        return head + f"not to be trusted ({which})."
    if not s["excludes_zero"]:
        return head + "the interval holds 0, so these runs show no difference in what a " \
                      "recurrence is worth."
    direction = "more" if s["delta_phi"] > 0 else "less"
    return head + f"a recurrence of {s['b']} is worth {direction} than one of {s['a']}."
