#!/usr/bin/env bash
# Set up the environment, lint, and run the test suite (default: the fast tests).
#   scripts/test.sh           fast tests
#   scripts/test.sh --slow    only the slow tests
#   scripts/test.sh --gpu     only the CUDA tests (on a GPU machine; skipped elsewhere)
#   scripts/test.sh --all     everything (what .ci/run runs)
# Further arguments go to pytest (-k EXPR, a test file, ...). The tests run in
# MEGALOOP_TEST_WORKERS processes (default 2, pytest-xdist; each test file on one worker, with
# its own folders, ports and MLflow stores); those marked `serial`, which time themselves, run
# alone afterwards. The 20 slowest tests are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

marker="not slow"
case "${1:-}" in
  --slow) marker="slow"; shift ;;
  --gpu) marker="gpu"; shift ;;
  --all) marker="slow or not slow"; shift ;;
esac
workers=${MEGALOOP_TEST_WORKERS:-2}

.venv/bin/ruff check .
export DS_ACCELERATOR=cpu
pytest=(.venv/bin/python -m pytest -p no:cacheprovider)
run() {  # run PYTEST-ARGS...: pytest's exit status, 5 meaning that it selected no test
  "${pytest[@]}" "$@"
}
if [ "$workers" -gt 1 ]; then
  parallel=0 alone=0
  run -m "($marker) and not serial" -n "$workers" --dist loadfile --durations=20 "$@" \
    || parallel=$?
  run -m "($marker) and serial" "$@" || alone=$?
  if [ "$parallel" = 5 ] && [ "$alone" = 5 ]; then exit 5; fi
  for code in "$parallel" "$alone"; do
    if [ "$code" != 0 ] && [ "$code" != 5 ]; then exit "$code"; fi
  done
  exit 0
fi
run -m "$marker" --durations=20 "$@"
