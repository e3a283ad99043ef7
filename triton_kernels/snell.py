"""Triton SNELL layer: kernelized merge, exact quantile selection, sparsify and GEMM, fwd and bwd.

Design (measured choices are in the README / benchmarks/ops_snell.py):
- ΔW is never stored. Every kernel regenerates its ΔW tile in registers from A and B
  (all five kernels: piecewise, linear, rbf, sigmoid, snella; snella first gets each column's
  softmax max / sum-exp per group).
- Selection is an exact radix-style search over the order-preserving integer key of |ΔW|
  (u = bits(|ΔW|) + 1, NaN -> 0, so NaN ranks below everything, as in the reference). Each pass
  regenerates ΔW, counts the keys below / inside / above a key range and histograms the keys
  inside it (2^NB bins, global int32 atomics, counts are order independent so the result is
  deterministic); the last program of the pass (ticket counter) finalises on the device: it finds
  the bins holding the ranks lo = floor(s(N-1)) and hi = ceil(s(N-1)) and narrows the range.
  Large matrices first run a pilot pass over a fixed low-discrepancy sample that brackets the
  quantile, so one full pass usually resolves both order statistics; the fixed fallback passes
  after it do nothing unless the bracket missed. No host synchronisation anywhere.
- Forward: one kernel writes W_eff = W0 + S in the GEMM dtype tile by tile, cuBLAS does the GEMM.
- Backward: cuBLAS forms G_S = dYᵀX (the m×n buffer full fine-tuning allocates for dW); one kernel
  reads G_S tiles, regenerates ΔW, applies the sparsify chain rule and the kernel derivative,
  writes deterministic per-tile partials of dA, dB and the scalar grads, and overwrites G_S with
  W_eff for dX = dY·W_eff (cuBLAS); a last small kernel sums the partials in a fixed order.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pysnell import _backend
from pysnell.functional import default_scalar
from pysnell.ops.snell import reference as ref
from pysnell.ops.snell.function import _torch_layer_backward, _torch_layer_forward

from ._host import KernelConstant, cdiv, interpreting, launch, next_pow2, sm_count
from ._keys import key_to_float, lerp, magnitude_key

_KERNEL_IDS = {"linear": 0, "piecewise": 1, "snella": 2, "rbf": 3, "sigmoid": 4}
_PIECEWISE_KERNELS = ("piecewise", "snella")  # the ones made of pieces (coefficients c_p)
_MODE_IDS = {"reference": 0, "paper": 1, "mask": 2}
_FACTOR_DTYPES = (torch.float32,)
_ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_PIECES = 8

# Selection tuning (module attributes so tests can force the pilot and its fallback paths).
# Groups with at least this many entries (and more than 4 samples' worth) get a pilot pass. H200,
# benchmarks/tune_snell.py (session 7): the pilot's narrow first pass takes the selection at 768×3072
# from 0.292 to 0.129 ms and ViT-B's qkv (3 groups of 768×768) from 0.218 to 0.142 ms.
PILOT_MIN_NUMEL = 1 << 18
PILOT_SAMPLES = 1 << 17
PILOT_Z = 6.0  # bracket half-width in binomial standard deviations of the sample rank
PILOT_BINS_LOG = 16
LARGE_BINS_LOG = 20  # histogram bins per full pass after a pilot (a bracket resolves in one pass)
SMALL_BINS_LOG = 16  # without a pilot: 16 + 15 bits, two passes always resolve the 31-bit key
_SAMPLE_MULT = 2654435761  # prime > any group size we accept: k·MULT mod N is a low-discrepancy walk
# (rows, cols, warps) per program on a GPU: selection passes and W_eff, and the backward kernel.
TILE = (64, 64, 8)
# H200 sweep (benchmarks/tune_snell.py, session 7), factor gradients at r = 8, bf16 G_S: 4 warps take
# 4096×11008 from 0.565 ms (8 warps) to 0.360 ms and 768×3072 from 0.058 to 0.043 ms, at 2 programs per SM.
# An fp32 G_S (three tf32 products per dot) spills at 4 warps (snella: 576 B per thread): it keeps 8.
BACKWARD_TILE = (64, 64, 4)
BACKWARD_TILE_FP32 = (64, 64, 8)
# The backward kernel holds several (rows, RP) and (RP, cols) fp32 tiles (RP: the padded rank), so
# wider ranks take narrower tiles: these are the widest without register spills on sm_90
# (compile-only sm_90 builds, every kernel family; fp32 G_S needs three tf32 products per dot).
BACKWARD_TILE_RP32 = (64, 32, 8)  # RP 32 (r 16..31), and RP 64 with a 16-bit G_S
BACKWARD_TILE_WIDE = (32, 32, 4)  # RP 64 with an fp32 G_S, RP >= 128
# Backward programs per SM and group (benchmarks/tune_snell.py sweeps it with the tiles).
BACKWARD_PROGRAMS_PER_SM = 2
# Tile edge under the interpreter (every program instance costs ~0.1 s there); tests lower it to
# get several programs per kernel.
INTERPRET_TILE = 32
# Tests set this to True: every buffer a kernel must fully write starts as NaN (or -1).
POISON = False
# Tests set this to True to inspect the last selection: (state (G, 8), counters (passes, G·8), pilot?).
KEEP_DEBUG_STATE = False
last_selection = None

# Constants used inside the kernels.
_MAXV = KernelConstant(0x7F800001)  # key of +inf; the largest key
_F_INIT = KernelConstant(1)
_F_DONE = KernelConstant(2)
_F_WIDE = KernelConstant(4)
_F_KNOWN_LO = KernelConstant(8)
_F_KNOWN_HI = KernelConstant(16)
_NSCAL = KernelConstant(16)  # scalar partial slots: 0..7 dcoeffs, 8 dalpha, 9 dbeta, 10 Σ dZ·Z


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rank_factors(a_ptr, b_ptr, rows, cols, rmask, cmask, n, R: tl.constexpr, k, DIST: tl.constexpr):
    """The two factors of rank index k's term: (b_ik − a_kj, the same) (DIST) or (b_ik, a_kj)."""
    bk = tl.load(b_ptr + rows * R + k, mask=rmask, other=0.0)
    ak = tl.load(a_ptr + k * n + cols, mask=cmask, other=0.0)
    if DIST:
        diff = bk - ak
        return diff, diff
    else:
        return bk, ak


@triton.jit
def _rank_sum(a_ptr, b_ptr, rows, cols, rmask, cmask, n, R: tl.constexpr, K0: tl.constexpr, K: tl.constexpr,
              DIST: tl.constexpr):  # fmt: skip
    """Σ over k in [K0, K0 + K) of the terms' products, in k order, each added with an explicit fma
    (the kernels that regenerate ΔW launch without FP contraction, so every one rounds alike).
    Unrolled for ranks up to 16; beyond, a loop: unrolled, the compiler hoists every factor load
    ahead of the arithmetic and the tile kernels spill from r = 32 on sm_90 (same sum either way)."""
    u, v = _rank_factors(a_ptr, b_ptr, rows, cols, rmask, cmask, n, R, K0, DIST)
    acc = u * v
    if R <= 16:
        for k in tl.static_range(K0 + 1, K0 + K):
            u, v = _rank_factors(a_ptr, b_ptr, rows, cols, rmask, cmask, n, R, k, DIST)
            acc = tl.fma(u, v, acc)
    else:
        for k in range(K0 + 1, K0 + K):
            u, v = _rank_factors(a_ptr, b_ptr, rows, cols, rmask, cmask, n, R, k, DIST)
            acc = tl.fma(u, v, acc)
    return acc


@triton.jit
def _regen(
    a_ptr, b_ptr, coeff_ptr, rows, cols, rmask, cmask, n, R: tl.constexpr, PIECES: tl.constexpr, KERNEL: tl.constexpr
):
    """The kernel's inner quantity for b_i, a_j, and per-piece distances and 1/distances.

    linear and sigmoid: L = b·a; piecewise and snella: D = Σ_p c_p‖b^p − a^p‖ (before the snella
    softmax); rbf: ‖b − a‖² over all r dims (_delta_tile applies α, β, γ).
    rows / cols broadcast against each other ([BM,1] x [1,BN] tiles or two [BLK] gathers).
    Distances are sqrt(Σ (b - a)²) (never the |a|²+|b|²-2ab expansion, which cancels).
    """
    dists = ()
    invs = ()
    if KERNEL == 3:
        acc = _rank_sum(a_ptr, b_ptr, rows, cols, rmask, cmask, n, R, 0, R, True)
    elif KERNEL == 0 or KERNEL == 4:
        acc = _rank_sum(a_ptr, b_ptr, rows, cols, rmask, cmask, n, R, 0, R, False)
    else:
        D: tl.constexpr = R // PIECES
        for p in tl.static_range(PIECES):
            q = _rank_sum(a_ptr, b_ptr, rows, cols, rmask, cmask, n, R, p * D, D, True)
            inv = tl.where(q > 0, tl.rsqrt(q), 0.0)
            dist = q * inv  # 0 where q == 0 (torch's subgradient of the norm)
            dists = dists + (dist,)
            invs = invs + (inv,)
            term = tl.load(coeff_ptr + p) * dist
            if p == 0:
                acc = term
            else:
                acc += term
    return acc, dists, invs


@triton.jit
def _snella_softmax(D, gamma, stat_ptr, g, cols, cmask, n):
    """P = softmax over the output rows of D/γ for each input column (stats precomputed)."""
    mx = tl.load(stat_ptr + (g * 2) * n + cols, mask=cmask, other=0.0)
    se = tl.load(stat_ptr + (g * 2 + 1) * n + cols, mask=cmask, other=1.0)
    z = D / gamma
    return tl.exp(z - mx) / se, z


@triton.jit
def _delta_tile(
    a_ptr,
    b_ptr,
    coeff_ptr,
    alpha_ptr,
    beta_ptr,
    gamma_ptr,
    stat_ptr,
    g,
    rows,
    cols,
    rmask,
    cmask,
    n,
    R: tl.constexpr,
    PIECES: tl.constexpr,
    KERNEL: tl.constexpr,
):
    """The full kernel value ΔW for a tile or a gather."""
    D, dists, invs = _regen(a_ptr, b_ptr, coeff_ptr, rows, cols, rmask, cmask, n, R, PIECES, KERNEL)
    if KERNEL >= 2:
        alpha = tl.load(alpha_ptr)
        beta = tl.load(beta_ptr)
        gamma = tl.load(gamma_ptr)
    else:  # linear and piecewise have no scalars: nothing to load
        alpha = 0.0
        beta = 0.0
        gamma = 0.0
    P = D  # unused unless snella
    if KERNEL == 2:
        P, z = _snella_softmax(D, gamma, stat_ptr, g, cols, cmask, n)
    return _kernel_value(D, P, alpha, beta, gamma, KERNEL)[0]


@triton.jit
def _kernel_value(D, P, alpha, beta, gamma, KERNEL: tl.constexpr):
    """(ΔW, the inner value the backward differentiates) from _regen's D (and snella's softmax P).
    The forward's tiles and the backward kernel both go through here: one expression, so (without FP
    contraction) one rounding, and the same entries on either side of the threshold."""
    if KERNEL == 2:
        return D + alpha * P + beta, P
    elif KERNEL == 3:
        K = tl.exp(-beta * D)  # D = ‖b − a‖²
        return alpha * K + gamma, K
    elif KERNEL == 4:
        sg = tl.sigmoid(beta * D)  # D = b·a
        return alpha * sg + gamma, sg
    else:
        return D, D


@triton.jit
def _sparsify(dw, t, zero, MODE: tl.constexpr, SPARSIFY: tl.constexpr):
    """S from ΔW and the group threshold; `zero` (sparsity == 0 on the device) means S = ΔW."""
    if SPARSIFY:
        mag = tl.abs(dw)
        if MODE == 0:
            out = dw * mag
        elif MODE == 1:
            out = dw * (mag - t)
        else:
            out = dw
        # where, not a product: a dropped NaN becomes 0
        out = tl.where(mag > t, out, 0.0)
        return tl.where(zero, dw, out)
    else:
        return dw


@triton.jit
def _sparsify_grad(gv, dw, t, zero, MODE: tl.constexpr, SPARSIFY: tl.constexpr):
    """∂L/∂ΔW from ∂L/∂S (the threshold is a constant)."""
    if SPARSIFY:
        mag = tl.abs(dw)
        if MODE == 0:
            out = gv * mag
        elif MODE == 1:
            out = gv * (2.0 * mag - t)
        else:
            out = gv
        out = tl.where(mag > t, out, 0.0)
        return tl.where(zero, gv, out)
    else:
        return gv


@triton.jit
def _quantile_ranks(sparsity_ptr, count):
    """torch.quantile's linear rule: (lo, hi, weight) for `count` values, pos computed in float64, and
    the sparsity clamped to [0, 1] (NaN: 0) for the pilot's bracket width."""
    last_f = (count - 1).to(tl.float64)
    s = tl.load(sparsity_ptr).to(tl.float64)
    # reference.quantile_positions: an unchecked device sparsity (NaN, outside [0, 1)) gives the
    # position nan_to_num(·, 0) clamped to [0, N-1], before floor, ceil and the weight
    pos = s * last_f
    pos = tl.minimum(tl.where(pos >= 0.0, pos, 0.0), last_f)
    lo_f = tl.floor(pos)
    hi_f = tl.ceil(pos)
    w = (pos - lo_f).to(tl.float32)
    last = count - 1
    lo = tl.minimum(tl.maximum(lo_f.to(tl.int64), 0), last)
    hi = tl.minimum(tl.maximum(hi_f.to(tl.int64), 0), last)
    return lo, hi, w, tl.where(s >= 0.0, tl.minimum(s, 1.0), 0.0)


@triton.jit
def _find_bin(fine_ptr, r, FINE_PER_COARSE: tl.constexpr):
    """Index of the histogram bin holding relative rank r (two-level scan: coarse, then fine)."""
    coarse_ptr = fine_ptr + 256 * FINE_PER_COARSE
    cidx = tl.arange(0, 256)
    cc = tl.load(coarse_ptr + cidx, cache_modifier=".cg").to(tl.int64)
    ccum = tl.cumsum(cc, 0)
    cbin = tl.minimum(tl.sum((ccum <= r).to(tl.int32)), 255)
    before = tl.sum(tl.where(cidx < cbin, cc, 0))
    fidx = tl.arange(0, FINE_PER_COARSE)
    fc = tl.load(fine_ptr + cbin * FINE_PER_COARSE + fidx, cache_modifier=".cg").to(tl.int64)
    fcum = tl.cumsum(fc, 0)
    fbin = tl.minimum(tl.sum((fcum <= r - before).to(tl.int32)), FINE_PER_COARSE - 1)
    return (cbin * FINE_PER_COARSE + fbin).to(tl.int64)


@triton.jit
def _shift_for(width_m1, NB: tl.constexpr):
    """Smallest s >= 0 with (width_m1 >> s) < 2^NB, i.e. max(0, bit_length(width_m1) - NB)."""
    top = width_m1 * 0  # index of the highest set bit (binary search), width_m1 < 2^63
    for step in tl.static_range(6):
        probe = top + (32 >> step)
        top = tl.where((width_m1 >> probe) > 0, probe, top)
    bit_length = tl.where(width_m1 > 0, top + 1, 0)
    return tl.maximum(bit_length - NB, 0)


@triton.jit
def _locate(r, c_below, c_in, max_below, min_above, lo_u, hi_u, shift, fine_ptr, FINE_PER_COARSE: tl.constexpr):
    """Where rank r lies after a pass: (known, value, region start, region end, side region)."""
    below = r < c_below
    above = r >= c_below + c_in
    inside = (~below) & (~above)
    rel = tl.minimum(tl.maximum(r - c_below, 0), tl.maximum(c_in - 1, 0))
    b = _find_bin(fine_ptr, rel, FINE_PER_COARSE)
    start = lo_u + (b << shift)
    end = tl.minimum(start + (1 << shift) - 1, hi_u)
    exact_inside = inside & (shift == 0)
    at_max_below = r == c_below - 1
    at_min_above = r == c_below + c_in
    known = exact_inside | at_max_below | at_min_above
    value = tl.where(exact_inside, start, tl.where(at_max_below, max_below, min_above))
    reg_lo = tl.where(below, 0, tl.where(above, hi_u + 1, start))
    reg_hi = tl.where(below, lo_u - 1, tl.where(above, _MAXV, end))
    return known, value, reg_lo, reg_hi, below | above


@triton.jit
def _count_block(u, valid, lo_u, hi_u, shift, wide, fine_ptr, NB: tl.constexpr, FLAT: tl.constexpr,
                 WIDE: tl.constexpr):  # fmt: skip
    """Classify keys against [lo_u, hi_u] and histogram the ones inside: (below, above, n_in, h).

    WIDE: 0 = the range is narrow (few keys inside), 1 = wide, 2 = read `wide` at run time.
    Narrow mode adds coarse counts directly; otherwise the block's coarse counts are returned.
    """
    below = valid & (u < lo_u)
    above = valid & (u > hi_u)
    inside = valid & (u >= lo_u) & (u <= hi_u)
    n_in = tl.sum(inside.to(tl.int32))
    b = tl.where(inside, (u - lo_u) >> shift, 0)
    cb = b >> (NB - 8)
    coarse_ptr = fine_ptr + (1 << NB)
    h = tl.zeros([256], dtype=tl.int32)
    if WIDE == 0:
        # Narrow range: few keys inside; most tiles have none and skip the atomics.
        if n_in > 0:
            tl.atomic_add(fine_ptr + b, 1, mask=inside, sem="relaxed")
            tl.atomic_add(coarse_ptr + cb, 1, mask=inside, sem="relaxed")
    else:
        # Wide range: a block whose keys all share one bin (e.g. ΔW == 0 everywhere) adds its count
        # once, because same-address atomics serialise; coarse counts are returned per block.
        b_lo = tl.min(tl.where(inside, b, 1 << NB))
        b_hi = tl.max(tl.where(inside, b, -1))
        runtime_narrow = False
        if WIDE == 2:
            runtime_narrow = ~wide
        if runtime_narrow:
            if n_in > 0:
                tl.atomic_add(fine_ptr + b, 1, mask=inside, sem="relaxed")
                tl.atomic_add(coarse_ptr + cb, 1, mask=inside, sem="relaxed")
        elif b_lo == b_hi:
            tl.atomic_add(fine_ptr + b_lo, n_in, sem="relaxed")
            h = tl.where(tl.arange(0, 256) == (b_lo >> (NB - 8)), n_in, 0)
        else:
            tl.atomic_add(fine_ptr + b, 1, mask=inside, sem="relaxed")
            h = tl.histogram(tl.reshape(cb, [FLAT]), 256, mask=tl.reshape(inside, [FLAT]))
    return below, above, n_in, h


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------
@triton.jit
def _select_pass_kernel(
    a_ptr, b_ptr, coeff_ptr, alpha_ptr, beta_ptr, gamma_ptr, stat_ptr, sparsity_ptr,
    state_ptr, counter_ptr, hist_ptr, hist_stride, thresholds_ptr,
    zero_ptr, zero_stride, zero_numel, zero_per_prog,
    m_g, n, n_col_tiles, n_tiles, tiles_per_prog,
    n_sample, sample_mult, pilot_z,
    R: tl.constexpr, PIECES: tl.constexpr, KERNEL: tl.constexpr,
    SAMPLE: tl.constexpr, NB: tl.constexpr, NB_NEXT: tl.constexpr, WIDE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SBLK: tl.constexpr, ZBLK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    g = tl.program_id(1)
    nprog = tl.num_programs(0)
    state = state_ptr + g * 8
    counters = counter_ptr + g * 8
    fine = hist_ptr + g * hist_stride

    flags = tl.load(state + 3, cache_modifier=".cg")
    init = (flags & _F_INIT) != 0
    lo_u = tl.where(init, tl.load(state + 0, cache_modifier=".cg"), 0).to(tl.int32)
    hi_u = tl.where(init, tl.load(state + 1, cache_modifier=".cg"), _MAXV).to(tl.int32)
    shift = tl.where(init, tl.load(state + 2, cache_modifier=".cg"), 31 - NB).to(tl.int32)
    wide = (~init) | ((flags & _F_WIDE) != 0)
    active = (flags & _F_DONE) == 0
    if active:
        # Zero this program's slice of the next pass's histogram (it runs after this kernel).
        zbase = zero_ptr + g * zero_stride
        z0 = pid * zero_per_prog
        z1 = tl.minimum(z0 + zero_per_prog, zero_numel)
        zs = z0
        while zs < z1:
            zoffs = zs + tl.arange(0, ZBLK)
            tl.store(zbase + zoffs, tl.zeros([ZBLK], dtype=tl.int32), mask=zoffs < z1)
            zs += ZBLK

        numel = m_g.to(tl.int64) * n
        if SAMPLE:
            k = pid * SBLK + tl.arange(0, SBLK)
            valid = k < n_sample
            flat = (k.to(tl.int64) * sample_mult) % numel
            lrow = (flat // n).to(tl.int32)
            cols = (flat % n).to(tl.int32)
            rows = g * m_g + lrow  # int32: factor loads; m×n offsets widen to int64
            dw = _delta_tile(a_ptr, b_ptr, coeff_ptr, alpha_ptr, beta_ptr, gamma_ptr, stat_ptr, g, rows, cols,
                             valid, valid, n, R, PIECES, KERNEL)  # fmt: skip
            u = magnitude_key(dw)
            below, above, n_in, hist = _count_block(u, valid, lo_u, hi_u, shift, wide, fine, NB, SBLK, 1)
            n_below = tl.sum(below.to(tl.int32))
            max_below = tl.max(tl.where(below, u, 0))
            min_above_enc = tl.max(tl.where(above, _MAXV - u, 0))
        else:
            # Elementwise accumulators, reduced once per program (block reductions cost more).
            below_count = tl.zeros([BM, BN], dtype=tl.int32)
            below_max = tl.zeros([BM, BN], dtype=tl.int32)
            above_min_enc = tl.zeros([BM, BN], dtype=tl.int32)
            n_in = tl.sum(below_count, axis=None) * 0
            hist = tl.zeros([256], dtype=tl.int32)
            t0 = pid * tiles_per_prog
            t1 = tl.minimum(t0 + tiles_per_prog, n_tiles)
            t = t0
            while t < t1:
                rt = t // n_col_tiles
                ct = t % n_col_tiles
                lrow = rt * BM + tl.arange(0, BM)
                cols = ct * BN + tl.arange(0, BN)
                rmask = lrow < m_g
                cmask = cols < n
                rows = g * m_g + lrow  # int32: factor loads; m×n offsets widen to int64
                dw = _delta_tile(a_ptr, b_ptr, coeff_ptr, alpha_ptr, beta_ptr, gamma_ptr, stat_ptr, g,
                                 rows[:, None], cols[None, :], rmask[:, None], cmask[None, :], n,
                                 R, PIECES, KERNEL)  # fmt: skip
                valid = rmask[:, None] & cmask[None, :]
                u = magnitude_key(dw)
                below, above, ni, h = _count_block(u, valid, lo_u, hi_u, shift, wide, fine, NB, BM * BN, WIDE)
                below_count += below.to(tl.int32)
                below_max = tl.maximum(below_max, tl.where(below, u, 0))
                above_min_enc = tl.maximum(above_min_enc, tl.where(above, _MAXV - u, 0))
                n_in += ni
                hist += h
                t += 1
            n_below = tl.sum(below_count, axis=None)
            max_below = tl.max(below_max, axis=None)
            min_above_enc = tl.max(above_min_enc, axis=None)
        if WIDE != 0:
            # per-program coarse counts (all zero when the range was narrow: counted directly)
            cidx = tl.arange(0, 256)
            tl.atomic_add(fine + (1 << NB) + cidx, hist, mask=hist > 0, sem="relaxed")
        tl.atomic_add(counters + 1, n_below.to(tl.int64), sem="relaxed")
        tl.atomic_add(counters + 2, n_in.to(tl.int64), sem="relaxed")
        tl.atomic_max(counters + 3, max_below.to(tl.int64), sem="relaxed")
        tl.atomic_max(counters + 4, min_above_enc.to(tl.int64), sem="relaxed")
        # The last program of this group finalises (all others' atomics are ordered before its ticket).
        tl.debug_barrier()
        ticket = tl.atomic_add(counters, 1, sem="acq_rel")
        if ticket == nprog - 1:
            c_below = tl.atomic_add(counters + 1, 0, sem="acq_rel")
            c_in = tl.atomic_add(counters + 2, 0, sem="acq_rel")
            if SAMPLE:
                # Pilot: bracket the sample quantile by ±PILOT_Z binomial standard deviations.
                lo, hi, w, s = _quantile_ranks(sparsity_ptr, n_sample)
                sd = tl.sqrt((n_sample.to(tl.float64) * s * (1.0 - s)).to(tl.float32))
                margin = tl.ceil(pilot_z * sd).to(tl.int64) + 2
                ra = lo - margin
                rb = hi + margin
                ba = _find_bin(fine, tl.maximum(ra, 0), 1 << (NB - 8))
                bb = _find_bin(fine, tl.minimum(rb, n_sample - 1), 1 << (NB - 8))
                sh64 = shift.to(tl.int64)
                # A margin past the sample's extremes opens the bracket to the smallest / largest key.
                new_lo = tl.where(ra < 0, 0, lo_u.to(tl.int64) + (ba << sh64))
                new_hi = tl.where(rb >= n_sample, _MAXV, tl.minimum(lo_u.to(tl.int64) + ((bb + 1) << sh64) - 1, _MAXV))
                new_flags = tl.zeros_like(new_lo) + _F_INIT
            else:
                lo, hi, w, s = _quantile_ranks(sparsity_ptr, numel)
                all_max_below = tl.atomic_add(counters + 3, 0, sem="acq_rel")
                all_min_above = _MAXV - tl.atomic_add(counters + 4, 0, sem="acq_rel")
                lo_u64 = lo_u.to(tl.int64)
                hi_u64 = hi_u.to(tl.int64)
                sh64 = shift.to(tl.int64)
                k_lo, v_lo, s_lo, e_lo, side_lo = _locate(
                    lo, c_below, c_in, all_max_below, all_min_above, lo_u64, hi_u64, sh64, fine, 1 << (NB - 8)
                )
                k_hi, v_hi, s_hi, e_hi, side_hi = _locate(
                    hi, c_below, c_in, all_max_below, all_min_above, lo_u64, hi_u64, sh64, fine, 1 << (NB - 8)
                )
                # Statistics found by an earlier pass stay as they are.
                prev_lo = (flags & _F_KNOWN_LO) != 0
                prev_hi = (flags & _F_KNOWN_HI) != 0
                v_lo = tl.where(prev_lo, tl.load(state + 4, cache_modifier=".cg"), v_lo)
                v_hi = tl.where(prev_hi, tl.load(state + 5, cache_modifier=".cg"), v_hi)
                k_lo = prev_lo | k_lo
                k_hi = prev_hi | k_hi
                big = 1 << 40
                new_lo = tl.minimum(tl.where(k_lo, big, s_lo), tl.where(k_hi, big, s_hi))
                new_hi = tl.maximum(tl.where(k_lo, -1, e_lo), tl.where(k_hi, -1, e_hi))
                side = ((~k_lo) & side_lo) | ((~k_hi) & side_hi)
                # hi = lo + 1: if the two ranks sit in different regions, no key lies strictly between
                # them, so the next pass counts the (empty) gap and reads v_lo as the largest key
                # below it and v_hi as the smallest key above it.
                split = (~k_lo) & (~k_hi) & (s_lo != s_hi)
                new_lo = tl.where(split, e_lo + 1, new_lo)
                new_hi = tl.where(split, s_hi - 1, new_hi)
                side = side & (~split)
                is_done = k_lo & k_hi
                new_lo = tl.where(is_done, 0, new_lo)
                new_hi = tl.where(is_done, 0, new_hi)
                new_flags = (
                    _F_INIT
                    + tl.where(is_done, _F_DONE, 0)
                    + tl.where(side, _F_WIDE, 0)
                    + tl.where(k_lo, _F_KNOWN_LO, 0)
                    + tl.where(k_hi, _F_KNOWN_HI, 0)
                )
                tl.store(state + 4, v_lo)
                tl.store(state + 5, v_hi)
                t_val = lerp(key_to_float(v_lo), key_to_float(v_hi), w)
                tl.store(thresholds_ptr + g, t_val, mask=is_done)
            tl.store(state + 0, new_lo)
            tl.store(state + 1, new_hi)
            tl.store(state + 2, _shift_for(tl.maximum(new_hi - new_lo, 0), NB_NEXT))
            tl.store(state + 3, new_flags.to(tl.int64))


# ----------------------------------------------------------------------------------------------
# snella column statistics (forward) and Σ_i α·G·P column sums (backward)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _column_pass_kernel(
    gs_ptr, a_ptr, b_ptr, coeff_ptr, alpha_ptr, beta_ptr, gamma_ptr, stat_ptr, thr_ptr, sparsity_ptr,
    part_ptr, out_ptr, counter_ptr,
    m_g, n, rows_per_split, n_split,
    R: tl.constexpr, PIECES: tl.constexpr, MODE: tl.constexpr, SPARSIFY: tl.constexpr,
    WHAT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """WHAT 0: per (group, column) max and sum-exp of D/γ over the rows. WHAT 1: Σ_i α·Gd·P.

    Rows are split over programs; each writes a partial, the last program of a column block
    merges the partials in split order (deterministic).
    """
    ct = tl.program_id(0)
    sp = tl.program_id(1)
    g = tl.program_id(2)
    n_ct = tl.num_programs(0)
    cols = ct * BN + tl.arange(0, BN)
    cmask = cols < n
    gamma = tl.load(gamma_ptr)
    r0 = sp * rows_per_split
    r1 = tl.minimum(r0 + rows_per_split, m_g)
    if WHAT == 0:
        mx = tl.full([BN], float("-inf"), tl.float32)
        se = tl.zeros([BN], dtype=tl.float32)
    else:
        acc = tl.zeros([BN], dtype=tl.float32)
        alpha = tl.load(alpha_ptr)
        beta = tl.load(beta_ptr)
        if SPARSIFY:
            t = tl.load(thr_ptr + g)
            zero = tl.load(sparsity_ptr) == 0
        else:
            t = 0.0
            zero = False
    i0 = r0
    while i0 < r1:
        lrow = i0 + tl.arange(0, BM)
        rmask = lrow < r1
        rows = g * m_g + lrow  # int32: factor loads; m×n offsets widen to int64
        valid = rmask[:, None] & cmask[None, :]
        D, dists, invs = _regen(a_ptr, b_ptr, coeff_ptr, rows[:, None], cols[None, :], rmask[:, None],
                                cmask[None, :], n, R, PIECES, 1)  # fmt: skip
        if WHAT == 0:
            z = tl.where(valid, D / gamma, float("-inf"))
            new_mx = tl.maximum(mx, tl.max(z, axis=0))
            scale = tl.where(mx == float("-inf"), 0.0, tl.exp(mx - new_mx))
            e = tl.where(valid, tl.exp(z - new_mx[None, :]), 0.0)
            se = se * scale + tl.sum(e, axis=0)
            mx = new_mx
        else:
            P, z = _snella_softmax(D, gamma, stat_ptr, g, cols[None, :], cmask[None, :], n)
            dw = D + alpha * P + beta
            gv = tl.load(gs_ptr + rows[:, None].to(tl.int64) * n + cols[None, :], mask=valid, other=0.0).to(tl.float32)
            gd = _sparsify_grad(gv, dw, t, zero, MODE, SPARSIFY)
            acc += tl.sum(tl.where(valid, alpha * gd * P, 0.0), axis=0)
        i0 += BM
    part = part_ptr + ((g * n_split + sp) * 2) * n
    if WHAT == 0:
        tl.store(part + cols, mx, mask=cmask)
        tl.store(part + n + cols, se, mask=cmask)
    else:
        tl.store(part + cols, acc, mask=cmask)
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr + g * n_ct + ct, 1, sem="acq_rel")
    if ticket == n_split - 1:
        if WHAT == 0:
            big = tl.full([BN], float("-inf"), tl.float32)
            s = 0
            while s < n_split:
                p = part_ptr + ((g * n_split + s) * 2) * n
                big = tl.maximum(big, tl.load(p + cols, mask=cmask, other=0.0, cache_modifier=".cg"))
                s += 1
            tot = tl.zeros([BN], dtype=tl.float32)
            s = 0
            while s < n_split:
                p = part_ptr + ((g * n_split + s) * 2) * n
                m_s = tl.load(p + cols, mask=cmask, other=0.0, cache_modifier=".cg")
                e_s = tl.load(p + n + cols, mask=cmask, other=0.0, cache_modifier=".cg")
                tot += tl.where(m_s == float("-inf"), 0.0, e_s * tl.exp(m_s - big))
                s += 1
            tl.store(out_ptr + (g * 2) * n + cols, big, mask=cmask)
            tl.store(out_ptr + (g * 2 + 1) * n + cols, tot, mask=cmask)
        else:
            tot = tl.zeros([BN], dtype=tl.float32)
            s = 0
            while s < n_split:
                p = part_ptr + ((g * n_split + s) * 2) * n
                tot += tl.load(p + cols, mask=cmask, other=0.0, cache_modifier=".cg")
                s += 1
            tl.store(out_ptr + g * n + cols, tot, mask=cmask)


# ----------------------------------------------------------------------------------------------
# W_eff = W0 + S (forward, and backward when no factor gradient is needed); ΔW alone for merge
# ----------------------------------------------------------------------------------------------
@triton.jit
def _weff_kernel(
    w0_ptr, out_ptr, a_ptr, b_ptr, coeff_ptr, alpha_ptr, beta_ptr, gamma_ptr, stat_ptr, thr_ptr, sparsity_ptr,
    m_g, n, n_col_tiles,
    R: tl.constexpr, PIECES: tl.constexpr, KERNEL: tl.constexpr, MODE: tl.constexpr,
    SPARSIFY: tl.constexpr, HAS_W: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    g = tl.program_id(1)
    rt = pid // n_col_tiles
    ct = pid % n_col_tiles
    lrow = rt * BM + tl.arange(0, BM)
    cols = ct * BN + tl.arange(0, BN)
    rmask = lrow < m_g
    cmask = cols < n
    rows = g * m_g + lrow  # int32: factor loads; m×n offsets widen to int64
    dw = _delta_tile(a_ptr, b_ptr, coeff_ptr, alpha_ptr, beta_ptr, gamma_ptr, stat_ptr, g, rows[:, None],
                     cols[None, :], rmask[:, None], cmask[None, :], n, R, PIECES, KERNEL)  # fmt: skip
    if SPARSIFY:
        S = _sparsify(dw, tl.load(thr_ptr + g), tl.load(sparsity_ptr) == 0, MODE, SPARSIFY)
    else:
        S = dw
    valid = rmask[:, None] & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * n + cols[None, :]
    if HAS_W:
        S = tl.load(w0_ptr + offs, mask=valid, other=0.0).to(tl.float32) + S
    tl.store(out_ptr + offs, S.to(out_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------
# Backward: sparsify chain rule + kernel derivative -> deterministic partials of dA, dB, scalars
# ----------------------------------------------------------------------------------------------
@triton.jit
def _backward_kernel(
    gs_ptr, w0_ptr, out_ptr, a_ptr, b_ptr, coeff_ptr, alpha_ptr, beta_ptr, gamma_ptr, stat_ptr, colsum_ptr,
    thr_ptr, sparsity_ptr, da_part_ptr, db_part_ptr, scal_part_ptr,
    m_g, n, rows_per_chunk, n_chunks, tiles_per_chunk,
    R: tl.constexpr, PIECES: tl.constexpr, KERNEL: tl.constexpr, MODE: tl.constexpr, SPARSIFY: tl.constexpr,
    HAS_W: tl.constexpr, WRITE_W: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One chunk of column tiles × one chunk of rows of one group.

    Per column tile, dA's partial accumulates over the row chunk in registers (one partial per row
    chunk); per row tile, dB's partial accumulates over the column chunk in place (the program owns
    those rows of its column chunk's partial, so no atomics: deterministic).

    The skinny contractions Σ_j E[i,j]·a_j and Σ_i E[i,j]·b_i run as tensor-core dots against
    zero-padded factor blocks (tf32x3 keeps fp32 accuracy for fp32 gradients; tf32 is far below
    the rounding of a bf16/fp16 G_S); an extra all-ones column (index R)
    yields the row / column sums of E in the same dot.
    """
    cc = tl.program_id(0)
    rc = tl.program_id(1)
    g = tl.program_id(2)
    n_cc = tl.num_programs(0)
    n_ct = tl.cdiv(n, BN)
    kk = tl.arange(0, RP)
    sidx = tl.arange(0, _NSCAL)
    if SPARSIFY:
        t = tl.load(thr_ptr + g)
        zero = tl.load(sparsity_ptr) == 0
    else:
        t = 0.0
        zero = False
    if KERNEL >= 2:
        alpha = tl.load(alpha_ptr)
        beta = tl.load(beta_ptr)
        gamma = tl.load(gamma_ptr)
    else:  # unused by these kernels' value (_kernel_value)
        alpha = 0.0
        beta = 0.0
        gamma = 0.0
    scal = tl.zeros([_NSCAL], dtype=tl.float32)
    r0 = rc * rows_per_chunk
    r1 = tl.minimum(r0 + rows_per_chunk, m_g)
    ct0 = cc * tiles_per_chunk
    ct1 = tl.minimum(ct0 + tiles_per_chunk, n_ct)
    ct = ct0
    while ct < ct1:
        cols = ct * BN + tl.arange(0, BN)
        cmask = cols < n
        if KERNEL == 2:
            csum = tl.load(colsum_ptr + g * n + cols, mask=cmask, other=0.0)
        # a_blk[c, j] = A[c, j] for c < R (zero elsewhere); at_ops[p][j, c]: the piece-p columns, ones at c == R.
        a_blk = tl.load(a_ptr + kk[:, None] * n + cols[None, :], mask=(kk[:, None] < R) & cmask[None, :], other=0.0)
        at_ops = ()
        if KERNEL == 0 or KERNEL == 4:
            at_ops = at_ops + (tl.trans(a_blk),)
        else:  # distance kernels: one operand per piece (rbf: PIECES = 1, one piece of all r dims)
            DP: tl.constexpr = R // PIECES
            for p in tl.static_range(PIECES):
                in_piece = (kk >= p * DP) & (kk < (p + 1) * DP)
                op = tl.where(in_piece[:, None], a_blk, 0.0)
                op = tl.where((kk[:, None] == R) & cmask[None, :], 1.0, op)
                at_ops = at_ops + (tl.trans(op),)
        acc_a = tl.zeros([RP, BN], dtype=tl.float32)
        i0 = r0
        while i0 < r1:
            lrow = i0 + tl.arange(0, BM)
            rmask = lrow < r1
            rows = g * m_g + lrow  # int32: factor loads; m×n offsets widen to int64
            valid = rmask[:, None] & cmask[None, :]
            offs = rows[:, None].to(tl.int64) * n + cols[None, :]
            gv = tl.load(gs_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            D, dists, invs = _regen(a_ptr, b_ptr, coeff_ptr, rows[:, None], cols[None, :], rmask[:, None],
                                    cmask[None, :], n, R, PIECES, KERNEL)  # fmt: skip
            P = D  # unused unless snella
            if KERNEL == 2:
                P, z = _snella_softmax(D, gamma, stat_ptr, g, cols[None, :], cmask[None, :], n)
            dw, inner = _kernel_value(D, P, alpha, beta, gamma, KERNEL)
            K = inner  # rbf: exp(−β‖b − a‖²)
            sg = inner  # sigmoid: σ(β b·a)
            gd = _sparsify_grad(gv, dw, t, zero, MODE, SPARSIFY)
            if WRITE_W:
                # Overwrites this tile of G_S (already read) with W_eff for dX = dY·W_eff.
                S = _sparsify(dw, t, zero, MODE, SPARSIFY)
                if HAS_W:
                    S = tl.load(w0_ptr + offs, mask=valid, other=0.0).to(tl.float32) + S
                tl.store(out_ptr + offs, S.to(out_ptr.dtype.element_ty), mask=valid)
            if KERNEL == 2:
                dz = tl.where(valid, P * (alpha * gd - csum[None, :]), 0.0)
                scal += tl.where(sidx == 8, tl.sum(gd * P), 0.0)
                scal += tl.where(sidx == 9, tl.sum(gd), 0.0)
                scal += tl.where(sidx == 10, tl.sum(dz * z), 0.0)
                dd = gd + dz / gamma
            elif KERNEL == 3:
                # dα = Σ G·K, dβ = −α Σ G·K·‖b−a‖², dγ = Σ G; E = −2αβ·G·K on the distance form
                gk = tl.where(valid, gd * K, 0.0)
                scal += tl.where(sidx == 8, tl.sum(gk), 0.0)
                scal += tl.where(sidx == 9, -alpha * tl.sum(gk * D), 0.0)
                scal += tl.where(sidx == 10, tl.sum(gd), 0.0)
                dd = (-2.0 * alpha * beta) * gk
            elif KERNEL == 4:
                # dα = Σ G·σ, H = α·G·σ(1−σ), dβ = Σ H·L, dγ = Σ G; E = β·H on the dot form
                h = tl.where(valid, alpha * gd * sg * (1.0 - sg), 0.0)
                scal += tl.where(sidx == 8, tl.sum(tl.where(valid, gd * sg, 0.0)), 0.0)
                scal += tl.where(sidx == 9, tl.sum(h * D), 0.0)
                scal += tl.where(sidx == 10, tl.sum(gd), 0.0)
                dd = beta * h
            else:
                dd = gd
            # b_blk[i, c] = B[i, c] for c < R
            b_blk = tl.load(b_ptr + rows[:, None] * R + kk[None, :], mask=rmask[:, None] & (kk[None, :] < R), other=0.0)
            if KERNEL == 0 or KERNEL == 4:
                db_tile = tl.dot(dd, at_ops[0], input_precision=DOT_PRECISION)
                acc_a += tl.dot(tl.trans(b_blk), dd, input_precision=DOT_PRECISION)
            else:
                db_tile = tl.zeros([BM, RP], dtype=tl.float32)
                for p in tl.static_range(PIECES):
                    if KERNEL == 3:
                        e = dd  # E = −2αβ·G·K, formed above
                    else:
                        scal += tl.where(sidx == p, tl.sum(dd * dists[p]), 0.0)
                        e = tl.load(coeff_ptr + p) * dd * invs[p]
                    in_piece = (kk >= p * DP) & (kk < (p + 1) * DP)
                    bt = tl.where(in_piece[None, :], b_blk, 0.0)
                    bt = tl.where((kk[None, :] == R) & rmask[:, None], 1.0, bt)
                    row_dot = tl.dot(e, at_ops[p], input_precision=DOT_PRECISION)  # [BM, RP], column R = Σ_j e
                    col_dot = tl.dot(tl.trans(bt), e, input_precision=DOT_PRECISION)  # [RP, BN], row R = Σ_i e
                    row_sum = tl.sum(tl.where(kk[None, :] == R, row_dot, 0.0), axis=1)
                    col_sum = tl.sum(tl.where(kk[:, None] == R, col_dot, 0.0), axis=0)
                    # dB_p[i] = b_i·Σ_j E − Σ_j E·a_j ;  dA_p[j] = a_j·Σ_i E − Σ_i E·b_i
                    db_tile += tl.where(in_piece[None, :], b_blk * row_sum[:, None] - row_dot, 0.0)
                    acc_a += tl.where(in_piece[:, None], a_blk * col_sum[None, :] - col_dot, 0.0)
            db_ptrs = db_part_ptr + cc.to(tl.int64) * (m_g * tl.num_programs(2)) * R + rows[:, None] * R + kk[None, :]
            db_mask = rmask[:, None] & (kk[None, :] < R)
            if ct > ct0:
                db_tile += tl.load(db_ptrs, mask=db_mask, other=0.0)
            tl.store(db_ptrs, db_tile, mask=db_mask)
            i0 += BM
        a_row = (g * n_chunks + rc).to(tl.int64)
        da_ptrs = da_part_ptr + (a_row * R + kk[:, None]) * n + cols[None, :]
        tl.store(da_ptrs, acc_a, mask=(kk[:, None] < R) & cmask[None, :])
        # the next column tile re-reads this program's dB partial rows
        tl.debug_barrier()
        ct += 1
    prog = (g * n_chunks + rc) * n_cc + cc
    tl.store(scal_part_ptr + prog * _NSCAL + sidx, scal)


@triton.jit
def _reduce_kernel(
    da_part_ptr, db_part_ptr, scal_part_ptr, da_ptr, db_ptr, scal_ptr, gamma_ptr,
    n_da, len_da, n_db, len_db, n_scal, nblk_a, nblk_b,
    SNELLA: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Sum the partials over their split axis in a fixed order (deterministic, no atomics)."""
    pid = tl.program_id(0)
    if pid < nblk_a:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < len_da
        acc_a = tl.zeros([BLOCK], dtype=tl.float32)
        c = n_da * 0
        while c < n_da:
            acc_a += tl.load(da_part_ptr + c.to(tl.int64) * len_da + offs, mask=mask, other=0.0)
            c += 1
        tl.store(da_ptr + offs, acc_a, mask=mask)
    elif pid < nblk_a + nblk_b:
        offs_b = (pid - nblk_a) * BLOCK + tl.arange(0, BLOCK)
        mask_b = offs_b < len_db
        acc_b = tl.zeros([BLOCK], dtype=tl.float32)
        c = n_db * 0
        while c < n_db:
            acc_b += tl.load(db_part_ptr + c.to(tl.int64) * len_db + offs_b, mask=mask_b, other=0.0)
            c += 1
        tl.store(db_ptr + offs_b, acc_b, mask=mask_b)
    else:
        sidx = tl.arange(0, _NSCAL)
        acc_s = tl.zeros([_NSCAL], dtype=tl.float32)
        c = n_scal * 0
        while c < n_scal:
            acc_s += tl.load(scal_part_ptr + c * _NSCAL + sidx)
            c += 1
        if SNELLA:
            # dγ = -Σ dZ·Z / γ
            acc_s = tl.where(sidx == 10, -acc_s / tl.load(gamma_ptr), acc_s)
        tl.store(scal_ptr + sidx, acc_s)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def _num_sms(device) -> int:
    return sm_count(device) if device.type == "cuda" else 1


# Launch option of every kernel that regenerates ΔW (selection passes, W_eff, backward, snella's
# column pass): no FP contraction, so LLVM and ptxas cannot fuse a multiply into an add differently in
# each kernel (a fusion depends on the surrounding code). The rank sums' fmas are explicit (tl.fma).
# Every kernel then rounds ΔW alike: the threshold picked by the selection, the entries the forward
# keeps and the ones the backward differentiates agree, as in the torch reference.
STRICT_FP = {"enable_fp_fusion": False}


def _tile_sizes():
    """(BM, BN, num_warps) of the elementwise tile kernels (interpreter: INTERPRET_TILE square)."""
    if interpreting():
        return INTERPRET_TILE, INTERPRET_TILE, 4
    return TILE


def _backward_tiles(rp: int, gs_dtype: torch.dtype):
    if interpreting():
        return INTERPRET_TILE, INTERPRET_TILE, 4
    if rp <= 16:
        return BACKWARD_TILE if gs_dtype != torch.float32 else BACKWARD_TILE_FP32
    if rp == 32 or (rp == 64 and gs_dtype != torch.float32):
        return BACKWARD_TILE_RP32
    return BACKWARD_TILE_WIDE


def _alloc(shape, dtype, device):
    """Output / workspace buffer that a kernel must fully write (poisoned in tests)."""
    if POISON:
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _sparsity_device(sparsity, device) -> torch.Tensor:
    """A 0-dim float64 tensor on `device` (no launch for a repeated Python float, no sync)."""
    if isinstance(sparsity, torch.Tensor):
        if sparsity.dtype == torch.float64 and sparsity.device == device and sparsity.dim() == 0:
            return sparsity.detach()
        return sparsity.detach().to(device=device, dtype=torch.float64).reshape(())
    return default_scalar(float(sparsity), device, torch.float64)


def _fallback_reason(x2, A, B, params, spec, weight=None):
    """Why this call goes to the torch implementation (None when the kernels handle it)."""
    if spec.kernel not in _KERNEL_IDS:
        return f"kernel {spec.kernel!r} has no fused Triton path"
    if A.dtype not in _FACTOR_DTYPES or B.dtype != A.dtype:
        return f"factors in {A.dtype}/{B.dtype} (the kernels take float32 factors)"
    if x2.dtype not in _ACT_DTYPES:
        return f"activations in {x2.dtype}"
    if weight is not None and weight.dtype not in _ACT_DTYPES:
        return f"weight in {weight.dtype}"
    if spec.kernel in _PIECEWISE_KERNELS and spec.pieces > _MAX_PIECES:
        return f"pieces={spec.pieces} > {_MAX_PIECES}"
    m, n = B.shape[0], A.shape[1]
    if m == 0 or n == 0:
        return "empty weight"
    if (m // spec.out_groups) * n >= 2**31 - 1:
        return "more than 2^31 entries per group"
    if spec.mode not in _MODE_IDS:
        return f"mode {spec.mode!r}"
    return None


def _warn_fallback(reason: str) -> None:
    message = f"pysnell: triton SNELL layer falls back to torch ({reason})"
    _backend._warn_once(("snell-triton-fallback", reason), message)


def _scalar(t):
    return t if t.dim() == 0 else t.reshape(())


class _Geometry:
    """Static sizes and kernel switches of one call."""

    def __init__(self, A, B, params, spec):
        self.r = A.shape[0]
        self.n = A.shape[1]
        self.m = B.shape[0]
        self.groups = spec.out_groups
        self.m_g = self.m // self.groups
        self.kernel = _KERNEL_IDS[spec.kernel]
        # rbf is one "piece" of all r dims in the distance form; linear and sigmoid have no pieces
        self.pieces = spec.pieces if spec.kernel in _PIECEWISE_KERNELS else 1
        self.mode = _MODE_IDS[spec.mode]
        # padded rank: one spare column for the all-ones operand, and dot operands need >= 16
        self.rp = max(16, next_pow2(self.r + 1))
        self.device = A.device
        self.factors = (
            A.contiguous(),
            B.contiguous(),
            params.coeffs.contiguous(),
            _scalar(params.alpha),
            _scalar(params.beta),
            _scalar(params.gamma),
        )

    @property
    def statics(self):
        return {"R": self.r, "PIECES": self.pieces}


def _column_pass(geo, what, stats, gs=None, thresholds=None, sparsity_t=None, sparsify=False):
    """snella: column softmax stats (what=0) or Σ_i α·Gd·P column sums (what=1), (G, 2|1, n)."""
    A, B, coeffs, alpha, beta, gamma = geo.factors
    BM, BN, warps = _tile_sizes()
    n_ct = cdiv(geo.n, BN)
    target = max(1, 4 * _num_sms(geo.device) // max(1, n_ct * geo.groups))
    n_split = max(1, min(cdiv(geo.m_g, BM), target))
    rows_per_split = cdiv(cdiv(geo.m_g, n_split), BM) * BM
    n_split = cdiv(geo.m_g, rows_per_split)
    part = _alloc((geo.groups, n_split, 2, geo.n), torch.float32, geo.device)
    out = _alloc((geo.groups, 2 if what == 0 else 1, geo.n), torch.float32, geo.device)
    counters = torch.zeros(geo.groups * n_ct, dtype=torch.int64, device=geo.device)
    dummy = out
    launch(_column_pass_kernel, (n_ct, n_split, geo.groups),
        gs if gs is not None else dummy, A, B, coeffs, alpha, beta, gamma,
        stats if stats is not None else dummy,
        thresholds if thresholds is not None else dummy,
        sparsity_t if sparsity_t is not None else dummy,
        part, out, counters, geo.m_g, geo.n, rows_per_split, n_split,
        MODE=geo.mode, SPARSIFY=sparsify, WHAT=what, BM=BM, BN=BN, num_warps=warps, **geo.statics, **STRICT_FP,
    )  # fmt: skip
    return out


def _select(geo, stats, sparsity_t) -> torch.Tensor:
    """Per-group quantile thresholds (G,) float32 of |ΔW|, exact, computed on the device."""
    A, B, coeffs, alpha, beta, gamma = geo.factors
    G, dev = geo.groups, geo.device
    numel = geo.m_g * geo.n
    use_pilot = numel >= PILOT_MIN_NUMEL and numel > 4 * PILOT_SAMPLES and numel < _SAMPLE_MULT
    nb = LARGE_BINS_LOG if use_pilot else SMALL_BINS_LOG
    stride = (1 << nb) + 256
    pilot_stride = (1 << PILOT_BINS_LOG) + 256
    # Each full pass narrows one key region by 2^nb (or resolves two ranks in different regions at
    # once, see the finaliser), so ceil(31 / nb) passes resolve a 31-bit key from any region; the
    # pass over the pilot's bracket comes first.
    n_full = math.ceil(31 / nb) + (1 if use_pilot else 0)
    n_pass = n_full + (1 if use_pilot else 0)
    # One memset: state (G·8 int64) + counters (n_pass·G·8 int64) + the first pass's histogram.
    head = 2 * (G * 8 + n_pass * G * 8)
    first = G * (pilot_stride if use_pilot else stride)
    ws = torch.zeros(head + first, dtype=torch.int32, device=dev)
    state = ws[: 2 * G * 8].view(torch.int64)
    counters = ws[2 * G * 8 : head].view(torch.int64).view(n_pass, G * 8)
    hist_first = ws[head:]
    hist_x = hist_first if not use_pilot else torch.empty(G * stride, dtype=torch.int32, device=dev)
    hist_y = torch.empty(G * stride, dtype=torch.int32, device=dev)
    thresholds = _alloc((G,), torch.float32, dev)
    stats_arg = stats if stats is not None else thresholds

    BM, BN, warps = _tile_sizes()
    n_ct = cdiv(geo.n, BN)
    n_tiles = cdiv(geo.m_g, BM) * n_ct
    sms = _num_sms(dev)
    grid0 = n_tiles if interpreting() else max(1, min(n_tiles, (8 * sms) // G))
    tiles_per_prog = cdiv(n_tiles, grid0)
    grid0 = cdiv(n_tiles, tiles_per_prog)
    SBLK = 64 if interpreting() else 1024
    n_sample = min(PILOT_SAMPLES, numel)

    def run_pass(pass_idx, hist, next_hist, next_numel, sample, nb_this, nb_next, grid, wide):
        zero_per_prog = cdiv(next_numel, grid) if next_numel else 0
        launch(_select_pass_kernel, (grid, G),
            A, B, coeffs, alpha, beta, gamma, stats_arg, sparsity_t,
            state, counters[pass_idx], hist, hist.numel() // G, thresholds,
            next_hist if next_hist is not None else hist, next_numel, next_numel, zero_per_prog,
            geo.m_g, geo.n, n_ct, n_tiles, tiles_per_prog,
            n_sample, _SAMPLE_MULT, max(0.0, float(PILOT_Z)),
            KERNEL=geo.kernel, SAMPLE=sample, NB=nb_this, NB_NEXT=nb_next, WIDE=wide, BM=BM, BN=BN, SBLK=SBLK,
            ZBLK=16384 if interpreting() else 1024,
            num_warps=warps, **geo.statics, **STRICT_FP,
        )  # fmt: skip

    passes = 0
    if use_pilot:
        run_pass(0, hist_first, hist_x, stride, True, PILOT_BINS_LOG, nb, cdiv(n_sample, SBLK), 1)
        passes = 1
    # Full passes: X, Y, X, ... each zeroing the next one's histogram. Without a pilot the first pass
    # covers every key (wide) and later ones a bin or an empty gap (narrow); after a pilot the first
    # pass covers the bracket (narrow) and the fallback passes decide at run time.
    bufs = [hist_x, hist_y]
    for i in range(n_full):
        nxt = bufs[(i + 1) % 2] if i + 1 < n_full else None
        wide = (2 if i > 0 else 0) if use_pilot else (1 if i == 0 else 0)
        run_pass(passes + i, bufs[i % 2], nxt, stride if nxt is not None else 0, False, nb, nb, grid0, wide)
    if KEEP_DEBUG_STATE:
        global last_selection
        last_selection = (state.view(G, 8), counters, use_pilot)
    return thresholds


def _check_supported(x2, weight, A, B, params, spec):
    reason = _fallback_reason(x2, A, B, params, spec, weight)
    if reason is not None:
        _warn_fallback(reason)
    return reason is None


def _on_device(fn):
    """Run under the tensors' CUDA device: Triton launches on the current one."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = next(a.device for a in args if isinstance(a, torch.Tensor))
        if dev.type != "cuda" or dev.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(dev):
            return fn(*args, **kwargs)

    return wrapper


@_on_device
def layer_forward(x2, weight, bias, A, B, params, spec, sparsity):
    """y2 = x2 (W0 + S)ᵀ + b (or x2 Sᵀ when weight is None) and the per-group thresholds."""
    if not _check_supported(x2, weight, A, B, params, spec):
        return _torch_layer_forward(x2, weight, bias, A, B, params, spec, sparsity)
    geo = _Geometry(A, B, params, spec)
    known_zero = ref.known_zero_sparsity(sparsity)
    sparsity_t = _sparsity_device(sparsity, geo.device)
    stats = _column_pass(geo, 0, None) if geo.kernel == 2 else None
    if known_zero:
        thresholds = torch.zeros(geo.groups, dtype=torch.float32, device=geo.device)
    else:
        thresholds = _select(geo, stats, sparsity_t)
    w_eff = _effective_weight(geo, weight, stats, thresholds, sparsity_t, not known_zero, x2.dtype)
    y2 = F.linear(x2, w_eff, None if bias is None else bias.to(x2.dtype))
    return y2, thresholds


def _effective_weight(geo, weight, stats, thresholds, sparsity_t, sparsify, dtype):
    A, B, coeffs, alpha, beta, gamma = geo.factors
    BM, BN, warps = _tile_sizes()
    out = _alloc((geo.m, geo.n), dtype, geo.device)
    n_ct = cdiv(geo.n, BN)
    w0 = weight.contiguous() if weight is not None else out
    grid = (cdiv(geo.m_g, BM) * n_ct, geo.groups)
    launch(_weff_kernel, grid,
        w0, out, A, B, coeffs, alpha, beta, gamma, stats if stats is not None else out, thresholds, sparsity_t,
        geo.m_g, geo.n, n_ct, KERNEL=geo.kernel, MODE=geo.mode, SPARSIFY=sparsify, HAS_W=weight is not None,
        BM=BM, BN=BN, num_warps=warps, **geo.statics, **STRICT_FP,
    )  # fmt: skip
    return out


def _factor_grads(geo, gs, weight, stats, thresholds, sparsity_t, sparsify, w_out):
    """(dA, dB, scal[16]) from G_S; writes W_eff into w_out when given (w_out may alias gs)."""
    A, B, coeffs, alpha, beta, gamma = geo.factors
    dev = geo.device
    BM, BN, warps = _backward_tiles(geo.rp, gs.dtype)
    # fp32 gradients keep fp32 accuracy (3 tf32 products); a 16-bit G_S is coarser than one tf32 product
    dot_precision = "tf32x3" if gs.dtype == torch.float32 else "tf32"
    colsum = None
    if geo.kernel == 2:
        colsum = _column_pass(geo, 1, stats, gs=gs, thresholds=thresholds, sparsity_t=sparsity_t, sparsify=sparsify)
    n_ct, n_rt = cdiv(geo.n, BN), cdiv(geo.m_g, BM)
    # Programs: column chunks × row chunks per group, about 2 per SM. The split balances the two
    # partials (column chunks × out × r for dB, row chunks × r × in for dA).
    per_group = 2 if interpreting() else max(1, BACKWARD_PROGRAMS_PER_SM * _num_sms(dev) // geo.groups)
    n_cc = min(n_ct, max(1, round(math.sqrt(per_group * geo.n / geo.m_g))))
    tiles_per_chunk = cdiv(n_ct, n_cc)
    n_cc = cdiv(n_ct, tiles_per_chunk)
    n_chunks = min(n_rt, max(1, cdiv(per_group, n_cc)))
    rows_per_chunk = cdiv(n_rt, n_chunks) * BM
    n_chunks = cdiv(geo.m_g, rows_per_chunk)
    da_part = _alloc((geo.groups * n_chunks, geo.r, geo.n), torch.float32, dev)
    db_part = _alloc((n_cc, geo.m, geo.r), torch.float32, dev)
    n_prog = geo.groups * n_chunks * n_cc
    scal_part = _alloc((n_prog, 16), torch.float32, dev)
    placeholder = da_part
    launch(_backward_kernel, (n_cc, n_chunks, geo.groups),
        gs, weight.contiguous() if weight is not None and w_out is not None else placeholder,  # read for W_eff only
        w_out if w_out is not None else placeholder,
        A, B, coeffs, alpha, beta, gamma,
        stats if stats is not None else placeholder, colsum if colsum is not None else placeholder,
        thresholds if thresholds is not None else placeholder, sparsity_t if sparsity_t is not None else placeholder,
        da_part, db_part, scal_part, geo.m_g, geo.n, rows_per_chunk, n_chunks, tiles_per_chunk,
        KERNEL=geo.kernel, MODE=geo.mode, SPARSIFY=sparsify, HAS_W=weight is not None, WRITE_W=w_out is not None,
        RP=geo.rp, BM=BM, BN=BN, DOT_PRECISION=dot_precision, num_warps=warps, **geo.statics, **STRICT_FP,
    )  # fmt: skip
    dA = _alloc((geo.r, geo.n), torch.float32, dev)
    dB = _alloc((geo.m, geo.r), torch.float32, dev)
    scal = _alloc((16,), torch.float32, dev)
    block = 256 if interpreting() else 1024
    nblk_a = cdiv(geo.r * geo.n, block)
    nblk_b = cdiv(geo.m * geo.r, block)
    launch(_reduce_kernel, (nblk_a + nblk_b + 1,),
        da_part, db_part, scal_part, dA, dB, scal, gamma,
        geo.groups * n_chunks, geo.r * geo.n, n_cc, geo.m * geo.r, n_prog, nblk_a, nblk_b,
        SNELLA=geo.kernel == 2, BLOCK=block, num_warps=4,
    )  # fmt: skip
    return dA, dB, scal


def _scalar_grads(geo, scal, needs):
    """(dcoeffs, dalpha, dbeta, dgamma) from the reduced scalar slots, None where not needed."""
    need_c, need_a, need_b, need_g = needs
    if geo.kernel == 0:
        return None, None, None, None
    dcoeffs = scal[: geo.pieces].clone() if need_c and geo.kernel in (1, 2) else None
    if geo.kernel == 1:
        return dcoeffs, None, None, None
    return (
        dcoeffs,
        scal[8].clone() if need_a else None,
        scal[9].clone() if need_b else None,
        scal[10].clone() if need_g else None,
    )


@_on_device
def layer_backward(dy2, x2, weight, A, B, params, spec, sparsity, thresholds, needs):
    if not _check_supported(dy2, weight, A, B, params, spec):
        return _torch_layer_backward(dy2, x2, weight, A, B, params, spec, sparsity, thresholds, needs)
    need_x, need_w, need_bias, need_A, need_B = needs[:5]
    need_scal = tuple(bool(v) for v in needs[5:9])
    geo = _Geometry(A, B, params, spec)
    known_zero = ref.known_zero_sparsity(sparsity)
    sparsify = not known_zero
    sparsity_t = _sparsity_device(sparsity, geo.device)
    need_factor = need_A or need_B or (geo.kernel != 0 and any(need_scal))
    dx = dweight = dbias = None
    grads = (None,) * 6
    if need_bias:
        dbias = dy2.sum(0)
    w_eff = None
    stats = _column_pass(geo, 0, None) if geo.kernel == 2 and (need_factor or need_x) else None
    if need_factor or need_w:
        gs = dy2.t() @ x2.to(dy2.dtype)  # G_S, the m×n buffer full fine-tuning's dW also needs
        if need_w:
            dweight = gs.to(weight.dtype)
        if need_factor:
            # W_eff overwrites G_S in place unless G_S is also the weight gradient.
            if need_x:
                w_eff = gs if dweight is None or dweight.data_ptr() != gs.data_ptr() else torch.empty_like(gs)
            dA, dB, scal = _factor_grads(geo, gs, weight, stats, thresholds, sparsity_t, sparsify, w_eff)
            grads = (dA if need_A else None, dB if need_B else None) + _scalar_grads(geo, scal, need_scal)
    if need_x:
        if w_eff is None:
            w_eff = _effective_weight(geo, weight, stats, thresholds, sparsity_t, sparsify, dy2.dtype)
        dx = dy2 @ w_eff
    return (dx, dweight, dbias) + tuple(grads)


# ----------------------------------------------------------------------------------------------
# Optional ops: the merge alone (ΔW, no sparsification) and its backward
# ----------------------------------------------------------------------------------------------
@_on_device
def merge(A, B, params, spec):
    if _fallback_reason(A, A, B, params, spec) is not None:
        return ref.merge(A, B, params, spec)
    geo = _Geometry(A, B, params, spec)
    stats = _column_pass(geo, 0, None) if geo.kernel == 2 else None
    return _effective_weight(geo, None, stats, None, None, False, A.dtype)


@_on_device
def merge_backward(G, A, B, params, spec, need):
    if _fallback_reason(A, A, B, params, spec) is not None:
        return ref.merge_backward(G, A, B, params, spec, need)
    geo = _Geometry(A, B, params, spec)
    stats = _column_pass(geo, 0, None) if geo.kernel == 2 else None
    dA, dB, scal = _factor_grads(geo, G.contiguous(), None, stats, None, None, False, None)
    return (dA, dB) + _scalar_grads(geo, scal, tuple(bool(v) for v in need))


# ----------------------------------------------------------------------------------------------
# The branch form's keep mask (reference.dropout_pack / dropout_apply): one pass each, a program per
# (rows × bytes) tile, every byte's 8 columns as the last axis of a 3-D block.
# ----------------------------------------------------------------------------------------------
DROPOUT_TILE = (16, 32, 4)  # (rows, bytes = 8 columns each, warps) per program on a GPU


@triton.jit
def _dropout_pack_kernel(keep_ptr, bits_ptr, T, n, nb, BR: tl.constexpr, BB: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    byte = tl.program_id(1) * BB + tl.arange(0, BB)
    bit = tl.arange(0, 8)
    r3 = rows.to(tl.int64)[:, None, None]
    col = byte[None, :, None] * 8 + bit[None, None, :]
    k = tl.load(keep_ptr + r3 * n + col, mask=(r3 < T) & (col < n), other=0)
    packed = tl.sum((k != 0).to(tl.int32) << bit[None, None, :], axis=2)
    r2 = rows.to(tl.int64)[:, None]
    tl.store(bits_ptr + r2 * nb + byte[None, :], packed.to(tl.uint8), mask=(r2 < T) & (byte[None, :] < nb))


@triton.jit
def _dropout_apply_kernel(
    v_ptr, bits_ptr, scale_ptr, out_ptr, T, n, nb, HAS_BITS: tl.constexpr, BR: tl.constexpr, BB: tl.constexpr
):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    byte = tl.program_id(1) * BB + tl.arange(0, BB)
    bit = tl.arange(0, 8)
    r3 = rows.to(tl.int64)[:, None, None]
    col = byte[None, :, None] * 8 + bit[None, None, :]
    inside = (r3 < T) & (col < n)
    v = tl.load(v_ptr + r3 * n + col, mask=inside, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + r3, mask=r3 < T, other=0.0)
    if HAS_BITS:
        b3 = byte[None, :, None]
        packed = tl.load(bits_ptr + r3 * nb + b3, mask=(r3 < T) & (b3 < nb), other=0).to(tl.int32)
        scale = tl.where(((packed >> bit[None, None, :]) & 1) != 0, scale, 0.0)
    tl.store(out_ptr + r3 * n + col, (v * scale).to(out_ptr.dtype.element_ty), mask=inside)


def _dropout_grid(T: int, nb: int):
    BR, BB, warps = (4, 2, 1) if interpreting() else DROPOUT_TILE
    return (cdiv(T, BR), cdiv(nb, BB)), BR, BB, warps


@_on_device
def dropout_pack(keep):
    ref.check_keep_mask(keep)
    T, n = keep.shape
    nb = ref.packed_width(n)
    bits = _alloc((T, nb), torch.uint8, keep.device)
    if T and n:
        grid, BR, BB, warps = _dropout_grid(T, nb)
        launch(
            _dropout_pack_kernel,
            grid,
            keep.contiguous().view(torch.uint8),
            bits,
            T,
            n,
            nb,
            BR=BR,
            BB=BB,
            num_warps=warps,
        )
    return bits


@_on_device
def dropout_apply(v, bits, row_scale):
    if v.dtype not in _ACT_DTYPES:
        return ref.dropout_apply(v, bits, row_scale)
    ref.check_dropout_args(v, bits, row_scale)
    T, n = v.shape
    nb = ref.packed_width(n)
    out = _alloc((T, n), v.dtype, v.device)
    if T and n:
        grid, BR, BB, warps = _dropout_grid(T, nb)
        scale = row_scale.to(torch.float32).contiguous()
        launch(_dropout_apply_kernel, grid,
            v.contiguous(), bits if bits is not None else scale, scale, out, T, n, nb,
            HAS_BITS=bits is not None, BR=BR, BB=BB, num_warps=warps,
        )  # fmt: skip
    return out


def register() -> None:
    _backend.register("snell.layer_forward", "triton", layer_forward)
    _backend.register("snell.layer_backward", "triton", layer_backward)
    _backend.register("snell.merge", "triton", merge)
    _backend.register("snell.merge_backward", "triton", merge_backward)
    _backend.register("snell.dropout_pack", "triton", dropout_pack)
    _backend.register("snell.dropout_apply", "triton", dropout_apply)


__all__ = ["layer_forward", "layer_backward", "merge", "merge_backward", "dropout_pack", "dropout_apply", "register"]
