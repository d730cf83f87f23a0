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
step() {  # step NAME LOG CMD...: runs CMD, logs, records the exit status
  local name=$1 log=$2; shift 2
  local t0=$SECONDS
  "$@" >> "$log" 2>&1
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
if ! step build "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps -v -e .; then
  tail -60 "$OUT/build.log"
  exit 1
fi
"$PY" -m torchfuse.info >> "$OUT/summary.txt" 2>&1

step tests "$OUT/tests.log" "$PY" -m pytest tests -q -rs -p no:cacheprovider

SAN=$(command -v compute-sanitizer || echo "$("$PY" tools/build_env.py cuda-home)/bin/compute-sanitizer")
if [ -x "$SAN" ]; then
  # memcheck over the CUDA tests (autograd/compile machinery is host-side and
  # slow under the sanitizer, so those tests are left to the plain run above)
  step memcheck "$OUT/sanitizer.log" "$SAN" --tool memcheck --error-exitcode 99 \
    "$PY" -m pytest tests -q -m cuda -p no:cacheprovider \
    -k "not compile and not gradcheck and not opcheck and not double_backward"
  step racecheck "$OUT/sanitizer.log" "$SAN" --tool racecheck --error-exitcode 99 \
    "$PY" -m pytest tests -q -m cuda -p no:cacheprovider -k "matches_reference and float32"
else
  note "compute-sanitizer not found"
  status=1
fi

step bench "$OUT/bench.log" "$PY" bench/run.py --device cuda $QUICK --out "$OUT/bench-cuda.json"
cat "$OUT/summary.txt"
exit $status
