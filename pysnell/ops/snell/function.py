"""SNELL autograd Functions and backend dispatch.

Backend ops (same signature in every backend):
- "snell.merge"(A, B, params, spec) -> ΔW (m, n) in the factors' dtype
- "snell.merge_backward"(G, A, B, params, spec, need) -> (dA, dB, dcoeffs, dalpha, dbeta, dgamma)
- "snell.layer_forward"(x2, weight, bias, A, B, params, spec, sparsity) -> (y2, thresholds (G,))
- "snell.layer_backward"(dy2, x2, weight, A, B, params, spec, sparsity, thresholds, needs)
      -> (dx2, dweight, dbias, dA, dB, dcoeffs, dalpha, dbeta, dgamma)
- "snell.dropout_pack"(keep (T, n) bool) -> bits (T, ⌈n/8⌉) uint8
- "snell.dropout_apply"(v2 (T, n), bits or None, row_scale (T,) float32) -> v2 ⊙ D in v2's dtype
The layer Function saves only x, the factors, the kernel scalars and the thresholds (the branch form
in training adds its keep bits and row scales); every backend recomputes ΔW (or its tiles) in backward
instead of saving anything m×n.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ... import _backend, _library
from ..topk.function import select_threshold
from . import reference as ref
from .reference import KernelParams, SnellSpec


def thresholds_for(delta: torch.Tensor, sparsity, groups: int) -> torch.Tensor:
    """Per-group quantile thresholds of |ΔW| (float32, (G,)); zeros when sparsity is 0."""
    if ref.known_zero_sparsity(sparsity):
        return torch.zeros(groups, dtype=torch.float32, device=delta.device)
    return select_threshold(delta.reshape(groups, -1), sparsity)


def effective_weight(weight, S, dtype):
    """W0 + S computed in fp32 (or wider), cast to the GEMM dtype (S alone for the branch-only form)."""
    if weight is None:
        return S.to(dtype)
    acc = torch.promote_types(torch.float32, torch.promote_types(S.dtype, dtype))
    return (weight.to(acc) + S.to(acc)).to(dtype)


def _torch_layer_forward(x2, weight, bias, A, B, params, spec, sparsity):
    delta = ref.merge(A, B, params, spec)
    t = thresholds_for(delta, sparsity, spec.out_groups)
    S = ref.sparsify_given_threshold(delta, t, spec.mode, sparsity, spec.out_groups)
    W = effective_weight(weight, S, x2.dtype)
    y = F.linear(x2, W, None if bias is None else bias.to(x2.dtype))
    return y, t


def _torch_layer_backward(dy2, x2, weight, A, B, params, spec, sparsity, t, needs):
    need_x, need_w, need_b, need_A, need_B = needs[:5]
    dx = dweight = dbias = None
    delta = ref.merge(A, B, params, spec)
    if need_x:
        S = ref.sparsify_given_threshold(delta, t, spec.mode, sparsity, spec.out_groups)
        dx = dy2 @ effective_weight(weight, S, dy2.dtype)
        del S
    if need_b:
        dbias = dy2.sum(0)
    grads = (None,) * 6
    if need_w or need_A or need_B or any(needs[5:]):
        grad_s = (dy2.t() @ x2.to(dy2.dtype)).to(A.dtype)
        if need_w:
            dweight = grad_s.to(weight.dtype)
        if need_A or need_B or any(needs[5:]):
            grad_delta = ref.sparsify_backward(grad_s, delta, t, spec.mode, sparsity, spec.out_groups)
            del grad_s, delta  # keep the peak at a few m×n buffers
            grads = ref.merge_backward(grad_delta, A, B, params, spec, needs[5:])
    return (dx, dweight, dbias) + tuple(grads)


_backend.register("snell.merge", "torch", ref.merge)
_backend.register("snell.merge_backward", "torch", ref.merge_backward)
_backend.register("snell.layer_forward", "torch", _torch_layer_forward)
_backend.register("snell.layer_backward", "torch", _torch_layer_backward)
_backend.register("snell.dropout_pack", "torch", ref.dropout_pack)
_backend.register("snell.dropout_apply", "torch", ref.dropout_apply)


def sparsity_snapshot(sparsity):
    """What a Function taking `sparsity` should be given: a tensor sparsity (a layer's buffer) is
    copied when autograd will record the call, so changing the buffer between forward and backward
    (e.g. a SNELLA re-allocation) does not change this step's gradients. Under no_grad / inference
    nothing is recorded and nothing is copied (one launch fewer per layer call).

    The copy is reused while the buffer is unchanged (same tensor, storage and version counter: every
    in-place write bumps it), so a training step copies each layer's sparsity once, not per call.
    Snapshots are only read. A CUDA-graph capture and torch.compile always copy: a replayed graph
    must read the buffer's value at replay time."""
    if not (isinstance(sparsity, torch.Tensor) and torch.is_grad_enabled()):
        return sparsity
    if torch.compiler.is_compiling() or (sparsity.is_cuda and torch.cuda.is_current_stream_capturing()):
        return sparsity.detach().clone()
    key = id(sparsity)
    entry = _snapshots.get(key)
    version, ptr = sparsity._version, sparsity.data_ptr()
    if entry is not None and entry[0]() is sparsity and entry[1] == version and entry[2] == ptr:
        return entry[3]
    snap = sparsity.detach().clone()
    if len(_snapshots) >= 4096:  # layers come and go (e.g. a sweep): stay bounded
        _snapshots.clear()
    _snapshots[key] = (weakref.ref(sparsity), version, ptr, snap)
    return snap


_snapshots: dict = {}  # id(buffer) -> (weakref to it, version, data_ptr, snapshot)


def _saved_sparsity(sparsity):
    """The tensor to save for backward (None for a float): the Functions' callers pass a snapshot."""
    return sparsity if isinstance(sparsity, torch.Tensor) else None


def _param_grads(ctx, grads, first_index):
    """Keep only the gradients that autograd asked for (by input index)."""
    return tuple(g if ctx.needs_input_grad[first_index + i] else None for i, g in enumerate(grads))


class KernelMergeFunction(torch.autograd.Function):
    """ΔW = κ(B, A) with the closed-form backward of spec §2."""

    @staticmethod
    def forward(ctx, A, B, coeffs, alpha, beta, gamma, spec: SnellSpec):
        params = KernelParams(coeffs, alpha, beta, gamma)
        # Backend calls go through the custom ops: they pick the backend at run time (opaque to torch.compile).
        delta = _library.snell_merge(A, B, params, spec)
        ctx.save_for_backward(A, B, coeffs, alpha, beta, gamma)
        ctx.spec = spec
        return delta

    @staticmethod
    def backward(ctx, G):
        A, B, coeffs, alpha, beta, gamma = ctx.saved_tensors
        params = KernelParams(coeffs, alpha, beta, gamma)
        need = tuple(ctx.needs_input_grad[2:6])
        dA, dB, *rest = _library.snell_merge_backward(G.to(A.dtype), A, B, params, ctx.spec, need)
        return _param_grads(ctx, (dA, dB, *rest), 0) + (None,)


class SparsifyFunction(torch.autograd.Function):
    """S = sparsify(ΔW) with a constant per-group threshold; saves ΔW and the thresholds.

    A tensor sparsity is saved as given: pass `sparsity_snapshot(s)` if the buffer may change
    before backward."""

    @staticmethod
    def forward(ctx, delta, sparsity, mode: str, groups: int):
        t = thresholds_for(delta, sparsity, groups)
        S = ref.sparsify_given_threshold(delta, t, mode, sparsity, groups)
        ctx.save_for_backward(delta, t, _saved_sparsity(sparsity))
        ctx.sparsity, ctx.mode, ctx.groups = sparsity, mode, groups
        return S

    @staticmethod
    def backward(ctx, grad_s):
        delta, t, s_saved = ctx.saved_tensors
        sparsity = ctx.sparsity if s_saved is None else s_saved
        return ref.sparsify_backward(grad_s, delta, t, ctx.mode, sparsity, ctx.groups), None, None, None


class SNELLLinearFunction(torch.autograd.Function):
    """y = x (W0 + S)ᵀ + b, or the branch x Sᵀ alone when weight is None.

    S = sparsify(κ(B, A)) with thresholds selected in forward. Saves x, A, B, the kernel
    scalars and the thresholds; backward recomputes ΔW from A and B (no re-selection). A tensor
    sparsity is saved as given: pass `sparsity_snapshot(s)` if the buffer may change before backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, coeffs, alpha, beta, gamma, sparsity, spec: SnellSpec):
        n = A.shape[1]
        x2 = x.reshape(-1, n)
        params = KernelParams(coeffs, alpha, beta, gamma)
        y2, t = _library.snell_layer_forward(x2, weight, bias, A, B, params, spec, sparsity)
        ctx.save_for_backward(x, weight, A, B, coeffs, alpha, beta, gamma, t, _saved_sparsity(sparsity))
        ctx.spec, ctx.sparsity = spec, sparsity
        return y2.reshape(*x.shape[:-1], y2.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, weight, A, B, coeffs, alpha, beta, gamma, t, s_saved = ctx.saved_tensors
        n = A.shape[1]
        params = KernelParams(coeffs, alpha, beta, gamma)
        needs = tuple(ctx.needs_input_grad[:9])
        dy2 = dy.reshape(-1, dy.shape[-1])
        sparsity = ctx.sparsity if s_saved is None else s_saved
        grads = _library.snell_layer_backward(dy2, x.reshape(-1, n), weight, A, B, params, ctx.spec, sparsity, t, needs)
        dx = grads[0]
        if dx is not None:
            dx = dx.reshape(x.shape).to(x.dtype)
        return (dx,) + _param_grads(ctx, grads[1:], 1) + (None, None)


class SNELLBranchFunction(torch.autograd.Function):
    """The branch form in training: y = x W0ᵀ + b + (x ⊙ D) Sᵀ (W0 optional), D = keep bits × row scale
    (reference.dropout_apply; the caller draws them). Saves x, the factors, the kernel scalars, the
    thresholds and the packed bits (T·⌈n/8⌉ bytes) with the row scales (T floats): the dropped input
    x ⊙ D is rebuilt in backward, never saved."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, coeffs, alpha, beta, gamma, sparsity, spec: SnellSpec, bits, row_scale):
        n = A.shape[1]
        x2 = x.reshape(-1, n)
        params = KernelParams(coeffs, alpha, beta, gamma)
        xd = _library.snell_dropout_apply(x2, bits, row_scale)
        y2, t = _library.snell_layer_forward(xd, None, bias, A, B, params, spec, sparsity)
        del xd
        if weight is not None:
            y2.addmm_(x2, weight.to(x2.dtype).t())  # the frozen GEMM accumulates onto the branch (+ bias)
        ctx.save_for_backward(
            x, weight, A, B, coeffs, alpha, beta, gamma, t, _saved_sparsity(sparsity), bits, row_scale
        )
        ctx.spec, ctx.sparsity = spec, sparsity
        return y2.reshape(*x.shape[:-1], y2.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, weight, A, B, coeffs, alpha, beta, gamma, t, s_saved, bits, row_scale = ctx.saved_tensors
        n = A.shape[1]
        x2 = x.reshape(-1, n)
        params = KernelParams(coeffs, alpha, beta, gamma)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        needs_factor = tuple(ctx.needs_input_grad[3:9])
        dy2 = dy.reshape(-1, dy.shape[-1])
        sparsity = ctx.sparsity if s_saved is None else s_saved
        # the branch's input only enters G_S = dyᵀ (x ⊙ D): rebuilt when a factor gradient is asked for
        xd = _library.snell_dropout_apply(x2, bits, row_scale) if any(needs_factor) else x2
        grads = _library.snell_layer_backward(
            dy2, xd, None, A, B, params, ctx.spec, sparsity, t, (need_x, False, need_b) + needs_factor
        )
        del xd
        dx_branch, dbias, factor_grads = grads[0], grads[2], grads[3:]
        del grads  # dx_branch is freed once masked: not alive during the frozen GEMM below
        dx = dweight = None
        if need_x:
            dx2 = _library.snell_dropout_apply(dx_branch, bits, row_scale)
            del dx_branch
            if weight is not None:
                dx2.addmm_(dy2, weight.to(dy2.dtype))
            dx = dx2.reshape(x.shape).to(x.dtype)
        if need_w:
            dweight = (dy2.t() @ x2.to(dy2.dtype)).to(weight.dtype)
        return (dx, dweight, dbias) + _param_grads(ctx, factor_grads, 3) + (None,) * 4
