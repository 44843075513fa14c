#!/usr/bin/env bash
# The README's main command on a CPU machine: builds .venv if needed, then runs the
# calibrate -> allocate -> prune -> generate demo on SmolLM2-135M-Instruct (real weights).
# Extra arguments go to the demo, e.g. `bash scripts/demo.sh --context-tokens 2048`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup-cpu.sh"
source "$root/scripts/cpu-env.sh"
cd "$root"
exec "$root/.venv/bin/python" -m sglang_depthkv demo "$@"
