#!/usr/bin/env bash
# The main job on a fresh machine: set up the environment, then run megaloop.
# Until the CPU training quickstart lands, it prints the parameter and FLOP tables of the
# iso-depth paper's models at s = 10 and the Hyperloop paper's d = 1024 models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for config in configs/runs/isodepth-s10-r{1,2,4,8}.yaml \
              configs/runs/hyperloop-d1024-{transformer,looped,hyperloop}.yaml; do
  .venv/bin/megaloop params "$config" "$@"
  echo
done
