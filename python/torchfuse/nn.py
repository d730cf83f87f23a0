"""torchfuse.nn: drop-in modules.

Each subclasses the torch module it replaces, with the same constructor,
parameters, buffers, ``extra_repr`` and ``state_dict`` keys, so existing code,
checkpoints and ``isinstance`` checks keep working. ``from_torch`` builds one
from an existing torch module, sharing its parameters (used by
:func:`torchfuse.convert`).
"""

from __future__ import annotations

import math

import torch

from . import functional as F

__all__ = [
    "RMSNorm",
    "GroupNorm",
    "Conv2d",
    "ChannelShuffle",
    "LocalResponseNorm",
    "SpatialResponseNorm",
    "L2Norm",
    "CosineLinear",
    "GramMatrix",
    "StyleLoss",
]


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


class GroupNorm(_DropIn, torch.nn.GroupNorm):
    """:class:`torch.nn.GroupNorm` computed by torchfuse's fused kernels, with
    an optional fused ``activation`` (``None``, ``"relu"`` or ``"silu"``)."""

    activation: str | None = None  # also the default for from_torch()

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, device=None, dtype=None,
                 activation: str | None = None) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        if activation not in (None, "relu", "silu"):
            raise ValueError(
                f"GroupNorm: activation must be None, 'relu' or 'silu', got {activation!r}")
        self.activation = activation

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps,
                            self.activation)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return base if self.activation is None else f"{base}, activation={self.activation!r}"


class Conv2d(_DropIn, torch.nn.Conv2d):
    """:class:`torch.nn.Conv2d` computed by torchfuse's kernels, with an
    optional ``shuffle_groups``: the output is then
    ``channel_shuffle(conv(x), shuffle_groups)``, the shuffle fused into the
    convolution's stores (ShuffleNet's group convolution + shuffle)."""

    shuffle_groups: int = 1  # also the default for from_torch()

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, shuffle_groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        if isinstance(shuffle_groups, bool) or not isinstance(shuffle_groups, int) or \
                shuffle_groups <= 0 or out_channels % shuffle_groups != 0:
            raise ValueError(
                f"Conv2d: shuffle_groups must be a positive int dividing out_channels "
                f"({out_channels}), got {shuffle_groups!r}")
        self.shuffle_groups = shuffle_groups

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":  # as torch: pad first, then no padding
            input = torch.nn.functional.pad(
                input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        else:
            padding = self.padding
        return F.conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation,
                        self.groups, self.shuffle_groups)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return base if self.shuffle_groups == 1 else f"{base}, shuffle_groups={self.shuffle_groups}"


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


class L2Norm(torch.nn.Module):
    """SSD's L2Norm: ``l2_norm(input, weight, dim=1, eps)``, a learned
    per-channel scale (parameter ``weight`` of shape ``(num_channels,)``,
    filled with ``scale``) applied to the L2-normalized channel vector."""

    def __init__(self, num_channels: int, scale: float = 20.0, eps: float = 1e-12,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.scale = scale
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(self.scale)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.l2_norm(input, self.weight, 1, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, scale={self.scale}, eps={self.eps}"


class CosineLinear(torch.nn.Module):
    """Cosine-normalized linear layer: ``cosine_linear(input, weight, bias,
    eps)``, the cosine similarity of each input row with each weight row
    (parameters ``weight (out_features, in_features)`` and, if ``bias``,
    ``bias (out_features,)``; initialised as :class:`torch.nn.Linear`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 eps: float = 1e-8, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.cosine_linear(input, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, eps={self.eps}")


class GramMatrix(torch.nn.Module):
    """``gram_matrix(input, normalize)``: ``(N, C, *) -> (N, C, C)``."""

    def __init__(self, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.gram_matrix(input, self.normalize)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}"


class StyleLoss(torch.nn.Module):
    """Gram-matrix style loss against a fixed target: ``forward(input)``
    returns ``style_loss(input, target_gram, reduction)``. ``target_gram``
    ``(C, C)`` or ``(N, C, C)`` is stored (detached) as the buffer
    ``target_gram``, so it follows ``.to()`` and the ``state_dict``."""

    def __init__(self, target_gram: torch.Tensor, reduction: str = "mean") -> None:
        super().__init__()
        if not isinstance(target_gram, torch.Tensor):
            raise TypeError("StyleLoss(): argument 'target_gram' must be Tensor, not "
                            f"{type(target_gram).__name__}")
        if target_gram.dim() not in (2, 3) or target_gram.shape[-1] != target_gram.shape[-2]:
            raise ValueError("StyleLoss(): expected target_gram of shape (C, C) or (N, C, C), "
                             f"got {list(target_gram.shape)}")
        self.register_buffer("target_gram", target_gram.detach().clone())
        self.reduction = reduction

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.style_loss(input, self.target_gram, self.reduction)

    def extra_repr(self) -> str:
        return f"channels={self.target_gram.shape[-1]}, reduction={self.reduction!r}"
