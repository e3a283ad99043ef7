"""Threshold selection and top-k magnitude masking in pure PyTorch: the source of truth.

Semantics (spec/TOPK.md, spec/SNELL.md §3):
- Magnitudes are ranked in float32 whatever the storage dtype. NaN ranks as -1, below every
  number: it never counts as large, and it is zeroed unless k-mode needs more entries than
  there are numbers (then NaNs fill the remaining slots in flat-index order and stay NaN).
- Quantile threshold: torch.quantile's linear rule. Sort the keys ascending into v (N values),
  pos = s·(N−1) (computed in float64, exact at any N), lo = floor(pos), hi = ceil(pos),
  t = lerp(v[lo], v[hi], pos − lo). Keep key > t. Sparsity 0 keeps everything.
- k-mode: t is the k-th largest key; keep every key > t, then the ties equal to t in
  increasing flat-index order until exactly k are kept. k = 0 keeps nothing (t = +inf).
No step reads a value back to the host when the tensor lives on a GPU.
"""

from __future__ import annotations

import torch

NAN_KEY = -1.0


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """|x| as float32 with NaN mapped to -1 (the ranking key)."""
    mag = x.detach().abs().to(torch.float32)
    return mag.masked_fill_(torch.isnan(mag), NAN_KEY)


def sparsity_tensor(sparsity, device) -> torch.Tensor:
    """A float64 scalar tensor on `device` (a float or a buffer tensor both work, no sync)."""
    if isinstance(sparsity, torch.Tensor):
        return sparsity.detach().to(device=device, dtype=torch.float64).reshape(())
    # torch.full, not torch.tensor: a host value copied to a GPU waits for the stream, and a CUDA
    # graph cannot capture that copy
    return torch.full((), float(sparsity), dtype=torch.float64, device=device)


def quantile_positions(sparsity: torch.Tensor, n: int):
    """(lo, hi, weight) of torch.quantile's linear rule for N = n values, as device tensors."""
    # clamped: an unvalidated device-side sparsity outside [0, 1) must never index out of bounds
    pos = torch.nan_to_num(sparsity * float(max(n - 1, 0)), nan=0.0).clamp(0.0, float(max(n - 1, 0)))
    lo = torch.floor(pos)
    hi = torch.ceil(pos)
    return lo.long(), hi.long(), (pos - lo).to(torch.float32)


def lerp(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """torch.lerp's formula, written out so every backend can reproduce it bit for bit."""
    return torch.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


def order_statistics(keys: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """The lo-th and hi-th smallest keys of each row of `keys` (G, N)."""
    if keys.device.type == "cpu":
        # CPU: reading the ranks costs nothing and kthvalue is linear time.
        lo_i, hi_i = int(lo) + 1, int(hi) + 1
        v_lo = torch.kthvalue(keys, lo_i, dim=-1).values
        v_hi = v_lo if hi_i == lo_i else torch.kthvalue(keys, hi_i, dim=-1).values
        return v_lo, v_hi
    # GPU: a sort and a gather at device-side ranks, no host synchronisation.
    sorted_keys = torch.sort(keys, dim=-1).values
    g = keys.shape[0]
    return (
        sorted_keys.gather(1, lo.expand(g, 1)).squeeze(1),
        sorted_keys.gather(1, hi.expand(g, 1)).squeeze(1),
    )


def quantile_threshold(keys: torch.Tensor, sparsity) -> torch.Tensor:
    """Per-row quantile threshold of keys (G, N) at `sparsity`; returns (G,) float32."""
    g, n = keys.shape
    if n == 0:
        return torch.zeros(g, dtype=torch.float32, device=keys.device)
    s = sparsity_tensor(sparsity, keys.device)
    lo, hi, w = quantile_positions(s, n)
    v_lo, v_hi = order_statistics(keys, lo.reshape(1, 1), hi.reshape(1, 1))
    return lerp(v_lo, v_hi, w)


def keep_by_threshold(keys: torch.Tensor, threshold: torch.Tensor, sparsity) -> torch.Tensor:
    """Keep mask key > t, or everything where sparsity is 0 (works with a device-side sparsity)."""
    s = sparsity_tensor(sparsity, keys.device)
    return (keys > threshold) | (s == 0)


def kth_largest_keep(keys: torch.Tensor, k: int):
    """k-mode over a flat key vector: (keep mask, threshold) with index-ordered tie breaking."""
    n = keys.numel()
    if k == 0:
        return torch.zeros_like(keys, dtype=torch.bool), torch.full((), float("inf"), device=keys.device)
    if keys.device.type == "cpu":
        t = torch.kthvalue(keys, n - k + 1).values
    else:
        t = torch.sort(keys).values[n - k]
    greater = keys > t
    ties = keys == t
    need = k - greater.sum()
    keep = greater | (ties & (torch.cumsum(ties, 0) <= need))
    return keep, t


def topk_mask_(x: torch.Tensor, sparsity=None, k=None):
    """In-place masking of a tensor: returns (x, threshold as a 0-dim float32 tensor)."""
    keep, t = keep_mask(x, sparsity=sparsity, k=k)
    x.masked_fill_(~keep.view(x.shape), 0)
    return x, t


def keep_mask(x: torch.Tensor, sparsity=None, k=None):
    """The flat keep mask (bool, N) and the threshold of topk_mask_ without touching x."""
    keys = magnitude_keys(x).reshape(-1)
    if k is not None:
        return kth_largest_keep(keys, int(k))
    t = quantile_threshold(keys.view(1, -1), sparsity).reshape(())
    return keep_by_threshold(keys, t, sparsity), t


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool mask into bytes (bit i of byte j is element 8·j + i): N/8 bytes."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # bits shifted into place (built on the device: no host copy, nothing a CUDA graph cannot capture)
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8).to(torch.uint8) << shifts).sum(1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.view(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()
