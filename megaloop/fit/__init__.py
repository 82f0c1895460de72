"""The scaling-law fitter: how much is one recurrence worth (phi)? numpy and scipy, no torch;
MLflow runs are read and fits logged through track/.

    law.py       the looped law in log-sum-exp form, Huber objective, analytic gradients
    batch.py     a batched, box-projected L-BFGS (the first pass over thousands of starts)
    fitter.py    multi-start fit (polished by scipy's L-BFGS-B), comparisons, bootstrap
    inputs.py    runs from a CSV file or from the finished runs of an MLflow experiment
    readout.py   phi comparison, equivalent unique parameters, compute-optimal sizes,
                 iso-FLOP minima, the JSON of a fit
    compare.py   delta phi of two sets of runs with a (paired) bootstrap interval, and the
                 sign test over seeds (`megaloop fit --against`)
    report.py    the text summary and a Markdown report with plots, PNG and SVG (matplotlib,
                 imported only when plots are asked for)
    command.py   `megaloop fit` as two functions: run_fit, and run_compare for --against
    synthetic.py runs on the iso-depth paper's grid that follow a given law (tests, benchmarks)

Typical use:

    from megaloop.fit import fit, read_csv
    result = fit(read_csv("runs.csv"), restarts=500, bootstrap=200, seed=0)
    summary = result.to_json()          # E, A, B, alpha, beta, phi, phi_ci, r2, ...
"""

from megaloop.fit.command import run_fit
from megaloop.fit.fitter import FitResult, LawFit, fit, fit_law, hoffmann_grid, random_starts
from megaloop.fit.inputs import Runs, read_csv, read_mlflow
from megaloop.fit.law import BOX, HUBER_DELTA, LawData, Objective, predict_loss
from megaloop.fit.readout import compute_optimal, equivalence, iso_flop_minima

__all__ = [
    "BOX",
    "HUBER_DELTA",
    "FitResult",
    "LawData",
    "LawFit",
    "Objective",
    "Runs",
    "compute_optimal",
    "equivalence",
    "fit",
    "fit_law",
    "hoffmann_grid",
    "iso_flop_minima",
    "predict_loss",
    "random_starts",
    "read_csv",
    "read_mlflow",
    "run_fit",
]
