"""What the benchmarks share: their arguments' common part, the machine they ran on, a timer that
waits for the device, and the JSON report (written then renamed), for RESULTS.md. Every script
describes its machine with `machine()`; scripts that predate the rest still parse their own
arguments and write their own reports.

    parser = harness.parser(__doc__, "trainer_costs")      # ... --json benchmarks/out/NAME.json
    with harness.Timer(device) as timed: step()             # seconds, the device's work included
    harness.write_report(args.json, {"runs": ...})          # + date and machine, printed too
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"


def cpu_model() -> str:
    """lscpu's model name, else what the platform module knows."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                    if line.startswith("Model name"))
    except (OSError, subprocess.SubprocessError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine(**more: Any) -> dict[str, Any]:
    """The CPU (and whether it computes bf16 natively), its cores, the kernels torch runs
    (ATEN_CPU_CAPABILITY), torch's threads and version, Python's, the GPU where there is one,
    and `more` (a script's own: numpy's version, ...)."""
    import torch

    from megaloop.device import Device, cpu_has_native_bf16

    found = {"cpu": cpu_model(), "cores": os.cpu_count(), "native_bf16": cpu_has_native_bf16(),
             "cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "threads": torch.get_num_threads(), "torch": torch.__version__,
             "python": platform.python_version(), **more}
    device = Device.of_this_process()
    if not device.is_cpu:
        found["device"] = device.name()
    return found


def describe(found: dict[str, Any]) -> str:
    """machine()'s answer in a line, for a script's printout."""
    gpu = f", {found['device']}" if "device" in found else ""
    return (f"{found['cpu']}, {found['cores']} cores, torch {found['torch']} "
            f"({found['threads']} threads, {found['cpu_capability']} kernels){gpu}")


def parser(doc: str | None, name: str) -> argparse.ArgumentParser:
    """An argument parser described by the script's docstring, with `--json` (default
    benchmarks/out/NAME.json)."""
    made = argparse.ArgumentParser(description=(doc or name).splitlines()[0])
    made.add_argument("--json", type=Path, default=OUT / f"{name}.json",
                      help="where the report goes (default: %(default)s)")
    return made


def write_report(path: str | Path, report: dict[str, Any], quiet: bool = False) -> dict:
    """`report` with the date and the machine, written to `path` (write then rename) and
    printed; returns what was written."""
    full = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), **report}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(full, indent=2, default=str))
    tmp.replace(path)
    if not quiet:
        print(json.dumps(full, indent=2, default=str))
    return full


class Timer:
    """Wall seconds of the block, the device's queued work waited for at both ends (a GPU
    runs asynchronously: without the waits the time is that of queueing the work)."""

    def __init__(self, device: Any = None):
        from megaloop.device import CPU

        self.device = device or CPU
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        self.device.synchronize()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *_: Any) -> None:
        self.device.synchronize()
        self.seconds = time.perf_counter() - self._start
