#!/usr/bin/env bash
# The one-shot GPU check (issue 27): what megaloop's CUDA path does on one GPU (an H100 or an
# H200), within 540 s all told, every figure in JSON under $OUT as soon as its stage ends.
#
#   bash benchmarks/gpu_prepare.sh           # here, once: wheels and shards into .gpu/
#   device run, carry [".gpu"], timeout_s 600:  bash benchmarks/gpu_session.sh
#   bash benchmarks/gpu_session.sh --cpu-smoke   # the same stages on the CPU at toy sizes
#
# Stages, each under its own time limit and all under one deadline (GPU_SESSION_BUDGET, 540 s
# on a GPU): a stage that fails or runs out of time costs only itself, and the script's exit
# status is non-zero when any stage failed.
#   install  DeepSpeed and what the device's image lacks, from .gpu/wheels (GPU only)
#   env      GPU, torch, the measured bf16 and fp32 matmul rates          -> env.json
#   tests    the GPU tests (tests/test_gpu.py), each test's outcome       -> tests.json
#   step     the d2048 model step alone: transformer, looped (r 3, r 4),  -> step.json
#            Hyperloop; bf16; SDPA flash/cuDNN asserted; eager, compiled, sampled r
#   rope     RoPE tables under zero.Init in bf16, against fp64            -> rope.json
#   train    `megaloop train --json` of tiny and of the d2048 Hyperloop   -> train.json
#            at ZeRO-0 and ZeRO-3, bf16, tracking off (the device has no MLflow)
# After every stage benchmarks/gpu_summary.py rewrites summary.json: each stage's exit status
# and seconds, all the above, the issue's targets. With log.txt that is 8 files, the most the
# device returns.
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
python=${PYTHON:-python3}  # the Python this script is started with, or the one named
failed=0

if [ "$smoke" = 1 ]; then
  budget=${GPU_SESSION_BUDGET:-900}
  limits=(0 60 60 240 90 90 90 90 90)
else
  budget=${GPU_SESSION_BUDGET:-540}
  # install env tests step rope | train: tiny-zero0 tiny-zero3 d2048-zero0 d2048-zero3
  limits=(25 20 60 170 25 30 35 60 70)
fi
deadline=$(($(date +%s) + budget))
SUMMARY_LIMIT=5   # each summary: plain JSON, well under a second
KILL_AFTER=2      # a stage past its limit gets TERM, then KILL this much later

say() { echo "$*" | tee -a "$log"; }
summarize() {
  timeout "$SUMMARY_LIMIT" "$python" benchmarks/gpu_summary.py --out "$OUT" \
    --train-dir "$work/train" --budget "$budget" "$@" >> "$log" 2>&1 || failed=1
}
stage() {  # stage NAME SECONDS COMMAND...: run it under its limit, record it, never stop here
  local name=$1 limit=$2 start rc left
  shift 2
  left=$((deadline - $(date +%s) - KILL_AFTER - SUMMARY_LIMIT))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  start=$(date +%s)
  if [ "$limit" -le 0 ]; then
    say "== $name: skipped, the session's ${budget} s are spent"
    rc=124
  else
    say "== $name (limit ${limit} s)"
    timeout --kill-after="$KILL_AFTER" "$limit" "$@" >> "$log" 2>&1
    rc=$?
  fi
  say "== $name: exit $rc after $(($(date +%s) - start)) s"
  [ "$rc" -eq 0 ] || failed=1
  summarize --stage "$name" --rc "$rc" --seconds "$(($(date +%s) - start))" --limit "$limit"
}

if ! command -v "$python" > /dev/null; then
  say "gpu_session: no $python here: set PYTHON to a Python with torch"
  exit 2
fi
mkdir -p "$work/train"
say "gpu_session: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), smoke=$smoke, $("$python" -V 2>&1)" \
  "($(command -v "$python")), budget ${budget} s"
command -v nvidia-smi > /dev/null && nvidia-smi -L >> "$log" 2>&1

if [ "$smoke" = 1 ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  flags=(--smoke)
  "$python" - "$work/corpus" <<'PYTHON' >> "$log" 2>&1
import shutil, sys, sysconfig
from pathlib import Path

folder = Path(sys.argv[1])
folder.mkdir()
for name in ("textwrap.py", "string.py", "argparse.py", "dataclasses.py"):
    shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / name, folder / f"{name}.txt")
PYTHON
  PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" -m megaloop.cli data prepare \
    --corpus "$work/corpus" --out "$work/shards-4k" --workers 1 --val-fraction 0.25 \
    >> "$log" 2>&1 || { say "gpu_session: $python cannot run megaloop (see $log)"; exit 2; }
  shards_tiny=$work/shards-4k
  shards_d2048=$work/shards-4k
  d2048=(--set model.d_model=64 --set model.n_heads=4 --set model.vocab_size=4096
         --set model.max_seq_len=64 --set train.steps=4 --set train.log_interval=2
         --set train.micro_batch=2 --set train.global_batch=2)
  tiny=(--set model.d_model=64 --set model.max_seq_len=64 --set train.steps=4
        --set train.log_interval=2 --set train.micro_batch=2 --set train.global_batch=2)
  checkpoints=$work/checkpoints
else
  unset DS_ACCELERATOR  # DeepSpeed's CUDA accelerator and NCCL, as on a cluster
  flags=()
  if [ ! -d .gpu/wheels ]; then
    say "no .gpu/wheels: run benchmarks/gpu_prepare.sh here first and carry .gpu"
    summarize --stage install --rc 2 --seconds 0 --limit 0
    exit 2
  fi
  stage install "${limits[0]}" "$python" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl
  export PYTHONPATH=/tmp/site
  shards_tiny=$repo/.gpu/shards-4k
  shards_d2048=$repo/.gpu/shards-32k
  d2048=(--set train.steps=12 --set train.log_interval=3 --set train.micro_batch=8
         --set train.global_batch=8)
  tiny=(--set train.steps=40 --set train.log_interval=5 --set train.micro_batch=16
        --set train.global_batch=16)
  # the d2048 model's checkpoint (fp32 weights and Adam's moments) is about 7 GB: /dev/shm
  # where it has room, else the disk
  need=$((16 * 2**30))
  free=$(df -B1 --output=avail /dev/shm 2>/dev/null | tail -n 1 | tr -d ' ')
  if [ -n "$free" ] && [ "$free" -ge "$need" ] 2>/dev/null; then
    checkpoints=/dev/shm/megaloop-gpu-session
  else
    checkpoints=$work/checkpoints
    say "gpu_session: /dev/shm has ${free:-no} bytes free (< $need): checkpoints go to $checkpoints"
  fi
fi
mkdir -p "$checkpoints"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

stage env "${limits[1]}" "$python" benchmarks/gpu_session.py env --out "$OUT" \
  --checkpoint-dir "$checkpoints" "${flags[@]}"
stage tests "${limits[2]}" "$python" benchmarks/gpu_session.py tests --out "$OUT" "${flags[@]}"
stage step "${limits[3]}" "$python" benchmarks/gpu_session.py step --out "$OUT" "${flags[@]}"
stage rope "${limits[4]}" "$python" benchmarks/gpu_session.py rope --out "$OUT" "${flags[@]}"

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
i=5
for zero in 0 3; do
  training "tiny-zero$zero" configs/runs/tiny.yaml "$shards_tiny" "$zero" "${tiny[@]}"
  stage "train tiny-zero$zero" "${limits[$i]}" "$python" "${args[@]}"
  rm -rf "${checkpoints:?}"/*
  i=$((i + 1))
done
for zero in 0 3; do
  training "d2048-hyperloop-zero$zero" configs/runs/hyperloop-d2048-hyperloop.yaml \
    "$shards_d2048" "$zero" "${d2048[@]}"
  stage "train d2048-hyperloop-zero$zero" "${limits[$i]}" "$python" "${args[@]}"
  rm -rf "${checkpoints:?}"/*
  i=$((i + 1))
done
[ "$checkpoints" = /dev/shm/megaloop-gpu-session ] && rm -rf "$checkpoints"
say "gpu_session: done $(date -u '+%H:%M:%S UTC'), failed=$failed; files in $OUT:" \
  "$(cd "$OUT" && printf '%s ' *)"
exit "$failed"
