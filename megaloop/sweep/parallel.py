"""Several runs of a sweep at once on one CPU machine (`megaloop sweep --jobs N`).

The tiny models of a CPU sweep are bound by per-operation overhead, not FLOPs: one run on two
threads is no faster than on one. N worker processes, each training the runs it takes from a
shared queue in-process on cores/N threads, finish sooner (benchmarks/RESULTS.md, "Quickstart":
two one-thread runs at once, 1.7x the throughput of one two-thread run). Each worker forms its
own group of one on a file store (`engine.join_process_group`), so nothing listens on a port;
the parent prepares each run's data first, so no two workers encode a corpus at once. A
worker's output goes to runs/sweeps/<experiment>/logs/worker-<k>.log.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sys
from pathlib import Path
from typing import Any

from megaloop.errors import ConfigError, MegaloopError
from megaloop.process_exit import exit_process
from megaloop.sweep.plan import PlannedRun

EVENT_WAIT_S = 0.5


def check_jobs(jobs: int, executor: str) -> None:
    """--jobs N > 1 runs on the CPU in this machine's processes only."""
    if jobs == 1:
        return
    if executor != "inprocess":
        raise ConfigError(f"--jobs {jobs} trains runs side by side in worker processes of the "
                          f"in-process executor, not with --executor {executor}; drop --jobs or "
                          "the executor.")
    from megaloop.device import Device

    if not Device.of_this_process().is_cpu:
        raise ConfigError(f"--jobs {jobs} is for CPU machines, where tiny runs leave cores "
                          "idle; on a GPU each run takes the device: drop --jobs (or use "
                          "--executor slurm for one run per node).")


def prepare_data(runs: list[PlannedRun], progress: bool) -> None:
    """Each distinct corpus the runs read, prepared once here before the workers start."""
    from megaloop.data.dataset import open_run_data

    seen: set[str] = set()
    for run in runs:
        key = repr((run.config.data, run.config.model.max_seq_len, run.config.model.vocab_size))
        if key not in seen:
            seen.add(key)
            open_run_data(run.config, progress=progress)


def _worker(index: int, runs: list[PlannedRun], tasks: Any, events: Any, threads: int,
            log: str) -> None:
    """A worker process: its output to `log`, then the runs it takes from `tasks`."""
    with open(log, "a", buffering=1, encoding="utf-8") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        sys.stdout = sys.stderr = handle
        _train_from_queue(index, runs, tasks, events, threads)
        events.close()
        events.join_thread()  # every event sent before the process ends
        exit_process(0)


def _train_from_queue(index: int, runs: list[PlannedRun], tasks: Any, events: Any,
                      threads: int) -> None:
    """Train runs from `tasks` until it is empty or SIGTERM stops one; report each to `events`.
    torch and the trainer are imported in the worker, after its output is redirected: the
    parent that plans and waits never needs them."""
    import torch

    torch.set_num_threads(threads)
    from megaloop.train import engine
    from megaloop.train.trainer import train

    *_, created = engine.join_process_group()
    try:
        while True:
            try:
                task = tasks.get_nowait()
            except queue.Empty:
                return
            events.put(("started", task, index))
            try:
                result = train(runs[task].config, resume="auto", progress=False, lines=True)
            except BaseException as exc:  # reported to the parent, which names the run
                events.put(("failed", task, f"{type(exc).__name__}: {exc}"))
                return
            stopped = result.get("stopped")
            events.put(("stopped" if stopped else "finished", task, index))
            if stopped:
                return
    finally:
        engine.leave_process_group(created)


def run_parallel(runs: list[PlannedRun], jobs: int, log_folder: Path, bar: Any, outcome: Any,
                 stop: Any) -> None:
    """Train `runs` in `jobs` worker processes; fill `outcome` as run_inprocess does."""
    prepare_data(runs, progress=False)
    log_folder.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    tasks, events = context.Queue(), context.Queue()
    for task in range(len(runs)):
        tasks.put(task)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    workers = [context.Process(target=_worker, name=f"megaloop-sweep-worker-{k}",
                               args=(k, runs, tasks, events, threads,
                                     str(log_folder / f"worker-{k}.log")))
               for k in range(min(jobs, len(runs)))]
    for worker in workers:
        worker.start()
    stop.children = [worker.pid for worker in workers]
    done, failed = set(), []
    try:
        while any(worker.is_alive() for worker in workers) or not events.empty():
            try:
                kind, task, detail = events.get(timeout=EVENT_WAIT_S)
            except queue.Empty:
                continue
            name = runs[task].name
            if kind == "started":
                bar.set_postfix_str(name)
            elif kind == "finished":
                done.add(task)
                outcome.trained.append(name)
                bar.update(runs[task].compute)
                print(f"sweep: {name} finished ({len(done)}/{len(runs)}; worker {detail})",
                      file=sys.stderr)
            elif kind == "stopped":
                outcome.interrupted = outcome.interrupted or name
            elif kind == "failed":
                failed.append((name, detail))
                for worker in workers:  # the others save the run they are in and stop
                    if worker.is_alive() and worker.pid is not None:
                        os.kill(worker.pid, signal.SIGTERM)
    finally:
        for worker in workers:
            worker.join()
        stop.children = []
    if failed:
        name, detail = failed[0]
        raise MegaloopError(f"Run {name} failed ({detail}); its log is in {log_folder}. Fix the "
                            "cause and run the sweep again: finished runs are skipped, "
                            "interrupted ones resume.")
    left = [run.name for task, run in enumerate(runs) if task not in done
            and run.name != outcome.interrupted]
    if left and not outcome.interrupted and not stop.requested:
        raise MegaloopError(f"Sweep workers ended with runs left ({', '.join(left)}); their logs "
                            f"are in {log_folder}. Run the sweep again: finished runs are "
                            "skipped.")
    outcome.left = left
