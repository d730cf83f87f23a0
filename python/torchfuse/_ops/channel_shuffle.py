"""Channel shuffle: fake kernels and autograd for torchfuse::channel_shuffle,
cat_shuffle and cat_shuffle_backward (schemas in csrc/torchfuse.cpp).

All three are linear permutations, so every backward is again one of these
ops (differentiable through its own registration): double backward and
beyond come for free.
"""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

from . import FUNCTIONS, op_defined, register_autograd


def _layout(t: torch.Tensor) -> torch.memory_format:
    """The layout the C++ ops use (channel_shuffle.cpp, layout_of)."""
    fmt = suggest_memory_format(t)
    if (t.dim() == 4 and fmt == torch.channels_last) or (
        t.dim() == 5 and fmt == torch.channels_last_3d
    ):
        return fmt
    return torch.contiguous_format


def _check(dim: int, channels, groups: int, arg: str) -> None:
    torch._check(dim > 2, lambda: f"channel_shuffle expects {arg} with > 2 dims")
    torch._check(groups > 0, lambda: "Number of groups to divide channels in must be positive")
    torch._check(channels % groups == 0,
                 lambda: "Number of channels must be divisible by groups")


def _inverse_groups(channels: int, groups: int) -> int:
    # channel_shuffle(., C // g) undoes channel_shuffle(., g); any groups
    # value is the identity on zero channels.
    return channels // groups if channels > 0 else 1


if op_defined("channel_shuffle"):

    @torch.library.register_fake("torchfuse::channel_shuffle")
    def _channel_shuffle_fake(input, groups):
        _check(input.dim(), input.shape[1] if input.dim() > 1 else 0, groups, "input")
        return torch.empty_like(input, memory_format=_layout(input))

    def _channel_shuffle_setup(ctx, inputs, output):
        input, groups = inputs
        ctx.inverse = _inverse_groups(input.shape[1], groups)

    def _channel_shuffle_backward(ctx, grad):
        return torch.ops.torchfuse.channel_shuffle.default(grad, ctx.inverse), None

    register_autograd("channel_shuffle", _channel_shuffle_backward, _channel_shuffle_setup)


def _cat_layout(tensors) -> torch.memory_format:
    """cat_shuffle's output layout (channel_shuffle.cpp, cat_forward)."""
    dim = tensors[0].dim()
    if dim not in (4, 5):
        return torch.contiguous_format
    cl_fmt = torch.channels_last if dim == 4 else torch.channels_last_3d
    tensors = [t for t in tensors if t.shape[1] != 0]  # no vote (cat_forward)
    fmts = [_layout(t) for t in tensors]
    all_cl = all(f == cl_fmt or t.is_contiguous(memory_format=cl_fmt)
                 for f, t in zip(fmts, tensors))
    any_cl = any(f == cl_fmt for f in fmts)
    return cl_fmt if all_cl and any_cl else torch.contiguous_format


if op_defined("cat_shuffle"):

    @torch.library.register_fake("torchfuse::cat_shuffle")
    def _cat_shuffle_fake(tensors, groups):
        torch._check(len(tensors) > 0, lambda: "cat_shuffle(): expected a non-empty list")
        first = tensors[0]
        channels = sum(t.shape[1] for t in tensors)
        _check(first.dim(), channels, groups, "tensors[0]")
        shape = list(first.shape)
        shape[1] = channels
        return first.new_empty(shape).contiguous(memory_format=_cat_layout(tensors))

    def _cat_shuffle_setup(ctx, inputs, output):
        tensors, groups = inputs
        ctx.split_sizes = [t.shape[1] for t in tensors]
        ctx.groups = groups

    def _cat_shuffle_backward(ctx, grad):
        grads = torch.ops.torchfuse.cat_shuffle_backward.default(grad, ctx.split_sizes, ctx.groups)
        return list(grads), None

    torch.library.register_autograd(
        "torchfuse::cat_shuffle", _cat_shuffle_backward, setup_context=_cat_shuffle_setup
    )

    def _cat_shuffle_function_forward(ctx, groups, *tensors):
        with torch._C._AutoDispatchBelowAutograd():
            out = torch.ops.torchfuse.cat_shuffle.default(list(tensors), groups)
        _cat_shuffle_setup(ctx, (tensors, groups), out)
        return out

    def _cat_shuffle_function_backward(ctx, grad):
        grads, _ = _cat_shuffle_backward(ctx, grad)
        return (None, *grads)

    # For _ops.call_list: the same formulas as a Function over the unpacked
    # pieces (a Function does not track tensors inside a list argument).
    FUNCTIONS["cat_shuffle"] = (torch.ops.torchfuse.cat_shuffle.default, type(
        "cat_shuffle_function", (torch.autograd.Function,), {
            "forward": staticmethod(_cat_shuffle_function_forward),
            "backward": staticmethod(_cat_shuffle_function_backward),
        }))

if op_defined("cat_shuffle_backward"):

    @torch.library.register_fake("torchfuse::cat_shuffle_backward")
    def _cat_shuffle_backward_fake(grad_out, split_sizes, groups):
        _check(grad_out.dim(), grad_out.shape[1], groups, "grad_out")
        fmt = _layout(grad_out)
        out = []
        for s in split_sizes:
            shape = list(grad_out.shape)
            shape[1] = s
            out.append(grad_out.new_empty(shape).contiguous(memory_format=fmt))
        return out

    def _cat_shuffle_backward_setup(ctx, inputs, output):
        grad_out, split_sizes, groups = inputs
        ctx.groups = groups
        ctx.like = [(o.shape, o.dtype, o.device) for o in output]

    def _cat_shuffle_backward_backward(ctx, grads):
        grads = [g if g is not None else torch.zeros(s, dtype=d, device=dev)
                 for g, (s, d, dev) in zip(grads, ctx.like)]
        return torch.ops.torchfuse.cat_shuffle.default(grads, ctx.groups), None, None

    torch.library.register_autograd(
        "torchfuse::cat_shuffle_backward", _cat_shuffle_backward_backward,
        setup_context=_cat_shuffle_backward_setup,
    )
