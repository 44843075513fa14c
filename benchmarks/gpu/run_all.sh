#!/usr/bin/env bash
# Every GPU check of the project in one command, for a GPU machine without network. It needs the
# offline SGLang 0.5.17 bundle in .gpu/ (built beforehand by the shared bundle script), then:
#
#   bash benchmarks/gpu/run_all.sh
#
# Stages, each under its own timeout, inside one wall-clock budget (BUDGET_S, default 560 s):
#   smoke     the bundle's smoke command (dummy Llama-3.1-8B, one /generate; pays the flashinfer JIT)
#   capacity  vanilla vs --kv-policy depthkv --kv-budget 0.3 at SGLang's own memory sizing, the smoke's
#             flags; vanilla's max_total_num_tokens line is read from the smoke log (no second start)
#   kernels   benchmarks/kernels.py (ragged per-layer KV kernels)
#   tests     pytest -m gpu
#   serving   python -m benchmarks.serving --preset gpu-llama8b, with all the time that is left
# Everything lands in $OUT (at most 8 files come back): run_all.log, kernels-<dev>.md,
# serving-<dev>.json/.md/-throughput.png/-capacity.png, extras.tar.gz (server and client logs, bench
# JSONL, capacity check, kernel JSON, pytest output).
#
# Env: BUDGET_S (560), STAGES ("smoke capacity kernels tests serving"), SERVING_ARGS (extra arguments
# for benchmarks.serving, e.g. "--configs vanilla,depthkv@0.3 --no-cuda-graph"), SMOKE_S (210),
# CAPACITY_S (120), KERNELS_S (75), TESTS_S (180: the start-up calibration test starts two SGLang engines), OUT (set by the device tool; default ./gpu-out).
# DRY_RUN=1 prints the stage commands without running anything (what tests/sglang_e2e checks on CPU).
set -uo pipefail
cd "$(dirname "$0")/../.."
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-560}
STAGES=${STAGES:-"smoke capacity kernels tests serving"}
SERVING_ARGS=${SERVING_ARGS:-}
OUT=${OUT:-$PWD/gpu-out}
WORK=${WORK:-/tmp/depthkv-gpu}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT" "$WORK"

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }
cap() { local a=$1 b=$(left); [ "$a" -lt "$b" ] && echo "$a" || echo "$b"; }  # min(stage cap, time left)
say() { echo "=== [$(date +%T), +$(elapsed) s, $(left) s left] $*"; }
want() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
run() {  # run "$@" (or print it under DRY_RUN=1)
    if [ "$DRY_RUN" = 1 ]; then echo "DRY_RUN: $*"; return 0; fi
    "$@"
}

if [ "$DRY_RUN" != 1 ]; then
    exec > >(tee -a "$OUT/run_all.log") 2>&1
fi
say "run_all.sh: stages '$STAGES', budget ${BUDGET_S} s, out $OUT, work $WORK"

# --- environment: the carried SGLang bundle, then this repository installed editable (offline) ---
if [ "$DRY_RUN" != 1 ]; then
    [ -f .gpu/setup.sh ] || { echo "no .gpu/ bundle: carry it (bash ../shared/gpu/make-bundle.sh here first)"; exit 1; }
    bash .gpu/setup.sh && source /tmp/site/env.sh || { echo "bundle setup failed"; exit 1; }
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || { echo "pip install -e . failed"; exit 1; }
    python3 - <<'PY' || exit 1
import importlib.metadata as md, subprocess
eps = [e for e in md.entry_points(group="sglang.srt.plugins") if e.name == "depthkv"]
print("plugin entry point:", eps or "MISSING")
assert eps, "the depthkv plugin entry point is not installed"
print(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip())
PY
fi
DEV=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -oiE 'H200|H100|H20|A100|B200' | tr A-Z a-z)
DEV=${DEV:-gpu}

if want smoke; then
    say "smoke (cap $(cap "${SMOKE_S:-210}") s)"
    run env LOG="$WORK/smoke.server.log" timeout "$(cap "${SMOKE_S:-210}")" bash .gpu/smoke.sh
    say "smoke rc=$?"
fi

if want capacity; then
    say "capacity check (cap $(cap "${CAPACITY_S:-120}") s)"
    run timeout "$(cap "${CAPACITY_S:-120}")" python3 -m benchmarks.throughput.capacity_check \
        --model .gpu/model-llama8b --vanilla-log "$WORK/smoke.server.log" --work-dir "$WORK/capacity" \
        --out "$WORK/capacity.txt" --timeout-s 110
    say "capacity rc=$?"
fi

if want kernels; then
    say "kernel benchmark (cap $(cap "${KERNELS_S:-75}") s)"
    run timeout "$(cap "${KERNELS_S:-75}")" python3 benchmarks/kernels.py --out "$OUT/kernels-$DEV.md" \
        --json "$WORK/kernels-$DEV.json"
    say "kernels rc=$?"
fi

if want tests; then
    say "pytest -m gpu (cap $(cap "${TESTS_S:-180}") s)"
    run timeout "$(cap "${TESTS_S:-180}")" python3 -m pytest -q -p no:cacheprovider -m gpu \
        --continue-on-collection-errors tests
    say "pytest rc=$?"
fi

if want serving; then
    SB=$(( $(left) - 25 ))
    say "serving benchmark (budget $SB s)"
    if [ "$SB" -lt 120 ]; then
        echo "serving: only $SB s left, not started"
    else
        # shellcheck disable=SC2086  # SERVING_ARGS is a list of words
        run timeout $(( SB + 20 )) python3 -m benchmarks.serving --preset gpu-llama8b --time-budget-s "$SB" \
            --out-dir "$OUT" --work-dir "$WORK/serving" $SERVING_ARGS
        say "serving rc=$?"
    fi
fi

if [ "$DRY_RUN" != 1 ]; then
    tar czf "$OUT/extras.tar.gz" -C "$WORK" . 2>/dev/null
    ls -la "$OUT"
fi
say "done"
