"""torchfuse.nn: drop-in modules.

Each subclasses the torch module it replaces, with the same constructor,
parameters, buffers, ``extra_repr`` and ``state_dict`` keys, so existing code,
checkpoints and ``isinstance`` checks keep working. ``from_torch`` builds one
from an existing torch module, sharing its parameters (used by
:func:`torchfuse.convert`).
"""

from __future__ import annotations

import torch

from . import functional as F

__all__ = ["RMSNorm", "ChannelShuffle", "LocalResponseNorm", "SpatialResponseNorm"]


class _DropIn:
    """Mixin: build the torchfuse module from an instance of its torch base
    class, sharing (not copying) parameters, buffers and hooks."""

    @classmethod
    def from_torch(cls, module: torch.nn.Module, **extras):
        base = next(b for b in cls.__mro__[1:] if b.__module__.startswith("torch.nn"))
        if not isinstance(module, base):
            raise TypeError(f"{cls.__name__}.from_torch(): expected {base.__name__}, got "
                            f"{type(module).__name__}")
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        for k, v in extras.items():
            setattr(new, k, v)
        return new


class RMSNorm(_DropIn, torch.nn.RMSNorm):
    """:class:`torch.nn.RMSNorm` computed by torchfuse's fused kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)


class ChannelShuffle(_DropIn, torch.nn.ChannelShuffle):
    """:class:`torch.nn.ChannelShuffle` computed by torchfuse's kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.channel_shuffle(input, self.groups)
class LocalResponseNorm(_DropIn, torch.nn.LocalResponseNorm):
    """:class:`torch.nn.LocalResponseNorm` computed by torchfuse's fused kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.local_response_norm(input, self.size, self.alpha, self.beta, self.k)


class SpatialResponseNorm(torch.nn.Module):
    """Within-channel local response norm (Caffe's WITHIN_CHANNEL LRN) over a
    ``size x size`` window: see :func:`torchfuse.functional.spatial_response_norm`."""

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
        super().__init__()
        self.size = size
        self.alpha = alpha
        self.beta = beta
        self.k = k

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.spatial_response_norm(input, self.size, self.alpha, self.beta, self.k)

    def extra_repr(self) -> str:
        return "{size}, alpha={alpha}, beta={beta}, k={k}".format(**self.__dict__)
