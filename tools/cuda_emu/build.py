"""Build the CUDA emulator library: csrc's CUDA kernels compiled for the CPU.

The `.cu` files are rewritten (kernel launches `k<<<g, b, s, st>>>(...)` become
`::cuemu::launch("k", k, g, b, s, st)(...)`, shared memory storage from the
emulator, poisoned before each block) into build/cuda_emu/gen, then compiled with g++ together
with the ops' host code (csrc/<op>/<op>.cpp), the CUDA registrations made CPU
ones. Loaded after torchfuse (whose library defines the schemas), it replaces
the CPU kernels of torch.ops.torchfuse.* with the CUDA ones, run on CPU
tensors: the CPU test suite then tests the CUDA kernels
(TORCHFUSE_CUDA_EMU=1 make test; tests/conftest.py loads it).

    python tools/cuda_emu/build.py        # build (incremental) and print the path

CUEMU_ASAN=1 builds it with AddressSanitizer (build/torchfuse_cuda_emu_asan), which
then reports kernel reads and writes outside the tensors torch allocated:

    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
        ASAN_OPTIONS=detect_leaks=0 CUEMU_ASAN=1 python tools/cuda_emu/fuzz.py --seconds 300

or the whole test suite: `make test-emu-asan`. libstdc++ must be preloaded with
libasan: python does not load it, so ASan could not find the real __cxa_throw
at start-up and the first C++ exception ended the process ("CHECK failed:
asan_interceptors.cpp ... real___cxa_throw").
"""
from __future__ import annotations

import glob
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")

_LAUNCH = re.compile(
    r"([A-Za-z_][\w:]*(?:<[^<>;{}]*>)?)\s*<<<(.*?)>>>\s*\(", re.DOTALL)
_STATIC_SMEM = re.compile(
    r"__shared__\s+(?:__align__\(\d+\)\s+)?([\w:][\w:<>,\s]*?)\s+(\w+)\s*((?:\[[^\]]+\])+)\s*;")
_DYN_SMEM = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:][\w:\s]*?)\s+(\w+)\s*\[\s*\]\s*;")


def rewrite(text: str) -> str:
    """The CUDA source with its launch syntax and shared memory (static and
    dynamic) spelled as calls into the emulator (line numbers kept)."""
    def launch(m: re.Match) -> str:
        kernel, cfg = m.group(1), m.group(2)
        name = " ".join(kernel.split())
        return f'::cuemu::launch("{name}", {kernel}, {cfg})('

    text = _LAUNCH.sub(launch, text)
    site = iter(range(1 << 30))
    text = _DYN_SMEM.sub(
        lambda m: f"{m.group(1)}* {m.group(2)} = "
                  f"static_cast<{m.group(1)}*>(::cuemu::dynamic_smem());", text)
    text = _STATIC_SMEM.sub(
        lambda m: f'auto& {m.group(2)} = ::cuemu::shared<{m.group(1)} {m.group(3)}>'
                  f'("{m.group(2)}#{next(site)}");', text)
    if "<<<" in text or "__shared__" in text:
        raise RuntimeError("cuemu: a launch or shared declaration was not rewritten")
    return text


def sources(build_dir: str) -> tuple[list[str], list[str]]:
    gen = os.path.join(build_dir, "gen")
    os.makedirs(gen, exist_ok=True)
    out, includes = [os.path.join(HERE, "cuemu.cpp")], []
    selftest = os.path.join(HERE, "selftest.cu")
    for cu in sorted(glob.glob(os.path.join(CSRC, "*", "*.cu"))) + [selftest]:
        op_dir = os.path.dirname(cu)
        op = os.path.basename(op_dir) if cu != selftest else "cuemu_selftest"
        host = os.path.join(op_dir, f"{op}.cpp")
        if os.path.exists(host):
            out.append(host)
        with open(cu) as f:
            text = f'#include "cuemu.h"\n#line 1 "{cu}"\n' + rewrite(f.read())
        dst = os.path.join(gen, op + "_cuda_emu.cpp")
        old = open(dst).read() if os.path.exists(dst) else None
        if old != text:  # keep the timestamp (and ninja's no-op) when unchanged
            with open(dst, "w") as f:
                f.write(text)
        out.append(dst)
        includes.append(op_dir)
    return out, includes


def build(verbose: bool = False) -> str:
    """Build (incrementally) and load the emulator library; returns its path."""
    sys.path.insert(0, os.path.dirname(HERE))
    from build_env import load_library

    asan = os.environ.get("CUEMU_ASAN") == "1"
    name = "torchfuse_cuda_emu" + ("_asan" if asan else "")
    build_dir = os.path.join(ROOT, "build", name)
    os.makedirs(build_dir, exist_ok=True)
    srcs, op_dirs = sources(build_dir)
    cflags = ["-O1", "-g0", "-std=c++20", "-fvisibility=hidden",
              "-DTORCHFUSE_CUDA_EMU", "-DTORCHFUSE_WITH_CUDA", "-w"]
    ldflags = []
    if asan:
        cflags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
    return load_library(name, build_dir, srcs, cflags, ldflags,
                        [os.path.join(HERE, "include"), HERE] + op_dirs, verbose)


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv))
