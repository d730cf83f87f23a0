"""Loads the compiled extension and registers the Python side of each op.

Each op family has one module here (fake kernel + autograd formula). The
registrations are guarded: when the extension is missing, or was built
without CUDA, `import torchfuse` still works and the functions in
`torchfuse.functional` fall back to `torchfuse.reference` (with a one-time
warning; `TORCHFUSE_STRICT=1` makes that an error).
"""

from __future__ import annotations

import os
import warnings

import torch


def isa_mismatch(built: str | None, cpu_has: set[str]) -> str | None:
    """Why an extension whose CPU kernels were compiled for the vector ISA
    `built` (setup.py: the build machine's best, AVX512, AVX2 or DEFAULT)
    must not be loaded on a CPU with the ISAs `cpu_has`; None if it may.
    Loaded there, its first CPU kernel (or already its load) would end the
    process with an illegal instruction."""
    if built in (None, "DEFAULT") or built in cpu_has:
        return None
    return (
        f"torchfuse was built for {built} CPUs and this CPU does not have {built}: its "
        "kernels would stop the process with an illegal instruction. Rebuild torchfuse "
        "on this machine, or build it for such machines with "
        "TORCHFUSE_CPU_CAPABILITY=AVX2 or DEFAULT"
    )


def _cpu_isas() -> set[str]:
    """The vector ISAs of this CPU that torch checks for (as it picks its own
    kernels); both assumed present where this torch cannot say."""
    checks = {"AVX512": "_is_avx512_supported", "AVX2": "_is_avx2_supported"}
    have = set()
    for isa, fn in checks.items():
        check = getattr(torch.cpu, fn, None)
        if check is None or check():
            have.add(isa)
    return have


def _read_build_info() -> dict:
    try:
        from .._build_info import BUILD_INFO
    except ImportError:
        return {}
    return dict(BUILD_INFO)


# What setup.py recorded of the build (torchfuse.info() reports it).
BUILD_INFO: dict = _read_build_info()
EXTENSION_ERROR: str | None = isa_mismatch(BUILD_INFO.get("cpu_capability"), _cpu_isas())
_C = None
if EXTENSION_ERROR is None:
    try:
        from .. import _C  # loading it runs the op registrations
    except ImportError as e:  # missing, or built against another torch
        EXTENSION_ERROR = f"{type(e).__name__}: {e}"

STRICT = os.environ.get("TORCHFUSE_STRICT", "").lower() in ("1", "true", "yes", "on")

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _scan() -> dict[str, frozenset[str]]:
    """op name -> device types with a kernel, read from the dispatcher once."""
    table: dict[str, frozenset[str]] = {}
    for qualname in torch._C._dispatch_get_all_op_names():
        if not qualname.startswith("torchfuse::"):
            continue
        name = qualname.split("::", 1)[1].split(".", 1)[0]
        devices = {
            dev
            for dev, key in _DISPATCH_KEYS.items()
            if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)
        }
        table[name] = frozenset(devices)
    return table


# A plain dict, computed at import, so that torch.compile traces the device
# test below as a constant instead of breaking the graph on a dispatcher call.
KERNELS: dict[str, frozenset[str]] = _scan()

_warned: set[tuple[str, str]] = set()


def op_defined(name: str) -> bool:
    """Whether torch.ops.torchfuse.<name> exists (the extension defined it)."""
    return name in KERNELS


def use_kernel(name: str, device: torch.device) -> bool:
    """Whether op `name` has a compiled kernel for `device`.

    Devices without one (no extension, a CPU-only build on a CUDA tensor, a
    device type we have no kernel for) make the caller fall back to
    torchfuse.reference: with a one-time warning per (op, device type), or a
    RuntimeError under TORCHFUSE_STRICT=1. Meta tensors use the fake kernel.
    """
    devices = KERNELS.get(name)
    if devices is not None and (device.type in devices or device.type == "meta"):
        return True
    reason = (
        f"the torchfuse extension did not load ({EXTENSION_ERROR})"
        if EXTENSION_ERROR is not None
        else f"torchfuse was built without a {device.type} kernel for {name}"
    )
    if STRICT:
        raise RuntimeError(f"torchfuse.{name}: {reason} (TORCHFUSE_STRICT=1)")
    key = (name, device.type)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"torchfuse.{name}: {reason}; using the pure-PyTorch reference "
            "implementation instead. Set TORCHFUSE_STRICT=1 to make this an error.",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


# op name -> (its default overload, a torch.autograd.Function with the same
# formulas as the op's register_autograd); filled by register_autograd below.
FUNCTIONS: dict[str, tuple] = {}


def register_autograd(name: str, backward, setup_context) -> None:
    """torch.library.register_autograd for torchfuse::<name>, and the same
    setup_context/backward as a plain torch.autograd.Function in FUNCTIONS.

    The functional API calls the op through that Function (see `call`): the
    library's generic autograd wrapper re-binds the schema's arguments
    (fill_defaults) and re-dispatches on every call; on the CPU a tiny
    group_norm forward+backward took 216 us through it, 152 us this way. The op's own
    registration stays, so torch.ops.torchfuse.<name>, opcheck and
    torch.compile see the same formulas. Not for ops taking a list of tensors
    (a Function does not track tensors inside a list): those register their own
    Function over the unpacked tensors, for `call_list`.
    """
    torch.library.register_autograd(f"torchfuse::{name}", backward, setup_context=setup_context)
    op = getattr(torch.ops.torchfuse, name).default

    def forward(ctx, *args):
        # Below the Autograd key: the op's own (library) autograd kernel
        # would only re-dispatch here, at the cost of another schema binding.
        with torch._C._AutoDispatchBelowAutograd():
            output = op(*args)
        setup_context(ctx, args, output)
        return output

    # forward(ctx, ...) rather than a separate setup_context: apply() then
    # skips binding the arguments to forward's signature on every call.
    FUNCTIONS[name] = (op, type(f"{name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
    }))


# op name -> the extension's direct entry for it (csrc/python_module.cpp),
# for ops whose small-tensor cost is the call path: direct(*args) returns the
# op's result when the call is the plain case (plain tensors, int arguments,
# a kernel for the device), recording the gradient through a C++ autograd
# node when one is needed, else None. Not to be called under torch.compile
# (the compiler cannot trace it).
DIRECT: dict[str, object] = {
    name: getattr(_C, name)
    for name in ("channel_shuffle", "cat_shuffle", "group_norm", "l2_norm", "conv2d")
    if hasattr(_C, name)
}


def _needs_grad(tensors) -> bool:
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return True
    return False


def _run(op, function, op_args: tuple, function_args: tuple, tensors) -> object:
    """op(*op_args) under torch.compile (the compiler traces the op with its
    registered autograd); function.apply(*function_args) when autograd has to
    record it (grad mode on and one of `tensors` requiring grad); else op
    directly below the Autograd key, whose library kernel would only
    re-dispatch through its Python wrapper (skipping it saved about 1.5 us per
    call, 1x232x14x14 channel_shuffle: 12.5 -> 11.1 us)."""
    if torch.compiler.is_compiling():
        return op(*op_args)
    if torch.is_grad_enabled() and _needs_grad(tensors):
        return function.apply(*function_args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*op_args)


def call(name: str, *args):
    """torch.ops.torchfuse.<name>.default(*args), through the op's Function
    (FUNCTIONS) when autograd has to record it (see _run)."""
    op, function = FUNCTIONS[name]
    return _run(op, function, args, args, args)


def call_list(name: str, tensors: list, *args):
    """call() for an op whose first argument is a list of tensors; its
    Function (registered in FUNCTIONS by the op's module) takes
    (*args, *tensors), so that autograd tracks each tensor."""
    op, function = FUNCTIONS[name]
    return _run(op, function, (tensors, *args), (*args, *tensors), tensors)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulate/statistics dtype kernels use for `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Registrations (after the helpers above, which they use).
from . import (  # noqa: E402, F401
    channel_shuffle,
    conv,
    gram,
    group_norm,
    l2_norm,
    lrn,
    rms_norm,
)
