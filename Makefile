# make test    set up (venv, torch, build) if needed, then run the test suite
# make bench   set up if needed, then run the benchmarks (BENCH_ARGS=...)
#
# PYTHON=python3 uses an existing interpreter (with torch installed) and skips
# the virtual environment: for machines with no network.

PYTHON ?=
VENV ?= .venv
BENCH_ARGS ?=
PYTEST_ARGS ?=

ifeq ($(strip $(PYTHON)),)
PY := $(VENV)/bin/python
ENV_STAMP := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
else
PY := $(PYTHON)
ENV_STAMP :=
endif

export PYTHONPATH := $(CURDIR)/python$(if $(PYTHONPATH),:$(PYTHONPATH))
export MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: all build test test-cuda test-emu test-emu-asan test-asan bench cpp-test info clean distclean

all: build

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -r requirements.txt
	touch $@

# Incremental (ninja): a no-op rebuild takes seconds.
build: $(ENV_STAMP)
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-cuda: build
	$(PY) -m pytest tests -m cuda $(PYTEST_ARGS)

# The suite again with the CPU kernels replaced by the CUDA kernels, run on
# the CPU by the emulator of tools/cuda_emu (their indexing, arithmetic and
# barriers, not their speed). CUEMU_ORDER=reverse or shuffle<N> changes the
# order a block's threads and a grid's blocks run in (forward by default).
test-emu: build
	TORCHFUSE_CUDA_EMU=1 $(PY) -m pytest tests $(PYTEST_ARGS)

# The same with the emulator built with AddressSanitizer (CUEMU_ASAN=1): a
# kernel read or write outside the tensors torch allocated is reported and
# ends the run. libstdc++ is preloaded beside libasan so that ASan can
# intercept __cxa_throw (python itself does not load libstdc++; without it
# the first op that raised a C++ exception ended the process). pytest
# captures Python's streams only (--capture=sys): ASan's report, written to
# file descriptor 2 by a process it then ends, would otherwise be lost with
# pytest's captured output. 7-12 minutes on 2 cores (12.3 in CI, 2026-12-07); CI
# runs it after test-emu.
ASAN_PRELOAD = $(shell gcc -print-file-name=libasan.so) $(shell gcc -print-file-name=libstdc++.so)
test-emu-asan: build
	@test -f "$(word 1,$(ASAN_PRELOAD))" || { echo "gcc's libasan.so not found"; exit 1; }
	CUEMU_ASAN=1 TORCHFUSE_CUDA_EMU=1 ASAN_OPTIONS=detect_leaks=0 \
	    LD_PRELOAD="$(ASAN_PRELOAD)" $(PY) -m pytest tests --capture=sys $(PYTEST_ARGS)

# The suite with the CPU kernels replaced by the same kernels built with
# AddressSanitizer at -O1 (tools/cpu_asan.py, build/torchfuse_cpu_asan): a
# kernel read or write outside the tensors torch allocated is reported and
# ends the run. Preloads as test-emu-asan. CI runs it after test-emu-asan.
test-asan: build
	@test -f "$(word 1,$(ASAN_PRELOAD))" || { echo "gcc's libasan.so not found"; exit 1; }
	TORCHFUSE_CPU_ASAN=1 ASAN_OPTIONS=detect_leaks=0 \
	    LD_PRELOAD="$(ASAN_PRELOAD)" $(PY) -m pytest tests --capture=sys $(PYTEST_ARGS)

bench: build
	$(PY) bench/run.py $(BENCH_ARGS)

info: build
	$(PY) -m torchfuse.info

# The C++ (libtorch) library and an example program that loads it and calls
# the ops through the dispatcher.
CPP_BUILD ?= cpp/build
cpp-test: $(ENV_STAMP)
	cmake -S . -B $(CPP_BUILD) $$($(PY) tools/build_env.py cmake-args) -DCMAKE_BUILD_TYPE=Release
	cmake --build $(CPP_BUILD) -j $(MAX_JOBS)
	$(CPP_BUILD)/torchfuse_example

clean:
	rm -rf build $(CPP_BUILD) python/torchfuse/*.so python/torchfuse/_build_info.py

distclean: clean
	rm -rf $(VENV)
