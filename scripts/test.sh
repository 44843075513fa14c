#!/usr/bin/env bash
# The project's test command (README, .ci/run): builds .venv if needed, then runs the CPU suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/core -k budgets`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup-cpu.sh"
source "$root/scripts/cpu-env.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
