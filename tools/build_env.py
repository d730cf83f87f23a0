"""Facts about the build environment, shared by setup.py, the CMake
configure step (`python tools/build_env.py cmake-args`) and the sanitizer
build of the CPU kernels (tools/cpu_asan.py).

On our build machines `nvcc` on PATH is a wrapper script in /usr/local/bin,
from which torch guesses a wrong CUDA_HOME; and the CUDA toolkit lacks the
cuBLAS/cuSPARSE headers and libnvrtc, which pip's CUDA torch brings under
site-packages/nvidia/. These helpers find the real locations.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys


def find_cuda_home() -> str | None:
    """The CUDA toolkit's real home (CUDA_HOME/CUDA_PATH win if set)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for cand in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
            if os.path.exists(os.path.join(cand, "bin", "nvcc")):
                return cand
        return None
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        return home
    try:  # a wrapper script: nvcc's dry run prints the folder it runs from
        out = subprocess.run(
            [nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
        m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
        if m:
            return os.path.realpath(m.group(1).strip('"'))
    except (OSError, subprocess.SubprocessError):
        pass
    return home


def nvidia_dirs(sub: str) -> list[str]:
    """site-packages/nvidia/*/<sub> folders (include or lib) on sys.path."""
    found: list[str] = []
    for base in sys.path:
        for d in sorted(glob.glob(os.path.join(base, "nvidia", "*", sub))):
            if os.path.isdir(d) and d not in found:
                found.append(d)
    return found


def cpu_flags() -> tuple[list[str], str]:
    """Flags for at::vec, as torch compiles its own CPU kernels.

    at::vec only vectorises when CPU_CAPABILITY_<ISA> is defined and the
    compiler may emit that ISA. The extension is built on the machine that runs
    it, so the default is the best ISA both this CPU and torch support.
    """
    import torch

    cap = os.environ.get("TORCHFUSE_CPU_CAPABILITY")
    if cap is None:
        try:
            cap = torch.backends.cpu.get_cpu_capability()
        except Exception:  # noqa: BLE001
            cap = "DEFAULT"
    cap = cap.upper()
    if cap.startswith("AVX512"):
        return ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
                "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"], "AVX512"
    if cap == "AVX2":
        return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2",
                "-mavx2", "-mfma", "-mf16c"], "AVX2"
    return ["-DCPU_CAPABILITY=DEFAULT"], "DEFAULT"


def openmp_flags() -> list[str]:
    """at::parallel_for is header code: it runs threads only when the
    extension itself is compiled with OpenMP (_OPENMP defined), as torch is.
    Without -fopenmp every CPU kernel silently runs on one thread. Linking
    with -fopenmp needs libgomp.so.1, the soname torch already loaded."""
    import torch

    if os.environ.get("TORCHFUSE_NO_OPENMP") == "1":
        return []
    if "OpenMP" not in torch.__config__.parallel_info():
        return []  # torch's own backend is native/TBB: nothing to match
    return ["-fopenmp"]


def load_library(name: str, build_dir: str, sources: list[str], cflags: list[str],
                 ldflags: list[str], include_paths: list[str], verbose: bool = False) -> str:
    """Builds (incrementally, ninja) and loads a CPU-only library of
    TORCH_LIBRARY_IMPL registrations with torch's cpp_extension; returns its
    path. Used by tools/cuda_emu/build.py and tools/cpu_asan.py."""
    from torch.utils import cpp_extension

    cpp_extension.load(name=name, sources=sources, extra_cflags=cflags,
                       extra_ldflags=ldflags, extra_include_paths=include_paths,
                       build_directory=build_dir, is_python_module=False, with_cuda=False,
                       verbose=verbose)
    return os.path.join(build_dir, name + ".so")


def cmake_args() -> list[str]:
    import torch

    args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if torch.version.cuda is not None:  # torch's CMake config insists on finding CUDA
        home = find_cuda_home()
        if home:
            args += [f"-DCUDA_TOOLKIT_ROOT_DIR={home}",
                     f"-DCMAKE_CUDA_COMPILER={os.path.join(home, 'bin', 'nvcc')}"]
        for lib in nvidia_dirs("lib"):
            nvrtc = sorted(glob.glob(os.path.join(lib, "libnvrtc.so*")))
            in_toolkit = glob.glob(os.path.join(home or "/nonexistent", "lib64", "libnvrtc.so*"))
            if nvrtc and not in_toolkit:
                args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
                break
    return args


if __name__ == "__main__":
    if sys.argv[1:] == ["cmake-args"]:
        print(" ".join(cmake_args()))
    elif sys.argv[1:] == ["cuda-home"]:
        print(find_cuda_home() or "")
    else:
        sys.exit("usage: build_env.py cmake-args|cuda-home")
