"""RMSNorm: fake kernels and autograd for torchfuse::rms_norm, add_rms_norm
and rms_norm_backward (schemas in csrc/torchfuse.cpp)."""

from __future__ import annotations

import torch

from . import acc_dtype, op_defined, register_autograd


def _stat_shape(input: torch.Tensor, normalized_shape) -> list[int]:
    return list(input.shape[: input.dim() - len(normalized_shape)])


def backward_differentiable(grad_out, grad_summed, x, weight, normalized_shape, eps):
    """The RMSNorm backward written with differentiable torch ops: used when
    the backward itself is differentiated (create_graph=True)."""
    dims = tuple(range(-len(normalized_shape), 0))
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    gf = grad_out.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)
    xhat = xf * rstd
    g = gf * weight.to(acc) if weight is not None else gf
    gx = rstd * (g - xhat * (g * xhat).mean(dims, keepdim=True))
    if grad_summed is not None:
        gx = gx + grad_summed.to(acc)
    gw = None
    if weight is not None:
        lead = tuple(range(x.dim() - len(normalized_shape)))
        gw = (gf * xhat).sum(lead).to(weight.dtype) if lead else (gf * xhat).to(weight.dtype)
    return gx.to(x.dtype), gw


def _backward(ctx, grad_out, grad_summed, x, rstd, weight):
    ns, eps = ctx.normalized_shape, ctx.eps
    need_w = weight is not None and ctx.needs_input_grad[ctx.weight_index]
    if torch.is_grad_enabled():  # double backward: stay differentiable
        gx, gw = backward_differentiable(grad_out, grad_summed, x, weight, ns, eps)
    else:
        gx, gw = torch.ops.torchfuse.rms_norm_backward.default(
            grad_out, grad_summed, x, rstd, ns, weight, need_w
        )
    return gx, (gw if need_w else None)


if op_defined("rms_norm"):

    @torch.library.register_fake("torchfuse::rms_norm")
    def _rms_norm_fake(input, normalized_shape, weight, eps):
        torch._check(len(normalized_shape) > 0, lambda: "normalized_shape must not be empty")
        stat = input.new_empty(_stat_shape(input, normalized_shape), dtype=acc_dtype(input.dtype))
        return input.new_empty(input.shape), stat

    def _rms_norm_setup(ctx, inputs, output):
        input, normalized_shape, weight, eps = inputs
        _, rstd = output
        ctx.save_for_backward(input, rstd, weight)
        ctx.normalized_shape, ctx.eps, ctx.weight_index = normalized_shape, eps, 2
        ctx.mark_non_differentiable(rstd)

    def _rms_norm_backward(ctx, grad_out, _grad_rstd):
        x, rstd, weight = ctx.saved_tensors
        gx, gw = _backward(ctx, grad_out, None, x, rstd, weight)
        return (gx if ctx.needs_input_grad[0] else None), None, gw, None

    register_autograd("rms_norm", _rms_norm_backward, _rms_norm_setup)

if op_defined("add_rms_norm"):

    @torch.library.register_fake("torchfuse::add_rms_norm")
    def _add_rms_norm_fake(input, residual, normalized_shape, weight, eps):
        torch._check(len(normalized_shape) > 0, lambda: "normalized_shape must not be empty")
        stat = input.new_empty(_stat_shape(input, normalized_shape), dtype=acc_dtype(input.dtype))
        return input.new_empty(input.shape), input.new_empty(input.shape), stat

    def _add_rms_norm_setup(ctx, inputs, output):
        _, _, normalized_shape, weight, eps = inputs
        _, summed, rstd = output
        ctx.save_for_backward(summed, rstd, weight)
        ctx.normalized_shape, ctx.eps, ctx.weight_index = normalized_shape, eps, 3
        ctx.mark_non_differentiable(rstd)

    def _add_rms_norm_backward(ctx, grad_out, grad_summed, _grad_rstd):
        summed, rstd, weight = ctx.saved_tensors
        gx, gw = _backward(ctx, grad_out, grad_summed, summed, rstd, weight)
        need_in, need_res = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        return (gx if need_in else None), (gx if need_res else None), None, gw, None

    register_autograd("add_rms_norm", _add_rms_norm_backward, _add_rms_norm_setup)

def _backward_formula(grad_out, grad_summed, x, rstd, weight, normalized_shape):
    """rms_norm_backward's outputs as differentiable torch ops of its inputs
    (rstd taken as given): its own autograd formula."""
    dims = tuple(range(-len(normalized_shape), 0))
    acc = acc_dtype(x.dtype)
    r = rstd.reshape(rstd.shape + (1,) * len(normalized_shape))
    xf, gf = x.to(acc), grad_out.to(acc)
    g = gf * weight.to(acc) if weight is not None else gf
    gx = r * g - xf * r.pow(3) * (g * xf).mean(dims, keepdim=True)
    if grad_summed is not None:
        gx = gx + grad_summed.to(acc)
    lead = tuple(range(x.dim() - len(normalized_shape)))
    gw = (gf * xf * r).sum(lead) if weight is not None else None
    return gx.to(x.dtype), gw


if op_defined("rms_norm_backward"):

    @torch.library.register_fake("torchfuse::rms_norm_backward")
    def _rms_norm_backward_fake(
        grad_out, grad_summed, input, rstd, normalized_shape, weight, weight_grad
    ):
        gx = input.new_empty(input.shape)
        if weight_grad:
            return gx, weight.new_empty(weight.shape)
        return gx, input.new_empty((0,))

    def _rms_norm_backward_setup(ctx, inputs, output):
        grad_out, grad_summed, x, rstd, normalized_shape, weight, weight_grad = inputs
        ctx.save_for_backward(grad_out, grad_summed, x, rstd, weight)
        ctx.normalized_shape, ctx.weight_grad = normalized_shape, weight_grad

    def _rms_norm_backward_backward(ctx, ggx, ggw):
        saved = ctx.saved_tensors
        need = [t is not None and ctx.needs_input_grad[i]
                for i, t in zip((0, 1, 2, 3, 5), saved)]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(n) if t is not None else None
                      for t, n in zip(saved, need)]
            gx, gw = _backward_formula(*leaves, ctx.normalized_shape)
            pairs = [(gx, ggx)]
            if ctx.weight_grad and gw is not None:
                pairs.append((gw.to(saved[4].dtype), ggw))
            pairs = [(o, g) for o, g in pairs if o.requires_grad and g is not None]
            wrt = [t for t, n in zip(leaves, need) if n]
            got = iter(torch.autograd.grad(
                [o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True,
                create_graph=torch.is_grad_enabled()) if pairs else [None] * len(wrt))
        res = [next(got) if n else None for n in need]
        return res[0], res[1], res[2], res[3], None, res[4], None

    torch.library.register_autograd(
        "torchfuse::rms_norm_backward",
        _rms_norm_backward_backward,
        setup_context=_rms_norm_backward_setup,
    )
