"""RMSNorm and add_rms_norm: forward and every gradient against the float64
reference, eps semantics, gradcheck/gradgradcheck, opcheck, torch.compile,
bad inputs, the module, convert(), determinism, CUDA graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import torchfuse
from torchfuse import functional as F
from torchfuse import reference as R

from conftest import DTYPES, HAS_CUDA, assert_close_to_ref, assert_raises_like_torch, leaf, randn

# (input shape, normalized_shape): edge cases of the kernels' tiling.
SHAPES = [
    ((1, 1), (1,)),  # one element
    ((5,), (5,)),  # no leading dims
    ((3, 7), (7,)),  # not a multiple of the vector width
    ((2, 5, 64), (64,)),
    ((4, 33, 17), (33, 17)),  # multi-dim normalized_shape
    ((1, 4096), (4096,)),  # batch 1, LLM hidden size
    ((37, 1000), (1000,)),
    ((3, 20000), (20000,)),  # longer than the CUDA register-resident path
    ((1000, 64), (64,)),  # many short rows: several rows per CUDA block
]


def _grads(out, inputs, grad_out):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, grad_out)


def _run_rms(fn, x, ns, w, eps, go):
    out = fn(x, ns, w, eps)
    return (out, *_grads(out, [x, w], go))


def _run_add(fn, x, r, ns, w, eps, go, gs):
    out, summed = fn(x, r, ns, w, eps)
    grads = torch.autograd.grad((out, summed), [t for t in (x, r, w) if t is not None], (go, gs))
    return (out, summed, *grads)


def _torch_add_rms_norm(x, r, ns, w, eps):
    s = x + r
    return TF.rms_norm(s, ns, w, eps), s


NAMES_RMS = ("out", "grad_input", "grad_weight")
NAMES_ADD = ("out", "summed", "grad_input", "grad_residual", "grad_weight")


def _compare(ours, ref, theirs, dtype, names):
    for o, r, t, name in zip(ours, ref, theirs, names):
        assert_close_to_ref(o, r, dtype, t, name=name)


@pytest.mark.parametrize("shape,ns", SHAPES, ids=[f"{s}-{n}" for s, n in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["weight", "noweight"])
def test_rms_norm_matches_reference(device, dtype, shape, ns, affine):
    x = randn(*shape, dtype=dtype, device=device, requires_grad=True)
    w = randn(*ns, dtype=dtype, device=device, requires_grad=True) if affine else None
    go = randn(*shape, dtype=dtype, device=device)
    eps = torch.finfo(dtype).eps
    ours = _run_rms(F.rms_norm, x, ns, w, None, go)
    ref = _run_rms(R.rms_norm, leaf(x, torch.float64), ns, leaf(w, torch.float64), eps,
                   go.double())
    theirs = _run_rms(TF.rms_norm, leaf(x), ns, leaf(w), None, go)
    for o, t in zip(ours, theirs):
        assert o.dtype == t.dtype and o.shape == t.shape
    _compare(ours, ref, theirs, dtype, NAMES_RMS)


@pytest.mark.parametrize("shape,ns", SHAPES, ids=[f"{s}-{n}" for s, n in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["weight", "noweight"])
def test_add_rms_norm_matches_reference(device, dtype, shape, ns, affine):
    x = randn(*shape, dtype=dtype, device=device, requires_grad=True)
    r = randn(*shape, dtype=dtype, device=device, requires_grad=True)
    w = randn(*ns, dtype=dtype, device=device, requires_grad=True) if affine else None
    go = randn(*shape, dtype=dtype, device=device)
    gs = randn(*shape, dtype=dtype, device=device)
    eps = torch.finfo(dtype).eps
    ours = _run_add(F.add_rms_norm, x, r, ns, w, None, go, gs)
    # The reference normalises the sum as rounded to `dtype`, as the contract says.
    summed = (x.detach() + r.detach()).double()
    x64, r64 = leaf(x, torch.float64), leaf(r, torch.float64)
    ref_out, ref_sum = R.add_rms_norm(x64, r64, ns, leaf(w, torch.float64), eps)
    ref_out = R.rms_norm(summed + (ref_sum - ref_sum.detach()), ns,
                         None if w is None else w.detach().double(), eps)
    if w is not None:  # weight gradient through the rounded sum
        w64 = leaf(w, torch.float64)
        ref_out = R.rms_norm(summed + (ref_sum - ref_sum.detach()), ns, w64, eps)
        ref_grads = torch.autograd.grad((ref_out, ref_sum), (x64, r64, w64),
                                        (go.double(), gs.double()))
    else:
        ref_grads = torch.autograd.grad((ref_out, ref_sum), (x64, r64), (go.double(), gs.double()))
    ref = (ref_out, summed, *ref_grads)
    theirs = _run_add(_torch_add_rms_norm, leaf(x), leaf(r), ns, leaf(w), None, go, gs)
    _compare(ours, ref, theirs, dtype, NAMES_ADD)
    # summed is exactly input + residual in the input dtype
    torch.testing.assert_close(ours[1], x.detach() + r.detach(), rtol=0, atol=0)


def test_huge_row(device):
    # Rows over a million elements, batch 1 and 2.
    for rows in (1, 2):
        n = 1_048_583
        x = randn(rows, n, device=device, requires_grad=True)
        w = randn(n, device=device, requires_grad=True)
        go = randn(rows, n, device=device)
        ours = _run_rms(F.rms_norm, x, (n,), w, 1e-6, go)
        ref = _run_rms(R.rms_norm, leaf(x, torch.float64), (n,), leaf(w, torch.float64), 1e-6,
                       go.double())
        _compare(ours, ref, [None] * 3, torch.float32, NAMES_RMS)


@pytest.mark.parametrize("layout", ["strided", "transposed", "channels_last", "expanded"])
def test_non_contiguous(device, layout):
    if layout == "strided":
        x = randn(6, 40, device=device)[:, ::2]
    elif layout == "transposed":
        x = randn(24, 6, device=device).t()
    elif layout == "channels_last":
        x = randn(2, 8, 5, 24, device=device).to(memory_format=torch.channels_last)
    else:
        x = randn(1, 24, device=device).expand(5, 24)
    assert not x.is_contiguous()
    x.requires_grad_()
    ns = (x.shape[-1],)
    w = randn(*ns, device=device, requires_grad=True)
    go = randn(*x.shape, device=device).transpose(0, -1).contiguous().transpose(0, -1)
    ours = _run_rms(F.rms_norm, x, ns, w, 1e-5, go)
    ref = _run_rms(R.rms_norm, leaf(x, torch.float64), ns, leaf(w, torch.float64), 1e-5,
                   go.double())
    _compare(ours, ref, [None] * 3, torch.float32, NAMES_RMS)


@pytest.mark.parametrize("shape,ns", [((0, 8), (8,)), ((2, 0), (0,)), ((3, 0, 4), (4,))])
def test_zero_size(device, shape, ns):
    x = randn(*shape, device=device, requires_grad=True)
    w = randn(*ns, device=device, requires_grad=True)
    out = F.rms_norm(x, ns, w)
    expected = TF.rms_norm(x, ns, w)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    gx, gw = torch.autograd.grad(out.sum(), (x, w))
    assert gx.shape == x.shape and gw.shape == w.shape
    assert torch.all(gw == 0)
    out2, summed = F.add_rms_norm(x, x, ns, w)
    assert out2.shape == x.shape and summed.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_mixed_dtype_weight(device, dtype):
    # Under autocast the weight often stays float32 while activations are not.
    x = randn(8, 96, dtype=dtype, device=device, requires_grad=True)
    w = randn(96, device=device, requires_grad=True)
    go = randn(8, 96, dtype=dtype, device=device)
    ours = _run_rms(F.rms_norm, x, (96,), w, None, go)
    assert ours[0].dtype == dtype and ours[2].dtype == torch.float32
    ref = _run_rms(R.rms_norm, leaf(x, torch.float64), (96,), leaf(w, torch.float64),
                   torch.finfo(dtype).eps, go.double())
    theirs = _run_rms(TF.rms_norm, leaf(x), (96,), leaf(w), None, go)
    _compare(ours, ref, theirs, dtype, NAMES_RMS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_float32_weight_at_16_byte_offset(device, dtype):
    # A float32 weight 16 bytes (not 32) into its storage with half-precision
    # activations: the CUDA kernels' vector width needs the weight aligned to
    # 32 bytes, so every tensor falls back to scalar access (with the weight
    # gradient's per-block fold); the CPU result is the same formula.
    base = randn(512 + 4, device=device)
    w = base[4:].detach().requires_grad_()
    assert w.storage_offset() == 4
    x = randn(300, 512, dtype=dtype, device=device, requires_grad=True)
    go = randn(300, 512, dtype=dtype, device=device)
    ours = _run_rms(F.rms_norm, x, (512,), w, 1e-6, go)
    ref = _run_rms(R.rms_norm, leaf(x, torch.float64), (512,), leaf(w, torch.float64),
                   1e-6, go.double())
    theirs = _run_rms(TF.rms_norm, leaf(x), (512,), leaf(w), 1e-6, go)
    _compare(ours, ref, theirs, dtype, NAMES_RMS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_statistics_in_float32(device, dtype):
    # x**2 overflows float16 (max 65504) at |x| = 300; float32 statistics do not.
    x = randn(4, 256, dtype=dtype, device=device, scale=300.0)
    out = F.rms_norm(x, (256,))
    ref = R.rms_norm(x.double(), (256,), eps=torch.finfo(dtype).eps)
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * torch.finfo(dtype).eps * ref.abs().max().item()


def test_bfloat16_subnormal_and_nan_outputs_are_stored_exactly(device):
    """Ones normalize to ones (eps 0), so y = weight exactly: subnormal
    outputs keep their bits (the CPU's one-instruction float -> bfloat16
    conversion on AVX512_BF16 flushes them to zero, cpu_vec.h), NaN stays
    NaN, in full vectors and in the tail."""
    w = torch.tensor([1e-39, -3e-39, 5e-40, 1.0, -2.0, 1e-38, 7e-45, -0.0] * 9 + [1e-39, 3.0],
                     dtype=torch.bfloat16, device=device)
    x = torch.ones(3, w.numel(), dtype=torch.bfloat16, device=device)
    y = F.rms_norm(x, (w.numel(),), w, 0.0)
    assert (w[:3] != 0).all() and torch.equal(y, w.expand_as(y))
    w[5] = float("nan")
    y = F.rms_norm(x, (w.numel(),), w, 0.0)
    assert y[:, 5].isnan().all() and torch.equal(y[:, 6:], w[6:].expand(3, -1))


def test_eps_semantics(device):
    for dtype in DTYPES:
        x = randn(4, 32, dtype=dtype, device=device)
        # None means torch.finfo(input.dtype).eps, exactly
        assert torch.equal(F.rms_norm(x, (32,)), F.rms_norm(x, (32,), eps=torch.finfo(dtype).eps))
    x = randn(4, 32, device=device, scale=0.01)
    # a large eps dominates the statistic
    assert_close_to_ref(F.rms_norm(x, (32,), eps=10.0), R.rms_norm(x.double(), (32,), eps=10.0),
                        torch.float32)
    # a negative eps is allowed, as in torch: NaN where mean(x^2) + eps < 0
    ours, theirs = F.rms_norm(x, (32,), eps=-1.0), TF.rms_norm(x, (32,), eps=-1.0)
    assert torch.isnan(ours).all() and torch.isnan(theirs).all()
    x = randn(4, 32, device=device, scale=10.0)
    ours, theirs = F.rms_norm(x, (32,), eps=-1e-3), TF.rms_norm(x, (32,), eps=-1e-3)
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-6)


def test_gradcheck(device):
    x = randn(3, 2, 9, dtype=torch.float64, device=device, requires_grad=True)
    r = randn(3, 2, 9, dtype=torch.float64, device=device, requires_grad=True)
    w = randn(2, 9, dtype=torch.float64, device=device, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: F.rms_norm(a, (2, 9), b, 1e-6), (x, w))
    torch.autograd.gradcheck(lambda a: F.rms_norm(a, (9,), None, 1e-6), (x,))
    torch.autograd.gradcheck(lambda a, b, c: F.add_rms_norm(a, b, (2, 9), c, 1e-6), (x, r, w))
    torch.autograd.gradgradcheck(lambda a, b: F.rms_norm(a, (2, 9), b, 1e-6), (x, w))
    torch.autograd.gradgradcheck(lambda a, b, c: F.add_rms_norm(a, b, (2, 9), c, 1e-6), (x, r, w))


def test_double_backward_matches_reference(device):
    x = randn(5, 16, device=device, requires_grad=True)
    w = randn(16, device=device, requires_grad=True)

    def second(fn, x, w):
        out = fn(x, (16,), w, 1e-6)
        gx, gw = torch.autograd.grad(out.pow(2).sum(), (x, w), create_graph=True)
        return torch.autograd.grad(gx.sin().sum() + gw.cos().sum(), (x, w))

    ours = second(F.rms_norm, x, w)
    ref = second(R.rms_norm, leaf(x, torch.float64), leaf(w, torch.float64))
    for o, r, name in zip(ours, ref, ("ggx", "ggw")):
        assert_close_to_ref(o, r, torch.float32, name=name)


def _opcheck_samples(device):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for affine in (True, False):
            x = randn(4, 3, 10, dtype=dtype, device=device, requires_grad=True)
            r = randn(4, 3, 10, dtype=dtype, device=device, requires_grad=True)
            w = randn(10, dtype=dtype, device=device, requires_grad=True) if affine else None
            yield torch.ops.torchfuse.rms_norm.default, (x, [10], w, 1e-5)
            yield torch.ops.torchfuse.add_rms_norm.default, (x, r, [10], w, 1e-5)
            _, rstd = torch.ops.torchfuse.rms_norm(x.detach(), [10], w, 1e-5)
            go = randn(4, 3, 10, dtype=dtype, device=device)
            yield torch.ops.torchfuse.rms_norm_backward.default, (
                go, None, x.detach(), rstd, [10], w, affine)
            yield torch.ops.torchfuse.rms_norm_backward.default, (
                go, go, x.detach(), rstd, [10], w, False)


def test_opcheck(device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)


def test_compile_fullgraph(device):
    torch._dynamo.reset()

    def block(x, r, w1, w2):
        h = F.rms_norm(x, (64,), w1)
        out, summed = F.add_rms_norm(h, r, (64,), w2, 1e-6)
        return out.sum() + summed.sum()

    args = [randn(3, 5, 64, device=device, requires_grad=True) for _ in range(2)]
    ws = [randn(64, device=device, requires_grad=True) for _ in range(2)]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    loss = compiled(*args, *ws)
    grads = torch.autograd.grad(loss, [*args, *ws])
    loss_e = block(*args, *ws)
    grads_e = torch.autograd.grad(loss_e, [*args, *ws])
    torch.testing.assert_close(loss, loss_e)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)


def test_compile_inductor_dynamic(device):
    torch._dynamo.reset()
    m = torchfuse.nn.RMSNorm(48).to(device)
    compiled = torch.compile(m, fullgraph=True, dynamic=True)
    for rows in (3, 7):
        x = randn(rows, 48, device=device)
        torch.testing.assert_close(compiled(x), m(x))


# ------------------------------------------------------------------ bad input
def _bad_cases(device):
    x = randn(2, 3, device=device)
    w = randn(3, device=device)
    return [
        ("normalized_shape", lambda f: f(x, [4])),
        ("normalized_shape", lambda f: f(x, [])),
        ("normalized_shape", lambda f: f(x, [2, 2, 3])),
        ("normalized_shape", lambda f: f(x, 3)),
        ("weight", lambda f: f(x, [3], randn(4, device=device))),
        ("weight", lambda f: f(x, [3], "w")),
        ("input", lambda f: f("x", [3])),
        ("input", lambda f: f(x.to(torch.int32), [3])),
        ("input", lambda f: f(x.to(torch.int32), [3], w)),
        ("eps", lambda f: f(x, [3], w, "eps")),
    ]


@pytest.mark.parametrize("case", range(10))
def test_bad_input_like_torch(device, case):
    arg, call = _bad_cases(device)[case]
    assert_raises_like_torch(lambda: call(TF.rms_norm), lambda: call(F.rms_norm), arg)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
def test_bad_device_weight():
    x = randn(2, 3, device="cuda")
    with pytest.raises(RuntimeError, match="weight"):
        F.rms_norm(x, [3], randn(3))


def test_add_rms_norm_bad_input(device):
    x = randn(2, 3, device=device)
    with pytest.raises(RuntimeError, match="residual"):
        F.add_rms_norm(x, randn(2, 4, device=device), [3])
    with pytest.raises(RuntimeError, match="residual"):
        F.add_rms_norm(x, randn(2, 3, device=device, dtype=torch.float64), [3])
    with pytest.raises(TypeError, match="residual"):
        F.add_rms_norm(x, None, [3])
    with pytest.raises(RuntimeError, match="normalized_shape"):
        F.add_rms_norm(x, x, [4])


def test_backward_op_bad_input(device):
    x = randn(2, 3, device=device)
    out, rstd = torch.ops.torchfuse.rms_norm(x, [3], None, 1e-5)
    bwd = torch.ops.torchfuse.rms_norm_backward
    with pytest.raises(RuntimeError, match="rstd"):
        bwd(out, None, x, rstd.double(), [3], None, False)
    with pytest.raises(RuntimeError, match="rstd"):
        bwd(out, None, x, rstd[:1], [3], None, False)
    with pytest.raises(RuntimeError, match="grad_out"):
        bwd(out[:1], None, x, rstd, [3], None, False)
    with pytest.raises(RuntimeError, match="grad_summed"):
        bwd(out, out[:, :2], x, rstd, [3], None, False)
    with pytest.raises(RuntimeError, match="weight"):
        bwd(out, None, x, rstd, [3], None, True)


# --------------------------------------------------------------------- module
@pytest.mark.parametrize("affine", [True, False])
def test_module_is_drop_in(device, affine):
    ref = torch.nn.RMSNorm((4, 16), eps=1e-6, elementwise_affine=affine, device=device)
    if affine:
        with torch.no_grad():
            ref.weight.copy_(randn(4, 16))
    ours = torchfuse.nn.RMSNorm((4, 16), eps=1e-6, elementwise_affine=affine, device=device)
    ours.load_state_dict(ref.state_dict())
    assert isinstance(ours, torch.nn.RMSNorm)
    assert ours.extra_repr() == ref.extra_repr()
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = randn(3, 4, 16, device=device)
    torch.testing.assert_close(ours(x), ref(x), rtol=2e-5, atol=1e-6)


def test_module_eps_none_and_dtype(device):
    m = torchfuse.nn.RMSNorm(32, device=device, dtype=torch.bfloat16)
    x = randn(2, 32, device=device, dtype=torch.bfloat16)
    assert m.weight.dtype == torch.bfloat16
    assert torch.equal(m(x), F.rms_norm(x, (32,), m.weight, torch.finfo(torch.bfloat16).eps))


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.norm = torch.nn.RMSNorm(16)
        self.inner = torch.nn.Sequential(torch.nn.RMSNorm(16, eps=1e-3), torch.nn.ReLU())

    def forward(self, x):
        return self.inner(self.norm(self.proj(x)))


class _MyRMSNorm(torch.nn.RMSNorm):
    def forward(self, x):
        return super().forward(x) * 2


def test_convert(device):
    model = _Block().to(device)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    converted = torchfuse.convert(model)
    assert type(model.norm) is torch.nn.RMSNorm, "inplace=False must not touch the input"
    assert type(converted.norm) is torchfuse.nn.RMSNorm
    assert type(converted.inner[0]) is torchfuse.nn.RMSNorm
    assert list(converted.state_dict()) == list(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, converted.state_dict()[k])
    x = randn(4, 16, device=device)
    torch.testing.assert_close(converted(x), model(x), rtol=2e-5, atol=1e-6)
    g1 = torch.autograd.grad(converted(x).sum(), converted.norm.weight)
    g2 = torch.autograd.grad(model(x).sum(), model.norm.weight)
    torch.testing.assert_close(g1, g2, rtol=2e-5, atol=1e-5)
    # in place: same object, parameters shared with the replaced module
    weight = model.norm.weight
    same = torchfuse.convert(model, inplace=True)
    assert same is model and type(model.norm) is torchfuse.nn.RMSNorm
    assert model.norm.weight is weight
    # subclasses (which may override forward) and a bare module
    sub = torch.nn.Sequential(_MyRMSNorm(16))
    assert type(torchfuse.convert(sub)[0]) is _MyRMSNorm
    assert type(torchfuse.convert(torch.nn.RMSNorm(8))) is torchfuse.nn.RMSNorm
    with pytest.raises(TypeError, match="module"):
        torchfuse.convert("model")


# ---------------------------------------------------------------- determinism
def test_weight_grad_deterministic(device):
    x = randn(513, 384, device=device)
    w = randn(384, device=device, requires_grad=True)
    go = randn(513, 384, device=device)

    def grad():
        return torch.autograd.grad(F.rms_norm(x, (384,), w), w, go)[0]

    first = grad()
    assert torch.equal(first, grad())
    if device == "cpu":  # independent of the thread count too
        n = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(first, grad())
        finally:
            torch.set_num_threads(n)


# ------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
def test_cuda_graph_capture():
    x = randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    r = randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    w = randn(1024, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as capture requires
        F.add_rms_norm(x, r, (1024,), w)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, summed = F.add_rms_norm(x, r, (1024,), w)
    x.copy_(randn(64, 1024, device="cuda", dtype=torch.bfloat16))
    g.replay()
    torch.cuda.synchronize()
    ref_out, ref_sum = F.add_rms_norm(x, r, (1024,), w)
    assert torch.equal(out, ref_out) and torch.equal(summed, ref_sum)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
def test_cuda_misaligned_and_side_stream():
    base = randn(4 * 4096 + 1, device="cuda", dtype=torch.bfloat16)
    x = base[1:].view(4, 4096)  # 2-byte offset: no 16-byte vector access
    w = randn(4096, device="cuda", dtype=torch.bfloat16)
    expected = R.rms_norm(x.double(), (4096,), w.double(), 1e-6)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = F.rms_norm(x, (4096,), w, 1e-6)
    torch.cuda.current_stream().wait_stream(s)
    theirs = TF.rms_norm(x, (4096,), w, 1e-6)
    assert_close_to_ref(out, expected, torch.bfloat16, theirs)
