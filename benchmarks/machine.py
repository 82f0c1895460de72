"""What machine a benchmark ran on, for RESULTS.md."""

from __future__ import annotations

import platform
import subprocess


def cpu_model() -> str:
    """lscpu's model name, else what the platform module knows."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                    if line.startswith("Model name"))
    except (OSError, subprocess.SubprocessError, StopIteration):
        return platform.processor() or "unknown CPU"
