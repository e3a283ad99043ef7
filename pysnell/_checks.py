"""Argument checks shared by the ops: clear errors before anything reaches a kernel."""

from __future__ import annotations

import math
import numbers

import torch


def check_float_tensor(name: str, t, *, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, float16, float64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_same_device(**tensors) -> torch.device:
    first = None
    for t in tensors.values():  # the common case in a layer's every call: no dict, no message
        if isinstance(t, torch.Tensor):
            if first is None:
                first = t.device
            elif t.device != first:
                break
    else:
        return first
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    for name, dev in devices.items():
        if dev != first:
            listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
            raise ValueError(f"all tensors must be on one device, got {listing} ({name} differs)")
    return first


def check_sparsity(sparsity, name: str = "sparsity") -> float:
    """Validate a sparsity (fraction zeroed) in [0, 1) and return it as a float."""
    if isinstance(sparsity, torch.Tensor):
        if sparsity.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(sparsity.shape)}")
        value = float(sparsity.detach().cpu())
    elif isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool):
        value = float(sparsity)
    else:
        raise TypeError(f"{name} must be a float in [0, 1), got {type(sparsity).__name__}")
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in [0, 1) (the fraction of entries zeroed), got {value}")
    return value


def check_sparsity_arg(sparsity, name: str = "sparsity"):
    """Validate a sparsity given as a float or a 1-element tensor, and return it unchanged.

    A tensor's value is checked where reading it costs no device synchronisation (CPU, eager). A GPU
    tensor's value is not read here (SNELLLinear.set_sparsity checks values it is given; a GPU tensor
    assigned another way is not checked), and the kernels clamp positions. Under torch.compile reading
    the value would break the graph, so it is skipped there too.
    """
    if isinstance(sparsity, torch.Tensor):
        if sparsity.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(sparsity.shape)}")
        if sparsity.device.type == "cpu" and not torch.compiler.is_compiling():
            check_sparsity(sparsity, name)
        return sparsity
    return check_sparsity(sparsity, name)


def check_positive_int(name: str, value) -> int:
    """`value` as given when it is an int ≥ 1 (not a bool); a ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_drop_rate(name: str, p) -> float:
    """A dropout-like probability in [0, 1) (a real number, not a bool), returned as a float."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {p!r}")
    return float(p)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
