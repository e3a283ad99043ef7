"""SNELL kernelized merge and sparsification in pure PyTorch: the source of truth.

Layout (spec/SNELL.md): A is (r, n), B is (m, r); ΔW[i, j] = κ(b_i, a_j) is (m, n).
With out_groups = G the m rows form G equal groups that behave exactly like G separate
layers sharing A: each has its own threshold and (for "snella") its own softmax.
Every backward here is the closed form from the spec; autograd never runs through cdist.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..topk.reference import pack_mask, unpack_mask

KERNELS = ("piecewise", "linear", "rbf", "sigmoid", "snella")
MODES = ("reference", "paper", "mask")
# Kernels with learnable scalars (α, β, γ) and their initial values (spec §2).
SCALAR_INIT = {
    "rbf": {"alpha": 1.0, "beta": 1.0, "gamma": 0.0},
    "sigmoid": {"alpha": 1.0, "beta": 1.0, "gamma": 0.0},
    "snella": {"alpha": 1.0, "beta": 0.0, "gamma": 1.0},
}


class SnellSpec(NamedTuple):
    """Static (non-tensor) description of a SNELL merge."""

    kernel: str = "piecewise"
    pieces: int = 2
    mode: str = "reference"
    out_groups: int = 1


class KernelParams(NamedTuple):
    """Tensor parameters of the kernel: piece coefficients c_p and the scalars α, β, γ."""

    coeffs: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    gamma: torch.Tensor


def default_coeffs(pieces: int, scale: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """c_p = scale·(−1)^p (reference: [+0.1, −0.1])."""
    # Built on the device: torch.tensor(list, device=cuda) is a host copy that synchronises the stream.
    signs = torch.ones(pieces, dtype=dtype, device=device)
    signs[1::2] = -1
    return signs * scale


def _pieces(A, B, pieces):
    d = A.shape[0] // pieces
    for p in range(pieces):
        yield p, A[p * d : (p + 1) * d], B[:, p * d : (p + 1) * d]


def piece_distance(Bp: torch.Tensor, Ap: torch.Tensor) -> torch.Tensor:
    """δ[i, j] = ‖b_i − a_j‖₂ for Bp (m, d) and Ap (d, n).

    Direct differences Σ_k (b_ik − a_kj)², accumulated over the d coordinates in order (what the
    kernels do), never cdist's matrix-product shortcut √(‖b‖² + ‖a‖² − 2bᵀa), which loses ~1e-5
    relative in float32 for close points. On the CPU, cdist's direct mode is that computation in one
    fused loop; on a GPU it is very slow, so there it is one elementwise pass per coordinate (d =
    r/pieces is small).
    """
    if Bp.device.type == "cpu":
        return torch.cdist(Bp.unsqueeze(0), Ap.t().unsqueeze(0), compute_mode="donot_use_mm_for_euclid_dist")[0]
    return coordinatewise_distance(Bp, Ap)


def coordinatewise_distance(Bp: torch.Tensor, Ap: torch.Tensor) -> torch.Tensor:
    """‖b_i − a_j‖₂ as √Σ_k (b_ik − a_kj)², one elementwise pass per coordinate k."""
    sq = None
    for k in range(Bp.shape[1]):
        diff = Bp[:, k : k + 1] - Ap[k : k + 1, :]
        sq = diff.square_() if sq is None else sq.addcmul_(diff, diff)
    if sq is None:
        return Bp.new_zeros(Bp.shape[0], Ap.shape[1])
    return sq.sqrt_()


def piecewise(A, B, coeffs, pieces):
    delta = None
    for p, Ap, Bp in _pieces(A, B, pieces):
        term = coeffs[p] * piece_distance(Bp, Ap)
        delta = term if delta is None else delta + term
    return delta


def _grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t.reshape(groups, t.shape[0] // groups, t.shape[1])


def merge(A, B, params: KernelParams, spec: SnellSpec) -> torch.Tensor:
    """ΔW = κ(B, A), shape (m, n), in the factors' dtype."""
    kernel = spec.kernel
    if kernel == "linear":
        return B @ A
    if kernel == "piecewise":
        return piecewise(A, B, params.coeffs, spec.pieces)
    if kernel == "rbf":
        sq = piece_distance(B, A).square()
        return params.alpha * torch.exp(-params.beta * sq) + params.gamma
    if kernel == "sigmoid":
        return params.alpha * torch.sigmoid(params.beta * (B @ A)) + params.gamma
    if kernel == "snella":
        D = piecewise(A, B, params.coeffs, spec.pieces)
        P = torch.softmax(_grouped(D, spec.out_groups) / params.gamma, dim=1).reshape(D.shape)
        return D + params.alpha * P + params.beta
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def _piecewise_backward(G, A, B, coeffs, pieces, need_coeffs):
    dA = torch.empty_like(A)
    dB = torch.empty_like(B)
    dcoeffs = torch.zeros_like(coeffs) if need_coeffs else None
    for p, Ap, Bp in _pieces(A, B, pieces):
        dist = piece_distance(Bp, Ap)
        if need_coeffs:
            dcoeffs[p] = (G * dist).sum()
        # E_p = c_p·G/δ_p, 0 where δ_p = 0 (torch's subgradient of the norm); in place: one m×n buffer.
        E = G * coeffs[p]
        E.div_(dist).masked_fill_(dist == 0, 0)
        d = Ap.shape[0]
        sl = slice(p * d, (p + 1) * d)
        dB[:, sl] = Bp * E.sum(1, keepdim=True) - E @ Ap.t()
        dA[sl] = Ap * E.sum(0, keepdim=True) - Bp.t() @ E
    return dA, dB, dcoeffs


def merge_backward(G, A, B, params: KernelParams, spec: SnellSpec, need_params: tuple[bool, bool, bool, bool]):
    """Gradients of merge w.r.t. (A, B, coeffs, alpha, beta, gamma) given G = ∂L/∂ΔW."""
    need_c, need_a, need_b, need_g = need_params
    dalpha = dbeta = dgamma = dcoeffs = None
    kernel = spec.kernel
    if kernel == "linear":
        return B.t() @ G, G @ A.t(), None, None, None, None
    if kernel == "piecewise":
        dA, dB, dcoeffs = _piecewise_backward(G, A, B, params.coeffs, spec.pieces, need_c)
        return dA, dB, dcoeffs, None, None, None
    if kernel == "rbf":
        sq = piece_distance(B, A).square()
        K = torch.exp(-params.beta * sq)
        GK = G * K
        dalpha = GK.sum() if need_a else None
        dbeta = -(params.alpha * (GK * sq).sum()) if need_b else None
        dgamma = G.sum() if need_g else None
        H = (-2.0 * params.alpha * params.beta) * GK
        dB = B * H.sum(1, keepdim=True) - H @ A.t()
        dA = A * H.sum(0, keepdim=True) - B.t() @ H
        return dA, dB, None, dalpha, dbeta, dgamma
    if kernel == "sigmoid":
        L = B @ A
        sig = torch.sigmoid(params.beta * L)
        dalpha = (G * sig).sum() if need_a else None
        dgamma = G.sum() if need_g else None
        H = G * params.alpha * sig * (1 - sig)
        dbeta = (H * L).sum() if need_b else None
        return params.beta * (B.t() @ H), params.beta * (H @ A.t()), None, dalpha, dbeta, dgamma
    if kernel == "snella":
        D = piecewise(A, B, params.coeffs, spec.pieces)
        Z = _grouped(D, spec.out_groups) / params.gamma
        P = torch.softmax(Z, dim=1)
        Gg = _grouped(G, spec.out_groups)
        dalpha = (Gg * P).sum() if need_a else None
        dbeta = G.sum() if need_b else None
        Ga = params.alpha * Gg
        dZ = P * (Ga - (Ga * P).sum(1, keepdim=True))
        dgamma = -(dZ * Z).sum() / params.gamma if need_g else None
        dD = G + (dZ / params.gamma).reshape(G.shape)
        dA, dB, dcoeffs = _piecewise_backward(dD, A, B, params.coeffs, spec.pieces, need_c)
        return dA, dB, dcoeffs, dalpha, dbeta, dgamma
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def known_zero_sparsity(sparsity) -> bool:
    """Sparsity 0 known on the host: a number, or a CPU tensor (read for free). A GPU tensor is never
    read here (that would synchronise) and gives False: the kernels, or _zero_sparsity's device
    bool, decide it on the device."""
    if isinstance(sparsity, torch.Tensor):
        return sparsity.device.type == "cpu" and bool(sparsity == 0)
    return float(sparsity) == 0.0


def _zero_sparsity(sparsity):
    """True/False, or a device bool tensor when sparsity lives on a GPU (no sync)."""
    if isinstance(sparsity, torch.Tensor) and sparsity.device.type != "cpu":
        return sparsity == 0
    return known_zero_sparsity(sparsity)


def _select(zero, dense, sparse):
    if isinstance(zero, bool):
        return dense if zero else sparse
    return torch.where(zero, dense, sparse)


def _keep(mag, threshold, groups):
    """|ΔW| > t compared in float32, as the threshold was selected (spec: selection in fp32 whatever the
    storage dtype); comparing in bf16 would round t onto a kept value, in fp64 would split float32 ties."""
    return mag.to(torch.float32) > threshold.to(torch.float32).view(groups, 1, 1)


def sparsify_given_threshold(delta, threshold, mode: str, sparsity, groups: int = 1):
    """S from ΔW and the per-group thresholds (G,) in the given mode (spec §3)."""
    zero = _zero_sparsity(sparsity)
    if zero is True:
        return delta
    d = _grouped(delta, groups)
    mag = d.abs()
    t = threshold.to(delta.dtype).view(groups, 1, 1)
    keep = _keep(mag, threshold, groups)
    if mode == "reference":
        out = d * mag
    elif mode == "paper":
        out = d * (mag - t)
    elif mode == "mask":
        out = d
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    # where, not a product with the mask: a dropped NaN must become 0, not NaN.
    out = torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return _select(zero, delta, out.reshape(delta.shape))


def sparsify_backward(grad_s, delta, threshold, mode: str, sparsity, groups: int = 1):
    """∂L/∂ΔW from ∂L/∂S; the threshold is a constant."""
    zero = _zero_sparsity(sparsity)
    if zero is True:
        return grad_s
    d = _grouped(delta, groups)
    g = _grouped(grad_s, groups)
    mag = d.abs()
    t = threshold.to(delta.dtype).view(groups, 1, 1)
    keep = _keep(mag, threshold, groups)
    if mode == "reference":
        out = g * mag
    elif mode == "paper":
        out = g * (2 * mag - t)
    elif mode == "mask":
        out = g
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out = torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return _select(zero, grad_s, out.reshape(delta.shape))


# ---------------------------------------------------------------------------------------------------
# The branch form's input regularisation (spec §4): Dropout on the branch input and DropPath on the
# branch output, folded into one per-element scale of x, D[t, j] = keep[t, j]·row_scale[t], because
# DropPath scales whole rows: DropPath(Dropout(x)·Sᵀ) = (x ⊙ D)·Sᵀ with
# row_scale[t] = path_keep[sample(t)] / ((1 − p_dropout)(1 − p_drop_path)).
# The keep mask is stored as bits (row t's bit j is bit j % 8 of byte [t, j // 8]), so the layer saves
# T·⌈n/8⌉ bytes for its backward instead of the dropped input and a byte mask.


def packed_width(n: int) -> int:
    """Bytes per row of a packed keep mask of n columns."""
    return -(-n // 8)


def check_keep_mask(keep: torch.Tensor) -> None:
    """The keep mask the pack kernels read: a 2-D (T, n) bool tensor."""
    if keep.dim() != 2 or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a 2-D (T, n) bool mask, got {keep.dtype} of shape {tuple(keep.shape)}")


def dropout_pack(keep: torch.Tensor) -> torch.Tensor:
    """Pack a bool (T, n) keep mask into (T, ⌈n/8⌉) uint8 (bit j % 8 of byte j // 8): top-k's packed
    mask layout, row by row (each row padded to whole bytes)."""
    check_keep_mask(keep)
    T, n = keep.shape
    nb = packed_width(n)
    return pack_mask(torch.nn.functional.pad(keep, (0, nb * 8 - n))).view(T, nb)


def dropout_unpack(bits: torch.Tensor, n: int) -> torch.Tensor:
    T, nb = bits.shape
    return unpack_mask(bits.reshape(-1), T * nb * 8).view(T, nb * 8)[:, :n]


def check_dropout_args(v: torch.Tensor, bits, row_scale: torch.Tensor) -> None:
    """Shapes and dtypes the kernels index by (a wrong one must not become an out-of-bounds read)."""
    if v.dim() != 2:
        raise ValueError(f"v must be 2-D (T, n), got shape {tuple(v.shape)}")
    T, n = v.shape
    if bits is not None and (bits.dtype != torch.uint8 or tuple(bits.shape) != (T, packed_width(n))):
        raise ValueError(f"bits must be uint8 of shape {(T, packed_width(n))}, got {bits.dtype} {tuple(bits.shape)}")
    if not row_scale.is_floating_point() or tuple(row_scale.shape) != (T,):
        raise ValueError(
            f"row_scale must be a float tensor of shape ({T},), got {row_scale.dtype} {tuple(row_scale.shape)}"
        )
    for name, t in (("bits", bits), ("row_scale", row_scale)):
        if t is not None and t.device != v.device:
            raise ValueError(f"{name} must be on {v.device}, got {t.device}")


def dropout_apply(v: torch.Tensor, bits, row_scale: torch.Tensor) -> torch.Tensor:
    """v ⊙ D in v's dtype: v[t, j]·(keep[t, j]·row_scale[t]), one float32 (or wider) product per
    element. A product, as F.dropout does: a dropped NaN stays NaN. bits None keeps every element."""
    check_dropout_args(v, bits, row_scale)
    acc = torch.promote_types(v.dtype, torch.float32)
    scale = row_scale.to(acc).unsqueeze(1)
    if bits is not None:
        scale = dropout_unpack(bits, v.shape[1]).to(acc) * scale
    return (v.to(acc) * scale).to(v.dtype)
