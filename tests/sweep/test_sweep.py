"""Sweep specs: the paper's grid planned exactly, bad specs refused, real sweeps run idempotently
(in one process, through `megaloop sweep`), resumed after a kill, and as SLURM arrays."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny import shellcheck
from training import REPO, assert_ok, child_env, client, wait_for

from megaloop.errors import ConfigError
from megaloop.sweep.plan import plan, read_spec, sci

SWEEPS = REPO / "configs" / "sweeps"
PAPER_BUDGETS = {4.64e17: [6, 8, 10, 12], 1e18: [6, 8, 10, 12, 14], 2.15e18: [8, 10, 12, 14, 16],
                 4.64e18: [10, 12, 14, 16, 18, 20], 1e19: [12, 16, 18, 20, 24],
                 2.15e19: [18, 24, 28, 34]}
PAPER_S10 = {1: 98.3e6, 2: 59.8e6, 4: 40.2e6, 8: 30.3e6}


@pytest.fixture(scope="module")
def paper_runs():
    return plan(read_spec(SWEEPS / "isodepth-paper.yaml"))


def test_paper_spec_plans_the_116_runs(paper_runs):
    assert len(paper_runs) == 116
    for r in (1, 2, 4, 8):
        cells = sorted((run.budget_flops, run.context["s"]) for run in paper_runs
                       if run.config.model.recurrences == r)
        assert cells == sorted((c, s) for c, scales in PAPER_BUDGETS.items() for s in scales)
    for run in paper_runs:
        m, s = run.config.model, run.context["s"]
        assert m.d_model == math.ceil(64 * s / 128) * 128 and m.dim_per_head == 128
        r = m.recurrences
        # the paper's layouts (its shells/scaling_laws/scaling_laws.sh): r = 1 is 0 + 20 + 0,
        # with the recurrent block's norm after its pass, as at every r
        want = (2, 16, 2) if r > 1 else (0, 20, 0)
        assert (m.prelude_layers, m.loop_layers * r, m.coda_layers) == want, run.name
        assert m.recurrence_norm == "always" and m.has_loop_norm
        assert (m.mlp, m.mlp_ratio, m.qk_norm, m.logit_softcap) == ("relu2", 4.0, True, 15.0)
        assert (m.max_seq_len, m.vocab_size) == (2048, 32000)
        assert run.name == f"r{r}-s{s}-C{sci(run.budget_flops)}"


def test_paper_tokens_are_budget_over_flops_per_token(paper_runs):
    for run in paper_runs:
        per_step = run.config.train.global_batch * run.config.model.max_seq_len
        assert run.tokens % per_step == 0
        assert abs(run.tokens - run.budget_flops / run.flops_per_token) <= per_step / 2
        assert run.config.train.tokens == run.tokens
        assert run.config.train.budget_flops == run.budget_flops


def test_paper_parameter_counts_at_s10(paper_runs):
    for run in paper_runs:
        if run.context["s"] == 10:
            r = run.config.model.recurrences
            assert run.n_once + run.n_rec == pytest.approx(PAPER_S10[r], rel=5e-3)


PAPER_RECIPE = REPO.parent / "shared" / "data" / "isodepth" / "paper_run_recipe.csv"


def paper_matrix_lr(tokens: int, batch_tokens: int, d_ref: float) -> float:
    return 0.014 * (batch_tokens / 2 ** 18) ** 0.558 * (tokens / d_ref) ** -0.32


@pytest.mark.skipif(not PAPER_RECIPE.exists(), reason=f"needs {PAPER_RECIPE}")
def test_paper_plan_matches_the_papers_runs_steps_and_learning_rates(paper_runs):
    """Every run of the grid against the paper's code (../shared/data/isodepth): steps within
    0.1% (our vocabulary is 32000, the paper's padded to 32064), the MuonH lr within 0.1% of its
    formula applied to our tokens (D_ref from the CSV's own s = 10 reference models), the AdamW
    groups equal, and the recipe's optimizer, schedule and clipping."""
    with PAPER_RECIPE.open() as handle:
        rows = {(int(row["r"]), float(row["budget_flops"]), int(row["s"])): row
                for row in csv.DictReader(handle)}
    reference = {(r, int(row["s"])): int(row["paper_n_once"]) + r * int(row["paper_n_rec"])
                 for (r, _, _), row in rows.items() if row["s"] == "10"}
    d_ref = {1: 10 * reference[(1, 10)], "looped": 10 * reference[(4, 10)]}
    assert len(rows) == len(paper_runs) == 116
    for run in paper_runs:
        train, r = run.config.train, run.config.model.recurrences
        row = rows[(r, run.budget_flops, run.context["s"])]
        steps = run.tokens // (train.global_batch * run.config.model.max_seq_len)
        assert steps == pytest.approx(int(row["paper_steps"]), rel=1e-3), run.name
        want = paper_matrix_lr(run.tokens, 2 ** 18, d_ref[1 if r == 1 else "looped"])
        assert train.matrix_lr == pytest.approx(want, rel=1e-3), run.name
        for role in ("embedding", "unembedding", "norm"):
            want = float(row[f"paper_adam_{role}_lr"])
            assert getattr(train, f"{role}_lr") == pytest.approx(want, rel=1e-3), (run.name, role)
        assert train.lr == train.unembedding_lr and train.min_lr == pytest.approx(0.1 * train.lr)
        assert (train.optimizer, train.schedule, train.warmup_steps, train.grad_clip,
                train.weight_decay, train.beta1, train.beta2, train.eps) == (
            "muonh", "linear", 0, 0.0, 0.0, 0.8, 0.95, 1e-10)
        assert train.global_batch * run.config.model.max_seq_len == 2 ** 18
        assert train.eval_tokens == 34560 * 2048  # the paper's final validation rows


def test_the_paper_specs_reference_tokens_are_megaloops_accounting():
    """The D_ref constants in the iso-depth specs' matrix_lr: 10x the effective parameters of
    the s = 10 reference models (N_once + r N_rec), by megaloop's accounting."""
    from megaloop import config
    from megaloop.model.accounting import account

    def effective(name: str) -> int:
        model = config.load(REPO / "configs" / "runs" / name).model
        counts = account(model)
        return counts["n_once"] + model.recurrences * counts["n_rec"]

    constants = f"(tokens / ({10 * effective('isodepth-s10-r4.yaml')} if r > 1 else " \
                f"{10 * effective('isodepth-s10-r1.yaml')})) ** -0.32"
    for name in ("isodepth-paper.yaml", "isodepth-truncbptt.yaml", "isodepth-lanes.yaml"):
        assert constants in read_spec(SWEEPS / name)["set"]["train.matrix_lr"], name


def test_case_study_specs_are_the_papers_grids_on_the_borrowed_r1_baseline():
    truncated = plan(read_spec(SWEEPS / "isodepth-truncbptt.yaml"))
    lanes = plan(read_spec(SWEEPS / "isodepth-lanes.yaml"))
    extra = {1e18: 16, 4.64e18: 22, 1e19: 28, 2.15e19: 40, 2.15e18: 18}  # one wider each
    for runs, added in ((truncated, extra), (lanes, {2.15e18: 18})):
        assert {run.config.model.recurrences for run in runs} == {2, 4, 8}
        for r in (2, 4, 8):
            cells = sorted((run.budget_flops, run.context["s"]) for run in runs
                           if run.config.model.recurrences == r)
            want = {c: sorted({*scales, *([added[c]] if c in added else [])})
                    for c, scales in PAPER_BUDGETS.items()}
            assert cells == sorted((c, s) for c, scales in want.items() for s in scales)
        assert {run.config.train.optimizer for run in runs} == {"muonh"}
    assert len(truncated) == 3 * 34 and len(lanes) == 3 * 30
    for run in truncated:
        assert run.config.model.bptt_k == math.ceil(run.config.model.recurrences / 2)
    assert {run.config.model.hyper for run in lanes} == {"lanes"}
    for run in lanes:  # the lane parameters' AdamW lr: 0.01 (d / 640)^-0.5
        d = run.config.model.d_model
        assert run.config.train.hyper_lr == pytest.approx(0.01 * (d / 640) ** -0.5)
    for name in ("isodepth-truncbptt.yaml", "isodepth-lanes.yaml"):
        assert read_spec(SWEEPS / name)["borrow"] == [{"experiment": "isodepth-paper",
                                                      "recurrences": [1]}]


RUN_LENGTH_KEYS = {"train.tokens", "train.steps"}  # budget / flops_per_token: the variant's own


def cell(run) -> tuple[float, int, int]:
    return run.budget_flops, run.config.model.recurrences, run.config.model.d_model


def changed_keys(run, twin) -> set[str]:
    mine, theirs = run.config.flat(), twin.config.flat()
    return {key for key in mine if mine[key] != theirs[key]} - RUN_LENGTH_KEYS


def test_the_cpu_case_studies_are_the_cpu_grid_with_one_change_each():
    """Each case study trains the looped cells of isodepth-cpu with its one change and borrows
    the plain r = 1 runs, so that their fits and Delta phi compare like with like."""
    grid = {cell(run): run for run in plan(read_spec(SWEEPS / "isodepth-cpu.yaml"))}
    assert {r for _, r, _ in grid} == {1, 2, 4, 8}
    for name, change in (("isodepth-cpu-truncbptt.yaml", {"model.bptt_k"}),
                         ("isodepth-cpu-hyperloop.yaml", {"model.hyper", "model.injection"})):
        spec = read_spec(SWEEPS / name)
        assert spec["borrow"] == [{"experiment": "isodepth-cpu", "recurrences": [1]}]
        runs = plan(spec)
        assert {cell(run) for run in runs} == {c for c in grid if c[1] > 1}
        for run in runs:
            names = {"track.experiment", "track.run_name"}
            assert changed_keys(run, grid[cell(run)]) == change | names, run.name
        if "truncbptt" in name:
            assert all(run.config.model.bptt_k == math.ceil(run.config.model.recurrences / 2)
                       for run in runs)


def test_the_quickstart_is_a_subset_of_the_cpu_sweep():
    """Every quickstart run is the CPU sweep's run of the same cell, setting for setting (only
    the experiment differs), so its fit is a smaller look at the same experiment."""
    grid = {cell(run): run for run in plan(read_spec(SWEEPS / "isodepth-cpu.yaml"))}
    quick = plan(read_spec(SWEEPS / "quickstart.yaml"))
    assert 0 < len(quick) < len(grid) and {run.config.model.recurrences for run in quick} == \
        {1, 2, 4, 8}
    for run in quick:
        twin = grid[cell(run)]
        mine, theirs = run.config.flat(), twin.config.flat()
        assert {key for key in mine if mine[key] != theirs[key]} == {"track.experiment"}, run.name
        assert run.config.hash() != twin.config.hash()  # the experiment is part of the hash


def test_where_keeps_only_the_cells_it_selects(tmp_path):
    every = plan(read_spec(write_spec(tmp_path, where=None)))
    kept = plan(read_spec(write_spec(tmp_path, where="{{ r == 1 and d > 8 }}")))
    assert {run.name for run in kept} == {run.name for run in every
                                          if run.config.model.recurrences == 1
                                          and run.config.model.d_model > 8}
    assert 0 < len(kept) < len(every)


def write_spec(tmp_path: Path, **changes) -> Path:
    spec = yaml.safe_load((SWEEPS / "quickstart.yaml").read_text())
    spec["base"] = str(REPO / "configs" / "runs" / "tiny.yaml")
    spec.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"width": {"per_scale": 50, "multiple": 1}}, "not divisible by model.n_heads"),
    ({"budgets": {1e6: [2]}}, "less than one global batch"),
    ({"name": "r{{ r }}"}, "two runs are named 'r1'"),
    ({"tokens": 1000}, "either budgets"),
    ({"name": "r{{ rr }}"}, "does not render"),
    ({"where": "{{ r > 100 }}"}, "leaves no run to train"),
    ({"where": "{{ r + 1 }}"}, "must be a comparison that is true or false"),
    ({"where": "{{ steps > 1 }}"}, "where .* does not render"),
    ({"where": "r == 1"}, "where = 'r == 1' must be an expression"),
    ({"borrow": {"experiment": "a"}}, "borrow .* is not understood"),
    ({"set": {"model.colour": 1}}, "model.colour"),
    ({"set": {"model.loop_layers": "{{ 8 // r }}", "model.n_heads": 1,
              "model.coda_layers": "{{ 3 if tokens > 0 else 1 }}"}},
     "changes the model or the batch"),
])
def test_bad_specs_are_refused_before_anything_runs(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        plan(read_spec(write_spec(tmp_path, **changes)))
    assert not (tmp_path / "runs").exists()


ATTACKS = ["{{ cycler.__init__.__globals__.os.popen('touch SENTINEL').read() }}",
           "{{ lipsum.__globals__['os'].system('touch SENTINEL') }}",
           "{{ ''.__class__.__mro__[1].__subclasses__() }}"]


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_shared_spec_is_data_even_in_a_dry_run(tmp_path, capsys, attack):
    """A spec's expressions render in Jinja's sandbox: one that reaches for Python's internals
    is refused with a clear error, and the command it carries never runs."""
    from megaloop.cli import main

    sentinel = tmp_path / "code-ran"
    spec = yaml.safe_load((SWEEPS / "quickstart.yaml").read_text())
    settings = {**spec["set"], "train.warmup_steps": attack.replace("SENTINEL", str(sentinel))}
    code = main(["sweep", str(write_spec(tmp_path, set=settings)), "--dry-run"])
    assert code == 2 and not sentinel.exists()
    assert "sandbox" in capsys.readouterr().err


def test_a_spec_expression_that_fails_names_the_value(tmp_path):
    spec = yaml.safe_load((SWEEPS / "quickstart.yaml").read_text())
    with pytest.raises(ConfigError, match="warmup_steps .* ZeroDivisionError"):
        plan(read_spec(write_spec(tmp_path, set={**spec["set"],
                                                 "train.warmup_steps": "{{ steps // 0 }}"})))


def test_values_may_depend_on_the_runs_tokens_and_steps(tmp_path, capsys):
    """The paper's matrix lr scales with the run's tokens: D is known once the run is
    measured, and `--dry-run --json` shows each run's resolved config."""
    from megaloop.cli import main

    spec = yaml.safe_load((SWEEPS / "quickstart.yaml").read_text())
    settings = {**spec["set"], "train.matrix_lr": "{{ 0.014 * (tokens / 10**6) ** -0.32 }}",
                "train.warmup_steps": "{{ steps // 10 }}"}
    path = write_spec(tmp_path, set=settings)
    code = main(["sweep", str(path), "--dry-run", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0 and len(rows) == len(plan(read_spec(path)))
    for row in rows:
        per_step = 8 * 128
        assert row["steps"] == row["tokens"] // per_step and row["tokens"] % per_step == 0
        train = row["config"]["train"]
        assert train["tokens"] == row["tokens"]
        assert train["matrix_lr"] == pytest.approx(0.014 * (row["tokens"] / 1e6) ** -0.32)
        assert train["warmup_steps"] == row["steps"] // 10
    assert len({row["config"]["train"]["matrix_lr"] for row in rows}) > 1


def tiny_sweep(tmp_path: Path, shards: Path, runs: int = 3) -> Path:
    """A real sweep of `runs` tiny runs on the embedded corpus, tracked in tmp_path."""
    spec = {
        "experiment": "tiny-sweep", "base": str(REPO / "configs" / "runs" / "tiny.yaml"),
        "name": "r{{ r }}-d{{ d }}", "recurrences": [1, 2, 4][:runs],
        "width": {"per_scale": 32, "multiple": 32}, "budgets": {4e10: [2]},
        "set": {"model.prelude_layers": 1, "model.loop_layers": "{{ 4 // r }}",
                "model.coda_layers": 1, "model.n_heads": 2, "model.max_seq_len": 64,
                "train.micro_batch": 4, "train.global_batch": 4, "train.eval_batches": 2,
                "train.checkpoint_interval": 2, "data.shards": str(shards), "data.verify": False,
                "train.checkpoint_dir": str(tmp_path / "checkpoints"),
                "track.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
    }
    path = tmp_path / "tiny-sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep_command(spec: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megaloop.cli", "sweep", str(spec), "--no-progress", *extra]


def runs_by_name(tmp_path: Path) -> dict[str, list]:
    mlflow = client(tmp_path)
    experiment = mlflow.get_experiment_by_name("tiny-sweep")
    found: dict[str, list] = {}
    for run in mlflow.search_runs([experiment.experiment_id]):
        found.setdefault(run.info.run_name, []).append(run)
    return found


def sweep_to_the_end(folder: Path, spec: Path, *extra: str) -> str:
    """Run the sweep in `folder` to its end; its stdout."""
    done = subprocess.run(sweep_command(spec, *extra), cwd=folder, env=child_env(),
                          capture_output=True, text=True, timeout=600)
    assert_ok(done)
    return done.stdout


def runs_per_name(found: dict[str, list]) -> dict[str, int]:
    """How many MLflow runs each name has, from runs_by_name."""
    return {name: len(runs) for name, runs in found.items()}


EACH_ONCE = {"r1-d64": 1, "r2-d64": 1, "r4-d64": 1}


def test_a_sweep_stopped_by_sigterm_says_what_is_left_and_does_not_fit(tmp_path, stdlib_shards):
    """SIGTERM during the second run: that run saves a checkpoint, the third never starts,
    the summary says so and how to go on, `--fit` does not run on the partial sweep (exit 3),
    running the sweep again finishes only what is missing, and once more trains nothing (the
    sweep in this process, idempotent)."""
    spec = tiny_sweep(tmp_path, stdlib_shards)
    process = subprocess.Popen(sweep_command(spec, "--fit"), cwd=tmp_path, env=child_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second_run = tmp_path / "checkpoints" / "r2-d64" / "step_00000002" / "megaloop_complete.json"
    wait_for(second_run, process, timeout=400)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 3, err[-3000:]
    assert "3 runs planned, 0 already finished, 1 trained" in out
    assert "interrupted: r2-d64" in out and "left: 2 run(s): r2-d64, r4-d64" in out
    assert "not fitted" in out and f"continue with: megaloop sweep {spec}" in out
    assert "megaloop: step " in out  # --no-progress: each run's plain lines, not a bar
    assert "Traceback" not in err and "cannot fit" not in out + err
    before = runs_by_name(tmp_path)
    (first_run,) = before["r1-d64"]
    assert first_run.data.tags["megaloop.status"] == "finished"
    assert "r4-d64" not in before

    assert "3 runs planned, 1 already finished, 2 trained" in sweep_to_the_end(tmp_path, spec)
    after = runs_by_name(tmp_path)
    assert runs_per_name(after) == EACH_ONCE
    assert after["r1-d64"][0].info.end_time == first_run.info.end_time  # not trained again
    assert all(found[0].data.tags["megaloop.status"] == "finished"
               and "val/loss" in found[0].data.metrics for found in after.values())
    assert "3 runs planned, 3 already finished, 0 trained" in sweep_to_the_end(tmp_path, spec)
    assert runs_per_name(runs_by_name(tmp_path)) == EACH_ONCE


@pytest.mark.slow  # 82 s, the longest fast test once
def test_jobs_train_runs_side_by_side_as_one_process_would(tmp_path, stdlib_shards):
    """--jobs 2: two worker processes share the runs; every run finishes once in MLflow with
    the loss one process gives it (to threading's rounding), each worker keeps its log, and
    the sweep run again trains nothing."""
    serial_dir, parallel_dir = tmp_path / "serial", tmp_path / "parallel"
    losses = {}
    for folder, extra in ((serial_dir, ()), (parallel_dir, ("--jobs", "2"))):
        folder.mkdir()
        spec = tiny_sweep(folder, stdlib_shards)
        assert "3 runs planned, 0 already finished, 3 trained" in \
            sweep_to_the_end(folder, spec, *extra)
        found = runs_by_name(folder)
        assert runs_per_name(found) == EACH_ONCE
        losses[folder] = {name: runs[0].data.metrics["val/loss"] for name, runs in found.items()}
    for name, loss in losses[serial_dir].items():
        assert losses[parallel_dir][name] == pytest.approx(loss, rel=2e-3), name
    logs = sorted((parallel_dir / "runs" / "sweeps" / "tiny-sweep" / "logs").glob("*.log"))
    assert [log.name for log in logs] == ["worker-0.log", "worker-1.log"]
    assert sum(log.read_text().count("megaloop: finished") for log in logs) == 3
    assert "3 runs planned, 3 already finished, 0 trained" in \
        sweep_to_the_end(parallel_dir, tiny_sweep(parallel_dir, stdlib_shards), "--jobs", "2")


@pytest.mark.slow  # 90 s, the longest fast test once; the serial sweep's SIGTERM test stays fast
def test_sigterm_stops_every_worker_of_a_jobs_sweep_and_the_sweep_resumes(tmp_path,
                                                                           stdlib_shards):
    """SIGTERM to a --jobs 2 sweep reaches both workers: the runs in progress save and stop,
    the third never starts, --fit does not run (exit 3), and the sweep run again finishes
    every run once."""
    spec = tiny_sweep(tmp_path, stdlib_shards)
    process = subprocess.Popen(sweep_command(spec, "--jobs", "2", "--fit"), cwd=tmp_path,
                               env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    wait_for(tmp_path / "checkpoints" / "r1-d64" / "step_00000002" / "megaloop_complete.json",
             process, timeout=400)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 3, err[-3000:]
    assert "stopped by SIGTERM" in out and "r4-d64" in out and "not fitted" in out
    assert "Traceback" not in err
    sweep_to_the_end(tmp_path, spec, "--jobs", "2")
    after = runs_by_name(tmp_path)
    assert runs_per_name(after) == EACH_ONCE
    assert all(found[0].data.tags["megaloop.status"] == "finished" for found in after.values())


def test_slurm_array_script(tmp_path, stdlib_shards):
    spec = tiny_sweep(tmp_path, stdlib_shards)
    proc = subprocess.run(sweep_command(spec, "--executor", "slurm", "--dry-run", "--nproc", "4"),
                          cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert_ok(proc)
    script = proc.stdout[proc.stdout.index("#!/usr/bin/env bash"):]
    assert "#SBATCH --array=0-2" in script and "#SBATCH --requeue" in script
    assert "#SBATCH --gpus-per-node=4" in script  # a GPU for each of the 4 ranks of a run
    assert "#SBATCH --signal=B:TERM@120" in script
    assert "--resume auto" in script and "--nproc 4" in script
    assert "-m megaloop.launch train" in script  # launch.sh's logic, found without the checkout
    listing = tmp_path / "runs" / "sweeps" / "tiny-sweep" / "runs.txt"
    configs = [Path(line) for line in listing.read_text().splitlines()]
    assert [p.stem for p in configs] == ["r1-d64", "r2-d64", "r4-d64"]
    assert yaml.safe_load(configs[1].read_text())["model"]["recurrences"] == 2
    assert not (tmp_path / "checkpoints").exists()  # nothing trained


SRUN = """#!/usr/bin/env bash
# a stand-in for srun: the job step records its argv and any SIGTERM, then ends
echo "$@" > "$STEP_LOG"
trap 'echo TERM >> "$STEP_LOG"; exit 0' TERM
echo started >> "$STEP_LOG"
if [[ $STEP_EXIT != run ]]; then exit "$STEP_EXIT"; fi
while true; do sleep 0.05; done
"""
SCONTROL = """#!/usr/bin/env bash
echo "$@" >> "$SCONTROL_LOG"
"""


def array_task(tmp_path: Path, step_exit: str) -> tuple[subprocess.Popen, Path, Path]:
    """Task 1 of a two-run array script, run by bash with stand-ins for srun and scontrol."""
    from megaloop.sweep.slurm import SlurmResources, slurm_script

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    listing = tmp_path / "runs.txt"
    listing.write_text("/configs/a.yaml\n/configs/b.yaml\n")
    script = tmp_path / "sweep.sbatch"
    script.write_text(slurm_script("exp", listing, 2, 4, tmp_path, SlurmResources()))
    step_log, scontrol_log = tmp_path / "step.log", tmp_path / "scontrol.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "1",
           "SLURM_JOB_ID": "555", "STEP_LOG": str(step_log), "SCONTROL_LOG": str(scontrol_log),
           "STEP_EXIT": step_exit}
    task = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return task, step_log, scontrol_log


def test_an_array_task_passes_sigterm_to_its_step_and_requeues(tmp_path):
    """SLURM signals the batch shell only (--signal=B:TERM@120): the script's trap passes
    SIGTERM on to the job step (whose ranks save and exit 0) and requeues the task."""
    task, step_log, scontrol_log = array_task(tmp_path, "run")
    deadline = time.monotonic() + 30
    while "started" not in (step_log.read_text() if step_log.exists() else ""):
        assert time.monotonic() < deadline and task.poll() is None, task.communicate()
        time.sleep(0.05)
    task.send_signal(signal.SIGTERM)
    out, err = task.communicate(timeout=30)
    assert task.returncode == 0, err
    argv, *events = step_log.read_text().splitlines()
    assert argv.endswith("-m megaloop.launch train /configs/b.yaml --resume auto --no-progress "
                         "--nproc 4")
    assert events == ["started", "TERM"]
    assert scontrol_log.read_text().split() == ["requeue", "555"]
    assert "requeueing job 555" in out


def test_an_array_task_that_fails_keeps_its_exit_and_is_not_requeued(tmp_path):
    task, step_log, scontrol_log = array_task(tmp_path, "3")
    task.communicate(timeout=30)
    assert task.returncode == 3
    assert not scontrol_log.exists()


def test_slurm_resources_from_the_spec_and_the_cli(tmp_path, monkeypatch):
    from megaloop.cli import main

    spec = yaml.safe_load((SWEEPS / "quickstart.yaml").read_text())
    path = write_spec(tmp_path, slurm={"time": "04:00:00", "partition": "gpu",
                                       "cpus_per_task": 16, "extra": ["--qos=high"]})
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(path), "--executor", "slurm", "--dry-run", "--nproc", "8",
                 "--time", "1-00:00:00", "--account", "proj1", "--sbatch=--exclusive"]) == 0
    script = (tmp_path / "runs" / "sweeps" / spec["experiment"] / "sweep.sbatch").read_text()
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for line in ("--gpus-per-node=8", "--cpus-per-task=16", "--time=1-00:00:00",
                 "--partition=gpu", "--account=proj1", "--qos=high", "--exclusive",
                 "--requeue", "--signal=B:TERM@120"):
        assert f"#SBATCH {line}" in sbatch, line
    assert "--time=04:00:00" not in script  # the CLI's limit wins over the spec's
    checked = shellcheck(script=script)
    assert checked.returncode == 0, checked.stdout
    cpu = write_spec(tmp_path, slurm={"gpus_per_node": 0})
    assert main(["sweep", str(cpu), "--executor", "slurm", "--dry-run", "--nproc", "2"]) == 0
    script = (tmp_path / "runs" / "sweeps" / spec["experiment"] / "sweep.sbatch").read_text()
    assert "--gpus-per-node" not in script and "DS_ACCELERATOR=cpu srun" in script
    # unless told, a task asks for cores for its ranks: a cluster's default of one CPU per task
    # would put every rank (and its data workers) on one core
    assert "#SBATCH --cpus-per-task=8" in script  # 2 ranks x 4
    assert main(["sweep", str(write_spec(tmp_path)), "--executor", "slurm", "--dry-run",
                 "--nproc", "8"]) == 0
    script = (tmp_path / "runs" / "sweeps" / spec["experiment"] / "sweep.sbatch").read_text()
    assert "#SBATCH --cpus-per-task=32" in script


@pytest.mark.parametrize(("slurm", "cli", "message"), [
    ({"time": "tomorrow"}, [], "not a SLURM time limit"),
    ({"gpus": 8}, [], "unknown key 'gpus'"),
    ({"extra": ["--qos=high; rm -rf ~"]}, [], "not one sbatch option"),
    ({}, ["--partition", "gpu\n#SBATCH --wrap=id"], "not a SLURM name"),
    ({}, ["--sbatch", "--comment=a b"], "not one sbatch option"),
    ({"cpus_per_task": 0}, [], "at least 1 CPU"),
    ("8 gpus", [], "must be a mapping"),
])
def test_bad_slurm_resources_are_refused(tmp_path, monkeypatch, capsys, slurm, cli, message):
    from megaloop.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["sweep", str(write_spec(tmp_path, slurm=slurm)), "--executor", "slurm",
                 "--dry-run", *cli])
    assert code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.glob("runs/sweeps/*/sweep.sbatch"))


@pytest.mark.slow
def test_local_executor_runs_each_run_on_two_ranks(tmp_path, stdlib_shards):
    spec = tiny_sweep(tmp_path, stdlib_shards, runs=2)
    settings = yaml.safe_load(spec.read_text())
    settings["set"]["train.micro_batch"] = 2  # 2 ranks x 2 = the global batch of 4
    spec.write_text(yaml.safe_dump(settings))
    proc = subprocess.run(sweep_command(spec, "--executor", "local", "--nproc", "2"),
                          cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                          timeout=900)
    assert_ok(proc)
    assert "2 runs planned, 0 already finished, 2 trained" in proc.stdout
    runs = runs_by_name(tmp_path)
    assert sorted(runs) == ["r1-d64", "r2-d64"]
    for (run,) in runs.values():
        assert run.data.params["world_size"] == "2"
        assert run.data.tags["megaloop.status"] == "finished"


@pytest.mark.slow
def test_a_local_sweep_stopped_by_sigterm_passes_it_on_and_says_what_is_left(tmp_path,
                                                                            stdlib_shards):
    """SIGTERM to the sweep alone (as a job scheduler sends it): the run in its launch.sh
    child saves and stops, the next run never starts, and the summary says so (exit 3)."""
    spec = tiny_sweep(tmp_path, stdlib_shards, runs=2)
    settings = yaml.safe_load(spec.read_text())
    settings["budgets"] = {4e13: [2]}  # hundreds of steps: still training when signalled
    spec.write_text(yaml.safe_dump(settings))
    sweep = subprocess.Popen(sweep_command(spec, "--executor", "local"), cwd=tmp_path,
                             env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    folder = tmp_path / "checkpoints" / "r1-d64"
    wait_for(folder / "step_00000002" / "megaloop_complete.json", sweep)
    sweep.send_signal(signal.SIGTERM)
    out, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 3, err[-3000:]
    assert "interrupted: r1-d64" in out and "left: 2 run(s): r1-d64, r2-d64" in out
    (run,) = runs_by_name(tmp_path)["r1-d64"]
    assert run.data.tags["megaloop.status"] == "killed"  # it saved and stopped
    assert "r2-d64" not in runs_by_name(tmp_path)


@pytest.mark.slow
def test_a_killed_local_sweep_takes_its_training_with_it(tmp_path, stdlib_shards):
    """SIGKILL of the sweep alone (not its process group): its training child gets SIGTERM,
    saves a checkpoint and stops, instead of training on unwatched."""
    spec = tiny_sweep(tmp_path, stdlib_shards, runs=1)
    settings = yaml.safe_load(spec.read_text())
    settings["budgets"] = {4e13: [2]}  # hundreds of steps: still training when killed
    spec.write_text(yaml.safe_dump(settings))
    sweep = subprocess.Popen(sweep_command(spec, "--executor", "local"), cwd=tmp_path,
                             env=child_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    folder = tmp_path / "checkpoints" / "r1-d64"
    wait_for(folder / "step_00000002" / "megaloop_complete.json", sweep)
    child = json.loads((folder / "megaloop.lock").read_text())["pid"]
    sweep.kill()
    sweep.wait()
    for _ in range(600):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the training outlived its sweep by a minute")
    (run,) = runs_by_name(tmp_path)["r1-d64"]
    assert run.data.tags["megaloop.status"] == "killed"  # it saved and stopped
