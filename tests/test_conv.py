"""conv2d (dilated, grouped, depthwise, with a fused channel shuffle): forward
and every gradient against the float64 reference for each kernel path (im2col
+ GEMM, the direct 1x1 path, the depthwise kernels), strides, dilations,
asymmetric "same" padding, layouts, unbatched and zero-size input; gradcheck /
gradgradcheck, opcheck, torch.compile, bad inputs like torch, the module and
convert(), determinism, CUDA graphs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as TF

import torchfuse
from torchfuse import functional as F
from torchfuse import reference as R

from conftest import (
    CUDA_EMU,
    DTYPES,
    HAS_CUDA,
    assert_close_to_ref,
    assert_raises_like_torch,
    direct_vs_python_path,
    leaf,
    randn,
)

# (N, Cin, H, W, Cout, kernel, stride, padding, dilation, groups, shuffle)
# The CPU kernels compute groups of at most 16 input channels (8 in float32
# and float64 when torch's convolution is the alternative) with a kernel
# larger than 1x1 directly (blocks of 4 output or input channels, so counts
# that are not multiples of 4 matter) and the rest with im2col + GEMM; the
# CUDA kernels only depthwise ones directly. The rest, when there is no
# shuffle to fuse and the padding is symmetric, is torch's own convolution
# (PLATFORM). Every path appears on each device.
CASES = [
    # groups = 1: odd sizes, stride, dilation, rectangular kernel; direct on
    # CPU (5 or 3 input channels) and im2col + GEMM (17 to 20)
    (2, 5, 9, 7, 6, 3, 1, 1, 1, 1, 1),
    (2, 5, 9, 7, 6, (2, 3), (2, 1), (1, 0), (1, 2), 1, 1),
    (1, 3, 12, 11, 4, 3, 1, 4, 4, 1, 2),  # DeepLab-like atrous, shuffled
    (2, 18, 7, 6, 6, 3, 1, 1, 1, 1, 2),
    (1, 20, 9, 8, 6, (2, 3), (2, 1), (1, 0), (1, 2), 1, 1),
    (1, 17, 12, 11, 4, 3, 1, 4, 4, 1, 2),
    # grouped (ResNeXt, ShuffleNet v1), the shuffle's groups equal to or
    # different from the convolution's; 16 and 17 input channels per group
    (2, 8, 6, 5, 12, 3, 2, 1, 1, 4, 1),
    (2, 12, 5, 6, 12, 3, 1, 1, 1, 3, 3),
    (2, 12, 5, 6, 24, 3, 1, 2, 2, 3, 4),
    (1, 32, 6, 6, 10, 3, 1, 1, 1, 2, 1),  # float32: torch's convolution, else direct
    (1, 32, 6, 6, 10, 3, 1, 1, 1, 2, 2),  # direct (16 per group, shuffled)
    (1, 34, 6, 5, 4, 3, 2, 2, 2, 2, 2),
    # 1x1, stride 1, no padding: the GEMM reads the input (no im2col)
    (3, 12, 6, 6, 12, 1, 1, 0, 1, 3, 3),
    (3, 12, 4, 7, 8, 1, 1, 0, 1, 1, 2),
    (2, 6, 5, 5, 6, 1, 2, 0, 1, 2, 3),  # 1x1 strided: im2col again
    # depthwise (multiplier 1, 2 and 8) and past the direct kernel (16)
    (2, 8, 9, 7, 8, 3, 1, 1, 1, 8, 1),
    (2, 6, 10, 9, 6, 3, 2, 1, 1, 6, 2),
    (2, 4, 8, 8, 8, 5, 1, 2, 1, 4, 1),
    (1, 3, 11, 10, 24, 3, 1, 2, 2, 3, 3),
    (1, 2, 6, 6, 32, 3, 1, 1, 1, 2, 1),
    (1, 4, 7, 7, 4, (1, 7), 1, (0, 3), 1, 4, 1),
    # the CPU direct kernels split their input planes into stride phases (by
    # row and column): stride 3, unequal strides with dilation, and a row
    # wide enough for whole vectors of the stride-2 column split
    (1, 4, 11, 13, 4, 3, 3, 1, 1, 4, 1),
    (2, 6, 9, 10, 6, (3, 2), (1, 2), 1, (2, 3), 6, 1),
    (1, 8, 13, 12, 8, 3, (3, 2), 2, 2, 2, 1),
    (1, 3, 5, 70, 3, 3, 2, 1, 1, 3, 1),
    # grad_input is computed per stride phase of the input: a stride larger
    # than the kernel (phases no tap reaches) and padding wider than the
    # kernel's reach
    (1, 4, 10, 11, 4, 2, 3, 0, 1, 4, 1),
    (1, 3, 6, 7, 3, 3, 2, 3, 1, 3, 1),
    # asymmetric "same" (even kernel, odd total padding) and "valid"
    (2, 6, 7, 8, 9, (2, 4), 1, "same", 1, 3, 3),
    (2, 4, 7, 8, 4, 4, 1, "same", (1, 3), 4, 1),
    (2, 4, 7, 8, 6, 3, 1, "valid", 2, 2, 1),
    (1, 17, 7, 8, 4, (2, 4), 1, "same", 1, 1, 1),
]
GROUPED = (2, 12, 5, 6, 12, 3, 1, 1, 1, 3, 3)
ONE_BY_ONE = (3, 12, 6, 6, 12, 1, 1, 0, 1, 3, 3)
DEPTHWISE_S2 = (2, 6, 10, 9, 6, 3, 2, 1, 1, 6, 2)
IM2COL = (2, 18, 7, 6, 6, 3, 1, 1, 1, 1, 2)
PLATFORM = (1, 20, 9, 8, 6, (2, 3), (2, 1), (1, 0), (1, 2), 1, 1)
for _c in (GROUPED, ONE_BY_ONE, DEPTHWISE_S2, IM2COL, PLATFORM):
    assert _c in CASES


def _id(c):
    n, ci, h, w, co, k, s, p, d, g, sg = c
    return f"{n}x{ci}x{h}x{w}-o{co}-k{k}-s{s}-p{p}-d{d}-g{g}-sh{sg}".replace(" ", "")


def _kpair(k):
    return (k, k) if isinstance(k, int) else tuple(k)


def _tensors(case, dtype, device, bias=True, layout="contiguous"):
    n, ci, h, w, co, k, *_rest = case
    g = case[9]
    x = randn(n, ci, h, w, dtype=dtype, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":  # every other column of a wider tensor
        x = randn(n, ci, h, 2 * w, dtype=dtype, device=device)[..., ::2]
    wt = randn(co, ci // g, *_kpair(k), dtype=dtype, device=device, scale=0.5)
    b = randn(co, dtype=dtype, device=device) if bias else None
    return [t.requires_grad_() if t is not None else None for t in (x, wt, b)]


def _args(case):
    *_shape, s, p, d, g, sg = case
    return dict(stride=s, padding=p, dilation=d, groups=g, shuffle_groups=sg)


def _torch_conv(x, w, b, stride, padding, dilation, groups, shuffle_groups):
    """What users write in eager torch: the convolution, then the shuffle."""
    y = TF.conv2d(x, w, b, stride, padding, dilation, groups)
    return TF.channel_shuffle(y, shuffle_groups) if shuffle_groups > 1 else y


def _run(fn, inputs, go):
    out = fn(*inputs)
    wrt = [t for t in inputs if t is not None]
    return (out, *torch.autograd.grad(out, wrt, go))


def _check_case(case, dtype, device, bias=True, layout="contiguous"):
    args = _args(case)
    x, w, b = _tensors(case, dtype, device, bias, layout)
    ours_out = F.conv2d(x, w, b, **args)
    go = randn(*ours_out.shape, dtype=dtype, device=device)
    ours = _run(lambda *t: F.conv2d(*t, **args), (x, w, b), go)
    l64 = [leaf(t, torch.float64) for t in (x, w, b)]
    ref = _run(lambda *t: R.conv2d(*t, **args), l64, go.double())
    theirs = None
    if dtype in (torch.float16, torch.bfloat16):
        lt = [leaf(t) for t in (x, w, b)]
        theirs = _run(lambda *t: _torch_conv(*t, **args), lt, go)
    names = ("out", "grad_input", "grad_weight", "grad_bias")
    for i, (o, r) in enumerate(zip(ours, ref)):
        assert o.dtype == dtype, names[i]
        assert_close_to_ref(o, r, dtype, None if theirs is None else theirs[i], name=names[i])
    return ours


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv2d_matches_reference(device, dtype, case):
    _check_case(case, dtype, device)


@pytest.mark.parametrize("case", CASES[::3], ids=[_id(c) for c in CASES[::3]])
def test_conv2d_no_bias_float64(device, case):
    _check_case(case, torch.float64, device, bias=False)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("case", [GROUPED, ONE_BY_ONE, DEPTHWISE_S2, IM2COL, PLATFORM],
                         ids=["grouped", "1x1", "depthwise", "im2col", "platform"])
def test_conv2d_layouts(device, layout, case):
    x = _tensors(case, torch.float32, device, layout=layout)[0]
    out, gx = _check_case(case, torch.float32, device, layout=layout)[:2]
    if layout == "channels_last":  # as torch: channels_last in, channels_last out
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert gx.is_contiguous(memory_format=torch.channels_last)
    assert gx.shape == x.shape


@pytest.mark.parametrize("case,layout", [((2, 64, 12, 12, 32, 3, 1, 1, 1, 1, 1), "contiguous"),
                                         ((2, 34, 6, 5, 4, 3, 2, 2, 2, 2, 1), "contiguous"),
                                         ((2, 8, 9, 7, 16, 3, 2, 1, 1, 8, 1), "channels_last"),
                                         ((2, 8, 9, 7, 16, 3, 1, 1, 1, 2, 1), "channels_last")],
                         ids=["groups1", "grouped", "depthwise-m2-cl", "grouped-cl"])
def test_conv2d_platform_path_is_torchs(device, case, layout):
    """No shuffle, symmetric padding, and no direct kernel (or, on the CPU,
    channels_last input other than depthwise with one output per group,
    which the direct kernels would copy to NCHW and back): torch's own
    convolution runs (oneDNN / cuDNN, faster than im2col + GEMM there), so
    the output and the input and weight gradients are torch's, bit for bit
    on the CPU (im2col + GEMM sums in another order here: the output and
    grad_input of the first case and grad_weight of the second differ)."""
    x, w, b = _tensors(case, torch.float32, device, layout=layout)
    args = _args(case)
    go = randn(*F.conv2d(x, w, b, **args).shape, device=device)
    if layout == "channels_last":
        go = go.contiguous(memory_format=torch.channels_last)
    ours = _run(lambda *t: F.conv2d(*t, **args), (x, w, b), go)
    lt = [leaf(t) for t in (x, w, b)]
    theirs = _run(lambda *t: _torch_conv(*t, **args), lt, go)
    # the CUDA kernels (and their emulator, on CPU tensors) keep depthwise
    # convolutions in any layout
    ours_cuda = device == "cuda" or CUDA_EMU
    platform = not (ours_cuda and case[9] == case[1])
    for o, t, name in zip(ours[:3], theirs[:3], ("out", "grad_input", "grad_weight")):
        if device == "cpu" and platform:
            assert torch.equal(o, t), name
        else:
            torch.testing.assert_close(o, t)
    _check_case(case, torch.float32, device)


# Depthwise (one output per group) without a shuffle on channels_last input:
# on the CPU the NHWC kernels compute it where it lies, in the backward for
# float16 and bfloat16 and in every pass where torch's convolution cannot
# take it (asymmetric padding). Channel counts below, at and past the
# kernels' two vector steps (64 float32 / bfloat16 channels, 32 float64),
# strides, dilations, kernels 3, 5 and 7 wide (the weight gradient's
# register path) and others, an even kernel, a stride past the kernel,
# padding wider than its reach.
NHWC = [
    (2, 8, 9, 7, 8, 3, 1, 1, 1, 8, 1),
    (2, 70, 6, 5, 70, 3, 2, 1, 1, 70, 1),
    (1, 37, 7, 6, 37, 3, 1, 2, 2, 37, 1),
    (1, 4, 7, 7, 4, (1, 7), 1, (0, 3), 1, 4, 1),
    (2, 9, 9, 11, 9, 5, 2, 2, 1, 9, 1),
    (1, 5, 8, 12, 5, (3, 5), 1, (1, 4), (1, 2), 5, 1),
    (2, 6, 9, 10, 6, (3, 2), (1, 2), 1, (2, 3), 6, 1),
    (2, 4, 7, 8, 4, 4, 1, "same", (1, 3), 4, 1),
    (1, 4, 10, 11, 4, 2, 3, 0, 1, 4, 1),
    (1, 3, 6, 7, 3, 3, 2, 3, 1, 3, 1),
]


@pytest.mark.parametrize("case", NHWC, ids=[_id(c) for c in NHWC])
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
def test_conv2d_channels_last_depthwise(device, dtype, case):
    x = _tensors(case, dtype, device, layout="channels_last")[0]
    out, gx = _check_case(case, dtype, device, layout="channels_last")[:2]
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert gx.is_contiguous(memory_format=torch.channels_last)
    assert gx.shape == x.shape


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@pytest.mark.parametrize("case", [c for c in NHWC if c[7] != "same"],
                         ids=[_id(c) for c in NHWC if c[7] != "same"])
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
def test_conv2d_op_asymmetric_padding_channels_last(device, dtype, case):
    """The op with one more row of padding at the bottom and one more column
    at the left: no torch convolution takes that, so on the CPU the NHWC
    kernels run every pass of every dtype. Against the zero-padded input's
    valid convolution (float64, and torch's in the dtype)."""
    s, p, d, g = case[6:10]
    (sh, sw), (ph, pw), (dh, dw) = _pair(s), _pair(p), _pair(d)
    pad = [ph, pw + 1, ph + 1, pw]  # top, left, bottom, right
    x, wt, b = _tensors(case, dtype, device, layout="channels_last")
    ops = torch.ops.torchfuse
    out = ops.conv2d(x, wt, b, [sh, sw], pad, [dh, dw], g, 1)
    go = randn(*out.shape, dtype=dtype, device=device).contiguous(
        memory_format=torch.channels_last)
    grads = ops.conv2d_backward(go, x, wt, [sh, sw], pad, [dh, dw], g, 1, [True, True, True])

    def valid(*t):
        xp = TF.pad(t[0], (pad[1], pad[3], pad[0], pad[2]))
        return TF.conv2d(xp, t[1], t[2], (sh, sw), 0, (dh, dw), g)

    def grads_of(*t):
        o = valid(*t)
        return (o, *torch.autograd.grad(o, t, go.to(o.dtype)))

    ref = grads_of(*[leaf(t, torch.float64) for t in (x, wt, b)])
    theirs = grads_of(*[leaf(t) for t in (x, wt, b)]) if dtype in (torch.float16,
                                                                   torch.bfloat16) else None
    for i, (o, name) in enumerate(zip((out, *grads), ("out", "grad_input", "grad_weight",
                                                      "grad_bias"))):
        assert o.dtype == dtype, name
        assert_close_to_ref(o, ref[i], dtype, None if theirs is None else theirs[i], name=name)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(CUDA_EMU, reason="the emulated CUDA kernels compute NCHW")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_conv2d_channels_last_depthwise_in_place(dtype):
    """On the CPU the NHWC kernels read channels_last x and dy and write out
    and dx where they lie: no layout copy, and not torch's convolution
    (whose oneDNN backward took up to 58 ms for bfloat16 and 1 s for
    float16 at MobileNetV2 shapes that take 0.3-9 ms here). bfloat16 with
    symmetric padding: the backward (the forward is torch's); float32 with
    asymmetric "same" padding: every pass."""
    case = ((2, 6, 9, 10, 6, 3, 2, 1, 1, 6, 1) if dtype == torch.bfloat16
            else (2, 6, 9, 10, 6, 4, 1, "same", 1, 6, 1))
    x, w, b = _tensors(case, dtype, "cpu", layout="channels_last")
    out = F.conv2d(x, w, b, **_args(case))
    go = randn(*out.shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        if dtype == torch.bfloat16:
            torch.autograd.grad(out, (x, w, b), go)
        else:
            _run(lambda *t: F.conv2d(*t, **_args(case)), (x, w, b), go)
    names = {e.name for e in prof.events()}
    assert "torchfuse::conv2d_backward" in names
    # (a layout copy is a clone: .contiguous(memory_format); the dtype casts
    # of grad_weight and grad_bias are copy_ / _to_copy)
    for op in ("aten::convolution", "aten::convolution_backward", "aten::clone"):
        assert op not in names, op


@pytest.mark.skipif(CUDA_EMU, reason="the emulator runs the CUDA launchers' choice")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_conv2d_low_precision_weight_gradient_path(dtype):
    """A convolution given to torch's (no shuffle, no direct kernel; groups
    <= 8): on the CPU its float16 weight gradient is im2col + a float32 GEMM
    here (oneDNN's took 0.6-32 s on a Xeon with AVX512_FP16), and so is a
    bfloat16 one on a CPU without AVX512_BF16 (1.3-2.9x faster than
    oneDNN's there); with AVX512_BF16 it is oneDNN's (0.08-0.6x the time of
    ours). The GEMM shows as aten::addmm_."""
    case = (2, 64, 12, 12, 32, 3, 1, 1, 1, 1, 1)
    x, w, b = _tensors(case, dtype, "cpu")
    args = _args(case)
    out = F.conv2d(x, w, b, **args)
    go = randn(*out.shape, dtype=dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.autograd.grad(out, (x, w, b), go)
    names = {e.name for e in prof.events()}
    ours = dtype == torch.float16 or not torchfuse.info()["cpu_bf16_instruction"]
    assert ("aten::addmm_" in names) == ours, sorted(names)
    assert "aten::convolution_backward" in names  # grad_input: torch's either way
    _check_case(case, dtype, "cpu")


def test_conv2d_unbatched(device):
    x = randn(6, 7, 8, device=device, requires_grad=True)
    w = randn(9, 2, 3, 3, device=device, requires_grad=True)
    out = F.conv2d(x, w, None, 1, 1, 1, 3, 3)
    ref = R.conv2d(x.double(), w.double(), None, 1, 1, 1, 3, 3)
    assert out.shape == (9, 7, 8)
    assert_close_to_ref(out, ref, torch.float32)
    gx, gw = torch.autograd.grad(out, (x, w), torch.ones_like(out))
    assert gx.shape == x.shape and gw.shape == w.shape


def test_conv2d_large_batch_is_chunked(device):
    """More im2col columns than one chunk's buffer holds (32 MB): the samples
    go through the GEMMs in several chunks, forward and backward."""
    case = (10, 64, 40, 40, 64, 3, 1, 1, 1, 2, 2)  # 10 x 64*9 x 1600 floats: 37 MB
    x, w, b = _tensors(case, torch.float32, device)
    args = _args(case)
    out = F.conv2d(x, w, b, **args)
    go = randn(*out.shape, device=device)
    ours = (out, *torch.autograd.grad(out, (x, w, b), go))
    l64 = [leaf(t, torch.float64) for t in (x, w, b)]
    ref = _run(lambda *t: R.conv2d(*t, **args), l64, go.double())
    for o, r, name in zip(ours, ref, ("out", "grad_input", "grad_weight", "grad_bias")):
        assert_close_to_ref(o, r, torch.float32, name=name)


def test_conv2d_zero_input_channels(device):
    # an empty sum: the output is the bias (torch returns a (2, 0, 5, 5)
    # tensor here, whatever the weight's output channels)
    x = randn(2, 0, 5, 5, device=device, requires_grad=True)
    w = randn(6, 0, 3, 3, device=device, requires_grad=True)
    b = randn(6, device=device, requires_grad=True)
    out = F.conv2d(x, w, b, padding=1, shuffle_groups=2)
    assert torch.equal(out, TF.channel_shuffle(b.detach().view(1, 6, 1, 1), 2).expand(2, 6, 5, 5))
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), torch.ones_like(out))
    assert gx.shape == x.shape and gw.shape == w.shape
    assert torch.equal(gb, torch.full((6,), 50.0, device=device))


# (x shape, weight shape, stride, padding, dilation, groups): kernels one tap
# high or wide, dilated along that side.
ONE_TAP_DILATED = [
    ((1, 4, 17, 1), (3, 4, 1, 1), 3, 2, (1, 2), 1),
    ((1, 4, 10, 1), (4, 4, 3, 1), (1, 2), (0, 1), (1, 3), 1),
    ((2, 12, 18, 1), (4, 3, 1, 1), (2, 3), (0, 2), (3, 2), 4),
    ((2, 6, 9, 7), (6, 1, 1, 3), 1, 1, (4, 2), 6),
]


def _check_against_torch64(x, ws, args, yardstick):
    """F.conv2d of x with a weight of shape ws and a bias, out and every
    gradient against torch's convolution in float64; for float16/bfloat16,
    yardstick(w, b, go, ref) gives the results whose error sets the
    tolerance."""
    dtype, device = x.dtype, x.device
    w = randn(*ws, dtype=dtype, device=device)
    b = randn(ws[0], dtype=dtype, device=device)
    go = randn(*TF.conv2d(x.double(), w.double(), None, **args).shape, dtype=dtype,
               device=device)
    ours = _run(lambda *t: F.conv2d(*t, **args), [leaf(t) for t in (x, w, b)], go)
    ref = _run(lambda *t: TF.conv2d(*t, **args), [leaf(t, torch.float64) for t in (x, w, b)],
               go.double())
    theirs = [None] * 4
    if dtype in (torch.float16, torch.bfloat16):
        theirs = yardstick(w, b, go, ref)
    for name, o, r, t in zip(("out", "grad_input", "grad_weight", "grad_bias"), ours, ref,
                             theirs):
        assert_close_to_ref(o, r, dtype, t, name=f"{list(x.shape)} {ws} {args}: {name}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv2d_one_tap_side_dilated(device, dtype, layout):
    """A kernel one tap high (wide) spans one row (column) at any dilation: the
    op takes that dilation as 1. torch's own float16 convolution (oneDNN, on
    an AVX512_FP16 CPU) segfaulted on the first three of these shapes (which
    platform_takes now keeps from it on CPU tensors as well, for their
    outputs that see only padding). torch's result in the dtype (the
    low-precision yardstick) is computed with that dilation 1 too."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for xs, ws, stride, padding, dilation, groups in ONE_TAP_DILATED:
        x = randn(*xs, dtype=dtype, device=device).contiguous(memory_format=fmt)
        args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        canonical = dict(args, dilation=tuple(1 if k == 1 else d
                                              for k, d in zip(ws[2:], dilation)))

        def torch_canonical(w, b, go, ref, x=x, canonical=canonical):
            return _run(lambda *t: TF.conv2d(*t, **canonical), [leaf(t) for t in (x, w, b)], go)

        _check_against_torch64(x, ws, args, torch_canonical)


# (x shape, weight shape, stride, padding, dilation, groups, channels_last):
# shapes torch's CPU convolution (oneDNN) got wrong on the AVX512_BF16 Xeon
# (see platform_takes in conv.cpp): an output one column wide from a column
# stride above 1 (garbage in float32 and bfloat16) and an output row whose
# dilated taps all fall in the padding (a segfault in bfloat16).
ONEDNN_WRONG = [
    ((2, 1, 20, 7), (4, 1, 7, 7), (1, 2), (2, 0), (3, 1), 1, True),
    ((2, 32, 20, 7), (16, 32, 3, 3), (2, 3), (2, 0), (2, 3), 1, True),
    ((1, 32, 12, 2), (4, 32, 2, 2), (2, 2), (0, 1), (3, 3), 1, False),
    ((2, 64, 19, 11), (16, 32, 5, 5), (2, 3), 0, (1, 2), 2, False),
    ((1, 8, 1, 15), (8, 8, 2, 2), (1, 2), (2, 2), (3, 2), 1, True),
    ((1, 16, 1, 11), (16, 8, 2, 2), (2, 1), (2, 1), (3, 3), 2, True),
    ((2, 64, 2, 24), (16, 32, 2, 2), (1, 2), (1, 2), (3, 2), 2, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv2d_shapes_onednn_got_wrong(device, dtype):
    """The op against the float64 reference where torch's own convolution
    returned garbage or crashed: on CPU tensors such shapes stay with our
    kernels. The low-precision yardstick is the reference rounded to the
    dtype (torch's own result there is the defect)."""
    for xs, ws, stride, padding, dilation, groups, cl in ONEDNN_WRONG:
        x = randn(*xs, dtype=dtype, device=device)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        _check_against_torch64(x, ws, args,
                               lambda w, b, go, ref: [r.to(dtype) for r in ref])


def test_conv2d_zero_sizes(device):
    for shape, wshape, groups in [((0, 4, 5, 5), (6, 2, 3, 3), 2),
                                  ((0, 4, 5, 5), (4, 1, 3, 3), 4)]:
        x = randn(*shape, device=device, requires_grad=True)
        w = randn(*wshape, device=device, requires_grad=True)
        b = randn(wshape[0], device=device, requires_grad=True)
        out = F.conv2d(x, w, b, padding=1, groups=groups)
        expected = TF.conv2d(x, w, b, padding=1, groups=groups)
        torch.testing.assert_close(out, expected)
        go = randn(*out.shape, device=device)
        grads = torch.autograd.grad(out, (x, w, b), go)
        for g, e in zip(grads, torch.autograd.grad(expected, (x, w, b), go)):
            torch.testing.assert_close(g, e)


def test_conv2d_integer_input_goes_to_torch():
    # torch's CPU convolution takes integer tensors; so does conv2d
    x = torch.randint(-3, 4, (1, 4, 5, 5))
    w = torch.randint(-2, 3, (4, 2, 3, 3))
    out = F.conv2d(x, w, groups=2, shuffle_groups=2)
    assert out.dtype == torch.int64
    assert torch.equal(out, TF.channel_shuffle(TF.conv2d(x, w, groups=2), 2))


def test_conv2d_float16_range(device):
    """A 1x1 grouped conv whose products overflow nothing but whose sum of
    96 terms is near 3e4: the GEMM accumulates in float32 and the result is
    as accurate as float16 stores it."""
    x = randn(2, 96, 4, 4, dtype=torch.float16, device=device, scale=2.0, shift=14.0)
    w = torch.full((32, 96, 1, 1), 1.5, dtype=torch.float16, device=device)
    w = torch.cat([w, w], 0)
    out = F.conv2d(x, w, shuffle_groups=2)
    assert torch.isfinite(out).all()
    ref = R.conv2d(x.double(), w.double(), shuffle_groups=2)
    err = ((out.double() - ref).abs() / ref.abs()).max().item()
    assert err <= torch.finfo(torch.float16).eps, f"relative error {err:.3g}"


@pytest.mark.parametrize("case", [(1, 4, 7, 9, 4, 3, 1, 1, 1, 4, 1),
                                  (1, 4, 7, 9, 8, 3, 2, 1, 1, 4, 1),
                                  (1, 8, 8, 9, 8, 3, (1, 2), 1, 1, 2, 1)],
                         ids=["depthwise", "depthwise-s2", "grouped"])
def test_conv2d_nonfinite_input_like_torch(device, case):
    """inf in the input's last column: taps that never read that column keep
    a finite weight gradient, as in torch (the CPU kernels' flat runs pass
    zeros of dy over such elements, and 0 * inf is NaN)."""
    x, w, b = _tensors(case, torch.float32, device)
    with torch.no_grad():
        x[0, :, 2, -1] = float("inf")
        x[0, :, 4, -1] = float("-inf")
    args = _args(case)
    ours = F.conv2d(x, w, b, **args)
    theirs = _torch_conv(*(leaf(t) for t in (x, w, b)), **args)
    go = randn(*ours.shape, device=device)
    expected = _run(lambda *t: _torch_conv(*t, **args), [leaf(t) for t in (x, w, b)], go)
    got = _run(lambda *t: F.conv2d(*t, **args), (x, w, b), go)
    assert torch.isfinite(expected[2][:, :, :, 0]).all()  # the case tests what it says
    for name, o, e in zip(("out", "grad_input", "grad_weight", "grad_bias"), got, expected):
        torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-4, equal_nan=True, msg=name)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, equal_nan=True)


# ------------------------------------------------------- direct entry (_C)
_DIRECT_CONV = torchfuse._ops.DIRECT.get("conv2d")
needs_direct = pytest.mark.skipif(_DIRECT_CONV is None, reason="extension without direct entries")


@needs_direct
@pytest.mark.parametrize("which", ["all", "x", "w", "x-nobias", "b"])
@pytest.mark.parametrize("case", [DEPTHWISE_S2, IM2COL, PLATFORM], ids=["direct", "im2col",
                                                                        "platform"])
def test_direct_entry_matches_python_path(device, which, case, monkeypatch):
    """The direct entry (C++ autograd node) gives exactly what the op through
    the Python autograd Function gives, forward, gradients and second order
    (through the differentiable Python formula)."""
    import torchfuse.functional as functional

    x, w, b = (t.detach() for t in _tensors(case, torch.float64, device))
    need = {"all": (1, 1, 1), "x": (1, 0, 0), "w": (0, 1, 0), "x-nobias": (1, 0, 0),
            "b": (0, 0, 1)}[which]
    if which == "x-nobias":
        b = None
    args = _args(case)
    g = randn(*F.conv2d(x, w, b, **args).shape, dtype=torch.float64, device=device)

    def run():
        leaves = [t.clone().requires_grad_(bool(n)) if t is not None else None
                  for t, n in zip((x, w, b), need)]
        out = F.conv2d(*leaves, **args)
        return out, [t for t in leaves if t is not None and t.requires_grad], g

    direct_vs_python_path(
        run, "ConvFn", lambda: monkeypatch.setattr(functional, "_direct_conv2d", None))


@needs_direct
def test_direct_entry_declines_the_rest(device):
    x = randn(2, 4, 6, 6, device=device)
    w = randn(4, 2, 3, 3, device=device)

    class Sub(torch.Tensor):
        pass

    ok = (x, w, None, [1, 1], [1, 1], [1, 1], 2, 1)
    declined = [
        (x, w, None, (1, 1), [1, 1], [1, 1], 2, 1),  # tuples: the usual path's
        (x, w, None, [1, 1], [1, 1], [1, 1], 2.0, 1),
        (x, w, None, [1, 1], [1, 1.0], [1, 1], 2, 1),
        (x, w, None, [1, 1], [1, 1], [1, 1], 2, True),
        (x, w, "b", [1, 1], [1, 1], [1, 1], 2, 1),
        (x.as_subclass(Sub), w, None, [1, 1], [1, 1], [1, 1], 2, 1),
        (x, w.as_subclass(Sub), None, [1, 1], [1, 1], [1, 1], 2, 1),
        (x.to(torch.int64), w, None, [1, 1], [1, 1], [1, 1], 2, 1),
        (x.to("meta"), w.to("meta"), None, [1, 1], [1, 1], [1, 1], 2, 1),
        (x[0], w, None, [1, 1], [1, 1], [1, 1], 2, 1),  # unbatched: F unsqueezes first
        ok[:7],
    ]
    for i, args in enumerate(declined):
        assert _DIRECT_CONV(*args) is None, i
    assert torch.equal(_DIRECT_CONV(*ok), F.conv2d(x, w, None, 1, 1, 1, 2))
    # the op's own checks on the plain case: the usual errors
    with pytest.raises(RuntimeError, match="groups"):
        _DIRECT_CONV(x, w, None, [1, 1], [1, 1], [1, 1], 3, 1)
    with pytest.raises(RuntimeError, match="shuffle_groups"):
        _DIRECT_CONV(x, w, None, [1, 1], [1, 1], [1, 1], 2, 3)


# -------------------------------------------------------------------- autograd
GRADCHECK = [
    (2, 4, 5, 4, 6, 3, 1, 1, 1, 2, 3),
    (1, 4, 6, 5, 8, 3, 2, 2, 2, 4, 2),  # depthwise, multiplier 2
    (2, 6, 3, 4, 4, 1, 1, 0, 1, 2, 2),  # direct 1x1
    (1, 3, 5, 6, 4, (2, 3), 1, "same", 1, 1, 1),
    (1, 18, 4, 5, 4, 3, 1, 1, 2, 1, 1),  # torch's convolution (PLATFORM)
    (2, 5, 6, 5, 5, 3, 2, 1, 1, 5, 1),  # depthwise: NHWC kernels for channels_last
]


@pytest.mark.parametrize("case", GRADCHECK, ids=[_id(c) for c in GRADCHECK])
def test_gradcheck(device, case):
    x, w, b = _tensors(case, torch.float64, device)
    args = _args(case)

    def fn(*t):
        return F.conv2d(*t, **args)

    torch.autograd.gradcheck(fn, (x, w, b))
    torch.autograd.gradgradcheck(fn, (x, w, b))
    xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    torch.autograd.gradcheck(fn, (xc, w, None))


def test_double_backward_matches_reference(device):
    case = (2, 6, 5, 5, 6, 3, 1, 1, 2, 3, 2)
    x, w, b = _tensors(case, torch.float32, device)
    args = _args(case)

    def second(fn, *t):
        out = fn(*t, **args)
        firsts = torch.autograd.grad(out.pow(2).sum(), t, create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in firsts), t)

    ours = second(F.conv2d, x, w, b)
    ref = second(R.conv2d, *[leaf(t, torch.float64) for t in (x, w, b)])
    for o, r, name in zip(ours, ref, ("ggx", "ggw", "ggb")):
        assert_close_to_ref(o, r, torch.float32, name=name)


def _opcheck_samples(device):
    ops = torch.ops.torchfuse
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        layouts = ("contiguous", "channels_last") if dtype == torch.float32 else ("contiguous",)
        for case, layout in [(c, lay) for c in (*GRADCHECK[:3], *GRADCHECK[4:])
                             for lay in layouts]:
            x, w, b = _tensors(case, dtype, device, layout=layout)
            s, p, d, g, sg = case[6:]
            p4 = [p, p, p, p]
            yield ops.conv2d.default, (x, w, b, [s, s], p4, [d, d], g, sg)
            yield ops.conv2d.default, (x, w, None, [s], [p], [d], g, sg)
            out = ops.conv2d(x.detach(), w.detach(), None, [s, s], p4, [d, d], g, sg)
            go = randn(*out.shape, dtype=dtype, device=device)
            for mask in ([True, True, True], [True, False, False], [False, True, True]):
                yield ops.conv2d_backward.default, (go, x.detach(), w.detach(), [s, s], p4,
                                                    [d, d], g, sg, mask)


def test_opcheck(device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)


def test_compile_fullgraph(device):
    torch._dynamo.reset()

    def block(x, w1, w2):
        y = F.conv2d(x, w1, None, 1, 1, 1, 4, 2)
        return F.conv2d(torch.relu(y), w2, None, 1, "same", 2, 2)

    x = randn(2, 4, 6, 6, device=device, requires_grad=True)
    w1 = randn(8, 1, 3, 3, device=device, requires_grad=True)
    w2 = randn(6, 4, 3, 3, device=device, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x, w1, w2)
    grads = torch.autograd.grad(out.sum(), (x, w1, w2))
    out_e = block(x, w1, w2)
    grads_e = torch.autograd.grad(out_e.sum(), (x, w1, w2))
    torch.testing.assert_close(out, out_e)
    for g, e in zip(grads, grads_e):
        torch.testing.assert_close(g, e)


def test_compile_inductor(device):
    torch._dynamo.reset()
    m = torchfuse.nn.Conv2d(6, 12, 3, padding=2, dilation=2, groups=3, shuffle_groups=3)
    m = m.to(device)
    compiled = torch.compile(m, fullgraph=True)
    x = randn(2, 6, 7, 7, device=device).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m(x))


# ------------------------------------------------------------------- bad input
def _bad_cases(device):
    x = randn(2, 4, 6, 6, device=device)
    w = randn(6, 2, 3, 3, device=device)
    b = randn(6, device=device)
    return [
        ("groups", (x, w, b), dict(groups=0)),
        ("groups", (x, w, b), dict(groups=-2)),
        ("channels", (x, w, b), dict(groups=3)),
        ("channels", (x, randn(6, 3, 3, 3, device=device), b), dict()),
        ("divisible", (x, randn(5, 2, 3, 3, device=device), None), dict(groups=2)),
        ("at least", (x, randn(0, 2, 3, 3, device=device), None), dict(groups=2)),
        ("at least", (x[:, :2], randn(0, 2, 3, 3, device=device), None), dict()),
        ("stride", (x, w, b), dict(groups=2, stride=0)),
        ("stride", (x, w, b), dict(groups=2, stride=(1, 1, 1))),
        ("padding", (x, w, b), dict(groups=2, padding=-1)),
        ("padding", (x, w, b), dict(groups=2, padding="same", stride=2)),
        ("padding", (x, w, b), dict(groups=2, padding="full")),
        ("dilation", (x, w, b), dict(groups=2, dilation=0)),
        ("bias", (x, w, randn(5, device=device)), dict(groups=2)),
        ("bias", (x, w, randn(6, 1, device=device)), dict(groups=2)),
        ("input", (randn(4, 6, device=device), w, b), dict(groups=2)),
        ("input", (randn(1, 4, 6, 6, 1, device=device), w, b), dict(groups=2)),
        ("input", (randn(2, 4, 0, 6, device=device), w, b), dict(groups=2, padding=2)),
        ("Kernel size", (x, randn(6, 2, 7, 7, device=device), b), dict(groups=2)),
        ("weight", (x, w.double(), b), dict(groups=2)),
        ("bias", (x, w, b.double()), dict(groups=2)),
        ("input", ("x", w, b), dict(groups=2)),
        ("weight", (x, "w", b), dict(groups=2)),
        ("bias", (x, w, 3), dict(groups=2)),
        ("groups", (x, w, b), dict(groups=2.0)),
        ("stride", (x, w, b), dict(groups=2, stride=1.5)),
    ]


@pytest.mark.parametrize("case", range(26))
def test_bad_input_like_torch(device, case):
    arg, inputs, kw = _bad_cases(device)[case]
    assert_raises_like_torch(lambda: TF.conv2d(*inputs, **kw),
                             lambda: F.conv2d(*inputs, **kw), arg)


def test_bad_shuffle_groups(device):
    x = randn(2, 4, 6, 6, device=device)
    w = randn(6, 2, 3, 3, device=device)
    for bad, exc in ((4, RuntimeError), (0, RuntimeError), (True, TypeError),
                     (2.0, TypeError)):
        with pytest.raises(exc, match="shuffle_groups"):
            F.conv2d(x, w, groups=2, shuffle_groups=bad)
    with pytest.raises(ValueError, match="shuffle_groups"):
        torchfuse.nn.Conv2d(4, 6, 3, shuffle_groups=4)


def test_backward_op_bad_input(device):
    ops = torch.ops.torchfuse
    x = randn(2, 4, 6, 6, device=device)
    w = randn(6, 2, 3, 3, device=device)
    go = randn(2, 6, 4, 4, device=device)
    args = ([1, 1], [0], [1], 2, 1, [True, True, True])
    ops.conv2d_backward(go, x, w, *args)  # the right shapes pass
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.conv2d_backward(go[:, :, :3], x, w, *args)
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.conv2d_backward(go.double(), x, w, *args)
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.conv2d_backward(go[:1], x, w, *args)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
def test_bad_device():
    x = randn(2, 4, 6, 6, device="cuda")
    with pytest.raises(RuntimeError, match="weight"):
        F.conv2d(x, randn(6, 2, 3, 3), groups=2)
    with pytest.raises(RuntimeError, match="bias"):
        F.conv2d(x, randn(6, 2, 3, 3, device="cuda"), randn(6), groups=2)


# --------------------------------------------------------------------- modules
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_module_is_drop_in(device, padding_mode):
    torch.manual_seed(1)
    ref = torch.nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=4,
                          padding_mode=padding_mode).to(device)
    m = torchfuse.nn.Conv2d.from_torch(ref)
    assert isinstance(m, torch.nn.Conv2d)
    assert list(m.state_dict()) == list(ref.state_dict())
    assert m.weight is ref.weight and m.extra_repr() == ref.extra_repr()
    x = randn(2, 8, 9, 9, device=device, requires_grad=True)
    out, gx = _run(m, (x,), torch.ones(2, 16, 9, 9, device=device))[:2]
    out_r, gx_r = _run(ref, (x,), torch.ones(2, 16, 9, 9, device=device))[:2]
    torch.testing.assert_close(out, out_r)
    torch.testing.assert_close(gx, gx_r)


def test_module_shuffle_groups(device):
    torch.manual_seed(1)
    m = torchfuse.nn.Conv2d(6, 12, 1, groups=3, shuffle_groups=3, device=device)
    assert m.extra_repr().endswith("shuffle_groups=3")
    x = randn(2, 6, 5, 5, device=device)
    expected = TF.channel_shuffle(TF.conv2d(x, m.weight, m.bias, groups=3), 3)
    torch.testing.assert_close(m(x), expected)


def test_convert_swaps_grouped_and_dilated_convolutions(device):
    """API.md: every zero-padded Conv2d that is grouped or dilated."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),                        # plain: kept
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),              # depthwise
        torch.nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=8),  # depthwise, x2
        torch.nn.Conv2d(16, 12, 3, padding=2, dilation=2),          # dilated
        torch.nn.Conv2d(12, 12, 3, padding=1, groups=12, padding_mode="reflect"),  # kept
        torch.nn.Conv2d(12, 36, 1, groups=3),                       # grouped
        torch.nn.Conv2d(36, 6, 3, padding=1, groups=2),             # grouped, 18 per group
    ).to(device)
    conv = torchfuse.convert(model)
    kinds = [type(m) for m in conv]
    assert kinds == [torch.nn.Conv2d, torchfuse.nn.Conv2d, torchfuse.nn.Conv2d,
                     torchfuse.nn.Conv2d, torch.nn.Conv2d, torchfuse.nn.Conv2d,
                     torchfuse.nn.Conv2d]
    assert list(conv.state_dict()) == list(model.state_dict())
    assert torch.equal(conv[1].weight, model[1].weight)
    assert type(model[1]) is torch.nn.Conv2d  # not in place by default
    x = randn(2, 3, 10, 10, device=device, requires_grad=True)
    out, gx = _run(conv, (x,), torch.ones(2, 6, 10, 10, device=device))[:2]
    out_r, gx_r = _run(model, (x,), torch.ones(2, 6, 10, 10, device=device))[:2]
    torch.testing.assert_close(out, out_r)
    torch.testing.assert_close(gx, gx_r)


@pytest.mark.parametrize("name", ["resnext50_32x4d", "mobilenet_v2", "deeplabv3_resnet50"])
def test_convert_torchvision_model(device, name):
    """A whole network converted (random weights, nothing downloaded): every
    path (direct kernels, torch's convolution, grouped, depthwise, dilated)
    in one forward and backward, against the unconverted network in float64
    at float32 tolerance."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    make = getattr(tv.models, name, None) or getattr(tv.models.segmentation, name)
    kwargs = {"weights_backbone": None, "aux_loss": False} if "deeplab" in name else {}
    model = make(weights=None, **kwargs).eval().to(device)
    conv = torchfuse.convert(model)
    swapped = [m for m in conv.modules() if type(m) is torchfuse.nn.Conv2d]
    assert swapped and all(m.groups > 1 or max(m.dilation) > 1 for m in swapped)
    if "deeplab" in name:
        assert any(max(m.dilation) > 1 and m.groups == 1 for m in swapped)

    def run(net, x):
        out = net(x)
        out = out["out"] if isinstance(out, dict) else out
        return out, torch.autograd.grad(out.sum(), x)[0]

    x = randn(2, 3, 40, 40, device=device)
    out, gx = run(conv, x.clone().requires_grad_())
    ref_out, ref_gx = run(copy.deepcopy(model).double(), x.double().requires_grad_())
    assert_close_to_ref(out, ref_out, torch.float32, name="out")
    assert_close_to_ref(gx, ref_gx, torch.float32, name="grad_input")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_autocast_like_torch(device, compiled):
    """A converted model under autocast: torch's convolution hands the
    depthwise one a low-precision activation while its weight stays float32;
    conv2d casts every operand to the autocast dtype as torch's does, and
    gives torch's result."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU6(),
        torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.Conv2d(16, 8, 1),
    ).to(device)
    conv = torchfuse.convert(model)
    assert type(conv[2]) is torchfuse.nn.Conv2d
    run = torch.compile(conv, fullgraph=True, backend="aot_eager") if compiled else conv
    if compiled:
        torch._dynamo.reset()
    dt = torch.bfloat16 if device == "cpu" else torch.float16
    x = randn(2, 3, 10, 10, device=device, requires_grad=True)
    with torch.autocast(device, dtype=dt):
        out = run(x)
        out_r = model(x)
    assert out.dtype == dt
    torch.testing.assert_close(out, out_r)
    (gx,) = torch.autograd.grad(out.float().sum(), x)
    (gx_r,) = torch.autograd.grad(out_r.float().sum(), x)
    assert gx.dtype == torch.float32
    torch.testing.assert_close(gx, gx_r)


# ----------------------------------------------------------------- determinism
@pytest.mark.parametrize("case,layout", [(GROUPED, "contiguous"), (DEPTHWISE_S2, "contiguous"),
                                         (IM2COL, "contiguous"), (NHWC[1], "channels_last")],
                         ids=["grouped", "depthwise", "im2col", "depthwise-cl"])
def test_deterministic(device, case, layout):
    x, w, b = _tensors((4, *case[1:]), torch.float32, device, layout=layout)
    args = _args(case)

    def run():
        out = F.conv2d(x, w, b, **args)
        return (out, *torch.autograd.grad(out, (x, w, b), torch.ones_like(out)))

    first = run()
    for a, r in zip(first, run()):
        assert torch.equal(a, r)
    if device == "cpu":
        n = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            # fixed summation orders: the thread count changes no bit
            for a, r in zip(first, run()):
                assert torch.equal(a, r)
        finally:
            torch.set_num_threads(n)


# ------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
@pytest.mark.parametrize("groups,kernel", [(116, 3), (3, 1), (32, 3)])
def test_cuda_graph_capture(groups, kernel):
    c = 116 if groups == 116 else 96
    x = randn(4, c, 28, 28, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = randn(c, c // groups, kernel, kernel, device="cuda", dtype=torch.bfloat16,
              requires_grad=True)
    pad = kernel // 2

    def step():
        out = F.conv2d(x, w, None, 1, pad, 1, groups, 2)
        return (out, *torch.autograd.grad(out, (x, w), torch.ones_like(out)))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = step()
    with torch.no_grad():
        x.copy_(randn(4, c, 28, 28, device="cuda", dtype=torch.bfloat16))
    g.replay()
    torch.cuda.synchronize()
    for a, e in zip(captured, step()):
        assert torch.equal(a, e)
