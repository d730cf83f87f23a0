"""Local and spatial response norm: fake kernels and autograd for
torchfuse::local_response_norm, spatial_response_norm and their backward ops
(schemas in csrc/torchfuse.cpp). Only the input is saved for the backward."""

from __future__ import annotations

import torch

from ..reference import window_sum
from . import acc_dtype, op_defined, register_autograd


def _windows(spatial: bool, size: int):
    """(dims, lo, hi) of the forward window, with the scale divisor."""
    if spatial:
        return (2, 3), (size - 1) // 2, size // 2, size * size
    return (1,), size // 2, (size - 1) // 2, size


def _wsum(t, dims, lo, hi):
    for d in dims:
        t = window_sum(t, d, lo, hi)
    return t


def backward_formula(grad_out, x, size, alpha, beta, k, spatial):
    """dx = dy * s^-beta - 2 alpha_n beta x * reflected_window(dy * y / s),
    written with differentiable torch ops (double backward, and the autograd
    formula of the backward op)."""
    dims, lo, hi, div = _windows(spatial, size)
    acc = acc_dtype(x.dtype)
    xf, gf = x.to(acc), grad_out.to(acc)
    a = alpha / div
    s = k + a * _wsum(xf * xf, dims, lo, hi)
    r = s.pow(-beta)
    u = _wsum(gf * xf * r / s, dims, hi, lo)
    return (gf * r - (2 * a * beta) * xf * u).to(x.dtype)


def _out_like(input):
    """Empty tensor in the memory format the C++ op returns (torch's)."""
    fmt = torch.contiguous_format
    if not input.is_contiguous():
        if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
            fmt = torch.channels_last
        elif input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d):
            fmt = torch.channels_last_3d
    return torch.empty(input.shape, dtype=input.dtype, device=input.device).to(
        memory_format=fmt)


def _register(name: str, spatial: bool) -> None:
    fwd = f"torchfuse::{name}"
    bwd_name = f"{name}_backward"

    @torch.library.register_fake(fwd)
    def _fake(input, size, alpha, beta, k):
        return _out_like(input)

    def _setup(ctx, inputs, output):
        input, size, alpha, beta, k = inputs
        ctx.save_for_backward(input)
        ctx.args = (size, alpha, beta, k)

    def _backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        if torch.is_grad_enabled():  # double backward: stay differentiable
            gx = backward_formula(grad_out, x, *ctx.args, spatial)
        else:
            gx = getattr(torch.ops.torchfuse, bwd_name)(grad_out, x, *ctx.args)
        return gx, None, None, None, None

    register_autograd(name, _backward, _setup)

    @torch.library.register_fake(f"torchfuse::{bwd_name}")
    def _bwd_fake(grad_out, input, size, alpha, beta, k):
        return _out_like(input)

    def _bwd_setup(ctx, inputs, output):
        grad_out, input, size, alpha, beta, k = inputs
        ctx.save_for_backward(grad_out, input)
        ctx.args = (size, alpha, beta, k)

    def _bwd_backward(ctx, ggx):
        saved = ctx.saved_tensors
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(n) for t, n in zip(saved, need)]
            gx = backward_formula(*leaves, *ctx.args, spatial)
            wrt = [t for t, n in zip(leaves, need) if n]
            got = iter(torch.autograd.grad(gx, wrt, ggx, allow_unused=True,
                                           create_graph=torch.is_grad_enabled())
                       if wrt else [])
        res = [next(got) if n else None for n in need]
        return res[0], res[1], None, None, None, None

    torch.library.register_autograd(
        f"torchfuse::{bwd_name}", _bwd_backward, setup_context=_bwd_setup
    )


if op_defined("local_response_norm"):
    _register("local_response_norm", spatial=False)
if op_defined("spatial_response_norm"):
    _register("spatial_response_norm", spatial=True)
