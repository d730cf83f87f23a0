#!/usr/bin/env bash
# One pass over everything that needs a GPU. On a machine with a CUDA GPU,
# from the repository root:
#
#     OUT=/path/to/results bash bench/gpu_check.sh [--quick]
#
# 1. builds the extension with the interpreter there (PYTHON, default python3):
#    pip install --no-build-isolation --no-deps -e .
# 2. runs the whole test suite (CPU and CUDA tests);
# 3. runs compute-sanitizer (memcheck, then racecheck on a subset) over the
#    CUDA tests;
# 4. runs the benchmarks on CUDA (bench/run.py --device cuda).
# Each step runs under `timeout` (seconds: T_BUILD 200, T_TESTS 120,
# T_MEMCHECK 80, T_RACECHECK 30, T_BENCH 100; under 9 minutes in all; sized
# by guess, never run on a GPU yet: adjust from the first run's summary) so
# that one device call (10 minutes a command, 15 of device time a session)
# returns its logs even when a step hangs; a step cut off exits 124. With
# --quick the benchmarks take one case per op and dtype (needed to fit T_BENCH;
# the JSON is written only when the run completes).
# Writes 8 files into $OUT: env.txt summary.txt build.log tests.log
# sanitizer.log bench.log bench-cuda.json bench-cuda.png. Exits non-zero if
# any step failed (all steps run regardless).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench/out/gpu}
PY=${PYTHON:-python3}
QUICK=${1:-}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
status=0
note() { echo "== $*" | tee -a "$OUT/summary.txt"; }
step() {  # step NAME LOG SECONDS CMD...: runs CMD (at most SECONDS), logs, records the exit status
  local name=$1 log=$2 limit=$3; shift 3
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  note "$name: exit $rc in $((SECONDS - t0)) s; $(grep -E 'passed|failed|ERROR SUMMARY|error' "$log" | tail -1)"
  [ $rc -eq 0 ] || status=1
  return $rc
}

{
  date -u
  git rev-parse HEAD 2>/dev/null
  nvidia-smi
  nvcc --version
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
} > "$OUT/env.txt" 2>&1

export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# ptxas -v: registers, shared memory and spills of every kernel, in build.log
export TORCHFUSE_NVCC_FLAGS="${TORCHFUSE_NVCC_FLAGS:--Xptxas=-v}"
if ! step build "$OUT/build.log" "${T_BUILD:-200}" "$PY" -m pip install --no-build-isolation --no-deps -v -e .; then
  tail -60 "$OUT/build.log"
  exit 1
fi
note "kernels that spill registers: $(grep -cE '[1-9][0-9]* bytes spill (stores|loads)' "$OUT/build.log")"
grep -B2 -E '[1-9][0-9]* bytes spill (stores|loads)' "$OUT/build.log" | grep -oE "_Z[A-Za-z0-9_]+" | sort -u | head -20 >> "$OUT/summary.txt"
"$PY" -m torchfuse.info >> "$OUT/summary.txt" 2>&1

# -v: every test's outcome is in the log as it happens, so a run cut off by
# its time limit still says what passed and failed; faulthandler dumps the
# stacks of a test that runs over 60 s (a hung kernel); --durations names
# the slow tests for sizing T_TESTS.
step tests "$OUT/tests.log" "${T_TESTS:-120}" "$PY" -m pytest tests -v -rfEs -p no:cacheprovider \
  -o faulthandler_timeout=60 --durations=25

SAN=$(command -v compute-sanitizer || echo "$("$PY" tools/build_env.py cuda-home)/bin/compute-sanitizer")
if [ -x "$SAN" ]; then
  # memcheck over the CUDA tests (autograd/compile machinery is host-side and
  # slow under the sanitizer, so those tests are left to the plain run above)
  step memcheck "$OUT/sanitizer.log" "${T_MEMCHECK:-80}" "$SAN" --tool memcheck --error-exitcode 99 \
    "$PY" -m pytest tests -q -m cuda -p no:cacheprovider \
    -k "not compile and not gradcheck and not opcheck and not double_backward"
  step racecheck "$OUT/sanitizer.log" "${T_RACECHECK:-30}" "$SAN" --tool racecheck --error-exitcode 99 \
    "$PY" -m pytest tests -q -m cuda -p no:cacheprovider -k "matches_reference and float32"
else
  note "compute-sanitizer not found"
  status=1
fi

step bench "$OUT/bench.log" "${T_BENCH:-100}" "$PY" bench/run.py --device cuda $QUICK --out "$OUT/bench-cuda.json"
cat "$OUT/summary.txt"
exit $status
