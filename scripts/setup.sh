#!/usr/bin/env bash
# Create the virtual environment (.venv) with megaloop, its dependencies and the dev tools.
# Without CUDA it installs the CPU build of torch, not a multi-GB CUDA build.
# Re-running is cheap: nothing is done while pyproject.toml and the torch version are unchanged.
#
#   TORCH_VERSION      torch release to install (default 2.13.0)
#   TORCH_CPU_INDEX    pip index of PyTorch's CPU wheels, used when no local CPU wheel is found
#   MEGALOOP_VENV      where the environment goes (default .venv)
#   MEGALOOP_EXTRAS    pip extras to install (default dev; add gpu on a CUDA machine)
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
pip=("$venv/bin/python" -m pip)

local_wheels=$(mktemp -d)
trap 'rm -rf "$local_wheels"' EXIT
if [ "$flavour" = cuda ]; then
  "${pip[@]}" install --quiet "torch==$torch_version"
elif "${pip[@]}" download --quiet --no-index --no-deps "torch==$torch_version" \
       -d "$local_wheels" 2>/dev/null && compgen -G "$local_wheels/torch-*+cpu-*.whl" >/dev/null; then
  "${pip[@]}" install --quiet "$local_wheels"/torch-*.whl  # a CPU wheel from pip's local links
else
  # PyPI's Linux wheel is the CUDA build: take the CPU build from PyTorch's own index.
  "${pip[@]}" install --quiet "torch==$torch_version" --index-url "$torch_cpu_index"
fi
"${pip[@]}" install --quiet -e ".[$extras]"
echo "$want" > "$stamp"
