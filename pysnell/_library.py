"""The backend ops as torch.library custom ops, so torch.compile sees each one as one opaque node.

Every backend op named in pysnell/ops/*/function.py ("snell.layer_forward", "monarch.forward", ...) has
a custom op `torch.ops.pysnell.<family>_<name>` here. Its real implementation calls
`_backend.pick(op, device)` at run time, so dynamo never traces the backend policy, and its fake
implementation gives the output shapes and dtypes, so the compiler never runs a kernel while tracing.
In eager mode the wrappers call the same implementation without the dispatcher round trip.
The autograd Functions call the Python wrappers below, which keep the backend signatures of the
docstrings (SnellSpec, KernelParams, a float or tensor sparsity, None for gradients not asked for) and
flatten them into schema types: str/int/bool, `Tensor?`, and an empty tensor where the backend
returned None.

Contract enforced on every backend result (so that eager, compiled and fake agree): each output has
the shape and dtype the fake implementation declares, is contiguous, never aliases an input, and a gradient that was
asked for is a tensor (zeros when the backend returned None because the parameter has no effect).
"""

import torch
from torch import Tensor

from . import _backend
from .ops.snell.reference import KernelParams, SnellSpec
from .ops.snell.reference import packed_width as ref_packed_width

NAMESPACE = "pysnell"


def _op_name(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def _split_sparsity(sparsity):
    """(tensor or None, float): a layer's buffer stays a tensor (no host sync), a number stays a float."""
    if isinstance(sparsity, torch.Tensor):
        return sparsity, 0.0
    return None, float(sparsity)


def _join_sparsity(sparsity_t: Tensor | None, sparsity_f: float):
    return sparsity_t if sparsity_t is not None else sparsity_f


def _aliases(out: Tensor, inputs: tuple) -> bool:
    """Whether `out` is one of `inputs` (None entries are skipped) or a view into one's storage."""
    for t in inputs:
        if out is t:
            return True
    if not out._is_view() or not out.numel():
        return False
    ptr = out.untyped_storage().data_ptr()
    return any(t is not None and t.numel() and t.untyped_storage().data_ptr() == ptr for t in inputs)


def _conform(out, shape, dtype, device, inputs, wanted=True):
    """Make a backend result match the declared output (shape, dtype, contiguous, fresh storage)."""
    if not wanted:
        return torch.empty(0, dtype=dtype, device=device)
    if out is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    if out.shape != shape:  # torch.Size against a tuple: no tuples built on the usual (equal) path
        out = out.reshape(shape)
    if out.dtype != dtype:
        out = out.to(dtype)
    elif _aliases(out, inputs):
        out = out.clone()
    out = out.contiguous()
    # inductor requires custom-op outputs to start at an aligned address: a view into a backend's
    # buffer (e.g. one scalar gradient sliced from a partial-sum vector) gets its own storage
    return out.clone() if out.storage_offset() else out


def _conform_all(items, inputs, device, placeholders=True):
    """_conform over several returns, which must not alias each other either (e.g. three scalar
    gradients sliced from one partial-sum buffer). An unwanted return is an empty placeholder for the
    custom op (its schema returns tensors), None when `placeholders` is False (the eager path drops it)."""
    outs = [
        _conform(out, shape, dtype, device, inputs, wanted) if wanted or placeholders else None
        for out, shape, dtype, wanted in items
    ]
    present = [out for out in outs if out is not None]
    # Distinct tensors that are not views own distinct storages: only views and repeats need the pointers.
    if all(not out._is_view() for out in present) and len({id(out) for out in present}) == len(present):
        return outs
    conformed, outs, ptrs = outs, [], set()
    for out in conformed:
        if out is None:
            outs.append(out)
            continue
        ptr = out.untyped_storage().data_ptr() if out.numel() else None
        if ptr is not None and ptr in ptrs:
            out = out.clone()
            ptr = out.untyped_storage().data_ptr()
        ptrs.add(ptr)
        outs.append(out)
    return outs


def _absent_to_none(t: Tensor, wanted: bool):
    return t if wanted else None


def _run(op, impl, *args, **eager_kwargs):
    """Under torch.compile / export: the opaque custom op. Eager: its implementation directly, since the
    dispatcher round trip of a Python custom op costs tens of µs per call and the result is the same.
    `eager_kwargs` go to the eager call only (e.g. placeholders=False: no empty tensors for the
    gradients nobody asked for, which the wrappers turn into None anyway)."""
    if torch.compiler.is_compiling():
        return op(*args)
    return impl(*args, **eager_kwargs)


def _flat_params(params: KernelParams):
    return params.coeffs, params.alpha, params.beta, params.gamma


# ---------------------------------------------------------------------------------------------------------
# SNELL


def _snell_merge_impl(
    A: Tensor,
    B: Tensor,
    coeffs: Tensor,
    alpha: Tensor,
    beta: Tensor,
    gamma: Tensor,
    kernel: str,
    pieces: int,
    mode: str,
    out_groups: int,
) -> Tensor:
    _, impl = _backend.pick("snell.merge", A.device)
    spec = SnellSpec(kernel, pieces, mode, out_groups)
    delta = impl(A, B, KernelParams(coeffs, alpha, beta, gamma), spec)
    inputs = (A, B, coeffs, alpha, beta, gamma)
    return _conform(delta, (B.shape[0], A.shape[1]), A.dtype, A.device, inputs)


_snell_merge = torch.library.custom_op(_op_name("snell_merge"), _snell_merge_impl, mutates_args=())


@_snell_merge.register_fake
def _(A, B, coeffs, alpha, beta, gamma, kernel, pieces, mode, out_groups):
    return A.new_empty((B.shape[0], A.shape[1]))


def _snell_merge_backward_impl(
    G: Tensor,
    A: Tensor,
    B: Tensor,
    coeffs: Tensor,
    alpha: Tensor,
    beta: Tensor,
    gamma: Tensor,
    kernel: str,
    pieces: int,
    mode: str,
    out_groups: int,
    need: list[bool],
) -> list[Tensor]:
    _, impl = _backend.pick("snell.merge_backward", A.device)
    spec = SnellSpec(kernel, pieces, mode, out_groups)
    grads = impl(G, A, B, KernelParams(coeffs, alpha, beta, gamma), spec, tuple(need))
    inputs = (G, A, B, coeffs, alpha, beta, gamma)
    items = [
        (g, t.shape, t.dtype, w) for g, (t, w) in zip(grads, _merge_grads_like(A, B, coeffs, alpha, beta, gamma, need))
    ]
    return _conform_all(items, inputs, A.device)


def _merge_grads_like(A, B, coeffs, alpha, beta, gamma, need):
    """(input, wanted) per gradient of snell_merge_backward: each gradient is shaped like its input;
    dA and dB are always returned, the kernel parameters' when `need` says so."""
    return list(zip((A, B, coeffs, alpha, beta, gamma), (True, True, *need)))


_snell_merge_backward = torch.library.custom_op(
    _op_name("snell_merge_backward"), _snell_merge_backward_impl, mutates_args=()
)


@_snell_merge_backward.register_fake
def _(G, A, B, coeffs, alpha, beta, gamma, kernel, pieces, mode, out_groups, need):
    return [t.new_empty(t.shape if w else (0,)) for t, w in _merge_grads_like(A, B, coeffs, alpha, beta, gamma, need)]


def _snell_layer_forward_impl(
    x2: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    coeffs: Tensor,
    alpha: Tensor,
    beta: Tensor,
    gamma: Tensor,
    sparsity_t: Tensor | None,
    sparsity_f: float,
    kernel: str,
    pieces: int,
    mode: str,
    out_groups: int,
) -> tuple[Tensor, Tensor]:
    _, impl = _backend.pick("snell.layer_forward", x2.device, size=B.shape[0] * A.shape[1])
    spec = SnellSpec(kernel, pieces, mode, out_groups)
    params = KernelParams(coeffs, alpha, beta, gamma)
    y2, t = impl(x2, weight, bias, A, B, params, spec, _join_sparsity(sparsity_t, sparsity_f))
    inputs = (x2, weight, bias, A, B, coeffs, alpha, beta, gamma, sparsity_t)
    y2 = _conform(y2, (x2.shape[0], B.shape[0]), x2.dtype, x2.device, inputs)
    t = _conform(t, (out_groups,), torch.float32, x2.device, inputs)
    return y2, t


_snell_layer_forward = torch.library.custom_op(
    _op_name("snell_layer_forward"), _snell_layer_forward_impl, mutates_args=()
)


@_snell_layer_forward.register_fake
def _(x2, weight, bias, A, B, coeffs, alpha, beta, gamma, sparsity_t, sparsity_f, kernel, pieces, mode, out_groups):
    return x2.new_empty((x2.shape[0], B.shape[0])), x2.new_empty((out_groups,), dtype=torch.float32)


def _layer_grad_specs(dy2, x2, weight, A, B, coeffs, alpha, beta, gamma):
    """(shape, dtype) of (dx2, dweight, dbias, dA, dB, dcoeffs, dalpha, dbeta, dgamma)."""
    m = B.shape[0]
    w_spec = (tuple(weight.shape), weight.dtype) if weight is not None else ((m, A.shape[1]), A.dtype)
    return (
        (tuple(x2.shape), dy2.dtype),
        w_spec,
        ((m,), dy2.dtype),
        *((tuple(t.shape), t.dtype) for t in (A, B, coeffs, alpha, beta, gamma)),
    )


def _snell_layer_backward_impl(
    dy2: Tensor,
    x2: Tensor,
    weight: Tensor | None,
    A: Tensor,
    B: Tensor,
    coeffs: Tensor,
    alpha: Tensor,
    beta: Tensor,
    gamma: Tensor,
    sparsity_t: Tensor | None,
    sparsity_f: float,
    thresholds: Tensor,
    kernel: str,
    pieces: int,
    mode: str,
    out_groups: int,
    needs: list[bool],
    *,
    placeholders: bool = True,
) -> list[Tensor]:
    _, impl = _backend.pick("snell.layer_backward", x2.device, size=B.shape[0] * A.shape[1])
    spec = SnellSpec(kernel, pieces, mode, out_groups)
    params = KernelParams(coeffs, alpha, beta, gamma)
    sparsity = _join_sparsity(sparsity_t, sparsity_f)
    grads = impl(dy2, x2, weight, A, B, params, spec, sparsity, thresholds, tuple(needs))
    inputs = (dy2, x2, weight, A, B, coeffs, alpha, beta, gamma, sparsity_t, thresholds)
    specs = _layer_grad_specs(dy2, x2, weight, A, B, coeffs, alpha, beta, gamma)
    items = [(g, s, d, w) for g, (s, d), w in zip(grads, specs, needs)]
    return _conform_all(items, inputs, dy2.device, placeholders)


_snell_layer_backward = torch.library.custom_op(
    _op_name("snell_layer_backward"), _snell_layer_backward_impl, mutates_args=()
)


@_snell_layer_backward.register_fake
def _(dy2, x2, weight, A, B, coeffs, alpha, beta, gamma, sparsity_t, sparsity_f, thresholds, kernel, pieces, mode,
      out_groups, needs, *, placeholders=True):  # fmt: skip
    specs = _layer_grad_specs(dy2, x2, weight, A, B, coeffs, alpha, beta, gamma)
    return [dy2.new_empty(s if w else (0,), dtype=d) for (s, d), w in zip(specs, needs)]


def snell_merge(A, B, params: KernelParams, spec: SnellSpec):
    """ "snell.merge"(A, B, params, spec) -> ΔW, through the custom op."""
    return _run(_snell_merge, _snell_merge_impl, A, B, *_flat_params(params), *spec)


def snell_merge_backward(G, A, B, params: KernelParams, spec: SnellSpec, need):
    """ "snell.merge_backward" -> (dA, dB, dcoeffs, dalpha, dbeta, dgamma), None where not needed."""
    need = [bool(n) for n in need]
    grads = _run(_snell_merge_backward, _snell_merge_backward_impl, G, A, B, *_flat_params(params), *spec, need)
    return tuple(_absent_to_none(g, w) for g, w in zip(grads, [True, True] + need))


def snell_layer_forward(x2, weight, bias, A, B, params: KernelParams, spec: SnellSpec, sparsity):
    """ "snell.layer_forward" -> (y2, thresholds)."""
    s_t, s_f = _split_sparsity(sparsity)
    return _run(
        _snell_layer_forward, _snell_layer_forward_impl, x2, weight, bias, A, B, *_flat_params(params), s_t, s_f, *spec
    )


def snell_layer_backward(dy2, x2, weight, A, B, params: KernelParams, spec: SnellSpec, sparsity, thresholds, needs):
    """ "snell.layer_backward" -> (dx2, dweight, dbias, dA, dB, dcoeffs, dalpha, dbeta, dgamma), None if unneeded."""
    s_t, s_f = _split_sparsity(sparsity)
    needs = [bool(n) for n in needs]
    if weight is None:
        needs[1] = False  # no frozen weight in the branch-only form
    grads = _run(
        _snell_layer_backward,
        _snell_layer_backward_impl,
        dy2,
        x2,
        weight,
        A,
        B,
        *_flat_params(params),
        s_t,
        s_f,
        thresholds,
        *spec,
        needs,
        placeholders=False,
    )
    return tuple(_absent_to_none(g, w) for g, w in zip(grads, needs))


def _snell_dropout_pack_impl(keep: Tensor) -> Tensor:
    _, impl = _backend.pick("snell.dropout_pack", keep.device)
    bits = impl(keep)
    shape = (keep.shape[0], ref_packed_width(keep.shape[1]))
    return _conform(bits, shape, torch.uint8, keep.device, (keep,))


_snell_dropout_pack = torch.library.custom_op(_op_name("snell_dropout_pack"), _snell_dropout_pack_impl, mutates_args=())


@_snell_dropout_pack.register_fake
def _(keep):
    return keep.new_empty((keep.shape[0], ref_packed_width(keep.shape[1])), dtype=torch.uint8)


def _snell_dropout_apply_impl(v2: Tensor, bits: Tensor | None, row_scale: Tensor) -> Tensor:
    _, impl = _backend.pick("snell.dropout_apply", v2.device)
    out = impl(v2, bits, row_scale)
    return _conform(out, tuple(v2.shape), v2.dtype, v2.device, (v2, bits, row_scale))


_snell_dropout_apply = torch.library.custom_op(
    _op_name("snell_dropout_apply"), _snell_dropout_apply_impl, mutates_args=()
)


@_snell_dropout_apply.register_fake
def _(v2, bits, row_scale):
    return torch.empty_like(v2, memory_format=torch.contiguous_format)


def snell_dropout_pack(keep):
    """ "snell.dropout_pack"(keep (T, n) bool) -> (T, ⌈n/8⌉) uint8."""
    return _run(_snell_dropout_pack, _snell_dropout_pack_impl, keep)


def snell_dropout_apply(v2, bits, row_scale):
    """ "snell.dropout_apply"(v2, bits or None, row_scale) -> v2 ⊙ D (a new tensor in v2's dtype)."""
    return _run(_snell_dropout_apply, _snell_dropout_apply_impl, v2, bits, row_scale)


# ---------------------------------------------------------------------------------------------------------
# Monarch


def _monarch_forward_impl(x2: Tensor, w1: Tensor, w2: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    _, impl = _backend.pick("monarch.forward", x2.device, size=x2.shape[0])
    y2 = impl(x2, w1, w2, bias, out_features)
    return _conform(y2, (x2.shape[0], out_features), x2.dtype, x2.device, (x2, w1, w2, bias))


_monarch_forward = torch.library.custom_op(_op_name("monarch_forward"), _monarch_forward_impl, mutates_args=())


@_monarch_forward.register_fake
def _(x2, w1, w2, bias, out_features):
    return x2.new_empty((x2.shape[0], out_features))


def _monarch_backward_impl(dy2: Tensor, x2: Tensor, w1: Tensor, w2: Tensor, needs: list[bool]) -> list[Tensor]:
    _, impl = _backend.pick("monarch.backward", x2.device, size=x2.shape[0])
    grads = impl(dy2, x2, w1, w2, tuple(needs))
    inputs = (dy2, x2, w1, w2)
    return _conform_all([(g, t.shape, t.dtype, w) for g, t, w in zip(grads, (x2, w1, w2), needs)], inputs, x2.device)


_monarch_backward = torch.library.custom_op(_op_name("monarch_backward"), _monarch_backward_impl, mutates_args=())


@_monarch_backward.register_fake
def _(dy2, x2, w1, w2, needs):
    return [t.new_empty(t.shape if w else (0,)) for t, w in zip((x2, w1, w2), needs)]


def monarch_forward(x2, w1, w2, bias, out_features: int):
    """ "monarch.forward"(x2, w1, w2, bias, out_features) -> y2, through the custom op."""
    return _run(_monarch_forward, _monarch_forward_impl, x2, w1, w2, bias, int(out_features))


def monarch_backward(dy2, x2, w1, w2, needs):
    """ "monarch.backward" -> (dx2, dw1, dw2), None where not needed."""
    needs = [bool(n) for n in needs]
    grads = _run(_monarch_backward, _monarch_backward_impl, dy2, x2, w1, w2, needs)
    return tuple(_absent_to_none(g, w) for g, w in zip(grads, needs))


# ---------------------------------------------------------------------------------------------------------
# top-k


def _topk_threshold_impl(x2d: Tensor, sparsity_t: Tensor | None, sparsity_f: float) -> Tensor:
    _, impl = _backend.pick("topk.threshold", x2d.device)
    t = impl(x2d, _join_sparsity(sparsity_t, sparsity_f))
    return _conform(t, (x2d.shape[0],), torch.float32, x2d.device, (x2d, sparsity_t))


_topk_threshold = torch.library.custom_op(_op_name("topk_threshold"), _topk_threshold_impl, mutates_args=())


@_topk_threshold.register_fake
def _(x2d, sparsity_t, sparsity_f):
    return x2d.new_empty((x2d.shape[0],), dtype=torch.float32)


def _packed_numel(x: Tensor) -> int:
    return -(-x.numel() // 8)


def _topk_mask__impl(
    x: Tensor, sparsity_t: Tensor | None, sparsity_f: float, k: int | None, want_packed: bool
) -> tuple[Tensor, Tensor]:
    _, impl = _backend.pick("topk.mask_", x.device)
    sparsity = None if k is not None else _join_sparsity(sparsity_t, sparsity_f)
    out, t, packed = impl(x, sparsity, k, want_packed)
    if out is not x:  # a backend that could not work in place: the op still mutates x
        x.copy_(out)
    inputs = (x, sparsity_t)
    t = _conform(t, (), torch.float32, x.device, inputs)
    packed = _conform(packed, (_packed_numel(x),), torch.uint8, x.device, inputs, want_packed)
    return t, packed


_topk_mask_ = torch.library.custom_op(_op_name("topk_mask_"), _topk_mask__impl, mutates_args=("x",))


@_topk_mask_.register_fake
def _(x, sparsity_t, sparsity_f, k, want_packed):
    packed_shape = (_packed_numel(x),) if want_packed else (0,)
    return x.new_empty((), dtype=torch.float32), x.new_empty(packed_shape, dtype=torch.uint8)


def topk_threshold(x2d, sparsity):
    """ "topk.threshold"(x2d, sparsity) -> (G,) float32, through the custom op."""
    s_t, s_f = _split_sparsity(sparsity)
    return _run(_topk_threshold, _topk_threshold_impl, x2d, s_t, s_f)


def topk_mask_(x, sparsity, k, want_packed: bool):
    """ "topk.mask_"(x, sparsity, k, want_packed) -> (x, threshold, packed or None); x is masked in place."""
    s_t, s_f = (None, 0.0) if sparsity is None else _split_sparsity(sparsity)
    t, packed = _run(_topk_mask_, _topk_mask__impl, x, s_t, s_f, None if k is None else int(k), bool(want_packed))
    return x, t, (packed if want_packed else None)
