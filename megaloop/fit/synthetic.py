"""Synthetic runs on the iso-depth paper's sweep grid, for tests and benchmarks of the fitter.

The grid of RESEARCH.md section 2: six budgets with their widths s, r in {1, 2, 4, 8}, effective
depth 20 = prelude 2 + (16 / r blocks x r) + coda 2, d = 64 s rounded up to a multiple of 128,
12 d^2 parameters per block, a 2 d^2 linear injection in the loop for r > 1, 32k vocabulary,
sequence 2048, and D = C / F with F = 6 (N_once + r N_rec + vocab d) + 12 * 20 * 2048 * d.
These closed formulas are megaloop.model.accounting's counts without the norms (within 0.1%).
"""

from __future__ import annotations

import numpy as np

from megaloop.fit.inputs import Runs
from megaloop.fit.law import from_natural, predict_loss

PAPER_BUDGETS = {
    4.64e17: (6, 8, 10, 12),
    1e18: (6, 8, 10, 12, 14),
    2.15e18: (8, 10, 12, 14, 16),
    4.64e18: (10, 12, 14, 16, 18, 20),
    1e19: (12, 16, 18, 20, 24),
    2.15e19: (18, 24, 28, 34),
}
PAPER_RECURRENCES = (1, 2, 4, 8)
# The paper's refit (RESEARCH.md section 2).
PAPER_LAW = {"E": 1.568, "A": 28.03, "B": 915.8, "alpha": 0.199, "beta": 0.369, "phi": 0.46}
VOCAB, SEQ_LEN, DEPTH, LOOP_DEPTH = 32_000, 2048, 20, 16


def width(s: int) -> int:
    return -(-64 * s // 128) * 128


def isodepth_counts(d: int, r: int) -> tuple[int, int, float]:
    """(n_once, n_rec, training FLOPs per token) of the iso-depth model of width d at r."""
    block = 12 * d * d
    n_once = 4 * block
    n_rec = (LOOP_DEPTH // r) * block + (2 * d * d if r > 1 else 0)
    flops = 6 * (n_once + r * n_rec + VOCAB * d) + 12 * DEPTH * SEQ_LEN * d
    return n_once, n_rec, float(flops)


def paper_grid(recurrences=PAPER_RECURRENCES, budgets=None) -> dict[str, np.ndarray]:
    """The 116 configurations (29 per r): n_once, n_rec, recurrences, tokens, budget_flops,
    flops_per_token."""
    rows = []
    for budget, widths in (budgets or PAPER_BUDGETS).items():
        for r in recurrences:
            for s in widths:
                n_once, n_rec, flops = isodepth_counts(width(s), r)
                rows.append((n_once, n_rec, r, budget / flops, budget, flops))
    columns = np.array(rows, dtype=float).T
    names = ("n_once", "n_rec", "recurrences", "tokens", "budget_flops", "flops_per_token")
    return dict(zip(names, columns, strict=True))


def simulate(law: dict | None = None, noise: float = 0.0, seed: int = 0,
             recurrences=PAPER_RECURRENCES, budgets=None) -> Runs:
    """Runs on the paper grid whose loss follows `law` (default: the paper's fit), times
    exp(noise * standard normal) (noise is the standard deviation of log loss)."""
    law = {**PAPER_LAW, **(law or {})}
    grid = paper_grid(recurrences, budgets)
    theta = from_natural(**law)
    loss = predict_loss(theta, grid["n_once"], grid["n_rec"], grid["recurrences"],
                        grid["tokens"])
    if noise:
        loss = loss * np.exp(noise * np.random.default_rng(seed).standard_normal(len(loss)))
    return Runs(**grid, loss=loss, source="synthetic paper grid")
