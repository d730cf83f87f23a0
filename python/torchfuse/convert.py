"""torchfuse.convert: swap torchfuse modules into an existing model."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from . import nn as tfnn

# torch module type -> function returning its torchfuse replacement (or None to
# keep it). Exact types only: a user's subclass may override forward.
CONVERTERS: dict[type, Callable[[torch.nn.Module], torch.nn.Module | None]] = {
    torch.nn.RMSNorm: tfnn.RMSNorm.from_torch,
    torch.nn.LocalResponseNorm: tfnn.LocalResponseNorm.from_torch,
}


def convert(module: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """Returns ``module`` with every supported layer replaced by its torchfuse
    counterpart, sharing the same parameters and buffers.

    Supported today: ``torch.nn.RMSNorm``, ``torch.nn.LocalResponseNorm``. Outputs and gradients equal the
    original's within dtype tolerance and ``state_dict()`` keys are unchanged.
    With ``inplace=False`` (default) the input module is left untouched and a
    converted deep copy is returned.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"convert(): argument 'module' must be Module, not {type(module).__name__}")
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
