"""The runs a fit reads: a CSV file or the finished runs of an MLflow experiment.

CSV columns (DESIGN.md "Fit input"): `n_once, n_rec, recurrences, tokens, loss`, optionally
`budget_flops` and `flops_per_token` (other columns are ignored; an empty optional cell means
unknown) and `seed` (the training seed, which `fit --against` compares seed by seed). From
MLflow: the params of the same names (the seed: `train.seed`) and the final metric `val/loss` of
runs tagged `megaloop.status=finished`; the others are skipped and counted by reason.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megaloop.config import TrackConfig
from megaloop.errors import FitError
from megaloop.fit.law import LawData
from megaloop.track import find_runs, tracking_uri
from megaloop.track.names import Metric, Tag
from megaloop.track.runs import experiment_tags

REQUIRED = ("n_once", "n_rec", "recurrences", "tokens", "loss")
OPTIONAL = ("budget_flops", "flops_per_token")


@dataclass
class Runs:
    """Runs to fit, one entry per run; NaN in an optional array means unknown."""

    n_once: np.ndarray
    n_rec: np.ndarray
    recurrences: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    budget_flops: np.ndarray | None = None
    flops_per_token: np.ndarray | None = None
    names: list[str] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)  # MLflow's, one per run (none from a CSV)
    seeds: np.ndarray | None = None  # each run's training seed, where known (NaN: unknown)
    source: str = ""
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (MLflow)

    def __post_init__(self) -> None:
        for name in (*REQUIRED, *OPTIONAL):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, np.asarray(value, dtype=float).ravel())
        if self.seeds is not None:
            self.seeds = np.asarray(self.seeds, dtype=float).ravel()
        if not self.names:
            self.names = [f"run {i + 1}" for i in range(len(self.loss))]
        validate(self)

    def __len__(self) -> int:
        return len(self.loss)

    def law_data(self) -> LawData:
        """The arrays the law is fitted to."""
        return LawData.from_arrays(self.n_once, self.n_rec, self.recurrences, self.tokens,
                                   self.loss)

    def subset(self, keep: np.ndarray) -> Runs:
        """The runs where boolean or index array `keep` selects."""
        keep = np.flatnonzero(np.asarray(keep)) if np.asarray(keep).dtype == bool else keep
        optional = {name: None if getattr(self, name) is None else getattr(self, name)[keep]
                    for name in OPTIONAL}
        return Runs(**{name: getattr(self, name)[keep] for name in REQUIRED}, **optional,
                    names=[self.names[i] for i in keep], source=self.source,
                    seeds=None if self.seeds is None else self.seeds[keep])

    def seed_values(self) -> list[float]:
        """The distinct seeds of the runs, where every run's is known; else []."""
        if self.seeds is None or not np.all(np.isfinite(self.seeds)):
            return []
        return sorted(set(self.seeds.tolist()))

    @property
    def n_unique(self) -> np.ndarray:
        return self.n_once + self.n_rec

    @property
    def budgets_known(self) -> bool:
        return self.budget_flops is not None and bool(np.all(np.isfinite(self.budget_flops)))

    def training_flops(self) -> np.ndarray:
        """Training compute per run: its budget, else F * D, else 6 (N_once + r N_rec) D."""
        flops = 6 * (self.n_once + self.recurrences * self.n_rec) * self.tokens
        if self.flops_per_token is not None:
            flops = np.where(np.isfinite(self.flops_per_token),
                             self.flops_per_token * self.tokens, flops)
        if self.budget_flops is not None:
            flops = np.where(np.isfinite(self.budget_flops), self.budget_flops, flops)
        return flops


def validate(runs: Runs) -> None:
    """FitError for a value that no law can take: non-finite, non-positive, r < 1."""
    lengths = {name: len(getattr(runs, name)) for name in (*REQUIRED, *OPTIONAL)
               if getattr(runs, name) is not None}
    if len(set(lengths.values())) > 1:
        raise FitError(f"Run columns have different lengths {lengths}: give one value per run.")
    checks = [("n_once", runs.n_once >= 0, ">= 0"), ("n_rec", runs.n_rec >= 0, ">= 0"),
              ("recurrences", runs.recurrences >= 1, ">= 1"), ("tokens", runs.tokens > 0, "> 0"),
              ("loss", runs.loss > 0, "> 0 (a loss in nats per token)")]
    for name in OPTIONAL:
        values = getattr(runs, name)
        if values is not None:
            checks.append((name, np.isnan(values) | (values > 0), "> 0 (or empty: unknown)"))
    for name, ok, rule in checks:
        values = getattr(runs, name)
        finite = np.isfinite(values) | (np.isnan(values) if name in OPTIONAL else False)
        bad = np.flatnonzero(~(ok & finite))
        if bad.size:
            where = ", ".join(f"{runs.names[i]} ({values[i]:g})" for i in bad[:5])
            more = f" and {bad.size - 5} more" if bad.size > 5 else ""
            raise FitError(f"{name} must be finite and {rule}, but is not for {where}{more} of "
                           f"{runs.source or 'the runs'}. Correct or remove those runs.")
    empty = np.flatnonzero(runs.n_once + runs.n_rec <= 0)
    if empty.size:
        raise FitError(f"{runs.names[empty[0]]} of {runs.source or 'the runs'} has n_once = "
                       "n_rec = 0: a model needs parameters. Correct or remove it.")


def _number(text: str, column: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise FitError(f"{column} = {text!r} in {where} is not a number: correct the value "
                       "(a plain number such as 1.2e9).") from None


def read_csv(path: str | Path) -> Runs:
    """Runs from a CSV file with a header row (see the module docstring)."""
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in (reader.fieldnames or [])]
            rows = [{k.strip(): (v or "").strip() for k, v in row.items()
                     if isinstance(k, str) and not isinstance(v, list)} for row in reader]
    except FileNotFoundError:
        raise FitError(f"Runs file {path} does not exist: give the path of a CSV file with "
                       f"columns {', '.join(REQUIRED)}.") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FitError(f"Cannot read runs file {path} as CSV: {exc}.") from None
    missing = [name for name in REQUIRED if name not in header]
    if missing:
        raise FitError(f"{path} lacks column{'s' if len(missing) > 1 else ''} "
                       f"{', '.join(missing)} (it has: {', '.join(header) or 'no header'}). "
                       f"A runs file needs columns {', '.join(REQUIRED)} and may add "
                       f"{', '.join(OPTIONAL)}.")
    if not rows:
        raise FitError(f"{path} has a header but no runs: add one row per finished run.")
    columns: dict[str, list[float]] = {name: [] for name in (*REQUIRED, *OPTIONAL)}
    for line, row in enumerate(rows, start=2):
        where = f"{path} line {line}"
        for name in REQUIRED:
            if not row.get(name):
                raise FitError(f"{where} has no {name}: fill it in or remove the row.")
            columns[name].append(_number(row[name], name, where))
        for name in OPTIONAL:
            text = row.get(name, "")
            columns[name].append(_number(text, name, where) if text else math.nan)
    optional = {name: columns[name] if name in header else None for name in OPTIONAL}
    names = [f"{path.name} line {line}" for line in range(2, len(rows) + 2)]
    seeds = ([_number(row["seed"], "seed", f"{path} line {line}") if row.get("seed")
              else math.nan for line, row in enumerate(rows, start=2)]
             if "seed" in header else None)
    return Runs(**{name: columns[name] for name in REQUIRED}, **optional, names=names,
                source=str(path), seeds=seeds)


def parse_filters(filters: list[str] | None) -> dict[str, str]:
    """["TAG=VALUE", ...] -> {TAG: VALUE}."""
    parsed = {}
    for item in filters or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FitError(f"Filter {item!r} is not TAG=VALUE: write e.g. "
                           "--filter megaloop.config_hash=abc123.")
        parsed[key.strip()] = value.strip()
    return parsed


def read_mlflow(experiment: str, *, tracking: str | None = None,
                filter_tags: dict[str, str] | None = None) -> Runs:
    """The finished runs of an MLflow experiment, and those it borrows from others (its tag
    megaloop.borrow, set by the sweep whose spec says `borrow`: a case study's r = 1 baseline);
    `Runs.skipped` counts the others by reason."""


    uri = tracking or tracking_uri(TrackConfig(), create=False)
    every = [run for run in find_runs(experiment, tracking=uri, status=None,
                                      filter_tags=filter_tags)
             if run["tags"].get(Tag.KIND) != "fit"]
    borrowed = json.loads(experiment_tags(experiment, tracking=uri).get(Tag.BORROW, "[]"))
    for source in borrowed:
        theirs = [dict(run, name=f"{source['experiment']}/{run['name'] or run['run_id']}")
                  for run in find_runs(source["experiment"], tracking=uri, status=None,
                                       filter_tags=filter_tags)
                  if run["tags"].get(Tag.KIND) != "fit"
                  and run["params"].get("recurrences") in {str(r) for r in source["recurrences"]}]
        if not any(run["status"] == "finished" for run in theirs):
            rs = ", ".join(str(r) for r in source["recurrences"])
            raise FitError(f"MLflow experiment '{experiment}' borrows the r = {rs} runs of "
                           f"'{source['experiment']}', which has none finished at {uri}: run "
                           f"that sweep first (its r = {rs} runs), then fit again.")
        every += theirs
    skipped: Counter[str] = Counter()
    columns: dict[str, list[float]] = {name: [] for name in (*REQUIRED, *OPTIONAL)}
    names: list[str] = []
    run_ids: list[str] = []
    seeds: list[float] = []
    for run in every:
        if run["status"] != "finished":
            skipped[f"not finished (megaloop.status={run['status'] or 'unset'})"] += 1
            continue
        loss = run["metrics"].get(Metric.VAL_LOSS)
        if loss is None or not math.isfinite(loss):
            skipped[f"no finite final {Metric.VAL_LOSS}"] += 1
            continue
        values, absent = {}, []
        for name in REQUIRED[:-1]:
            try:
                values[name] = float(run["params"][name])
            except (KeyError, ValueError):
                absent.append(name)
        if absent:
            skipped[f"missing params {', '.join(absent)}"] += 1
            continue
        for name in REQUIRED[:-1]:
            columns[name].append(values[name])
        columns["loss"].append(float(loss))
        for name in OPTIONAL:
            try:
                columns[name].append(float(run["params"].get(name, "nan")))
            except ValueError:
                columns[name].append(math.nan)
        names.append(f"run {run['name'] or run['run_id']}")
        run_ids.append(run["run_id"])
        try:
            seeds.append(float(run["params"].get("train.seed", "nan")))
        except ValueError:
            seeds.append(math.nan)
    where = f"MLflow experiment '{experiment}' at {uri}" + (
        f" (filter {', '.join(f'{k}={v}' for k, v in filter_tags.items())})"
        if filter_tags else "") + "".join(
        f", with the r = {', '.join(map(str, b['recurrences']))} runs of '{b['experiment']}'"
        for b in borrowed)
    if not names:
        why = "; ".join(f"{count} {reason}" for reason, count in skipped.items())
        raise FitError(f"{where} has no finished runs to fit"
                       + (f" ({len(every)} skipped: {why})" if every else
                          " (no runs at all: check the experiment name, the filter and "
                          "MLFLOW_TRACKING_URI)")
                       + ". Wait for runs to finish, or fit a CSV file with --runs.")
    return Runs(**columns, names=names, run_ids=run_ids, source=where, skipped=dict(skipped),
                seeds=seeds)
