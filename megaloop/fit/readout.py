"""What users read off a fit: goodness of fit, the phi comparison, the equivalent unique
parameters of a looped model, compute-optimal sizes per r, measured iso-FLOP minima, and the
JSON of a whole fit.

R2 is that of the loss itself: 1 - sum (L - L_fit)^2 / sum (L - mean L)^2; RMSE is in nats.

Compute conventions: a run's training compute is its `budget_flops`, else `flops_per_token *
tokens`, else 6 (N_once + r N_rec) D. For compute-optimal sizes each r is treated as a family of
models whose share of loop parameters rho_r = N_rec / (N_once + N_rec) is the runs' median, and
whose FLOPs per token follow a power law in N = N_once + N_rec fitted to the runs (known FLOPs
per token, or budget / tokens), else 6 (1 - rho + r rho) N. The equivalence sentence compares
training compute as 6 N D with non-embedding parameters at equal tokens (the paper's framing).
"""

from __future__ import annotations

import math

import numpy as np

from megaloop.fit.law import (
    NATURAL,
    TERMS,
    log_n_eff,
    objective,
    on_edge,
    predict_log_loss,
    predict_loss,
    to_natural,
    unidentified_terms,
)

LEVEL = 0.95


def human(count: float) -> str:
    """410M, 1.02B, 58.2M, 3.1T."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= size:
            value = count / size
            return f"{value:.3g}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return f"{count:.3g}"


def r_key(r: float) -> str:
    return f"{r:g}"


def goodness(runs, theta) -> dict:
    """Objective, R^2 of the loss, RMSE of the loss, and the Gaussian log-residual sums."""
    data = runs.law_data()
    log_pred = predict_log_loss(theta, data)
    pred = np.exp(log_pred)
    ss_res = float(np.sum((runs.loss - pred) ** 2))
    ss_tot = float(np.sum((runs.loss - runs.loss.mean()) ** 2))
    rmse_per_r = {r_key(r): float(np.sqrt(np.mean((runs.loss - pred)[runs.recurrences == r] ** 2)))
                  for r in sorted(set(runs.recurrences.tolist()))}
    return {"objective": objective(theta, data), "r2": 1 - ss_res / ss_tot if ss_tot else math.nan,
            "rmse": math.sqrt(ss_res / len(runs)), "rmse_per_r": rmse_per_r,
            "rss_log": float(np.sum((log_pred - data.log_loss) ** 2))}


def comparison(result) -> dict:
    """phi free against each fixed phi: objective, R^2, AIC/BIC and a likelihood-ratio test.

    AIC, BIC and the LR statistic n log(RSS_fixed / RSS_free) ~ chi2(1) treat the log residuals
    as Gaussian: an approximation (the fit itself is robust, Huber), good for a verdict."""
    n = len(result.runs)
    out: dict = {}
    for name, fit in result.comparison.items():
        g = goodness(result.runs, fit.theta)
        rss = max(g["rss_log"], 1e-300)
        out[name] = {"phi": float(fit.theta[5]), "free_parameters": fit.n_free,
                     "objective": g["objective"], "r2": g["r2"], "rmse": g["rmse"],
                     "aic": n * math.log(rss / n) + 2 * fit.n_free,
                     "bic": n * math.log(rss / n) + fit.n_free * math.log(n), "_rss": rss}
    free = out.get("free")
    verdicts = []
    for name, row in out.items():
        if free is not None and name != "free":
            stat = max(0.0, n * math.log(row["_rss"] / free["_rss"]))
            row["lr_stat"], row["lr_p"] = stat, math.erfc(math.sqrt(stat / 2))  # chi2(1) tail
            row["delta_bic"] = row["bic"] - free["bic"]
            verdicts.append(_verdict(name, row))
    for row in out.values():
        del row["_rss"]
    out["verdict"] = ("phi free cannot be compared: too few runs for 6 free parameters."
                      if free is None else f"phi free ({free['phi']:.3f}, R2 {free['r2']:.4f}) "
                      "against " + "; ".join(verdicts) + ".")
    return out


def _verdict(name: str, row: dict) -> str:
    d, p = row["delta_bic"], row["lr_p"]
    if d > 10:
        word = "rejected"
    elif d > 2:
        word = "fits worse"
    elif d >= -2:
        word = "fits about as well"
    else:
        word = "preferred (phi free does not earn its parameter)"
    return f"phi = {name} {word} (R2 {row['r2']:.4f}, dBIC {d:+.1f}, LR p = {p:.2g})"


def equivalence(theta, n_once: float, n_rec: float, r: float) -> dict:
    """The non-looped model of equal loss (at equal tokens) of a looped configuration, and the
    training compute of the looped model against it."""
    phi = float(theta[5])
    unique, unrolled = n_once + n_rec, n_once + r * n_rec
    equal = n_once + r ** phi * n_rec
    ratio = unrolled / equal
    sentence = (f"At r = {r:g}, a looped model with {human(unique)} unique parameters "
                f"({human(n_once)} once + {human(n_rec)} in the loop) matches a non-looped model "
                f"of {human(equal)} parameters in loss, but trains at the compute of the "
                f"{human(unrolled)} model it unrolls to: {ratio:.2f}x the training compute of "
                "the equal-loss non-looped model (6ND, same tokens).")
    return {"r": r, "n_once": n_once, "n_rec": n_rec, "n_unique": unique,
            "n_equivalent": equal, "n_unrolled": unrolled, "compute_ratio": ratio,
            "sentence": sentence}


BOOTSTRAP_FITTED_AT_LEAST = 0.5  # of the resamples, for an interval to mean something


def distrust(result) -> list[str]:
    """Why the fit's numbers are not to be trusted (empty: no reason found): a parameter on the
    edge of its search box, a term of the law the runs do not constrain, or most bootstrap
    resamples not fitted."""
    reasons = [f"{name} on the edge of its search box [{lo:g}, {hi:g}]"
               for name, _, (lo, hi) in on_edge(result.fit.theta, result.fit.n_free)]
    reasons += [f"the {term} term unconstrained by the runs ({TERMS[term]})"
                for term, _ in unidentified_terms(result.fit.theta, result.runs.law_data())]
    resamples = len(result.bootstrap)
    fitted = int(np.all(np.isfinite(result.bootstrap), axis=1).sum()) if resamples else 0
    if resamples and fitted < BOOTSTRAP_FITTED_AT_LEAST * resamples:
        reasons.append(f"only {fitted} of {resamples} bootstrap resamples could be fitted")
    return reasons


def untrusted_sentence(reasons: list[str]) -> str:
    return ("The fit is not to be trusted (" + "; ".join(reasons) + "), so it states no "
            "equivalence: add runs that constrain the law (more model sizes around each "
            "budget's minimum, more budgets or recurrences) and fit again.")


def equivalence_examples(result, reasons: list[str]) -> list[dict]:
    """One example per r > 1: the run configuration of median unique size at that r. Where the
    fit is not to be trusted (`reasons`, from `distrust`), each example's sentence says so
    instead of giving a number."""
    if not result.phi_identifiable:
        return []
    runs, out = result.runs, []
    for r in sorted(set(runs.recurrences.tolist())):
        configs = sorted({(u, o, c) for u, o, c, rr in zip(runs.n_unique, runs.n_once,
                                                          runs.n_rec, runs.recurrences,
                                                          strict=True)
                          if rr == r and c > 0})
        if r > 1 and configs:
            _, n_once, n_rec = configs[(len(configs) - 1) // 2]
            example = equivalence(result.fit.theta, n_once, n_rec, r)
            if reasons:
                example["sentence"] = untrusted_sentence(reasons)
            out.append(example)
    return out


def families(runs) -> dict[float, dict]:
    """Per r: loop share rho and the FLOPs-per-token law F(N) = exp(c0) N^c1 of its runs."""
    known = runs.training_flops() / runs.tokens
    exact = np.zeros(len(runs), dtype=bool)
    for extra in (runs.flops_per_token, runs.budget_flops):
        if extra is not None:
            exact |= np.isfinite(extra)
    out = {}
    for r in sorted(set(runs.recurrences.tolist())):
        at = runs.recurrences == r
        rho = float(np.median(runs.n_rec[at] / runs.n_unique[at]))
        log_n = np.log(runs.n_unique[at & exact])
        if len(np.unique(log_n)) >= 2:
            c1, c0 = np.polyfit(log_n, np.log(known[at & exact]), 1)
        else:
            c1, c0 = 1.0, math.log(6 * (1 - rho + r * rho))
        out[r] = {"rho": rho, "c0": float(c0), "c1": float(c1),
                  "n_range": (float(runs.n_unique[at].min()), float(runs.n_unique[at].max()))}
    return out


def optimal_curve(theta, r: float, family: dict, budgets) -> dict[str, np.ndarray]:
    """Compute-optimal unique size, tokens and loss of the family at r for each budget."""
    budgets = np.atleast_1d(np.asarray(budgets, dtype=float))
    lo, hi = family["n_range"]
    log_n = np.linspace(math.log(lo) - math.log(1e3), math.log(hi) + math.log(1e3), 1201)
    n = np.exp(log_n)[None, :]
    rho = family["rho"]
    flops = np.exp(family["c0"] + family["c1"] * log_n)[None, :]
    tokens = budgets[:, None] / flops
    loss = predict_loss(theta, n * (1 - rho), n * rho, r, tokens)
    best = np.argmin(loss, axis=1)
    # refine around the grid minimum with a parabola in log N
    inner = np.clip(best, 1, len(log_n) - 2)
    rows = np.arange(len(budgets))
    y0, y1, y2 = loss[rows, inner - 1], loss[rows, inner], loss[rows, inner + 1]
    step = log_n[1] - log_n[0]
    denom = y0 - 2 * y1 + y2
    shift = np.where(denom > 0, 0.5 * (y0 - y2) / np.where(denom > 0, denom, 1.0), 0.0)
    log_best = log_n[inner] + np.clip(shift, -1, 1) * step
    n_best = np.exp(log_best)
    d_best = budgets / np.exp(family["c0"] + family["c1"] * log_best)
    l_best = predict_loss(theta, n_best * (1 - rho), n_best * rho, r, d_best)
    edge = (best == 0) | (best == len(log_n) - 1)
    return {"budget_flops": budgets, "n_unique": n_best, "tokens": d_best, "loss": l_best,
            "at_edge": edge}


def default_budgets(runs) -> np.ndarray:
    if runs.budgets_known:
        return np.unique(runs.budget_flops)
    flops = runs.training_flops()
    lo, hi = math.ceil(math.log10(flops.min())), math.floor(math.log10(flops.max()))
    return 10.0 ** np.arange(lo, hi + 1) if hi >= lo else np.array([flops.min(), flops.max()])


def compute_optimal(result, budgets=None) -> list[dict]:
    """Per r and budget: the compute-optimal N (split into N_once, N_rec), D and loss."""
    budgets = default_budgets(result.runs) if budgets is None else budgets
    out = []
    for r, family in families(result.runs).items():
        curve = optimal_curve(result.fit.theta, r, family, budgets)
        for i, budget in enumerate(curve["budget_flops"]):
            n = float(curve["n_unique"][i])
            out.append({"r": r, "budget_flops": float(budget), "n_unique": n,
                        "n_once": n * (1 - family["rho"]), "n_rec": n * family["rho"],
                        "tokens": float(curve["tokens"][i]), "loss": float(curve["loss"][i]),
                        "tokens_per_parameter": float(curve["tokens"][i]) / n,
                        "at_edge": bool(curve["at_edge"][i])})
    return out


def iso_flop_minima(runs) -> list[dict]:
    """Per (budget, r) cell with 3 or more sizes: the minimum of a parabola of loss in log N."""
    if runs.budget_flops is None:
        return []
    out = []
    known = np.isfinite(runs.budget_flops)
    cells = sorted({(b, r) for b, r in zip(runs.budget_flops[known], runs.recurrences[known],
                                           strict=True)})
    for budget, r in cells:
        at = (runs.budget_flops == budget) & (runs.recurrences == r)
        log_n, loss = np.log(runs.n_unique[at]), runs.loss[at]
        if len(np.unique(log_n)) < 3:
            continue
        c2, c1, c0 = np.polyfit(log_n, loss, 2)
        row = {"budget_flops": float(budget), "r": float(r), "n_points": int(at.sum()),
               "best_run_n_unique": float(runs.n_unique[at][np.argmin(loss)]),
               "best_run_loss": float(loss.min())}
        if c2 <= 0:
            row.update(n_unique=None, loss=None, inside=False)
        else:
            x = -c1 / (2 * c2)
            row.update(n_unique=float(math.exp(x)), loss=float(c0 + c1 * x + c2 * x * x),
                       inside=bool(log_n.min() <= x <= log_n.max()))
        row["parabola"] = [float(c2), float(c1), float(c0)]  # loss = c2 x^2 + c1 x + c0, x = ln N
        out.append(row)
    return out


def collapse(result) -> dict[str, np.ndarray]:
    """The runs on the law's one curve in N_eff = N_once + r^phi N_rec: `n_eff` and `loss` minus
    the data term B / D^beta, which the law says is E + A / N_eff^alpha for every r."""
    theta, runs = result.fit.theta, result.runs
    sizes = (runs.n_once, runs.n_rec, runs.recurrences)
    law = predict_loss(theta, *sizes, np.inf)  # with unlimited data: E + A / N_eff^alpha
    data_term = predict_loss(theta, *sizes, runs.tokens) - law
    return {"n_eff": np.exp(log_n_eff(theta[5], runs.law_data())[0]),
            "loss": runs.loss - data_term, "law": law}


def intervals(thetas: np.ndarray, level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile intervals of E, A, B, alpha, beta, phi from bootstrap thetas."""
    ok = thetas[np.all(np.isfinite(thetas), axis=1)]
    if len(ok) < 2:
        return {name: None for name in NATURAL}
    natural = np.column_stack([np.exp(ok[:, 2]), np.exp(ok[:, 0]), np.exp(ok[:, 1]),
                               ok[:, 3], ok[:, 4], ok[:, 5]])
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(natural, [tail, 100 - tail], axis=0)
    return {name: [float(lo[i]), float(hi[i])] for i, name in enumerate(NATURAL)}


def fitted_runs(runs) -> list[dict]:
    """Every run that went into the fit: name, MLflow id (where known) and what the law read."""
    budgets = runs.budget_flops if runs.budget_flops is not None else [None] * len(runs)
    ids = runs.run_ids or [None] * len(runs)
    return [{"name": name, "run_id": run_id, "recurrences": r, "n_once": once, "n_rec": rec,
             "tokens": tokens, "loss": loss, "budget_flops": budget}
            for name, run_id, r, once, rec, tokens, loss, budget in zip(
                runs.names, ids, runs.recurrences, runs.n_once, runs.n_rec, runs.tokens,
                runs.loss, budgets, strict=True)]


def result_json(result) -> dict:
    """The JSON of a fit (DESIGN.md "Fit output" keys first)."""
    natural = to_natural(result.fit.theta)
    g = goodness(result.runs, result.fit.theta)
    ci = intervals(result.bootstrap, LEVEL)
    reasons = distrust(result)
    phi_known = result.phi_identifiable
    phi_free = result.law == "looped"  # a fixed phi has no interval
    out = {**{k: natural[k] for k in ("E", "A", "B", "alpha", "beta")},
           "phi": natural["phi"] if phi_known else None,
           "phi_ci": ci["phi"] if phi_free else None,
           "r2": g["r2"], "objective": g["objective"], "n_runs": len(result.runs),
           "law": result.law, "trusted": not reasons, "distrust": reasons,
           "ci": {k: v for k, v in ci.items() if phi_free or k != "phi"}, "ci_level": LEVEL,
           "rmse": g["rmse"], "rmse_per_r": g["rmse_per_r"],
           "comparison": comparison(result) if phi_known else None,
           "per_r": {r_key(r): {**{k: v for k, v in to_natural(f.theta).items() if k != "phi"},
                                **{k: goodness(result.runs.subset(result.runs.recurrences == r),
                                               f.theta)[k] for k in ("objective", "r2")},
                                "n_runs": int(np.sum(result.runs.recurrences == r))}
                     for r, f in result.per_r.items()},
           "equivalence": equivalence_examples(result, reasons),
           "compute_optimal": compute_optimal(result),
           "iso_flop_minima": iso_flop_minima(result.runs),
           "bootstrap": {"resamples": len(result.bootstrap),
                         "fitted": int(np.all(np.isfinite(result.bootstrap), axis=1).sum()),
                         "unit": result.bootstrap_unit},
           "runs": fitted_runs(result.runs),
           "settings": result.settings, "source": result.runs.source,
           "skipped": result.runs.skipped, "warnings": list(result.warnings)}
    out["in_short"] = in_short(out)
    return _plain(out)


def in_short(summary: dict) -> str:
    """What the fit means, in one sentence: where phi's interval lies between a recurrence worth
    nothing (phi = 0) and one worth a fresh block of unique parameters (phi = 1)."""
    if summary["phi"] is None:
        return ("No run loops (r > 1 with parameters in the loop), so these runs cannot say "
                "what a recurrence is worth.")
    phi = summary["phi"]
    if summary["law"] == "looped, phi fixed":
        return (f"phi was fixed at {phi:g}, so this fit measures the rest of the law, not what "
                "a recurrence is worth.")
    if summary["distrust"]:
        return (f"The fit is not to be trusted ({'; '.join(summary['distrust'])}), so its phi "
                f"of {phi:.3g} says nothing yet.")
    if not summary["phi_ci"]:
        return (f"phi = {phi:.3g}, without an interval (no bootstrap): fit with --bootstrap "
                "to learn what the runs can tell apart.")
    lo, hi = summary["phi_ci"]
    if lo > 0 and hi < 1:
        worth = ("more than nothing and less than a fresh block of unique parameters: both "
                 "phi = 0 and phi = 1 lie outside its interval")
    elif lo > 0:
        worth = ("more than nothing (phi = 0 lies outside its interval), and these runs cannot "
                 "tell it from a fresh block of unique parameters (phi = 1 lies inside)")
    elif hi < 1:
        worth = ("less than a fresh block of unique parameters (phi = 1 lies outside its "
                 "interval), and these runs cannot tell it from nothing (phi = 0 lies inside)")
    else:
        worth = "anything from nothing to a fresh block: these runs cannot tell"
    return (f"phi = {phi:.3g} [{lo:.3g}, {hi:.3g}]: a looped block run r times counts as r^phi "
            f"blocks of unique parameters, so one recurrence is worth {worth}.")


def _plain(value):
    """JSON-ready: numpy scalars to Python, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value
