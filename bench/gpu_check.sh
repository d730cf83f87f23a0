#!/usr/bin/env bash
# One pass over everything that needs a GPU. On a machine with a CUDA GPU,
# from the repository root:
#
#     OUT=/path/to/results bash bench/gpu_check.sh [--quick]
#
# Steps (STEPS, default "build tests memcheck racecheck bench"; a rerun on a
# machine that still has the build can name fewer):
# 1. build: the extension with the interpreter there (PYTHON, default python3),
#    pip install --no-build-isolation --no-deps -e . (for the visible GPU's
#    architecture only: setup.py leaves TORCH_CUDA_ARCH_LIST to torch there);
# 2. tests: the CUDA tests (pytest -m cuda) and, at the same time in the
#    background, the CPU tests (-m "not cuda": that machine's CPU may take
#    vector paths this one does not);
# 3. memcheck: compute-sanitizer's memcheck over the float32 reference tests
#    (every op, every path they reach; the autograd/compile machinery is
#    host-side and only slow under the sanitizer);
# 4. racecheck: the same subset (shared-memory hazards);
# 5. bench: bench/run.py --device cuda (BENCH_ARGS, default --no-compile:
#    inductor's compiles cost minutes of device time; with --quick one case per
#    op and dtype).
# Each step runs under `timeout` (seconds: T_BUILD 200, T_TESTS 200,
# T_MEMCHECK 70, T_RACECHECK 30, T_BENCH 90: 590 s at most, so that the whole
# check fits one device call of 600 s; this session's device time is 15
# minutes, machine start included); a step cut off exits 124 and the next
# one runs. The sizes are estimates (none of this has run on a GPU yet):
# adjust them from the first run's summary, which has each step's time and
# the 25 slowest tests.
# Writes at most 8 files into $OUT (what a device call brings back):
# summary.txt (environment first) build.log tests.log tests-cpu.log
# sanitizer.log bench.log bench-cuda.json bench-cuda.png. Exits non-zero if
# any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench/out/gpu}
PY=${PYTHON:-python3}
QUICK=${1:-}
STEPS=" ${STEPS:-build tests memcheck racecheck bench} "
mkdir -p "$OUT"
status=0
note() { echo "== $*" | tee -a "$OUT/summary.txt"; }
outcome() {  # pytest's final line or the sanitizer's summary; for a run cut off, what -v logged
  local last
  last=$(grep -E '^=+ .* in [0-9.]+s|ERROR SUMMARY' "$1" | tail -1)
  [ -n "$last" ] && { echo "$last"; return; }
  echo "cut off: $(grep -c ' PASSED' "$1") passed, $(grep -c ' FAILED' "$1") failed, $(grep -c ' ERROR' "$1") errors so far"
}
want() { [[ "$STEPS" == *" $1 "* ]]; }
step() {  # step NAME LOG SECONDS CMD...: runs CMD (at most SECONDS), logs, records the exit status
  local name=$1 log=$2 limit=$3; shift 3
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  note "$name: exit $rc in $((SECONDS - t0)) s; $(outcome "$log")"
  [ $rc -eq 0 ] || status=1
  return $rc
}

{
  date -u
  git rev-parse HEAD 2>/dev/null
  nvidia-smi
  nvcc --version
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
  echo "steps:$STEPS"
} > "$OUT/summary.txt" 2>&1

export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if want build; then
  # ptxas -v: registers, shared memory and spills of every kernel, in build.log
  export TORCHFUSE_NVCC_FLAGS="${TORCHFUSE_NVCC_FLAGS:--Xptxas=-v}"
  if ! step build "$OUT/build.log" "${T_BUILD:-200}" "$PY" -m pip install --no-build-isolation --no-deps -v -e .; then
    tail -60 "$OUT/build.log"
    exit 1
  fi
  note "kernels that spill registers: $(grep -cE '[1-9][0-9]* bytes spill (stores|loads)' "$OUT/build.log")"
  grep -B2 -E '[1-9][0-9]* bytes spill (stores|loads)' "$OUT/build.log" | grep -oE "_Z[A-Za-z0-9_]+" | sort -u | head -20 >> "$OUT/summary.txt"
fi
"$PY" -m torchfuse.info >> "$OUT/summary.txt" 2>&1

if want tests; then
  # -v: every test's outcome is in the log as it happens, so a run cut off by
  # its time limit still says what passed and failed; faulthandler dumps the
  # stacks of a test that runs over 60 s (a hung kernel); --durations names
  # the slow tests for sizing T_TESTS.
  OMP_NUM_THREADS=${CPU_TEST_THREADS:-6} timeout --kill-after=10 "${T_TESTS:-200}" \
    "$PY" -m pytest tests -v -rfE -p no:cacheprovider -m "not cuda" > "$OUT/tests-cpu.log" 2>&1 &
  cpu_pid=$!
  step tests "$OUT/tests.log" "${T_TESTS:-200}" "$PY" -m pytest tests -m cuda -v -rfEs -p no:cacheprovider \
    -o faulthandler_timeout=60 --durations=25
  wait $cpu_pid
  rc=$?
  note "tests (CPU, beside): exit $rc; $(outcome "$OUT/tests-cpu.log")"
  [ $rc -eq 0 ] || status=1
fi

if want memcheck || want racecheck; then
  SAN=$(command -v compute-sanitizer || echo "$("$PY" tools/build_env.py cuda-home)/bin/compute-sanitizer")
  if [ ! -x "$SAN" ]; then
    note "compute-sanitizer not found"
    status=1
  else
    want memcheck && step memcheck "$OUT/sanitizer.log" "${T_MEMCHECK:-70}" \
      "$SAN" --tool memcheck --error-exitcode 99 \
      "$PY" -m pytest tests -q -m cuda -p no:cacheprovider -k "matches_reference and float32"
    want racecheck && step racecheck "$OUT/sanitizer.log" "${T_RACECHECK:-30}" \
      "$SAN" --tool racecheck --error-exitcode 99 \
      "$PY" -m pytest tests -q -m cuda -p no:cacheprovider -k "matches_reference and float32"
  fi
fi

if want bench; then
  # shellcheck disable=SC2086
  step bench "$OUT/bench.log" "${T_BENCH:-90}" "$PY" bench/run.py --device cuda $QUICK \
    ${BENCH_ARGS:---no-compile} --out "$OUT/bench-cuda.json"
fi
cat "$OUT/summary.txt"
exit $status
