"""Gram matrices and the style loss: fake kernels and autograd for
torchfuse::gram_matrix, gram_matrix_backward, style_loss and
style_loss_backward (schemas in csrc/torchfuse.cpp)."""

from __future__ import annotations

import math

import torch

from . import acc_dtype, op_defined, register_autograd
from .l2_norm import _grad_of_formula, _out_like

_REDUCTIONS = ("mean", "sum", "none")


def _features(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """F = x.reshape(N, C, L) in the accumulate type, and 1 / (C L)."""
    acc = acc_dtype(x.dtype)
    n, c = x.shape[0], x.shape[1]
    f = x.to(acc).reshape(n, c, math.prod(x.shape[2:]))
    return f, 1.0 / (c * f.shape[2]) if c * f.shape[2] > 0 else float("inf")


def gram_formula(x, normalize):
    """gram_matrix as differentiable torch ops (double backward)."""
    f, s = _features(x)
    g = f @ f.transpose(1, 2)
    return (g * s if normalize else g).to(x.dtype)


def gram_backward_formula(grad_out, x, normalize):
    f, s = _features(x)
    g = grad_out.to(f.dtype)
    gx = (g + g.transpose(1, 2)) @ f
    return ((gx * s) if normalize else gx).reshape(x.shape).to(x.dtype)


def _k(reduction: str, n: int, c: int) -> float:
    return 2.0 / (n * c * c) if reduction == "mean" else 2.0


def style_backward_formula(grad_loss, x, reduction, target=None, diff=None, target_grad=False):
    """style_loss's gradients (input, and (N, C, C) target) as
    differentiable torch ops. diff = gram - target: recomputed from x and
    `target` unless given (the backward op's own input)."""
    f, s = _features(x)
    n, c = f.shape[0], f.shape[1]
    if diff is None:
        diff = f @ f.transpose(1, 2) * s - target.to(f.dtype)
    w = grad_loss.to(f.dtype) * diff.to(f.dtype)
    k = _k(reduction, n, c)
    gx = ((w + w.transpose(1, 2)) @ f * (s * k)).reshape(x.shape).to(x.dtype)
    gt = -k * w if target_grad else None
    return gx, gt


def _sum_to(gt: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The (N, C, C) target gradient summed to target's shape and dtype."""
    if target.dim() == 2:
        gt = gt.sum(0)
    elif target.shape[0] == 1:
        gt = gt.sum(0, keepdim=True)
    return gt.to(target.dtype)


if op_defined("gram_matrix"):

    @torch.library.register_fake("torchfuse::gram_matrix")
    def _gram_matrix_fake(input, normalize):
        torch._check(input.dim() >= 2, lambda: "gram_matrix: expected input of at least 2 dims")
        n, c = input.shape[0], input.shape[1]
        return input.new_empty((n, c, c))

    def _gram_setup(ctx, inputs, output):
        input, normalize = inputs
        ctx.save_for_backward(input)
        ctx.normalize = normalize

    def _gram_backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        if torch.is_grad_enabled():  # double backward: stay differentiable
            return gram_backward_formula(grad_out, x, ctx.normalize), None
        return torch.ops.torchfuse.gram_matrix_backward.default(grad_out, x, ctx.normalize), None

    register_autograd("gram_matrix", _gram_backward, _gram_setup)

if op_defined("gram_matrix_backward"):

    @torch.library.register_fake("torchfuse::gram_matrix_backward")
    def _gram_matrix_backward_fake(grad_out, input, normalize):
        return _out_like(input, 1)

    def _gram_backward_setup(ctx, inputs, output):
        grad_out, input, normalize = inputs
        ctx.save_for_backward(grad_out, input)
        ctx.saved_index = (0, 1)
        ctx.normalize = normalize

    def _gram_backward_backward(ctx, ggx):
        normalize = ctx.normalize

        def formula(g, x):
            return (gram_backward_formula(g, x, normalize),)

        res = _grad_of_formula(ctx, formula, ctx.saved_tensors, (ggx,), 1)
        return res[0], res[1], None

    torch.library.register_autograd(
        "torchfuse::gram_matrix_backward", _gram_backward_backward,
        setup_context=_gram_backward_setup)

if op_defined("style_loss"):

    @torch.library.register_fake("torchfuse::style_loss")
    def _style_loss_fake(input, target_gram, reduction):
        torch._check(input.dim() >= 2, lambda: "style_loss: expected input of at least 2 dims")
        n, c = input.shape[0], input.shape[1]
        acc = acc_dtype(input.dtype)
        loss = input.new_empty((n, c, c)) if reduction == "none" else input.new_empty(
            (), dtype=acc)
        return loss, input.new_empty((n, c, c), dtype=acc)

    def _style_setup(ctx, inputs, output):
        input, target, reduction = inputs
        ctx.save_for_backward(input, target, output[1])
        ctx.reduction = reduction
        ctx.mark_non_differentiable(output[1])

    def _style_backward(ctx, grad_loss, _grad_diff):
        x, target, diff = ctx.saved_tensors
        need_x, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_t):
            return None, None, None
        if torch.is_grad_enabled():  # double backward: stay differentiable
            gx, gt = style_backward_formula(grad_loss, x, ctx.reduction, target=target,
                                            target_grad=need_t)
        else:
            gx, gt = torch.ops.torchfuse.style_loss_backward.default(
                grad_loss, x, diff, ctx.reduction, need_x, need_t)
        return ((gx if need_x else None), (_sum_to(gt, target) if need_t else None), None)

    register_autograd("style_loss", _style_backward, _style_setup)

if op_defined("style_loss_backward"):

    @torch.library.register_fake("torchfuse::style_loss_backward")
    def _style_loss_backward_fake(grad_loss, input, diff, reduction, input_grad, target_grad):
        acc = acc_dtype(input.dtype)
        gx = _out_like(input, 1) if input_grad else input.new_empty((0,))
        gt = diff.new_empty(diff.shape, dtype=acc) if target_grad else input.new_empty(
            (0,), dtype=acc)
        return gx, gt

    def _style_backward_setup(ctx, inputs, output):
        grad_loss, input, diff, reduction, input_grad, target_grad = inputs
        ctx.save_for_backward(grad_loss, input, diff)
        ctx.saved_index = (0, 1, 2)
        ctx.reduction, ctx.input_grad, ctx.target_grad = reduction, input_grad, target_grad

    def _style_backward_backward(ctx, ggx, ggt):
        reduction, target_grad = ctx.reduction, ctx.target_grad

        def formula(g, x, d):
            return style_backward_formula(g, x, reduction, diff=d, target_grad=target_grad)

        res = _grad_of_formula(
            ctx, formula, ctx.saved_tensors,
            (ggx if ctx.input_grad else None, ggt if target_grad else None), 2)
        return res[0], res[1], res[2], None, None, None

    torch.library.register_autograd(
        "torchfuse::style_loss_backward", _style_backward_backward,
        setup_context=_style_backward_setup)
