"""Fit the looped law by Huber-on-log minimisation from many starts, with bootstrap intervals.

The procedure (RESEARCH.md section 2, Chinchilla's "approach 3"):

- Objective: sum over runs of Huber_1e-3(LSE(a - alpha log N_eff, b - beta log D, e) - log L),
  analytic gradients (law.py), minimised within the paper's box (law.BOX), divided by delta.
- Starts: `restarts` points drawn uniformly from the box (seeded); a fit of the Chinchilla form
  (runs where phi cannot be identified) adds Hoffmann et al.'s grid of 4,500 starts:
  alpha, beta in {0, 0.5, 1, 1.5, 2}, e in {-1, -0.5, 0, 0.5, 1}, a, b in {0, 5, ..., 25}.
- Two passes: every start is first advanced by a batched, box-projected L-BFGS (batch.py: all
  starts in one array, ~1 s for thousands); the POLISH best distinct minima are then polished by
  scipy's L-BFGS-B with tight tolerances, and the best of those is the fit.
- Comparison: the phi = 0 and phi = 1 fits (and a --fix-phi value) use the same starts plus the
  free fit's minima, and the free fit is re-polished from their optima should one of them end
  lower, so phi free always nests the fixed values.
- Bootstrap: resample (budget, r) cells with replacement when every run's budget is known (at
  least 4 cells), else runs; each resample (integer weights on the runs) is refitted from the
  full fit's best BOOTSTRAP_STARTS distinct minima within BOOTSTRAP_NEAR of its objective, not
  from every start (the resampled optimum lies near the full one, and all resamples advance
  together), then polished by L-BFGS-B; percentile intervals of every parameter.
- One Chinchilla fit (N = N_once + N_rec) per r, from the minima of the joint fits and the
  first PER_R_STARTS random starts.
- A free parameter that ends on the edge of the box is reported with a warning.

Everything is seeded: the same runs, settings and seed give the same numbers.
"""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from megaloop.errors import FitError
from megaloop.fit.batch import minimize_batch
from megaloop.fit.inputs import Runs
from megaloop.fit.law import (
    BOX,
    HUBER_DELTA,
    TERMS,
    LawData,
    Objective,
    batch_objective,
    on_edge,
    predict_log_loss,
    unidentified_terms,
)
from megaloop.fit.readout import result_json

POLISH = 8  # distinct minima of the batched pass polished by scipy's L-BFGS-B
PER_R_STARTS = 100  # random starts of each per-r fit (plus the joint fits' minima)
BOOTSTRAP_STARTS = 3  # at most this many distinct minima of the full fit start each resample,
BOOTSTRAP_NEAR = 2.0  # those whose objective is within this factor of the best
SCREEN_OPTIONS = {"max_iter": 300, "ftol": 1e-10, "gtol": 1e-6}  # batched pass (objective/delta)
POLISH_OPTIONS = {"maxiter": 5000, "ftol": 1e-13, "gtol": 1e-10}  # scipy L-BFGS-B
BATCH_ELEMENTS = 1_500_000  # (starts x runs) per batched array, to bound memory


def hoffmann_grid() -> np.ndarray:
    """Hoffmann et al.'s 4,500 starts as rows (a, b, e, alpha, beta, phi = 0)."""
    alphas = betas = np.arange(0, 2.5, 0.5)
    es, sizes = np.arange(-1, 1.5, 0.5), np.arange(0, 30, 5)
    rows = [(a, b, e, alpha, beta, 0.0)
            for alpha, beta, e, a, b in itertools.product(alphas, betas, es, sizes, sizes)]
    return np.array(rows, dtype=float)


def random_starts(count: int, seed: int) -> np.ndarray:
    """`count` points uniform in the box (all six parameters), reproducible from `seed`."""
    rng = np.random.default_rng([seed, 0])
    return BOX[:, 0] + rng.random((count, 6)) * (BOX[:, 1] - BOX[:, 0])


@contextmanager
def _single_threaded_blas():
    """L-BFGS-B calls LAPACK on tiny matrices every iteration: with OpenBLAS threads on a busy
    machine each call costs a millisecond instead of microseconds (a 40x slower polish)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it the fit is the same, only slower on busy machines
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _screen(data: LawData, phi: float | None, starts: np.ndarray,
            weights: np.ndarray | None = None) -> np.ndarray:
    """The batched pass from every start: rows (objective, a, b, e, alpha, beta, phi)."""
    k = 6 if phi is None else 5
    out = np.empty((len(starts), 7))
    chunk = max(1, BATCH_ELEMENTS // max(len(data), 1))
    for lo in range(0, len(starts), chunk):
        part = slice(lo, lo + chunk)
        w = None if weights is None else weights[part]

        def batch(X, rows, w=w):
            return batch_objective(X, data, phi, None if w is None else w[rows],
                                   scale=1.0 / HUBER_DELTA)

        X, F, _ = minimize_batch(batch, starts[part, :k], BOX[:k, 0], BOX[:k, 1],
                                 **SCREEN_OPTIONS)
        out[part, 0] = np.where(np.isfinite(F), F * HUBER_DELTA, math.inf)
        out[part, 1:k + 1] = X
        if phi is not None:
            out[part, 6] = phi
    return out


def _polish(data: LawData, phi: float | None, starts: np.ndarray,
            options: dict = POLISH_OPTIONS) -> np.ndarray:
    """scipy's L-BFGS-B from each start: rows (objective, a, b, e, alpha, beta, phi)."""
    objective = Objective(data, phi, scale=1.0 / HUBER_DELTA)
    bounds = BOX[:objective.n_free]
    out = np.empty((len(starts), 7))
    for i, start in enumerate(starts):
        x0 = np.clip(start[:objective.n_free], bounds[:, 0], bounds[:, 1])
        result = minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                          options=options)
        value = result.fun * HUBER_DELTA
        out[i, 0] = value if np.isfinite(value) else math.inf
        out[i, 1:] = objective.theta(result.x)
    return out


def _distinct_minima(found: np.ndarray, keep: int = POLISH) -> np.ndarray:
    """The best rows of `found` that differ from every better one in objective (relative 1e-6)
    or in some parameter (by 0.05), best first."""
    chosen: list[np.ndarray] = []
    for row in found[np.argsort(found[:, 0], kind="stable")]:
        if not np.isfinite(row[0]) or len(chosen) == keep:
            break
        if all(abs(row[0] - other[0]) > 1e-6 * abs(other[0])
               or np.max(np.abs(row[1:] - other[1:])) > 0.05 for other in chosen):
            chosen.append(row)
    return np.array(chosen).reshape(-1, 7)


@dataclass
class LawFit:
    """One law fitted to one set of runs."""

    theta: np.ndarray  # (a, b, e, alpha, beta, phi); phi as fixed when it was not free
    objective: float
    free_phi: bool
    minima: np.ndarray  # distinct local minima, best first: rows (objective, *theta)
    n_starts: int

    @property
    def n_free(self) -> int:
        return 6 if self.free_phi else 5


def fit_law(data: LawData, phi: float | None, starts: np.ndarray) -> LawFit:
    """The best minimum from `starts` (rows of six; the phi column is unused when fixed)."""
    with _single_threaded_blas():
        found = _screen(data, phi, starts)
        if not np.any(np.isfinite(found[:, 0])):
            raise FitError(f"No start of the fit reached a finite objective ({len(data)} runs): "
                           "check that losses are in nats per token and sizes in parameters "
                           "and tokens.")
        candidates = _distinct_minima(found)
        polished = _polish(data, phi, candidates[:, 1:])
    minima = _distinct_minima(np.concatenate([polished, candidates]))
    return LawFit(theta=minima[0, 1:].copy(), objective=float(minima[0, 0]),
                  free_phi=phi is None, minima=minima, n_starts=len(starts))


def edge_warnings(fit: LawFit) -> list[str]:
    """A warning per free parameter that ended on the edge of the box."""
    return [f"{name} = {value:.4g} lies on the edge of the search box [{lo:g}, {hi:g}]: the "
            "optimum may be outside it, or the runs may not constrain this parameter. Add runs "
            "that vary it (more sizes, budgets or recurrences) before trusting the fit."
            for name, value, (lo, hi) in on_edge(fit.theta, fit.n_free)]


def term_warnings(fit: LawFit, data: LawData) -> list[str]:
    """A warning per term of the law that the runs do not constrain (law.unidentified_terms)."""
    return [f"the {term} term changes the predicted loss by at most {100 * variation:.2g}% "
            f"across the runs: it is switched off or constant, so the runs do not constrain "
            f"{TERMS[term]}. Add runs that vary "
            f"{'the model size' if term == 'size' else 'the tokens'} (more sizes, budgets or "
            "recurrences) before trusting the fit."
            for term, variation in unidentified_terms(fit.theta, data)]


def cells_of(runs: Runs) -> list[tuple[float, float]] | None:
    """The (budget, r) cells of the runs, sorted, where every budget is known; else None.
    Two sets of runs with the same cells draw the same cells from the same bootstrap seed."""
    if not runs.budgets_known:
        return None
    return sorted({(float(c), float(r)) for c, r in zip(runs.budget_flops, runs.recurrences,
                                                       strict=True)})


def bootstrap_samples(runs: Runs, count: int, seed: int) -> tuple[list[np.ndarray], str]:
    """Index arrays of `count` resamples: of (budget, r) cells when every budget is known and
    there are 4 cells or more, else of runs. Returns the resamples and the unit."""
    rng = np.random.default_rng([seed, 1])
    if runs.budgets_known:
        keys = np.stack([runs.budget_flops, runs.recurrences], axis=1)
        _, cell = np.unique(keys, axis=0, return_inverse=True)
        cell = cell.ravel()
        members = [np.flatnonzero(cell == c) for c in range(cell.max() + 1)]
        if len(members) >= 4:
            picks = rng.integers(0, len(members), size=(count, len(members)))
            return [np.concatenate([members[c] for c in row]) for row in picks], "cell"
    return list(rng.integers(0, len(runs), size=(count, len(runs)))), "run"


def _bootstrap(data: LawData, main: LawFit, phi: float | None,
               samples: list[np.ndarray]) -> np.ndarray:
    """Refitted thetas, one row per resample (NaN where the resample cannot be fitted)."""
    out = np.full((len(samples), 6), np.nan)
    usable = [i for i, index in enumerate(samples)
              if len(np.unique(index)) > main.n_free
              and (phi is not None or data.take(np.unique(index)).phi_identifiable)]
    if not usable:
        return out
    near = main.minima[main.minima[:, 0] <= BOOTSTRAP_NEAR * main.minima[0, 0]]
    starts = near[:BOOTSTRAP_STARTS, 1:]
    weights = np.stack([np.bincount(samples[i], minlength=len(data)) for i in usable])
    with _single_threaded_blas():
        found = _screen(data, phi, np.tile(starts, (len(usable), 1)),
                        np.repeat(weights.astype(float), len(starts), axis=0))
        found = found.reshape(len(usable), len(starts), 7)
        best = found[np.arange(len(usable)), np.argmin(found[:, :, 0], axis=1)]
        for row, i in zip(best, usable, strict=True):
            out[i] = _polish(data.take(samples[i]), phi, row[None, 1:])[0, 1:]
    return out


@dataclass
class FitResult:
    """A fit of some runs: the chosen law, its comparisons, bootstrap and per-r fits."""

    runs: Runs
    law: str  # "looped" | "looped, phi fixed" | "chinchilla"
    fit: LawFit
    comparison: dict[str, LawFit]  # "free", "0", "1" (and a fixed value) when identifiable
    per_r: dict[float, LawFit]
    bootstrap: np.ndarray  # (resamples, 6) thetas of the main law (NaN rows: not fitted)
    bootstrap_unit: str
    settings: dict
    warnings: list[str] = field(default_factory=list)

    @property
    def phi_identifiable(self) -> bool:
        return self.law != "chinchilla"

    def predicted_loss(self, theta=None) -> np.ndarray:
        return np.exp(predict_log_loss(self.fit.theta if theta is None else theta,
                                       self.runs.law_data()))

    def to_json(self) -> dict:
        return result_json(self)


def _check_size(runs: Runs, n_free: int, what: str) -> None:
    if len(runs) < n_free + 1:
        raise FitError(f"{len(runs)} runs cannot fit {what} ({n_free} free parameters): a fit "
                       f"needs at least {n_free + 1} runs. Add finished runs"
                       + (", or fix phi (--fix-phi) to fit 5 parameters." if n_free == 6
                          else "."))


def fit(runs: Runs, *, fix_phi: float | None = None, restarts: int = 500, bootstrap: int = 200,
        seed: int = 0, per_r: bool = True, grid: bool | None = None) -> FitResult:
    """Fit the looped law to `runs` (see the module docstring): phi free unless `fix_phi`;
    the Chinchilla form with N = N_once + N_rec where phi cannot be identified. `grid` adds
    Hoffmann's 4,500 starts (default: for the Chinchilla form only); `per_r` adds one
    Chinchilla fit per r."""
    if restarts < 0 or bootstrap < 0:
        raise FitError(f"restarts ({restarts}) and bootstrap ({bootstrap}) must be >= 0.")
    data = runs.law_data()
    warnings: list[str] = []
    identifiable = data.phi_identifiable
    if identifiable:
        law = "looped" if fix_phi is None else "looped, phi fixed"
        main_phi = None if fix_phi is None else float(fix_phi)
        _check_size(runs, 6 if fix_phi is None else 5, f"the {law} law")
    else:
        law, main_phi = "chinchilla", 0.0
        if fix_phi is not None:
            warnings.append(f"phi fixed at {fix_phi:g} has no effect: no run has both n_rec > 0 "
                            "and recurrences > 1, so every phi gives the same law.")
        _check_size(runs, 5, "the Chinchilla law")
    grid = not identifiable if grid is None else grid
    starts = np.concatenate([hoffmann_grid()] * grid + [random_starts(restarts, seed)])
    if len(starts) == 0:
        raise FitError("The fit has no starting points: give --restarts 1 or more.")
    variants = [main_phi]
    if identifiable:  # the comparison: phi free (where the runs allow it), 0 and 1
        free = [None] if len(runs) >= 7 else []
        variants = list(dict.fromkeys([*free, 0.0, 1.0, main_phi]))
    fits: dict = {}
    for phi in variants:  # free first: its minima seed the fixed fits
        extra = [fits[None].minima[:, 1:]] if phi is not None and None in fits else []
        fits[phi] = fit_law(data, phi, np.concatenate([starts, *extra]))
    if None in fits and len(fits) > 1:
        best_fixed = min((f for p, f in fits.items() if p is not None), key=lambda f: f.objective)
        if best_fixed.objective < fits[None].objective:  # free must nest every fixed phi
            again = fit_law(data, None, np.concatenate([best_fixed.minima[:, 1:],
                                                        fits[None].minima[:, 1:]]))
            again.n_starts += fits[None].n_starts
            fits[None] = again
    main = fits[main_phi]
    warnings += edge_warnings(main) + term_warnings(main, data)
    per_r_fits = {}
    per_r_starts = np.concatenate([main.theta[None], *(f.minima[:, 1:] for f in fits.values()),
                                   starts[:PER_R_STARTS]])
    few = []
    for r in sorted(set(runs.recurrences.tolist())) if per_r and identifiable else []:
        index = np.flatnonzero(runs.recurrences == r)
        if len(index) < 6:
            few.append(f"{r:g}")
            continue
        per_r_fits[r] = fit_law(data.take(index), 0.0, per_r_starts)
    if few:
        warnings.append(f"No per-r Chinchilla fit for r = {', '.join(few)}: fewer than 6 runs "
                        "at that r.")
    samples, unit = bootstrap_samples(runs, bootstrap, seed)
    thetas = _bootstrap(data, main, main_phi, samples)
    missing = int(np.isnan(thetas[:, 0]).sum())
    if missing:
        warnings.append(f"{missing} of {bootstrap} bootstrap resamples could not be fitted "
                        "(too few distinct runs, or no looped run, in the resample); the "
                        "intervals use the others.")
    comparison = ({("free" if p is None else f"{p:g}"): f for p, f in fits.items()}
                  if identifiable else {})
    settings = {"restarts": restarts, "starts": len(starts), "bootstrap": bootstrap,
                "seed": seed, "fix_phi": fix_phi, "huber_delta": HUBER_DELTA,
                "hoffmann_grid": grid, "polished_minima": POLISH,
                "bootstrap_starts": BOOTSTRAP_STARTS}
    return FitResult(runs=runs, law=law, fit=main, comparison=comparison, per_r=per_r_fits,
                     bootstrap=thetas, bootstrap_unit=unit, settings=settings,
                     warnings=warnings)
