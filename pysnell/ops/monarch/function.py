"""Monarch autograd Function, public ops and backend dispatch.

Backend ops (same signature in every backend):
- "monarch.forward"(x2, w1, w2, bias, out_features) -> y2 (T, out_features)
- "monarch.backward"(dy2, x2, w1, w2, needs=(x, w1, w2)) -> (dx2, dw1, dw2)
x2 may have fewer features than k·p (the missing ones are zeros) and out_features may be
fewer than l·s (the rest is cut): that is how MonarchLinear serves sizes that nblocks does
not divide, without padded copies in the kernels. The Function saves x only; the
intermediate is recomputed in backward.
"""

from __future__ import annotations

import torch

from ... import _backend, _library
from ..._checks import check_float_tensor, check_positive_int, check_same_device
from . import reference as ref


def _pad_features(t, width):
    return t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))


def _torch_forward(x2, w1, w2, bias, out_features):
    k, _, p = w1.shape
    y = ref.forward(_pad_features(x2, k * p), w1, w2)[:, :out_features]
    return y if bias is None else y + bias


def _torch_backward(dy2, x2, w1, w2, needs):
    k, _, p = w1.shape
    l, s, _ = w2.shape
    n_in = x2.shape[1]
    dx, dw1, dw2 = ref.backward(_pad_features(dy2, l * s), _pad_features(x2, k * p), w1, w2, *needs)
    return (None if dx is None else dx[:, :n_in]), dw1, dw2


_backend.register("monarch.forward", "torch", _torch_forward)
_backend.register("monarch.backward", "torch", _torch_backward)


def check_monarch_factors(w1, w2, in_features: int | None = None) -> None:
    check_float_tensor("w1", w1, ndim=3)
    check_float_tensor("w2", w2, ndim=3)
    k, q, p = w1.shape
    l, s, r = w2.shape
    if l * r != k * q:
        raise ValueError(
            f"Monarch factors do not chain: w1 (k={k}, q={q}, p={p}) gives k·q={k * q} "
            f"intermediate features but w2 (l={l}, s={s}, r={r}) expects l·r={l * r}"
        )
    if in_features is not None and k * p != in_features:
        raise ValueError(f"x has {in_features} features but w1 (k={k}, q={q}, p={p}) expects k·p={k * p}")


class MonarchMatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, bias, out_features):
        x2 = x.reshape(-1, x.shape[-1])
        # Through the custom op: it picks the backend at run time (opaque to torch.compile).
        y2 = _library.monarch_forward(x2, w1, w2, bias, out_features)
        ctx.save_for_backward(x, w1, w2)
        return y2.reshape(*x.shape[:-1], y2.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2 = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        needs = tuple(ctx.needs_input_grad[:3])
        dx, dw1, dw2 = _library.monarch_backward(dy2, x.reshape(-1, x.shape[-1]), w1, w2, needs)
        dbias = dy2.sum(0) if ctx.needs_input_grad[3] else None
        if dx is not None:
            dx = dx.reshape(x.shape)
        return dx, dw1, dw2, dbias, None


def monarch_matmul(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None = None):
    """y = Monarch(w1, w2)·x over the last dim of x (fly layout, spec/MONARCH.md §1)."""
    check_float_tensor("x", x)
    check_monarch_factors(w1, w2, x.shape[-1])
    check_same_device(x=x, w1=w1, w2=w2, **({"bias": bias} if bias is not None else {}))
    if bias is not None and bias.shape != (w2.shape[0] * w2.shape[1],):
        raise ValueError(f"bias must have shape ({w2.shape[0] * w2.shape[1]},), got {tuple(bias.shape)}")
    if w1.dtype != x.dtype or w2.dtype != x.dtype:
        w1, w2 = w1.to(x.dtype), w2.to(x.dtype)
    if bias is not None:
        bias = bias.to(x.dtype)
    return MonarchMatmulFunction.apply(x, w1, w2, bias, w2.shape[0] * w2.shape[1])


def monarch_project(weight: torch.Tensor, nblocks: int):
    """Project a dense (out, in) weight onto Monarch factors (w1, w2) as MonarchLinear lays them out.

    Non-divisible sizes are zero-padded to nblocks·ceil(size/nblocks), as the layer pads x.
    """
    check_float_tensor("weight", weight, ndim=2)
    out_f, in_f = weight.shape
    w1_shape, w2_shape = monarch_shapes(in_f, out_f, nblocks)
    in_pad = w1_shape[0] * w1_shape[2]
    out_pad = w2_shape[0] * w2_shape[1]
    padded = weight.new_zeros(out_pad, in_pad)
    padded[:out_f, :in_f] = weight
    return ref.project(padded, w1_shape, w2_shape)


def monarch_shapes(in_features: int, out_features: int, nblocks: int):
    """(w1 shape, w2 shape) of a MonarchLinear layer (spec/MONARCH.md §2)."""
    for name, v in (("in_features", in_features), ("out_features", out_features), ("nblocks", nblocks)):
        check_positive_int(name, v)
    if nblocks > min(in_features, out_features):
        raise ValueError(f"nblocks={nblocks} must not exceed in_features={in_features} or out_features={out_features}")
    in_blk = -(-in_features // nblocks)
    out_blk = -(-out_features // nblocks)
    if nblocks * in_blk < nblocks * out_blk:
        return (nblocks, in_blk, in_blk), (nblocks, out_blk, in_blk)
    return (nblocks, out_blk, in_blk), (nblocks, out_blk, out_blk)
