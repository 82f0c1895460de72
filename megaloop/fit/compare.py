"""Δφ: does variant B raise what a recurrence is worth over variant A? The question the
iso-depth paper's case studies ask (truncated BPTT, hyper-connections against the plain loop).

Both sets of runs are fitted with the same law and settings. The bootstrap resamples each set's
(budget, r) cells on its own (independent seeds); the difference of the i-th resample of B and
the i-th of A is then a draw from the bootstrap distribution of φ_B − φ_A, whose percentile
interval answers the question: an interval that excludes 0 says the variants differ.
"""

from __future__ import annotations

import numpy as np

from megaloop.errors import FitError
from megaloop.fit.fitter import FitResult, fit
from megaloop.fit.inputs import Runs
from megaloop.fit.readout import LEVEL, distrust

PHI = 5  # phi's place in theta


def compare(runs_a: Runs, runs_b: Runs, *, restarts: int = 500, bootstrap: int = 200,
            seed: int = 0, names: tuple[str, str] = ("A", "B")) -> dict:
    """φ of both, φ_B − φ_A with its bootstrap interval, and what it says."""
    if bootstrap < 2:
        raise FitError(f"--bootstrap {bootstrap}: Δφ's interval needs resamples; give 100 or "
                       "more.")
    fits: list[FitResult] = []
    for runs, offset, name in ((runs_a, 0, names[0]), (runs_b, 1, names[1])):
        result = fit(runs, restarts=restarts, bootstrap=bootstrap, seed=seed + offset,
                     per_r=False)
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
        "n_runs": {names[0]: len(runs_a), names[1]: len(runs_b)},
        "distrust": {name: reasons for name, reasons in untrusted.items() if reasons},
        "settings": {"restarts": restarts, "bootstrap": bootstrap, "seed": seed},
    }
    summary["verdict"] = verdict(summary)
    return summary


def verdict(s: dict) -> str:
    lo, hi = s["delta_phi_ci"]
    head = (f"phi({s['b']}) - phi({s['a']}) = {s['delta_phi']:+.3f} [{lo:+.3f}, {hi:+.3f}] "
            f"({100 * s['ci_level']:.0f}%, {s['resamples']} resamples of each): ")
    if s["distrust"]:
        which = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in
                          s["distrust"].items())
        return head + f"not to be trusted ({which})."
    if not s["excludes_zero"]:
        return head + "the interval holds 0, so these runs show no difference in what a " \
                      "recurrence is worth."
    direction = "more" if s["delta_phi"] > 0 else "less"
    return head + f"a recurrence of {s['b']} is worth {direction} than one of {s['a']}."
