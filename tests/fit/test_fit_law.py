"""The loss laws of megaloop.fit: LSE form, Huber objective, analytic gradients against finite
differences, the batched objective against the single one, and the batched L-BFGS."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import approx_fprime

from megaloop.fit.batch import minimize_batch
from megaloop.fit.fitter import hoffmann_grid, random_starts
from megaloop.fit.law import (
    BOX,
    LawData,
    Objective,
    batch_objective,
    from_natural,
    huber,
    log_n_eff,
    objective,
    predict_log_loss,
    predict_loss,
    to_natural,
)
from megaloop.fit.synthetic import PAPER_LAW, isodepth_counts, paper_grid, simulate


def _data(noise: float = 0.01, seed: int = 0) -> LawData:
    runs = simulate(noise=noise, seed=seed)
    # a plain model without loop parameters and a loop without once-parameters stay finite
    n_once = np.append(runs.n_once, [3e7, 0.0])
    n_rec = np.append(runs.n_rec, [0.0, 4e7])
    r = np.append(runs.recurrences, [1, 4])
    tokens = np.append(runs.tokens, [1e9, 2e9])
    loss = np.append(runs.loss, [3.0, 2.9])
    return LawData.from_arrays(n_once, n_rec, r, tokens, loss)


def test_predicted_loss_is_the_law():
    theta = from_natural(**PAPER_LAW)
    n_once, n_rec, r, tokens = 2.19e8, 1.91e8, 4, 5e9
    n_eff = n_once + r ** 0.46 * n_rec
    expected = 1.568 + 28.03 * n_eff ** -0.199 + 915.8 * tokens ** -0.369
    assert predict_loss(theta, n_once, n_rec, r, tokens) == pytest.approx(expected, rel=1e-12)
    assert to_natural(theta) == pytest.approx(PAPER_LAW)


def test_log_n_eff_and_its_derivative():
    data = _data()
    for phi in (-2.0, 0.0, 0.46, 1.0, 2.9):
        log_n, dlog_n = log_n_eff(phi, data)
        n_once, n_rec = np.exp(data.log_n_once), np.exp(data.log_n_rec)
        r = np.exp(data.log_r)
        assert np.allclose(np.exp(log_n), n_once + r ** phi * n_rec, rtol=1e-12)
        step = 1e-6
        numeric = (log_n_eff(phi + step, data)[0] - log_n_eff(phi - step, data)[0]) / (2 * step)
        assert np.allclose(dlog_n, numeric, rtol=1e-6, atol=1e-9)


def test_huber_is_quadratic_then_linear():
    delta = 1e-3
    r = np.array([0.0, 5e-4, -5e-4, 2e-3, -0.1])
    expected = [0.0, 0.5 * 5e-4 ** 2, 0.5 * 5e-4 ** 2, delta * (2e-3 - delta / 2),
                delta * (0.1 - delta / 2)]
    assert np.allclose(huber(r, delta), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("phi", [None, 0.0, 0.46, 1.0])
def test_analytic_gradient_equals_finite_differences(phi):
    data = _data()
    for start in random_starts(6, 3):
        objective_fn = Objective(data, phi, scale=1e3)
        x = start[:objective_fn.n_free]
        value, grad = objective_fn(x)
        assert value == pytest.approx(objective(objective_fn.theta(x), data) * 1e3, rel=1e-10)
        step = 1e-7 * (1 + np.abs(x))
        central = np.array([(objective_fn(x + e)[0] - objective_fn(x - e)[0]) / (2 * e[i])
                            for i, e in enumerate(np.diag(step))])
        assert np.allclose(grad, central, rtol=1e-4, atol=1e-5 * max(1.0, abs(value)))
        forward = approx_fprime(x, lambda z, f=objective_fn: f(z)[0], step)  # scipy's own
        assert np.allclose(grad, forward, rtol=1e-3, atol=1e-3 * max(1.0, abs(value)))


def test_gradient_near_the_optimum_where_huber_is_quadratic():
    runs = simulate(noise=3e-4, seed=2)  # residuals around delta: both Huber branches
    data = LawData.from_arrays(runs.n_once, runs.n_rec, runs.recurrences, runs.tokens,
                               runs.loss)
    theta = from_natural(**PAPER_LAW) + 1e-4
    objective_fn = Objective(data, scale=1e3)
    _, grad = objective_fn(theta)
    h = 1e-8
    central = np.array([(objective_fn(theta + e)[0] - objective_fn(theta - e)[0]) / (2 * h)
                        for e in np.eye(6) * h])
    assert np.allclose(grad, central, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("phi", [None, 0.0, 0.7])
def test_batch_objective_equals_the_single_one(phi):
    data = _data()
    k = 6 if phi is None else 5
    X = random_starts(20, 5)[:, :k]
    weights = np.random.default_rng(0).integers(0, 3, size=(20, len(data))).astype(float)
    values, grads = batch_objective(X, data, phi, weights, scale=1e3)
    for i in range(len(X)):
        index = np.repeat(np.arange(len(data)), weights[i].astype(int))
        value, grad = Objective(data.take(index), phi, scale=1e3)(X[i])
        assert values[i] == pytest.approx(value, rel=1e-10, abs=1e-12)
        assert np.allclose(grads[i], grad, rtol=1e-9, atol=1e-10)


def test_lse_stays_finite_at_extreme_points():
    data = _data()
    for theta in ([700.0, -700.0, 1.0, 0.0, 0.0, 0.5], [35.0, 35.0, 2.0, 0.0, 0.0, 3.0],
                  [-5.0, -5.0, -3.0, 2.5, 2.5, -3.0], [0.0, 0.0, 800.0, 0.1, 0.1, 0.0]):
        value, grad = Objective(data)(np.array(theta))
        assert np.isfinite(value) and np.all(np.isfinite(grad))
        values, grads = batch_objective(np.array([theta]), data)
        assert values[0] == pytest.approx(value, rel=1e-9)
        assert np.isfinite(predict_log_loss(theta, data)).all()


def test_phi_identifiability():
    grid = paper_grid()
    looped = LawData.from_arrays(grid["n_once"], grid["n_rec"], grid["recurrences"],
                                 grid["tokens"], np.ones(len(grid["tokens"])))
    assert looped.phi_identifiable
    at_r1 = np.flatnonzero(grid["recurrences"] == 1)
    assert not looped.take(at_r1).phi_identifiable
    no_loop = LawData.from_arrays([1e8, 2e8], [0, 0], [4, 4], [1e9, 1e9], [3.0, 2.9])
    assert not no_loop.phi_identifiable


def test_paper_grid_matches_the_paper():
    grid = paper_grid()
    assert len(grid["tokens"]) == 116
    assert all(np.sum(grid["recurrences"] == r) == 29 for r in (1, 2, 4, 8))
    unique = [sum(isodepth_counts(640, r)[:2]) for r in (1, 2, 4, 8)]  # s = 10
    assert np.allclose(unique, [98.3e6, 59.8e6, 40.2e6, 30.3e6], rtol=2e-3)
    assert np.allclose(grid["tokens"] * grid["flops_per_token"], grid["budget_flops"])


def test_hoffmann_grid():
    grid = hoffmann_grid()
    assert grid.shape == (4500, 6)
    assert [len(np.unique(grid[:, i])) for i in range(5)] == [6, 6, 5, 5, 5]
    assert np.all((grid >= BOX[:, 0]) & (grid <= BOX[:, 1]))


def test_batched_lbfgs_finds_the_projected_minimum():
    # Rosenbrock-like valleys and a quadratic whose minimum lies outside the box.
    centre = np.array([3.0, -2.0, 0.5])

    def fun(X, rows):
        diff = X - centre
        values = np.sum(diff ** 2 * [1, 10, 100], axis=1) + 5 * (X[:, 0] * X[:, 1] - 1) ** 2
        grads = 2 * diff * [1, 10, 100]
        grads[:, 0] += 10 * (X[:, 0] * X[:, 1] - 1) * X[:, 1]
        grads[:, 1] += 10 * (X[:, 0] * X[:, 1] - 1) * X[:, 0]
        return values, grads

    lower, upper = np.array([-1.0, -1.0, -1.0]), np.array([2.0, 2.0, 2.0])
    x0 = np.random.default_rng(0).uniform(-1, 2, size=(50, 3))
    X, F, iterations = minimize_batch(fun, x0, lower, upper, gtol=1e-9, ftol=1e-14)
    from scipy.optimize import minimize

    best = minimize(lambda x: fun(x[None], None)[0][0], x0[0],
                    jac=lambda x: fun(x[None], None)[1][0], method="L-BFGS-B",
                    bounds=list(zip(lower, upper, strict=True)), options={"gtol": 1e-12})
    assert F.min() == pytest.approx(best.fun, rel=1e-9)
    assert np.all(np.clip(X, lower, upper) == X)
    assert np.median(F) == pytest.approx(best.fun, rel=1e-6)
    assert iterations.max() < 1000


def test_batched_lbfgs_reaches_the_chinchilla_style_optimum():
    runs = simulate(noise=0.0)
    data = LawData.from_arrays(runs.n_once, runs.n_rec, runs.recurrences, runs.tokens,
                               runs.loss)

    def fun(X, rows):
        return batch_objective(X, data, None, scale=1e3)

    X, F, _ = minimize_batch(fun, random_starts(200, 0), BOX[:, 0], BOX[:, 1])
    best = X[np.argmin(F)]
    assert to_natural(best)["phi"] == pytest.approx(0.46, abs=1e-3)
    assert F.min() < 1e-6
