#!/usr/bin/env bash
# Set up the environment, lint, and run the test suite (default: the fast tests, under 10 min).
#   scripts/test.sh           fast tests
#   scripts/test.sh --slow    only the slow tests
#   scripts/test.sh --gpu     only the CUDA tests (on a GPU machine; skipped elsewhere)
#   scripts/test.sh --all     everything
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

marker=(-m "not slow")
case "${1:-}" in
  --slow) marker=(-m slow); shift ;;
  --gpu) marker=(-m gpu); shift ;;
  --all) marker=(-m "slow or not slow"); shift ;;
esac

.venv/bin/ruff check .
export DS_ACCELERATOR=cpu
.venv/bin/python -m pytest "${marker[@]}" "$@"
