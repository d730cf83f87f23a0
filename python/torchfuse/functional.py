"""torchfuse.functional: the fused ops, as drop-ins for torch.nn.functional.

Each function validates its arguments, then calls the compiled op in
torch.ops.torchfuse (torch.compile and CUDA graphs go through the dispatcher;
when a gradient is needed, through a torch.autograd.Function carrying the
op's own registered formulas: _ops.call), or the pure-PyTorch reference on a
device with no kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _validate as check
from . import reference
from ._ops import DIRECT, call, call_list, use_kernel

# The extension's direct entries (_ops.DIRECT): on small tensors most of a
# call's cost is the call path, which they skip, gradient recording
# included. Per call, 1x232x14x14 bfloat16 (2-core VM, interleaved with torch
# in one process): forward under no_grad, channel_shuffle 7.4 -> 4.3 us (torch
# 4.9), cat_shuffle 9.8 -> 4.9 us (torch's cat + channel_shuffle 9.3);
# forward+backward, channel_shuffle 101 -> 58 us (torch 50), cat_shuffle
# 146 -> 69 us (torch 73).
_direct_channel_shuffle = DIRECT.get("channel_shuffle")
_direct_cat_shuffle = DIRECT.get("cat_shuffle")
_direct_group_norm = DIRECT.get("group_norm")
_direct_l2_norm = DIRECT.get("l2_norm")
_direct_conv2d = DIRECT.get("conv2d")


__all__ = [
    "rms_norm",
    "add_rms_norm",
    "group_norm",
    "conv2d",
    "channel_shuffle",
    "cat_shuffle",
    "local_response_norm",
    "spatial_response_norm",
    "l2_norm",
    "normalize",
    "cosine_linear",
    "gram_matrix",
    "style_loss",
]


def rms_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    """Root-mean-square normalization over the last ``len(normalized_shape)`` dims.

    ``out = input / sqrt(mean(input**2) + eps) * weight``, the mean over the
    normalized dims. Same contract as :func:`torch.nn.functional.rms_norm`:
    ``input (*, *normalized_shape)``, ``weight`` of shape ``normalized_shape``
    (any floating dtype) or None, ``eps=None`` meaning
    ``torch.finfo(input.dtype).eps``. Statistics are computed in float32
    (float64 for float64 input); the output has the input's dtype and shape.
    """
    check.tensor(input, "rms_norm", "input")
    normalized_shape = check.int_list(normalized_shape, "rms_norm", "normalized_shape")
    check.tensor(weight, "rms_norm", "weight", optional=True)
    check.number(eps, "rms_norm", "eps", optional=True)
    check.floating(input, "rms_norm")
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    if not use_kernel("rms_norm", input.device):
        return reference.rms_norm(input, normalized_shape, weight, eps)
    return call("rms_norm", input, normalized_shape, weight, float(eps))[0]


def add_rms_norm(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add fused with RMSNorm (the pre-norm residual stream).

    Returns ``(out, summed)`` with ``summed = input + residual`` (same shape and
    dtype) and ``out = rms_norm(summed, normalized_shape, weight, eps)``,
    computed in one pass: ``summed`` is rounded to the input's dtype before it
    is normalized, exactly as the unfused code would see it.
    """
    check.tensor(input, "add_rms_norm", "input")
    check.tensor(residual, "add_rms_norm", "residual")
    normalized_shape = check.int_list(normalized_shape, "add_rms_norm", "normalized_shape")
    check.tensor(weight, "add_rms_norm", "weight", optional=True)
    check.number(eps, "add_rms_norm", "eps", optional=True)
    check.floating(input, "add_rms_norm")
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    if not use_kernel("add_rms_norm", input.device):
        return reference.add_rms_norm(input, residual, normalized_shape, weight, eps)
    out, summed, _ = call(
        "add_rms_norm",
        input, residual, normalized_shape, weight, float(eps)
    )
    return out, summed


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
) -> torch.Tensor:
    """Group normalization with an optional fused activation.

    ``out = act((x - mean) / sqrt(var + eps) * weight[c] + bias[c])``, mean and
    (biased) var over each sample's group of ``C // num_groups`` channels and
    every spatial position; ``act`` is ``None``, ``"relu"`` or ``"silu"``,
    applied in the same pass. Same contract as
    :func:`torch.nn.functional.group_norm`: ``input (N, C, *)``, ``weight``
    and ``bias`` of shape ``(C,)`` or None. Statistics in float32 (float64 for
    float64 input), centred; a channels_last (4-D) or channels_last_3d (5-D)
    input gives an output in the same memory format, with no layout copy. The
    backward recomputes the activation's input from the saved statistics.
    """
    if _direct_group_norm is not None and not torch.compiler.is_compiling():
        out = _direct_group_norm(input, num_groups, weight, bias, eps, activation)
        if out is not None:  # None unless the plain case (see _ops.DIRECT)
            return out
    fn = "group_norm"
    check.tensor(input, fn, "input")
    check.integer(num_groups, fn, "num_groups", 2)
    check.tensor(weight, fn, "weight", optional=True)
    check.tensor(bias, fn, "bias", optional=True)
    check.number(eps, fn, "eps")
    if activation is not None and not isinstance(activation, str):
        raise TypeError(
            f"{fn}(): argument 'activation' must be str or None, not {type(activation).__name__}")
    if activation not in (None, "relu", "silu"):
        raise ValueError(f"{fn}: activation must be None, 'relu' or 'silu', got {activation!r}")
    check.floating(input, fn)
    if input.dim() < 2:
        raise RuntimeError(
            f"{fn}: Expected at least 2 dimensions for input tensor but received {input.dim()}")
    if num_groups == 0:  # torch's F.group_norm divides by it first
        raise ZeroDivisionError(f"{fn}: num_groups must be greater than 0, got 0")
    spatial = 1
    for s in input.shape[2:]:
        spatial *= s
    if input.shape[0] * input.shape[1] // num_groups * spatial == 1:  # as torch's check
        raise ValueError(
            f"{fn}: Expected more than 1 value per channel when training, got input size "
            f"{list(input.shape)} with num_groups={num_groups}")
    if not use_kernel("group_norm", input.device):
        return reference.group_norm(input, num_groups, weight, bias, eps, activation)
    return call(
        "group_norm",
        input, int(num_groups), weight, bias, float(eps), activation or "none")[0]



# whether autocast is on for any device (a private helper of torch's; the
# public per-device query below where it is missing)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast(*tensors: torch.Tensor | None) -> tuple:
    """The tensors cast to the autocast dtype of their device when autocast is
    enabled there, as torch's autocast casts the operands of the ops on its
    lower-precision list (conv2d, linear, matmul, bmm); None stays None."""
    if not _any_autocast():  # one C call: the common case costs no more
        return tensors
    first = tensors[0]
    dev = first.device.type
    if not first.is_floating_point() or dev not in ("cpu", "cuda") \
            or not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(None if t is None or not t.is_floating_point() else t.to(dt)
                 for t in tensors)


def _conv_pair(value, arg: str) -> list[int]:
    """stride / padding / dilation as torch's parser takes them: an int or a
    sequence of ints (its length checked by the op)."""
    if type(value) is int:
        return [value, value]
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int \
            and type(value[1]) is int:  # a module's attribute
        return [value[0], value[1]]
    if isinstance(value, bool) or not isinstance(value, (int, Sequence, torch.Size)) or \
            isinstance(value, (str, bytes)):
        raise TypeError(
            f"conv2d(): argument '{arg}' must be tuple of ints, not {type(value).__name__}")
    if isinstance(value, int):
        return [value, value]
    vals = check.int_list(value, "conv2d", arg)
    if len(vals) not in (1, 2):
        raise RuntimeError(
            f"expected {arg} to be a single integer value or a list of 2 values to match "
            f"the convolution dimensions, but got {arg}={vals}")
    return [vals[0], vals[-1]]


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    shuffle_groups: int = 1,
) -> torch.Tensor:
    """2-D convolution (dilated, grouped, depthwise), optionally followed by a
    channel shuffle that costs no memory pass.

    Same contract as :func:`torch.nn.functional.conv2d` (int or pair
    ``stride``/``padding``/``dilation``, ``padding="same"``/``"valid"``,
    unbatched 3-D input); with ``shuffle_groups=g > 1`` the result equals
    ``channel_shuffle(conv2d(...), g)``: the GEMM (or the depthwise kernel)
    stores each output channel at its shuffled position. Paths: direct
    kernels for groups with few input channels (CPU: every depthwise
    convolution, and groups of at most 16 input channels with a kernel larger
    than 1x1, at most 8 in float32/float64 without a shuffle; CUDA: depthwise
    with at most 8 outputs per group); the rest with a shuffle to fuse (or
    asymmetric padding) is im2col + the platform BLAS / cuBLAS GEMM per group,
    and without one torch's own convolution (oneDNN / cuDNN, faster there;
    on the CPU a float16 weight gradient, and a bfloat16 one with at most 8
    groups on a CPU without AVX512_BF16, stays im2col + float32 GEMM, faster
    than oneDNN's there). Integer inputs, which
    torch's CPU convolution also takes, go to torch. Under autocast every
    operand is cast to the autocast dtype first, as torch's conv2d does. The
    output and grad_input are contiguous, or channels_last for channels_last
    input (as torch's). On the CPU, channels_last input to a depthwise
    convolution (one output per group) without a shuffle is computed where it
    lies by NHWC kernels in the float16/bfloat16 backward and wherever the
    padding is asymmetric (its forward and float32/float64 passes otherwise
    run torch's convolution); other channels_last input without a shuffle
    (and with symmetric padding) goes to torch's convolution, which takes
    that layout as it is; the remaining kernels compute NCHW, on a
    contiguous copy.
    """
    check.tensor(input, "conv2d", "input")
    check.tensor(weight, "conv2d", "weight")
    check.tensor(bias, "conv2d", "bias", optional=True)
    check.integer(groups, "conv2d", "groups")
    check.integer(shuffle_groups, "conv2d", "shuffle_groups")
    stride_ = _conv_pair(stride, "stride")
    dilation_ = _conv_pair(dilation, "dilation")
    if input.dim() not in (3, 4):
        raise RuntimeError("Expected 3D (unbatched) or 4D (batched) input to conv2d, but got "
                           f"input of size: {list(input.shape)}")
    if isinstance(padding, str):
        if padding == "valid":
            pad = [0, 0, 0, 0]
        elif padding == "same":
            if stride_ != [1, 1]:
                raise RuntimeError("padding='same' is not supported for strided convolutions")
            if weight.dim() != 4:
                raise RuntimeError("conv2d: expected weight of 4 dimensions (out_channels, "
                                   f"in_channels / groups, kH, kW), but got weight of size "
                                   f"{list(weight.shape)}")
            # torch: total d (k - 1), the odd one at the end
            th = dilation_[0] * (weight.shape[2] - 1)
            tw = dilation_[1] * (weight.shape[3] - 1)
            pad = [th // 2, tw // 2, th - th // 2, tw - tw // 2]
        else:
            raise RuntimeError(f"Invalid padding string: '{padding}'")
    else:
        pad = _conv_pair(padding, "padding")
    if not input.is_floating_point() or not use_kernel("conv2d", input.device):
        return reference.conv2d(input, weight, bias, stride, padding, dilation, groups,
                                shuffle_groups)
    # a converted model under autocast hands a bfloat16 activation and a
    # float32 weight
    input, weight, bias = _autocast(input, weight, bias)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    out = None
    if _direct_conv2d is not None and not torch.compiler.is_compiling():
        # None unless the plain case (see _ops.DIRECT)
        out = _direct_conv2d(x, weight, bias, stride_, pad, dilation_, groups, shuffle_groups)
    if out is None:
        out = call("conv2d", x, weight, bias, stride_, pad, dilation_, groups, shuffle_groups)
    return out.squeeze(0) if unbatched else out


def channel_shuffle(input: torch.Tensor, groups: int) -> torch.Tensor:
    """Channel shuffle (ShuffleNet): ``input (N, C, *)`` viewed as
    ``(N, groups, C // groups, *)``, dims 1 and 2 swapped, flattened back.

    Same contract as :func:`torch.nn.functional.channel_shuffle`: any rank >= 3,
    any dtype (a permutation: integer, bool and complex too), ``C`` divisible by
    ``groups > 0``. A channels_last(_3d) input gives an output in the same
    format with no layout copy. ``channel_shuffle(x, C // groups)`` is the
    inverse permutation (and the backward).
    """
    if _direct_channel_shuffle is not None and not torch.compiler.is_compiling():
        out = _direct_channel_shuffle(input, groups)  # None unless the plain case
        if out is not None:
            return out
    check.tensor(input, "channel_shuffle", "input")
    check.integer(groups, "channel_shuffle", "groups", 2)
    if not use_kernel("channel_shuffle", input.device):
        return reference.channel_shuffle(input, groups)
    return call("channel_shuffle", input, int(groups))


def cat_shuffle(tensors: Sequence[torch.Tensor], groups: int) -> torch.Tensor:
    """``channel_shuffle(torch.cat(tensors, dim=1), groups)`` in one pass.

    The tail of a ShuffleNetV2 unit. ``tensors``: pieces ``(N, C_k, *)`` with
    equal ``N`` and ``*``, any channel counts whose sum ``C`` divides by
    ``groups``. Mixed dtypes are promoted as by :func:`torch.cat`. The output is
    channels_last when every piece is; the backward writes each piece's
    gradient in one pass. A piece that is a view narrowing dim 1 of a larger
    tensor (``x.chunk(2, dim=1)[0]``, as ShuffleNetV2 passes half its input
    through) is read where it lies, not copied first.
    """
    if _direct_cat_shuffle is not None and not torch.compiler.is_compiling():
        out = _direct_cat_shuffle(tensors, groups)  # None unless the plain case
        if out is not None:
            return out
    tensors = check.tensor_list(tensors, "cat_shuffle", "tensors")
    check.integer(groups, "cat_shuffle", "groups", 2)
    if not tensors:  # as torch.cat (the dispatcher cannot route an empty list)
        raise ValueError("cat_shuffle(): expected a non-empty list of tensors")
    if len({t.dtype for t in tensors}) > 1:
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        tensors = [t.to(dtype) for t in tensors]
    if not use_kernel("cat_shuffle", tensors[0].device):
        return reference.cat_shuffle(tensors, groups)
    return call_list("cat_shuffle", tensors, int(groups))


def _response_norm_args(fn, input, size, alpha, beta, k, floating=True):
    check.tensor(input, fn, "input")
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"{fn}(): argument 'size' must be int, not {type(size).__name__}")
    check.number(alpha, fn, "alpha")
    check.number(beta, fn, "beta")
    check.number(k, fn, "k")
    if floating:
        check.floating(input, fn)


def local_response_norm(
    input: torch.Tensor,
    size: int,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 1.0,
) -> torch.Tensor:
    """Local response normalization across channels.

    ``out = input * (k + alpha / size * S) ** -beta`` with ``S`` the sum of
    ``input**2`` over channels ``[c - size // 2, c + (size - 1) // 2]`` (zero
    outside). Same contract as :func:`torch.nn.functional.local_response_norm`:
    ``input (N, C, *)`` with 3 or more dims, any ``size >= 1`` (even sizes and
    sizes larger than C included); a channels_last input gives a channels_last
    output. Computed in float32 (float64 for float64 input) with running window
    sums, so the cost does not depend on ``size``.
    """
    _response_norm_args("local_response_norm", input, size, alpha, beta, k, floating=False)
    if not input.is_floating_point():
        # torch's composite takes int64 input on CPU (a float result, by type
        # promotion); the contract is to accept what it accepts, so its own op
        # decides for every non-float dtype. Where it fails, its exception
        # type with a message that names the argument.
        if size <= 0:  # as the op's own check (torch's message names kT)
            raise RuntimeError("local_response_norm: size (the window) should be greater than "
                               f"zero, but got size={size}")
        try:
            return torch.nn.functional.local_response_norm(input, size, alpha, beta, k)
        except NotImplementedError as e:  # no kernel for the dtype
            raise NotImplementedError(
                f"local_response_norm: \"input\" not implemented for '{input.dtype}' ({e})"
            ) from e
    if input.dim() < 3:
        raise ValueError(
            "local_response_norm: Expected 3D or higher dimensionality input "
            f"(got {input.dim()} dimensions)"
        )
    if not use_kernel("local_response_norm", input.device):
        return reference.local_response_norm(input, size, alpha, beta, k)
    return call(
        "local_response_norm",
        input, size, float(alpha), float(beta), float(k))


def spatial_response_norm(
    input: torch.Tensor,
    size: int,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 1.0,
) -> torch.Tensor:
    """Local response normalization within each channel (Caffe WITHIN_CHANNEL).

    ``out = input * (k + alpha / size**2 * S) ** -beta`` with ``S`` the sum of
    ``input**2`` over the ``size x size`` window of rows
    ``h - (size - 1) // 2 .. h + size // 2`` and the same columns; positions
    outside the image contribute zero. ``input (N, C, H, W)``.
    """
    _response_norm_args("spatial_response_norm", input, size, alpha, beta, k)
    if input.dim() != 4:
        raise ValueError(
            f"spatial_response_norm: Expected 4D input (got {input.dim()} dimensions)")
    if not use_kernel("spatial_response_norm", input.device):
        return reference.spatial_response_norm(input, size, alpha, beta, k)
    return call(
        "spatial_response_norm",
        input, size, float(alpha), float(beta), float(k))


def l2_norm(
    input: torch.Tensor,
    weight: torch.Tensor | None = None,
    dim: int = 1,
    eps: float = 1e-12,
) -> torch.Tensor:
    """SSD-style L2 scale normalization along ``dim``, in one fused pass.

    ``out = input / max(||input||_2, eps) * weight``, the norm taken along
    ``dim`` and ``weight`` of shape ``(input.size(dim),)`` broadcast along
    ``dim`` (or None). Same eps semantics as
    :func:`torch.nn.functional.normalize`: the norm is clamped to at least
    ``eps``, so a zero vector gives zeros (never NaN) in every dtype. The norm
    is computed in float32 (float64 for float64 input); the output has the
    input's dtype, shape and (for contiguous or channels_last input) memory
    format. The weight gradient is deterministic.
    """
    if _direct_l2_norm is not None and not torch.compiler.is_compiling():
        out = _direct_l2_norm(input, weight, dim, eps)
        if out is not None:  # None unless the plain case (see _ops.DIRECT)
            return out
    check.tensor(input, "l2_norm", "input")
    check.tensor(weight, "l2_norm", "weight", optional=True)
    check.integer(dim, "l2_norm", "dim")
    check.number(eps, "l2_norm", "eps")
    check.floating(input, "l2_norm")
    if not use_kernel("l2_norm", input.device):
        return reference.l2_norm(input, weight, dim, eps)
    return call("l2_norm", input, weight, dim, float(eps))[0]


def normalize(
    input: torch.Tensor,
    p: float = 2.0,
    dim: int = 1,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Drop-in for :func:`torch.nn.functional.normalize`:
    ``input / max(||input||_p, eps)`` along ``dim``.

    ``p=2`` runs the fused :func:`l2_norm` kernel (norm in float32, so a zero
    vector gives zeros even in float16, where torch's ``eps=1e-12`` rounds to
    zero); any other ``p`` calls torch's implementation.
    """
    check.tensor(input, "normalize", "input")
    check.number(p, "normalize", "p")
    check.integer(dim, "normalize", "dim")
    check.number(eps, "normalize", "eps")
    if p != 2:
        return torch.nn.functional.normalize(input, p, dim, eps)
    check.floating(input, "normalize")
    if _direct_l2_norm is not None and not torch.compiler.is_compiling():
        out = _direct_l2_norm(input, None, dim, eps)
        if out is not None:  # None unless the plain case (see _ops.DIRECT)
            return out
    if not use_kernel("l2_norm", input.device):
        return reference.normalize(input, p, dim, eps)
    return call("l2_norm", input, None, dim, float(eps))[0]


def cosine_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Cosine normalization of a linear layer.

    ``out[..., j] = (input[..., :] . weight[j]) / (max(|input|, eps) *
    max(|weight[j]|, eps)) + bias[j]``, i.e.
    ``normalize(input, dim=-1, eps=eps) @ normalize(weight, dim=1, eps=eps).T
    + bias``; ``input (*, in)``, ``weight (out, in)``, ``bias (out,)`` or
    None. The row norms come from fused kernels and are applied in an epilogue
    over the GEMM's output (the GEMM is the platform BLAS): no normalized copy
    of input or weight is made, forward or backward. Under autocast the
    operands are first cast to the autocast dtype, as torch's ``linear``.
    """
    check.tensor(input, "cosine_linear", "input")
    check.tensor(weight, "cosine_linear", "weight")
    check.tensor(bias, "cosine_linear", "bias", optional=True)
    check.number(eps, "cosine_linear", "eps")
    check.floating(input, "cosine_linear")
    if not use_kernel("cosine_linear", input.device):
        return reference.cosine_linear(input, weight, bias, eps)
    # as torch's linear under autocast: every operand in the autocast dtype
    input, weight, bias = _autocast(input, weight, bias)
    return call("cosine_linear", input, weight, bias, float(eps))[0]


def _gram_input(input, fn: str) -> None:
    check.tensor(input, fn, "input")
    check.floating(input, fn)
    if input.dim() < 2:
        raise RuntimeError(
            f"{fn}: expected input of shape (N, C, *) with at least 2 dimensions, but got "
            f"input of shape {list(input.shape)}")


def gram_matrix(input: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Gram matrices (style transfer): ``(N, C, *) -> (N, C, C)``.

    ``G[n] = F[n] @ F[n].T`` with ``F = input.reshape(N, C, L)``, divided by
    ``C * L`` when ``normalize`` (``L = prod(input.shape[2:])``, 1 for 2-D
    input). One GEMM (the platform BLAS / cuBLAS) with the scale applied inside
    it, accumulating in float32 (float64 for float64); output in the input's
    dtype. Contiguous and channels_last input are read in place. The
    backward, ``dF = s (dG + dG^T) F``, is one GEMM where autograd's runs two.
    Under autocast the input is first cast to the autocast dtype, as torch's
    ``bmm`` casts its operands.
    """
    _gram_input(input, "gram_matrix")
    if not isinstance(normalize, bool):
        raise TypeError(
            f"gram_matrix(): argument 'normalize' must be bool, not {type(normalize).__name__}")
    if not use_kernel("gram_matrix", input.device):
        return reference.gram_matrix(input, normalize)
    # as torch's bmm under autocast: the product in the autocast dtype
    (input,) = _autocast(input)
    return call("gram_matrix", input, normalize)


def style_loss(
    input: torch.Tensor,
    target_gram: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Gram-matrix style loss: ``mse_loss(gram_matrix(input),
    target_gram.expand(N, C, C), reduction=reduction)``, fused.

    ``input (N, C, *)``; ``target_gram (C, C)``, ``(1, C, C)`` or ``(N, C, C)``
    (the style image's Gram matrix, usually a constant; its gradient is
    computed when it requires one). The Gram matrices are computed as in
    :func:`gram_matrix` and compared with the target in one pass; the 0-dim
    result is float32 for float16/bfloat16 input, the input's dtype otherwise;
    ``reduction="none"`` gives ``(N, C, C)`` in the input's dtype. The
    backward is one symmetrizing pass and one GEMM.
    """
    _gram_input(input, "style_loss")
    check.tensor(target_gram, "style_loss", "target_gram")
    if not isinstance(reduction, str):
        raise TypeError(
            f"style_loss(): argument 'reduction' must be str, not {type(reduction).__name__}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"style_loss: {reduction} is not a valid value for reduction "
                         "(expected 'mean', 'sum' or 'none')")
    if not use_kernel("style_loss", input.device):
        return reference.style_loss(input, target_gram, reduction)
    return call("style_loss", input, target_gram, reduction)[0]
