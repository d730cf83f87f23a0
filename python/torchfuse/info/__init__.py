"""torchfuse.info(): what was built and which devices each op runs on.

Also ``python -m torchfuse.info``.
"""

from __future__ import annotations

import torch

from .. import _ops

__all__ = ["info"]


def info() -> dict:
    """Version, torch version, whether the extension loaded, CUDA build and
    architectures, CPU vector ISA, and for each op the devices with a kernel
    (others fall back to torchfuse.reference)."""
    from .. import __version__

    build = _ops.BUILD_INFO
    return {
        "version": __version__,
        "torch": torch.__version__,
        "built_with_torch": build.get("torch"),
        "extension_loaded": _ops.EXTENSION_ERROR is None,
        "extension_error": _ops.EXTENSION_ERROR,
        "cuda_compiled": bool(build.get("cuda")),
        "cuda_version": build.get("cuda"),
        "cuda_archs": build.get("cuda_archs"),
        "cpu_capability": build.get("cpu_capability"),
        "cpu_threads": build.get("cpu_threads"),
        # AVX-512 builds convert float to bfloat16 with one instruction where
        # the CPU has AVX512_BF16 (checked at load, csrc/common/cpu_vec.h).
        "cpu_bf16_instruction": bool(getattr(_ops._C, "cpu_bf16_instruction", False)),
        "cuda_available": torch.cuda.is_available(),
        "strict": _ops.STRICT,
        "ops": {name: sorted(devs) for name, devs in sorted(_ops.KERNELS.items())},
    }


def format_info(d: dict | None = None) -> str:
    d = info() if d is None else d
    lines = [f"torchfuse {d['version']} (torch {d['torch']})"]
    if d["extension_loaded"]:
        lines.append(f"  extension: loaded (built with torch {d['built_with_torch']})")
    else:
        lines.append(f"  extension: NOT loaded: {d['extension_error']}")
    cuda = (f"CUDA {d['cuda_version']}, archs {d['cuda_archs']}" if d["cuda_compiled"]
            else "not compiled")
    lines.append(f"  CUDA kernels: {cuda}; GPU visible: {d['cuda_available']}")
    threads = {"openmp": f"OpenMP, {torch.get_num_threads()} threads",
               "single": "one thread (built without OpenMP)"}.get(d["cpu_threads"], "unknown")
    bf16 = " (bfloat16 stores: AVX512_BF16)" if d["cpu_bf16_instruction"] else ""
    lines.append(f"  CPU kernels: at::vec {d['cpu_capability']}{bf16}; {threads}")
    lines.append("  ops (devices with a kernel; others use torchfuse.reference):")
    for name, devs in d["ops"].items():
        lines.append(f"    {name:<24} {', '.join(devs) or '-'}")
    return "\n".join(lines)


def main() -> None:
    print(format_info())
