"""gram_matrix and style_loss: forward and every gradient against the float64
reference, layouts (contiguous, channels_last, channels_last_3d, strided),
2-D to 5-D input, zero sizes, float16 range, gradcheck / gradgradcheck,
double backward, opcheck, torch.compile, bad inputs, the modules,
determinism, CUDA graphs."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as TF

import torchfuse
from torchfuse import functional as F
from torchfuse import reference as R

from conftest import DTYPES, HAS_CUDA, assert_close_to_ref, leaf, randn, second_order

# (shape, layout): sizes that are not multiples of the vector width, one
# channel, 2-D input (L = 1), 3-D and 5-D, VGG-like at batch 1.
SHAPES = [
    ((2, 8, 5, 7), "contiguous"),
    ((2, 8, 5, 7), "channels_last"),
    ((3, 5), "contiguous"),
    ((2, 3, 17), "contiguous"),
    ((2, 6, 9), "strided"),  # (N, L, C) transposed: neither layout, copied
    ((1, 33, 4, 4, 3), "channels_last_3d"),
    ((2, 1, 9), "contiguous"),
    ((4, 130, 3, 3), "channels_last"),
    ((1, 64, 16, 16), "contiguous"),
]
IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay in SHAPES]


def _make(shape, layout, dtype, device, requires_grad=True, **kw):
    if layout == "strided":
        n, c, l_ = shape
        return randn(n, l_, c, dtype=dtype, device=device, **kw).transpose(1, 2) \
            .requires_grad_(requires_grad)
    x = randn(*shape, dtype=dtype, device=device, **kw)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = x.to(memory_format=torch.channels_last_3d)
    return x.requires_grad_(requires_grad)


def _torch_gram(x, normalize=True):
    """What users write in eager torch, in x's dtype."""
    n, c = x.shape[0], x.shape[1]
    f = x.reshape(n, c, -1)
    g = torch.bmm(f, f.transpose(1, 2))
    return g / (c * f.shape[2]) if normalize else g


def _torch_style(x, t, reduction="mean"):
    g = _torch_gram(x)
    return TF.mse_loss(g, t.to(g.dtype).expand_as(g), reduction=reduction)


def _run(fn, inputs, grad_out, wrt):
    out = fn(*inputs)
    wrt = [t for t in wrt if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, wrt, grad_out)
    return (out, *grads)


def _compare(ours, ref, theirs, dtype, names):
    for o, r, t, name in zip(ours, ref, theirs, names):
        assert_close_to_ref(o, r, dtype, t, name=name)


# ----------------------------------------------------------------- gram_matrix
@pytest.mark.parametrize("shape,layout", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_gram_matrix_matches_reference(device, dtype, shape, layout, normalize):
    x = _make(shape, layout, dtype, device)
    go = randn(shape[0], shape[1], shape[1], dtype=dtype, device=device)
    ours = _run(lambda a: F.gram_matrix(a, normalize), (x,), go, (x,))
    x64 = leaf(x, torch.float64)
    ref = _run(lambda a: R.gram_matrix(a, normalize), (x64,), go.double(), (x64,))
    xt = leaf(x)
    theirs = _run(lambda a: _torch_gram(a, normalize), (xt,), go, (xt,))
    assert ours[0].dtype == dtype and ours[0].shape == (shape[0], shape[1], shape[1])
    _compare(ours, ref, theirs, dtype, ("out", "grad_input"))
    # the gradient comes back in the input's memory format
    if layout in ("channels_last", "channels_last_3d"):
        assert ours[1].stride() == x.stride()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gram_matrix_large_features(dtype, device):
    """VGG relu1_1-like features of magnitude 16 over 64 x 64 positions: the
    raw products (about 1e6) overflow float16, the normalized Gram matrix
    (about 256 / 64) does not. The scale is applied inside the GEMM, so the
    result is finite and as accurate as the dtype allows."""
    x = randn(1, 64, 64, 64, dtype=dtype, device=device, scale=4.0, shift=16.0)
    out = F.gram_matrix(x)
    assert torch.isfinite(out).all()
    ref = R.gram_matrix(x.double())
    err = ((out.double() - ref).abs() / ref.abs()).max().item()
    # float16/bfloat16: the output's rounding; float32: the GEMM's (4096 terms)
    tol = 2e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert err <= tol, f"relative error {err:.3g}"


def test_gram_matrix_zero_sizes(device):
    for shape in [(0, 4, 3, 3), (2, 0, 5), (2, 3, 0), (2, 3, 4, 0)]:
        for normalize in (True, False):
            x = randn(*shape, device=device, requires_grad=True)
            out = F.gram_matrix(x, normalize)
            expected = R.gram_matrix(x.detach(), normalize)  # 0 / 0 = NaN with normalize
            torch.testing.assert_close(out, expected, equal_nan=True)
            (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
            assert gx.shape == x.shape


# ------------------------------------------------------------------ style_loss
STYLE_SHAPES = [
    ((2, 8, 5, 7), "contiguous"),
    ((2, 8, 5, 7), "channels_last"),
    ((3, 5), "contiguous"),
    ((1, 33, 4, 4, 3), "channels_last_3d"),
    ((4, 130, 3, 3), "contiguous"),
    ((1, 64, 16, 16), "channels_last"),
]
STYLE_IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay in STYLE_SHAPES]


def _target(shape, kind, device, requires_grad=False):
    """A style target: the Gram matrix of another random input, (C, C),
    (1, C, C) or (N, C, C), in float32."""
    n, c = shape[0], shape[1]
    other = randn(n if kind == "batched" else 1, c, *shape[2:], device=device,
                  dtype=torch.float64)
    t = R.gram_matrix(other)
    t = t[0] if kind == "shared" else t
    return t.float().requires_grad_(requires_grad)


@pytest.mark.parametrize("shape,layout", STYLE_SHAPES, ids=STYLE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["shared", "one", "batched"])
def test_style_loss_matches_reference(device, dtype, shape, layout, reduction, kind):
    x = _make(shape, layout, dtype, device)
    t = _target(shape, kind, device, requires_grad=True)
    c = shape[1]
    go_dtype = dtype if reduction == "none" else torch.float32
    go = randn(*((shape[0], c, c) if reduction == "none" else (1,)), dtype=go_dtype,
               device=device)
    if reduction != "none":
        go = go.reshape(())
    ours = _run(lambda a, b: F.style_loss(a, b, reduction), (x, t), go, (x, t))
    l64 = [leaf(x, torch.float64), leaf(t, torch.float64)]
    ref = _run(lambda a, b: R.style_loss(a, b, reduction), l64, go.double(), l64)
    lt = [leaf(x), leaf(t)]
    theirs = _run(lambda a, b: _torch_style(a, b, reduction), lt, go.to(dtype), lt)
    expected_dtype = dtype if reduction == "none" else (
        torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    assert ours[0].dtype == expected_dtype
    assert ours[2].dtype == t.dtype and ours[2].shape == t.shape
    _compare(ours, ref, theirs, dtype, ("loss", "grad_input", "grad_target"))


def test_style_loss_zero_sizes(device):
    for shape in [(0, 4, 3, 3), (2, 0, 5), (2, 3, 0)]:
        for reduction in ("mean", "sum", "none"):
            x = randn(*shape, device=device, requires_grad=True)
            t = torch.zeros(shape[1], shape[1], device=device)
            out = F.style_loss(x, t, reduction)
            expected = R.style_loss(x.detach(), t, reduction)
            torch.testing.assert_close(out, expected, equal_nan=True)
            (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
            assert gx.shape == x.shape


def test_style_loss_float64_target_with_float32_input(device):
    # the target is converted to the accumulate type; the loss keeps input's dtype
    x = randn(2, 6, 4, 4, device=device)
    t = R.gram_matrix(randn(1, 6, 4, 4, device=device, dtype=torch.float64))[0]
    out = F.style_loss(x, t)
    assert out.dtype == torch.float32
    assert_close_to_ref(out, R.style_loss(x.double(), t), torch.float32)


# -------------------------------------------------------------------- autograd
def test_gradcheck(device):
    kw = {"dtype": torch.float64, "device": device, "requires_grad": True}
    x = randn(2, 4, 3, 2, **kw)
    xc = randn(2, 4, 3, 2, **kw).detach().to(memory_format=torch.channels_last).requires_grad_()
    t = randn(4, 4, **kw)
    tb = randn(2, 4, 4, **kw)
    for a in (x, xc):
        for normalize in (True, False):
            fn = functools.partial(F.gram_matrix, normalize=normalize)
            torch.autograd.gradcheck(fn, (a,))
            torch.autograd.gradgradcheck(fn, (a,))
        for reduction in ("mean", "sum", "none"):
            fn = functools.partial(F.style_loss, reduction=reduction)
            for target in (t, tb):
                torch.autograd.gradcheck(fn, (a, target))
                torch.autograd.gradgradcheck(fn, (a, target))


def test_double_backward_matches_reference(device):
    x = randn(2, 6, 4, 3, device=device, requires_grad=True)
    t = randn(6, 6, device=device, requires_grad=True)
    l64 = [leaf(v, torch.float64) for v in (x, t)]
    ours = second_order(F.gram_matrix, x)
    ref = second_order(R.gram_matrix, l64[0])
    assert_close_to_ref(ours[0], ref[0], torch.float32, name="ggx")
    # the style loss's second derivatives through sin() of first derivatives
    # of a squared loss lose about 4e-5 (relative) in float32 whoever computes
    # them (the reference itself, run in float32): compared in float64
    ours = second_order(lambda a, b: F.style_loss(a, b, "sum"), *l64)
    ref = second_order(lambda a, b: R.style_loss(a, b, "sum"),
                        *[leaf(v) for v in l64])
    for o, r, name in zip(ours, ref, ("ggx", "ggt")):
        assert_close_to_ref(o, r, torch.float64, name=name)


def _opcheck_samples(device):
    ops = torch.ops.torchfuse
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        kw = {"dtype": dtype, "device": device}
        for layout in ("contiguous", "channels_last"):
            x = _make((2, 6, 4, 3), layout, dtype, device)
            for normalize in (True, False):
                yield ops.gram_matrix.default, (x, normalize)
                go = randn(2, 6, 6, **kw)
                yield ops.gram_matrix_backward.default, (go, x.detach(), normalize)
            for reduction in ("mean", "none"):
                t = randn(6, 6, **kw, requires_grad=True)
                yield ops.style_loss.default, (x, t, reduction)
                loss, diff = ops.style_loss(x.detach(), t.detach(), reduction)
                gl = randn(max(loss.numel(), 1), dtype=loss.dtype, device=device).reshape(
                    loss.shape)
                yield ops.style_loss_backward.default, (gl, x.detach(), diff, reduction, True,
                                                        True)


def test_opcheck(device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)


def test_compile_fullgraph(device):
    torch._dynamo.reset()

    def block(x, t):
        g = F.gram_matrix(x)
        return F.style_loss(x, t) + g.sum()

    x = randn(2, 8, 5, 5, device=device, requires_grad=True)
    t = randn(8, 8, device=device)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    loss = compiled(x, t)
    (g,) = torch.autograd.grad(loss, x)
    loss_e = block(x, t)
    (g_e,) = torch.autograd.grad(loss_e, x)
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(g, g_e)


def test_compile_inductor(device):
    torch._dynamo.reset()
    m = torchfuse.nn.StyleLoss(randn(8, 8, device=device))
    compiled = torch.compile(m, fullgraph=True)
    x = randn(2, 8, 6, 6, device=device).to(memory_format=torch.channels_last)
    torch.testing.assert_close(compiled(x), m(x))


# ------------------------------------------------------------------- bad input
def _bad(device):
    x = randn(2, 3, 4, device=device)
    t = randn(3, 3, device=device)
    return [
        ("input", lambda: F.gram_matrix(randn(5, device=device)), RuntimeError),
        ("input", lambda: F.gram_matrix(x.to(torch.int32)), NotImplementedError),
        ("input", lambda: F.gram_matrix("x"), TypeError),
        ("normalize", lambda: F.gram_matrix(x, 1), TypeError),
        ("input", lambda: F.style_loss(randn(5, device=device), t), RuntimeError),
        ("input", lambda: F.style_loss(x.to(torch.int64), t), NotImplementedError),
        ("target_gram", lambda: F.style_loss(x, randn(4, 4, device=device)), RuntimeError),
        ("target_gram", lambda: F.style_loss(x, randn(3, 3, 3, device=device)), RuntimeError),
        ("target_gram", lambda: F.style_loss(x, randn(3, device=device)), RuntimeError),
        ("target_gram", lambda: F.style_loss(x, "t"), TypeError),
        ("target_gram", lambda: F.style_loss(x, t.to(torch.int32)), NotImplementedError),
        ("reduction", lambda: F.style_loss(x, t, "avg"), ValueError),
        ("reduction", lambda: F.style_loss(x, t, None), TypeError),
    ]


@pytest.mark.parametrize("case", range(13))
def test_bad_input(device, case):
    arg, call, exc = _bad(device)[case]
    with pytest.raises(exc, match=arg):
        call()


def test_invalid_reduction_like_torch(device):
    x = randn(2, 3, 4, device=device)
    t = randn(3, 3, device=device)
    with pytest.raises(ValueError) as theirs:
        TF.mse_loss(_torch_gram(x), t.expand(2, 3, 3), reduction="avg")
    with pytest.raises(ValueError, match="avg is not a valid value for reduction"):
        F.style_loss(x, t, "avg")
    assert "avg is not a valid value for reduction" in str(theirs.value)


def test_backward_ops_bad_input(device):
    ops = torch.ops.torchfuse
    x = randn(2, 3, 4, device=device)
    go = randn(2, 3, 3, device=device)
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.gram_matrix_backward(go[:1], x, True)
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.gram_matrix_backward(go.double(), x, True)
    loss, diff = ops.style_loss(x, randn(3, 3, device=device), "mean")
    with pytest.raises(RuntimeError, match="diff"):
        ops.style_loss_backward(torch.ones_like(loss), x, diff[:1], "mean", True, False)
    with pytest.raises(RuntimeError, match="diff"):
        ops.style_loss_backward(torch.ones_like(loss), x, diff.double(), "mean", True, False)
    with pytest.raises(RuntimeError, match="grad_loss"):
        ops.style_loss_backward(go, x, diff, "mean", True, False)
    with pytest.raises(RuntimeError, match="grad_loss"):
        ops.style_loss_backward(torch.ones_like(loss), x, diff, "none", True, False)
    with pytest.raises(ValueError, match="reduction"):
        ops.style_loss_backward(torch.ones_like(loss), x, diff, "avg", True, False)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
def test_bad_device():
    x = randn(2, 3, 4, device="cuda")
    with pytest.raises(RuntimeError, match="target_gram"):
        F.style_loss(x, randn(3, 3))


# --------------------------------------------------------------------- modules
def test_gram_matrix_module(device):
    m = torchfuse.nn.GramMatrix()
    assert m.extra_repr() == "normalize=True" and list(m.state_dict()) == []
    x = randn(2, 5, 4, 4, device=device)
    assert torch.equal(m(x), F.gram_matrix(x))
    assert torch.equal(torchfuse.nn.GramMatrix(normalize=False)(x), F.gram_matrix(x, False))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_gram_matrix_autocast_like_bmm(device, compiled):
    """Under autocast torch's bmm casts a float32 input to the autocast
    dtype; gram_matrix does the same (it returned float32 before), and its
    result and gradient match the float64 formula on the cast input."""
    dt = torch.bfloat16 if device == "cpu" else torch.float16
    if compiled:
        torch._dynamo.reset()
    fn = torch.compile(F.gram_matrix, fullgraph=True, backend="aot_eager") \
        if compiled else F.gram_matrix
    x = randn(2, 6, 5, 5, device=device, requires_grad=True)
    go = randn(2, 6, 6, device=device).to(dt)
    with torch.autocast(device, dtype=dt):
        out = fn(x)
        flat = x.flatten(2)
        theirs = torch.bmm(flat, flat.transpose(1, 2)) / (6 * 25)
    assert out.dtype == theirs.dtype == dt
    (gx,) = torch.autograd.grad(out, x, go)
    (gx_t,) = torch.autograd.grad(theirs, x, go)
    assert gx.dtype == torch.float32
    x64 = x.detach().to(dt).double().requires_grad_()
    ref = R.gram_matrix(x64)
    (gx64,) = torch.autograd.grad(ref, x64, go.double())
    assert_close_to_ref(out, ref, dt, theirs, name="out")
    assert_close_to_ref(gx, gx64, dt, gx_t, name="grad_input")


def test_style_loss_module(device):
    t = randn(5, 5, device=device, requires_grad=True)
    m = torchfuse.nn.StyleLoss(t, reduction="sum")
    assert list(m.state_dict()) == ["target_gram"]
    assert not m.target_gram.requires_grad and m.target_gram.data_ptr() != t.data_ptr()
    assert m.extra_repr() == "channels=5, reduction='sum'"
    x = randn(2, 5, 4, 4, device=device, requires_grad=True)
    loss = m(x)
    assert_close_to_ref(loss, R.style_loss(x.double(), t.double(), "sum"), torch.float32)
    (gx,) = torch.autograd.grad(loss, x)
    assert gx.shape == x.shape
    m16 = m.to(torch.bfloat16)
    assert m16.target_gram.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="target_gram"):
        torchfuse.nn.StyleLoss(randn(4, 5))


# ----------------------------------------------------------------- determinism
def test_deterministic(device):
    x = randn(3, 48, 20, 20, device=device, requires_grad=True)
    t = randn(48, 48, device=device)

    def run():
        loss = F.style_loss(x, t)
        return (loss, *torch.autograd.grad(loss, x))

    first = run()
    for a, b in zip(first, run()):
        assert torch.equal(a, b)
    if device == "cpu":
        n = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            # the loss's fixed-order sum does not depend on the thread count
            assert torch.equal(first[0], run()[0])
        finally:
            torch.set_num_threads(n)


# ------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
def test_cuda_graph_capture():
    x = randn(2, 64, 32, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = randn(64, 64, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        F.style_loss(x, t).backward()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(g):
        loss = F.style_loss(x, t)
        (gx,) = torch.autograd.grad(loss, x)
    with torch.no_grad():
        x.copy_(randn(2, 64, 32, 32, device="cuda", dtype=torch.bfloat16))
    g.replay()
    torch.cuda.synchronize()
    expected = F.style_loss(x, t)
    assert torch.equal(loss, expected)
    assert torch.equal(gx, torch.autograd.grad(F.style_loss(x, t), x)[0])
