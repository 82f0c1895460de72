#!/usr/bin/env bash
# The main job on a fresh machine: set up the environment, then run the quickstart sweep (19
# tiny looped models at r = 1, 2, 4, 8 on the embedded corpus, a subset of the CPU iso-depth
# sweep) and fit how much one recurrence is worth. About 3 minutes on 2 CPU cores after the
# set-up (two runs at once); re-running skips what is finished.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
.venv/bin/megaloop sweep configs/sweeps/quickstart.yaml --jobs 2 --fit "$@"
cat <<'MSG'

The quickstart fits phi to 19 tiny models, one budget per looped r: it shows the pipeline, and
its interval is wide. For a real phi, run the CPU sweep (48 runs, about 18 minutes on 2 cores;
it gave phi = 0.856 [0.745, 0.934], benchmarks/RESULTS.md), then the paper's grid on GPUs:
  .venv/bin/megaloop sweep configs/sweeps/isodepth-cpu.yaml --jobs 2 --fit
  .venv/bin/megaloop sweep configs/sweeps/isodepth-paper.yaml --dry-run    (README: on a cluster)

Browse the runs:   .venv/bin/megaloop runs --experiment quickstart
MLflow's UI:       .venv/bin/megaloop ui        (then open the printed http://127.0.0.1 URL)
MSG
