"""The loss laws of the scaling fits, in log-sum-exp form, with analytic gradients.

The looped (iso-depth) law of RESEARCH.md section 2,

    L = E + A * N_eff^-alpha + B * D^-beta,    N_eff = N_once + r^phi * N_rec,

is fitted in log space: with A = e^a, B = e^b, E = e^e,

    log L  ~  LSE(a - alpha * log N_eff,  b - beta * log D,  e)

and the objective is the sum over runs of Huber_delta(prediction - log L), delta = 1e-3.
The parameter vector is always theta = (a, b, e, alpha, beta, phi). Every other law is this one
with phi fixed: phi = 0 is Chinchilla's law on unique parameters (N = N_once + N_rec), phi = 1 a
recurrence worth a unique block, and on r = 1 data every phi gives Chinchilla's law.
`r^phi N_rec` is formed in log space (`logaddexp`), so no power overflows and N_rec = 0 is fine.

numpy only: this module runs in the optimiser's inner loop (tens of microseconds per call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PARAMS = ("a", "b", "e", "alpha", "beta", "phi")
NATURAL = ("E", "A", "B", "alpha", "beta", "phi")  # how a fit is reported
# The paper's search box (RESEARCH.md section 2), also the bounds of L-BFGS-B.
BOX = np.array([(-5.0, 35.0), (-5.0, 35.0), (-3.0, 2.0), (0.0, 2.5), (0.0, 2.5), (-3.0, 3.0)])
HUBER_DELTA = 1e-3
EDGE_TOLERANCE = 1e-6  # of the box width


def on_edge(theta, n_free: int) -> list[tuple[str, float, tuple[float, float]]]:
    """(name, value, box) of each of the first `n_free` parameters that lies on its box edge."""
    out = []
    for i, name in enumerate(PARAMS[:n_free]):
        lo, hi = BOX[i]
        if min(theta[i] - lo, hi - theta[i]) <= EDGE_TOLERANCE * (hi - lo):
            out.append((name, float(theta[i]), (lo, hi)))
    return out


@dataclass(frozen=True)
class LawData:
    """The runs of a fit as logarithms (log 0 = -inf for an absent N_once or N_rec)."""

    log_n_once: np.ndarray
    log_n_rec: np.ndarray
    log_r: np.ndarray
    log_tokens: np.ndarray
    log_loss: np.ndarray

    @classmethod
    def from_arrays(cls, n_once, n_rec, recurrences, tokens, loss) -> LawData:
        def log(values) -> np.ndarray:
            values = np.asarray(values, dtype=float)
            with np.errstate(divide="ignore"):
                return np.log(values)

        return cls(log(n_once), log(n_rec), log(recurrences), log(tokens), log(loss))

    def __len__(self) -> int:
        return len(self.log_loss)

    def take(self, index: np.ndarray) -> LawData:
        return LawData(self.log_n_once[index], self.log_n_rec[index], self.log_r[index],
                       self.log_tokens[index], self.log_loss[index])

    @property
    def phi_identifiable(self) -> bool:
        """phi matters only for runs with N_rec > 0 and r > 1."""
        return bool(np.any(np.isfinite(self.log_n_rec) & (self.log_r > 0)))


def log_n_eff(phi: float, data: LawData) -> tuple[np.ndarray, np.ndarray]:
    """log(N_once + r^phi N_rec) and its derivative in phi."""
    rec = data.log_n_rec + phi * data.log_r
    out = np.logaddexp(data.log_n_once, rec)
    return out, np.exp(rec - out) * data.log_r  # share of the loop in N_eff, times log r


def to_natural(theta) -> dict[str, float]:
    """(a, b, e, alpha, beta, phi) -> {E, A, B, alpha, beta, phi}."""
    a, b, e, alpha, beta, phi = (float(v) for v in theta)
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)),
            "alpha": alpha, "beta": beta, "phi": phi}


def from_natural(E: float, A: float, B: float, alpha: float, beta: float,
                 phi: float = 0.0) -> np.ndarray:
    return np.array([np.log(A), np.log(B), np.log(E), alpha, beta, phi], dtype=float)


def predict_log_loss(theta, data: LawData) -> np.ndarray:
    a, b, e, alpha, beta, phi = theta
    log_n, _ = log_n_eff(phi, data)
    terms = np.stack([a - alpha * log_n, b - beta * data.log_tokens,
                      np.full(len(data), float(e))])
    return np.logaddexp.reduce(terms, axis=0)


def predict_loss(theta, n_once, n_rec, recurrences, tokens) -> np.ndarray:
    """The law's loss for arrays of configurations (broadcast)."""
    n_once, n_rec, recurrences, tokens = np.broadcast_arrays(
        *(np.asarray(v, dtype=float) for v in (n_once, n_rec, recurrences, tokens)))
    data = LawData.from_arrays(n_once.ravel(), n_rec.ravel(), recurrences.ravel(),
                               tokens.ravel(), np.ones(n_once.size))
    return np.exp(predict_log_loss(theta, data)).reshape(n_once.shape)


# A term of the law whose share of the predicted loss varies by less than this across the runs
# cannot be told from a constant (E): a tenth of the Huber delta, in log-loss units the smallest
# change the objective weighs in full.
TERM_VARIATION_FLOOR = 1e-4
TERMS = {"size": "A, alpha and phi", "data": "B and beta"}  # each term's parameters


def unidentified_terms(theta, data: LawData) -> list[tuple[str, float]]:
    """(term, variation) of each term (size: A N_eff^-alpha, data: B D^-beta) whose share of
    the predicted loss varies across the runs by less than TERM_VARIATION_FLOOR: switched off
    (negligible) or constant (merged with E), wherever in its flat valley the optimiser stopped."""
    a, b, _, alpha, beta, phi = theta
    log_n, _ = log_n_eff(phi, data)
    log_loss = predict_log_loss(theta, data)
    out = []
    for name, log_term in (("size", a - alpha * log_n), ("data", b - beta * data.log_tokens)):
        share = np.exp(log_term - log_loss)
        variation = float(share.max() - share.min()) if len(share) else 0.0
        if variation < TERM_VARIATION_FLOOR:
            out.append((name, variation))
    return out


def huber(residual: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    """0.5 r^2 for |r| <= delta, delta (|r| - delta / 2) beyond."""
    c = np.clip(residual, -delta, delta)
    return c * (residual - 0.5 * c)


def objective(theta, data: LawData, delta: float = HUBER_DELTA) -> float:
    """Sum of Huber(prediction - log L): the number a fit minimises."""
    return float(huber(predict_log_loss(theta, data) - data.log_loss, delta).sum())


class Objective:
    """The objective and its gradient in the free parameters, for L-BFGS-B.

    Free parameters are (a, b, e, alpha, beta, phi), or the first five when `phi` is fixed (then
    log N_eff is computed once). `scale` multiplies value and gradient: the fitter minimises the
    objective divided by delta, which is of order sum |residual| and keeps L-BFGS-B's absolute
    tolerances meaningful.
    """

    def __init__(self, data: LawData, phi: float | None = None, delta: float = HUBER_DELTA,
                 scale: float = 1.0):
        self.data, self.phi, self.delta, self.scale = data, phi, delta, scale
        self.n_free = 6 if phi is None else 5
        self._fixed_log_n = None if phi is None else log_n_eff(phi, data)[0]

    def theta(self, x) -> np.ndarray:
        """The full parameter vector of a point in the free parameters."""
        return np.asarray(x, dtype=float) if self.phi is None else np.append(x, self.phi)

    def __call__(self, x) -> tuple[float, np.ndarray]:
        d = self.data
        a, b, e, alpha, beta = x[0], x[1], x[2], x[3], x[4]
        if self.phi is None:
            log_n, dlog_n = log_n_eff(x[5], d)
        else:
            log_n, dlog_n = self._fixed_log_n, None
        t1 = a - alpha * log_n
        t2 = b - beta * d.log_tokens
        # Inside the box no term over- or underflows (|t| < 700), so the LSE needs no shift;
        # outside it (a caller's own point) the shifted form below takes over.
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            x1, x2, x3 = np.exp(t1), np.exp(t2), math.exp(e) if e < 700 else math.inf
            total = x1 + x2 + x3
            residual = np.log(total) - d.log_loss
        if not np.all(np.isfinite(residual)):
            x1, x2, x3, total, residual = _shifted_terms(t1, t2, e, d.log_loss)
        clipped = np.clip(residual, -self.delta, self.delta)  # Huber'(residual)
        value = clipped @ (residual - 0.5 * clipped)
        u = clipped / total
        u1, u2 = u * x1, u * x2
        grad = [u1.sum(), u2.sum(), u @ x3 if np.ndim(x3) else x3 * u.sum(),
                -(u1 @ log_n), -(u2 @ d.log_tokens)]
        if dlog_n is not None:
            grad.append(-alpha * (u1 @ dlog_n))
        return float(value) * self.scale, np.array(grad) * self.scale


def _shifted_terms(t1, t2, e, log_loss):
    """The three exponentials of the law and the log-residual, computed relative to the largest
    exponent so that nothing overflows (for points far outside the search box)."""
    top = np.maximum(np.maximum(t1, t2), e)
    x1, x2, x3 = np.exp(t1 - top), np.exp(t2 - top), np.exp(e - top)
    total = x1 + x2 + x3
    return x1, x2, x3, total, top + np.log(total) - log_loss


def batch_objective(X: np.ndarray, data: LawData, phi: float | None = None,
                    weights: np.ndarray | None = None, delta: float = HUBER_DELTA,
                    scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Objective and gradient of many points at once: X (points, free parameters) -> values
    (points,) and gradients (points, free parameters). `weights` (points, runs) multiplies each
    run's Huber term (a bootstrap resample is integer weights on the runs)."""
    a, b, e, alpha, beta = (X[:, i:i + 1] for i in range(5))
    if phi is None:
        log_n, dlog_n = log_n_eff(X[:, 5:6], data)
    else:
        log_n, dlog_n = log_n_eff(phi, data)[0], None
    t1 = a - alpha * log_n
    t2 = b - beta * data.log_tokens
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        x1, x2, x3 = np.exp(t1), np.exp(t2), np.exp(e)
        total = x1 + x2 + x3
        residual = np.log(total) - data.log_loss
    if not np.all(np.isfinite(residual)):
        x1, x2, x3, total, residual = _shifted_terms(t1, t2, e, data.log_loss)
    clipped = np.clip(residual, -delta, delta)
    terms = clipped * (residual - 0.5 * clipped)
    if weights is not None:
        terms, clipped = terms * weights, clipped * weights
    u = clipped / total
    u1, u2 = u * x1, u * x2
    grads = [u1.sum(1), u2.sum(1), (u * x3).sum(1), -(u1 * log_n).sum(1),
             -(u2 * data.log_tokens).sum(1)]
    if dlog_n is not None:
        grads.append(-alpha[:, 0] * (u1 * dlog_n).sum(1))
    return terms.sum(1) * scale, np.stack(grads, axis=1) * scale
