#!/usr/bin/env bash
# Builds .venv-kvpress (or VENV): the venv benchmarks/accuracy/kvpress_peers.py runs in. kvpress 0.5.5
# needs transformers < 5.3 while the project pins 5.12.1, so the peers get their own venv: torch 2.13.0
# (the CPU wheel, pinned by a constraint file so pip never pulls a CUDA build), transformers 5.2.0,
# kvpress 0.5.5 --no-deps plus the modules its package import needs (cachetools, requests, fire; a
# placeholder stands in for datasets, used by DuoAttention only).
# The project itself is found through PYTHONPATH (only sglang_depthkv.core and benchmarks are imported).
# Usage: bash benchmarks/accuracy/kvpress_env.sh [VENV]; then
#   PYTHONPATH=. .venv-kvpress/bin/python -m benchmarks.accuracy.kvpress_peers --out ...
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
venv=${1:-$root/.venv-kvpress}
py=${PYTHON:-python3}
log="$venv.log"
cons=$(mktemp); echo "torch==2.13.0" > "$cons"; trap 'rm -f "$cons"' EXIT
export PIP_CONSTRAINT=$cons PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
if [ ! -x "$venv/bin/python" ]; then
  echo "[kvpress-env] venv $venv" >&2
  "$py" -m venv "$venv"
fi
pip="$venv/bin/python -m pip"
echo "[kvpress-env] torch 2.13.0 (CPU), transformers 5.2.0, kvpress 0.5.5 (log: $log)" >&2
$pip install -q "torch==2.13.0" "transformers==5.2.0" "accelerate" "safetensors" "numpy" "jinja2" > "$log" 2>&1
$pip install -q --no-deps "kvpress==0.5.5" >> "$log" 2>&1
$pip install -q "cachetools" "requests" "fire" >> "$log" 2>&1
"$venv/bin/python" -c "import transformers, torch; print('[kvpress-env] ok: torch', torch.__version__, 'transformers', transformers.__version__)" >&2
