"""torchfuse.convert: swap torchfuse modules into an existing model."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable

import torch

from . import nn as tfnn

# torch module type -> function returning its torchfuse replacement (or None to
# keep it). Exact types only: a user's subclass may override forward.
CONVERTERS: dict[type, Callable[[torch.nn.Module], torch.nn.Module | None]] = {
    torch.nn.RMSNorm: tfnn.RMSNorm.from_torch,
    torch.nn.ChannelShuffle: tfnn.ChannelShuffle.from_torch,
    torch.nn.LocalResponseNorm: tfnn.LocalResponseNorm.from_torch,
}


def convert(module: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """Returns ``module`` with every supported layer replaced by its torchfuse
    counterpart, sharing the same parameters and buffers.

    Supported today: ``torch.nn.RMSNorm``, ``torch.nn.ChannelShuffle``,
    ``torch.nn.LocalResponseNorm`` and torchvision's ShuffleNetV2
    ``InvertedResidual`` (cat + shuffle tail fused). Outputs and gradients equal
    the original's within dtype tolerance and ``state_dict()`` keys are unchanged.
    With ``inplace=False`` (default) the input module is left untouched and a
    converted deep copy is returned.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"convert(): argument 'module' must be Module, not {type(module).__name__}")
    _register_optional()
    if not inplace:
        module = copy.deepcopy(module)
    replaced = _replace(module)
    return replaced if replaced is not None else module


def _replace(module: torch.nn.Module) -> torch.nn.Module | None:
    conv = CONVERTERS.get(type(module))
    if conv is not None:
        return conv(module)
    for name, child in module.named_children():
        new = _replace(child)
        if new is not None:
            setattr(module, name, new)
    return None


# ----------------------------------------------------- optional (torchvision)
# Converters for third-party classes, added only once their module has been
# imported (a model holding one has imported it): torchfuse never imports
# torchvision itself.
OPTIONAL_CONVERTERS: dict[tuple[str, str], Callable[[type], Callable]] = {}


def _register_optional() -> None:
    for (mod_name, cls_name), make in OPTIONAL_CONVERTERS.items():
        cls = getattr(sys.modules.get(mod_name), cls_name, None)
        if cls is not None and cls not in CONVERTERS:
            CONVERTERS[cls] = make(cls)


def _shufflenet_v2_unit(base: type) -> Callable:
    """torchvision's ShuffleNetV2 InvertedResidual with its torch.cat +
    channel_shuffle(out, 2) tail fused into one cat_shuffle pass. Same
    submodules, so the same state_dict keys."""
    from .functional import cat_shuffle

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            return cat_shuffle([x1, self.branch2(x2)], 2)
        return cat_shuffle([self.branch1(x), self.branch2(x)], 2)

    cls = type(base.__name__, (base,), {"forward": forward, "__module__": __name__})

    def convert_unit(module):
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new._modules = dict(module._modules)
        for name, child in list(new.named_children()):  # its branches too
            replaced = _replace(child)
            if replaced is not None:
                setattr(new, name, replaced)
        return new

    return convert_unit


OPTIONAL_CONVERTERS[("torchvision.models.shufflenetv2", "InvertedResidual")] = _shufflenet_v2_unit
