"""`megaloop fit` as two functions: `run_fit` (read the runs, fit, write the JSON and report, log
to MLflow) and `run_compare` (`--against`: delta phi of two sets of runs, compare.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from megaloop.atomic import atomic_write_json
from megaloop.errors import FitError
from megaloop.fit.compare import compare
from megaloop.fit.fitter import FitResult, fit
from megaloop.fit.inputs import Runs, parse_filters, read_csv, read_mlflow
from megaloop.fit.report import write_report
from megaloop.track.names import Tag
from megaloop.track.runs import log_fit_run


def read_runs(runs_csv: str | None, experiment: str | None, filters: list[str] | None,
              tracking: str | None) -> Runs:
    """The runs of a CSV file, or the finished runs of an MLflow experiment with these tags."""
    if filters and experiment is None:
        raise FitError("--filter selects MLflow runs: use it with --experiment, not --runs.")
    if runs_csv is not None:
        return read_csv(runs_csv)
    return read_mlflow(experiment, tracking=tracking, filter_tags=parse_filters(filters))


def run_fit(*, runs_csv: str | None = None, experiment: str | None = None,
            filters: list[str] | None = None, tracking: str | None = None,
            fix_phi: float | None = None, restarts: int = 500, bootstrap: int = 200,
            seed: int = 0, json_out: str | None = None, report_dir: str | None = None,
            log_to_mlflow: bool = True) -> tuple[FitResult, dict]:
    """Fit the runs of a CSV file or of an MLflow experiment; returns the fit and its summary
    (the JSON). From MLflow the fit is also logged as a run of its own, with the report (made in
    a temporary folder when `report_dir` is not given) as artifacts."""
    if (runs_csv is None) == (experiment is None):
        raise FitError("Give the runs to fit: either --runs FILE.csv or --experiment NAME.")
    runs = read_runs(runs_csv, experiment, filters, tracking)
    result = fit(runs, fix_phi=fix_phi, restarts=restarts, bootstrap=bootstrap, seed=seed)
    summary = result.to_json()
    if experiment is not None and log_to_mlflow:
        fitted = [{"run_id": run_id, "name": name}
                  for run_id, name in zip(runs.run_ids, runs.names, strict=True)]
        if report_dir is not None:
            summary["report"] = str(write(result, summary, report_dir))
            summary["mlflow_run_id"] = _log(experiment, filters, tracking, summary, report_dir,
                                            fitted)
        else:
            with tempfile.TemporaryDirectory(prefix="megaloop-fit-") as folder:
                write(result, summary, folder)
                summary["mlflow_run_id"] = _log(experiment, filters, tracking, summary, folder,
                                                fitted)
    elif report_dir is not None:
        summary["report"] = str(write(result, summary, report_dir))
    if json_out is not None:
        atomic_write_json(json_out, summary)
    return result, summary


def write(result: FitResult, summary: dict, folder: str | Path) -> Path:

    return write_report(result, summary, folder)


def fit_metrics(summary: dict) -> dict[str, float]:
    """The numbers of a fit as flat MLflow metric names."""
    metrics = {k: summary[k] for k in ("E", "A", "B", "alpha", "beta", "phi", "r2",
                                       "objective", "n_runs", "rmse")}
    for name, ci in summary["ci"].items():
        if ci:
            metrics[f"{name}_lo"], metrics[f"{name}_hi"] = ci
    metrics.update({f"rmse_r{r}": v for r, v in summary["rmse_per_r"].items()})
    for name, row in (summary.get("comparison") or {}).items():
        if name != "verdict":
            tag = "free" if name == "free" else f"fixed_{name}"
            metrics.update({f"compare/{tag}/r2": row["r2"],
                            f"compare/{tag}/objective": row["objective"]})
            if "delta_bic" in row:
                metrics[f"compare/{tag}/delta_bic"] = row["delta_bic"]
    return metrics


RUN_IDS_TAG_LIMIT = 5000  # characters: MLflow's tag values are bounded; the artifact is not


def _log(experiment: str, filters, tracking, summary: dict, folder,
         fitted: list[dict[str, str]]) -> str:
    """The fit as an MLflow run, with the runs it took: `fitted_runs.json` (run id and name of
    each) and, while short enough for a tag, `megaloop.fit.run_ids`."""

    atomic_write_json(Path(folder) / "fitted_runs.json", fitted)
    run_ids = ",".join(run["run_id"] for run in fitted)

    settings = summary["settings"]
    params = {"fit.law": summary["law"], "fit.source": summary["source"],
              "fit.filter": ",".join(filters or []) or None,
              "fit.restarts": settings["restarts"], "fit.starts": settings["starts"],
              "fit.bootstrap": settings["bootstrap"], "fit.seed": settings["seed"],
              "fit.fix_phi": settings["fix_phi"],
              "fit.bootstrap_unit": summary["bootstrap"]["unit"]}
    skipped = sum(summary["skipped"].values())
    tags = {Tag.FIT_EXPERIMENT: experiment, Tag.FIT_SKIPPED_RUNS: str(skipped),
            Tag.FIT_N_RUNS: str(len(fitted))}
    if len(run_ids) <= RUN_IDS_TAG_LIMIT:
        tags[Tag.FIT_RUN_IDS] = run_ids
    return log_fit_run(experiment, params=params, metrics=fit_metrics(summary),
                       artifact_dir=folder, tags=tags, tracking=tracking,
                       run_name=f"fit-{summary['law'].replace(', ', '-').replace(' ', '-')}")


def run_compare(*, against: str, runs_csv: str | None = None, experiment: str | None = None,
                filters: list[str] | None = None, tracking: str | None = None,
                restarts: int = 500, bootstrap: int = 200, seed: int = 0,
                json_out: str | None = None, log_to_mlflow: bool = True) -> dict:
    """Δφ of B (`runs_csv` or `experiment`) against A (`against`: a CSV, or an experiment of
    the same store); from MLflow it is logged as a fit run of B's experiment."""

    if (runs_csv is None) == (experiment is None):
        raise FitError("Give the runs to compare: --runs FILE.csv --against OTHER.csv, or "
                       "--experiment NAME --against OTHER_EXPERIMENT.")
    runs_b = read_runs(runs_csv, experiment, filters, tracking)
    from_csv = runs_csv is not None  # A comes from where B comes from
    runs_a = read_runs(against if from_csv else None, None if from_csv else against, filters,
                       tracking)
    summary = compare(runs_a, runs_b, restarts=restarts, bootstrap=bootstrap, seed=seed,
                      names=(against, experiment or runs_csv))
    if experiment is not None and log_to_mlflow:
        summary["mlflow_run_id"] = _log_compare(experiment, against, tracking, summary)
    if json_out is not None:
        atomic_write_json(json_out, summary)
    return summary


def _log_compare(experiment: str, against: str, tracking: str | None, summary: dict) -> str:

    lo, hi = summary["delta_phi_ci"]
    metrics = {"delta_phi": summary["delta_phi"], "delta_phi_lo": lo, "delta_phi_hi": hi,
               "phi_a": summary["phi_a"], "phi_b": summary["phi_b"],
               "excludes_zero": float(summary["excludes_zero"])}
    settings = summary["settings"]
    with tempfile.TemporaryDirectory(prefix="megaloop-compare-") as folder:
        atomic_write_json(Path(folder) / "compare.json", summary)
        return log_fit_run(experiment, params={"fit.against": against,
                                               "fit.restarts": settings["restarts"],
                                               "fit.bootstrap": settings["bootstrap"],
                                               "fit.seed": settings["seed"]},
                           metrics=metrics, artifact_dir=folder, tracking=tracking,
                           tags={Tag.FIT_EXPERIMENT: experiment,
                                 Tag.FIT_AGAINST: against},
                           run_name=f"compare-against-{against}")
