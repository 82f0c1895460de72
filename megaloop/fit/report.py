"""Tables and plots of a fit: the text summary the CLI prints, and a Markdown report with PNGs
(each plot also written as SVG).

Plots (matplotlib, Agg): loss against unique parameters per budget coloured by r with the fitted
law drawn along each iso-FLOP curve (observed against predicted when budgets are unknown);
residuals by r; the bootstrap distribution of phi; the loss-compute frontier per r.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from megaloop.atomic import atomic_write_bytes, atomic_write_json
from megaloop.fit.law import predict_loss
from megaloop.fit.readout import collapse, families, human, iso_flop_minima, optimal_curve

PLOTS = {"loss_vs_n": "Iso-FLOP curves: loss against unique parameters",
         "n_eff_collapse": "Loss against effective parameters N_eff = N_once + r^phi N_rec",
         "optimal_scaling": "Compute-optimal N and D against C",
         "observed_vs_predicted": "Observed against predicted loss",
         "residuals": "Residuals by r",
         "phi_bootstrap": "Bootstrap distribution of phi", "frontier": "Loss-compute frontier"}


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def _interval(ci) -> str:
    return "-" if not ci else f"[{_number(ci[0])}, {_number(ci[1])}]"


def parameter_rows(summary: dict) -> list[tuple[str, str, str]]:
    names = ["E", "A", "B", "alpha", "beta"] + (["phi"] if summary["phi"] is not None else [])
    fixed = "fixed" if summary["law"] == "looped, phi fixed" else None
    return [(name, _number(summary[name]),
             fixed if name == "phi" and fixed else _interval(summary["ci"].get(name)))
            for name in names]


def format_summary(summary: dict) -> str:
    """The readable table `megaloop fit` prints."""
    lines = [f"fit of {summary['n_runs']} runs from {summary['source']}: {summary['law']} law"]
    if summary.get("skipped"):
        lines.append("skipped: " + "; ".join(f"{n} {why}" for why, n in summary["skipped"].items()))
    level = int(round(100 * summary["ci_level"]))
    lines.append(f"  {'parameter':<10} {'value':>12}   {level}% interval "
                 f"({summary['bootstrap']['fitted']} bootstrap resamples of "
                 f"{summary['bootstrap']['unit']}s)")
    lines += [f"  {name:<10} {value:>12}   {ci}" for name, value, ci in parameter_rows(summary)]
    if summary["phi"] is None:
        lines.append("  phi        null (no run has n_rec > 0 and r > 1: Chinchilla form with "
                     "N = n_once + n_rec)")
    rmse = ", ".join(f"r={r}: {_number(v, 3)}" for r, v in summary["rmse_per_r"].items())
    lines.append(f"R2 {summary['r2']:.5f}, objective {_number(summary['objective'])}, "
                 f"RMSE of the loss by r: {rmse}")
    if summary.get("comparison"):
        lines.append("comparison: " + summary["comparison"]["verdict"])
    for example in summary["equivalence"][-1:]:
        lines.append(example["sentence"])
    lines += [f"warning: {w}" for w in summary["warnings"]]
    if summary.get("mlflow_run_id"):
        lines.append(f"logged as MLflow run {summary['mlflow_run_id']}")
    lines.append(f"In short: {summary['in_short']}")
    return "\n".join(lines)


def _colours(rs) -> dict[float, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    rs = sorted(rs)
    return {r: cmap(0.85 * i / max(len(rs) - 1, 1)) for i, r in enumerate(rs)}


def _save(fig, folder: Path, name: str) -> None:
    """NAME.png for the report and NAME.svg, vector, for a paper."""
    for kind, options in (("png", {"dpi": 110}), ("svg", {})):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=kind, bbox_inches="tight", **options)
        atomic_write_bytes(folder / f"{name}.{kind}", buffer.getvalue())


def _plot_loss_vs_n(result, plt, colours) -> object | None:
    import matplotlib.ticker

    runs, theta = result.runs, result.fit.theta
    if not runs.budgets_known:  # no iso-FLOP groups: observed_vs_predicted shows the fit
        return None
    budgets = np.unique(runs.budget_flops)
    cols = min(3, len(budgets))
    rows = math.ceil(len(budgets) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    fams = families(runs)
    minima = {(m["budget_flops"], m["r"]): m for m in iso_flop_minima(runs)}
    for ax, budget in zip(axes.flat, budgets, strict=False):
        for r, colour in colours.items():
            at = (runs.budget_flops == budget) & (runs.recurrences == r)
            if not at.any():
                continue
            n = runs.n_unique[at]
            ax.scatter(n, runs.loss[at], color=colour, s=22, label=f"r = {r:g}", zorder=3)
            grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 60)
            fam = fams[r]
            tokens = budget / np.exp(fam["c0"] + fam["c1"] * np.log(grid))
            ax.plot(grid, predict_loss(theta, grid * (1 - fam["rho"]), grid * fam["rho"], r,
                                       tokens), color=colour, lw=1.2)
            cell = minima.get((float(budget), float(r)))
            if cell is not None:  # the measured parabola and its minimum
                sizes = np.geomspace(n.min(), n.max(), 40)
                ax.plot(sizes, np.polyval(cell["parabola"], np.log(sizes)), color=colour,
                        lw=1, ls="--")
                if cell["inside"]:  # a minimum outside the sizes sampled is no measurement
                    ax.scatter([cell["n_unique"]], [cell["loss"]], color=colour, marker="x",
                               s=60, zorder=4)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set(title=f"C = {budget:.3g} FLOPs", xlabel="unique parameters N_once + N_rec",
               ylabel="loss")
    for ax in list(axes.flat)[len(budgets):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Loss against unique parameters per budget; solid: the fitted law, dashed: "
                 "each budget's parabola, x: its minimum where inside the sizes run")
    fig.tight_layout()
    return fig


def _plot_collapse(result, summary, plt, colours) -> object | None:
    if summary["phi"] is None:
        return None
    points = collapse(result)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r, colour in colours.items():
        at = result.runs.recurrences == r
        ax.scatter(points["n_eff"][at], points["loss"][at], color=colour, s=18,
                   label=f"r = {r:g}", zorder=3)
    order = np.argsort(points["n_eff"])
    ax.plot(points["n_eff"][order], points["law"][order], color="black", lw=1.2,
            label="E + A / N_eff^alpha")
    ax.set_xscale("log")
    ax.set(xlabel=f"N_eff = N_once + r^phi N_rec (phi = {summary['phi']:.3f})",
           ylabel="loss - B / D^beta",
           title="Every r on one curve where the law holds")
    ax.legend(fontsize=8)
    return fig


def _plot_optimal(summary, plt, colours) -> object | None:
    rows = summary["compute_optimal"]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r, colour in colours.items():
        mine = [row for row in rows if row["r"] == r]
        budgets = [row["budget_flops"] for row in mine]
        axes[0].plot(budgets, [row["n_unique"] for row in mine], color=colour, marker="o",
                     ms=3, label=f"r = {r:g}")
        axes[1].plot(budgets, [row["tokens"] for row in mine], color=colour, marker="o", ms=3)
    for ax, what in zip(axes, ("N_opt (unique parameters)", "D_opt (tokens)"), strict=True):
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=what)
    axes[0].legend(fontsize=8)
    fig.suptitle("Compute-optimal model size and data per r (the fitted law)")
    fig.tight_layout()
    return fig


def _plot_observed(result, plt, colours) -> object:
    runs, pred = result.runs, result.predicted_loss()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for r, colour in colours.items():
        at = runs.recurrences == r
        ax.scatter(pred[at], runs.loss[at], color=colour, s=18, label=f"r = {r:g}")
    lo, hi = min(pred.min(), runs.loss.min()), max(pred.max(), runs.loss.max())
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
    ax.set(xlabel="predicted loss", ylabel="observed loss", title="Observed against predicted")
    ax.legend(fontsize=8)
    return fig


def _plot_residuals(result, plt, colours) -> object:
    runs = result.runs
    residual = runs.loss - result.predicted_loss()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r, colour in colours.items():
        at = runs.recurrences == r
        ax.scatter(runs.n_unique[at], residual[at], color=colour, s=18, label=f"r = {r:g}")
    ax.axhline(0, color="grey", lw=1)
    ax.set_xscale("log")
    ax.set(xlabel="unique parameters N_once + N_rec", ylabel="observed - fitted loss (nats)",
           title="Residuals by r")
    ax.legend(fontsize=8)
    return fig


def _plot_phi(result, summary, plt) -> object | None:
    phis = result.bootstrap[:, 5][np.isfinite(result.bootstrap[:, 5])]
    if summary["phi"] is None or len(phis) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(phis, bins=min(40, max(10, len(phis) // 5)), color="#5b8fb9")
    ax.axvline(summary["phi"], color="black", lw=1.5, label=f"fit {summary['phi']:.3f}")
    for bound in summary["phi_ci"] or []:
        ax.axvline(bound, color="black", lw=1, ls="--")
    for value, colour, meaning in ((0, "#c0392b", "phi = 0: a recurrence adds nothing"),
                                   (1, "#27ae60", "phi = 1: worth a layer of its own")):
        ax.axvline(value, color=colour, lw=1.5, ls=":", label=meaning)
    ax.set(xlabel="phi", ylabel="resamples",
           title=f"Bootstrap of phi ({len(phis)} resamples of {result.bootstrap_unit}s); "
                 "dashed: interval")
    ax.legend(fontsize=8, loc="upper left")
    return fig


def _plot_frontier(result, plt, colours) -> object:
    runs, theta = result.runs, result.fit.theta
    flops = runs.training_flops()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    grid = np.geomspace(flops.min() / 2, flops.max() * 2, 50)
    for r, fam in families(runs).items():
        colour = colours[r]
        at = runs.recurrences == r
        ax.scatter(flops[at], runs.loss[at], color=colour, s=14, alpha=0.6)
        curve = optimal_curve(theta, r, fam, grid)
        ax.plot(grid, curve["loss"], color=colour, lw=1.5, label=f"r = {r:g} compute-optimal")
    ax.set_xscale("log")
    ax.set(xlabel="training FLOPs", ylabel="loss",
           title="Loss against compute: runs and the fitted frontier per r")
    ax.legend(fontsize=8)
    return fig


def write_plots(result, summary: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = _colours(set(result.runs.recurrences.tolist()))
    made = []
    figures = {"loss_vs_n": _plot_loss_vs_n(result, plt, colours),
               "n_eff_collapse": _plot_collapse(result, summary, plt, colours),
               "optimal_scaling": _plot_optimal(summary, plt, colours),
               "observed_vs_predicted": _plot_observed(result, plt, colours),
               "residuals": _plot_residuals(result, plt, colours),
               "phi_bootstrap": _plot_phi(result, summary, plt),
               "frontier": _plot_frontier(result, plt, colours)}
    for name, fig in figures.items():
        if fig is not None:
            _save(fig, out_dir, name)
            plt.close(fig)
            made.append(name)
    return made


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def markdown(summary: dict, plots: list[str]) -> str:
    s = summary
    lines = [f"# Scaling-law fit: {s['law']} law", "",
             f"{s['n_runs']} runs from {s['source']}.", "", f"In short: {s['in_short']}"]
    if s.get("skipped"):
        lines.append("Skipped: " + "; ".join(f"{n} {why}" for why, n in s["skipped"].items())
                     + ".")
    level = int(round(100 * s["ci_level"]))
    lines += ["", f"Law: `L = E + A (N_once + r^phi N_rec)^-alpha + B D^-beta`, fitted by the "
              f"Huber (delta {s['settings']['huber_delta']:g}) objective on log loss from "
              f"{s['settings']['starts']} starts; {level}% percentile intervals from "
              f"{s['bootstrap']['fitted']} bootstrap resamples of {s['bootstrap']['unit']}s "
              f"(seed {s['settings']['seed']}).", "", "## Parameters", ""]
    lines += _table(["parameter", "value", f"{level}% interval"],
                    [list(row) for row in parameter_rows(s)])
    if s["phi"] is None:
        lines += ["", "phi: null. No run has both n_rec > 0 and r > 1, so the Chinchilla law "
                  "was fitted with N = n_once + n_rec."]
    lines += ["", f"R2 {s['r2']:.5f}; objective {_number(s['objective'])}; RMSE of the loss "
              f"{_number(s['rmse'], 3)} nats.", ""]
    lines += _table(["r", "RMSE (nats)"], [[r, _number(v, 3)] for r, v in s["rmse_per_r"].items()])
    if s.get("comparison"):
        comp = s["comparison"]
        lines += ["", "## phi free against fixed phi", ""]
        lines += _table(["phi", "free parameters", "objective", "R2", "dBIC", "LR p"],
                        [[name if name == "free" else f"fixed {name}", row["free_parameters"],
                          _number(row["objective"]), f"{row['r2']:.5f}",
                          _number(row.get("delta_bic"), 3), _number(row.get("lr_p"), 2)]
                         for name, row in comp.items() if name != "verdict"])
        lines += ["", comp["verdict"]]
    if s["per_r"]:
        lines += ["", "## One Chinchilla fit per r (N = N_once + N_rec)", ""]
        lines += _table(["r", "E", "A", "B", "alpha", "beta", "R2", "runs"],
                        [[r, *(_number(f[k]) for k in ("E", "A", "B", "alpha", "beta")),
                          f"{f['r2']:.5f}", f["n_runs"]] for r, f in s["per_r"].items()])
    if s["equivalence"]:
        lines += ["", "## What a recurrence is worth", ""]
        lines += [f"- {e['sentence']}" for e in s["equivalence"]]
    lines += ["", "## Compute-optimal models per r", ""]
    lines += _table(["budget (FLOPs)", "r", "N unique", "tokens", "tokens/param", "loss"],
                    [[f"{c['budget_flops']:.3g}", f"{c['r']:g}", human(c["n_unique"]),
                      human(c["tokens"]), f"{c['tokens_per_parameter']:.1f}",
                      f"{c['loss']:.4f}" + (" (edge)" if c["at_edge"] else "")]
                     for c in s["compute_optimal"]])
    if s["iso_flop_minima"]:
        lines += ["", "## Measured iso-FLOP minima (parabola of loss in log N)", ""]
        lines += _table(["budget (FLOPs)", "r", "points", "N at minimum", "loss at minimum",
                         "inside sampled range"],
                        [[f"{m['budget_flops']:.3g}", f"{m['r']:g}", m["n_points"],
                          human(m["n_unique"]) if m["n_unique"] else "none",
                          _number(m["loss"]), _number(m["inside"])]
                         for m in s["iso_flop_minima"]])
    if s["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in s["warnings"]]
    lines += ["", f"## The {len(s['runs'])} runs fitted", ""]
    lines += _table(["run", "MLflow run id", "r", "N once", "N loop", "tokens", "loss"],
                    [[run["name"], run["run_id"] or "", f"{run['recurrences']:g}",
                      human(run["n_once"]), human(run["n_rec"]), human(run["tokens"]),
                      f"{run['loss']:.4f}"] for run in s["runs"]])
    for name in plots:
        lines += ["", f"## {PLOTS[name]}", "", f"![{PLOTS[name]}]({name}.png)"]
    return "\n".join(lines) + "\n"


def write_report(result, summary: dict, out_dir: str | Path) -> Path:
    """report.md, fit.json and the plots (PNG and SVG) in `out_dir`; returns the Markdown
    path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(result, summary, out_dir)
    atomic_write_json(out_dir / "fit.json", summary)
    path = out_dir / "report.md"
    atomic_write_bytes(path, markdown(summary, plots).encode())
    return path
