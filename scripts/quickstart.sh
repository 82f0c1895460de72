#!/usr/bin/env bash
# The main job on a fresh machine: set up the environment, then run the quickstart sweep (16+
# tiny looped models at r = 1, 2, 4, 8 on the embedded corpus) and fit how much one recurrence
# is worth. About 3 minutes on 2 CPU cores; re-running skips what is finished.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
.venv/bin/megaloop sweep configs/sweeps/quickstart.yaml --fit "$@"
cat <<'MSG'

Browse the runs:   .venv/bin/megaloop runs --experiment quickstart
MLflow's UI:       .venv/bin/megaloop ui        (then open the printed http://127.0.0.1 URL)
The paper's grid:  .venv/bin/megaloop sweep configs/sweeps/isodepth-paper.yaml --dry-run
MSG
