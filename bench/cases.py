"""Benchmark cases: real layer shapes per op. One function per op family
returns its cases; CASES is the registry run.py and test_bench.py use."""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from harness import Case

import torchfuse.functional as F


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------ RMSNorm
# LLM token x hidden shapes: Llama-2/3 7-8B (4096), 13B (5120), 70B (8192) and
# a small model (1024).
RMS_SHAPES = [(4096, 4096), (8192, 5120), (2048, 8192), (16384, 1024)]


def _rms_inputs(M, N, residual):
    def make(device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        d = {
            "x": torch.randn(M, N, generator=g).to(device, dtype).requires_grad_(),
            "weight": (1 + 0.1 * torch.randn(N, generator=g)).to(device, dtype).requires_grad_(),
        }
        if residual:
            d["residual"] = torch.randn(M, N, generator=g).to(device, dtype).requires_grad_()
        return d

    return make


def _tf_rms(x, weight):
    return F.rms_norm(x, (x.shape[-1],), weight, 1e-6)


def _eager_rms(x, weight):
    return TF.rms_norm(x, (x.shape[-1],), weight, 1e-6)


def _tf_add_rms(x, residual, weight):
    return F.add_rms_norm(x, residual, (x.shape[-1],), weight, 1e-6)


def _eager_add_rms(x, residual, weight):
    summed = x + residual
    return TF.rms_norm(summed, (x.shape[-1],), weight, 1e-6), summed


def rms_norm_cases() -> list[Case]:
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for residual in (False, True):
            for M, N in RMS_SHAPES:
                mn = M * N * _size(dtype)
                if residual:
                    # fwd: read x, residual; write out, summed. bwd: read dy,
                    # d(summed), summed; write dx (= d residual).
                    fwd, bwd = 4 * mn, 4 * mn
                else:
                    fwd, bwd = 2 * mn, 3 * mn  # read x, write out | read dy, x; write dx
                cases.append(Case(
                    op="add_rms_norm" if residual else "rms_norm",
                    name=f"{M}x{N}",
                    dtype=dtype,
                    make_inputs=_rms_inputs(M, N, residual),
                    torchfuse=_tf_add_rms if residual else _tf_rms,
                    eager=_eager_add_rms if residual else _eager_rms,
                    grad_inputs=("x", "residual", "weight") if residual else ("x", "weight"),
                    bytes_fwd=fwd,
                    bytes_bwd=bwd,
                ))
    return cases


# ---------------------------------------------------------- response norms
# AlexNet (conv1/conv2 outputs) and GoogLeNet v1 (pre-/post-conv2) LRN inputs.
LRN_SHAPES = [("alexnet1", 96, 55), ("alexnet2", 256, 27), ("googlenet1", 64, 56),
              ("googlenet2", 192, 56)]
LRN_BATCHES = (1, 32, 128)


def _lrn_inputs(N, C, HW):
    def make(device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        return {"x": torch.randn(N, C, HW, HW, generator=g).to(device, dtype).requires_grad_()}

    return make


def _tf_lrn(x):
    return F.local_response_norm(x, 5, 1e-4, 0.75, 2.0)


def _eager_lrn(x):
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        # torch's CPU LRN (avg_pool3d) has no float16/bfloat16 kernel: the
        # user's workaround is a float32 round trip.
        return TF.local_response_norm(x.float(), 5, 1e-4, 0.75, 2.0).to(x.dtype)
    return TF.local_response_norm(x, 5, 1e-4, 0.75, 2.0)


def _tf_srn(x):
    return F.spatial_response_norm(x, 3, 5e-5, 0.75, 1.0)


def _eager_srn(x):
    # torch has no within-channel LRN: the composite a user would write
    # (zero pad, avg_pool2d of x^2, scale, pow, divide).
    div = TF.avg_pool2d(TF.pad(x * x, (1, 1, 1, 1)), 3, stride=1)
    return x / (1.0 + 5e-5 * div).pow(0.75)


def lrn_cases() -> list[Case]:
    cases = []
    for op, tf, eager in (("local_response_norm", _tf_lrn, _eager_lrn),
                          ("spatial_response_norm", _tf_srn, _eager_srn)):
        for dtype in (torch.float32, torch.bfloat16):
            for N in LRN_BATCHES:
                for label, C, HW in LRN_SHAPES:
                    nbytes = N * C * HW * HW * _size(dtype)
                    cases.append(Case(
                        op=op, name=f"{label} {N}x{C}x{HW}x{HW}", dtype=dtype,
                        make_inputs=_lrn_inputs(N, C, HW), torchfuse=tf, eager=eager,
                        grad_inputs=("x",),
                        bytes_fwd=2 * nbytes,  # read x, write out
                        bytes_bwd=3 * nbytes,  # read dy, x; write dx
                    ))
    return cases


CASES: list[Case] = [*rms_norm_cases(), *lrn_cases()]
