"""Detects CPU time that other processes took while a step ran (a shared machine is noisy).

The machine's busy time (/proc/stat) minus this process's own CPU time (/proc/self/stat) during
a step is the time other processes ran. A step in which they took more than `threshold_s` is
marked contended; the benchmark takes its medians over uncontended steps where enough exist.
"""

from __future__ import annotations

import os
import time

TICK = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def _machine_busy() -> float | None:
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) * TICK  # user nice system idle iowait irq softirq steal


def _self_busy() -> float:
    times = os.times()
    return times.user + times.system


class Monitor:
    """`with monitor.step(): ...` then `monitor.last_other_s`: CPU seconds others used."""

    def __init__(self, threshold_s: float = 0.03):
        self.threshold_s = threshold_s
        self.last_other_s: float | None = None

    def __enter__(self) -> Monitor:
        self._start = (_machine_busy(), _self_busy())
        return self

    def __exit__(self, *exc) -> None:
        machine, own = _machine_busy(), _self_busy()
        if machine is None or self._start[0] is None:
            self.last_other_s = None
        else:
            self.last_other_s = max(0.0, (machine - self._start[0]) - (own - self._start[1]))

    @property
    def contended(self) -> bool:
        return self.last_other_s is not None and self.last_other_s > self.threshold_s


def wait_for_quiet(budget_s: float, others_limit: float = 0.05, probe_s: float = 1.0) -> float:
    """Sleep until other processes used at most `others_limit` CPU seconds during a `probe_s`
    probe (we are idle then, so all busy time is theirs), or until `budget_s` is spent.
    Returns the seconds waited."""
    if budget_s <= 0:
        return 0.0
    waited = 0.0
    while True:
        start = _machine_busy()
        time.sleep(probe_s)
        end = _machine_busy()
        if start is None or end is None or end - start <= others_limit or waited >= budget_s:
            return waited
        waited += probe_s
