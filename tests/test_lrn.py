"""local_response_norm and spatial_response_norm: forward and gradient
against the float64 reference (and torch's own LRN), edge sizes, layouts,
gradcheck/gradgradcheck, opcheck, torch.compile, bad inputs, modules, convert()."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as TF

import torchfuse
from torchfuse import functional as F
from torchfuse import reference as R

from conftest import DTYPES, assert_close_to_ref, assert_raises_like_torch, randn

# (input shape, size): size 1, even sizes, size > C, 3-D / 4-D / 5-D, columns
# that are not a multiple of the vector width, batch 1, one channel.
LRN_CASES = [
    ((2, 6, 7), 1),
    ((2, 6, 7), 3),
    ((1, 5, 9, 11), 2),  # even
    ((2, 7, 5, 6), 4),  # even
    ((3, 4, 3, 5), 9),  # size > C
    ((2, 1, 4, 4), 5),  # one channel
    ((1, 96, 13, 13), 5),  # AlexNet-like, batch 1
    ((2, 40, 3, 70), 5),  # more than one column tile
    ((2, 5, 2, 3, 4), 3),  # 5-D
    ((1, 20, 33), 32),  # long window, anchoring
    ((2, 37, 6), 6),  # C not a multiple of the anchoring period
]
SRN_CASES = [
    ((2, 3, 7, 9), 1),
    ((2, 3, 7, 9), 3),
    ((1, 2, 8, 5), 4),  # even
    ((2, 2, 3, 4), 7),  # size > H, W
    ((1, 1, 1, 1), 3),
    ((1, 4, 40, 37), 5),
    ((1, 2, 6, 45), 34),  # wider than the direct column sums (float64 prefix sums)
]
PARAMS = (2e-2, 0.75, 1.0)  # alpha, beta, k: alpha large enough to matter


def _lowp_torch(fn, x, go, args):
    """torch's own result computed in x's dtype (for the low-precision
    tolerance); torch's CPU LRN (avg_pool3d) has no float16/bfloat16 kernel,
    so there it runs in float32 and is rounded to the dtype."""
    x = x.detach().requires_grad_()
    try:
        out = fn(x, *args)
        return out, torch.autograd.grad(out, x, go)[0]
    except (NotImplementedError, RuntimeError):
        x32 = x.detach().float().requires_grad_()
        out = fn(x32, *args)
        g = torch.autograd.grad(out, x32, go.float())[0]
        return out.to(x.dtype), g.to(x.dtype)


def _srn_torch_like(x, *args):
    # no torch op for spatial_response_norm to compare against in low
    # precision: the reference in float32, rounded to dtype, stands in for it.
    return R.spatial_response_norm(x.float(), *args).to(x.dtype)


def _check(op, ref, torch_fn, shape, size, dtype, device, alpha, beta, k,
           memory_format=torch.contiguous_format):
    x = randn(*shape, dtype=dtype, device=device).contiguous(memory_format=memory_format)
    x.requires_grad_()
    go = randn(*shape, dtype=dtype, device=device).contiguous(memory_format=memory_format)
    out = op(x, size, alpha, beta, k)
    (gx,) = torch.autograd.grad(out, x, go)
    assert out.dtype == dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=memory_format)
    assert gx.is_contiguous(memory_format=memory_format)
    x64 = x.detach().double().requires_grad_()
    ref_out = ref(x64, size, alpha, beta, k)
    (ref_gx,) = torch.autograd.grad(ref_out, x64, go.double())
    theirs = (None, None)
    if dtype in (torch.float16, torch.bfloat16):
        theirs = _lowp_torch(torch_fn, x, go, (size, alpha, beta, k))
    assert_close_to_ref(out, ref_out, dtype, theirs[0], "out")
    assert_close_to_ref(gx, ref_gx, dtype, theirs[1], "grad_input")


@pytest.mark.parametrize("shape,size", LRN_CASES, ids=[f"{s}-{n}" for s, n in LRN_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lrn_matches_reference(device, dtype, shape, size):
    _check(F.local_response_norm, R.local_response_norm, TF.local_response_norm,
           shape, size, dtype, device, *PARAMS)


# channels_last(_3d) input runs in place on the CPU (windows along the
# contiguous channels): sizes 1, even, > C, past the direct-sum limit (32),
# C not a multiple of the vector width, 5-D.
LRN_CL_CASES = [
    ((2, 6, 5, 7), 1),
    ((2, 6, 5, 7), 3),
    ((1, 5, 9, 11), 2),
    ((2, 7, 5, 6), 4),
    ((3, 4, 3, 5), 9),
    ((1, 96, 13, 13), 5),
    ((2, 37, 3, 4), 6),
    ((1, 70, 2, 3), 33),
    ((2, 50, 3, 2), 64),
    ((2, 5, 2, 3, 4), 3),
]


@pytest.mark.parametrize("shape,size", LRN_CL_CASES, ids=[f"{s}-{n}" for s, n in LRN_CL_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lrn_channels_last_matches_reference(device, dtype, shape, size):
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    _check(F.local_response_norm, R.local_response_norm, TF.local_response_norm,
           shape, size, dtype, device, *PARAMS, memory_format=fmt)


# channels_last spatial_response_norm runs in place on the CPU for windows up
# to 16 (tasks of 8 rows and 64 channels: more of each, halos across them),
# through contiguous copies beyond.
SRN_CL_CASES = [
    ((2, 6, 5, 7), 1),
    ((2, 6, 5, 7), 3),
    ((1, 5, 9, 11), 2),
    ((2, 70, 20, 3), 4),
    ((1, 130, 17, 9), 5),
    ((2, 3, 3, 4), 7),
    ((1, 9, 19, 6), 16),
    ((1, 4, 18, 5), 17),
]


@pytest.mark.parametrize("shape,size", SRN_CL_CASES, ids=[f"{s}-{n}" for s, n in SRN_CL_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_srn_channels_last_matches_reference(device, dtype, shape, size):
    _check(F.spatial_response_norm, R.spatial_response_norm, _srn_torch_like,
           shape, size, dtype, device, *PARAMS, memory_format=torch.channels_last)


@pytest.mark.parametrize("shape,size", SRN_CASES, ids=[f"{s}-{n}" for s, n in SRN_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_srn_matches_reference(device, dtype, shape, size):
    _check(F.spatial_response_norm, R.spatial_response_norm, _srn_torch_like,
           shape, size, dtype, device, *PARAMS)


@pytest.mark.parametrize("alpha,beta,k", [(1e-4, 0.75, 1.0), (1.0, 0.5, 2.0), (0.5, 1.3, 0.3),
                                          (3.0, 1.0, 1.0)])
def test_parameters(device, alpha, beta, k):
    for op, ref, shape in ((F.local_response_norm, R.local_response_norm, (2, 9, 4, 5)),
                           (F.spatial_response_norm, R.spatial_response_norm, (2, 3, 6, 5))):
        _check(op, ref, None, shape, 3, torch.float32, device, alpha, beta, k)
        _check(op, ref, None, shape, 4, torch.float64, device, alpha, beta, k)


def test_lrn_equals_torch_float64(device):
    # torch's own composite, same semantics (window, alpha / size, padding)
    for shape, size in LRN_CASES:
        x = randn(*shape, dtype=torch.float64, device=device)
        torch.testing.assert_close(F.local_response_norm(x, size, 0.1, 0.75, 0.7),
                                   TF.local_response_norm(x, size, 0.1, 0.75, 0.7),
                                   rtol=1e-12, atol=1e-12)


def test_srn_formula_direct(device):
    # S written out as a double loop over the window, independent of reference.py
    x = randn(1, 2, 5, 6, dtype=torch.float64, device=device)
    size, alpha, beta, k = 4, 0.3, 0.75, 1.0
    S = torch.zeros_like(x)
    H, W = 5, 6
    for h in range(H):
        for w in range(W):
            for i in range(h - (size - 1) // 2, h + size // 2 + 1):
                for j in range(w - (size - 1) // 2, w + size // 2 + 1):
                    if 0 <= i < H and 0 <= j < W:
                        S[:, :, h, w] += x[:, :, i, j] ** 2
    expected = x * (k + alpha / size**2 * S) ** -beta
    torch.testing.assert_close(F.spatial_response_norm(x, size, alpha, beta, k), expected,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d", "strided", "transposed"])
def test_layouts(device, layout):
    if layout == "channels_last":
        x = randn(2, 6, 5, 7, device=device).to(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = randn(2, 6, 3, 5, 4, device=device).to(memory_format=torch.channels_last_3d)
    elif layout == "strided":
        x = randn(2, 12, 5, 14, device=device)[:, ::2, :, ::2]
    else:
        x = randn(2, 7, 6, 5, device=device).transpose(2, 3)
    assert not x.is_contiguous()
    x.requires_grad_()
    go = randn(*x.shape, device=device)
    for op, ref, theirs in ((F.local_response_norm, R.local_response_norm,
                             TF.local_response_norm),
                            (F.spatial_response_norm, R.spatial_response_norm, None)):
        if op is F.spatial_response_norm and x.dim() != 4:
            continue
        out = op(x, 3, 0.1, 0.75, 1.0)
        if theirs is not None and layout.startswith("channels_last"):
            # same memory format as torch's output
            assert out.stride() == theirs(x, 3, 0.1, 0.75, 1.0).stride()
        (gx,) = torch.autograd.grad(out, x, go)
        x64 = x.detach().double().requires_grad_()
        r = ref(x64, 3, 0.1, 0.75, 1.0)
        (rg,) = torch.autograd.grad(r, x64, go.double())
        assert_close_to_ref(out, r, torch.float32)
        assert_close_to_ref(gx, rg, torch.float32, name="grad_input")


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 0, 3, 3), (2, 4, 0, 3), (2, 3, 0)])
def test_zero_size(device, shape):
    x = randn(*shape, device=device, requires_grad=True)
    out = F.local_response_norm(x, 3)
    assert out.shape == x.shape
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert gx.shape == x.shape
    if len(shape) == 4:
        out = F.spatial_response_norm(x, 3)
        assert out.shape == x.shape
        (gx,) = torch.autograd.grad(out.sum(), x)
        assert gx.shape == x.shape


def test_k_zero_all_zero_input_like_torch(device):
    # 0 / 0: NaN, as torch's composite gives
    x = torch.zeros(1, 3, 2, 2, device=device)
    assert torch.isnan(F.local_response_norm(x, 3, 1e-4, 0.75, 0.0)).all()
    assert torch.isnan(TF.local_response_norm(x, 3, 1e-4, 0.75, 0.0)).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=str)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=str)
def test_non_finite_input_stays_in_its_window(device, bad, layout):
    """An inf or NaN input affects only the outputs (and input gradients)
    whose windows hold it, as in torch's composite: a running window sum must
    not carry it along after it leaves the window (inf - inf), nor the clamp
    of the sum at zero turn NaN into 0. The rest must match torch."""
    x = randn(2, 7, 40, 6, device=device)
    x[1, 3, 2, 4] = bad
    x = x.contiguous(memory_format=layout)
    g = randn(2, 7, 40, 6, device=device).contiguous(memory_format=layout)
    for ours_fn, ref_fn, n_bad in (
        (F.local_response_norm, TF.local_response_norm, 3),
        (F.spatial_response_norm, R.spatial_response_norm, 9),
    ):
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours, ref = ours_fn(xo, 3, k=2.0), ref_fn(xr, 3, k=2.0)
        (go,) = torch.autograd.grad(ours, xo, g)
        (gr,) = torch.autograd.grad(ref, xr, g)
        for o, r in ((ours, ref), (go, gr)):
            fin = r.isfinite()
            assert torch.equal(o.isfinite(), fin)
            assert torch.equal(o.isnan(), r.isnan())
            torch.testing.assert_close(o[fin], r[fin], rtol=1e-4, atol=1e-5)
        assert (~ours.isfinite()).sum() <= n_bad


@pytest.mark.parametrize("size", [3, 5, 35], ids=str)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_large_square_leaving_the_window(device, dtype, layout, size):
    """One large value among ones: its square swamps the small ones beside it
    in a float window sum, and a running sum that subtracts it again when it
    leaves the window is left near zero (output 1 where 4^-0.75 is right, with
    size 3 and alpha 3). Each window must be summed as torch's pooling sums
    it: along the channels (local_response_norm) and along rows and columns
    (spatial_response_norm), forward and backward, windows summed directly and
    past the direct-sum limit (35)."""
    x = torch.ones(2, 48, 40, 3, dtype=torch.float64)
    x[0, 0], x[1, :, 0], x[1, :, :, 1] = 1e4, 1e4, 1e4  # channel 0, row 0, column 1
    g = randn(2, 48, 40, 3, dtype=torch.float64)
    xd = x.to(device=device, dtype=dtype).contiguous(memory_format=layout).requires_grad_()
    gd = g.to(device=device, dtype=dtype).contiguous(memory_format=layout)
    x64 = x.to(device).requires_grad_()
    args = (size, 3.0 * size, 0.75, 1.0)  # alpha_n = 3 (LRN)
    for ours_fn, ref_fn in ((F.local_response_norm, R.local_response_norm),
                            (F.spatial_response_norm, R.spatial_response_norm)):
        ours = ours_fn(xd, *args)
        (go,) = torch.autograd.grad(ours, xd, gd)
        ref = ref_fn(x64, *args)
        (gr,) = torch.autograd.grad(ref, x64, g.to(device))
        assert_close_to_ref(ours, ref, dtype, ref.to(dtype), "out")
        assert_close_to_ref(go, gr, dtype, gr.to(dtype), "grad_input")


def test_gradcheck(device):
    x = randn(2, 5, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    x3 = randn(2, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    for size in (1, 2, 3, 6):
        lrn = functools.partial(F.local_response_norm, size=size, alpha=0.5, beta=0.75, k=1.0)
        srn = functools.partial(F.spatial_response_norm, size=size, alpha=0.5, beta=0.6, k=1.0)
        torch.autograd.gradcheck(lrn, (x,))
        torch.autograd.gradcheck(srn, (x,))
    torch.autograd.gradcheck(lambda a: F.local_response_norm(a, 2, 0.5, 1.3, 0.5), (x3,))
    torch.autograd.gradgradcheck(lambda a: F.local_response_norm(a, 4, 0.5, 0.75, 1.0), (x,))
    torch.autograd.gradgradcheck(lambda a: F.spatial_response_norm(a, 2, 0.5, 0.75, 1.0), (x,))


def test_double_backward_matches_reference(device):
    x = randn(2, 6, 4, 5, device=device, requires_grad=True)

    def second(fn, x):
        out = fn(x, 3, 0.3, 0.75, 1.0)
        (gx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.sin().sum(), x)[0]

    for op, ref in ((F.local_response_norm, R.local_response_norm),
                    (F.spatial_response_norm, R.spatial_response_norm)):
        expected = second(ref, x.detach().double().requires_grad_())
        assert_close_to_ref(second(op, x), expected, torch.float32, name="ggx")


def test_opcheck(device):
    ops = torch.ops.torchfuse
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for shape in ((2, 5, 3, 4), (2, 6, 7)):
            x = randn(*shape, dtype=dtype, device=device, requires_grad=True)
            go = randn(*shape, dtype=dtype, device=device)
            for size in (2, 3):
                torch.library.opcheck(ops.local_response_norm.default, (x, size, 0.1, 0.75, 1.0))
                torch.library.opcheck(ops.local_response_norm_backward.default,
                                      (go, x.detach(), size, 0.1, 0.75, 1.0))
                if len(shape) == 4:
                    torch.library.opcheck(ops.spatial_response_norm.default,
                                          (x, size, 0.1, 0.75, 1.0))
                    torch.library.opcheck(ops.spatial_response_norm_backward.default,
                                          (go, x.detach(), size, 0.1, 0.75, 1.0))
    xc = randn(2, 5, 3, 4, device=device).to(memory_format=torch.channels_last)
    gc = randn(2, 5, 3, 4, device=device).to(memory_format=torch.channels_last)
    torch.library.opcheck(ops.local_response_norm.default, (xc, 3, 0.1, 0.75, 1.0))
    torch.library.opcheck(ops.local_response_norm_backward.default, (gc, xc, 4, 0.1, 0.75, 1.0))
    torch.library.opcheck(ops.spatial_response_norm.default, (xc, 3, 0.1, 0.75, 1.0))
    torch.library.opcheck(ops.spatial_response_norm_backward.default, (gc, xc, 4, 0.1, 0.75, 1.0))


def test_compile_fullgraph(device):
    torch._dynamo.reset()

    def block(x):
        return F.local_response_norm(x, 5, 1e-3).sum() + F.spatial_response_norm(x, 3, 1e-2).sum()

    x = randn(2, 8, 6, 6, device=device, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    (g,) = torch.autograd.grad(loss, x)
    loss_e = block(x)
    (g_e,) = torch.autograd.grad(loss_e, x)
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(g, g_e)


# ------------------------------------------------------------------ bad input
def _bad_lrn(device):
    x = randn(2, 5, 4, 4, device=device)
    return [
        ("size", lambda f: f(x, 0)),
        ("size", lambda f: f(x, -2)),
        ("input", lambda f: f(x[0, 0], 3)),
        ("input", lambda f: f(x.to(torch.int32), 3)),
        ("input", lambda f: f(x.to(torch.bool), 3)),
        ("size", lambda f: f(x.to(torch.int64), 0)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_lrn_bad_input_like_torch(device, case):
    arg, call = _bad_lrn(device)[case]
    assert_raises_like_torch(lambda: call(TF.local_response_norm),
                             lambda: call(F.local_response_norm), arg)


def test_integer_input_as_torch(device):
    """torch's composite takes int64 input (on CPU: a float result by type
    promotion); so does ours, through torch's op, with the same result."""
    x = (randn(2, 5, 4, 4) * 4).to(torch.int64).to(device)
    try:
        want = TF.local_response_norm(x, 3, 0.5)
    except (NotImplementedError, RuntimeError) as e:  # no int64 kernel on this device
        with pytest.raises(type(e), match="input"):
            F.local_response_norm(x, 3, 0.5)
        return
    got = F.local_response_norm(x, 3, 0.5)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(torchfuse.nn.LocalResponseNorm(3, 0.5)(x), want, rtol=0, atol=0)


def test_bad_input_types(device):
    x = randn(2, 5, 4, 4, device=device)
    for fn in (F.local_response_norm, F.spatial_response_norm):
        with pytest.raises(TypeError, match="size"):
            fn(x, 2.5)
        with pytest.raises(TypeError, match="input"):
            fn("x", 3)
        for arg in ("alpha", "beta", "k"):
            with pytest.raises(TypeError, match=arg):
                fn(x, 3, **{arg: "a"})
    # the C++ ops check too, before any kernel runs
    ops = torch.ops.torchfuse
    with pytest.raises(RuntimeError, match="size"):
        ops.spatial_response_norm(x, 0, 1e-4, 0.75, 1.0)
    with pytest.raises(ValueError, match="input"):
        ops.local_response_norm(x[0, 0], 3, 1e-4, 0.75, 1.0)
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.local_response_norm_backward(x[:1], x, 3, 1e-4, 0.75, 1.0)
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.spatial_response_norm_backward(x.double(), x, 3, 1e-4, 0.75, 1.0)


def test_srn_bad_input(device):
    x = randn(2, 5, 4, 4, device=device)
    with pytest.raises(ValueError, match="input"):
        F.spatial_response_norm(x[0], 3)
    with pytest.raises(ValueError, match="input"):
        F.spatial_response_norm(x[..., None], 3)
    with pytest.raises(RuntimeError, match="size"):
        F.spatial_response_norm(x, 0)
    with pytest.raises(NotImplementedError, match="input"):
        F.spatial_response_norm(x.long(), 3)


# --------------------------------------------------------------------- modules
def test_module_is_drop_in(device):
    ref = torch.nn.LocalResponseNorm(5, alpha=1e-3, beta=0.7, k=2.0)
    ours = torchfuse.nn.LocalResponseNorm(5, alpha=1e-3, beta=0.7, k=2.0)
    assert isinstance(ours, torch.nn.LocalResponseNorm)
    assert ours.extra_repr() == ref.extra_repr()
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = randn(2, 9, 5, 5, device=device)
    torch.testing.assert_close(ours(x), ref(x), rtol=2e-5, atol=1e-6)


def test_spatial_module(device):
    m = torchfuse.nn.SpatialResponseNorm(3, alpha=1e-2, beta=0.7, k=2.0)
    assert isinstance(m, torch.nn.Module)
    assert m.extra_repr() == "3, alpha=0.01, beta=0.7, k=2.0"
    assert list(m.state_dict()) == []
    x = randn(2, 4, 6, 6, device=device)
    assert torch.equal(m(x), F.spatial_response_norm(x, 3, 1e-2, 0.7, 2.0))


def test_convert(device):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.LocalResponseNorm(4, k=2.0),
                                torch.nn.ReLU()).to(device)
    converted = torchfuse.convert(model)
    assert type(model[1]) is torch.nn.LocalResponseNorm
    assert type(converted[1]) is torchfuse.nn.LocalResponseNorm
    assert converted[1].size == 4 and converted[1].k == 2.0
    assert list(converted.state_dict()) == list(model.state_dict())
    x = randn(2, 3, 9, 9, device=device, requires_grad=True)
    torch.testing.assert_close(converted(x), model(x), rtol=2e-5, atol=1e-6)
    g1 = torch.autograd.grad(converted(x).sum(), x)[0]
    g2 = torch.autograd.grad(model(x).sum(), x)[0]
    torch.testing.assert_close(g1, g2, rtol=2e-5, atol=1e-5)
