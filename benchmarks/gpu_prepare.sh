#!/usr/bin/env bash
# Prepare, on this machine (it has PyPI), what benchmarks/gpu_session.sh needs on the device
# machine (bare: Python 3.12, a CUDA build of torch, no DeepSpeed, no network). Everything goes
# to .gpu/ (ignored by git; the device call carries it), about 10 MB:
#   .gpu/wheels/      DeepSpeed (a pure-Python wheel built here against the venv's torch: PyPI
#                     has DeepSpeed as source only; its CUDA ops are built on use, and megaloop
#                     uses none) and the dependencies the device's image lacks, for CPython 3.12
#   .gpu/corpus/      about 3 MB of standard-library source as .txt documents
#   .gpu/shards-4k/   that corpus in shards of the default tokenizer (the tiny model)
#   .gpu/shards-32k/  and of a 32,000-piece tokenizer trained on it (the d2048 models)
# Then call the device with carry [".gpu"] and the command `bash benchmarks/gpu_session.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py=.venv/bin/python
out=.gpu
rm -rf "$out/wheels"  # no stale wheel of an older version: the device installs all it finds
mkdir -p "$out/wheels"

ds_version=$("$py" -c 'import importlib.metadata as m; print(m.version("deepspeed"))')
DS_BUILD_OPS=0 "$py" -m pip wheel --quiet --no-deps --no-build-isolation -w "$out/wheels" \
  "deepspeed==$ds_version"
# the versions this venv runs, where the device's image has none (see the device's KINDS.md)
pins=()
for package in hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions; do
  pins+=("$package==$("$py" -c "import importlib.metadata as m; print(m.version('$package'))")")
done
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$out/wheels" "${pins[@]}"

if [ ! -f "$out/shards-32k/manifest.json" ]; then
  rm -rf "$out/corpus" "$out/shards-4k" "$out/shards-32k"
  "$py" - "$out/corpus" <<'PYTHON'
import shutil, sys, sysconfig
from pathlib import Path

folder, budget = Path(sys.argv[1]), 3_000_000
folder.mkdir(parents=True)
stdlib = Path(sysconfig.get_paths()["stdlib"])
for source in sorted(stdlib.glob("*.py")):
    if budget <= 0:
        break
    shutil.copy(source, folder / f"{source.stem}.txt")
    budget -= source.stat().st_size
PYTHON
  "$py" -m megaloop.cli data prepare --corpus "$out/corpus" --out "$out/shards-4k" \
    --val-fraction 0.05
  "$py" -m megaloop.cli tokenizer train --corpus "$out/corpus" --vocab-size 32000 \
    --out "$out/sp32k.model"
  "$py" -m megaloop.cli data prepare --corpus "$out/corpus" --tokenizer "$out/sp32k.model" \
    --out "$out/shards-32k" --val-fraction 0.05
fi
du -sh "$out" "$out"/*
