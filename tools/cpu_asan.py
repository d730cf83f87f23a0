"""Build the CPU kernels with AddressSanitizer, as a library that replaces
torchfuse's CPU kernels when loaded after it.

csrc/<op>/<op>_cpu.cpp (the kernels and their CPU registration) and
csrc/<op>/<op>.cpp (the host code they call) are compiled with
-fsanitize=address at -O1, with the same instruction set and OpenMP flags
as setup.py's build, into build/torchfuse_cpu_asan. Loaded after torchfuse
(whose library defines the schemas), its TORCH_LIBRARY_IMPL(torchfuse, CPU)
blocks override the extension's, so every CPU call of torch.ops.torchfuse.*,
the direct entries' included, runs the instrumented kernels: a read or write
outside the memory torch allocated is reported and ends the run.

    python tools/cpu_asan.py        # build (incremental) and print the path

The whole test suite: `make test-asan` (TORCHFUSE_CPU_ASAN=1; tests/conftest.py
loads the library). libasan must be the first library the process loads, and
libstdc++ is preloaded beside it (see the Makefile and tools/cuda_emu/build.py:
python does not load libstdc++ itself, and ASan then cannot intercept
__cxa_throw).
"""
from __future__ import annotations

import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CSRC = os.path.join(ROOT, "csrc")
NAME = "torchfuse_cpu_asan"


def sources() -> list[str]:
    """Every op's CPU kernels and its host code."""
    out = []
    for kernels in sorted(glob.glob(os.path.join(CSRC, "*", "*_cpu.cpp"))):
        op_dir = os.path.dirname(kernels)
        host = os.path.join(op_dir, os.path.basename(op_dir) + ".cpp")
        if os.path.exists(host):
            out.append(host)
        out.append(kernels)
    return out


def build(verbose: bool = False) -> str:
    """Build (incrementally) and load the library; returns its path."""
    sys.path.insert(0, HERE)
    from build_env import cpu_flags, load_library, openmp_flags

    isa, _ = cpu_flags()
    omp = openmp_flags()
    build_dir = os.path.join(ROOT, "build", NAME)
    os.makedirs(build_dir, exist_ok=True)
    cflags = ["-O1", "-g1", "-std=c++20", "-fvisibility=hidden", "-fsanitize=address",
              "-fno-omit-frame-pointer"] + isa + omp
    return load_library(NAME, build_dir, sources(), cflags, ["-fsanitize=address"] + omp, [],
                        verbose)


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv))
