#!/usr/bin/env bash
# The one-shot GPU check (issue 12): what megaloop's CUDA path does on one GPU, in about 7
# minutes, every figure written to JSON under $OUT.
#
#   bash benchmarks/gpu_prepare.sh           # here, once: wheels and shards into .gpu/
#   device run, carry [".gpu"]:  bash benchmarks/gpu_session.sh
#   bash benchmarks/gpu_session.sh --cpu-smoke   # the same stages on the CPU at toy sizes
#
# Stages, each under its own time limit (a stage that fails or times out costs only itself):
#   env    GPU, torch, the measured bf16 and fp32 matmul rates          -> env.json
#   tests  the GPU tests (tests/test_gpu.py)                            -> log.txt
#   step   the d2048 model step alone: transformer, looped, Hyperloop, -> step.json
#          bf16, SDPA flash/cuDNN asserted, eager and compiled, sampled r
#   rope   RoPE tables under zero.Init in bf16                         -> rope.json
#   train  `megaloop train --json` of tiny and of the d2048 Hyperloop at ZeRO-0 and ZeRO-3,
#          bf16, tracking off (the device has no MLflow)
#   summary  all of it, the trainings' throughput and the issue's targets -> summary.json
# The device returns at most 8 files from $OUT: these five (and log.txt) are all it writes.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
repo=$PWD
smoke=0
[ "${1:-}" = --cpu-smoke ] && smoke=1
OUT=${OUT:-$repo/gpu-out}
mkdir -p "$OUT"
log=$OUT/log.txt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
: > "$log"

say() { echo "$*" | tee -a "$log"; }
stage() {  # stage NAME SECONDS COMMAND...: run it, log its output, never stop the script
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  say "== $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  say "== $name: exit $rc after $(($(date +%s) - start)) s"
}

if [ "$smoke" = 1 ]; then
  python=${PYTHON:-$repo/.venv/bin/python}
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  flags=(--smoke)
  limits=(60 120 240 120 90 90)
  "$python" - "$work/corpus" <<'PYTHON'
import shutil, sys, sysconfig
from pathlib import Path

folder = Path(sys.argv[1])
folder.mkdir()
for name in ("textwrap.py", "string.py", "argparse.py", "dataclasses.py"):
    shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / name, folder / f"{name}.txt")
PYTHON
  "$python" -m megaloop.cli data prepare --corpus "$work/corpus" --out "$work/shards-4k" \
    --workers 1 --val-fraction 0.25 >> "$log" 2>&1
  shards_tiny=$work/shards-4k
  shards_d2048=$work/shards-4k
  d2048=(--set model.d_model=64 --set model.n_heads=4 --set model.vocab_size=4096
         --set model.max_seq_len=64 --set train.steps=4 --set train.log_interval=2
         --set train.micro_batch=2 --set train.global_batch=2)
  tiny=(--set model.d_model=64 --set model.max_seq_len=64 --set train.steps=4
        --set train.log_interval=2 --set train.micro_batch=2 --set train.global_batch=2)
  checkpoints=$work/checkpoints
else
  python=${PYTHON:-python3}
  unset DS_ACCELERATOR  # DeepSpeed's CUDA accelerator and NCCL, as on a cluster
  flags=()
  limits=(45 75 180 45 40 80)
  if [ ! -d .gpu/wheels ]; then
    say "no .gpu/wheels: run benchmarks/gpu_prepare.sh here first and carry .gpu"
    exit 2
  fi
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/wheels/*.whl >> "$log" 2>&1 || { say "wheel install failed"; exit 2; }
  export PYTHONPATH=/tmp/site
  shards_tiny=$repo/.gpu/shards-4k
  shards_d2048=$repo/.gpu/shards-32k
  d2048=(--set train.steps=12 --set train.log_interval=3 --set train.micro_batch=8
         --set train.global_batch=8)
  tiny=(--set train.steps=40 --set train.log_interval=5 --set train.micro_batch=16
        --set train.global_batch=16)
  checkpoints=/dev/shm/megaloop-gpu-session
  [ -d /dev/shm ] || checkpoints=$work/checkpoints
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
say "gpu_session: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), smoke=$smoke, python $("$python" -V 2>&1)"
command -v nvidia-smi > /dev/null && nvidia-smi -L >> "$log" 2>&1

stage env "${limits[0]}" "$python" benchmarks/gpu_session.py env --out "$OUT" "${flags[@]}"
stage tests "${limits[1]}" "$python" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
stage step "${limits[2]}" "$python" benchmarks/gpu_session.py step --out "$OUT" "${flags[@]}"
stage rope "${limits[3]}" "$python" benchmarks/gpu_session.py rope --out "$OUT" "${flags[@]}"

mkdir -p "$work/train"
training() {  # training NAME CONFIG SHARDS ZERO_STAGE EXTRA...: the arguments of one run
  local name=$1 config=$2 shards=$3 zero=$4
  shift 4
  args=(-m megaloop.cli train "$config" --no-progress --json "$work/train/$name.json"
        --set data.shards="$shards" --set data.verify=false --set train.precision=bf16
        --set train.zero_stage="$zero" --set train.warmup_steps=2
        --set train.eval_interval=100000 --set train.eval_batches=2
        --set train.checkpoint_interval=100000 --set train.keep_checkpoints=1
        --set train.checkpoint_dir="$checkpoints" --set track.enabled=false "$@")
}
for zero in 0 3; do
  training "tiny-zero$zero" configs/runs/tiny.yaml "$shards_tiny" "$zero" "${tiny[@]}"
  stage "train tiny-zero$zero" "${limits[4]}" "$python" "${args[@]}"
  rm -rf "$checkpoints"
done
for zero in 0 3; do
  training "d2048-hyperloop-zero$zero" configs/runs/hyperloop-d2048-hyperloop.yaml \
    "$shards_d2048" "$zero" "${d2048[@]}"
  stage "train d2048-hyperloop-zero$zero" "${limits[5]}" "$python" "${args[@]}"
  rm -rf "$checkpoints"
done
stage summary 60 "$python" benchmarks/gpu_session.py summarize --out "$OUT" \
  --train-dir "$work/train"
say "gpu_session: done $(date -u '+%H:%M:%S UTC'); files in $OUT: $(cd "$OUT" && printf '%s ' *)"
