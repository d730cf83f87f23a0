"""Builds torchfuse._C with torch.utils.cpp_extension (ninja).

Every csrc/**/*.cpp is always compiled; every csrc/**/*.cu is compiled when
torch is a CUDA build and nvcc is found (or FORCE_CUDA=1), unless
TORCHFUSE_CPU_ONLY=1.

Environment:
  TORCHFUSE_CPU_ONLY=1       skip the CUDA kernels
  FORCE_CUDA=1               build them even if nvcc is not found on PATH
  TORCH_CUDA_ARCH_LIST       CUDA architectures (default "8.0;9.0" when no GPU
                             is visible; the visible GPU's otherwise)
  TORCHFUSE_CPU_CAPABILITY   DEFAULT, AVX2 or AVX512: the at::vec instruction
                             set for the CPU kernels (default: the best this
                             machine and torch support)
  TORCHFUSE_NO_OPENMP=1      CPU kernels on one thread (default: OpenMP, as torch)
  TORCHFUSE_DEBUG=1          -O0 -g, and device line info
  TORCHFUSE_NVCC_FLAGS       extra nvcc flags, space-separated (bench/gpu_check.sh
                             passes -Xptxas=-v: registers and spills per kernel)
  MAX_JOBS                   parallel compile jobs (ninja)
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from build_env import cpu_flags, find_cuda_home, nvidia_dirs, openmp_flags  # noqa: E402

VERSION = "0.1.0"


def _truthy(name):
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


WANT_CUDA = not _truthy("TORCHFUSE_CPU_ONLY")
if WANT_CUDA:
    _home = find_cuda_home()
    if _home and "CUDA_HOME" not in os.environ:
        os.environ["CUDA_HOME"] = _home  # before cpp_extension reads it

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

WITH_CUDA = WANT_CUDA and torch.version.cuda is not None and (
    CUDA_HOME is not None or _truthy("FORCE_CUDA")
)
DEBUG = _truthy("TORCHFUSE_DEBUG")

if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"


def _write_build_info(cpu_cap, archs, openmp):
    path = os.path.join(ROOT, "python", "torchfuse", "_build_info.py")
    info = {
        "version": VERSION,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if WITH_CUDA else None,
        "cuda_archs": archs,
        "cpu_capability": cpu_cap,
        "cpu_threads": "openmp" if openmp else "single",
        "debug": DEBUG,
    }
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"BUILD_INFO = {info!r}\n")


def extensions():
    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    isa_flags, cpu_cap = cpu_flags()
    omp = openmp_flags()
    cxx = opt + ["-DTORCHFUSE_PYTHON_MODULE", "-fvisibility=hidden"] + isa_flags + omp
    archs = None
    if WITH_CUDA:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        nvcc += os.environ.get("TORCHFUSE_NVCC_FLAGS", "").split()
        for inc in nvidia_dirs("include"):  # cuBLAS etc. from pip's CUDA torch
            nvcc += ["-isystem", inc]  # after the toolkit's own headers
        ext = CUDAExtension(
            "torchfuse._C",
            cpp + cu,
            extra_compile_args={"cxx": cxx + ["-DTORCHFUSE_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=omp,
        )
    else:
        ext = CppExtension("torchfuse._C", cpp, extra_compile_args={"cxx": cxx},
                           extra_link_args=omp)
    _write_build_info(cpu_cap, archs, bool(omp))
    return [ext]


setup(
    name="torchfuse",
    version=VERSION,
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
