"""Monarch multiply (fly layout) and projection in pure PyTorch: the source of truth.

x: (T, n); w1: (k, q, p); w2: (l, s, r) with k·p = n and l·r = k·q; y: (T, l·s).
  out1[b, ki, qj] = Σ_pp w1[ki, qj, pp] · x[b, ki·p + pp]
  f = ki·q + qj ; (ri, li) = divmod(f, l)
  out2[b, li, si] = Σ_ri w2[li, si, ri] · out1flat[b, ri·l + li]
  y[b, si·l + li] = out2[b, li, si]
"""

from __future__ import annotations

import torch


def stage1(x2, w1):
    """out1 as (T, k·q) from x (T, k·p)."""
    k, q, p = w1.shape
    x1 = x2.reshape(-1, k, p).transpose(0, 1)  # (k, T, p)
    return torch.bmm(x1, w1.transpose(1, 2)).transpose(0, 1).reshape(-1, k * q)


def forward(x2, w1, w2):
    l, s, r = w2.shape
    out1 = stage1(x2, w1)
    mid = out1.reshape(-1, r, l).permute(2, 0, 1)  # (l, T, r): block li's inputs in w2's order
    out2 = torch.bmm(mid, w2.transpose(1, 2))  # (l, T, s)
    return out2.permute(1, 2, 0).reshape(-1, s * l)


def backward(dy2, x2, w1, w2, need_x=True, need_w1=True, need_w2=True):
    """(dx, dw1, dw2) of forward; the intermediate is recomputed from x."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    dout2 = dy2.reshape(-1, s, l).permute(2, 0, 1)  # (l, T, s)
    dw2 = None
    if need_w2:
        mid = stage1(x2, w1).reshape(-1, r, l).permute(2, 0, 1)
        dw2 = torch.bmm(dout2.transpose(1, 2), mid)  # (l, s, r)
    if not (need_x or need_w1):
        return None, None, dw2
    dmid = torch.bmm(dout2, w2)  # (l, T, r)
    dout1 = dmid.permute(1, 2, 0).reshape(-1, k, q).transpose(0, 1)  # (k, T, q)
    dw1 = dx = None
    if need_w1:
        x1 = x2.reshape(-1, k, p).transpose(0, 1)
        dw1 = torch.bmm(dout1.transpose(1, 2), x1)  # (k, q, p)
    if need_x:
        dx = torch.bmm(dout1, w1).transpose(0, 1).reshape(-1, k * p)
    return dx, dw1, dw2


def dense_matrix(w1, w2) -> torch.Tensor:
    """The (l·s, k·p) dense matrix M with y = x Mᵀ (the test oracle's formula, via forward)."""
    k, q, p = w1.shape
    eye = torch.eye(k * p, dtype=w1.dtype, device=w1.device)
    return forward(eye, w1, w2).t()


def project(weight: torch.Tensor, w1_shape, w2_shape):
    """Closest Monarch factors (Frobenius) of a dense (l·s, k·p) matrix, spec/MONARCH.md §3.

    Block (li, ki) of M equals Σ over the ri with (ri·l+li) div q = ki of
    w2[li, :, ri] ⊗ w1[ki, (ri·l+li) mod q, :]: a truncated SVD of each block, √σ to each side.
    Works whether or not q % l == 0.
    """
    k, q, p = w1_shape
    l, s, r = w2_shape
    M = weight.to(torch.float64)
    w1 = torch.zeros(w1_shape, dtype=torch.float64, device=weight.device)
    w2 = torch.zeros(w2_shape, dtype=torch.float64, device=weight.device)
    blocks = M.reshape(s, l, k, p).permute(1, 2, 0, 3)  # [li, ki] -> (s, p)
    ri_all = torch.arange(r, device=weight.device)
    for li in range(l):
        flat = ri_all * l + li
        for ki in range(k):
            ris = ri_all[flat // q == ki]
            rank = ris.numel()
            if rank == 0:
                continue
            U, S, Vh = torch.linalg.svd(blocks[li, ki], full_matrices=False)
            use = min(rank, S.numel())
            root = S[:use].sqrt()
            w2[li][:, ris[:use]] = U[:, :use] * root
            w1[ki][(flat[ris[:use]] % q)] = root[:, None] * Vh[:use]
    return w1.to(weight.dtype), w2.to(weight.dtype)
