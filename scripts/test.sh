#!/usr/bin/env bash
# The project's test command (README, .ci/run): builds .venv and .venv-kvpress if needed, then runs
# the CPU suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/core -k budgets`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup-cpu.sh"
# the kvpress peers' own venv (transformers < 5.3): tests/core/test_kvpress_shared_prefill.py runs in it
bash "$root/benchmarks/accuracy/kvpress_env.sh"
source "$root/scripts/cpu-env.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
