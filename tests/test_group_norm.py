"""GroupNorm (+ fused ReLU/SiLU): forward and every gradient against the
float64 reference over ranks 3-5, both memory layouts, group edge cases
(one group, one channel per group, spatial size 1, huge groups), large-mean
input, gradcheck/gradgradcheck, opcheck, torch.compile, bad inputs, the
module, convert(), determinism, CUDA graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import torchfuse
from torchfuse import functional as F
from torchfuse import reference as R

from conftest import (
    DTYPES,
    HAS_CUDA,
    assert_close_to_ref,
    assert_raises_like_torch,
    direct_vs_python_path,
    leaf,
    randn,
)

# (input shape, num_groups): the kernels' edge cases.
SHAPES = [
    ((2, 6, 7), 3),  # 3-D, odd sizes
    ((3, 8, 5, 6), 4),
    ((2, 12, 17, 3), 12),  # one channel per group
    ((4, 8, 1, 1), 2),  # spatial size 1
    ((2, 10, 33, 7), 1),  # one group
    ((1, 96, 16, 16), 32),  # batch 1, SD-like groups of 3 channels
    ((2, 40, 3, 4, 5), 8),  # 5-D
    ((1, 4, 70, 70), 2),  # groups longer than a statistics chunk
]
ACTS = [None, "relu", "silu"]
NAMES = ("out", "grad_input", "grad_weight", "grad_bias")


def _channels_last(t):
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


def _act(y, activation):
    if activation == "relu":
        return TF.relu(y)
    if activation == "silu":
        return TF.silu(y)
    return y


def _torch_gn(x, g, w, b, eps, activation=None):
    return _act(TF.group_norm(x, g, w, b, eps), activation)


def _run(fn, x, g, w, b, eps, act, go):
    out = fn(x, g, w, b, eps, act)
    wrt = [t for t in (x, w, b) if t is not None]
    grads = list(torch.autograd.grad(out, wrt, go))
    gx = grads.pop(0)
    gw = grads.pop(0) if w is not None else None
    gb = grads.pop(0) if b is not None else None
    return out, gx, gw, gb


def _compare(ours, ref, theirs, dtype):
    for o, r, t, name in zip(ours, ref, theirs, NAMES):
        if o is None:
            assert r is None
            continue
        assert_close_to_ref(o, r, dtype, t, name=name)


def _check(device, dtype, shape, groups, affine, act, layout, scale=1.0, shift=0.0):
    c = shape[1]
    x = randn(*shape, dtype=dtype, device=device, scale=scale, shift=shift)
    go = randn(*shape, dtype=dtype, device=device)
    if layout == "channels_last":
        x, go = _channels_last(x), _channels_last(go)
    x.requires_grad_()
    w = b = None
    if affine in ("both", "w"):
        w = randn(c, dtype=dtype, device=device, requires_grad=True)
    if affine in ("both", "b"):
        b = randn(c, dtype=dtype, device=device, requires_grad=True)
    ours = _run(F.group_norm, x, groups, w, b, 1e-5, act, go)
    ref = _run(R.group_norm, leaf(x, torch.float64), groups, leaf(w, torch.float64),
               leaf(b, torch.float64), 1e-5, act, go.double())
    theirs = (None,) * 4
    if dtype in (torch.float16, torch.bfloat16):
        theirs = _run(_torch_gn, leaf(x), groups, leaf(w), leaf(b), 1e-5, act, go)
    _compare(ours, ref, theirs, dtype)
    out, gx = ours[0], ours[1]
    assert out.dtype == dtype and gx.dtype == dtype
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        assert out.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)
    else:
        assert out.is_contiguous() and gx.is_contiguous()
    return ours


@pytest.mark.parametrize("shape,groups", SHAPES, ids=[f"{s}-g{g}" for s, g in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_reference(device, dtype, shape, groups, act, layout):
    if layout == "channels_last" and len(shape) not in (4, 5):
        pytest.skip("channels_last needs a 4-D or 5-D input")
    _check(device, dtype, shape, groups, "both", act, layout)


@pytest.mark.parametrize("affine", ["none", "w", "b"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", ACTS, ids=str)
def test_weight_bias_none(device, affine, layout, act):
    _check(device, torch.float32, (2, 12, 9, 5), 4, affine, act, layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", ACTS, ids=str)
def test_float64(device, layout, act):
    _check(device, torch.float64, (2, 12, 9, 5), 3, "both", act, layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", ACTS, ids=str)
def test_large_mean_small_variance(device, layout, act):
    # mean 1e3, std 1e-2 in float32: sum/sum-of-squares statistics would lose
    # every digit of the variance (E[x^2] - E[x]^2 with E[x^2] ~ 1e6), and even
    # a float32-rounded mean is off by ~0.3% of the standard deviation.
    _check(device, torch.float32, (2, 16, 12, 10), 4, "both", act, layout,
           scale=1e-2, shift=1e3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS, ids=str)
def test_groups_larger_than_cache(device, dtype, act):
    # Contiguous groups over 512 KiB leave the CPU's whole-group path for the
    # chunked one (statistics workspace, per-plane-chunk sums).
    _check(device, dtype, (2, 4, 300, 300), 1, "both", act, "contiguous")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS, ids=str)
def test_channels_last_many_chunks(device, dtype, act):
    # Several row chunks per sample (statistics and sums combined across
    # chunks), a partial last chunk and row block, a partial channel step.
    _check(device, dtype, (2, 72, 45, 41), 8, "both", act, "channels_last")


# channels_last with C below two vector steps: the CPU walks each sample flat
# with the coefficients tiled; several row chunks, chunks that start mid-step
# of the tiling (C = 6: 10922 rows of 6 at 65532 elements, C = 24: 2730 rows
# at 65520), a partial last step.
SMALL_C_CL = [((2, 6, 150, 150), 3), ((2, 24, 97, 61), 8), ((3, 40, 29, 31), 5)]


@pytest.mark.parametrize("shape,groups", SMALL_C_CL, ids=[f"{s}-g{g}" for s, g in SMALL_C_CL])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS, ids=str)
def test_channels_last_few_channels(device, dtype, shape, groups, act):
    _check(device, dtype, shape, groups, "both", act, "channels_last")


@pytest.mark.parametrize("act", [None, "silu"], ids=str)
def test_large_mean_channels_last_few_channels(device, act):
    _check(device, torch.float32, (2, 6, 150, 150), 3, "both", act, "channels_last",
           scale=1e-2, shift=1e3)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_more_chunks_than_the_cuda_cap(device, layout):
    # One group of 4.2M elements and 132496 rows: over the CUDA launchers'
    # 1024 chunks per group (statistics, contiguous) and per sample
    # (channels_last reduction rows), so their chunks grow; the CPU path is
    # the reference for the same shape.
    _check(device, torch.float32, (1, 32, 364, 364), 1, "both", "silu", layout)


@pytest.mark.parametrize("act", [None, "silu"], ids=str)
def test_large_mean_channels_last_many_chunks(device, act):
    _check(device, torch.float32, (2, 72, 45, 41), 8, "both", act, "channels_last",
           scale=1e-2, shift=1e3)


@pytest.mark.parametrize("act", ACTS, ids=str)
def test_large_mean_groups_larger_than_cache(device, act):
    _check(device, torch.float32, (2, 4, 300, 300), 2, "both", act, "contiguous",
           scale=1e-2, shift=1e3)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_mean_half_of_groups(device, layout):
    # Groups far from zero next to ordinary ones in the same sample.
    x = randn(2, 16, 9, 7, device=device)
    x[:, :8] = x[:, :8] * 1e-2 + 1e3
    if layout == "channels_last":
        x = _channels_last(x)
    x.requires_grad_()
    w = randn(16, device=device, requires_grad=True)
    b = randn(16, device=device, requires_grad=True)
    go = randn(2, 16, 9, 7, device=device)
    ours = _run(F.group_norm, x, 4, w, b, 1e-5, "silu", go)
    ref = _run(R.group_norm, leaf(x, torch.float64), 4, leaf(w, torch.float64),
               leaf(b, torch.float64), 1e-5, "silu", go.double())
    _compare(ours, ref, (None,) * 4, torch.float32)


def test_one_element_per_group(device):
    # torch allows it when the batch is > 1: var = 0, out = bias, and the exact
    # input gradient is zero (the kernel's is rounding noise at the scale of
    # rstd * |weight * grad_out|, rstd = eps ** -0.5).
    x = randn(3, 8, 1, device=device, requires_grad=True)
    w = randn(8, device=device, requires_grad=True)
    b = randn(8, device=device, requires_grad=True)
    go = randn(3, 8, 1, device=device)
    out, gx, gw, gb = _run(F.group_norm, x, 8, w, b, 1e-5, None, go)
    torch.testing.assert_close(out, b.detach().expand(3, 8).unsqueeze(-1), rtol=0, atol=1e-6)
    noise = 1e-5 ** -0.5 * (w.detach().abs().max() * go.abs().max()).item()
    assert gx.abs().max().item() <= 4 * torch.finfo(torch.float32).eps * noise
    torch.testing.assert_close(gw, torch.zeros(8, device=device), rtol=0, atol=1e-6)
    torch.testing.assert_close(gb, go.sum((0, 2)), rtol=1e-6, atol=1e-6)


def test_huge_group(device):
    # One group of 128 x 512 x 512 elements (33.5M), batch 1; float64
    # reference computed by hand to keep memory modest.
    x = randn(1, 128, 512, 512, device=device, scale=2.0, shift=0.5, requires_grad=True)
    w = randn(128, device=device, requires_grad=True)
    b = randn(128, device=device, requires_grad=True)
    out = F.group_norm(x, 1, w, b, 1e-5, "silu")
    go = randn(1, 128, 512, 512, device=device)
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), go)
    x64 = x.detach().double()
    mean = x64.mean()
    rstd = torch.rsqrt((x64 - mean).pow(2).mean() + 1e-5)
    xhat = (x64 - mean) * rstd
    del x64
    w64, b64 = w.detach().double().view(1, -1, 1, 1), b.detach().double().view(1, -1, 1, 1)
    y = xhat * w64 + b64
    s = torch.sigmoid(y)
    assert_close_to_ref(out, y * s, torch.float32, name="out")
    g = go.double() * s * (1 + y * (1 - s))
    del y, s
    assert_close_to_ref(gb, g.sum((0, 2, 3)), torch.float32, name="grad_bias")
    assert_close_to_ref(gw, (g * xhat).sum((0, 2, 3)), torch.float32, name="grad_weight")
    wg = g * w64
    del g
    ref_gx = rstd * (wg - wg.mean() - xhat * (wg * xhat).mean())
    assert_close_to_ref(gx, ref_gx, torch.float32, name="grad_input")


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_non_contiguous(device, layout):
    if layout == "sliced":
        x = randn(2, 8, 10, 12, device=device)[..., ::2]
    else:
        x = randn(2, 8, 6, 5, device=device).transpose(2, 3)
    assert not x.is_contiguous()
    x.requires_grad_()
    w, b = randn(8, device=device, requires_grad=True), randn(8, device=device, requires_grad=True)
    go = randn(*x.shape, device=device)
    ours = _run(F.group_norm, x, 2, w, b, 1e-5, "relu", go)
    ref = _run(R.group_norm, leaf(x, torch.float64), 2, leaf(w, torch.float64),
               leaf(b, torch.float64), 1e-5, "relu", go.double())
    _compare(ours, ref, (None,) * 4, torch.float32)


def test_mixed_layouts(device):
    # channels_last input with a contiguous grad_out (and the reverse).
    x = _channels_last(randn(2, 8, 6, 5, device=device)).requires_grad_()
    w, b = randn(8, device=device, requires_grad=True), randn(8, device=device, requires_grad=True)
    go = randn(2, 8, 6, 5, device=device)
    ours = _run(F.group_norm, x, 4, w, b, 1e-5, "silu", go)
    ref = _run(R.group_norm, leaf(x, torch.float64), 4, leaf(w, torch.float64),
               leaf(b, torch.float64), 1e-5, "silu", go.double())
    _compare(ours, ref, (None,) * 4, torch.float32)
    x2 = randn(2, 8, 6, 5, device=device, requires_grad=True)
    ours = _run(F.group_norm, x2, 4, w, b, 1e-5, None, _channels_last(go))
    ref = _run(R.group_norm, leaf(x2, torch.float64), 4, leaf(w, torch.float64),
               leaf(b, torch.float64), 1e-5, None, go.double())
    _compare(ours, ref, (None,) * 4, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_params_with_low_precision_input(device, dtype):
    # The autocast pattern: float32 weight/bias, low-precision activations.
    x = randn(2, 16, 7, 9, dtype=dtype, device=device, requires_grad=True)
    w = randn(16, device=device, requires_grad=True)
    b = randn(16, device=device, requires_grad=True)
    go = randn(2, 16, 7, 9, dtype=dtype, device=device)
    ours = _run(F.group_norm, x, 4, w, b, 1e-5, "silu", go)
    assert ours[0].dtype == dtype and ours[2].dtype == torch.float32
    ref = _run(R.group_norm, leaf(x, torch.float64), 4, leaf(w, torch.float64),
               leaf(b, torch.float64), 1e-5, "silu", go.double())
    theirs = _run(_torch_gn, leaf(x), 4, leaf(w), leaf(b), 1e-5, "silu", go)
    _compare(ours, ref, theirs, dtype)


@pytest.mark.parametrize("shape", [(0, 8, 3, 3), (0, 8)])
def test_zero_batch(device, shape):
    x = randn(*shape, device=device, requires_grad=True)
    w, b = randn(8, device=device, requires_grad=True), randn(8, device=device, requires_grad=True)
    out = F.group_norm(x, 2, w, b)
    expected = TF.group_norm(x, 2, w, b)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    gx, gw, gb = torch.autograd.grad(out.sum(), (x, w, b))
    assert gx.shape == x.shape and torch.all(gw == 0) and torch.all(gb == 0)


def test_statistics_in_float32(device):
    # x**2 overflows float16 at |x| = 300; float32 statistics do not.
    x = randn(2, 8, 16, 16, dtype=torch.float16, device=device, scale=300.0)
    out = F.group_norm(x, 4)
    ref = R.group_norm(x.double(), 4)
    assert torch.isfinite(out).all()
    theirs = TF.group_norm(x, 4)
    assert_close_to_ref(out, ref, torch.float16, theirs)


def test_saved_statistics(device):
    x = randn(3, 8, 5, 4, device=device, shift=2.0)
    out, mean, rstd = torch.ops.torchfuse.group_norm(x, 4, None, None, 1e-5, "none")
    assert mean.shape == (3, 4) and rstd.shape == (3, 4)
    assert mean.dtype == torch.float32 and rstd.dtype == torch.float32
    g = x.double().reshape(3, 4, -1)
    torch.testing.assert_close(mean.double(), g.mean(-1), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(
        rstd.double(), torch.rsqrt(g.var(-1, unbiased=False) + 1e-5), rtol=1e-6, atol=0)
    _, mean64, _ = torch.ops.torchfuse.group_norm(x.double(), 4, None, None, 1e-5, "none")
    assert mean64.dtype == torch.float64


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_silu_extremes_like_torch(device, dtype, layout):
    # weight 0 makes y = bias exactly: SiLU at +-inf, past exp's range and in
    # float32's denormals, as torch's silu gives it (-inf -> NaN, +inf -> inf).
    bias = torch.tensor([float("inf"), float("-inf"), 100.0, -100.0, -87.5, -30.0, 30.0,
                         0.5], device=device)
    x = randn(2, 8, 5, 3, device=device).to(dtype)
    if layout == "channels_last":
        x = _channels_last(x)
    w = torch.zeros(8, device=device)
    out = F.group_norm(x, 4, w, bias, 1e-5, "silu")
    y = bias.to(dtype).float().view(1, 8, 1, 1).expand(2, 8, 5, 3)
    expected = TF.silu(y).to(dtype)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0, equal_nan=True)


def test_eps(device):
    x = randn(2, 8, 4, 4, device=device, scale=0.01)
    for eps in (10.0, 0.0):
        assert_close_to_ref(F.group_norm(x, 2, eps=eps), R.group_norm(x.double(), 2, eps=eps),
                            torch.float32)
    ours, theirs = F.group_norm(x, 2, eps=-1.0), TF.group_norm(x, 2, eps=-1.0)
    assert torch.isnan(ours).all() and torch.isnan(theirs).all()


# ------------------------------------------------------- autograd checks
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck(device, act, layout):
    x = randn(2, 6, 3, 4, dtype=torch.float64, device=device)
    if layout == "channels_last":
        x = _channels_last(x)
    x.requires_grad_()
    w = randn(6, dtype=torch.float64, device=device, requires_grad=True)
    b = randn(6, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda a, c, d: F.group_norm(a, 3, c, d, 1e-5, act)  # noqa: E731
    torch.autograd.gradcheck(fn, (x, w, b))
    torch.autograd.gradgradcheck(fn, (x, w, b))
    torch.autograd.gradcheck(lambda a: F.group_norm(a, 2, None, None, 1e-5, act), (x,))


def test_gradcheck_3d_5d(device):
    x3 = randn(2, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    x5 = _channels_last(randn(2, 4, 2, 3, 2, dtype=torch.float64, device=device))
    x5.requires_grad_()
    w = randn(4, dtype=torch.float64, device=device, requires_grad=True)
    for x in (x3, x5):
        torch.autograd.gradcheck(lambda a, c: F.group_norm(a, 2, c, None, 1e-5, "silu"), (x, w))
        torch.autograd.gradgradcheck(lambda a, c: F.group_norm(a, 2, c, None, 1e-5), (x, w))


@pytest.mark.parametrize("act", ACTS, ids=str)
def test_double_backward_matches_reference(device, act):
    x = randn(3, 8, 4, 5, device=device, requires_grad=True)
    w = randn(8, device=device, requires_grad=True)
    b = randn(8, device=device, requires_grad=True)

    def second(fn, x, w, b):
        out = fn(x, 4, w, b, 1e-5, act)
        gx, gw, gb = torch.autograd.grad(out.pow(2).sum(), (x, w, b), create_graph=True)
        return torch.autograd.grad(gx.sin().sum() + gw.cos().sum() + gb.pow(2).sum(), (x, w, b))

    ours = second(F.group_norm, x, w, b)
    ref = second(R.group_norm, *(leaf(t, torch.float64) for t in (x, w, b)))
    for o, r, name in zip(ours, ref, ("ggx", "ggw", "ggb")):
        assert_close_to_ref(o, r, torch.float32, name=name)


# ------------------------------------------------------- direct entry (_C)
_DIRECT_GN = torchfuse._ops.DIRECT.get("group_norm")
needs_direct = pytest.mark.skipif(_DIRECT_GN is None, reason="extension without direct entries")


def _python_path(monkeypatch):
    """torchfuse.functional with the direct entry switched off."""
    import torchfuse.functional as functional

    monkeypatch.setattr(functional, "_direct_group_norm", None)


@needs_direct
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("which", ["all", "x", "w", "b", "x-noweight"])
def test_direct_entry_matches_python_path(device, act, which, monkeypatch):
    """The direct entry (C++ autograd node) gives exactly what the op through
    the Python autograd Function gives, forward and every gradient, and
    double backward through the differentiable Python formula."""
    shape, groups = (2, 8, 5, 3), 4
    x, w, b, g = (randn(*s, device=device) for s in (shape, (8,), (8,), shape))
    if which == "x-noweight":
        w = b = None
    need = {"all": (1, 1, 1), "x": (1, 0, 0), "w": (0, 1, 0), "b": (0, 0, 1),
            "x-noweight": (1, 0, 0)}[which]

    def run():
        leaves = [t.detach().clone().requires_grad_(bool(n)) if t is not None else None
                  for t, n in zip((x, w, b), need)]
        out = F.group_norm(leaves[0], groups, leaves[1], leaves[2], 1e-5, act)
        return out, [t for t in leaves if t is not None and t.requires_grad], g

    direct_vs_python_path(run, "GroupNormFn", lambda: _python_path(monkeypatch))


@needs_direct
def test_direct_entry_double_backward_error_reaches_the_caller(device):
    """An exception in the Python differentiable backward (called by the C++
    node under create_graph) reaches the caller as itself."""
    from torchfuse._ops import _C
    from torchfuse._ops.group_norm import backward_differentiable

    def boom(*args):
        raise ValueError("boom from the differentiable backward")

    x = randn(2, 4, 3, device=device, requires_grad=True)
    _C._set_double_backward("group_norm", boom)
    try:
        out = F.group_norm(x, 2)
        with pytest.raises(ValueError, match="boom from the differentiable backward"):
            torch.autograd.grad(out.sum(), x, create_graph=True)
    finally:
        _C._set_double_backward("group_norm", backward_differentiable)
    (gx,) = torch.autograd.grad(F.group_norm(x, 2).pow(2).sum(), x, create_graph=True)
    assert gx.requires_grad


@needs_direct
def test_direct_entry_no_grad_and_layouts(device):
    x = _channels_last(randn(2, 8, 5, 3, device=device))
    w = randn(8, device=device, dtype=torch.float32)
    out = _DIRECT_GN(x.bfloat16(), 4, w, None, 1e-5, "silu")
    ref = torch.ops.torchfuse.group_norm(x.bfloat16(), 4, w, None, 1e-5, "silu")[0]
    assert torch.equal(out, ref) and out.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = _DIRECT_GN(x.requires_grad_(), 4, None, None, 1, None)  # int eps
    assert not out.requires_grad
    assert torch.equal(out, torch.ops.torchfuse.group_norm(x.detach(), 4, None, None, 1.0,
                                                           "none")[0])
    with pytest.raises(RuntimeError, match="divisible by num_groups"):
        _DIRECT_GN(x, 3, None, None, 1e-5, None)  # the op's own check, as the usual path


@needs_direct
def test_direct_entry_declines_the_rest(device):
    """None (the usual path then checks and raises as torch does) for
    anything but the plain case."""
    x = randn(2, 8, 5, device=device)
    w = randn(8, device=device)

    class Sub(torch.Tensor):
        pass

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    declined = [
        (x, 0, None, None, 1e-5, None),  # ZeroDivisionError in torch
        (x, -2, None, None, 1e-5, None),
        (x, 4.0, None, None, 1e-5, None),
        (x, 4, w, None, 1e-5, "none"),  # not an accepted activation
        (x, 4, w, None, 1e-5, "tanh"),
        (x, 4, w, None, 1e-5, 3),
        (x, 4, w, None, torch.tensor(1e-5), None),
        (x, 4, w, None, "1e-5", None),
        (x, 4, "w", None, 1e-5, None),
        (x.as_subclass(Sub), 4, None, None, 1e-5, None),
        (x, 4, w.as_subclass(Sub), None, 1e-5, None),
        (x.to(torch.int32), 4, None, None, 1e-5, None),
        (randn(8, device=device), 4, None, None, 1e-5, None),  # 1-D
        (randn(1, 4, 1, device=device), 4, None, None, 1e-5, None),  # 1 value per group
        (x.to("meta"), 4, None, None, 1e-5, None),
        (x, 4, None, None, 1e-5),
    ]
    for i, args in enumerate(declined):
        assert _DIRECT_GN(*args) is None, i
    with Mode():
        assert _DIRECT_GN(x, 4, w, None, 1e-5, None) is None


def _opcheck_samples(device):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for cl in (False, True):
            x = randn(2, 6, 3, 4, dtype=dtype, device=device)
            if cl:
                x = _channels_last(x)
            w = randn(6, dtype=dtype, device=device)
            b = randn(6, dtype=dtype, device=device)
            for act in ("none", "silu"):
                for ww, bb in ((w, b), (None, None)):
                    xg = x.detach().requires_grad_()
                    wg = ww.detach().requires_grad_() if ww is not None else None
                    yield torch.ops.torchfuse.group_norm.default, (xg, 3, wg, bb, 1e-5, act)
                _, mean, rstd = torch.ops.torchfuse.group_norm(x, 3, w, b, 1e-5, act)
                go = torch.randn_like(x)
                yield torch.ops.torchfuse.group_norm_backward.default, (
                    go, x, mean, rstd, 3, w, b, act, True, True)
                yield torch.ops.torchfuse.group_norm_backward.default, (
                    go, x, mean, rstd, 3, None, b, act, False, False)


def test_opcheck(device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)


def test_compile_fullgraph(device):
    torch._dynamo.reset()

    def block(x, w1, b1, w2):
        h = F.group_norm(x, 4, w1, b1, 1e-5, "silu")
        return F.group_norm(h, 2, w2, None, 1e-6).sum()

    x = _channels_last(randn(2, 8, 5, 6, device=device)).requires_grad_()
    ps = [randn(8, device=device, requires_grad=True) for _ in range(3)]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    loss = compiled(x, *ps)
    grads = torch.autograd.grad(loss, [x, *ps])
    loss_e = block(x, *ps)
    grads_e = torch.autograd.grad(loss_e, [x, *ps])
    torch.testing.assert_close(loss, loss_e)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)


def test_compile_inductor_dynamic(device):
    torch._dynamo.reset()
    m = torchfuse.nn.GroupNorm(4, 16, activation="silu").to(device)
    compiled = torch.compile(m, fullgraph=True, dynamic=True)
    for n in (2, 3):
        x = randn(n, 16, 5, 7, device=device)
        torch.testing.assert_close(compiled(x), m(x))


# ------------------------------------------------------------------ bad input
def _bad_cases(device):
    x = randn(2, 4, 3, device=device)
    w = randn(4, device=device)
    return [
        ("input", lambda f: f(randn(4, device=device), 2)),
        ("input", lambda f: f(x.to(torch.int32), 2)),
        ("input", lambda f: f(randn(1, 2, 1, device=device), 2)),  # one value per group, N=1
        ("num_groups", lambda f: f(x, 3)),
        ("num_groups", lambda f: f(x, -2)),
        ("num_groups", lambda f: f(x, 0)),
        ("num_groups", lambda f: f(x, 2.0)),
        ("weight", lambda f: f(x, 2, randn(3, device=device))),
        ("weight", lambda f: f(x, 2, randn(4, 1, device=device))),
        ("weight", lambda f: f(x, 2, "w")),
        ("weight", lambda f: f(x, 2, randn(4, dtype=torch.float64, device=device))),
        ("bias", lambda f: f(x, 2, w, randn(5, device=device))),
        ("bias", lambda f: f(x, 2, None, "b")),
        ("eps", lambda f: f(x, 2, w, None, "eps")),
        ("input", lambda f: f(randn(2, 0, 3, device=device), 1)),  # no channels
        ("input", lambda f: f(randn(0, 4, 0, device=device), 2)),  # no spatial positions
    ]


@pytest.mark.parametrize("case", range(16))
def test_bad_input_like_torch(device, case):
    arg, call = _bad_cases(device)[case]
    if arg == "weight" and case == 10 and device == "cuda":
        pytest.skip("torch's CUDA kernel accepts mixed float32/float64 parameters")
    assert_raises_like_torch(lambda: call(TF.group_norm), lambda: call(F.group_norm), arg)


def test_bad_activation(device):
    x = randn(2, 4, 3, device=device)
    with pytest.raises(ValueError, match="activation"):
        F.group_norm(x, 2, activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        F.group_norm(x, 2, activation="")
    with pytest.raises(TypeError, match="activation"):
        F.group_norm(x, 2, activation=1)
    with pytest.raises(ValueError, match="activation"):
        torch.ops.torchfuse.group_norm(x, 2, None, None, 1e-5, "tanh")
    with pytest.raises(ValueError, match="activation"):
        torchfuse.nn.GroupNorm(2, 4, activation="Relu")
    with pytest.raises(TypeError, match="input"):  # torch: AttributeError on str.dim
        F.group_norm("x", 2)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
def test_bad_device_params():
    x = randn(2, 4, 3, device="cuda")
    with pytest.raises(RuntimeError, match="weight"):
        F.group_norm(x, 2, randn(4))
    with pytest.raises(RuntimeError, match="bias"):
        F.group_norm(x, 2, None, randn(4))


def test_backward_op_bad_input(device):
    x = randn(2, 4, 3, device=device)
    out, mean, rstd = torch.ops.torchfuse.group_norm(x, 2, None, None, 1e-5, "none")
    bwd = torch.ops.torchfuse.group_norm_backward
    with pytest.raises(RuntimeError, match="mean"):
        bwd(out, x, mean.double(), rstd, 2, None, None, "none", False, False)
    with pytest.raises(RuntimeError, match="rstd"):
        bwd(out, x, mean, rstd[:1], 2, None, None, "none", False, False)
    with pytest.raises(RuntimeError, match="grad_out"):
        bwd(out[:1], x, mean, rstd, 2, None, None, "none", False, False)
    with pytest.raises(RuntimeError, match="grad_out"):
        bwd(out.double(), x, mean, rstd, 2, None, None, "none", False, False)
    with pytest.raises(RuntimeError, match="weight"):
        bwd(out, x, mean, rstd, 2, None, None, "none", True, False)
    with pytest.raises(RuntimeError, match="bias"):
        bwd(out, x, mean, rstd, 2, None, None, "none", False, True)
    with pytest.raises(ValueError, match="activation"):
        bwd(out, x, mean, rstd, 2, None, None, "gelu", False, False)


# --------------------------------------------------------------------- module
@pytest.mark.parametrize("affine", [True, False])
def test_module_is_drop_in(device, affine):
    ref = torch.nn.GroupNorm(4, 16, eps=1e-6, affine=affine, device=device)
    if affine:
        with torch.no_grad():
            ref.weight.copy_(randn(16))
            ref.bias.copy_(randn(16))
    ours = torchfuse.nn.GroupNorm(4, 16, eps=1e-6, affine=affine, device=device)
    ours.load_state_dict(ref.state_dict())
    assert isinstance(ours, torch.nn.GroupNorm)
    assert ours.extra_repr() == ref.extra_repr()
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = randn(3, 16, 5, 5, device=device)
    torch.testing.assert_close(ours(x), ref(x), rtol=2e-5, atol=1e-5)


def test_module_activation(device):
    m = torchfuse.nn.GroupNorm(2, 8, activation="silu", device=device, dtype=torch.bfloat16)
    assert m.weight.dtype == torch.bfloat16 and "activation='silu'" in repr(m)
    x = randn(2, 8, 4, 4, dtype=torch.bfloat16, device=device)
    assert torch.equal(m(x), F.group_norm(x, 2, m.weight, m.bias, 1e-5, "silu"))
    assert_close_to_ref(m(x), R.group_norm(x.double(), 2, m.weight.double(), m.bias.double(),
                                           1e-5, "silu"),
                        torch.bfloat16, TF.silu(TF.group_norm(x, 2, m.weight, m.bias)))


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 16)
        self.inner = torch.nn.Sequential(torch.nn.GroupNorm(16, 16, eps=1e-3), torch.nn.SiLU())

    def forward(self, x):
        return self.inner(self.norm(self.conv(x)))


class _MyGroupNorm(torch.nn.GroupNorm):
    def forward(self, x):
        return super().forward(x) * 2


def test_convert(device):
    model = _Block().to(device)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    converted = torchfuse.convert(model)
    assert type(model.norm) is torch.nn.GroupNorm, "inplace=False must not touch the input"
    assert type(converted.norm) is torchfuse.nn.GroupNorm
    assert type(converted.inner[0]) is torchfuse.nn.GroupNorm
    assert converted.norm.activation is None
    assert converted.norm.extra_repr() == model.norm.extra_repr()
    assert list(converted.state_dict()) == list(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, converted.state_dict()[k])
    x = randn(2, 8, 6, 6, device=device)
    torch.testing.assert_close(converted(x), model(x), rtol=2e-5, atol=1e-5)
    g1 = torch.autograd.grad(converted(x).sum(), (converted.norm.weight, converted.norm.bias))
    g2 = torch.autograd.grad(model(x).sum(), (model.norm.weight, model.norm.bias))
    torch.testing.assert_close(g1, g2, rtol=2e-5, atol=1e-4)
    weight = model.norm.weight
    same = torchfuse.convert(model, inplace=True)
    assert same is model and type(model.norm) is torchfuse.nn.GroupNorm
    assert model.norm.weight is weight
    assert type(torchfuse.convert(torch.nn.Sequential(_MyGroupNorm(2, 4)))[0]) is _MyGroupNorm
    assert type(torchfuse.convert(torch.nn.GroupNorm(2, 4))) is torchfuse.nn.GroupNorm


# ---------------------------------------------------------------- determinism
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_deterministic(device, layout):
    x = randn(2, 64, 40, 40, device=device)
    if layout == "channels_last":
        x = _channels_last(x)
    w = randn(64, device=device, requires_grad=True)
    b = randn(64, device=device, requires_grad=True)
    xg = x.requires_grad_()
    go = randn(2, 64, 40, 40, device=device)

    def run():
        out = F.group_norm(xg, 8, w, b, 1e-5, "silu")
        return (out, *torch.autograd.grad(out, (xg, w, b), go))

    first = run()
    for a, b_ in zip(first, run()):
        assert torch.equal(a, b_)
    if device == "cpu":  # independent of the thread count too
        n = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            for a, b_ in zip(first, run()):
                assert torch.equal(a, b_)
        finally:
            torch.set_num_threads(n)


# ------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
def test_cuda_graph_capture():
    x = _channels_last(randn(2, 64, 16, 16, device="cuda", dtype=torch.bfloat16))
    w = randn(64, device="cuda", dtype=torch.bfloat16)
    b = randn(64, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        F.group_norm(x, 32, w, b, 1e-5, "silu")
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = F.group_norm(x, 32, w, b, 1e-5, "silu")
    x.copy_(randn(2, 64, 16, 16, device="cuda", dtype=torch.bfloat16))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, F.group_norm(x, 32, w, b, 1e-5, "silu"))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
def test_cuda_misaligned():
    base = randn(2 * 32 * 9 * 7 + 1, device="cuda", dtype=torch.bfloat16)
    x = base[1:].view(2, 32, 9, 7)  # 2-byte offset: no 16-byte vector access
    expected = R.group_norm(x.double(), 8, None, None, 1e-5, "silu")
    out = F.group_norm(x, 8, None, None, 1e-5, "silu")
    assert_close_to_ref(out, expected, torch.bfloat16, TF.silu(TF.group_norm(x, 8)))
