"""Python-level argument checks: the TypeErrors torch's argument parser
raises, so that a wrong type fails the same way as with torch (shape, dtype
and device checks live in the C++ ops, as TORCH_CHECKs)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch


def tensor(value, fn: str, arg: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        kind = "Tensor or None" if optional else "Tensor"
        raise TypeError(
            f"{fn}(): argument '{arg}' must be {kind}, not {type(value).__name__}"
        )


def int_list(value, fn: str, arg: str) -> list[int]:
    # the common case (a tuple or list of plain ints) without the ABC checks
    # below, which cost microseconds a call
    if type(value) in (tuple, list, torch.Size) and all(type(v) is int for v in value):
        return list(value)
    ok = isinstance(value, (Sequence, torch.Size)) and not isinstance(value, (str, bytes))
    if ok:
        try:
            return [_as_int(v) for v in value]
        except TypeError:
            pass
    raise TypeError(f"{fn}(): argument '{arg}' must be tuple of ints, not {type(value).__name__}")


def _as_int(v) -> int:
    if isinstance(v, bool) or not isinstance(v, (numbers.Integral, torch.SymInt)):
        if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point():
            return int(v)
        raise TypeError
    return v


def number(value, fn: str, arg: str, optional: bool = False) -> None:
    if type(value) is float or type(value) is int or (value is None and optional):
        return
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat)):
        kind = "float or None" if optional else "float"
        raise TypeError(f"{fn}(): argument '{arg}' must be {kind}, not {type(value).__name__}")


def floating(t: torch.Tensor, fn: str, arg: str = "input") -> None:
    """torch raises NotImplementedError for integer input to a float op."""
    if not t.is_floating_point():
        raise NotImplementedError(f"{fn}: \"{arg}\" not implemented for '{t.dtype}'")


def integer(value, fn: str, arg: str, position: int | None = None) -> None:
    """An int argument (bool and float rejected), as torch's parser does."""
    if type(value) is int:  # the common case, without the ABC check below
        return
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        where = f" (position {position})" if position is not None else ""
        raise TypeError(
            f"{fn}(): argument '{arg}'{where} must be int, not {type(value).__name__}"
        )


def tensor_list(value, fn: str, arg: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"{fn}(): argument '{arg}' must be tuple of Tensors, not {type(value).__name__}"
        )
    for i, t in enumerate(value):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{fn}(): expected Tensor as element {i} in argument '{arg}', "
                f"but got {type(t).__name__}"
            )
    return list(value)
