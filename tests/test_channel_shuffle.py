"""channel_shuffle and cat_shuffle: forward and gradients against the float64
reference (and torch's own channel_shuffle, exactly: a permutation), every
dtype, ranks 3-5, layouts, groups = 1 and C, unequal pieces, zero sizes,
gradcheck/gradgradcheck, opcheck, torch.compile, bad inputs, the module,
convert() (incl. torchvision's ShuffleNetV2 unit), CUDA graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import torchfuse
from torchfuse import functional as F
from torchfuse import reference as R

from conftest import DTYPES, HAS_CUDA, assert_close_to_ref, assert_raises_like_torch, leaf, randn

# (shape, groups): ranks 3-5, groups = 1 and = C, odd planes (not a multiple
# of the vector width), batch 1, one element per channel.
SHAPES = [
    ((2, 6, 5), 3),
    ((1, 4, 1), 4),  # groups = C
    ((3, 8, 7), 1),  # groups = 1
    ((2, 12, 5, 3), 4),
    ((1, 116, 7, 7), 2),  # ShuffleNetV2 tail, batch 1
    ((2, 24, 8, 8), 3),  # vector-width planes
    ((2, 9, 3, 4, 5), 3),  # 5-D
    ((1, 16, 2, 2, 2), 8),
]
ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int8,
              torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
              torch.complex64, torch.complex128]


def _narrowed(x, fmt=torch.contiguous_format):
    """x as a view narrowing dim 1 of a wider tensor in layout fmt (one
    channel before it, two after): rows further apart than x's own, and a
    base address off any vector alignment. ShuffleNetV2 hands its chunk of
    the unit's input to the concatenation this way."""
    pad = x.new_zeros(x.shape[0], 1, *x.shape[2:])
    wide = torch.cat([pad, x, pad, pad], dim=1).contiguous(memory_format=fmt)
    return wide.narrow(1, 1, x.shape[1])


def _formats(dim):
    yield "", torch.contiguous_format
    if dim == 4:
        yield "channels_last", torch.channels_last
    if dim == 5:
        yield "channels_last_3d", torch.channels_last_3d


def _layouts(x):
    for name, fmt in _formats(x.dim()):
        if name:
            yield name, x.contiguous(memory_format=fmt)
        else:
            yield "contiguous", x
        yield f"narrowed {name}".strip(), _narrowed(x, fmt)
    yield "strided", torch.cat([x, x], dim=-1)[..., ::2]


def _grads(out, inputs, go):
    return torch.autograd.grad(out, inputs, go)


@pytest.mark.parametrize("shape,groups", SHAPES, ids=[f"{s}-g{g}" for s, g in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channel_shuffle_matches_reference(device, dtype, shape, groups):
    base = randn(*shape, dtype=dtype, device=device)
    go = randn(*shape, dtype=dtype, device=device)
    for layout, x in _layouts(base):
        x = x.detach().requires_grad_()
        out = F.channel_shuffle(x, groups)
        (gx,) = _grads(out, [x], go)
        x64 = leaf(x, torch.float64)
        ref = R.channel_shuffle(x64, groups)
        (gref,) = _grads(ref, [x64], go.double())
        theirs = TF.channel_shuffle(x.detach(), groups)
        assert out.dtype == dtype and out.shape == x.shape
        assert_close_to_ref(out, ref, dtype, theirs, name=f"out {layout}")
        assert_close_to_ref(gx, gref, dtype, go, name=f"grad {layout}")
        # a permutation is exact
        assert torch.equal(out, theirs), layout
        if layout.startswith("channels_last"):
            fmt = getattr(torch, layout)
            assert out.is_contiguous(memory_format=fmt), "layout not preserved"


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_channel_shuffle_every_dtype(device, dtype):
    # Element sizes 1, 2, 4, 8 and 16 bytes, both layouts, vector and scalar paths.
    for shape, groups in [((2, 32, 4, 4), 4), ((3, 6, 5, 3), 2), ((2, 8, 1, 3), 8)]:
        src = torch.randint(-100, 100, shape, device=device)
        x = (src > 0) if dtype == torch.bool else src.to(dtype)
        for _, xl in _layouts(x):
            assert torch.equal(F.channel_shuffle(xl, groups), TF.channel_shuffle(xl, groups))


def test_contiguous_plane_sizes(device):
    # Contiguous planes are copied in 32-byte moves with a tail move ending at
    # the plane's end, below 32 bytes as two overlapping moves of 16/8/4/2
    # bytes or one byte: every plane size from 1 to 135 bytes, and for
    # cat_shuffle (whose pieces' planes are copied the same way) a few.
    for n in range(1, 136):
        x = torch.randint(0, 255, (2, 6, n), device=device, dtype=torch.uint8)
        assert torch.equal(F.channel_shuffle(x, 3), TF.channel_shuffle(x, 3)), n
    for n in (1, 3, 7, 15, 31, 33, 100):
        a = torch.randint(0, 255, (2, 4, n), device=device, dtype=torch.uint8)
        b = torch.randint(0, 255, (2, 2, n), device=device, dtype=torch.uint8)
        assert torch.equal(F.cat_shuffle([a, b], 3), TF.channel_shuffle(torch.cat([a, b], 1), 3)), n


@pytest.mark.parametrize("threads", [2, 4])
def test_contiguous_tasks_start_mid_row(device, threads):
    # Contiguous planes are split into parallel tasks of >= 64 KB, which
    # start anywhere in a row of C planes: 90 planes of 5.3 KB over 2 or 4
    # threads start tasks at planes 45 or 23, 46, 69 (rows of 30). Both
    # directions: channel_shuffle, and cat_shuffle's one-piece backward.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for groups in (2, 3, 5, 10, 15):
            x = randn(3, 30, 37, 37, device=device).requires_grad_()
            assert torch.equal(F.channel_shuffle(x, groups), TF.channel_shuffle(x.detach(), groups))
            out = F.cat_shuffle([x], groups)
            go = randn(*out.shape, device=device)
            (gx,) = torch.autograd.grad(out, [x], go)
            assert torch.equal(gx, TF.channel_shuffle(go, 30 // groups)), groups
    finally:
        torch.set_num_threads(before)


# channels_last rows take one of three kernels: an interleave of `groups`
# streams (groups in 2, 3, 4, 8), a de-interleave of records of cpg elements
# (cpg in 2, 3, 4, 8), or a per-element table; streams long enough for the
# vectorized body and a tail (cpg 37, 40), and every element size.
CL_PATHS = [(2, 37), (3, 40), (4, 5), (8, 3), (37, 2), (40, 3), (5, 4), (6, 8), (5, 5), (7, 6)]


@pytest.mark.parametrize("groups,cpg", CL_PATHS, ids=[f"g{g}-cpg{c}" for g, c in CL_PATHS])
def test_channels_last_kernel_paths(device, groups, cpg):
    C = groups * cpg
    for dtype in (torch.int8, torch.int16, torch.float32, torch.float64, torch.complex128):
        src = torch.randint(-100, 100, (2, C, 3, 5), device=device).to(dtype)
        x = src.contiguous(memory_format=torch.channels_last)
        out = F.channel_shuffle(x, groups)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out, TF.channel_shuffle(src, groups)), dtype
    # cat_shuffle, forward and the one-pass backward: pieces on group
    # boundaries (the fast kernels) and off them (the table).
    for sizes in ([cpg] * groups, [C - cpg, cpg], [1, C - 1]):
        pieces = [randn(2, c, 3, 5, device=device).contiguous(memory_format=torch.channels_last)
                  .requires_grad_() for c in sizes]
        out = F.cat_shuffle(pieces, groups)
        cat = torch.cat([t.detach() for t in pieces], 1)
        assert torch.equal(out, TF.channel_shuffle(cat, groups)), sizes
        go = randn(*out.shape, device=device).contiguous(memory_format=torch.channels_last)
        grads = torch.autograd.grad(out, pieces, go)
        expected = TF.channel_shuffle(go, cpg).split(sizes, 1)
        for g, e in zip(grads, expected):
            assert torch.equal(g, e), sizes


def test_inverse_and_zero_size(device):
    x = randn(2, 12, 3, 5, device=device)
    assert torch.equal(F.channel_shuffle(F.channel_shuffle(x, 3), 4), x)
    for shape in [(0, 6, 2), (2, 0, 2), (2, 6, 0), (2, 6, 0, 3)]:
        x = randn(*shape, device=device, requires_grad=True)
        out = F.channel_shuffle(x, 3)
        assert out.shape == TF.channel_shuffle(x.detach(), 3).shape
        (g,) = torch.autograd.grad(out.sum(), x)
        assert g.shape == x.shape


# ---------------------------------------------------------------- cat_shuffle
CAT_CASES = [
    ([(2, 3, 5), (2, 3, 5)], 2),
    ([(1, 58, 7, 7), (1, 58, 7, 7)], 2),  # ShuffleNetV2 stage-3 tail, batch 1
    ([(1, 116, 14, 14), (1, 116, 14, 14)], 2),  # 14x14 planes: 8-byte vectors in half
    ([(2, 1, 4, 3), (2, 5, 4, 3), (2, 6, 4, 3)], 3),  # unequal pieces
    ([(2, 8, 3, 3), (2, 0, 3, 3), (2, 8, 3, 3)], 4),  # an empty piece
    ([(2, 4, 2, 3, 2), (2, 2, 2, 3, 2)], 6),  # 5-D, groups = C
    ([(3, 7, 4), (3, 2, 4)], 1),  # groups = 1
    ([(2, 8, 4, 4)] * 3, 3),
    ([(2, c, 3, 2) for c in (1, 2, 3, 1, 2, 3, 1, 2, 3, 2)], 4),  # many pieces
]


@pytest.mark.parametrize("case", range(len(CAT_CASES)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cat_shuffle_matches_reference(device, dtype, case):
    shapes, groups = CAT_CASES[case]
    base = [randn(*s, dtype=dtype, device=device) for s in shapes]
    total = list(shapes[0])
    total[1] = sum(s[1] for s in shapes)
    go = randn(*total, dtype=dtype, device=device)
    variants = [("contiguous", base)]
    if len(total) == 4:
        variants.append(("channels_last", [t.contiguous(memory_format=torch.channels_last)
                                           for t in base]))
        variants.append(("mixed", [t.contiguous(memory_format=torch.channels_last) if i % 2
                                   else t for i, t in enumerate(base)]))
    if len(total) == 5:
        variants.append(("channels_last_3d", [
            t.contiguous(memory_format=torch.channels_last_3d) for t in base]))
    variants.append(("strided", [torch.cat([t, t], -1)[..., ::2] for t in base]))
    for name, fmt in _formats(len(total)):
        variants.append((f"narrowed {name}".strip(), [_narrowed(t, fmt) for t in base]))
        variants.append((f"half narrowed {name}".strip(), [
            _narrowed(t, fmt) if i % 2 == 0 else t.contiguous(memory_format=fmt)
            for i, t in enumerate(base)]))
    for layout, pieces in variants:
        pieces = [t.detach().requires_grad_() for t in pieces]
        out = F.cat_shuffle(pieces, groups)
        grads = _grads(out, pieces, go)
        p64 = [leaf(t, torch.float64) for t in pieces]
        ref = R.cat_shuffle(p64, groups)
        grefs = _grads(ref, p64, go.double())
        theirs = TF.channel_shuffle(torch.cat([t.detach() for t in pieces], 1), groups)
        assert_close_to_ref(out, ref, dtype, theirs, name=f"out {layout}")
        assert torch.equal(out, theirs), layout
        for k, (g, gr) in enumerate(zip(grads, grefs)):
            assert_close_to_ref(g, gr, dtype, gr.to(dtype), name=f"grad[{k}] {layout}")
        if layout in ("channels_last", "narrowed channels_last"):
            assert out.is_contiguous(memory_format=torch.channels_last), layout


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_pieces_read_where_they_lie(device, layout):
    """A piece that narrows dim 1 of a larger tensor (ShuffleNetV2's chunk of
    its input) is read in place: no copy runs beside the kernel, forward or
    backward, and the result is torch's."""
    fmt = getattr(torch, layout) if layout != "contiguous" else torch.contiguous_format
    x = randn(4, 232, 6, 6, device=device).contiguous(memory_format=fmt).requires_grad_()
    y = randn(4, 116, 6, 6, device=device).contiguous(memory_format=fmt).requires_grad_()
    x1, x2 = x.chunk(2, dim=1)
    assert not x1.is_contiguous(memory_format=fmt)
    go = randn(4, 232, 6, 6, device=device).contiguous(memory_format=fmt)
    with torch.profiler.profile() as prof:
        out = F.cat_shuffle([x1, y], 2)
        shuffled = F.channel_shuffle(x2, 4)
    copies = [e.name for e in prof.events() if e.name in ("aten::clone", "aten::copy_",
                                                          "aten::contiguous")]
    assert copies == [], copies
    expected = TF.channel_shuffle(torch.cat([x1, y], 1), 2)
    assert torch.equal(out, expected)
    assert torch.equal(shuffled, TF.channel_shuffle(x2, 4))
    assert out.is_contiguous(memory_format=fmt)
    gx, gy = torch.autograd.grad(out, (x, y), go)
    ex, ey = torch.autograd.grad(expected, (x, y), go)
    assert torch.equal(gx, ex) and torch.equal(gy, ey)


def test_cat_shuffle_every_dtype_and_promotion(device):
    for dtype in ALL_DTYPES:
        a = torch.randint(-9, 9, (2, 6, 3, 4), device=device)
        b = torch.randint(-9, 9, (2, 2, 3, 4), device=device)
        a, b = ((a > 0), (b > 0)) if dtype == torch.bool else (a.to(dtype), b.to(dtype))
        for fmt in (torch.contiguous_format, torch.channels_last):
            pa, pb = a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)
            expected = TF.channel_shuffle(torch.cat([pa, pb], 1), 4)
            assert torch.equal(F.cat_shuffle([pa, pb], 4), expected)
    # mixed dtypes promote as torch.cat does
    a = randn(2, 2, 3, device=device)
    b = randn(2, 2, 3, device=device, dtype=torch.float64)
    out = F.cat_shuffle((a, b), 2)
    assert out.dtype == torch.float64
    assert torch.equal(out, TF.channel_shuffle(torch.cat([a, b], 1), 2))


# --------------------------------------------------- gradcheck, opcheck, compile
def test_gradcheck(device):
    x = randn(2, 6, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    torch.autograd.gradcheck(lambda t: F.channel_shuffle(t, 3), (x,))
    torch.autograd.gradgradcheck(lambda t: F.channel_shuffle(t, 3), (x,))
    a = randn(2, 1, 3, dtype=torch.float64, device=device, requires_grad=True)
    b = randn(2, 5, 3, dtype=torch.float64, device=device, requires_grad=True)
    torch.autograd.gradcheck(lambda p, q: F.cat_shuffle([p, q], 2), (a, b))
    torch.autograd.gradgradcheck(lambda p, q: F.cat_shuffle([p, q], 2), (a, b))
    c = randn(2, 6, 3, 2, dtype=torch.float64, device=device,
              requires_grad=True).contiguous(memory_format=torch.channels_last)
    torch.autograd.gradgradcheck(lambda p, q: F.cat_shuffle([p, q], 3), (c, x))


def _opcheck_samples(device):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = randn(2, 6, 3, 4, dtype=dtype, device=device, requires_grad=True)
        xcl = leaf(x.contiguous(memory_format=torch.channels_last))
        y = randn(2, 2, 3, 4, dtype=dtype, device=device, requires_grad=True)
        yield torch.ops.torchfuse.channel_shuffle.default, (x, 3)
        yield torch.ops.torchfuse.channel_shuffle.default, (xcl, 2)
        yield torch.ops.torchfuse.channel_shuffle.default, (leaf(x[:, :, :, :3]), 2)
        yield torch.ops.torchfuse.cat_shuffle.default, ([x, y], 4)
        yield torch.ops.torchfuse.cat_shuffle.default, ([xcl, y], 2)
        yield torch.ops.torchfuse.cat_shuffle.default, (
            [xcl, leaf(y.contiguous(memory_format=torch.channels_last))], 8)
        g = randn(2, 8, 3, 4, dtype=dtype, device=device, requires_grad=True)
        yield torch.ops.torchfuse.cat_shuffle_backward.default, (g, [6, 2], 4)
        yield torch.ops.torchfuse.cat_shuffle_backward.default, (
            leaf(g.contiguous(memory_format=torch.channels_last)), [1, 7], 2)
    yield torch.ops.torchfuse.channel_shuffle.default, (
        torch.randint(0, 5, (2, 4, 3), device=device), 2)


def test_opcheck(device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)


def test_compile_fullgraph(device):
    torch._dynamo.reset()

    def unit(x, w):
        x1, x2 = x.chunk(2, dim=1)
        out = F.cat_shuffle([x1, (x2 * w).relu()], 2)
        return F.channel_shuffle(out, 4).sum()

    x = randn(2, 8, 5, 5, device=device, requires_grad=True)
    w = randn(1, 4, 1, 1, device=device, requires_grad=True)
    compiled = torch.compile(unit, fullgraph=True, backend="aot_eager")
    loss = compiled(x, w)
    grads = torch.autograd.grad(loss, (x, w))
    loss_e = unit(x, w)
    grads_e = torch.autograd.grad(loss_e, (x, w))
    torch.testing.assert_close(loss, loss_e)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ bad input
def _bad_cases(device):
    x = randn(2, 6, 3, device=device)
    return [
        ("groups", lambda f: f(x, 0)),
        ("groups", lambda f: f(x, -2)),
        ("groups", lambda f: f(x, 4)),
        ("groups", lambda f: f(x, 2.0)),
        ("groups", lambda f: f(x, True)),
        ("groups", lambda f: f(x, None)),
        ("input", lambda f: f(randn(2, 6, device=device), 2)),
        ("input", lambda f: f(randn(6, device=device), 2)),
        ("input", lambda f: f("x", 2)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_bad_input_like_torch(device, case):
    arg, call = _bad_cases(device)[case]
    assert_raises_like_torch(lambda: call(TF.channel_shuffle), lambda: call(F.channel_shuffle),
                             arg)


def _cat_bad_cases(device):
    a = randn(2, 4, 3, device=device)
    return [
        ("tensors", lambda cat, f: f(cat([], 1), 2) if cat else f([], 2)),
        ("tensors", lambda cat, f: f(cat([a, randn(3, 4, 3, device=device)], 1), 2)
         if cat else f([a, randn(3, 4, 3, device=device)], 2)),
        ("tensors", lambda cat, f: f(cat([a, randn(2, 4, 5, device=device)], 1), 2)
         if cat else f([a, randn(2, 4, 5, device=device)], 2)),
        ("tensors", lambda cat, f: f(cat([a, randn(2, 4, device=device)], 1), 2)
         if cat else f([a, randn(2, 4, device=device)], 2)),
        ("tensors", lambda cat, f: f(cat([a, 3], 1), 2) if cat else f([a, 3], 2)),
        ("groups", lambda cat, f: f(cat([a, a], 1), 3) if cat else f([a, a], 3)),
        ("groups", lambda cat, f: f(cat([a, a], 1), 0) if cat else f([a, a], 0)),
        ("groups", lambda cat, f: f(cat([a, a], 1), 2.5) if cat else f([a, a], 2.5)),
    ]


@pytest.mark.parametrize("case", range(8))
def test_cat_shuffle_bad_input_like_torch(device, case):
    arg, call = _cat_bad_cases(device)[case]
    assert_raises_like_torch(lambda: call(torch.cat, TF.channel_shuffle),
                             lambda: call(None, F.cat_shuffle), arg)


def test_backward_op_bad_input(device):
    g = randn(2, 8, 3, device=device)
    bwd = torch.ops.torchfuse.cat_shuffle_backward
    with pytest.raises(RuntimeError, match="split_sizes"):
        bwd(g, [4, 3], 2)
    with pytest.raises(RuntimeError, match="split_sizes"):
        bwd(g, [9, -1], 2)
    with pytest.raises(ValueError, match="split_sizes"):
        bwd(g, [], 2)
    with pytest.raises(RuntimeError, match="groups"):
        bwd(g, [4, 4], 3)
    with pytest.raises(RuntimeError, match="grad_out"):
        bwd(randn(2, 8, device=device), [4, 4], 2)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
def test_cat_shuffle_bad_device():
    with pytest.raises(RuntimeError, match="tensors"):
        F.cat_shuffle([randn(2, 2, 3, device="cuda"), randn(2, 2, 3)], 2)


# ----------------------------------------------------- direct entries (_C)
_DIRECT = torchfuse._ops.DIRECT
needs_direct = pytest.mark.skipif(
    set(_DIRECT) != {"channel_shuffle", "cat_shuffle"}, reason="extension without direct entries")


class _Sub(torch.Tensor):
    pass


class _Mode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@needs_direct
def test_direct_entries_take_the_plain_case(device):
    x = randn(2, 6, 5, 4, device=device)
    a, b = randn(2, 2, 5, 4, device=device), randn(2, 4, 5, 4, device=device)
    cat_ref = TF.channel_shuffle(torch.cat([a, b], 1), 3)
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        out = _DIRECT["channel_shuffle"](t, 3)
        assert torch.equal(out, TF.channel_shuffle(t, 3))
        assert out.is_contiguous(memory_format=torch.channels_last) == (t is not x)
    assert torch.equal(_DIRECT["cat_shuffle"]([a, b], 3), cat_ref)
    assert torch.equal(_DIRECT["cat_shuffle"]((a, b), 3), cat_ref)
    # requires_grad with grad mode off: nothing to record
    with torch.no_grad():
        out = _DIRECT["channel_shuffle"](x.clone().requires_grad_(), 3)
    assert out is not None and not out.requires_grad
    # a bad groups value reaches the op's own check: the usual error
    with pytest.raises(RuntimeError, match="groups"):
        _DIRECT["channel_shuffle"](x, 4)
    with pytest.raises(RuntimeError, match="groups"):
        _DIRECT["channel_shuffle"](x.clone().requires_grad_(), 4)


@needs_direct
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_direct_entries_record_gradients(device, layout):
    """With a gradient to record, the entries return a tensor whose C++
    autograd node gives the inverse shuffle (cat: each piece's slice), with
    double backward through the ops' own registered autograd."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = randn(2, 6, 5, 4, device=device).contiguous(memory_format=fmt).requires_grad_()
    a = randn(2, 2, 5, 4, device=device).contiguous(memory_format=fmt).requires_grad_()
    b = randn(2, 4, 5, 4, device=device).contiguous(memory_format=fmt).requires_grad_()
    g = randn(2, 6, 5, 4, device=device)
    out = _DIRECT["channel_shuffle"](x, 3)
    assert "ChannelShuffleFn" in out.grad_fn.name()  # the C++ node, not a Python Function
    x_ref = x.detach().clone().requires_grad_()
    (gx,) = torch.autograd.grad(out, x, g)
    (gx_ref,) = torch.autograd.grad(TF.channel_shuffle(x_ref, 3), x_ref, g)
    assert torch.equal(gx, gx_ref)
    out = _DIRECT["cat_shuffle"]([a, b], 3)
    assert "CatShuffleFn" in out.grad_fn.name()
    ga, gb = torch.autograd.grad(out, (a, b), g)
    ref = TF.channel_shuffle(torch.cat([a, b], 1), 3)
    ga_ref, gb_ref = torch.autograd.grad(ref, (a, b), g)
    assert torch.equal(ga, ga_ref) and torch.equal(gb, gb_ref)
    # only one piece requiring grad
    out = _DIRECT["cat_shuffle"]([a.detach(), b], 3)
    (gb1,) = torch.autograd.grad(out, (b,), g)
    assert torch.equal(gb1, gb_ref)
    # double backward: the gradient of <grad(out, x, v), w> with respect to v
    v = g.clone().requires_grad_()
    (gx,) = torch.autograd.grad(_DIRECT["channel_shuffle"](x, 3), x, v, create_graph=True)
    w = randn(2, 6, 5, 4, device=device)
    (gv,) = torch.autograd.grad(gx, v, w)
    assert torch.equal(gv, TF.channel_shuffle(w, 3))
    (ga, gb) = torch.autograd.grad(_DIRECT["cat_shuffle"]([a, b], 3), (a, b), v,
                                   create_graph=True)
    (gv,) = torch.autograd.grad((ga, gb), v, (w[:, :2], w[:, 2:]))
    assert torch.equal(gv, TF.channel_shuffle(w, 3))


@needs_direct
def test_direct_entries_gradcheck(device):
    x = randn(2, 6, 3, dtype=torch.float64, device=device, requires_grad=True)
    a = randn(2, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    b = randn(2, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    cs, cat = _DIRECT["channel_shuffle"], _DIRECT["cat_shuffle"]
    assert torch.autograd.gradcheck(lambda t: cs(t, 3), (x,))
    assert torch.autograd.gradgradcheck(lambda t: cs(t, 3), (x,))
    assert torch.autograd.gradcheck(lambda p, q: cat([p, q], 2), (a, b))
    assert torch.autograd.gradgradcheck(lambda p, q: cat([p, q], 2), (a, b))


@needs_direct
def test_direct_entries_decline_the_rest(device):
    """None (the usual path then runs) for anything but the plain case."""
    cs, cat = _DIRECT["channel_shuffle"], _DIRECT["cat_shuffle"]
    x = randn(2, 6, 5, device=device)
    declined = [
        lambda: cs(x.as_subclass(_Sub), 3),  # __torch_function__ of its own
        lambda: cs(x, 3.0),
        lambda: cs(x, True),
        lambda: cs(x, torch.tensor(3)),
        lambda: cs(x, 2**70),
        lambda: cs("x", 3),
        lambda: cs(x),
        lambda: cs(x.to("meta"), 3),  # no kernel for the device (fake kernel path)
        lambda: cat([x, x.double()], 3),  # promoted by the usual path
        lambda: cat([], 3),
        lambda: cat(x, 3),
        lambda: cat([x, "x"], 3),
    ]
    for i, f in enumerate(declined):
        assert f() is None, i
    with _Mode():
        assert cs(x, 3) is None
        assert cat([x, x], 3) is None


@needs_direct
def test_functional_routes_through_direct(device, monkeypatch):
    import torchfuse.functional as functional

    calls = []

    def spy(real):
        def f(*args):
            out = real(*args)
            calls.append(out is not None)
            return out
        return f

    monkeypatch.setattr(functional, "_direct_channel_shuffle", spy(_DIRECT["channel_shuffle"]))
    x = randn(2, 6, 5, device=device, requires_grad=True)
    y = F.channel_shuffle(x, 3)
    y.backward(torch.ones_like(y))
    assert calls == [True] and torch.equal(x.grad, torch.ones_like(x))
    with torch.no_grad():
        assert torch.equal(F.channel_shuffle(x, 3), TF.channel_shuffle(x, 3))
    assert calls == [True, True]
    with _Mode():  # the mode sees the call (through the usual path)
        F.channel_shuffle(x.detach(), 3)
    assert calls == [True, True, False]


# --------------------------------------------------------------------- module
def test_module_is_drop_in(device):
    ref = torch.nn.ChannelShuffle(3)
    ours = torchfuse.nn.ChannelShuffle(3)
    assert isinstance(ours, torch.nn.ChannelShuffle)
    assert ours.extra_repr() == ref.extra_repr() and repr(ours) == repr(ref)
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = randn(2, 9, 4, 4, device=device)
    assert torch.equal(ours(x), ref(x))


def test_convert_channel_shuffle(device):
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 1), torch.nn.ChannelShuffle(2)).to(device)
    converted = torchfuse.convert(model)
    assert type(model[1]) is torch.nn.ChannelShuffle
    assert type(converted[1]) is torchfuse.nn.ChannelShuffle and converted[1].groups == 2
    assert list(converted.state_dict()) == list(model.state_dict())
    x = randn(2, 4, 5, 5, device=device)
    torch.testing.assert_close(converted(x), model(x))


def test_convert_torchvision_shufflenet_v2(device):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.shufflenet_v2_x0_5(weights=None).to(device).eval()
    converted = torchfuse.convert(model)
    units = [m for m in converted.modules()
             if isinstance(m, tv.models.shufflenetv2.InvertedResidual)]
    assert units and all(type(m) is not tv.models.shufflenetv2.InvertedResidual for m in units)
    assert all(type(m) is tv.models.shufflenetv2.InvertedResidual for m in model.modules()
               if isinstance(m, tv.models.shufflenetv2.InvertedResidual)), "input touched"
    assert list(converted.state_dict()) == list(model.state_dict())
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = randn(2, 3, 64, 64, device=device).contiguous(memory_format=fmt).requires_grad_()
        out, ref = converted(x), model(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        g1 = torch.autograd.grad(out.sum(), [x, *converted.parameters()])
        g2 = torch.autograd.grad(ref.sum(), [x, *model.parameters()])
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
def test_cuda_graph_capture_and_misaligned():
    a = randn(4, 58, 14, 14, device="cuda", dtype=torch.bfloat16)
    b = randn(4, 58, 14, 14, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        F.cat_shuffle([a, b], 2)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = F.cat_shuffle([a, b], 2)
    a.copy_(randn(4, 58, 14, 14, device="cuda", dtype=torch.bfloat16))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, TF.channel_shuffle(torch.cat([a, b], 1), 2))
    # 2-byte offset: no 16-byte access possible
    base = randn(2 * 16 * 8 * 8 + 1, device="cuda", dtype=torch.float16)
    x = base[1:].view(2, 16, 8, 8)
    assert torch.equal(F.channel_shuffle(x, 4), TF.channel_shuffle(x, 4))
