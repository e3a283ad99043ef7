"""Public top-k masking ops, their autograd Function, and backend dispatch.

Backend ops (same signature in every backend):
- "topk.threshold"(x2d, sparsity) -> (G,) float32: quantile threshold of |x| per row.
- "topk.mask_"(x, sparsity, k, want_packed) -> (x, threshold, packed or None): in-place masking.
"""

from __future__ import annotations

import torch

from ... import _backend, _library
from ..._checks import check_float_tensor, check_sparsity
from . import reference as ref


def _torch_threshold(x2d: torch.Tensor, sparsity) -> torch.Tensor:
    return ref.quantile_threshold(ref.magnitude_keys(x2d), sparsity)


def _torch_mask_(x: torch.Tensor, sparsity, k, want_packed: bool):
    keep, t = ref.keep_mask(x, sparsity=sparsity, k=k)
    x.masked_fill_(~keep.view(x.shape), 0)
    return x, t.to(torch.float32), (ref.pack_mask(keep) if want_packed else None)


_backend.register("topk.threshold", "torch", _torch_threshold)
_backend.register("topk.mask_", "torch", _torch_mask_)


def _check_mode(x: torch.Tensor, sparsity, k):
    check_float_tensor("x", x)
    if (sparsity is None) == (k is None):
        raise ValueError("give exactly one of sparsity= (fraction zeroed, in [0, 1)) or k= (entries kept)")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int in [0, {x.numel()}], got {type(k).__name__}")
        if not 0 <= k <= x.numel():
            raise ValueError(f"k must be in [0, numel={x.numel()}], got {k}")
        return None, k
    return check_sparsity(sparsity), None


def select_threshold(x2d: torch.Tensor, sparsity) -> torch.Tensor:
    """Quantile threshold of |x| for each row of a 2-D tensor (G groups), float32 (G,), no sync.

    `sparsity` may be a float or a 0-dim tensor (e.g. a layer's buffer); it is not validated here.
    """
    # Through the custom op: it picks the backend at run time (opaque to torch.compile).
    return _library.topk_threshold(x2d, sparsity)


def topk_mask_(x: torch.Tensor, *, sparsity=None, k=None):
    """Zero all but the largest-magnitude entries of `x` in place.

    Exactly one of `sparsity` (fraction zeroed, quantile threshold, keep |x| > t) or `k`
    (keep exactly k entries, ties in flat-index order) is given. Returns (x, threshold) with the
    threshold a 0-dim float32 tensor on x's device. NaN ranks below every number.
    """
    sparsity, k = _check_mode(x, sparsity, k)
    if x.numel() == 0:
        return x, torch.zeros((), dtype=torch.float32, device=x.device)
    x, t, _ = _library.topk_mask_(x, sparsity, k, False)
    return x, t


class TopkMaskFunction(torch.autograd.Function):
    """Out-of-place masking whose backward multiplies the gradient by the (constant) kept set.

    Saves a packed 1-bit mask (numel/8 bytes), nothing else.
    """

    @staticmethod
    def forward(ctx, x, sparsity, k):
        out = x.detach().clone()
        out, t, packed = _library.topk_mask_(out, sparsity, k, True)
        ctx.save_for_backward(packed)
        ctx.numel = x.numel()
        ctx.mark_non_differentiable(t)
        return out, t

    @staticmethod
    def backward(ctx, grad_out, _grad_t):
        (packed,) = ctx.saved_tensors
        keep = ref.unpack_mask(packed, ctx.numel).view(grad_out.shape)
        return grad_out * keep, None, None


def topk_mask(x: torch.Tensor, *, sparsity=None, k=None):
    """Differentiable, out-of-place `topk_mask_`: returns (masked copy, threshold)."""
    sparsity, k = _check_mode(x, sparsity, k)
    if x.numel() == 0:
        return x.clone(), torch.zeros((), dtype=torch.float32, device=x.device)
    return TopkMaskFunction.apply(x, sparsity, k)
