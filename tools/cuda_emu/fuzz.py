"""Random shapes, layouts and options for every op, run through the CUDA
kernels in the emulator (or, with --cpu, the CPU kernels) and checked against
torchfuse.reference in float64, forward and backward, with the tolerance of
tests/conftest.py for float32 (low precision: 1e-2 relative to the largest
magnitude). Finds shapes the unit tests do not list.

    python tools/cuda_emu/fuzz.py [--cpu] [--seconds 300] [--seed 0] [--op group_norm]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "python"))


def _spatial(rng, ndim, cap):
    return [rng.randint(1, cap) for _ in range(ndim)]


def _layout(rng, x):
    if x.dim() == 4 and rng.random() < 0.5:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5 and rng.random() < 0.5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def _offset(rng, x):
    """Sometimes the same values in a view one element into a larger buffer
    (same strides): not 16-byte aligned, so vector paths must not be taken."""
    if rng.random() < 0.7:
        return x
    buf = torch.empty(x.numel() + 1, dtype=x.dtype)
    view = buf[1:].as_strided(x.shape, x.stride())
    view.copy_(x)
    return view


def case_group_norm(rng, F, R):
    G, D = rng.randint(1, 8), rng.choice([1, 2, 3, 5, 8, 16, 33, 40])
    spatial = _spatial(rng, rng.randint(0, 3), 70)
    if D * torch.Size(spatial).numel() == 1:  # one element a group: rstd = eps^-1/2 amplifies
        D = 2                                 # rounding 316-fold, a degenerate case
    shape = [rng.randint(1, 3), G * D] + spatial
    act = rng.choice([None, "relu", "silu"])
    affine = rng.random() < 0.7
    x = torch.randn(shape, dtype=torch.float64) * rng.choice([1, 10]) + rng.choice([0, 5, 1e3])
    w = torch.randn(shape[1], dtype=torch.float64) if affine else None
    b = torch.randn(shape[1], dtype=torch.float64) if affine else None
    desc = f"group_norm {shape} G={G} act={act} affine={affine}"
    return desc, (lambda x, w, b: F.group_norm(x, G, w, b, 1e-5, act)), \
        (lambda x, w, b: R.group_norm(x, G, w, b, 1e-5, act)), [x, w, b]


def case_rms_norm(rng, F, R):
    nd = rng.randint(1, 2)
    norm = [rng.choice([2, 7, 64, 130, 1000, 4096, 5003])]
    if nd == 2:
        norm.append(rng.randint(1, 9))
    shape = _spatial(rng, rng.randint(0, 2), 9) + norm
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(norm, dtype=torch.float64) if rng.random() < 0.7 else None
    if rng.random() < 0.4:
        r = torch.randn(shape, dtype=torch.float64)
        return f"add_rms_norm {shape} {norm}", \
            (lambda x, r, w: F.add_rms_norm(x, r, norm, w, 1e-6)[0]), \
            (lambda x, r, w: R.add_rms_norm(x, r, norm, w, 1e-6)[0]), [x, r, w]
    return f"rms_norm {shape} {norm}", (lambda x, w: F.rms_norm(x, norm, w, 1e-6)), \
        (lambda x, w: R.rms_norm(x, norm, w, 1e-6)), [x, w]


def case_l2_norm(rng, F, R):
    shape = _spatial(rng, rng.randint(1, 4), 40)
    if rng.random() < 0.2:
        shape[rng.randrange(len(shape))] = rng.choice([513, 2000])
    dim = rng.randrange(len(shape))
    shape[dim] = max(shape[dim], 2)  # one element: x/|x| = sign(x), its gradient 0 up to rounding
    x = torch.randn(shape, dtype=torch.float64)
    if rng.random() < 0.1:
        x[(0,) * len(shape)] = 0
    w = torch.randn(shape[dim], dtype=torch.float64) if rng.random() < 0.6 else None
    return f"l2_norm {shape} dim={dim} weight={w is not None}", \
        (lambda x, w: F.l2_norm(x, w, dim)), (lambda x, w: R.l2_norm(x, w, dim)), [x, w]


def case_response_norm(rng, F, R):
    spatial = rng.random() < 0.5
    ndim = 2 if spatial else rng.randint(1, 3)
    shape = [rng.randint(1, 3), rng.randint(1, 70)] + _spatial(rng, ndim, 40)
    size = rng.choice([1, 2, 3, 4, 5, 7, 16, 33, 40])
    alpha, beta = rng.choice([1e-4, 2e-2, 1.0]), rng.choice([0.75, 0.5, 1.0, 1.3])
    k = rng.choice([1.0, 2.0])
    x = torch.randn(shape, dtype=torch.float64)
    name = "spatial_response_norm" if spatial else "local_response_norm"
    f, r = getattr(F, name), getattr(R, name)
    return f"{name} {shape} size={size} a={alpha} b={beta} k={k}", \
        (lambda x: f(x, size, alpha, beta, k)), (lambda x: r(x, size, alpha, beta, k)), [x]


def case_channel_shuffle(rng, F, R):
    g = rng.randint(1, 6)
    tail = _spatial(rng, rng.randint(1, 3), 12)
    N = rng.randint(1, 3)
    if rng.random() < 0.5:
        C = g * rng.randint(1, 12)
        x = torch.randn([N, C] + tail, dtype=torch.float64)
        return f"channel_shuffle {[N, C] + tail} g={g}", (lambda x: F.channel_shuffle(x, g)), \
            (lambda x: R.channel_shuffle(x, g)), [x]
    total = g * rng.randint(1, 12)
    cuts = sorted(rng.sample(range(1, total), min(rng.randint(0, 10), total - 1)))
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [total])]
    pieces = [torch.randn([N, c] + tail, dtype=torch.float64) for c in sizes]
    return f"cat_shuffle {sizes} {[N] + tail} g={g}", (lambda *p: F.cat_shuffle(list(p), g)), \
        (lambda *p: R.cat_shuffle(list(p), g)), pieces


def case_conv2d(rng, F, R):
    """Any groups / stride / dilation / padding (4-sided too) / shuffle:
    both CPU paths (direct: <= 16 input channels per group) and, emulated,
    both CUDA ones (direct: depthwise, <= 8 outputs per group)."""
    groups = rng.choice([1, 1, 2, 3, 4, 8])
    cin_g = rng.choice([1, 1, 2, 3, 5, 16, 17]) if groups > 1 else rng.randint(1, 20)
    cout_g = rng.choice([1, 2, 3, 4, 5, 8, 9])
    kh, kw = rng.choice([1, 2, 3, 3, 5]), rng.choice([1, 2, 3, 3, 5])
    stride = [rng.choice([1, 1, 2, 3]) for _ in range(2)]
    dil = [rng.choice([1, 1, 2, 3]) for _ in range(2)]
    pad = [rng.randint(0, 4) for _ in range(4)]
    H = max(rng.randint(1, 20), dil[0] * (kh - 1) + 1 - pad[0] - pad[2])
    W = max(rng.randint(1, 20), dil[1] * (kw - 1) + 1 - pad[1] - pad[3])
    Cout = groups * cout_g
    shuffle = rng.choice([d for d in range(1, Cout + 1) if Cout % d == 0][:4])
    x = torch.randn(rng.randint(1, 3), groups * cin_g, H, W, dtype=torch.float64)
    w = torch.randn(Cout, cin_g, kh, kw, dtype=torch.float64)
    b = torch.randn(Cout, dtype=torch.float64) if rng.random() < 0.6 else None
    desc = (f"conv2d x={list(x.shape)} w={list(w.shape)} s={stride} p={pad} d={dil} "
            f"g={groups} shuffle={shuffle} bias={b is not None}")

    def ref(x, w, b):  # torch pads symmetric only: pad first
        xp = torch.nn.functional.pad(x, (pad[1], pad[3], pad[0], pad[2]))
        return R.conv2d(xp, w, b, stride, 0, dil, groups, shuffle)

    return desc, (lambda x, w, b: torch.ops.torchfuse.conv2d(
        x, w, b, stride, pad, dil, groups, shuffle)), ref, [x, w, b]


def case_gram(rng, F, R):
    shape = [rng.randint(1, 3), rng.randint(1, 40)] + _spatial(rng, rng.randint(0, 3), 12)
    normalize = rng.random() < 0.7
    x = torch.randn(shape, dtype=torch.float64)
    return f"gram_matrix {shape} normalize={normalize}", \
        (lambda x: F.gram_matrix(x, normalize)), (lambda x: R.gram_matrix(x, normalize)), [x]


CASES = {
    "group_norm": case_group_norm,
    "rms_norm": case_rms_norm,
    "l2_norm": case_l2_norm,
    "response_norm": case_response_norm,
    "channel_shuffle": case_channel_shuffle,
    "conv2d": case_conv2d,
    "gram_matrix": case_gram,
}


def check(rng, make, F, R):
    desc, ours, ref, args = make(rng, F, R)
    dtype = rng.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16])
    # the reference sees the inputs rounded to dtype, as the kernels do
    leaves64 = [a.to(dtype).double().requires_grad_() if a is not None else None for a in args]
    laid = []
    for a in args:
        if a is None:
            laid.append(None)
            continue
        t = _layout(rng, a.to(dtype)) if a.dim() >= 4 else a.to(dtype)
        laid.append(_offset(rng, t).detach().requires_grad_())
    strides = [None if t is None else (tuple(t.stride()), t.storage_offset()) for t in laid]
    desc = f"{desc} {str(dtype)[6:]} strides/offsets={strides}"
    out = ours(*laid)
    exp = ref(*leaves64)
    go = torch.randn(exp.shape, dtype=torch.float64).to(dtype).double()  # rounded, as dy
    go_d = go.to(dtype)
    if out.dim() == 4 and not out.is_contiguous():
        go_d = go_d.contiguous(memory_format=torch.channels_last)
    got = torch.autograd.grad(out, [t for t in laid if t is not None], go_d, allow_unused=True)
    want = torch.autograd.grad(exp, [t for t in leaves64 if t is not None], go, allow_unused=True)
    rel = 2e-5 if dtype == torch.float32 else 2e-2
    pairs = [("out", out, exp)] + [(f"grad{i}", o, e) for i, (o, e) in enumerate(zip(got, want))]
    for name, o, e in pairs:
        if e is None and o is None:
            continue
        if e is None:
            e = torch.zeros_like(o, dtype=torch.float64)
        if o is None:
            o = torch.zeros_like(e)
        if torch.isnan(e).any():
            continue
        scale = max(e.abs().max().item() if e.numel() else 1.0, 1e-3)
        if name != "out":  # gradients that cancel to ~0: rounding relative to dy
            scale = max(scale, 0.1 * go.abs().max().item())
        err = (o.double() - e).abs().nan_to_num(float("inf")).max().item() if e.numel() else 0.0
        if not err <= rel * scale:
            return f"{desc}: {name} error {err:.3g} > {rel * scale:.3g}"
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true",
                    help="the CPU kernels, not the emulated CUDA ones")
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--op", choices=sorted(CASES), action="append")
    a = ap.parse_args()
    import torchfuse  # noqa: F401
    from torchfuse import functional as F
    from torchfuse import reference as R
    if not a.cpu:
        import build
        torch.ops.load_library(build.build())
    ops = a.op or sorted(CASES)
    rng = random.Random(a.seed)
    torch.manual_seed(a.seed)
    end, n, bad = time.time() + a.seconds, 0, 0
    while time.time() < end:
        make = CASES[rng.choice(ops)]
        try:
            msg = check(rng, make, F, R)
        except Exception as e:  # noqa: BLE001
            msg = f"{make.__name__}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
        n += 1
        if msg:
            bad += 1
            print("FAIL", msg, flush=True)
    print(f"{n} cases, {bad} failures")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
