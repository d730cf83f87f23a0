"""Pure-PyTorch implementations of every torchfuse function.

Same signatures as torchfuse.functional. They are the ground truth for the
tests (evaluated in float64) and the fallback on devices with no kernel. They
favour clarity over speed, computing in float32 (float64 for float64 input)
and rounding once at the end, as the kernels do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["rms_norm", "add_rms_norm", "channel_shuffle", "cat_shuffle"]


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


def channel_shuffle(input: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, *) -> view (N, groups, C // groups, *) -> swap dims 1, 2 -> (N, C, *)."""
    n, c = input.shape[0], input.shape[1]
    rest = input.shape[2:]
    out = input.reshape(n, groups, c // groups, *rest).transpose(1, 2)
    return out.reshape(input.shape)


def cat_shuffle(tensors: Sequence[torch.Tensor], groups: int) -> torch.Tensor:
    """channel_shuffle(torch.cat(tensors, dim=1), groups)."""
    return channel_shuffle(torch.cat(list(tensors), dim=1), groups)
