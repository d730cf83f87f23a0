"""Shared test helpers: device/dtype parametrisation, float64 references and
the tolerance rule of DESIGN.md.

Tolerance rule, per compared tensor (error = max |actual - expected64|):
  * float64: error <= 1e-10 * scale
  * float32: error <= 2e-5 * scale          (relative error well under 1e-4)
  * float16 / bfloat16: error <= 2 * (torch's own op's error in the same
    dtype) + eps(dtype) * scale
where scale = max |expected64| (at least 1e-3).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# TORCHFUSE_CUDA_EMU=1: the CPU kernels are replaced by the CUDA kernels run
# in the CPU emulator of tools/cuda_emu, so every "cpu" test below tests the
# CUDA kernels' arithmetic, indexing and synchronisation (not their speed).
# TORCHFUSE_CPU_ASAN=1 (make test-asan): the CPU kernels are replaced by the
# same kernels built with AddressSanitizer (tools/cpu_asan.py).
CUDA_EMU = os.environ.get("TORCHFUSE_CUDA_EMU") == "1"
CPU_ASAN = os.environ.get("TORCHFUSE_CPU_ASAN") == "1"
if CUDA_EMU and CPU_ASAN:
    raise RuntimeError("TORCHFUSE_CUDA_EMU=1 and TORCHFUSE_CPU_ASAN=1 both replace the CPU "
                       "kernels: set one")
if CUDA_EMU or CPU_ASAN:
    import warnings

    import torchfuse  # noqa: F401  (its library defines the schemas first)

    _TOOLS = os.path.join(os.path.dirname(__file__), "..", "tools")
    sys.path.insert(0, os.path.join(_TOOLS, "cuda_emu") if CUDA_EMU else _TOOLS)
    if CUDA_EMU:
        import build as _replacement
    else:
        import cpu_asan as _replacement

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
        torch.ops.load_library(_replacement.build())

# Every tensor torch allocates without initialising it (torch.empty, and
# at::empty in the kernels' C++: outputs, scratch and partial-sum buffers)
# is filled with NaN (integers: their largest value), so a kernel that reads
# an element nothing wrote, or leaves an output element unwritten, gives NaN
# where the reference has a number: the tests' check of compute-sanitizer's
# initcheck, on both the CPU kernels and (make test-emu) the CUDA ones.
torch.use_deterministic_algorithms(True)
torch.utils.deterministic.fill_uninitialized_memory = True
# conv2d hands some shapes to torch's own convolution, which on CUDA follows
# torch.backends.cudnn.allow_tf32 (True by default: TF32 on Ampere and later,
# as torch's conv2d itself). The tests hold float32 results to float32
# tolerance against float64, so TF32 is off here.
torch.backends.cudnn.allow_tf32 = False

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")],
    ),
]
LOWP = [torch.float16, torch.bfloat16]
DTYPES = [torch.float32, *LOWP]


def pytest_collection_modifyitems(config, items):
    # Every test that runs on the "cuda" device parameter carries the cuda
    # marker, so `pytest -m cuda` selects exactly the GPU tests.
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("device") == "cuda":
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def leaf(t, dtype=None):
    """A detached copy (in `dtype`, default t's) that requires grad; None stays None."""
    if t is None:
        return None
    return t.detach().to(dtype or t.dtype).requires_grad_()


def second_order(fn, *inputs):
    """Second derivatives of fn at inputs, through a non-linear function of
    the first ones (so that every second-order term counts)."""
    out = fn(*inputs)
    firsts = torch.autograd.grad(out.pow(2).sum() + out.sum(), inputs, create_graph=True)
    return torch.autograd.grad(sum(g.sin().sum() for g in firsts), inputs)


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False, scale=1.0, shift=0.0):
    """Fresh random data (never zeros), generated in float64 then cast."""
    t = torch.randn(*shape, dtype=torch.float64) * scale + shift
    t = t.to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def _scale(expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        return 1.0
    return max(expected.detach().abs().max().item(), 1e-3)


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()


def assert_close_to_ref(actual, expected64, dtype, torch_same_dtype=None, name="output"):
    """Checks actual (computed in `dtype`) against a float64 reference.

    For float16/bfloat16, `torch_same_dtype` is torch's own result in that
    dtype: the kernel may be at most twice as far from the truth, plus a
    small floor.
    """
    assert actual.shape == expected64.shape, f"{name}: shape {actual.shape} != {expected64.shape}"
    assert not torch.isnan(actual.detach()).any() or torch.isnan(expected64).any(), f"{name}: NaN"
    scale = _scale(expected64)
    err = max_err(actual, expected64)
    if dtype == torch.float64:
        tol = 1e-10 * scale
    elif dtype == torch.float32:
        tol = 2e-5 * scale
    else:
        assert torch_same_dtype is not None, "low-precision checks need torch's own result"
        tol = 2 * max_err(torch_same_dtype, expected64) + torch.finfo(dtype).eps * scale
    assert err <= tol, f"{name} ({dtype}): max error {err:.3g} > tolerance {tol:.3g}"


def assert_raises_like_torch(torch_fn, our_fn, arg_name):
    """Our function rejects the input with the exception type torch raises,
    and the message names the offending argument."""
    with pytest.raises(Exception) as theirs:
        torch_fn()
    with pytest.raises(Exception) as ours:
        our_fn()
    assert isinstance(ours.value, type(theirs.value)), (
        f"raised {type(ours.value).__name__} ({ours.value}); torch raises "
        f"{type(theirs.value).__name__} ({theirs.value})"
    )
    assert arg_name in str(ours.value), f"message does not name {arg_name!r}: {ours.value}"


def direct_vs_python_path(run, node: str, switch_off) -> None:
    """A direct entry (torchfuse._ops.DIRECT) against the op's Python autograd
    path: run() returns (out, wrt, grad_out) with out computed through
    torchfuse.functional; first the entry is on (out's grad_fn is the C++
    node named `node`), then switch_off() routes the same call through the
    Python Function. Output, gradients and second-order gradients (of the sum
    of the squared gradients; None where a gradient does not depend on the
    leaves) must be equal bit for bit."""

    def results():
        out, wrt, grad_out = run()
        grads = torch.autograd.grad(out, wrt, grad_out, create_graph=True)
        loss = [(q * q).sum() for q in grads if q.requires_grad]
        second = torch.autograd.grad(sum(loss), wrt, allow_unused=True) if loss else ()
        return out, grads, second

    out, grads, second = results()
    assert node in out.grad_fn.name()
    switch_off()
    out_ref, grads_ref, second_ref = results()
    assert node not in out_ref.grad_fn.name()
    assert torch.equal(out, out_ref)
    assert len(grads) == len(grads_ref) and len(second) == len(second_ref)
    for a, r in zip(grads + second, grads_ref + second_ref):
        assert (a is None and r is None) or torch.equal(a, r)
