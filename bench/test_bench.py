"""The benchmark cases through pytest-benchmark:

    pytest bench/ --benchmark-only                       # CPU, every case
    TORCHFUSE_BENCH_DEVICE=cuda pytest bench/ -k "rms_norm and bfloat16"

One test per (case, implementation, forward / forward+backward). bench/run.py
gives the fuller report (memory floor, peak memory, chart).
"""

from __future__ import annotations

import os

import pytest
import torch

from cases import CASES
from harness import IMPLS, fwd_bwd_fn, fwd_fn

DEVICE = os.environ.get("TORCHFUSE_BENCH_DEVICE", "cpu")

if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("TORCHFUSE_BENCH_DEVICE=cuda but no CUDA GPU visible", allow_module_level=True)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "-"))
def test_bench(benchmark, case, impl, mode):
    inputs = case.make_inputs(DEVICE, case.dtype)
    fn = {"torchfuse": case.torchfuse, "eager": case.eager}.get(impl)
    if impl == "compile":
        torch._dynamo.reset()
        fn = torch.compile(case.eager)
    run = fwd_fn(fn, inputs) if mode == "fwd" else fwd_bwd_fn(fn, inputs, case.grad_inputs, {})

    def timed():
        run()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    timed()  # warm-up (and compilation)
    benchmark.group = f"{case.label} {mode}"
    benchmark(timed)
