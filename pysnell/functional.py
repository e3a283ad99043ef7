"""Functional API: validated entry points to the autograd Functions."""

from __future__ import annotations

import contextlib

import torch

from . import _library
from ._checks import (
    check_choice,
    check_drop_rate,
    check_float_tensor,
    check_positive_int,
    check_same_device,
    check_sparsity_arg,
)
from .ops.monarch.function import monarch_matmul, monarch_project  # noqa: F401 (re-export)
from .ops.snell import reference as ref
from .ops.snell.function import (
    KernelMergeFunction,
    SNELLBranchFunction,
    SNELLLinearFunction,
    SparsifyFunction,
    sparsity_snapshot,
)
from .ops.snell.reference import SnellSpec
from .ops.topk.function import topk_mask, topk_mask_  # noqa: F401 (re-export)


def check_snell_factors(A, B, *, kernel, pieces, out_groups=1, in_features=None, out_features=None):
    check_float_tensor("A", A, ndim=2)
    check_float_tensor("B", B, ndim=2)
    check_choice("kernel", kernel, ref.KERNELS)
    r = A.shape[0]
    if B.shape[1] != r:
        raise ValueError(f"B must be (out, r={r}) to match A (r, in) = {tuple(A.shape)}, got {tuple(B.shape)}")
    check_positive_int("pieces", pieces)
    if r % pieces:
        raise ValueError(f"r={r} must be divisible by pieces={pieces}")
    check_positive_int("out_groups", out_groups)
    if B.shape[0] % out_groups:
        raise ValueError(f"out_features={B.shape[0]} must be divisible by out_groups={out_groups}")
    if in_features is not None and A.shape[1] != in_features:
        raise ValueError(f"A must be (r, in={in_features}), got {tuple(A.shape)}")
    if out_features is not None and B.shape[0] != out_features:
        raise ValueError(f"B must be (out={out_features}, r), got {tuple(B.shape)}")
    check_same_device(A=A, B=B)


_default_constants: dict = {}


def _default_constant(key: tuple, make) -> torch.Tensor:
    """A constant kernel tensor (default scalar or piece coefficients), made once per value, device and
    dtype: building it in every forward costs fill launches per layer on a GPU. Under torch.compile it
    is made in the graph. Never handed out for writing: the Functions only read their parameters."""
    if torch.compiler.is_compiling():
        return make()
    t = _default_constants.get(key)
    if t is None:
        if len(_default_constants) >= 1024:  # e.g. a sweep over float sparsities: stay bounded
            _default_constants.clear()
        t = _default_constants[key] = make()
    return t


def default_scalar(value: float, device, dtype) -> torch.Tensor:
    """A cached 0-dim constant (kernel scalars, a float sparsity for the kernels)."""
    # torch.full, not torch.tensor: copying a host value to a GPU synchronises the stream
    return _default_constant(
        ("scalar", value, device, dtype), lambda: torch.full((), value, device=device, dtype=dtype)
    )


def kernel_params(A, kernel, pieces, scale, coeffs=None, alpha=None, beta=None, gamma=None):
    """Fill in the kernel's tensor parameters (defaults: spec init values, no gradient)."""
    dev, dt = A.device, A.dtype
    if coeffs is None:
        coeffs = _default_constant(
            ("coeffs", pieces, float(scale), dev, dt), lambda: ref.default_coeffs(pieces, scale, device=dev, dtype=dt)
        )
    elif coeffs.shape != (pieces,):
        raise ValueError(f"coeffs must have shape (pieces={pieces},), got {tuple(coeffs.shape)}")
    defaults = _default_constant(("scalars", kernel, dev, dt), lambda: _default_scalars(kernel, dev, dt))
    if alpha is None and beta is None and gamma is None:  # kernels without learnable scalars: the defaults
        check_same_device(A=A, coeffs=coeffs)
        return (coeffs if coeffs.dtype == dt else coeffs.to(dt),) + defaults
    out = []
    for name, value, default in zip(("alpha", "beta", "gamma"), (alpha, beta, gamma), defaults):
        if value is None:
            value = default
        elif not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(f"{name} must be a 1-element tensor, got {value!r}")
        out.append(value if value.dim() == 0 else value.reshape(()))
    check_same_device(A=A, coeffs=coeffs, alpha=out[0], beta=out[1], gamma=out[2])
    return (coeffs if coeffs.dtype == dt else coeffs.to(dt),) + tuple(v if v.dtype == dt else v.to(dt) for v in out)


_NO_SCALARS = {"alpha": 1.0, "beta": 1.0, "gamma": 0.0}  # what kernels without α, β, γ are given


def _default_scalars(kernel, device, dtype) -> tuple:
    init = ref.SCALAR_INIT.get(kernel, _NO_SCALARS)
    return tuple(default_scalar(init[name], device, dtype) for name in ("alpha", "beta", "gamma"))


def kernel_merge(
    A, B, kernel="piecewise", pieces=2, scale=0.1, *, coeffs=None, alpha=None, beta=None, gamma=None, out_groups=1
):
    """ΔW = κ(B, A) (spec §2): A (r, in), B (out, r) -> (out, in).

    Kernels: "piecewise" (Σ_p c_p‖b_i^p − a_j^p‖, c_p = scale·(−1)^p), "linear" (B A), "rbf",
    "sigmoid", "snella". Tensor parameters (coeffs, alpha, beta, gamma) receive gradients.
    """
    check_snell_factors(A, B, kernel=kernel, pieces=pieces, out_groups=out_groups)
    A, B = _common_dtype(A, B)
    params = kernel_params(A, kernel, pieces, scale, coeffs, alpha, beta, gamma)
    return KernelMergeFunction.apply(A, B, *params, SnellSpec(kernel, pieces, "reference", out_groups))


def sparsify(delta, sparsity, mode="reference", *, out_groups=1):
    """Competition-based sparsification of ΔW (spec §3), per group of output rows.

    t = quantile(|ΔW|, sparsity) (torch.quantile's linear rule, any size, no host sync);
    mode "reference": ΔW·|ΔW|·[|ΔW|>t]; "paper": ΔW·max(|ΔW|−t, 0); "mask": ΔW·[|ΔW|>t].
    sparsity 0 returns ΔW unchanged.
    """
    check_float_tensor("delta", delta, ndim=2)
    check_choice("mode", mode, ref.MODES)
    check_positive_int("out_groups", out_groups)
    if delta.shape[0] % out_groups:
        raise ValueError(f"delta rows ({delta.shape[0]}) must be divisible by out_groups={out_groups}")
    check_sparsity_arg(sparsity)
    return SparsifyFunction.apply(delta, sparsity_snapshot(sparsity), mode, out_groups)


def autocast_off(device_type: str):
    """A context that switches autocast off around a Function whose dtypes are already chosen; a
    no-op when autocast is off (entering torch.autocast costs µs per layer call)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _common_dtype(A, B):
    if A.dtype == B.dtype:
        return A, B
    dt = torch.promote_types(A.dtype, B.dtype)
    return A.to(dt), B.to(dt)


def branch_regularisation(x: torch.Tensor, in_features: int, dropout: float, drop_path: float):
    """Draw the branch form's D = keep bits × row scale (reference.dropout_apply) for x (..., n):
    Dropout(dropout) on each element of the branch input, DropPath(drop_path) on each sample (index
    along x's first dim; an unbatched 1-D x is one sample), both rescaled by their keep
    probabilities. Drawn here with torch's generator, so every backend sees the same draws.
    Returns (bits (T, ⌈n/8⌉) uint8 or None when dropout is 0, row_scale (T,) float32)."""
    T = x.numel() // in_features if in_features else 0
    dev = x.device
    bits = None
    if dropout > 0.0:
        keep = torch.empty((T, in_features), dtype=torch.bool, device=dev).bernoulli_(1.0 - dropout)
        bits = _library.snell_dropout_pack(keep)
    scale = 1.0 / ((1.0 - dropout) * (1.0 - drop_path))
    if drop_path > 0.0:
        samples = x.shape[0] if x.dim() >= 2 else 1
        kept = torch.empty(samples, dtype=torch.float32, device=dev).bernoulli_(1.0 - drop_path)
        per_sample = T // samples if samples else 0
        row_scale = (kept * scale).unsqueeze(1).expand(samples, per_sample).reshape(T)
    else:
        row_scale = torch.full((T,), scale, dtype=torch.float32, device=dev)
    return bits, row_scale


def snell_linear(
    x,
    weight,
    bias,
    A,
    B,
    *,
    sparsity,
    kernel="piecewise",
    pieces=2,
    scale=0.1,
    mode="reference",
    coeffs=None,
    alpha=None,
    beta=None,
    gamma=None,
    out_groups=1,
    dropout=0.0,
    drop_path=0.0,
    training=False,
):
    """The SNELL layer: y = x W0ᵀ + b0 + DropPath(Dropout(x)·Sᵀ).

    With no dropout/drop-path (or in eval) this is one fused y = x (W0 + S)ᵀ + b0.
    Under autocast the GEMMs run in the autocast dtype; the merge and selection run in the
    factors' dtype (fp32).
    """
    check_float_tensor("x", x)
    if weight is not None:
        check_float_tensor("weight", weight, ndim=2)
    # x is judged against the base layer (or A when there is none): a wrong x must not blame A.
    in_features = weight.shape[1] if weight is not None else getattr(A, "shape", (None, None))[-1]
    if x.dim() == 0 or (in_features is not None and x.shape[-1] != in_features):
        raise ValueError(f"x must have in_features={in_features} in its last dim, got shape {tuple(x.shape)}")
    check_snell_factors(
        A,
        B,
        kernel=kernel,
        pieces=pieces,
        out_groups=out_groups,
        in_features=x.shape[-1],
        out_features=None if weight is None else weight.shape[0],
    )
    if bias is not None:
        check_float_tensor("bias", bias)
        if tuple(bias.shape) != (B.shape[0],):
            raise ValueError(f"bias must have shape (out={B.shape[0]},), got {tuple(bias.shape)}")
    check_choice("mode", mode, ref.MODES)
    check_sparsity_arg(sparsity)
    dropout, drop_path = check_drop_rate("dropout", dropout), check_drop_rate("drop_path", drop_path)
    check_same_device(x=x, A=A, B=B, weight=weight, bias=bias)  # None: not a tensor, skipped
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        x = x.to(torch.get_autocast_dtype(dev))
    A, B = _common_dtype(A, B)
    params = kernel_params(A, kernel, pieces, scale, coeffs, alpha, beta, gamma)
    spec = SnellSpec(kernel, pieces, mode, out_groups)
    sparsity = sparsity_snapshot(sparsity)
    with autocast_off(dev):
        if training and (dropout > 0.0 or drop_path > 0.0):
            # The reference's branch form, x W0ᵀ + b + DropPath(Dropout(x)·Sᵀ), with its draws as one scale D.
            bits, row_scale = branch_regularisation(x, A.shape[1], dropout, drop_path)
            return SNELLBranchFunction.apply(x, weight, bias, A, B, *params, sparsity, spec, bits, row_scale)
        return SNELLLinearFunction.apply(x, weight, bias, A, B, *params, sparsity, spec)
