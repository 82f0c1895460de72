"""A batched, box-projected L-BFGS: many independent minimisations advanced together in numpy.

The fitter's first pass. Thousands of starts (or bootstrap resamples, as weights on the runs)
of the same small problem cost little more than one when their objective is evaluated as one
array operation, while scipy's L-BFGS-B spends tens of microseconds of Python per iteration and
per start. Each problem keeps its own memory of the last `memory` steps; the search direction
(two-loop recursion) is projected onto the box (components pushing against an active bound are
dropped), the step is backtracked until Armijo's condition holds on the projected step, and a
problem stops when its projected gradient, or its relative decrease in one step (as L-BFGS-B's
`ftol`), falls below tolerance. The fitter then polishes the best results with scipy's
L-BFGS-B, so this pass only has to reach the right basins.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Batch = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _direction(g: np.ndarray, S: np.ndarray, Y: np.ndarray, rho: np.ndarray,
               gamma: np.ndarray) -> np.ndarray:
    """-H g by the two-loop recursion for each row (memory index 0 is the newest step)."""
    q = g.copy()
    alphas = np.empty(rho.shape)
    for i in range(rho.shape[1]):
        alphas[:, i] = rho[:, i] * np.einsum("bk,bk->b", S[:, i], q)
        q -= alphas[:, i, None] * Y[:, i]
    r = gamma[:, None] * q
    for i in reversed(range(rho.shape[1])):
        beta = rho[:, i] * np.einsum("bk,bk->b", Y[:, i], r)
        r += S[:, i] * (alphas[:, i] - beta)[:, None]
    return -r


def minimize_batch(fun: Batch, x0: np.ndarray, lower: np.ndarray, upper: np.ndarray, *,
                   memory: int = 10, max_iter: int = 1000, ftol: float = 1e-10,
                   gtol: float = 1e-6, c1: float = 1e-4,
                   max_backtracks: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise each row of `x0` independently within [lower, upper].

    `fun(X, rows)` returns values (len(rows),) and gradients (len(rows), k) at the points X of
    problems `rows`. Returns the final points, their values and the iterations each took."""
    X = np.clip(np.array(x0, dtype=float), lower, upper)
    count, k = X.shape
    F, G = fun(X, np.arange(count))
    S, Y = np.zeros((count, memory, k)), np.zeros((count, memory, k))
    rho, gamma = np.zeros((count, memory)), np.ones(count)
    iterations = np.zeros(count, dtype=int)
    active = np.flatnonzero(np.isfinite(F))
    for _ in range(max_iter):
        if active.size == 0:
            break
        x, g, f = X[active], G[active], F[active]
        blocked = ((x <= lower) & (g > 0)) | ((x >= upper) & (g < 0))
        pg = np.where(blocked, 0.0, g)
        moving = np.max(np.abs(pg), axis=1) > gtol
        active, x, g, f, pg, blocked = (v[moving] for v in (active, x, g, f, pg, blocked))
        if active.size == 0:
            break
        fresh = ~np.any(rho[active] != 0, axis=1)
        d = np.where(blocked, 0.0, _direction(pg, S[active], Y[active], rho[active],
                                             gamma[active]))
        slope = np.einsum("bk,bk->b", d, pg)
        uphill = ~(slope < 0)
        d[uphill] = -pg[uphill]
        fresh |= uphill
        step = np.where(fresh, np.minimum(1.0, 1.0 / np.max(np.abs(pg), axis=1)), 1.0)
        x_new, f_new, g_new = x.copy(), f.copy(), g.copy()
        accepted = np.zeros(active.size, dtype=bool)
        pending = np.arange(active.size)
        for _ in range(max_backtracks):
            trial = np.clip(x[pending] + step[pending, None] * d[pending], lower, upper)
            ft, gt = fun(trial, active[pending])
            gain = np.einsum("bk,bk->b", g[pending], trial - x[pending])
            ok = np.isfinite(ft) & (ft <= f[pending] + c1 * gain)
            done = pending[ok]
            x_new[done], f_new[done], g_new[done] = trial[ok], ft[ok], gt[ok]
            accepted[done] = True
            pending = pending[~ok]
            if pending.size == 0:
                break
            step[pending] *= 0.5
        rows = active[accepted]
        s, y = x_new[accepted] - x[accepted], g_new[accepted] - g[accepted]
        sy = np.einsum("bk,bk->b", s, y)
        curved = sy > 1e-10 * np.linalg.norm(s, axis=1) * np.linalg.norm(y, axis=1)
        keep = rows[curved]
        S[keep], Y[keep], rho[keep] = (np.roll(S[keep], 1, axis=1), np.roll(Y[keep], 1, axis=1),
                                       np.roll(rho[keep], 1, axis=1))
        S[keep, 0], Y[keep, 0] = s[curved], y[curved]
        rho[keep, 0] = 1.0 / sy[curved]
        gamma[keep] = sy[curved] / np.einsum("bk,bk->b", y[curved], y[curved])
        X[rows], F[rows], G[rows] = x_new[accepted], f_new[accepted], g_new[accepted]
        iterations[active] += 1
        decrease = f[accepted] - f_new[accepted]
        settled = decrease <= ftol * np.maximum(np.maximum(np.abs(f[accepted]),
                                                           np.abs(f_new[accepted])), 1.0)
        # A failed line search: forget the memory and retry downhill; stop if already downhill.
        failed = ~accepted
        rho[active[failed & ~fresh]] = 0.0
        stop = np.concatenate([rows[settled], active[failed & fresh]])
        active = np.setdiff1d(active, stop, assume_unique=True)
    return X, F, iterations
