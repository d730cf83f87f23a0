"""torchfuse.convert: swap torchfuse modules into an existing model."""

from __future__ import annotations

import copy
import sys
from collections import OrderedDict
from collections.abc import Callable

import torch

from . import nn as tfnn


def _conv2d(module: torch.nn.Conv2d) -> torch.nn.Module | None:
    """Grouped or dilated convolutions with zero padding (API.md); plain ones
    stay torch's. Inside, conv2d picks its path per shape: its direct kernels
    for depthwise convolutions and (CPU) groups of few input channels, torch's
    own convolution (oneDNN / cuDNN) for the rest when there is no shuffle to
    fuse. torchfuse.nn.Conv2d.from_torch swaps any Conv2d by hand."""
    grouped_or_dilated = module.groups > 1 or any(d > 1 for d in module.dilation)
    if module.padding_mode != "zeros" or not grouped_or_dilated:
        return None
    return tfnn.Conv2d.from_torch(module)


# torch module type -> function returning its torchfuse replacement (or None to
# keep it). Exact types only: a user's subclass may override forward.
CONVERTERS: dict[type, Callable[[torch.nn.Module], torch.nn.Module | None]] = {
    torch.nn.RMSNorm: tfnn.RMSNorm.from_torch,
    torch.nn.GroupNorm: tfnn.GroupNorm.from_torch,
    torch.nn.ChannelShuffle: tfnn.ChannelShuffle.from_torch,
    torch.nn.LocalResponseNorm: tfnn.LocalResponseNorm.from_torch,
    torch.nn.Conv2d: _conv2d,
}


def convert(module: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """Returns ``module`` with every supported layer replaced by its torchfuse
    counterpart, sharing the same parameters and buffers.

    Supported today: ``torch.nn.RMSNorm``, ``torch.nn.GroupNorm`` (activation
    None), ``torch.nn.ChannelShuffle``,
    ``torch.nn.LocalResponseNorm``, grouped or dilated ``torch.nn.Conv2d``
    with zero padding (plain ones are left to torch), torchvision's ShuffleNetV2
    ``InvertedResidual`` (cat + shuffle tail fused into ``cat_shuffle``) and SSD
    VGG L2 scale (``SSDFeatureExtractorVGG``: ``F.normalize(x) * scale_weight``
    becomes one fused ``l2_norm`` with the same parameter). Outputs and
    gradients equal the original's within dtype tolerance and ``state_dict()``
    keys are unchanged. With ``inplace=False`` (default) the input module is
    left untouched and a converted deep copy is returned.
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
# torchvision itself. (module name, class name) -> make(cls) -> converter.
OPTIONAL_CONVERTERS: dict[tuple[str, str], Callable[[type], Callable]] = {}


def _register_optional() -> None:
    for (mod_name, cls_name), make in OPTIONAL_CONVERTERS.items():
        cls = getattr(sys.modules.get(mod_name), cls_name, None)
        if cls is not None and cls not in CONVERTERS:
            CONVERTERS[cls] = make(cls)


def _as_subclass(cls: type) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """A converter to `cls` (a subclass of the module's class overriding
    forward): same __dict__, so same parameters, buffers and state_dict keys;
    its children are converted too."""

    def convert_module(module: torch.nn.Module) -> torch.nn.Module:
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new._modules = dict(module._modules)
        for name, child in list(new.named_children()):
            replaced = _replace(child)
            if replaced is not None:
                setattr(new, name, replaced)
        return new

    return convert_module


def _shufflenet_v2_unit(base: type) -> Callable:
    """torchvision's ShuffleNetV2 InvertedResidual with its torch.cat +
    channel_shuffle(out, 2) tail fused into one cat_shuffle pass."""
    from .functional import cat_shuffle

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            return cat_shuffle([x1, self.branch2(x2)], 2)
        return cat_shuffle([self.branch1(x), self.branch2(x)], 2)

    return _as_subclass(type(base.__name__, (base,), {"forward": forward, "__module__": __name__}))


def _ssd_vgg(base: type) -> Callable:
    """torchvision's SSD VGG feature extractor with its conv4_3 L2
    normalization + rescale as one fused l2_norm (same scale_weight)."""
    from .functional import l2_norm

    def forward(self, x: torch.Tensor):
        x = self.features(x)
        output = [l2_norm(x, self.scale_weight, 1, 1e-12)]
        for block in self.extra:
            x = block(x)
            output.append(x)
        return OrderedDict([(str(i), v) for i, v in enumerate(output)])

    return _as_subclass(type(base.__name__, (base,), {"forward": forward, "__module__": __name__}))


OPTIONAL_CONVERTERS[("torchvision.models.shufflenetv2", "InvertedResidual")] = _shufflenet_v2_unit
OPTIONAL_CONVERTERS[("torchvision.models.detection.ssd", "SSDFeatureExtractorVGG")] = _ssd_vgg
