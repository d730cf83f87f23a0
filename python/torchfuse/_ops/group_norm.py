"""GroupNorm (+ fused activation): fake kernels and autograd for
torchfuse::group_norm and group_norm_backward (schemas in csrc/torchfuse.cpp)."""

from __future__ import annotations

import torch

from ..reference import kept_format as memory_format
from . import acc_dtype, op_defined, register_autograd


def _act_grad(g: torch.Tensor, y: torch.Tensor, activation: str) -> torch.Tensor:
    """g * act'(y), differentiable."""
    if activation == "relu":
        return g * (y > 0).to(g.dtype)
    if activation == "silu":
        s = torch.sigmoid(y)
        return g * (s * (1 + y * (1 - s)))
    return g


def backward_differentiable(grad_out, x, weight, bias, num_groups, eps, activation):
    """The GroupNorm backward written with differentiable torch ops (statistics
    recomputed): used when the backward itself is differentiated
    (create_graph=True). Returns (grad_input, grad_weight, grad_bias)."""
    n, c = x.shape[0], x.shape[1]
    acc = acc_dtype(x.dtype)
    shape = (n, num_groups, c // num_groups, -1)
    xf = x.to(acc).reshape(shape)
    mean = xf.mean((2, 3), keepdim=True)
    rstd = torch.rsqrt((xf - mean).pow(2).mean((2, 3), keepdim=True) + eps)
    xhat = (xf - mean) * rstd
    w = weight.to(acc).reshape(1, num_groups, -1, 1) if weight is not None else None
    b = bias.to(acc).reshape(1, num_groups, -1, 1) if bias is not None else None
    y = xhat * w if w is not None else xhat
    if b is not None:
        y = y + b
    g = _act_grad(grad_out.to(acc).reshape(shape), y, activation)
    wg = g * w if w is not None else g
    gx = rstd * (wg - wg.mean((2, 3), keepdim=True)
                 - xhat * (wg * xhat).mean((2, 3), keepdim=True))
    gw = (g * xhat).sum((0, 3)).reshape(c).to(weight.dtype) if weight is not None else None
    gb = g.sum((0, 3)).reshape(c).to(bias.dtype) if bias is not None else None
    gx = gx.reshape(x.shape).to(x.dtype).contiguous(memory_format=memory_format(x))
    return gx, gw, gb


if op_defined("group_norm"):
    from . import _C

    if hasattr(_C, "_set_double_backward"):
        # the direct entry's C++ autograd node calls it under create_graph
        _C._set_double_backward("group_norm", backward_differentiable)

    @torch.library.register_fake("torchfuse::group_norm")
    def _group_norm_fake(input, num_groups, weight, bias, eps, activation):
        torch._check(input.dim() >= 2, lambda: "group_norm: input must have 2+ dims")
        torch._check(num_groups > 0, lambda: "group_norm: num_groups must be > 0")
        out = torch.empty_like(input, memory_format=memory_format(input))
        stat = input.new_empty((input.shape[0], num_groups), dtype=acc_dtype(input.dtype))
        return out, stat, torch.empty_like(stat)

    def _group_norm_setup(ctx, inputs, output):
        input, num_groups, weight, bias, eps, activation = inputs
        _, mean, rstd = output
        ctx.save_for_backward(input, mean, rstd, weight, bias)
        ctx.num_groups, ctx.eps, ctx.activation = num_groups, eps, activation
        ctx.mark_non_differentiable(mean, rstd)

    def _group_norm_backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        need_w = weight is not None and ctx.needs_input_grad[2]
        need_b = bias is not None and ctx.needs_input_grad[3]
        if torch.is_grad_enabled():  # double backward: stay differentiable
            gx, gw, gb = backward_differentiable(
                grad_out, x, weight, bias, ctx.num_groups, ctx.eps, ctx.activation)
        else:
            gx, gw, gb = torch.ops.torchfuse.group_norm_backward.default(
                grad_out, x, mean, rstd, ctx.num_groups, weight, bias, ctx.activation,
                need_w, need_b)
        return (gx if ctx.needs_input_grad[0] else None, None,
                gw if need_w else None, gb if need_b else None, None, None)

    register_autograd("group_norm", _group_norm_backward, _group_norm_setup)

if op_defined("group_norm_backward"):

    @torch.library.register_fake("torchfuse::group_norm_backward")
    def _group_norm_backward_fake(grad_out, input, mean, rstd, num_groups, weight, bias,
                                  activation, weight_grad, bias_grad):
        gx = torch.empty_like(input, memory_format=memory_format(input))
        gw = weight.new_empty(weight.shape) if weight_grad else input.new_empty((0,))
        gb = bias.new_empty(bias.shape) if bias_grad else input.new_empty((0,))
        return gx, gw, gb
