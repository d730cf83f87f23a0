"""2-D convolution with a fused channel shuffle: fake kernels and autograd for
torchfuse::conv2d and conv2d_backward (schemas in csrc/torchfuse.cpp)."""

from __future__ import annotations

import torch

from ..reference import channel_shuffle, kept_format
from . import op_defined, register_autograd
from .l2_norm import _grad_of_formula


def pad4(padding) -> tuple[int, int, int, int]:
    """The op's padding (1, 2 or 4 ints) as (top, left, bottom, right)."""
    p = list(padding)
    if len(p) == 4:
        return p[0], p[1], p[2], p[3]
    return p[0], p[-1], p[0], p[-1]


def _pair(v) -> tuple[int, int]:
    v = list(v)
    return v[0], v[-1]


def out_size(input_hw, weight_hw, stride, padding, dilation) -> tuple[int, int]:
    pt, pl, pb, pr = pad4(padding)
    (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
    oh = (input_hw[0] + pt + pb - dh * (weight_hw[0] - 1) - 1) // sh + 1
    ow = (input_hw[1] + pl + pr - dw * (weight_hw[1] - 1) - 1) // sw + 1
    return oh, ow


def conv_formula(x, w, b, stride, padding, dilation, groups, shuffle):
    """The op as differentiable torch ops (4-D input, padding as the op's)."""
    pt, pl, pb, pr = pad4(padding)
    if (pt, pl) != (pb, pr):
        x = torch.nn.functional.pad(x, (pl, pr, pt, pb))
        pt = pl = 0
    y = torch.nn.functional.conv2d(x, w, b, _pair(stride), (pt, pl), _pair(dilation), groups)
    return channel_shuffle(y, shuffle) if shuffle > 1 else y


def conv_backward_formula(dy, x, w, stride, padding, dilation, groups, shuffle, mask):
    """(grad_input, grad_weight, grad_bias) as differentiable torch ops: the
    vector-Jacobian product of conv_formula, with its graph (double
    backward). Entries not in `mask` are None."""
    gx = gw = gb = None
    if mask[0] or mask[1]:
        with torch.enable_grad():
            xs = x if x.requires_grad else x.detach().requires_grad_()
            ws = w if w.requires_grad else w.detach().requires_grad_()
            y = conv_formula(xs, ws, None, stride, padding, dilation, groups, shuffle)
            wrt = [t for t, m in ((xs, mask[0]), (ws, mask[1])) if m]
            got = iter(torch.autograd.grad(y, wrt, dy, create_graph=True))
            gx = next(got) if mask[0] else None
            gw = next(got) if mask[1] else None
    if mask[2]:
        # the inverse shuffle of channel_shuffle(., s) is channel_shuffle(., C // s)
        gb = (channel_shuffle(dy, dy.shape[1] // shuffle) if shuffle > 1 else dy).sum((0, 2, 3))
    return gx, gw, gb


if op_defined("conv2d"):
    from . import _C

    if hasattr(_C, "_set_double_backward"):
        # the direct entry's C++ autograd node calls it under create_graph
        _C._set_double_backward("conv2d", conv_backward_formula)

    @torch.library.register_fake("torchfuse::conv2d")
    def _conv2d_fake(input, weight, bias, stride, padding, dilation, groups, shuffle_groups):
        torch._check(input.dim() == 4, lambda: "conv2d: expected 4-D input")
        torch._check(weight.dim() == 4, lambda: "conv2d: expected 4-D weight")
        oh, ow = out_size(input.shape[2:], weight.shape[2:], stride, padding, dilation)
        torch._check(oh > 0 and ow > 0, lambda: "conv2d: kernel larger than padded input")
        out = input.new_empty((input.shape[0], weight.shape[0], oh, ow))
        return out.contiguous(memory_format=kept_format(input))

    def _conv_setup(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups, shuffle = inputs
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None
        ctx.args = (list(stride), list(padding), list(dilation), groups, shuffle)

    def _conv_backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2]]
        if not any(mask):
            return (None,) * 8
        if torch.is_grad_enabled():  # double backward: stay differentiable
            gx, gw, gb = conv_backward_formula(grad_out, x, w, *ctx.args, mask)
        else:
            gx, gw, gb = torch.ops.torchfuse.conv2d_backward.default(
                grad_out, x, w, *ctx.args, mask)
        return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
                None, None, None, None, None)

    register_autograd("conv2d", _conv_backward, _conv_setup)

if op_defined("conv2d_backward"):

    @torch.library.register_fake("torchfuse::conv2d_backward")
    def _conv2d_backward_fake(grad_out, input, weight, stride, padding, dilation, groups,
                              shuffle_groups, output_mask):
        gx = (input.new_empty(input.shape).contiguous(memory_format=kept_format(input))
              if output_mask[0] else input.new_empty((0,)))
        gw = weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty((0,))
        gb = weight.new_empty((weight.shape[0],)) if output_mask[2] else weight.new_empty((0,))
        return gx, gw, gb

    def _conv_backward_setup(ctx, inputs, output):
        grad_out, input, weight, stride, padding, dilation, groups, shuffle, mask = inputs
        ctx.save_for_backward(grad_out, input, weight)
        ctx.args = (list(stride), list(padding), list(dilation), groups, shuffle)
        ctx.mask = list(mask)
        ctx.saved_index = (0, 1, 2)

    def _conv_backward_backward(ctx, ggx, ggw, ggb):
        args, mask = ctx.args, ctx.mask

        def formula(dy, x, w):
            return conv_backward_formula(dy, x, w, *args, mask)

        res = _grad_of_formula(ctx, formula, ctx.saved_tensors, (ggx, ggw, ggb), 3)
        return (*res, None, None, None, None, None, None)

    torch.library.register_autograd(
        "torchfuse::conv2d_backward", _conv_backward_backward,
        setup_context=_conv_backward_setup)
