"""L2 normalization and cosine_linear: fake kernels and autograd for
torchfuse::l2_norm, l2_norm_backward, cosine_linear and cosine_linear_backward
(schemas in csrc/torchfuse.cpp)."""

from __future__ import annotations

import torch

from . import acc_dtype, op_defined, register_autograd


def _wrap(dim: int, ndim: int) -> int:
    n = max(ndim, 1)
    torch._check_index(
        -n <= dim < n,
        lambda: f"Dimension out of range: dim={dim} (expected to be in range of "
        f"[{-n}, {n - 1}] for input of {ndim} dimensions)",
    )
    return dim % n


def _out_like(input: torch.Tensor, d: int) -> torch.Tensor:
    """The output layout the kernels produce: the input's memory format when
    the input is contiguous or dim-last in memory (channels_last, dim=1),
    else contiguous."""
    if input.dim() > 1 and not input.is_contiguous() and d != input.dim() - 1:
        moved = input.movedim(d, -1)
        if moved.is_contiguous():
            return input.new_empty(moved.shape).movedim(-1, d)
    return input.new_empty(input.shape)


def _stat_shape(input: torch.Tensor, d: int) -> list[int]:
    return [s for k, s in enumerate(input.shape) if k != d]


def l2_backward_formula(grad_out, x, weight, dim, eps, norm=None):
    """l2_norm's gradients as differentiable torch ops (double backward).
    With `norm` given (the backward op's input) it is used as is; otherwise
    it is recomputed from x."""
    if x.dim() == 0:
        gx, gw = l2_backward_formula(
            grad_out.reshape(1), x.reshape(1), weight, 0, eps,
            None if norm is None else norm.reshape(()))
        return gx.reshape(()), gw
    d = dim % x.dim()
    acc = acc_dtype(x.dtype)
    xf, gf = x.to(acc), grad_out.to(acc)
    if norm is None:
        n = torch.linalg.vector_norm(xf, 2, dim=d, keepdim=True)
    else:
        n = norm.to(acc).unsqueeze(d)
    r = 1.0 / n.clamp_min(eps)
    shape = [1] * x.dim()
    shape[d] = -1
    g = gf * weight.to(acc).reshape(shape) if weight is not None else gf
    k = torch.where(n >= eps, r.pow(3) * (g * xf).sum(d, keepdim=True), torch.zeros_like(n))
    gx = (r * g - xf * k).to(x.dtype)
    gw = None
    if weight is not None:
        t = gf * xf * r
        others = [k2 for k2 in range(x.dim()) if k2 != d]
        gw = (t.sum(others) if others else t).to(weight.dtype)
    return gx, gw


def cosine_backward_formula(grad_out, x, weight, eps, bias_grad, nx=None, nw=None):
    """cosine_linear's gradients as differentiable torch ops."""
    acc = acc_dtype(x.dtype)
    k_in, n_out = x.shape[-1], weight.shape[0]
    xf = x.to(acc).reshape(-1, k_in)
    wf = weight.to(acc)
    gf = grad_out.to(acc).reshape(-1, n_out)
    nx = torch.linalg.vector_norm(xf, 2, dim=1) if nx is None else nx.to(acc).reshape(-1)
    nw = torch.linalg.vector_norm(wf, 2, dim=1) if nw is None else nw.to(acc)
    rx, rw = 1.0 / nx.clamp_min(eps), 1.0 / nw.clamp_min(eps)
    h = gf * rx[:, None] * rw[None, :]
    p, q = h @ wf, h.t() @ xf
    zx, zw = torch.zeros_like(rx), torch.zeros_like(rw)
    kx = torch.where(nx >= eps, rx * rx * (xf * p).sum(1), zx)
    kw = torch.where(nw >= eps, rw * rw * (wf * q).sum(1), zw)
    gx = (p - xf * kx[:, None]).reshape(x.shape).to(x.dtype)
    gw = (q - wf * kw[:, None]).to(weight.dtype)
    gb = gf.sum(0).to(x.dtype) if bias_grad else None
    return gx, gw, gb


def _grad_of_formula(ctx, formula, saved, grads_out, n_out):
    """Backward of a backward op: differentiate `formula` (which maps the
    saved inputs to the op's outputs) with respect to the saved inputs."""
    need = [t is not None and ctx.needs_input_grad[i] for i, t in zip(ctx.saved_index, saved)]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) if t is not None else None
                  for t, n in zip(saved, need)]
        outs = formula(*leaves)[:n_out]
        pairs = [(o, g) for o, g in zip(outs, grads_out)
                 if o is not None and g is not None and o.requires_grad]
        wrt = [t for t, n in zip(leaves, need) if n]
        if pairs and wrt:
            got = iter(torch.autograd.grad(
                [o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True,
                create_graph=torch.is_grad_enabled()))
        else:
            got = iter([None] * len(wrt))
    return [next(got) if n else None for n in need]


if op_defined("l2_norm"):
    from . import _C

    if hasattr(_C, "_set_double_backward"):
        # the direct entry's C++ autograd node calls it under create_graph
        _C._set_double_backward("l2_norm", l2_backward_formula)

    @torch.library.register_fake("torchfuse::l2_norm")
    def _l2_norm_fake(input, weight, dim, eps):
        d = _wrap(dim, input.dim())
        if weight is not None:
            c = input.shape[d] if input.dim() > 0 else 1
            torch._check(weight.dim() == 1 and weight.shape[0] == c,
                         lambda: "l2_norm: expected weight of shape [input.size(dim)]")
        norm = input.new_empty(_stat_shape(input, d), dtype=acc_dtype(input.dtype))
        return _out_like(input, d), norm

    def _l2_norm_setup(ctx, inputs, output):
        input, weight, dim, eps = inputs
        ctx.save_for_backward(input, output[1], weight)
        ctx.dim, ctx.eps = dim, eps
        ctx.mark_non_differentiable(output[1])

    def _l2_norm_backward(ctx, grad_out, _grad_norm):
        x, norm, weight = ctx.saved_tensors
        need_w = weight is not None and ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # double backward: stay differentiable
            gx, gw = l2_backward_formula(grad_out, x, weight, ctx.dim, ctx.eps)
        else:
            gx, gw = torch.ops.torchfuse.l2_norm_backward.default(
                grad_out, x, norm, weight, ctx.dim, ctx.eps, need_w)
        return (gx if ctx.needs_input_grad[0] else None), (gw if need_w else None), None, None

    register_autograd("l2_norm", _l2_norm_backward, _l2_norm_setup)

if op_defined("l2_norm_backward"):

    @torch.library.register_fake("torchfuse::l2_norm_backward")
    def _l2_norm_backward_fake(grad_out, input, norm, weight, dim, eps, weight_grad):
        d = _wrap(dim, input.dim())
        gw = weight.new_empty(weight.shape) if weight_grad else input.new_empty((0,))
        return _out_like(input, d), gw

    def _l2_norm_backward_setup(ctx, inputs, output):
        grad_out, input, norm, weight, dim, eps, weight_grad = inputs
        ctx.save_for_backward(grad_out, input, norm, weight)
        ctx.saved_index = (0, 1, 2, 3)
        ctx.dim, ctx.eps, ctx.weight_grad = dim, eps, weight_grad

    def _l2_norm_backward_backward(ctx, ggx, ggw):
        dim, eps = ctx.dim, ctx.eps

        def formula(g, x, n, w):
            return l2_backward_formula(g, x, w, dim, eps, norm=n)

        res = _grad_of_formula(ctx, formula, ctx.saved_tensors,
                               (ggx, ggw if ctx.weight_grad else None), 2)
        return res[0], res[1], res[2], res[3], None, None, None

    torch.library.register_autograd(
        "torchfuse::l2_norm_backward", _l2_norm_backward_backward,
        setup_context=_l2_norm_backward_setup)

if op_defined("cosine_linear"):

    @torch.library.register_fake("torchfuse::cosine_linear")
    def _cosine_linear_fake(input, weight, bias, eps):
        torch._check(input.dim() >= 1 and weight.dim() == 2 and input.shape[-1] == weight.shape[1],
                     lambda: "cosine_linear: input.size(-1) must equal weight.size(1)")
        acc = acc_dtype(input.dtype)
        out = input.new_empty((*input.shape[:-1], weight.shape[0]))
        return (out, input.new_empty(input.shape[:-1], dtype=acc),
                input.new_empty((weight.shape[0],), dtype=acc))

    def _cosine_linear_setup(ctx, inputs, output):
        input, weight, bias, eps = inputs
        ctx.save_for_backward(input, weight, output[1], output[2])
        ctx.eps, ctx.has_bias = eps, bias is not None
        ctx.mark_non_differentiable(output[1], output[2])

    def _cosine_linear_backward(ctx, grad_out, _gnx, _gnw):
        x, w, nx, nw = ctx.saved_tensors
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        if torch.is_grad_enabled():  # double backward: stay differentiable
            gx, gw, gb = cosine_backward_formula(grad_out, x, w, ctx.eps, need_b)
        else:
            gx, gw, gb = torch.ops.torchfuse.cosine_linear_backward.default(
                grad_out, x, w, nx, nw, ctx.eps, need_b)
        return ((gx if ctx.needs_input_grad[0] else None),
                (gw if ctx.needs_input_grad[1] else None),
                (gb if need_b else None), None)

    register_autograd("cosine_linear", _cosine_linear_backward, _cosine_linear_setup)

if op_defined("cosine_linear_backward"):

    @torch.library.register_fake("torchfuse::cosine_linear_backward")
    def _cosine_linear_backward_fake(grad_out, input, weight, input_norm, weight_norm, eps,
                                     bias_grad):
        gb = input.new_empty((weight.shape[0],)) if bias_grad else input.new_empty((0,))
        return input.new_empty(input.shape), weight.new_empty(weight.shape), gb

    def _cosine_linear_backward_setup(ctx, inputs, output):
        grad_out, input, weight, nx, nw, eps, bias_grad = inputs
        ctx.save_for_backward(grad_out, input, weight, nx, nw)
        ctx.saved_index = (0, 1, 2, 3, 4)
        ctx.eps, ctx.bias_grad = eps, bias_grad

    def _cosine_linear_backward_backward(ctx, ggx, ggw, ggb):
        eps, bias_grad = ctx.eps, ctx.bias_grad

        def formula(g, x, w, nx, nw):
            return cosine_backward_formula(g, x, w, eps, bias_grad, nx=nx, nw=nw)

        res = _grad_of_formula(ctx, formula, ctx.saved_tensors,
                               (ggx, ggw, ggb if bias_grad else None), 3)
        return (*res, None, None)

    torch.library.register_autograd(
        "torchfuse::cosine_linear_backward", _cosine_linear_backward_backward,
        setup_context=_cosine_linear_backward_setup)
