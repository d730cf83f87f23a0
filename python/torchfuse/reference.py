"""Pure-PyTorch implementations of every torchfuse function.

Same signatures as torchfuse.functional. They are the ground truth for the
tests (evaluated in float64) and the fallback on devices with no kernel. They
favour clarity over speed, computing in float32 (float64 for float64 input)
and rounding once at the end, as the kernels do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "conv2d",
    "channel_shuffle",
    "cat_shuffle",
    "rms_norm",
    "add_rms_norm",
    "group_norm",
    "local_response_norm",
    "spatial_response_norm",
    "l2_norm",
    "normalize",
    "cosine_linear",
    "gram_matrix",
    "style_loss",
]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    """out = input / sqrt(mean(input**2 over the normalized dims) + eps) * weight."""
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    dims = tuple(range(-len(normalized_shape), 0))
    x = input.to(_acc(input.dtype))
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    return y.to(input.dtype)


def add_rms_norm(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(input + residual), input + residual)."""
    summed = input + residual
    return rms_norm(summed, normalized_shape, weight, eps), summed


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
) -> torch.Tensor:
    """act((x - mean) / sqrt(var + eps) * weight[c] + bias[c]), mean and (biased)
    var over each sample's group of C // num_groups channels and all spatial
    positions; act is None, "relu" or "silu". Same memory format as the
    kernels: channels_last(_3d) input gives channels_last(_3d) output."""
    n, c = input.shape[0], input.shape[1]
    x = input.to(_acc(input.dtype)).reshape(n, num_groups, -1)
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    y = ((x - mean) * torch.rsqrt(var + eps)).reshape(input.shape)
    shape = (1, c) + (1,) * (input.dim() - 2)
    if weight is not None:
        y = y * weight.to(y.dtype).reshape(shape)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(shape)
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "silu":
        y = torch.nn.functional.silu(y)
    elif activation is not None:
        raise ValueError(f"group_norm: unknown activation {activation!r}")
    return y.to(input.dtype).contiguous(memory_format=kept_format(input))


def kept_format(input: torch.Tensor) -> torch.memory_format:
    """The memory format group_norm, the response norms and conv2d keep:
    channels_last(_3d) when the input already is (and is not also
    contiguous), else contiguous (csrc/common/layout.h in C++)."""
    if not input.is_contiguous():
        if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def channel_shuffle(input: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, *) -> view (N, groups, C // groups, *) -> swap dims 1, 2 -> (N, C, *)."""
    n, c = input.shape[0], input.shape[1]
    rest = input.shape[2:]
    out = input.reshape(n, groups, c // groups, *rest).transpose(1, 2)
    return out.reshape(input.shape)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
           shuffle_groups=1):
    """channel_shuffle(torch.nn.functional.conv2d(...), shuffle_groups)."""
    out = torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups)
    if shuffle_groups == 1:
        return out
    if shuffle_groups <= 0 or out.shape[-3] % shuffle_groups != 0:
        raise RuntimeError(
            f"conv2d: expected the number of output channels ({out.shape[-3]}) to be "
            f"divisible by shuffle_groups ({shuffle_groups})")
    if out.dim() == 3:
        return channel_shuffle(out.unsqueeze(0), shuffle_groups).squeeze(0)
    return channel_shuffle(out, shuffle_groups)


def cat_shuffle(tensors: Sequence[torch.Tensor], groups: int) -> torch.Tensor:
    """channel_shuffle(torch.cat(tensors, dim=1), groups)."""
    return channel_shuffle(torch.cat(list(tensors), dim=1), groups)


def window_sum(t: torch.Tensor, dim: int, lo: int, hi: int) -> torch.Tensor:
    """out[i] = sum of t[j] along `dim`, j in [i - lo, i + hi], zero outside."""
    n = t.shape[dim]
    shape = list(t.shape)
    shape[dim] = lo
    before = t.new_zeros(shape)
    shape[dim] = hi
    padded = torch.cat([before, t, t.new_zeros(shape)], dim)
    out = padded.narrow(dim, 0, n)
    for i in range(1, lo + hi + 1):
        out = out + padded.narrow(dim, i, n)
    return out


def local_response_norm(
    input: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0
) -> torch.Tensor:
    """out = input * (k + alpha / size * S) ** -beta, S the sum of input**2
    over channels [c - size // 2, c + (size - 1) // 2] (zero outside)."""
    if input.dim() < 3:
        raise ValueError(
            f"Expected 3D or higher dimensionality input (got {input.dim()} dimensions)"
        )
    x = input.to(_acc(input.dtype))
    s = k + alpha / size * window_sum(x * x, 1, size // 2, (size - 1) // 2)
    return (x * s.pow(-beta)).to(input.dtype)


def spatial_response_norm(
    input: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0
) -> torch.Tensor:
    """out = input * (k + alpha / size**2 * S) ** -beta, S the sum of input**2
    over rows h - (size - 1) // 2 .. h + size // 2 and the same columns (zero
    outside the image); input (N, C, H, W)."""
    if input.dim() != 4:
        raise ValueError(f"Expected 4D input (N, C, H, W) (got {input.dim()} dimensions)")
    x = input.to(_acc(input.dtype))
    lo, hi = (size - 1) // 2, size // 2
    S = window_sum(window_sum(x * x, 2, lo, hi), 3, lo, hi)
    s = k + alpha / (size * size) * S
    return (x * s.pow(-beta)).to(input.dtype)


def normalize(
    input: torch.Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12
) -> torch.Tensor:
    """input / max(||input||_p along dim, eps), computed in float32 (float64)."""
    x = input.to(_acc(input.dtype))
    return torch.nn.functional.normalize(x, p, dim, eps).to(input.dtype)


def l2_norm(
    input: torch.Tensor,
    weight: torch.Tensor | None = None,
    dim: int = 1,
    eps: float = 1e-12,
) -> torch.Tensor:
    """normalize(input, 2, dim, eps) * weight, weight broadcast along dim."""
    x = input.to(_acc(input.dtype))
    y = torch.nn.functional.normalize(x, 2.0, dim, eps)
    if weight is not None:
        shape = [1] * x.dim()
        if shape:
            shape[dim] = -1
        y = y * weight.to(y.dtype).reshape(shape)
    return y.to(input.dtype)


def cosine_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """normalize(input, dim=-1, eps) @ normalize(weight, dim=1, eps).T + bias."""
    acc = _acc(input.dtype)
    x = torch.nn.functional.normalize(input.to(acc), 2.0, -1, eps)
    w = torch.nn.functional.normalize(weight.to(acc), 2.0, 1, eps)
    y = x @ w.t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(input.dtype)


def gram_matrix(input: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """F @ F^T per sample, F = input.reshape(N, C, -1), divided by C * L
    (L = prod(input.shape[2:])) when normalize; (N, C, C) in input's dtype."""
    n, c = input.shape[0], input.shape[1]
    f = input.to(_acc(input.dtype)).reshape(n, c, math.prod(input.shape[2:]))
    g = f @ f.transpose(1, 2)
    if normalize:
        g = g / (c * f.shape[2])
    return g.to(input.dtype)


def style_loss(input: torch.Tensor, target_gram: torch.Tensor,
               reduction: str = "mean") -> torch.Tensor:
    """mse_loss(gram_matrix(input), target_gram.expand(N, C, C), reduction),
    computed in the accumulate type; the 0-dim result is float32 for
    float16/bfloat16 input, the input's dtype otherwise; "none" gives
    (N, C, C) in input's dtype."""
    acc = _acc(input.dtype)
    n, c = input.shape[0], input.shape[1]
    f = input.to(acc).reshape(n, c, math.prod(input.shape[2:]))
    g = f @ f.transpose(1, 2) / (c * f.shape[2])
    d = g - target_gram.to(acc).expand(n, c, c)
    e = d * d
    if reduction == "none":
        return e.to(input.dtype)
    return e.mean() if reduction == "mean" else e.sum()
