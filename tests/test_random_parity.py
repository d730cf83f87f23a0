"""Randomized parity: every op on seeded random shapes, dtypes, memory layouts
(contiguous, channels_last, a slice of a wider tensor, transposed storage)
and arguments, forward and every gradient against torch in float64, with the
tolerance rules of assert_close_to_ref (low precision: against torch's own
error in that dtype). The hand-written tests pick the cases that matter; these
cover the combinations between them, on the CPU kernels and (make test-emu,
a GPU) the CUDA ones. A failure names the op, the seed and the case.

The generators keep clear of inputs whose float64 reference is decided by
rounding (all values of a group equal after the cast, a ReLU input of exactly
zero, groups and vectors so small that their gradient is zero in exact arithmetic):
the dedicated tests of each op cover those numerics on purpose.
tools/cuda_emu/fuzz.py is the open-ended counterpart (timed runs of any length,
against torchfuse.reference); this is the fixed set CI runs."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as TF

from torchfuse import functional as F
from torchfuse import reference as R

from conftest import assert_close_to_ref

DTYPES = [torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64]
CASES_PER_TEST = 4
SEEDS = range(25)


def _layout(rng, x):
    """x's values in a random memory layout."""
    k = rng.randrange(4)
    if k == 1 and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    if k == 2:  # a slice of a wider tensor along the last dimension
        wide = torch.zeros(*x.shape[:-1], x.shape[-1] + 3, dtype=x.dtype, device=x.device)
        wide[..., 1:-2] = x
        return wide[..., 1:-2]
    if k == 3 and x.dim() >= 2:  # transposed storage
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    return x.contiguous()


class Case:
    """ours(*inputs) against ref(*inputs): ref is torch's function (or
    torchfuse.reference where torch has none), run in float64 for the truth
    and in the dtype for its own low-precision error."""

    def __init__(self, desc, ours, ref, inputs, grads, out_dtype=None, rounded=False):
        self.desc, self.ours, self.ref, self.inputs, self.grads = desc, ours, ref, inputs, grads
        self.out_dtype = out_dtype or inputs[0].dtype  # of every output
        # the low-precision yardstick: the float64 result rounded to the
        # dtype instead of torch's own (where that is unreliable)
        self.rounded = rounded


def _randn(rng, *shape, dtype, device, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    t = torch.randn(tuple(shape), dtype=torch.float64, generator=g) * scale + shift
    return t.to(device=device, dtype=dtype)


def gen_rms_norm(rng, dtype, device):
    nd = rng.randint(1, 4)
    shape = [rng.randint(1, 9) for _ in range(nd)]
    if rng.random() < 0.4:
        shape[-1] = rng.choice([64, 130, 1024])
    shape[-1] = max(shape[-1], 2)
    ns = shape[nd - rng.randint(1, nd):]
    eps = rng.choice([None, 1e-6, 0.0, 1.0])
    ref_eps = torch.finfo(dtype).eps if eps is None else eps
    w = _randn(rng, *ns, dtype=dtype, device=device) if rng.random() < 0.7 else None
    x = _randn(rng, *shape, dtype=dtype, device=device, scale=rng.choice([1.0, 1e-3, 100.0]))
    if rng.random() < 0.5:
        return Case(f"rms_norm {shape} {ns} eps={eps} weight={w is not None}",
                    lambda x, w: F.rms_norm(x, ns, w, eps),
                    lambda x, w: TF.rms_norm(x, ns, w, ref_eps), [x, w], [True, w is not None])
    r = _randn(rng, *shape, dtype=dtype, device=device)

    def ref(x, r, w):
        s = x + r
        return TF.rms_norm(s, ns, w, ref_eps), s

    return Case(f"add_rms_norm {shape} {ns} eps={eps}",
                lambda x, r, w: F.add_rms_norm(x, r, ns, w, eps), ref, [x, r, w],
                [True, True, w is not None])


def gen_group_norm(rng, dtype, device):
    nd = rng.randint(2, 5)
    G, D = rng.randint(1, 6), rng.randint(1, 5)
    sp = [rng.randint(1, 9) for _ in range(nd - 2)]
    if sp and rng.random() < 0.2:
        sp[-1] = rng.choice([100, 257])
    if D * math.prod(sp) < 4:  # at 1 or 2 elements a group's dx vanishes in exact arithmetic
        D = 4
    act = rng.choice([None, "relu", "silu"])
    shift = 0.0 if act == "relu" else rng.choice([0.0, 5.0])
    x = _randn(rng, rng.randint(1, 3), G * D, *sp, dtype=dtype, device=device, shift=shift)
    w = _randn(rng, G * D, dtype=dtype, device=device) if rng.random() < 0.7 else None
    b = _randn(rng, G * D, dtype=dtype, device=device) if rng.random() < 0.7 else None
    eps = rng.choice([1e-5, 1e-3, 0.1])

    def ref(x, w, b):
        y = TF.group_norm(x, G, w, b, eps)
        if act is None:
            return y
        return TF.relu(y) if act == "relu" else TF.silu(y)

    return Case(f"group_norm {list(x.shape)} groups={G} act={act} eps={eps} "
                f"weight={w is not None} bias={b is not None}",
                lambda x, w, b: F.group_norm(x, G, w, b, eps, act), ref, [x, w, b],
                [True, w is not None, b is not None])


def gen_response_norm(rng, dtype, device):
    nd = rng.randint(3, 5)
    C = rng.randint(1, 12)
    sp = [rng.randint(1, 8) for _ in range(nd - 2)]
    size = rng.randint(1, C + 3)
    alpha, beta, k = rng.choice([1e-4, 0.5, 1.0]), rng.choice([0.5, 0.75, 2.0]), rng.choice(
        [0.5, 1.0, 2.0])
    x = _randn(rng, rng.randint(1, 3), C, *sp, dtype=dtype, device=device)
    if nd == 4 and rng.random() < 0.5:
        return Case(f"spatial_response_norm {list(x.shape)} size={size} {alpha} {beta} {k}",
                    lambda x: F.spatial_response_norm(x, size, alpha, beta, k),
                    lambda x: R.spatial_response_norm(x, size, alpha, beta, k), [x], [True])
    return Case(f"local_response_norm {list(x.shape)} size={size} {alpha} {beta} {k}",
                lambda x: F.local_response_norm(x, size, alpha, beta, k),
                lambda x: TF.local_response_norm(x, size, alpha, beta, k), [x], [True])


def gen_l2_norm(rng, dtype, device):
    nd = rng.randint(1, 4)
    shape = [rng.randint(1, 7) for _ in range(nd)]
    if rng.random() < 0.3:
        shape[-1] = rng.choice([64, 513])
    dim = rng.randrange(-nd, nd)
    shape[dim] = max(shape[dim], 2)
    eps = rng.choice([1e-12, 1e-3])
    x = _randn(rng, *shape, dtype=dtype, device=device)
    if rng.random() < 0.5:
        return Case(f"normalize {shape} dim={dim} eps={eps}",
                    lambda x: F.normalize(x, 2.0, dim, eps),
                    lambda x: TF.normalize(x, 2.0, dim, eps), [x], [True])
    w = _randn(rng, shape[dim], dtype=dtype, device=device) if rng.random() < 0.8 else None

    def ref(x, w):
        y = TF.normalize(x, 2.0, dim, eps)
        if w is None:
            return y
        view = [1] * nd
        view[dim] = -1
        return y * w.view(view)

    return Case(f"l2_norm {shape} dim={dim} eps={eps} weight={w is not None}",
                lambda x, w: F.l2_norm(x, w, dim, eps), ref, [x, w], [True, w is not None])


def gen_cosine_linear(rng, dtype, device):
    lead = [rng.randint(1, 5) for _ in range(rng.randint(0, 2))]
    fin, fout = rng.randint(2, 40), rng.randint(1, 30)
    x = _randn(rng, *lead, fin, dtype=dtype, device=device)
    w = _randn(rng, fout, fin, dtype=dtype, device=device)
    b = _randn(rng, fout, dtype=dtype, device=device) if rng.random() < 0.5 else None
    eps = rng.choice([1e-8, 1e-3])

    def ref(x, w, b):
        y = TF.normalize(x, dim=-1, eps=eps) @ TF.normalize(w, dim=1, eps=eps).T
        return y if b is None else y + b

    return Case(f"cosine_linear {lead + [fin]} -> {fout} eps={eps} bias={b is not None}",
                lambda x, w, b: F.cosine_linear(x, w, b, eps), ref, [x, w, b],
                [True, True, b is not None])


def gen_shuffle(rng, dtype, device):
    nd = rng.randint(3, 5)
    groups = rng.randint(1, 5)
    sp = [rng.randint(1, 6) for _ in range(nd - 2)]
    N = rng.randint(1, 3)
    if rng.random() < 0.5:
        C = groups * rng.randint(1, 5)
        x = _randn(rng, N, C, *sp, dtype=dtype, device=device)
        return Case(f"channel_shuffle {list(x.shape)} groups={groups}",
                    lambda x: F.channel_shuffle(x, groups),
                    lambda x: TF.channel_shuffle(x, groups), [x], [True])
    chans = [rng.randint(1, 6) for _ in range(rng.randint(1, 4))]
    chans[-1] += -sum(chans) % groups
    xs = [_randn(rng, N, c, *sp, dtype=dtype, device=device) for c in chans]
    return Case(f"cat_shuffle {[N, chans, *sp]} groups={groups}",
                lambda *xs: F.cat_shuffle(list(xs), groups),
                lambda *xs: TF.channel_shuffle(torch.cat(xs, 1), groups), xs, [True] * len(xs))


def gen_conv2d(rng, dtype, device):
    groups, cin_g, cout_g = rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 4)
    if rng.random() < 0.3:  # depthwise, channel multiplier 1 or 2
        cin_g, cout_g = 1, rng.choice([1, 1, 2])
    if rng.random() < 0.3:  # network-like channel counts
        groups = rng.choice([1, 2, 8, 32])
        cin_g = rng.choice([1, 4, 8]) if groups < 32 else 1
        cout_g = rng.choice([1, 2, 4])
    kh, kw = rng.choice([(1, 1), (3, 3), (5, 5), (rng.randint(1, 4), rng.randint(1, 4))])
    stride = (rng.randint(1, 3), rng.randint(1, 3))
    dilation = (rng.randint(1, 2), rng.randint(1, 2))
    padding = rng.choice([0, 1, (rng.randint(0, 2), rng.randint(0, 2)), "same", "valid"])
    if padding == "same":
        stride = (1, 1)
    H = max(rng.randint(kh, 20), (kh - 1) * dilation[0] + 1)
    W = max(rng.randint(kw, 20), (kw - 1) * dilation[1] + 1)
    Cout = groups * cout_g
    shuffle = rng.choice([1, 1, 2, 3])
    if Cout % shuffle:
        shuffle = 1
    x = _randn(rng, rng.randint(1, 3), groups * cin_g, H, W, dtype=dtype, device=device)
    w = _randn(rng, Cout, cin_g, kh, kw, dtype=dtype, device=device)
    b = _randn(rng, Cout, dtype=dtype, device=device) if rng.random() < 0.5 else None
    unbatched = rng.random() < 0.15
    if unbatched:
        x = x[0]

    # torch's own float16 convolution (oneDNN, AVX512_FP16 CPUs) segfaults on
    # some 1-tap sides dilated (see test_conv2d_one_tap_side_dilated): the
    # reference takes that dilation as 1, which changes nothing there. Its
    # bfloat16 one returned garbage for some degenerate shapes (see
    # test_conv2d_shapes_onednn_got_wrong): the yardstick is the rounded
    # float64 result.
    ref_dilation = tuple(1 if k == 1 else d for k, d in zip((kh, kw), dilation))

    def ref(x, w, b):
        y = TF.conv2d(x, w, b, stride, padding, ref_dilation, groups)
        if shuffle == 1:
            return y
        return TF.channel_shuffle(y[None], shuffle)[0] if unbatched else TF.channel_shuffle(
            y, shuffle)

    return Case(f"conv2d x={list(x.shape)} w={list(w.shape)} bias={b is not None} "
                f"stride={stride} padding={padding} dilation={dilation} groups={groups} "
                f"shuffle={shuffle}",
                lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation, groups, shuffle),
                ref, [x, w, b], [True, True, b is not None], rounded=True)


def gen_gram(rng, dtype, device):
    nd = rng.randint(2, 5)
    N, C = rng.randint(1, 3), rng.randint(1, 20)
    sp = [rng.randint(1, 9) for _ in range(nd - 2)]
    x = _randn(rng, N, C, *sp, dtype=dtype, device=device)
    div = C * math.prod(sp)

    def gram(x, normalize=True):
        m = x.reshape(N, C, -1)
        g = m @ m.transpose(1, 2)
        return g / div if normalize else g

    if rng.random() < 0.5:
        normalize = rng.random() < 0.7
        return Case(f"gram_matrix {list(x.shape)} normalize={normalize}",
                    lambda x: F.gram_matrix(x, normalize), lambda x: gram(x, normalize), [x],
                    [True])
    reduction = rng.choice(["mean", "sum", "none"])
    t = _randn(rng, *rng.choice([[C, C], [N, C, C]]), dtype=dtype, device=device, scale=0.1)
    lowp = dtype in (torch.float16, torch.bfloat16) and reduction != "none"  # 0-dim: float32
    return Case(f"style_loss {list(x.shape)} target={list(t.shape)} {reduction}",
                lambda x, t: F.style_loss(x, t, reduction),
                lambda x, t: TF.mse_loss(gram(x), t.expand(N, C, C), reduction=reduction),
                [x, t], [True, True], torch.float32 if lowp else None)


GENERATORS = {
    "rms_norm": gen_rms_norm,
    "group_norm": gen_group_norm,
    "response_norm": gen_response_norm,
    "l2_norm": gen_l2_norm,
    "cosine_linear": gen_cosine_linear,
    "shuffle": gen_shuffle,
    "conv2d": gen_conv2d,
    "gram": gen_gram,
}


def _run(fn, inputs, grads, grad_outs):
    """fn's outputs (a tuple) and the gradients of sum(out * grad_out) with
    respect to the inputs marked in grads; grad_outs: a list, or a function
    of the outputs that makes it."""
    leaves = [t.detach().clone().requires_grad_(g) if t is not None else None
              for t, g in zip(inputs, grads)]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if callable(grad_outs):
        grad_outs = grad_outs(outs)
    wrt = [t for t, g in zip(leaves, grads) if g]
    loss = sum((o * go.to(o.dtype)).sum() for o, go in zip(outs, grad_outs))
    return outs, torch.autograd.grad(loss, wrt)


def _torch_same_dtype(case, grad_outs):
    """torch's own result in the case's dtype; where torch has no kernel for
    it, computed in float32 and rounded (as test_lrn does)."""
    try:
        return _run(case.ref, case.inputs, case.grads, grad_outs)
    except (NotImplementedError, RuntimeError):
        dtype = case.inputs[0].dtype
        up = [t.float() if t is not None else None for t in case.inputs]
        outs, gs = _run(case.ref, up, case.grads, grad_outs)
        return tuple(o.to(dtype) for o in outs), tuple(g.to(dtype) for g in gs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("op", list(GENERATORS))
def test_random_parity(device, op, seed):
    rng = random.Random(f"{op}-{seed}")
    for i in range(CASES_PER_TEST):
        dtype = rng.choice(DTYPES)
        case = GENERATORS[op](rng, dtype, device)
        where = f"{op} seed={seed} case={i} {dtype}: {case.desc}"
        ref_inputs = [t.double() if t is not None else None for t in case.inputs]
        grad_outs = []

        def make_grad_outs(outs, case=case, grad_outs=grad_outs):
            # in the outputs' dtype, so that every side's backward starts
            # from the same values
            grad_outs.extend(_randn(rng, *o.shape, dtype=case.out_dtype, device=device).double()
                             for o in outs)
            return grad_outs

        want, want_grads = _run(case.ref, ref_inputs, case.grads, make_grad_outs)
        laid_out = [_layout(rng, t) if t is not None else None for t in case.inputs]
        got, got_grads = _run(case.ours, laid_out, case.grads, grad_outs)
        theirs, their_grads = (None, [None] * len(want_grads))
        if dtype in (torch.float16, torch.bfloat16) and case.rounded:
            theirs = tuple(w.to(dtype) for w in want)
            their_grads = tuple(w.to(dtype) for w in want_grads)
        elif dtype in (torch.float16, torch.bfloat16):
            theirs, their_grads = _torch_same_dtype(case, grad_outs)
        for j, (o, w) in enumerate(zip(got, want)):
            assert o.dtype == case.out_dtype, f"{where}: output {j} dtype {o.dtype}"
            assert_close_to_ref(o, w, dtype, theirs[j] if theirs else None,
                                name=f"{where}: output {j}")
        for j, (gr, w, t) in enumerate(zip(got_grads, want_grads, their_grads)):
            assert_close_to_ref(gr, w, dtype, t, name=f"{where}: gradient {j}")
