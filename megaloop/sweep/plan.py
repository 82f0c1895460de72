"""Sweep spec -> run configs: a pure function of the spec (and the base config it names).

A spec is data (configs/sweeps/*.yaml):

    experiment: isodepth-paper          # the MLflow experiment
    base: ../runs/isodepth-s10-r1.yaml  # run config every run starts from (relative to the spec)
    name: "r{{ r }}-s{{ s }}-C{{ budget | sci }}"
    recurrences: [1, 2, 4, 8]           # axis r
    width: {per_scale: 64, multiple: 128}   # d = 64 s rounded up to a multiple of 128
    budgets: {4.64e17: [6, 8, 10, 12], 1e18: [6, 8, 10, 12, 14]}   # FLOPs -> scales s
    set:                                # overrides of every run; strings may be Jinja2
      model.loop_layers: "{{ 16 // r }}"   #   expressions over r, s, d, budget, variant, seed,
                                        #   and tokens and steps (of this run; not for the model
                                        #   or the batch, which decide them)
      model.n_heads: "{{ d // 128 }}"
    lr_scaling: {reference_width: 640, exponent: -1.0}   # optional: AdamW's lrs (train.lr,
                                        # min_lr and each <role>_lr) x (d / 640)^-1
    variants: {looped: {model.hyper: none}, hyperloop: {...}}   # optional axis `variant`;
                                        # a variant may also give its own base and tokens
    seeds: [0, 1, 2]                    # optional axis `seed` (sets train.seed)
    borrow: {experiment: isodepth-paper, recurrences: [1]}   # optional: the fit also takes
                                        # these runs of another experiment (a case study's
                                        # r = 1 baseline, trained once)
    tokens: 12500000000                 # instead of budgets: a fixed token count per run
    where: "{{ r == 1 or budget < 2e11 }}"   # optional: train only the cells where this
                                        # expression over r, s, d, budget, variant, seed is true

Each run's tokens are budget / flops_per_token (the model's accounting), rounded to whole
global batches; the nominal budget is recorded as train.budget_flops.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta

from megaloop import config as run_config
from megaloop.config import LR_ROLES, RunConfig
from megaloop.display import duration
from megaloop.errors import ConfigError
from megaloop.model.accounting import account
from megaloop.sweep.slurm import SlurmResources
from megaloop.templating import SandboxedNativeEnvironment, render_or_refuse

SPEC_KEYS = {"experiment", "base", "name", "recurrences", "width", "budgets", "scales", "tokens",
             "set", "lr_scaling", "variants", "seeds", "description", "borrow", "slurm",
             "where"}
REQUIRED = {"experiment", "name"}
VARIANT_KEYS = {"base", "tokens"}  # what a variant may set besides config overrides
RUN_LENGTH = {"tokens", "steps"}  # known to the expressions only once the run is measured


@dataclass(frozen=True)
class PlannedRun:
    name: str
    config: RunConfig
    context: dict[str, Any]
    budget_flops: float | None
    tokens: int
    flops_per_token: float
    n_once: int
    n_rec: int

    @property
    def compute(self) -> float:
        return self.tokens * self.flops_per_token


def sci(value: float) -> str:
    """1e18 -> '1e18', 4.64e17 -> '4.64e17', 2.15e+19 -> '2.15e19'."""
    mantissa, exponent = f"{value:.3g}".split("e") if "e" in f"{value:.3g}" else (f"{value:g}", "0")
    return f"{mantissa}e{int(exponent)}"


def _environment() -> SandboxedNativeEnvironment:
    env = SandboxedNativeEnvironment(undefined=jinja2.StrictUndefined)
    env.filters["sci"] = sci
    return env


def _render(value: Any, context: dict[str, Any], where: str) -> Any:
    if not isinstance(value, str) or "{" not in value:
        return value
    return render_or_refuse(lambda: _environment().from_string(value).render(**context),
                            f"Sweep spec: {where} = {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_flops(key: Any) -> bool:
    """A budget's key: a number, or a string YAML left unparsed (`1e18` lacks YAML 1.1's dot)."""
    try:
        return _is_number(float(key)) and float(key) > 0
    except (TypeError, ValueError):
        return False


SHAPES: dict[str, tuple[Any, str]] = {  # key: (check, what it must be, with an example)
    "experiment": (lambda v: isinstance(v, str) and v.strip(), "a name, e.g. experiment: mine"),
    "name": (lambda v: isinstance(v, str), "a string, e.g. name: 'r{{ r }}-d{{ d }}'"),
    "base": (lambda v: isinstance(v, str), "a run config's path"),
    "description": (lambda v: isinstance(v, str), "a string"),
    "recurrences": (lambda v: isinstance(v, list) and v and all(
        isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in v),
        "a list of whole numbers >= 1, e.g. recurrences: [1, 2, 4]"),
    "seeds": (lambda v: isinstance(v, list) and all(isinstance(x, int) for x in v),
              "a list of whole numbers, e.g. seeds: [0, 1]"),
    "scales": (lambda v: isinstance(v, list) and all(_is_number(x) for x in v),
               "a list of numbers, e.g. scales: [2, 3, 4]"),
    "budgets": (lambda v: isinstance(v, dict) and v and all(
        _is_flops(c) and isinstance(scales, list) and all(_is_number(x) for x in scales)
        for c, scales in v.items()),
        "a mapping of FLOPs to the scales trained at them, e.g. budgets: {1e18: [2, 3, 4]}"),
    "width": (lambda v: isinstance(v, dict) and all(_is_number(x) for x in v.values()),
              "a mapping, e.g. width: {per_scale: 64, multiple: 64}"),
    "set": (lambda v: isinstance(v, dict), "a mapping of config keys to values or expressions"),
    "where": (lambda v: isinstance(v, str) and "{{" in v,
              "an expression over r, s, d, budget, variant and seed, e.g. "
              "where: \"{{ r == 1 or budget < 2e11 }}\""),
    "variants": (lambda v: isinstance(v, dict) and all(x is None or isinstance(x, dict)
                                                        for x in v.values()),
                 "a mapping of variant names to their settings, e.g. variants: {plain: {}}"),
    "lr_scaling": (lambda v: isinstance(v, dict) and set(v) == {"reference_width", "exponent"}
                   and all(_is_number(x) for x in v.values()) and v["reference_width"] > 0,
                   "a mapping with a positive reference_width and an exponent, e.g. "
                   "lr_scaling: {reference_width: 640, exponent: -0.5}"),
}


def check_shapes(spec: dict[str, Any], path: str | Path) -> None:
    """Every key of a spec holds the kind of value the plan reads (before anything renders)."""
    for key, (check, what) in SHAPES.items():
        if key in spec and spec[key] is not None and not check(spec[key]):
            raise ConfigError(f"Sweep spec {path}: {key} = {spec[key]!r} must be {what}.")
    if "tokens" in spec and not (_is_number(spec["tokens"]) and spec["tokens"] > 0):
        raise ConfigError(f"Sweep spec {path}: tokens = {spec['tokens']!r} must be a positive "
                          "number of tokens per run, e.g. tokens: 1e8.")


def read_spec(path: str | Path) -> dict[str, Any]:
    spec = run_config.read_yaml(path, "sweep spec", "configs/sweeps/")
    if not isinstance(spec, dict):
        raise ConfigError(f"Sweep spec {path} must be a mapping (experiment: ..., name: ...).")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ConfigError(f"Sweep spec {path}: unknown key '{unknown[0]}'; the keys are: "
                          f"{', '.join(sorted(SPEC_KEYS))}.")
    missing = sorted(REQUIRED - set(spec))
    if missing:
        raise ConfigError(f"Sweep spec {path} lacks '{missing[0]}'.")
    check_shapes(spec, path)
    variants = spec.get("variants") or {}
    with_tokens = "tokens" in spec or (variants and all("tokens" in (v or {})
                                                        for v in variants.values()))
    if ("budgets" in spec) == bool(with_tokens):
        raise ConfigError(f"Sweep spec {path}: give either budgets (FLOPs -> scales) or tokens "
                          "(a fixed count per run, or per variant), not both or neither.")
    spec["borrow"] = borrowed_runs(spec.get("borrow"), path)
    spec["slurm"] = SlurmResources.from_spec(spec.get("slurm"))
    here = Path(path).parent
    if "base" in spec:
        spec["base"] = str((here / spec["base"]).resolve())
    for variant in variants.values():
        if variant and "base" in variant:
            variant["base"] = str((here / variant["base"]).resolve())
    return spec


def borrowed_runs(raw: Any, path: str | Path) -> list[dict[str, Any]]:
    """A spec's `borrow` as a list of {experiment, recurrences}."""
    entries = [] if raw is None else raw if isinstance(raw, list) else [raw]
    fix = ("write borrow: {experiment: NAME, recurrences: [1]} (or a list of such), naming "
           "another sweep's experiment and the r of its runs to take")
    for entry in entries:
        if (not isinstance(entry, dict) or set(entry) != {"experiment", "recurrences"}
                or not isinstance(entry["experiment"], str)
                or not isinstance(entry["recurrences"], list)
                or not all(isinstance(r, int) and r >= 1 for r in entry["recurrences"])):
            raise ConfigError(f"Sweep spec {path}: borrow {entry!r} is not understood; {fix}.")
    return [{"experiment": e["experiment"], "recurrences": list(e["recurrences"])}
            for e in entries]


def width_of(spec: dict[str, Any], scale: float | None) -> int | None:
    rule = spec.get("width")
    if rule is None or scale is None:
        return None
    unknown = set(rule) - {"per_scale", "multiple"}
    if unknown:
        raise ConfigError(f"Sweep spec: width has unknown key '{sorted(unknown)[0]}'; use "
                          "per_scale and multiple.")
    raw = rule.get("per_scale", 64) * scale
    multiple = rule.get("multiple", 1)
    return int(math.ceil(raw / multiple) * multiple)


def _cells(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the axes, as template contexts."""
    variants = spec.get("variants") or {None: {}}
    recurrences = spec.get("recurrences") or [None]
    seeds = spec.get("seeds") or [None]
    if "budgets" in spec:
        budget_scales = [(float(c), s) for c, scales in spec["budgets"].items() for s in scales]
    else:
        budget_scales = [(None, s) for s in (spec.get("scales") or [None])]
    cells = []
    for variant, r, (budget, s), seed in itertools.product(variants, recurrences, budget_scales,
                                                           seeds):
        cells.append({"variant": variant, "r": r, "s": s, "d": width_of(spec, s),
                      "budget": budget, "seed": seed})
    return [cell for cell in cells if _selected(spec, cell)]


def _selected(spec: dict[str, Any], cell: dict[str, Any]) -> bool:
    """Whether the spec's `where` (absent: every cell) keeps this cell."""
    if spec.get("where") is None:
        return True
    keep = _render(spec["where"], cell, "where")
    if not isinstance(keep, bool):
        raise ConfigError(f"Sweep spec: where = {spec['where']!r} gives {keep!r} at r = "
                          f"{cell['r']}, d = {cell['d']}, budget = {cell['budget']}; it must be "
                          "a comparison that is true or false, e.g. where: \"{{ r == 1 or "
                          "budget < 2e11 }}\".")
    return keep


def _uses_tokens(value: Any) -> bool:
    """Whether a spec value is an expression over the run's `tokens` or `steps`."""
    if not isinstance(value, str) or "{" not in value:
        return False
    try:
        names = jinja2.meta.find_undeclared_variables(_environment().parse(value))
    except jinja2.TemplateSyntaxError:
        return False  # _render reports it
    return bool(names & RUN_LENGTH)


def _overrides(spec: dict[str, Any], context: dict[str, Any], name: str) -> list[str]:
    """The run's overrides. Without `tokens` in the context (the first pass, which measures
    the run), the values that are expressions over tokens or steps are left out."""
    values: dict[str, Any] = {}
    first_pass = "tokens" not in context
    if context["r"] is not None:
        values["model.recurrences"] = context["r"]
    if context["d"] is not None:
        values["model.d_model"] = context["d"]
    if context["seed"] is not None:
        values["train.seed"] = context["seed"]
    for key, value in (spec.get("set") or {}).items():
        if not (first_pass and _uses_tokens(value)):
            values[key] = _render(value, context, f"set.{key}")
    for key, value in _variant(spec, context).items():
        if key not in VARIANT_KEYS and not (first_pass and _uses_tokens(value)):
            values[key] = _render(value, context, f"variants.{context['variant']}.{key}")
    values["track.experiment"] = spec["experiment"]
    values["track.run_name"] = name
    return [f"{key}={_yaml_scalar(value)}" for key, value in values.items()]


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _variant(spec: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    return (spec.get("variants") or {}).get(context["variant"]) or {}


def _base(spec: dict[str, Any], context: dict[str, Any]) -> str | None:
    return _variant(spec, context).get("base", spec.get("base"))


def _lr_factor(spec: dict[str, Any], cfg: RunConfig) -> float:
    rule = spec.get("lr_scaling")
    if not rule:
        return 1.0
    return (cfg.model.d_model / rule["reference_width"]) ** rule["exponent"]


def _load(spec: dict[str, Any], base: str | None, overrides: list[str], name: str) -> RunConfig:
    try:
        return run_config.load(base, overrides)
    except ConfigError as exc:
        raise ConfigError(f"Sweep {spec['experiment']}, run {name}: {exc}") from None


def _tokens(spec: dict[str, Any], context: dict[str, Any], cfg: RunConfig, flops: float,
            name: str) -> int:
    """Tokens of one run in whole global batches: budget / flops_per_token, or given tokens."""
    per_step = cfg.tokens_per_step
    budget = context["budget"]
    if budget is None:
        tokens = _variant(spec, context).get("tokens", spec.get("tokens"))
        return int(math.ceil(float(tokens) / per_step) * per_step)
    steps = round(budget / flops / per_step)
    if steps < 1:
        raise ConfigError(f"Sweep {spec['experiment']}, run {name}: the budget {budget:.3g} FLOPs "
                          f"buys {budget / flops:,.0f} tokens, less than one global batch of "
                          f"{per_step:,}; raise the budget or shrink the batch.")
    return steps * per_step


def plan_run(spec: dict[str, Any], context: dict[str, Any]) -> PlannedRun:
    """One run, in two passes: the first measures it (FLOPs per token, tokens, steps); the
    second renders every value with `tokens` and `steps` known, for settings such as a
    learning rate that depends on the run's length."""
    name = str(_render(spec["name"], context, "name"))
    base = _base(spec, context)
    measured = _load(spec, base, _overrides(spec, context, name), name)
    counts = account(measured.model)
    flops = counts["flops_per_token"]
    tokens = _tokens(spec, context, measured, flops, name)
    context = {**context, "tokens": tokens, "steps": tokens // measured.tokens_per_step}
    overrides = _overrides(spec, context, name)
    cfg = _load(spec, base, overrides, name)
    if (account(cfg.model)["flops_per_token"], cfg.tokens_per_step) != (
            flops, measured.tokens_per_step):
        raise ConfigError(f"Sweep {spec['experiment']}, run {name}: a value that depends on "
                          "tokens or steps changes the model or the batch, which set the "
                          "run's tokens; only settings such as learning rates may use them.")
    factor = _lr_factor(spec, cfg)
    if factor != 1.0:  # AdamW's lrs, every role's with them; not Muon's matrix_lr
        overrides += [f"train.{key}={getattr(cfg.train, key) * factor}"
                      for key in ("lr", "min_lr", *(f"{role}_lr" for role in LR_ROLES))
                      if getattr(cfg.train, key) is not None]
    overrides += [f"train.tokens={tokens}", "train.steps=null"]
    if context["budget"] is not None:
        overrides.append(f"train.budget_flops={context['budget']}")
    return PlannedRun(name, _load(spec, base, overrides, name), context, context["budget"], tokens,
                      flops, counts["n_once"], counts["n_rec"])


def plan(spec: dict[str, Any]) -> list[PlannedRun]:
    """The runs of a sweep spec, in a fixed order; refuses duplicate run names."""
    cells = _cells(spec)
    if not cells and spec.get("where") is not None:
        raise ConfigError(f"Sweep {spec['experiment']}: where = {spec.get('where')!r} leaves "
                          "no run to train; loosen it.")
    runs = [plan_run(spec, context) for context in cells]
    seen: dict[str, PlannedRun] = {}
    for run in runs:
        if run.name in seen:
            raise ConfigError(f"Sweep {spec['experiment']}: two runs are named {run.name!r} "
                              f"({seen[run.name].context} and {run.context}); put the differing "
                              "axis into the name template.")
        seen[run.name] = run
    return runs


def plan_rows(runs: list[PlannedRun]) -> list[dict[str, Any]]:
    """One row per run for --dry-run --json, with the resolved config it would train."""
    return [{"name": run.name, "recurrences": run.config.model.recurrences,
             "d_model": run.config.model.d_model, "n_once": run.n_once, "n_rec": run.n_rec,
             "budget_flops": run.budget_flops, "tokens": run.tokens,
             "steps": run.tokens // run.config.tokens_per_step,
             "flops_per_token": run.flops_per_token, "config_hash": run.config.hash(),
             "config": run.config.to_dict()}
            for run in runs]


def plan_table(runs: list[PlannedRun], peak_flops: float, assumed_mfu: float) -> str:
    """The dry-run table: one line per run, then the total compute and an estimated duration."""
    width = max([len(run.name) for run in runs] + [4]) + 2
    header = (f"{'name':<{width}}{'r':>3}{'d_model':>8}{'n_once':>15}{'n_rec':>15}{'budget':>10}"
              f"{'tokens':>19}{'FLOPs/token':>13}")
    lines = [header, "-" * len(header)]
    for row in plan_rows(runs):
        budget = "-" if row["budget_flops"] is None else f"{row['budget_flops']:.3g}"
        lines.append(f"{row['name']:<{width}}{row['recurrences']:>3}{row['d_model']:>8}"
                     f"{row['n_once']:>15,}{row['n_rec']:>15,}{budget:>10}{row['tokens']:>19,}"
                     f"{row['flops_per_token']:>13.4g}")
    total = sum(run.compute for run in runs)
    seconds = total / (peak_flops * assumed_mfu)
    lines.append(f"{len(runs)} runs, {total:.3g} FLOPs in all: about {duration(seconds)} on one "
                 f"device of {peak_flops:.3g} FLOP/s at {assumed_mfu:.0%} MFU")
    return "\n".join(lines)
