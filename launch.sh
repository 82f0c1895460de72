#!/usr/bin/env bash
# One entry for every scale: one process, local ranks, several nodes, a hostfile or SLURM.
#   ./launch.sh train configs/runs/tiny.yaml --nproc 2 --set model.recurrences=4 [--dry-run]
# This script only finds Python and hands every argument, untouched, to megaloop/launch.py
# (usage: ./launch.sh --help; the modes and an sbatch recipe are in that module's docstring).
# Python: $MEGALOOP_PYTHON, else the repo's .venv, else python3.
set -euo pipefail
root=$(CDPATH='' cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
if [[ -n "${MEGALOOP_PYTHON:-}" ]]; then
  python=$MEGALOOP_PYTHON
elif [[ -x "$root/.venv/bin/python" ]]; then
  python=$root/.venv/bin/python
else
  python=python3
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m megaloop.launch "$@"
