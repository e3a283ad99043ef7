"""Direct transcriptions of the specs, written independently of pysnell, used as test oracles.

SNELL (spec/SNELL.md §2–3): the merge through torch.cdist, the threshold through torch.quantile
(or an explicit sort), ΔW·sg(|ΔW|)·M and friends. Autograd runs through these transcriptions;
`.detach()` marks what the spec calls stop-gradient or constant. Monarch (spec/MONARCH.md §1):
the dense matrix from the M[si·l+li, ki·p+pp] sum, one rank-1 term at a time.
"""

from __future__ import annotations

import math

import torch

from benchmarks.harness import rel_rmse  # noqa: F401 (the one error measure, shared with the benchmarks)


def cdist(Bp: torch.Tensor, Ap: torch.Tensor) -> torch.Tensor:
    """‖b_i − a_j‖₂ for the rows of Bp (m, d) and the columns of Ap (d, n)."""
    return torch.cdist(Bp, Ap.t(), compute_mode="donot_use_mm_for_euclid_dist")


def merge(A, B, kernel="piecewise", pieces=2, coeffs=None, alpha=None, beta=None, gamma=None, out_groups=1):
    r = A.shape[0]
    d = r // pieces
    if coeffs is None:
        coeffs = torch.tensor([0.1 * (-1) ** p for p in range(pieces)], dtype=A.dtype)

    def piecewise():
        return sum(coeffs[p] * cdist(B[:, p * d : (p + 1) * d], A[p * d : (p + 1) * d]) for p in range(pieces))

    if kernel == "linear":
        return B @ A
    if kernel == "piecewise":
        return piecewise()
    if kernel == "rbf":
        return alpha * torch.exp(-beta * cdist(B, A) ** 2) + gamma
    if kernel == "sigmoid":
        return alpha * torch.sigmoid(beta * (B @ A)) + gamma
    if kernel == "snella":
        D = piecewise()
        # softmax over the output index i, separately per input column j and per output group
        soft = torch.cat([torch.softmax(g / gamma, dim=0) for g in D.chunk(out_groups, dim=0)])
        return D + alpha * soft + beta
    raise ValueError(kernel)


def random_kernel_scalars(kernel, device):
    """(alpha, beta, gamma) drawn away from their init where the kernel has them (snella: α·P + β
    offsets; rbf, sigmoid: α·k(β·…) + γ), else (None, None, None): the defaults."""
    if kernel == "snella":
        bounds = ((0.5, 1.5), (-0.2, 0.2), (0.6, 1.4))
    elif kernel in ("rbf", "sigmoid"):
        bounds = ((0.5, 1.5), (0.5, 1.5), (-0.2, 0.2))
    else:
        return None, None, None
    return tuple(torch.empty((), device=device).uniform_(lo, hi) for lo, hi in bounds)


def quantile_threshold(keys: torch.Tensor, sparsity: float) -> torch.Tensor:
    """torch.quantile of float32 magnitudes (float64 rank, as pysnell documents), as float32."""
    return torch.quantile(keys.reshape(-1).double(), sparsity).float()


def sort_threshold(keys: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The spec's rule on an explicit sort: pos = s·(N−1) in float64, lerp in float32."""
    v = torch.sort(keys.reshape(-1).float()).values
    return lerp_at(v, sparsity)


def lerp_at(sorted_values: torch.Tensor, sparsity: float) -> torch.Tensor:
    n = sorted_values.numel()
    pos = sparsity * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    a, b = sorted_values[lo], sorted_values[hi]
    w = torch.tensor(pos - lo, dtype=torch.float32)
    # torch.lerp's two-sided formula in float32
    return a + w * (b - a) if w < 0.5 else b - (b - a) * (1 - w)


def sparsify(delta, sparsity, mode="reference", out_groups=1, threshold=quantile_threshold):
    """S per spec §3 with the threshold a constant; NaN magnitudes never count as large.

    `threshold(keys, s)`: torch.quantile (default) or `sort_threshold`, the spec's float32 rule exactly.
    """
    if sparsity == 0:
        return delta
    out = []
    for dg in delta.chunk(out_groups, dim=0):
        keys = dg.detach().abs().float()
        keys = torch.where(torch.isnan(keys), torch.full_like(keys, -1.0), keys)
        t = threshold(keys, sparsity)
        keep = keys > t
        if mode == "reference":
            value = dg * dg.abs().detach()
        elif mode == "paper":
            value = dg * (dg.abs() - t.to(dg.dtype))
        elif mode == "mask":
            value = dg
        else:
            raise ValueError(mode)
        out.append(torch.where(keep, value, torch.zeros_like(value)))
    return torch.cat(out)


def monarch_dense(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """M[si·l+li, ki·p+pp] = Σ_{ri : (ri·l+li) div q = ki} w2[li, si, ri] · w1[ki, (ri·l+li) mod q, pp].

    One einsum over a gather of w1 and a one-hot of ki: differentiable without a per-term in-place
    write into M (monarch_dense_by_terms makes l·r of them, each a copy of M's gradient in backward)."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    flat = torch.arange(r, device=w1.device)[None, :] * l + torch.arange(l, device=w1.device)[:, None]  # (l, r)
    ki, qj = flat // q, flat % q
    gathered = w1[ki, qj]  # (l, r, p): the w1 row each (li, ri) term reads
    onehot = torch.nn.functional.one_hot(ki, k).to(gathered.dtype)  # (l, r, k): the column block it lands in
    dtype = torch.promote_types(w1.dtype, w2.dtype)
    M4 = torch.einsum("lsr,lrk,lrp->slkp", w2.to(dtype), onehot.to(dtype), gathered.to(dtype))
    return M4.reshape(s * l, k * p)


def monarch_dense_by_terms(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """monarch_dense term by term, as its formula reads (checks the einsum form on small shapes)."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    M = torch.zeros(l * s, k * p, dtype=torch.promote_types(w1.dtype, w2.dtype), device=w1.device)
    for li in range(l):
        for ri in range(r):
            ki, qj = divmod(ri * l + li, q)
            M[li::l, ki * p : (ki + 1) * p] += torch.outer(w2[li, :, ri], w1[ki, qj])
    return M
