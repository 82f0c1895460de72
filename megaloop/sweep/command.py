"""`megaloop sweep` as one function: plan the spec, show the plan or train what is not finished,
say how a stopped sweep goes on, and fit the experiment when asked. It returns what the command
prints and its exit status; cli.py prints them."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from typing import Any

from megaloop.device import CPU, resolve_precision
from megaloop.fit.command import run_fit
from megaloop.fit.report import format_summary
from megaloop.sweep.execute import SweepOutcome, execute, sweep_folder
from megaloop.sweep.plan import plan, plan_rows, plan_table, read_spec
from megaloop.track import tracking_uri

EXIT_STOPPED = 3  # a sweep stopped by SIGTERM before its last run: not an error, not done
ASSUMED_MFU = 0.4  # for the plan's estimate of its time


@dataclass
class SweepReport:
    printed: list[str] = field(default_factory=list)  # what the command prints, in order
    code: int = 0


def stopped_sweep_summary(outcome: SweepOutcome, argv: list[str], fit: bool) -> str:
    """What a sweep stopped by SIGTERM trained, what is left, and how to go on."""
    lines = [f"sweep {outcome.experiment}: stopped by SIGTERM"]
    if outcome.interrupted:
        lines.append(f"  interrupted: {outcome.interrupted} (its checkpoint is saved; it "
                     "resumes from it)")
    left = [*([outcome.interrupted] if outcome.interrupted else []), *outcome.left]
    lines.append(f"  left: {len(left)} run(s): {', '.join(left)}")
    if fit:
        lines.append("  not fitted: the sweep is not complete")
    lines.append(f"  continue with: megaloop {shlex.join(argv)} (finished runs are skipped)")
    return "\n".join(lines)


def sweep(spec_path: str, *, dry_run: bool = False, as_json: bool = False,
          executor: str = "inprocess", nproc: int = 1, jobs: int = 1,
          slurm_options: dict[str, Any] | None = None, progress: bool = True,
          fit: bool = False, fit_restarts: int = 500, fit_bootstrap: int = 200,
          argv: list[str] | None = None) -> SweepReport:
    """Run (or with `dry_run` show) the sweep of spec `spec_path`; `slurm_options`: the CLI's
    resources over the spec's `slurm:` mapping; `argv`: the command, for how to go on."""
    report = SweepReport()
    spec = read_spec(spec_path)
    runs = plan(spec)
    if dry_run and as_json:
        report.printed.append(json.dumps(plan_rows(runs), indent=2))
    elif dry_run:
        from megaloop.train.mfu import peak_flops  # torch, only for the dry run's estimate

        precision = resolve_precision(runs[0].config.train.precision if runs else "fp32", CPU)
        peak, _ = peak_flops(None, precision)
        report.printed.append(plan_table(runs, peak, assumed_mfu=ASSUMED_MFU))
    slurm = spec["slurm"].overridden(**(slurm_options or {}))
    outcome = execute(runs, spec["experiment"], executor=executor, nproc=nproc, jobs=jobs,
                      dry_run=dry_run, progress=progress, borrow=spec["borrow"], slurm=slurm)
    if outcome.script and dry_run:
        report.printed.append(outcome.script)
    if not dry_run:
        report.printed.append(f"sweep {outcome.experiment}: {outcome.planned} runs planned, "
                              f"{len(outcome.skipped)} already finished, "
                              f"{len(outcome.trained)} trained")
    if outcome.stopped:
        report.printed.append(stopped_sweep_summary(outcome, argv or [], fit))
        report.code = EXIT_STOPPED
        return report
    if fit and not dry_run and executor != "slurm":
        report.printed += fit_sweep(outcome.experiment, runs[0].config.track, fit_restarts,
                                    fit_bootstrap)
    return report


def fit_sweep(experiment: str, track: Any, restarts: int, bootstrap: int) -> list[str]:
    """The fit of a finished sweep, its report in the sweep's folder: what it prints."""

    folder = sweep_folder(experiment) / "fit"
    _, summary = run_fit(experiment=experiment, tracking=tracking_uri(track),
                         report_dir=str(folder), json_out=str(folder / "fit.json"),
                         restarts=restarts, bootstrap=bootstrap)
    return [format_summary(summary), f"report: {summary.get('report', folder)}"]
