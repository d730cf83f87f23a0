"""l2_norm, normalize and cosine_linear: forward and every gradient against the
float64 reference, zero vectors and eps semantics, layouts, gradcheck /
gradgradcheck, opcheck, torch.compile, bad inputs, the modules, convert() of
torchvision's SSD VGG L2 scale, determinism, CUDA graphs."""

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
    second_order,
)

# (input shape, dim): column layout (dim not last), row layout (dim last),
# sizes that are not multiples of the vector width or the CPU column block.
L2_SHAPES = [
    ((2, 64, 5, 7), 1),  # NCHW, SSD-like (column layout)
    ((1, 3, 1, 1), 1),  # batch 1, one position
    ((2, 1, 9), 1),  # one element per normalized vector
    ((3, 7), 1),  # 2-D, dim last, odd size
    ((5, 768), -1),  # embeddings
    ((4, 33, 17), 1),  # inner 17
    ((2, 5, 70), 2),
    ((2, 6, 100), 1),  # inner 100: a full and a partial block in one CPU task
    ((6,), 0),  # 1-D
    ((3, 4, 130), 0),  # dim 0, inner 520: full blocks and a tail
    ((1, 512, 38, 38), 1),  # SSD conv4_3 at batch 1
    ((1, 100000, 2), 1),  # long columns, inner 2: many channel splits on CUDA
    # rows of 1-4 elements (3-vectors, quaternions): the CPU's short-row path
    ((1000, 3), -1),
    ((2, 50, 4), -1),
    ((33, 2), 1),
    ((7, 1), -1),
    ((40, 8), -1),
]
L2_IDS = [f"{s}-d{d}" for s, d in L2_SHAPES]


def _bshape(x, dim):
    shape = [1] * x.dim()
    shape[dim] = -1
    return shape


def _torch_l2(x, w, dim, eps):
    y = TF.normalize(x, 2.0, dim, eps)
    return y * w.reshape(_bshape(x, dim)) if w is not None else y


def _run(fn, args, grad_out, wrt):
    out = fn(*args)
    wrt = [t for t in wrt if t is not None]
    return (out, *torch.autograd.grad(out, wrt, grad_out))


def _compare(ours, ref, theirs, dtype, names):
    assert len(ours) == len(ref) == len(names)
    for o, r, t, name in zip(ours, ref, theirs, names):
        assert_close_to_ref(o, r, dtype, t, name=name)


@pytest.mark.parametrize("shape,dim", L2_SHAPES, ids=L2_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["weight", "noweight"])
def test_l2_norm_matches_reference(device, dtype, shape, dim, affine):
    if shape == (1, 512, 38, 38) and dtype != torch.float32:
        pytest.skip("one dtype is enough for the large shape on this path")
    x = randn(*shape, dtype=dtype, device=device, requires_grad=True)
    w = randn(shape[dim], dtype=dtype, device=device, requires_grad=True) if affine else None
    go = randn(*shape, dtype=dtype, device=device)
    ours = _run(lambda a, b: F.l2_norm(a, b, dim), (x, w), go, (x, w))
    x64, w64 = leaf(x, torch.float64), leaf(w, torch.float64)
    ref = _run(lambda a, b: R.l2_norm(a, b, dim), (x64, w64), go.double(), (x64, w64))
    xt, wt = leaf(x), leaf(w)
    theirs = _run(lambda a, b: _torch_l2(a, b, dim, 1e-12), (xt, wt), go, (xt, wt))
    for o, t in zip(ours, theirs):
        assert o.dtype == t.dtype and o.shape == t.shape
    names = ("out", "grad_input", "grad_weight")[: len(ours)]
    if shape[dim] == 1:
        # One element per vector: out = sign(x) * w, so grad_input is exactly
        # zero, computed as the difference of two terms of size |g w / x|;
        # check it against that cancellation bound instead of a relative one.
        wv = w.detach().double() if w is not None else 1.0
        terms = (go.double() * wv / x.detach().double()).abs().max().item()
        assert ours[1].abs().max().item() <= 4 * torch.finfo(dtype).eps * terms
        keep = [0, 2] if w is not None else [0]
        ours, ref, theirs = ([t[k] for k in keep] for t in (ours, ref, theirs))
        names = [names[k] for k in keep]
    _compare(ours, ref, theirs, dtype, names)


# (one element per vector, where grad_input is a pure cancellation, is
# covered by the test above)
NORMALIZE_SHAPES = [(s, d) for s, d in L2_SHAPES[:9] if s[d] != 1]


@pytest.mark.parametrize("shape,dim", NORMALIZE_SHAPES,
                         ids=[f"{s}-d{d}" for s, d in NORMALIZE_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_normalize_matches_torch(device, dtype, shape, dim):
    x = randn(*shape, dtype=dtype, device=device, requires_grad=True)
    go = randn(*shape, dtype=dtype, device=device)
    ours = _run(lambda a: F.normalize(a, 2.0, dim), (x,), go, (x,))
    x64 = leaf(x, torch.float64)
    ref = _run(lambda a: TF.normalize(a, 2.0, dim), (x64,), go.double(), (x64,))
    xt = leaf(x)
    theirs = _run(lambda a: TF.normalize(a, 2.0, dim), (xt,), go, (xt,))
    _compare(ours, ref, theirs, dtype, ("out", "grad_input"))


@pytest.mark.parametrize("p", [1.0, 3, float("inf")])
def test_normalize_other_p_is_torch(device, p):
    x = randn(4, 6, 5, device=device)
    assert torch.equal(F.normalize(x, p, 1), TF.normalize(x, p, 1))
    assert torch.equal(F.normalize(x, p=p, dim=-1, eps=1e-3), TF.normalize(x, p, -1, 1e-3))


def test_normalize_defaults(device):
    x = randn(3, 5, 4, device=device)
    assert torch.equal(F.normalize(x), F.l2_norm(x, None, 1, 1e-12))
    torch.testing.assert_close(F.normalize(x), TF.normalize(x), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("layout", ["channels_last", "strided", "transposed", "expanded"])
def test_layouts(device, layout):
    if layout == "channels_last":
        x = randn(2, 24, 5, 6, device=device).to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = randn(3, 20, 8, device=device)[:, ::2, 1:]
    elif layout == "transposed":
        x = randn(7, 5, 24, device=device).transpose(0, 2)
    else:
        x = randn(2, 24, 1, 3, device=device).expand(2, 24, 4, 3)
    assert not x.is_contiguous()
    x.requires_grad_()
    w = randn(x.shape[1], device=device, requires_grad=True)
    go = randn(*x.shape, device=device).to(memory_format=torch.channels_last) \
        if x.dim() == 4 else randn(*x.shape, device=device)
    ours = _run(lambda a, b: F.l2_norm(a, b, 1), (x, w), go, (x, w))
    x64, w64 = leaf(x, torch.float64), leaf(w, torch.float64)
    ref = _run(lambda a, b: R.l2_norm(a, b, 1), (x64, w64), go.double(), (x64, w64))
    _compare(ours, ref, [None] * 3, torch.float32, ("out", "grad_input", "grad_weight"))
    if layout == "channels_last":  # the output keeps the memory format, like torch
        assert ours[0].is_contiguous(memory_format=torch.channels_last)
        assert ours[1].is_contiguous(memory_format=torch.channels_last)
        assert ours[0].stride() == TF.normalize(x.detach()).stride()


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("shape,dim", [((3, 8, 5), 1), ((4, 40), -1), ((5, 3), -1)],
                         ids=["col", "row", "short-row"])
def test_zero_vectors(device, dtype, shape, dim):
    # A zero vector gives zeros, never NaN, in every dtype (in float16 torch's
    # own eps=1e-12 rounds to zero, so F.normalize itself gives 0/0 there).
    x = randn(*shape, dtype=dtype, device=device)
    if dim == 1:
        x[:, :, 2] = 0
        x[1] = 0
    else:
        x[1] = 0
        x[3] = 0
    w = randn(shape[dim], dtype=dtype, device=device)
    for out in (F.l2_norm(x, w, dim), F.normalize(x, 2.0, dim)):
        assert not torch.isnan(out).any()
        zero = x == 0
        assert torch.all(out[zero] == 0)
    ref = R.l2_norm(x.double(), w.double(), dim)
    err = (F.l2_norm(x, w, dim).double() - ref).abs().max().item()
    assert err <= 2 * torch.finfo(dtype).eps * ref.abs().max().item()
    if dtype in (torch.float32, torch.float64):
        # gradients through the clamp: 1/eps on zero vectors, as torch's composite
        xg = x.clone().requires_grad_()
        go = randn(*shape, dtype=dtype, device=device)
        gx = torch.autograd.grad(F.l2_norm(xg, w, dim), xg, go)[0]
        x64 = x.double().requires_grad_()
        gref = torch.autograd.grad(R.l2_norm(x64, w.double(), dim), x64, go.double())[0]
        assert_close_to_ref(gx, gref, dtype, name="grad_input")


def test_eps_semantics(device):
    x = randn(4, 16, 3, device=device, scale=0.01)
    w = randn(16, device=device)
    for eps in (10.0, 0.5, 0.0):  # a large eps clamps every norm
        assert_close_to_ref(F.l2_norm(x, w, 1, eps), R.l2_norm(x.double(), w.double(), 1, eps),
                            torch.float32)
    z = torch.zeros(2, 5, device=device)
    for eps in (0.0, -1.0):  # no clamp: 0/0 = NaN, as torch
        assert torch.isnan(F.normalize(z, 2.0, 1, eps)).all()
        assert torch.isnan(TF.normalize(z, 2.0, 1, eps)).all()
    x = randn(4, 16, device=device)
    torch.testing.assert_close(F.normalize(x, eps=-1.0), TF.normalize(x, eps=-1.0),
                               rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("shape,dim", [((0, 8), 1), ((2, 0, 3), 1), ((3, 4, 0), 1), ((0,), 0)])
def test_zero_size(device, shape, dim):
    x = randn(*shape, device=device, requires_grad=True)
    w = randn(shape[dim], device=device, requires_grad=True)
    out = F.l2_norm(x, w, dim)
    assert out.shape == x.shape and out.dtype == x.dtype
    gx, gw = torch.autograd.grad(out.sum(), (x, w))
    assert gx.shape == x.shape and gw.shape == w.shape and torch.all(gw == 0)


def test_scalar_input(device):
    x = randn((), device=device, requires_grad=True)
    for dim in (0, -1):
        out = F.normalize(x, dim=dim)
        torch.testing.assert_close(out, TF.normalize(x, dim=dim))
        g = torch.autograd.grad(out, x)[0]
        gt = torch.autograd.grad(TF.normalize(x, dim=dim), x)[0]
        torch.testing.assert_close(g, gt)


def test_mixed_dtype_weight(device):
    # float32 scale with bfloat16 activations: output in the input's dtype
    x = randn(2, 32, 3, 3, dtype=torch.bfloat16, device=device, requires_grad=True)
    w = randn(32, device=device, requires_grad=True)
    out = F.l2_norm(x, w)
    gx, gw = torch.autograd.grad(out, (x, w), torch.ones_like(out))
    assert out.dtype == torch.bfloat16 and gx.dtype == torch.bfloat16
    assert gw.dtype == torch.float32
    ref = R.l2_norm(x.detach().double(), w.detach().double())
    theirs = _torch_l2(x.detach(), w.detach().bfloat16(), 1, 1e-12)
    assert_close_to_ref(out, ref, torch.bfloat16, theirs)


# -------------------------------------------------------------- cosine_linear
COS_SHAPES = [
    ((4, 40), 7),
    ((2, 3, 33), 10),
    ((1, 3), 1),  # batch 1, one class
    ((17,), 5),  # 1-D input
    ((9, 512), 100),
]


def _torch_cos(x, w, b, eps):
    return TF.linear(TF.normalize(x, 2.0, -1, eps), TF.normalize(w, 2.0, 1, eps), b)


@pytest.mark.parametrize("xshape,out_f", COS_SHAPES, ids=[f"{s}-{o}" for s, o in COS_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cosine_linear_matches_reference(device, dtype, xshape, out_f, bias):
    x = randn(*xshape, dtype=dtype, device=device, requires_grad=True)
    w = randn(out_f, xshape[-1], dtype=dtype, device=device, requires_grad=True)
    b = randn(out_f, dtype=dtype, device=device, requires_grad=True) if bias else None
    go = randn(*xshape[:-1], out_f, dtype=dtype, device=device)
    ours = _run(lambda *a: F.cosine_linear(*a, 1e-8), (x, w, b), go, (x, w, b))
    l64 = [leaf(t, torch.float64) for t in (x, w, b)]
    ref = _run(lambda *a: R.cosine_linear(*a, 1e-8), l64, go.double(), l64)
    lt = [leaf(t) for t in (x, w, b)]
    theirs = _run(lambda *a: _torch_cos(*a, 1e-8), lt, go, lt)
    names = ("out", "grad_input", "grad_weight", "grad_bias")[: len(ours)]
    _compare(ours, ref, theirs, dtype, names)


@pytest.mark.parametrize("scale,wscale", [(16.0, 16.0), (1e-4, 1e-4), (1.0, 256.0)],
                         ids=["large", "tiny", "large-weight"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cosine_linear_magnitudes(device, dtype, scale, wscale):
    """Cosines are at most 1 whatever the magnitudes: raw dot products of
    512 features of 16 (131072) overflow float16, of 1e-4 they are
    subnormal, and dy / (|x| |w|) underflows with large weight rows; the
    result must still match the reference as closely as torch's
    normalize-then-linear does."""
    x = randn(6, 512, dtype=dtype, device=device, scale=scale / 4, shift=scale,
              requires_grad=True)
    w = randn(5, 512, dtype=dtype, device=device, scale=wscale / 4, shift=wscale,
              requires_grad=True)
    b = randn(5, dtype=dtype, device=device, requires_grad=True)
    go = randn(6, 5, dtype=dtype, device=device, scale=1e-3)
    ours = _run(lambda *a: F.cosine_linear(*a, 1e-12), (x, w, b), go, (x, w, b))
    l64 = [leaf(t, torch.float64) for t in (x, w, b)]
    ref = _run(lambda *a: R.cosine_linear(*a, 1e-12), l64, go.double(), l64)
    lt = [leaf(t) for t in (x, w, b)]
    theirs = _run(lambda *a: _torch_cos(*a, 1e-12), lt, go, lt)
    _compare(ours, ref, theirs, dtype, ("out", "grad_input", "grad_weight", "grad_bias"))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_cosine_linear_autocast_like_linear(device, compiled):
    """Under autocast torch's Linear hands CosineLinear a low-precision
    activation while its own weight stays float32: every operand is cast to
    the autocast dtype, as torch's linear does (the mix raised before).
    Output and the float32 weight's gradient are checked against the float64
    formula on the operands as cast."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 32).to(device)
    cos = torchfuse.nn.CosineLinear(32, 10, bias=True).to(device)
    with torch.no_grad():
        cos.bias.normal_()
    model = torch.nn.Sequential(lin, cos)
    if compiled:
        torch._dynamo.reset()
    run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
    dt = torch.bfloat16 if device == "cpu" else torch.float16
    x = randn(4, 16, device=device)
    go = randn(4, 10, device=device)
    with torch.autocast(device, dtype=dt):
        out = run(x)
        h = lin(x).detach()
        theirs = _torch_cos(h, cos.weight, cos.bias, cos.eps)
    assert h.dtype == dt and out.dtype == dt and theirs.dtype == dt
    (gw,) = torch.autograd.grad(out, cos.weight, go.to(dt))
    (gw_t,) = torch.autograd.grad(theirs, cos.weight, go.to(dt))
    assert gw.dtype == torch.float32
    ops64 = [leaf(t.to(dt), torch.float64) for t in (h, cos.weight, cos.bias)]
    ref = R.cosine_linear(*ops64, cos.eps)
    (gw64,) = torch.autograd.grad(ref, ops64[1], go.to(dt).double())
    assert_close_to_ref(out, ref, dt, theirs, name="out")
    assert_close_to_ref(gw, gw64, dt, gw_t, name="grad_weight")


def test_cosine_linear_zero_rows_and_sizes(device):
    x = randn(5, 12, device=device, requires_grad=True)
    w = randn(6, 12, device=device, requires_grad=True)
    b = randn(6, device=device)
    with torch.no_grad():
        x[2] = 0
        w[4] = 0
    out = F.cosine_linear(x, w, b)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out[2], b)
    torch.testing.assert_close(out[:, 4], b[4].expand(5))
    gx, gw = torch.autograd.grad(out, (x, w), torch.ones_like(out))
    x64, w64 = leaf(x, torch.float64), leaf(w, torch.float64)
    rx, rw = torch.autograd.grad(R.cosine_linear(x64, w64, b.double()), (x64, w64),
                                 torch.ones(5, 6, dtype=torch.float64, device=device))
    assert_close_to_ref(gx, rx, torch.float32, name="grad_input")
    assert_close_to_ref(gw, rw, torch.float32, name="grad_weight")
    for xs, ws in [((0, 8), (3, 8)), ((3, 0), (4, 0)), ((3, 8), (0, 8)), ((2, 0, 8), (3, 8))]:
        x = randn(*xs, device=device, requires_grad=True)
        w = randn(*ws, device=device, requires_grad=True)
        b = randn(ws[0], device=device, requires_grad=True)
        out = F.cosine_linear(x, w, b)
        expected = R.cosine_linear(x, w, b)
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected)
        grads = torch.autograd.grad(out.sum(), (x, w, b))
        for g, t in zip(grads, (x, w, b)):
            assert g.shape == t.shape


# ------------------------------------------------------------------- autograd
def test_gradcheck(device):
    kw = {"dtype": torch.float64, "device": device, "requires_grad": True}
    x = randn(2, 5, 3, **kw)
    w = randn(5, **kw)
    torch.autograd.gradcheck(lambda a, b: F.l2_norm(a, b, 1), (x, w))
    torch.autograd.gradcheck(lambda a, b: F.l2_norm(a.transpose(1, 2), b, 2), (x, w))
    torch.autograd.gradcheck(lambda a: F.normalize(a, dim=-1), (x,))
    torch.autograd.gradgradcheck(lambda a, b: F.l2_norm(a, b, 1), (x, w))
    torch.autograd.gradgradcheck(lambda a, b: F.l2_norm(a.transpose(1, 2), b, 2), (x, w))
    xc, wc, bc = randn(3, 6, **kw), randn(4, 6, **kw), randn(4, **kw)
    torch.autograd.gradcheck(lambda *a: F.cosine_linear(*a), (xc, wc, bc))
    torch.autograd.gradgradcheck(lambda *a: F.cosine_linear(*a), (xc, wc, bc))
    torch.autograd.gradgradcheck(lambda a, b: F.cosine_linear(a, b), (xc, wc))


def test_double_backward_matches_reference(device):
    x = randn(3, 8, 5, device=device, requires_grad=True)
    w = randn(8, device=device, requires_grad=True)
    l64 = [leaf(t, torch.float64) for t in (x, w)]
    ours = second_order(lambda a, b: F.l2_norm(a, b, 1), x, w)
    ref = second_order(lambda a, b: R.l2_norm(a, b, 1), *l64)
    for o, r, name in zip(ours, ref, ("ggx", "ggw")):
        assert_close_to_ref(o, r, torch.float32, name=name)
    xc, wc, bc = (randn(*s, device=device, requires_grad=True) for s in ((4, 9), (6, 9), (6,)))
    l64 = [leaf(t, torch.float64) for t in (xc, wc, bc)]
    ours = second_order(F.cosine_linear, xc, wc, bc)
    ref = second_order(R.cosine_linear, *l64)
    for o, r, name in zip(ours, ref, ("ggx", "ggw", "ggb")):
        assert_close_to_ref(o, r, torch.float32, name=name)


# ------------------------------------------------------- direct entry (_C)
_DIRECT_L2 = torchfuse._ops.DIRECT.get("l2_norm")
needs_direct = pytest.mark.skipif(_DIRECT_L2 is None, reason="extension without direct entries")


@needs_direct
@pytest.mark.parametrize("which", ["all", "x", "w", "x-noweight", "normalize"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_direct_entry_matches_python_path(device, which, layout, monkeypatch):
    """The direct entry (C++ autograd node) gives exactly what the op through
    the Python autograd Function gives, forward, gradients and second order
    (through the differentiable Python formula)."""
    import torchfuse.functional as functional

    x = randn(2, 8, 5, 3, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, g = randn(8, device=device), randn(2, 8, 5, 3, device=device)
    need = {"all": (1, 1), "x": (1, 0), "w": (0, 1), "x-noweight": (1, 0),
            "normalize": (1, 0)}[which]
    if which in ("x-noweight", "normalize"):
        w = None

    def run():
        xl = x.detach().clone().requires_grad_(bool(need[0]))
        wl = w.detach().clone().requires_grad_(bool(need[1])) if w is not None else None
        out = (F.normalize(xl, dim=1) if which == "normalize" else F.l2_norm(xl, wl, 1, 1e-12))
        return out, [t for t in (xl, wl) if t is not None and t.requires_grad], g

    direct_vs_python_path(
        run, "L2NormFn", lambda: monkeypatch.setattr(functional, "_direct_l2_norm", None))


@needs_direct
def test_direct_entry_declines_the_rest(device):
    x = randn(2, 8, 5, device=device)
    w = randn(8, device=device)

    class Sub(torch.Tensor):
        pass

    declined = [
        (x, w, 1.0, 1e-12),
        (x, w, True, 1e-12),
        (x, w, 1, "1e-12"),
        (x, w, 1, torch.tensor(1e-12)),
        (x, "w", 1, 1e-12),
        (x.as_subclass(Sub), w, 1, 1e-12),
        (x.to(torch.int64), None, 1, 1e-12),
        (x.to("meta"), None, 1, 1e-12),
        (x, w, 1),
    ]
    for i, args in enumerate(declined):
        assert _DIRECT_L2(*args) is None, i
    # the op's own checks on the plain case: the usual errors
    with pytest.raises(IndexError):
        _DIRECT_L2(x, None, 5, 1e-12)
    with pytest.raises(RuntimeError, match="weight"):
        _DIRECT_L2(x, randn(3, device=device), 1, 1e-12)
    assert torch.equal(_DIRECT_L2(x, w, -2, 0), F.l2_norm(x, w, 1, 0.0))  # int eps


def _opcheck_samples(device):
    ops = torch.ops.torchfuse
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        kw = {"dtype": dtype, "device": device}
        for affine in (True, False):
            for shape, dim in (((2, 6, 5), 1), ((3, 7), -1)):
                x = randn(*shape, **kw, requires_grad=True)
                w = randn(shape[dim], **kw, requires_grad=True) if affine else None
                yield ops.l2_norm.default, (x, w, dim, 1e-12)
                _, norm = ops.l2_norm(x.detach(), w, dim, 1e-12)
                go = randn(*shape, **kw)
                yield ops.l2_norm_backward.default, (go, x.detach(), norm, w, dim, 1e-12, affine)
        x = randn(2, 6, 4, 3, **kw).to(memory_format=torch.channels_last)
        yield ops.l2_norm.default, (x, None, 1, 1e-12)
        for bias in (True, False):
            x = randn(3, 2, 8, **kw, requires_grad=True)
            w = randn(5, 8, **kw, requires_grad=True)
            b = randn(5, **kw, requires_grad=True) if bias else None
            yield ops.cosine_linear.default, (x, w, b, 1e-8)
            _, nx, nw = ops.cosine_linear(x.detach(), w.detach(), b, 1e-8)
            go = randn(3, 2, 5, **kw)
            yield ops.cosine_linear_backward.default, (go, x.detach(), w.detach(), nx, nw, 1e-8,
                                                       bias)


def test_opcheck(device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)


def test_compile_fullgraph(device):
    torch._dynamo.reset()

    def block(x, w, cw, cb):
        h = F.l2_norm(x, w, 1)
        e = F.normalize(h.flatten(1), dim=-1)
        return F.cosine_linear(e, cw, cb).sum()

    x = randn(2, 8, 3, 3, device=device, requires_grad=True)
    w = randn(8, device=device, requires_grad=True)
    cw = randn(5, 72, device=device, requires_grad=True)
    cb = randn(5, device=device, requires_grad=True)
    args = (x, w, cw, cb)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, args)
    loss_e = block(*args)
    grads_e = torch.autograd.grad(loss_e, args)
    torch.testing.assert_close(loss, loss_e)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ bad input
def _l2_bad(device):
    x = randn(2, 3, 4, device=device)
    w = randn(3, device=device)
    return [
        ("weight", lambda f: f(x, randn(4, device=device), 1), RuntimeError),
        ("weight", lambda f: f(x, randn(3, 1, device=device), 1), RuntimeError),
        ("weight", lambda f: f(x, "w", 1), TypeError),
        ("dim", lambda f: f(x, w, 3), IndexError),
        ("dim", lambda f: f(x, w, -4), IndexError),
        ("dim", lambda f: f(x, w, 1.0), TypeError),
        ("input", lambda f: f("x", w, 1), TypeError),
        ("input", lambda f: f(x.to(torch.int32), w, 1), RuntimeError),
        ("eps", lambda f: f(x, w, 1, "eps"), TypeError),
    ]


@pytest.mark.parametrize("case", range(9))
def test_l2_norm_bad_input(device, case):
    arg, call, exc = _l2_bad(device)[case]
    with pytest.raises(exc, match=arg):
        call(F.l2_norm)


@pytest.mark.parametrize("case", range(3))
def test_normalize_bad_input_like_torch(device, case):
    x = randn(2, 3, device=device)
    calls = [
        ("dim", lambda f: f(x, 2.0, 2)),
        ("dim", lambda f: f(randn(5, device=device))),  # default dim=1 on 1-D input
        ("input", lambda f: f(x.to(torch.int64))),
    ]
    arg, call = calls[case]
    assert_raises_like_torch(lambda: call(TF.normalize), lambda: call(F.normalize), arg)


@pytest.mark.parametrize("case", range(6))
def test_cosine_linear_bad_input_like_torch(device, case):
    x = randn(4, 6, device=device)
    w = randn(5, 6, device=device)
    calls = [
        ("weight", lambda f: f(x, randn(5, 7, device=device))),
        ("weight", lambda f: f(x, w.double())),
        ("bias", lambda f: f(x, w, randn(4, device=device))),
        ("bias", lambda f: f(x, w, w[0].double()[:5])),
        ("input", lambda f: f(randn((), device=device), w)),
        ("input", lambda f: f("x", w)),
    ]
    arg, call = calls[case]
    assert_raises_like_torch(lambda: call(TF.linear), lambda: call(F.cosine_linear), arg)


def test_cosine_linear_rejects_1d_weight(device):
    # F.linear accepts a 1-D weight (a matrix-vector product); cosine_linear
    # needs (out_features, in_features).
    with pytest.raises(RuntimeError, match="weight"):
        F.cosine_linear(randn(4, 6, device=device), randn(6, device=device))


def test_backward_ops_bad_input(device):
    x = randn(2, 3, 4, device=device)
    ops = torch.ops.torchfuse
    out, norm = ops.l2_norm(x, None, 1, 1e-12)
    with pytest.raises(RuntimeError, match="norm"):
        ops.l2_norm_backward(out, x, norm.double(), None, 1, 1e-12, False)
    with pytest.raises(RuntimeError, match="norm"):
        ops.l2_norm_backward(out, x, norm[:1], None, 1, 1e-12, False)
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.l2_norm_backward(out[:1], x, norm, None, 1, 1e-12, False)
    with pytest.raises(RuntimeError, match="weight"):
        ops.l2_norm_backward(out, x, norm, None, 1, 1e-12, True)
    w = randn(5, 4, device=device)
    y, nx, nw = ops.cosine_linear(x, w, None, 1e-8)
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.cosine_linear_backward(y[:1], x, w, nx, nw, 1e-8, False)
    with pytest.raises(RuntimeError, match="weight_norm"):
        ops.cosine_linear_backward(y, x, w, nx, nw[:2], 1e-8, False)
    with pytest.raises(RuntimeError, match="input_norm"):
        ops.cosine_linear_backward(y, x, w, nx.double(), nw, 1e-8, False)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
def test_bad_device():
    x = randn(2, 3, device="cuda")
    with pytest.raises(RuntimeError, match="weight"):
        F.l2_norm(x, randn(3))
    with pytest.raises(RuntimeError, match="weight"):
        F.cosine_linear(x, randn(4, 3))


# -------------------------------------------------------------------- modules
def test_l2norm_module(device):
    m = torchfuse.nn.L2Norm(16, device=device)
    assert isinstance(m, torch.nn.Module)
    assert list(m.state_dict()) == ["weight"]
    assert torch.equal(m.weight.detach(), torch.full((16,), 20.0, device=device))
    assert m.extra_repr() == "16, scale=20.0, eps=1e-12"
    m2 = torchfuse.nn.L2Norm(16, scale=10.0, eps=1e-6, device=device, dtype=torch.bfloat16)
    assert m2.weight.dtype == torch.bfloat16 and torch.all(m2.weight == 10)
    x = randn(2, 16, 3, 3, device=device)
    torch.testing.assert_close(m(x), 20 * TF.normalize(x), rtol=2e-6, atol=1e-5)
    g = torch.autograd.grad(m(x).sum(), m.weight)[0]
    torch.testing.assert_close(g, TF.normalize(x).sum((0, 2, 3)), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_cosine_linear_module(device, bias):
    m = torchfuse.nn.CosineLinear(12, 7, bias=bias, device=device)
    keys = ["weight", "bias"] if bias else ["weight"]
    assert list(m.state_dict()) == keys
    assert m.weight.shape == (7, 12) and (m.bias is not None) == bias
    assert m.extra_repr() == f"in_features=12, out_features=7, bias={bias}, eps=1e-08"
    x = randn(3, 12, device=device)
    torch.testing.assert_close(m(x), _torch_cos(x, m.weight, m.bias, 1e-8), rtol=2e-5, atol=1e-6)
    m16 = torchfuse.nn.CosineLinear(12, 7, device=device, dtype=torch.float16)
    assert m16.weight.dtype == torch.float16


# -------------------------------------------------------------------- convert
def test_convert_ssd_vgg():
    ssd = pytest.importorskip("torchvision.models.detection.ssd")
    from torchvision.models.detection import ssd300_vgg16

    # torchvision's SSD300 model structure, no weights.
    model = ssd300_vgg16(weights=None, weights_backbone=None).eval()
    backbone = model.backbone
    assert type(backbone) is ssd.SSDFeatureExtractorVGG
    with torch.no_grad():
        backbone.scale_weight.uniform_(10, 30)
    converted = torchfuse.convert(backbone)
    assert type(backbone) is ssd.SSDFeatureExtractorVGG, "inplace=False must not touch the input"
    assert isinstance(converted, ssd.SSDFeatureExtractorVGG)
    assert type(converted) is not ssd.SSDFeatureExtractorVGG
    assert list(converted.state_dict()) == list(backbone.state_dict())
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, converted.state_dict()[k])
    # The smallest image the SSD300 extra blocks accept (268 x 268).
    x = randn(1, 3, 268, 268)
    with torch.no_grad():
        ours, theirs = converted(x), backbone(x)
    assert list(ours) == list(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=2e-5, atol=1e-4)
    # The scale gradient, through the same l2_norm the converted forward calls.
    feats = randn(2, 512, 5, 5, requires_grad=True)
    go = randn(2, 512, 5, 5)
    ours = F.l2_norm(feats, converted.scale_weight, 1, 1e-12)
    expected = backbone.scale_weight.view(1, -1, 1, 1) * TF.normalize(feats)
    g1 = torch.autograd.grad(ours, (feats, converted.scale_weight), go)
    g2 = torch.autograd.grad(expected, (feats, backbone.scale_weight), go)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-4)
    # in place: the same parameter object; the whole SSD model converts too
    weight = backbone.scale_weight
    same = torchfuse.convert(model, inplace=True)
    assert same is model and type(model.backbone) is not ssd.SSDFeatureExtractorVGG
    assert model.backbone.scale_weight is weight


# ---------------------------------------------------------------- determinism
@pytest.mark.parametrize("shape,dim", [((9, 48, 7, 5), 1), ((513, 96), 1)], ids=["col", "row"])
def test_weight_grad_deterministic(device, shape, dim):
    x = randn(*shape, device=device)
    w = randn(shape[dim], device=device, requires_grad=True)
    go = randn(*shape, device=device)

    def grad():
        return torch.autograd.grad(F.l2_norm(x, w, dim), w, go)[0]

    first = grad()
    assert torch.equal(first, grad())
    if device == "cpu":
        n = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(first, grad())
        finally:
            torch.set_num_threads(n)


# ----------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
def test_cuda_graph_capture():
    x = randn(2, 512, 38, 38, device="cuda", dtype=torch.bfloat16)
    w = randn(512, device="cuda")
    cx, cw = randn(16, 64, device="cuda"), randn(30, 64, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        F.l2_norm(x, w)
        F.cosine_linear(cx, cw)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = F.l2_norm(x, w)
        cout = F.cosine_linear(cx, cw)
    x.copy_(randn(2, 512, 38, 38, device="cuda", dtype=torch.bfloat16))
    cx.copy_(randn(16, 64, device="cuda"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, F.l2_norm(x, w))
    assert torch.equal(cout, F.cosine_linear(cx, cw))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
def test_cuda_misaligned():
    base = randn(4 * 768 + 1, device="cuda", dtype=torch.bfloat16)
    x = base[1:].view(4, 768)  # 2-byte offset: no 16-byte vector access
    out = F.normalize(x, dim=-1)
    expected = R.normalize(x.double(), dim=-1)
    assert_close_to_ref(out, expected, torch.bfloat16, TF.normalize(x, dim=-1))


def test_compile_inductor_dynamic(device):
    torch._dynamo.reset()
    m = torchfuse.nn.L2Norm(24).to(device)
    compiled = torch.compile(m, fullgraph=True, dynamic=True)
    for n in (1, 3):
        x = randn(n, 24, 5, 4, device=device).to(memory_format=torch.channels_last)
        torch.testing.assert_close(compiled(x), m(x))
