#!/usr/bin/env bash
# Create the virtual environment (.venv) with megaloop, its dependencies and the dev tools.
# Without CUDA it installs the CPU build of torch, not a multi-GB CUDA build.
# Re-running is cheap: nothing is done while pyproject.toml and the torch version are unchanged.
#
#   TORCH_VERSION      torch release to install (default 2.13.0)
#   TORCH_CPU_INDEX    pip index of PyTorch's CPU wheels, used when no local CPU wheel is found
#   MEGALOOP_VENV      where the environment goes (default .venv)
#   MEGALOOP_EXTRAS    pip extras to install (default dev; add gpu on a CUDA machine)
#   MEGALOOP_USE_UV    1 (default): install with uv (the one on PATH, else one put into the venv
#                      by pip); 0: with pip. Both keep their download caches (~/.cache/pip,
#                      ~/.cache/uv) between runs.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
venv=${MEGALOOP_VENV:-.venv}
torch_version=${TORCH_VERSION:-2.13.0}
torch_cpu_index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
extras=${MEGALOOP_EXTRAS:-dev}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavour=cuda
else
  flavour=cpu
fi
want="$(sha256sum pyproject.toml | cut -c1-16) torch=$torch_version/$flavour extras=$extras"
stamp="$venv/.megaloop-setup"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "megaloop setup: creating $venv (torch $torch_version, $flavour build, extras: $extras)"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# uv installs the same packages as pip, several times faster (benchmarks/RESULTS.md): the one on
# PATH, else one installed into the venv; pip where neither is possible or MEGALOOP_USE_UV=0
uv=
if [ "${MEGALOOP_USE_UV:-1}" != 0 ]; then
  if command -v uv >/dev/null 2>&1; then
    uv=$(command -v uv)
  elif "$venv/bin/python" -m pip install --quiet uv >/dev/null 2>&1; then
    uv=$venv/bin/uv
  fi
fi
if [ -n "$uv" ]; then
  echo "megaloop setup: installing with $uv"
  # uv reads no pip.conf: the local wheel folder pip is pointed at, if any, is uv's too
  if [ -n "${PIP_FIND_LINKS:-}" ] && [ -z "${UV_FIND_LINKS:-}" ]; then
    export UV_FIND_LINKS=$PIP_FIND_LINKS
  fi
  install() { "$uv" pip install --quiet --python "$venv/bin/python" "$@"; }
else
  echo "megaloop setup: installing with pip"
  install() { "$venv/bin/python" -m pip install --quiet "$@"; }
fi

local_wheels=$(mktemp -d)
trap 'rm -rf "$local_wheels"' EXIT
if [ "$flavour" = cuda ]; then
  install "torch==$torch_version"
elif "$python" -m pip download --quiet --no-index --no-deps "torch==$torch_version" \
       -d "$local_wheels" 2>/dev/null && compgen -G "$local_wheels/torch-*+cpu-*.whl" >/dev/null; then
  install "$local_wheels"/torch-*.whl  # a CPU wheel from pip's local links
else
  # PyPI's Linux wheel is the CUDA build: take the CPU build from PyTorch's own index.
  install "torch==$torch_version" --index-url "$torch_cpu_index"
fi
install -e ".[$extras]"
# Bytecode for every installed module, once: uv writes none at install, and where
# PYTHONDONTWRITEBYTECODE is set (CI here) Python writes none at import either, so each process
# compiled torch, DeepSpeed and MLflow from source again: 13.4 s of CPU to import them, 4.4 s
# from bytecode (benchmarks/RESULTS.md), in every rank of every run. It exits 1 on the few files
# written for a newer Python (torch's py312_intrinsics.py), which nothing imports here.
PYTHONDONTWRITEBYTECODE="" "$venv/bin/python" -m compileall -q -j 0 \
  "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
  >/dev/null || true
echo "$want" > "$stamp"
