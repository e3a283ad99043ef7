"""The "cuda" backend: pysnell's op signatures on top of the torch.library ops of csrc/binding.cpp.

`register()` runs once the library is loaded (pysnell/_jit.py). Each function below has exactly the
signature of its op in pysnell/ops/<family>/function.py. The kernels cover float32, float16 and bfloat16
and SNELL ranks up to 256; other inputs (float64 for gradcheck, larger ranks) run the torch reference
op, which computes the same math. GEMMs (x·W_effᵀ, dY·W_eff, dYᵀ·X) are cuBLAS calls through ATen,
inside the layer ops of csrc/binding.cpp: a SNELL layer step makes one host call each way.

AUTO_PREFERENCE is the one place that records which backend "auto" runs first on CUDA tensors when
measurements showed that the default order (cuda -> triton -> torch) is not the fastest. Fill it from
`python -m benchmarks.cuda_backend` on the target GPU (it prints the table) and say so in the README.
"""

from __future__ import annotations

import torch

from . import _backend
from .ops.snell import reference as snell_ref

# op name -> backend order for "auto" on CUDA tensors, from measurements; ops not listed use the default
# cuda -> triton -> torch. Measured on an H200, 2026-11-27 (benchmarks/results/nvidia-h200, git cd1c5a9 and
# ff69cce; bf16 fwd+bwd, × full fine-tuning or × dense):
# - SNELL layer: CUDA wins up to 4096×4096 weights (768→3072: 3.9× vs Triton 5.2×; 4096²: 2.4× vs 3.0×),
#   Triton from the 4096×11008 ones (1.7× vs 2.0×, and 1.72× vs 2.02× replayed from a CUDA graph, so the
#   kernels, not the host). No shape between 2^24 and 45M entries was measured: the switch sits at 2^24.
#   Session 7 (git 3ba0a88) confirms both tiers eagerly (768→3072: 3.14× vs 4.69×; 4096→11008: 2.03× vs
#   1.59×); replayed from graphs, Triton is now faster at every size.
#   At r = 32 the 4096×11008 layer measured CUDA 2.7× vs Triton 3.1×; the tiers follow the r = 8 rows.
# - Monarch: the CUDA kernels lose 3.6–8.8× to dense at T = 8192 where Triton is 0.45–1.22× (forward /
#   fwd+bwd at 4096), but win at small T: fwd+bwd 4.5× vs Triton 11.2× at T = 1, 2.5× vs 5.7× at T = 16,
#   2.7× vs 4.2× at T = 512. No T between 512 and 8192 was measured: CUDA runs up to 512 tokens.
# - Keep-mask ops of the branch form: the CUDA kernels pass the GPU test (bit for bit against the
#   reference) but were never timed apart; their Triton twins stay first.
SNELL_CUDA_MAX_WEIGHT = 2**24  # weight entries (out × in) up to which the SNELL layer runs CUDA first
MONARCH_CUDA_MAX_TOKENS = 512
_SNELL_LAYER = ((SNELL_CUDA_MAX_WEIGHT, ("cuda", "triton", "torch")), (None, ("triton", "cuda", "torch")))
_MONARCH = ((MONARCH_CUDA_MAX_TOKENS, ("cuda", "triton", "torch")), (None, ("triton", "torch")))
AUTO_PREFERENCE: dict[str, tuple] = {
    "snell.layer_forward": _SNELL_LAYER,
    "snell.layer_backward": _SNELL_LAYER,
    "monarch.forward": _MONARCH,
    "monarch.backward": _MONARCH,
    "snell.dropout_pack": ("triton", "cuda", "torch"),
    "snell.dropout_apply": ("triton", "cuda", "torch"),
}

KERNEL_IDS = {"piecewise": 0, "linear": 1, "rbf": 2, "sigmoid": 3, "snella": 4}
MODE_IDS = {"reference": 0, "paper": 1, "mask": 2}
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_RANK = 256  # kSnellMaxRank in csrc/pysnell_cuda.h

OPS = (
    "topk.threshold",
    "topk.mask_",
    "snell.merge",
    "snell.merge_backward",
    "snell.layer_forward",
    "snell.layer_backward",
    "snell.dropout_pack",
    "snell.dropout_apply",
    "monarch.forward",
    "monarch.backward",
)


def apply_auto_preference() -> None:
    for op, order in AUTO_PREFERENCE.items():
        _backend.set_auto_preference(op, order)


def _lib():
    return torch.ops.pysnell_cuda


def _reference(op: str):
    return _backend._registry[op]["torch"]


def _sparsity_args(sparsity):
    """(float value, device tensor or None): a GPU-resident sparsity is read by the kernels, no sync."""
    if isinstance(sparsity, torch.Tensor):
        if sparsity.device.type == "cpu":
            return float(sparsity), None
        return 0.0, sparsity
    return float(sparsity), None


# ---- top-k


def topk_threshold(x2d: torch.Tensor, sparsity) -> torch.Tensor:
    if x2d.dtype not in KERNEL_DTYPES or x2d.shape[0] > 65535:
        return _reference("topk.threshold")(x2d, sparsity)
    value, tensor = _sparsity_args(sparsity)
    return _lib().topk_threshold(x2d, value, tensor)


def topk_mask_(x: torch.Tensor, sparsity, k, want_packed: bool):
    if x.dtype not in KERNEL_DTYPES:
        return _reference("topk.mask_")(x, sparsity, k, want_packed)
    target = x if x.is_contiguous() else x.contiguous()
    value, tensor = (0.0, None) if k is not None else _sparsity_args(sparsity)
    threshold, packed = _lib().topk_mask_(target, value, tensor, -1 if k is None else int(k), bool(want_packed))
    if target is not x:
        x.copy_(target)
    return x, threshold, (packed if want_packed else None)


# ---- SNELL


def _snell_supported(A, B, spec, *others) -> bool:
    return (
        A.dtype in KERNEL_DTYPES
        and B.dtype == A.dtype
        and 1 <= A.shape[0] <= MAX_RANK
        and spec.kernel in KERNEL_IDS
        and spec.mode in MODE_IDS
        and B.shape[0] // spec.out_groups <= 65535 * 64
        and all(t is None or t.dtype in KERNEL_DTYPES for t in others)
    )


def _spec_ids(spec) -> tuple:
    """(kernel id, pieces, mode id, groups): the spec as the C++ SNELL ops take it."""
    return KERNEL_IDS[spec.kernel], spec.pieces, MODE_IDS[spec.mode], spec.out_groups


def _colstats(A, B, params, spec):
    if spec.kernel != "snella":
        return None
    return _lib().snell_colstats(A, B, *params, KERNEL_IDS["snella"], spec.pieces, spec.out_groups)


def _weff(A, B, params, spec, colstats, weight, thresholds, sparsity, out_dtype):
    value, tensor = _sparsity_args(sparsity)
    return _lib().snell_weff(
        A,
        B,
        *params,
        colstats,
        weight,
        thresholds,
        value,
        tensor,
        *_spec_ids(spec),
        out_dtype,
    )


def _param_grads(dscalars, A, spec, need_params):
    """(dcoeffs, dalpha, dbeta, dgamma) as the reference returns them: None where it has none."""
    need_c, need_a, need_b, need_g = need_params
    P = spec.pieces
    has_coeffs = spec.kernel in ("piecewise", "snella")
    has_scalars = spec.kernel in ("rbf", "sigmoid", "snella")
    d = dscalars.to(A.dtype)
    dcoeffs = d[:P] if (has_coeffs and need_c) else None
    dalpha = d[P].reshape(()) if (has_scalars and need_a) else None
    dbeta = d[P + 1].reshape(()) if (has_scalars and need_b) else None
    dgamma = d[P + 2].reshape(()) if (has_scalars and need_g) else None
    return dcoeffs, dalpha, dbeta, dgamma


def snell_merge(A, B, params, spec):
    if not _snell_supported(A, B, spec):
        return _reference("snell.merge")(A, B, params, spec)
    colstats = _colstats(A, B, params, spec)
    return _weff(A, B, params, spec, colstats, None, None, 0.0, A.dtype)


def snell_merge_backward(G, A, B, params, spec, need_params):
    if not _snell_supported(A, B, spec, G):
        return _reference("snell.merge_backward")(G, A, B, params, spec, need_params)
    colstats = _colstats(A, B, params, spec)
    dA, dB, dscalars = _lib().snell_backward(
        G, A, B, *params, colstats, None, 0.0, None, KERNEL_IDS[spec.kernel], spec.pieces, 0, spec.out_groups
    )
    return (dA, dB) + _param_grads(dscalars, A, spec, need_params)


def _sparsity_for_kernels(sparsity):
    """(known zero on the host, float value, device tensor or None)."""
    if snell_ref.known_zero_sparsity(sparsity):
        return True, 0.0, None
    return (False, *_sparsity_args(sparsity))


def snell_layer_forward(x2, weight, bias, A, B, params, spec, sparsity):
    if not _snell_supported(A, B, spec, x2, weight):
        return _reference("snell.layer_forward")(x2, weight, bias, A, B, params, spec, sparsity)
    known_zero, value, tensor = _sparsity_for_kernels(sparsity)
    # select, W_eff and the GEMM in one host call (csrc/binding.cpp), as y = F.linear(x2, W_eff, bias)
    y, thresholds = _lib().snell_layer_forward(
        x2,
        weight,
        bias,
        A,
        B,
        *params,
        _colstats(A, B, params, spec),
        value,
        tensor,
        known_zero,
        *_spec_ids(spec),
    )
    return y, thresholds


def snell_layer_backward(dy2, x2, weight, A, B, params, spec, sparsity, thresholds, needs):
    if not _snell_supported(A, B, spec, dy2, x2, weight):
        return _reference("snell.layer_backward")(dy2, x2, weight, A, B, params, spec, sparsity, thresholds, needs)
    need_x, need_w, need_b, need_A, need_B = (bool(n) for n in needs[:5])
    need_params = tuple(needs[5:])
    need_factor = need_A or need_B or any(need_params)
    known_zero, value, tensor = _sparsity_for_kernels(sparsity)
    # dx = dy2·W_eff, dbias, G_S = dy2ᵀ·x2 (the weight gradient when asked) and the factor gradients from
    # G_S, in one host call (csrc/binding.cpp); results not asked for come back empty
    dx, dweight, dbias, dA, dB, dscalars = _lib().snell_layer_backward(
        dy2,
        x2,
        weight,
        A,
        B,
        *params,
        _colstats(A, B, params, spec),
        None if known_zero else thresholds,
        value,
        tensor,
        *_spec_ids(spec),
        need_x,
        need_w,
        need_b,
        need_factor,
    )
    grads = (dA, dB) + _param_grads(dscalars, A, spec, need_params) if need_factor else (None,) * 6
    return (dx if need_x else None, dweight if need_w else None, dbias if need_b else None) + grads


# ---- Monarch


MONARCH_MAX_EXTENT = 2**23  # csrc/monarch.cu keeps per-element address steps in 32 bits


def _monarch_supported(x2, w1, w2) -> bool:
    k, q, p = w1.shape
    l, s, r = w2.shape
    extents = (k * q, k * p, l * s, q * p, s * r)
    return (
        x2.dtype in KERNEL_DTYPES
        and w1.dtype == x2.dtype
        and w2.dtype == x2.dtype
        and x2.shape[0] <= 65535 * 64
        and max(extents) < MONARCH_MAX_EXTENT
    )


def snell_dropout_pack(keep):
    snell_ref.check_keep_mask(keep)
    return _lib().snell_dropout_pack(keep)


def snell_dropout_apply(v2, bits, row_scale):
    if v2.dtype not in KERNEL_DTYPES:
        return _reference("snell.dropout_apply")(v2, bits, row_scale)
    snell_ref.check_dropout_args(v2, bits, row_scale)
    return _lib().snell_dropout_apply(v2, bits, row_scale)


def monarch_forward(x2, w1, w2, bias, out_features):
    if not _monarch_supported(x2, w1, w2):
        return _reference("monarch.forward")(x2, w1, w2, bias, out_features)
    return _lib().monarch_forward(x2, w1, w2, bias, int(out_features))


def monarch_backward(dy2, x2, w1, w2, needs):
    if not _monarch_supported(x2, w1, w2) or dy2.dtype != x2.dtype:
        return _reference("monarch.backward")(dy2, x2, w1, w2, needs)
    need_x, need_w1, need_w2 = (bool(n) for n in needs)
    dx, dw1, dw2 = _lib().monarch_backward(dy2, x2, w1, w2, need_x, need_w1, need_w2)
    return (dx if need_x else None), (dw1 if need_w1 else None), (dw2 if need_w2 else None)


# ---- registration


def _register_fakes() -> None:
    """Shape-only implementations so torch.compile can trace the ops without running them."""
    lib = "pysnell_cuda::"

    def fake(name):
        return torch.library.register_fake(lib + name)

    @fake("topk_threshold")
    def _(x, sparsity, sparsity_tensor):
        return x.new_empty((x.shape[0],), dtype=torch.float32)

    @fake("topk_mask_")
    def _(x, sparsity, sparsity_tensor, k, want_packed):
        n = x.numel()
        return x.new_empty((), dtype=torch.float32), x.new_empty(
            ((n + 7) // 8 if want_packed else 0,), dtype=torch.uint8
        )

    @fake("snell_colstats")
    def _(A, B, coeffs, alpha, beta, gamma, kernel, pieces, groups):
        return A.new_empty((groups, A.shape[1], 4), dtype=torch.float32)

    @fake("snell_select")
    def _(A, B, coeffs, alpha, beta, gamma, colstats, sparsity, sparsity_tensor, kernel, pieces, groups):
        return A.new_empty((groups,), dtype=torch.float32)

    @fake("snell_weff")
    def _(A, B, c, a, b, g, colstats, weight, thresholds, s, st, kernel, pieces, mode, groups, out_dtype):
        return A.new_empty((B.shape[0], A.shape[1]), dtype=out_dtype)

    @fake("snell_backward")
    def _(grad, A, B, coeffs, a, b, g, colstats, thresholds, s, st, kernel, pieces, mode, groups):
        return torch.empty_like(A), torch.empty_like(B), A.new_empty((pieces + 3,), dtype=torch.float32)

    @fake("snell_layer_forward")
    def _(x2, weight, bias, A, B, c, a, b, g, colstats, s, st, known_zero, kernel, pieces, mode, groups):
        return x2.new_empty((x2.shape[0], B.shape[0])), A.new_empty((groups,), dtype=torch.float32)

    @fake("snell_layer_backward")
    def _(dy2, x2, weight, A, B, c, a, b, g, colstats, t, s, st, kernel, pieces, mode, groups, nx, nw, nb, nf):
        def maybe(want, like, shape=None, dtype=None):
            if not want:
                return dy2.new_empty((0,))
            return like.new_empty(like.shape if shape is None else shape, dtype=dtype or like.dtype)

        return (
            maybe(nx, x2, dtype=dy2.dtype),
            maybe(nw, weight) if weight is not None else dy2.new_empty((0,)),
            maybe(nb, dy2, shape=(dy2.shape[1],)),
            maybe(nf, A),
            maybe(nf, B),
            maybe(nf, A, shape=(pieces + 3,), dtype=torch.float32),
        )

    @fake("snell_dropout_pack")
    def _(keep):
        return keep.new_empty((keep.shape[0], snell_ref.packed_width(keep.shape[1])), dtype=torch.uint8)

    @fake("snell_dropout_apply")
    def _(v, bits, row_scale):
        return torch.empty_like(v, memory_format=torch.contiguous_format)

    @fake("monarch_forward")
    def _(x, w1, w2, bias, out_features):
        return x.new_empty((x.shape[0], out_features))

    @fake("monarch_backward")
    def _(dy, x, w1, w2, need_x, need_w1, need_w2):
        return (
            torch.empty_like(x) if need_x else x.new_empty((0,)),
            torch.empty_like(w1) if need_w1 else x.new_empty((0,)),
            torch.empty_like(w2) if need_w2 else x.new_empty((0,)),
        )


_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _register_fakes()
    impls = {
        "topk.threshold": topk_threshold,
        "topk.mask_": topk_mask_,
        "snell.merge": snell_merge,
        "snell.merge_backward": snell_merge_backward,
        "snell.layer_forward": snell_layer_forward,
        "snell.layer_backward": snell_layer_backward,
        "snell.dropout_pack": snell_dropout_pack,
        "snell.dropout_apply": snell_dropout_apply,
        "monarch.forward": monarch_forward,
        "monarch.backward": monarch_backward,
    }
    for op, fn in impls.items():
        _backend.register(op, "cuda", fn)
    _registered = True
