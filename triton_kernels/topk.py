"""Triton backend for "topk.threshold" and "topk.mask_": exact selection of |x| order statistics.

Semantics are those of pysnell/ops/topk/reference.py, bit for bit (spec/TOPK.md, SNELL.md §3).

Ranking key. Every element maps to a uint31 key that orders exactly like the reference's float32
ranking key (|x| in fp32, NaN as -1): NaN -> 0, otherwise bits(|x| as fp32) + 1. Storage dtype does
not matter (fp32/bf16/fp16/fp64 are converted to fp32 right after the load).

Selection (no host synchronisation: every decision is taken on the device, by the last program
of a launch, which sees what all programs added with atomics; a ticket counter tells it that it is
the last):
1. Sample rounds (rows of >= `sample_min_numel`): 256-bin histograms of a fixed, stratified sample
   (up to 2^18 keys) narrow a key window to the target's sample rank +- ~5 standard deviations.
2. One pass over the row: the exact count of keys below the window, and the window's keys copied
   to a candidate buffer (numel/32 slots, in the packed-mask buffer's storage when there is one).
3. Histogram rounds (256 bins = 8 bits of the key per round) on the candidates narrow the window to
   the exact order statistics. If the sample missed, or the window holds more keys than the buffer,
   the same rounds read the full row instead (31 key bits: 4 rounds). Small rows start here.
   A round also finds the smallest key above its window: the upper order statistic when it is not
   in the last window.
4. The threshold is torch.quantile's linear interpolation, with reference.lerp's formula (launched
   without fp fusion: no FMA changes a bit). k-mode keeps the ties at the k-th largest key in
   flat-index order: per-chunk tie counts and their prefix sum, only when the ties are not all kept.
5. One pass zeroes x in place and writes the packed mask.
The number of launches is fixed (rounds that are not needed exit at once); the round and
compaction kernels are persistent (about 2 programs per SM, grid-stride `while` loops). Each launch
stamps the state it writes, so a program that starts late never acts on its own launch's output.
The rounds differ only in that stamp: after the first, they launch its compiled kernel directly
(_host.launch) instead of paying Triton's Python launch path again.

Extra device memory: a 2.3 KiB state block per row, the candidate buffer (numel/8 bytes, shared
with the packed mask when one is asked for; a buffer of <= 480 KiB of its own when that is larger),
and in k-mode two arrays of <= 32768 chunk counts: at most 1 MiB + numel/8 bytes in all.
"""

from __future__ import annotations

import dataclasses
import struct

import torch
import triton
import triton.language as tl

from pysnell import _backend

from ._host import KernelConstant, cdiv, interpreting, launch, next_pow2, sm_count
from ._keys import key_to_float, lerp, magnitude_key

# --------------------------------------------------------------------------------------------------
# Constants shared by the host code and the kernels.

MAXKEY = KernelConstant(0x7F800001)  # key of +inf, the largest key
NONE_ABOVE = KernelConstant(0x7FFFFFFF)  # "no key above the window": larger than every key
NBINS = KernelConstant(256)

QUANTILE = KernelConstant(0)
KMODE = KernelConstant(1)

# Phases of one row's selection (state field PHASE).
PH_INIT = KernelConstant(0)
PH_SAMPLE = KernelConstant(1)
PH_COMPACT = KernelConstant(2)
PH_FULL = KernelConstant(3)
PH_CAND = KernelConstant(4)
PH_DONE = KernelConstant(5)
TRACE_COMPACT = KernelConstant(1 << 2)  # bit PH_COMPACT of F_TRACE

# State block per row (int64 fields).
F_PHASE = KernelConstant(0)  # (number of the launch that wrote it) << 8 | phase
F_WLO = KernelConstant(1)  # key window, inclusive
F_WHI = KernelConstant(2)
F_BASE = KernelConstant(3)  # number of keys below the window (full-row ranks)
F_SHIFT = KernelConstant(4)  # histogram bin = (key - WLO) >> SHIFT
F_NCAND = KernelConstant(5)  # keys in the candidate buffer
F_ABOVE = KernelConstant(6)  # smallest key above the candidates' window (candidate rounds)
F_SROUND = KernelConstant(7)  # sample rounds done
F_NEED = KernelConstant(8)  # k-mode: ties to keep
F_PARTIAL = KernelConstant(9)  # k-mode: 1 when only some ties are kept
F_TRACE = KernelConstant(10)  # bit p set when a round of phase p was resolved (for tests)
F_TICKET = KernelConstant(16)  # counters of the running round, reset by its last program
F_BELOW = KernelConstant(17)
F_NIN = KernelConstant(18)
F_NEGABOVE = KernelConstant(19)  # max of (NONE_ABOVE - key) over keys above the window
F_TIE_TICKET = KernelConstant(20)
F_HIST = KernelConstant(32)
STATE_STRIDE = KernelConstant(32 + 256)

_HIST_ROUNDS = 4  # 31 key bits, 8 per round


@dataclasses.dataclass
class Config:
    """Launch and algorithm parameters (tests shrink them to reach every path on tiny inputs)."""

    round_block: int  # elements per tile in the histogram rounds (power of two)
    compact_block: int  # elements per tile in the compaction pass (power of two, >= 16)
    mask_block: int  # elements per tile of the masking pass, quantile mode (power of two, >= 16)
    kmode_mask_block: int  # the same in k-mode (its tie prefix sum needs more registers)
    num_warps: int
    max_programs: int | None = None  # programs of the persistent kernels; None: programs_per_sm per SM
    programs_per_sm: int = 2
    sample_min_numel: int = 1 << 21  # rows this long start with sample rounds
    sample_min: int = 1 << 14
    sample_max: int = 1 << 18
    sample_rounds: int = 2  # the second works at 1/256 of a binade: windows of ~1% of a smooth row
    sample_z: float = 5.0  # margin in standard deviations of the sample rank
    sample_pad: int = 16  # extra sample ranks on each side
    cand_dedicated_max: int = 120 * 1024  # int32 slots of a buffer of its own (480 KiB)
    max_tie_chunks: int = 1 << 15


def _default_config() -> Config:
    if interpreting():
        return Config(
            round_block=1024, compact_block=1024, mask_block=1024, kmode_mask_block=1024, num_warps=4, max_programs=2
        )
    return Config(round_block=1024, compact_block=4096, mask_block=4096, kmode_mask_block=1024, num_warps=8)


config = _default_config()


# --------------------------------------------------------------------------------------------------
# Device helpers.


@triton.jit
def _magnitude(v):
    """The reference's float32 ranking key: |v| with NaN as -1."""
    mag = tl.abs(v.to(tl.float32))
    return tl.where(mag != mag, -1.0, mag)


@triton.jit
def _tile_valid(start, n64, offs, BLOCK: tl.constexpr):
    """Lanes of the tile at `start` that lie inside the row (none for a tile past the end)."""
    return offs < tl.maximum(tl.minimum(n64 - start, BLOCK), 0).to(tl.int32)


@triton.jit
def _row_tile_keys(row, tile, n64, offs, BLOCK: tl.constexpr):
    """Keys of one tile of a row: a 64-bit tile base and 32-bit lane offsets (cheap, vectorisable)."""
    start = tile * BLOCK
    valid = offs < tl.maximum(tl.minimum(n64 - start, BLOCK), 0).to(tl.int32)
    key = magnitude_key(tl.load(row + start + offs, mask=valid, other=0))
    return key, valid


@triton.jit
def _append_candidates(st, cands, cap64, key, inside):
    """Copy the flagged keys of a tile to the candidate buffer (while it has room); the slot
    counter F_NIN ends up as the number of flagged keys, copied or not."""
    flags = inside.to(tl.int32)
    count = tl.sum(flags, 0)
    if count > 0:
        first = tl.atomic_add(st + F_NIN, count.to(tl.int64), sem="relaxed")
        room = tl.minimum(tl.maximum(cap64 - first, 0), count).to(tl.int32)
        slot = tl.cumsum(flags, 0) - 1
        tl.store(cands + first + slot, key, mask=inside & (slot < room))


@triton.jit
def _shift_for(wlo, whi):
    """Smallest shift with (whi - wlo) >> shift < 256: bit length of the span minus 8."""
    bit_length = tl.sum((((whi - wlo) >> tl.arange(0, 64).to(tl.int64)) > 0).to(tl.int64), 0)
    return tl.maximum(bit_length - 8, 0)


@triton.jit
def _none_minus(v):
    """NONE_ABOVE - v as int64: keys above a window are merged with atomic_max on this."""
    return tl.full([], NONE_ABOVE, tl.int64) - v.to(tl.int64)


@triton.jit
def _sparsity(s_ptr, s_bits, s_is_ptr):
    """The sparsity as float64: a device scalar (a layer's buffer) or a number passed by its bits."""
    by_value = tl.cast(s_bits, tl.int64).to(tl.float64, bitcast=True)
    return tl.where(tl.cast(s_is_ptr, tl.int32) != 0, tl.load(s_ptr), by_value)


@triton.jit
def _target_ranks(n, k, s_ptr, s_bits, mode, s_is_ptr):
    """(lo, hi, weight): ranks (ascending, from 0) of the order statistics and the lerp weight."""
    n64 = tl.cast(n, tl.int64)
    # reference.quantile_positions: pos = s * (N - 1) in float64; an unchecked device sparsity (NaN,
    # outside [0, 1)) gives nan_to_num(pos, 0) clamped to [0, N-1], before floor, ceil and the weight
    last_f = (n64 - 1).to(tl.float64)
    pos = _sparsity(s_ptr, s_bits, s_is_ptr) * last_f
    pos = tl.minimum(tl.where(pos >= 0.0, pos, 0.0), last_f)
    lo_f = tl.floor(pos)
    quantile = tl.cast(mode, tl.int32) == QUANTILE
    r_k = n64 - tl.cast(k, tl.int64)  # k-mode: the k-th largest
    r_lo = tl.where(quantile, lo_f.to(tl.int64), r_k)
    r_hi = tl.where(quantile, tl.ceil(pos).to(tl.int64), r_k)
    w = tl.where(quantile, (pos - lo_f).to(tl.float32), 0.0)
    # Never index outside the row, whatever the caller passed.
    r_lo = tl.minimum(tl.maximum(r_lo, 0), n64 - 1)
    r_hi = tl.minimum(tl.maximum(r_hi, r_lo), n64 - 1)
    return r_lo, r_hi, w


@triton.jit
def _finish(st, t_ptr, stamp, v_lo, v_hi, le, eq, n, k, w, mode):
    """Write the threshold (and the k-mode tie plan) once the order statistics are exact."""
    f_lo = key_to_float(v_lo)
    quantile = tl.cast(mode, tl.int32) == QUANTILE
    tl.store(t_ptr, tl.where(quantile, lerp(f_lo, key_to_float(v_hi), w), f_lo))
    # k-mode: ties to keep = k minus the keys above t; "partial" when some ties are dropped.
    need = tl.cast(k, tl.int64) - (tl.cast(n, tl.int64) - le)
    tl.store(st + F_NEED, need)
    tl.store(st + F_PARTIAL, ((need < eq) & (not quantile)).to(tl.int64))
    tl.store(st + F_PHASE, stamp | PH_DONE)


@triton.jit
def _reset_counters(st):
    offs = tl.arange(0, NBINS)
    tl.store(st + F_HIST + offs, tl.zeros([NBINS], dtype=tl.int64))
    tl.store(st + F_TICKET, 0)
    tl.store(st + F_BELOW, 0)
    tl.store(st + F_NIN, 0)
    tl.store(st + F_NEGABOVE, 0)


# --------------------------------------------------------------------------------------------------
# Round kernel: sample, full-row and candidate histogram rounds.


@triton.jit(
    do_not_specialize=[
        "k",
        "cap",
        "n_sample",
        "sample_stride",
        "tiles_full",
        "s_bits",
        "launch",
        "mode",
        "s_is_ptr",
        "first_phase",
    ]
)
def _round_kernel(
    x_ptr,
    cand_ptr,
    state_ptr,
    t_ptr,
    s_ptr,
    s_bits,
    launch,
    mode,
    s_is_ptr,
    first_phase,
    n,
    k,
    cap,
    n_sample,
    sample_stride,
    tiles_full,
    sample_z,
    SAMPLE_ROUNDS: tl.constexpr,
    SAMPLE_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One histogram round (persistent: each program strides over the tiles of the round's source)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    g = tl.program_id(1)
    st = state_ptr + g * STATE_STRIDE
    t_ptr = t_ptr + g
    n64 = tl.cast(n, tl.int64)
    cap64 = tl.cast(cap, tl.int64)
    row = x_ptr + g.to(tl.int64) * n64
    cands = cand_ptr + g.to(tl.int64) * cap64

    # A zeroed state block means "not started": the whole key range, in FIRST_PHASE. A program
    # acts only on state written by an earlier launch: one that starts after this launch's last
    # program has already moved the state on must not join the next round's work.
    word = tl.load(st + F_PHASE)
    phase = tl.where((word >> 8) < launch, word & 0xFF, PH_DONE)
    fresh = phase == PH_INIT
    phase = tl.where(fresh, tl.cast(first_phase, tl.int64), phase)
    stamp = tl.cast(launch, tl.int64) << 8
    ncand = tl.minimum(tl.load(st + F_NCAND), cap64)
    # Tiles of this round's source; programs beyond them take no part (and no ticket).
    n_tiles = tl.where(
        phase == PH_SAMPLE,
        tl.cdiv(tl.cast(n_sample, tl.int64), BLOCK),
        tl.where(phase == PH_CAND, tl.cdiv(ncand, BLOCK), tl.cast(tiles_full, tl.int64)),
    )
    n_active = tl.minimum(n_tiles, nprog)
    active = ((phase == PH_SAMPLE) | (phase == PH_FULL) | (phase == PH_CAND)) & (pid < n_active)
    if active:
        wlo = tl.load(st + F_WLO)
        whi = tl.where(fresh, MAXKEY, tl.load(st + F_WHI))
        shift = tl.where(fresh, 23, tl.load(st + F_SHIFT))  # bit length of MAXKEY - 8
        above = tl.where(fresh, NONE_ABOVE, tl.load(st + F_ABOVE))
        wlo32 = wlo.to(tl.int32)
        whi32 = whi.to(tl.int32)
        shift32 = shift.to(tl.int32)
        offs = tl.arange(0, BLOCK)
        hist = tl.zeros([NBINS], dtype=tl.int32)
        below = tl.zeros([BLOCK], dtype=tl.int32)
        min_above = tl.full([BLOCK], NONE_ABOVE, dtype=tl.int32)
        tile = pid.to(tl.int64)
        while tile < n_tiles:  # a while loop: runtime bounds that the interpreter accepts too
            if phase == PH_FULL:
                key, valid = _row_tile_keys(row, tile, n64, offs, BLOCK)
            else:
                start = tile * BLOCK
                if phase == PH_CAND:
                    valid = offs < tl.minimum(ncand - start, BLOCK).to(tl.int32)
                    key = tl.load(cands + start + offs, mask=valid, other=0)
                else:
                    # Stratified sample: one pseudo-random position in each stride of the row.
                    idx = start + offs
                    valid = idx < tl.cast(n_sample, tl.int64)
                    stride = tl.cast(sample_stride, tl.int64)
                    pos = idx * stride + ((idx * 2654435761) & 0xFFFFFFFF) % stride
                    key = magnitude_key(tl.load(row + pos, mask=valid, other=0))
            inside = valid & (key >= wlo32) & (key <= whi32)
            bins = tl.where(inside, (key - wlo32) >> shift32, 0)
            hist += tl.histogram(bins, NBINS, mask=inside)
            below += (valid & (key < wlo32)).to(tl.int32)
            min_above = tl.minimum(min_above, tl.where(valid & (key > whi32), key, NONE_ABOVE))
            if phase == PH_FULL:
                _append_candidates(st, cands, cap64, key, inside)
            tile += nprog
        bins_offs = tl.arange(0, NBINS)
        tl.atomic_add(st + F_HIST + bins_offs, hist.to(tl.int64), mask=hist > 0, sem="relaxed")
        n_below = tl.sum(below.to(tl.int64), 0)  # per lane int32, per program int64
        if n_below > 0:
            tl.atomic_add(st + F_BELOW, n_below, sem="relaxed")
        lowest_above = tl.min(min_above, 0)
        if lowest_above < NONE_ABOVE:
            tl.atomic_max(st + F_NEGABOVE, _none_minus(lowest_above), sem="relaxed")
        # Every thread's atomics before the ticket (one thread takes it; its release then covers
        # them), and the last program's reads after it.
        tl.debug_barrier()
        ticket = tl.atomic_add(st + F_TICKET, 1)  # acq_rel
        if ticket == n_active - 1:
            # Last program of the round: every other program's atomics are visible (acq_rel).
            h = tl.load(st + F_HIST + bins_offs, volatile=True)
            n_below_all = tl.load(st + F_BELOW, volatile=True)
            n_in_full = tl.load(st + F_NIN, volatile=True)
            round_above = _none_minus(tl.load(st + F_NEGABOVE, volatile=True))
            _reset_counters(st)
            tl.store(st + F_TRACE, tl.load(st + F_TRACE) | (1 << phase))
            cum = tl.cumsum(h, 0)
            total = tl.sum(h, 0)
            r_lo, r_hi, w = _target_ranks(n, k, s_ptr, s_bits, mode, s_is_ptr)
            if phase == PH_SAMPLE:
                _resolve_sample(
                    st,
                    stamp,
                    h,
                    cum,
                    total,
                    bins_offs,
                    n_below_all,
                    r_lo,
                    r_hi,
                    n64,
                    cap64,
                    tl.cast(n_sample, tl.int64),
                    sample_z,
                    wlo,
                    whi,
                    shift,
                    SAMPLE_ROUNDS,
                    SAMPLE_PAD,
                )
            else:
                base = tl.load(st + F_BASE)
                rel = r_lo - base
                d = tl.minimum(tl.sum((cum <= rel).to(tl.int64), 0), NBINS - 1)
                h_d = tl.sum(tl.where(bins_offs == d, h, 0), 0)
                cum_d = tl.sum(tl.where(bins_offs == d, cum, 0), 0)
                if shift == 0:
                    # Bins are single keys: the order statistics are exact now.
                    v_lo = wlo + d
                    le = base + cum_d
                    nxt = tl.min(tl.where((bins_offs > d) & (h > 0), bins_offs, NBINS), 0)
                    next_key = tl.where(nxt < NBINS, wlo + nxt, tl.minimum(round_above, above))
                    v_hi = tl.where(r_hi < le, v_lo, next_key)
                    _finish(st, t_ptr, stamp, v_lo, v_hi, le, h_d, n, k, w, mode)
                else:
                    new_wlo = wlo + (d << shift)
                    new_whi = tl.minimum(new_wlo + (1 << shift) - 1, whi)
                    tl.store(st + F_WLO, new_wlo)
                    tl.store(st + F_WHI, new_whi)
                    tl.store(st + F_SHIFT, _shift_for(new_wlo, new_whi))
                    tl.store(st + F_BASE, base + cum_d - h_d)
                    tl.store(st + F_PHASE, stamp | phase)
                    if phase == PH_FULL:
                        if n_in_full <= cap64:
                            # This round's window fit the buffer: later rounds read candidates.
                            tl.store(st + F_PHASE, stamp | PH_CAND)
                            tl.store(st + F_NCAND, n_in_full)
                            tl.store(st + F_ABOVE, round_above)
                        else:
                            tl.store(st + F_ABOVE, NONE_ABOVE.value)
                    else:
                        tl.store(st + F_ABOVE, above)


@triton.jit
def _resolve_sample(
    st,
    stamp,
    h,
    cum,
    total,
    bins_offs,
    n_below,
    r_lo,
    r_hi,
    n64,
    cap64,
    n_sample,
    sample_z,
    wlo,
    whi,
    shift,
    SAMPLE_ROUNDS: tl.constexpr,
    SAMPLE_PAD: tl.constexpr,
):
    """Narrow the window to the sample ranks around the target, with a margin; speed only."""
    n_f = n64.to(tl.float32)
    s_f = n_sample.to(tl.float32)
    p = r_lo.to(tl.float32) / n_f
    sigma = tl.sqrt(s_f * p * (1.0 - p))
    # Margin: z standard deviations, but never a window expected to overflow half the buffer.
    margin = tl.minimum(sample_z * sigma + SAMPLE_PAD, cap64.to(tl.float32) * s_f / (4.0 * n_f) + SAMPLE_PAD)
    lo_rank = tl.floor(r_lo.to(tl.float32) * s_f / n_f - margin).to(tl.int64)
    hi_rank = tl.ceil(r_hi.to(tl.float32) * s_f / n_f + margin).to(tl.int64)
    rel_lo = lo_rank - n_below
    rel_hi = hi_rank - n_below
    keep_lo = rel_lo < 0
    keep_hi = rel_hi >= total
    d_lo = tl.minimum(tl.sum((cum <= rel_lo).to(tl.int64), 0), NBINS - 1)
    d_hi = tl.maximum(tl.minimum(tl.sum((cum <= rel_hi).to(tl.int64), 0), NBINS - 1), d_lo)
    new_wlo = tl.where(keep_lo, wlo, wlo + (d_lo << shift))
    new_whi = tl.where(keep_hi, whi, tl.minimum(wlo + ((d_hi + 1) << shift) - 1, whi))
    count_hi = tl.where(keep_hi, total, tl.sum(tl.where(bins_offs == d_hi, cum, 0), 0))
    count_lo = tl.where(keep_lo, 0, tl.sum(tl.where(bins_offs == d_lo, cum - h, 0), 0))
    in_window = count_hi - count_lo
    rounds = tl.load(st + F_SROUND) + 1
    expected_full = in_window.to(tl.float32) * n_f / s_f
    good = (in_window <= 2 * (hi_rank - lo_rank + 1)) & (2.0 * expected_full <= cap64.to(tl.float32))
    unchanged = (new_wlo == wlo) & (new_whi == whi)
    done = good | unchanged | (shift == 0) | (rounds >= SAMPLE_ROUNDS)
    tl.store(st + F_WLO, new_wlo)
    tl.store(st + F_WHI, new_whi)
    tl.store(st + F_SHIFT, _shift_for(new_wlo, new_whi))
    tl.store(st + F_SROUND, rounds)
    tl.store(st + F_ABOVE, NONE_ABOVE.value)
    tl.store(st + F_PHASE, stamp | tl.where(done, PH_COMPACT, PH_SAMPLE))


# --------------------------------------------------------------------------------------------------
# Compaction pass: exact count below the sample's window, the window's keys to the buffer.


@triton.jit(do_not_specialize=["k", "cap", "compact_tiles", "s_bits", "launch", "mode", "s_is_ptr"])
def _compact_kernel(
    x_ptr,
    cand_ptr,
    state_ptr,
    s_ptr,
    s_bits,
    launch,
    mode,
    s_is_ptr,
    n,
    k,
    cap,
    compact_tiles,
    BLOCK: tl.constexpr,
):
    """One pass over each row: count the keys below the sample's window exactly and copy the keys
    inside it to the candidate buffer. Tiles are [BLOCK/16, 16]: the slot prefix sum then runs along
    rows of 16 plus one short scan of row totals, far cheaper than a 1-D scan of BLOCK lanes."""
    tl.static_assert(BLOCK < 65536)  # two per-tile counts share one int32 (16 bits each)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    g = tl.program_id(1)
    st = state_ptr + g * STATE_STRIDE
    n64 = tl.cast(n, tl.int64)
    cap64 = tl.cast(cap, tl.int64)
    row = x_ptr + g.to(tl.int64) * n64
    cands = cand_ptr + g.to(tl.int64) * cap64
    word = tl.load(st + F_PHASE)
    phase = tl.where((word >> 8) < launch, word & 0xFF, PH_DONE)
    stamp = tl.cast(launch, tl.int64) << 8
    n_tiles = tl.cast(compact_tiles, tl.int64)
    n_active = tl.minimum(n_tiles, nprog)
    if (phase == PH_COMPACT) & (pid < n_active):
        wlo = tl.load(st + F_WLO)
        whi = tl.load(st + F_WHI)
        wlo32 = wlo.to(tl.int32)
        span = (whi - wlo).to(tl.int32).to(tl.uint32, bitcast=True)
        ROWS: tl.constexpr = BLOCK // 16
        offs = tl.arange(0, ROWS)[:, None] * 16 + tl.arange(0, 16)[None, :]
        n_below = tl.zeros([], dtype=tl.int64)
        # Persistent: the program strides over the tiles, and the next tile's load is issued
        # before this tile's slot atomic, so memory stays busy while the atomic returns.
        tile = pid.to(tl.int64)
        valid_next = _tile_valid(tile * BLOCK, n64, offs, BLOCK)
        v_next = tl.load(row + tile * BLOCK + offs, mask=valid_next, other=0)
        while tile < n_tiles:
            v = v_next
            valid = valid_next
            tile += nprog
            valid_next = _tile_valid(tile * BLOCK, n64, offs, BLOCK)  # no lanes past the end
            v_next = tl.load(row + tile * BLOCK + offs, mask=valid_next, other=0)
            key = magnitude_key(v)
            # wlo <= key <= whi as one unsigned compare
            inside = valid & ((key - wlo32).to(tl.uint32, bitcast=True) <= span)
            flags = inside.to(tl.int32)
            # Both counts in one reduction: inside in the low 16 bits, below in the high ones.
            packed_rows = tl.sum(flags + ((valid & (key < wlo32)).to(tl.int32) << 16), 1)
            totals = tl.sum(packed_rows, 0)
            n_below += (totals >> 16).to(tl.int64)
            count = totals & 0xFFFF
            if count > 0:
                first = tl.atomic_add(st + F_NIN, count.to(tl.int64), sem="relaxed")
                room = tl.minimum(tl.maximum(cap64 - first, 0), count).to(tl.int32)
                row_counts = packed_rows & 0xFFFF
                slot = (tl.cumsum(row_counts, 0) - row_counts)[:, None] + tl.cumsum(flags, 1) - 1
                tl.store(cands + first + slot, key, mask=inside & (slot < room))
        if n_below > 0:
            tl.atomic_add(st + F_BELOW, n_below, sem="relaxed")
        # Every thread's atomics before the ticket (one thread takes it; its release then covers
        # them), and the last program's reads after it.
        tl.debug_barrier()
        ticket = tl.atomic_add(st + F_TICKET, 1)  # acq_rel
        if ticket == n_active - 1:
            nb = tl.load(st + F_BELOW, volatile=True)
            nin = tl.load(st + F_NIN, volatile=True)
            _reset_counters(st)
            tl.store(st + F_TRACE, tl.load(st + F_TRACE) | TRACE_COMPACT)
            r_lo, r_hi, w = _target_ranks(n, k, s_ptr, s_bits, mode, s_is_ptr)
            # Both order statistics inside: refine on the candidates (when they all fit). Otherwise
            # search the full row: below the window, above it, or (overflow) the window itself.
            # (hi just above the window is rare; the full-row rounds find it.)
            lo_inside = (r_lo >= nb) & (r_lo < nb + nin)
            use_cand = lo_inside & (r_hi < nb + nin) & (nin <= cap64)
            new_wlo = tl.where(lo_inside, wlo, tl.where(r_lo < nb, 0, whi + 1))
            new_whi = tl.where(lo_inside, whi, tl.where(r_lo < nb, wlo - 1, MAXKEY))
            new_base = tl.where(lo_inside, nb, tl.where(r_lo < nb, 0, nb + nin))
            tl.store(st + F_WLO, new_wlo)
            tl.store(st + F_WHI, new_whi)
            tl.store(st + F_SHIFT, _shift_for(new_wlo, new_whi))
            tl.store(st + F_BASE, new_base)
            tl.store(st + F_NCAND, tl.where(use_cand, nin, 0))
            tl.store(st + F_ABOVE, NONE_ABOVE.value)
            tl.store(st + F_PHASE, stamp | tl.where(use_cand, PH_CAND, PH_FULL))


# --------------------------------------------------------------------------------------------------
# k-mode tie counts per chunk, and the masking pass.


@triton.jit
def _row_tile(x_ptr, tile, n64, offs, BLOCK: tl.constexpr):
    """Pointers, validity and values of one tile of the flat tensor (64-bit base, 32-bit lanes)."""
    start = tile * BLOCK
    ptrs = x_ptr + start + offs
    valid = offs < tl.maximum(tl.minimum(n64 - start, BLOCK), 0).to(tl.int32)
    return ptrs, valid, tl.load(ptrs, mask=valid, other=0)


@triton.jit(do_not_specialize=["n_chunks"])
def _tie_count_kernel(x_ptr, state_ptr, t_ptr, counts_ptr, n, n_chunks, BLOCK: tl.constexpr, TPC: tl.constexpr):
    """k-mode, only when some ties at the threshold are dropped: ties per chunk of TPC tiles."""
    chunk = tl.program_id(0)
    partial = tl.load(state_ptr + F_PARTIAL)
    n64 = tl.cast(n, tl.int64)
    count = tl.zeros([], dtype=tl.int64)
    if partial != 0:
        t = tl.load(t_ptr)
        offs = tl.arange(0, BLOCK // 16)[:, None] * 16 + tl.arange(0, 16)[None, :]
        for j in tl.static_range(TPC):
            _, valid, v = _row_tile(x_ptr, chunk.to(tl.int64) * TPC + j, n64, offs, BLOCK)
            count += tl.sum(tl.sum((valid & (_magnitude(v) == t)).to(tl.int32), 1), 0).to(tl.int64)
    tl.store(counts_ptr + chunk, count)


@triton.jit(do_not_specialize=["n_chunks", "s_bits", "s_is_ptr"])
def _mask_kernel(
    x_ptr,
    packed_ptr,
    state_ptr,
    t_ptr,
    s_ptr,
    s_bits,
    s_is_ptr,
    tie_counts_ptr,
    tie_incl_ptr,
    n,
    n_chunks,
    MODE: tl.constexpr,
    WANT_PACKED: tl.constexpr,
    BLOCK: tl.constexpr,
    TPC: tl.constexpr,
):
    """Zero x in place where the entry is not kept; write the packed mask when asked. Tiles are
    [BLOCK/16, 16] (a cheap tie prefix sum, as in the compaction pass)."""
    # Last chunk first: the end of x is what the compaction pass left in L2.
    chunk = tl.cast(n_chunks, tl.int64) - 1 - tl.program_id(0)
    n64 = tl.cast(n, tl.int64)
    t = tl.load(t_ptr)
    offs = tl.arange(0, BLOCK // 16)[:, None] * 16 + tl.arange(0, 16)[None, :]
    if MODE == QUANTILE:
        # Sparsity 0 keeps everything, NaN (ranked -1) included: compare against -inf then.
        t = tl.where(_sparsity(s_ptr, s_bits, s_is_ptr) == 0.0, float("-inf"), t)
        need = tl.zeros([], dtype=tl.int64)
        partial = False
        running = tl.zeros([], dtype=tl.int64)
    else:
        need = tl.load(state_ptr + F_NEED)
        partial = tl.load(state_ptr + F_PARTIAL) != 0
        # Ties in earlier chunks (flat-index order): inclusive prefix minus this chunk's count.
        running = tl.zeros([], dtype=tl.int64)
        if partial:
            running = tl.load(tie_incl_ptr + chunk) - tl.load(tie_counts_ptr + chunk)
    for j in tl.static_range(TPC):
        tile = chunk * TPC + j
        ptrs, valid, v = _row_tile(x_ptr, tile, n64, offs, BLOCK)
        mag = _magnitude(v)
        keep = mag > t
        if MODE == KMODE:
            tie = valid & (mag == t)
            if partial:
                # Rank of each tie in flat order: earlier chunks, earlier rows, earlier lanes.
                ties = tie.to(tl.int32)
                row_ties = tl.sum(ties, 1)
                rank = running + (tl.cumsum(row_ties, 0) - row_ties)[:, None] + (tl.cumsum(ties, 1) - 1)
                keep = keep | (tie & (rank < need))
                running += tl.sum(row_ties, 0)
            else:
                keep = keep | tie
        keep = keep & valid
        tl.store(ptrs, tl.where(keep, v, tl.zeros_like(v)), mask=valid)
        if WANT_PACKED:
            # Bit i of byte j is element 8j + i (reference.pack_mask); the tail bits stay 0.
            bits = tl.reshape(keep.to(tl.int32), [BLOCK // 8, 8]) << tl.arange(0, 8)[None, :]
            byte = tl.sum(bits, 1).to(tl.uint8)
            byte_offs = tl.arange(0, BLOCK // 8)
            first_byte = tile * (BLOCK // 8)
            n_bytes = tl.minimum(tl.cdiv(n64, 8) - first_byte, BLOCK // 8).to(tl.int32)
            tl.store(packed_ptr + first_byte + byte_offs, byte, mask=byte_offs < n_bytes)


# --------------------------------------------------------------------------------------------------
# Host side.


def _empty(*shape, dtype, device):
    """Every buffer the kernels fill (tests poison them through this)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _sparsity_args(sparsity, device):
    """(pointer tensor or None, float64 bits): a tensor stays on the device, a number travels by value."""
    if isinstance(sparsity, torch.Tensor):
        return sparsity.detach().to(device=device, dtype=torch.float64).reshape(()), 0
    return None, struct.unpack("<q", struct.pack("<d", float(sparsity)))[0]


def _max_programs(device: torch.device, cfg: Config) -> int:
    if cfg.max_programs is not None:
        return cfg.max_programs
    if device.type != "cuda":
        return 4
    return sm_count(device) * cfg.programs_per_sm


def _sample_size(n: int, cfg: Config) -> int:
    return max(cfg.sample_min, min(cfg.sample_max, n >> 4))


def sample_positions(n: int, cfg: Config | None = None) -> torch.Tensor:
    """The row positions the sample rounds read (the kernel's formula; tests build data from it)."""
    cfg = cfg or config
    n_sample = _sample_size(n, cfg)
    stride = max(n // n_sample, 1)
    idx = torch.arange(n_sample, dtype=torch.int64)
    return idx * stride + ((idx * 2654435761) & 0xFFFFFFFF) % stride


# Tests set this to a list to receive each call's state block (phases visited: F_TRACE bits).
debug_states: list | None = None


def _select(rows: torch.Tensor, groups: int, n: int, mode: int, k: int, sparsity, t_out, cand, cfg: Config):
    """Run the selection rounds on `groups` contiguous rows of n elements; writes t_out (G,).

    Returns (state block, sparsity pointer, sparsity bits, pointer flag): the state holds the k-mode
    tie plan, and the mask kernel reads the sparsity the same way the rounds did."""
    device = rows.device
    state = torch.zeros(groups * STATE_STRIDE.value, dtype=torch.int64, device=device)
    s_tensor, s_bits = _sparsity_args(sparsity, device) if mode == QUANTILE.value else (None, 0)
    # A number travels by its bits; the pointer argument then gets a float64 view of the state: the
    # kernels load through it either way (tl.where evaluates both sides) and discard that value.
    s_ptr = s_tensor if s_tensor is not None else state.view(torch.float64)
    s_is_ptr = int(s_tensor is not None)
    cap = cand.numel() // groups
    block = cfg.round_block
    tiles_full = cdiv(n, block)
    max_programs = _max_programs(device, cfg)
    use_sample = n >= cfg.sample_min_numel
    n_sample = _sample_size(n, cfg) if use_sample else 0
    stride = max(n // n_sample, 1) if use_sample else 1
    first_phase = (PH_SAMPLE if use_sample else PH_FULL).value
    # Persistent grids: enough programs for the largest source a round may read, at most max_programs.
    programs = min(max(tiles_full, cdiv(cap, block), cdiv(n_sample, block), 1), max_programs)
    round_meta = dict(
        SAMPLE_ROUNDS=cfg.sample_rounds,
        SAMPLE_PAD=cfg.sample_pad,
        BLOCK=block,
        num_warps=cfg.num_warps,
        enable_fp_fusion=False,  # the lerp must not become an FMA
    )
    round_grid = (programs, groups)
    head = (rows, cand, state, t_out, s_ptr, s_bits)
    tail = (mode, s_is_ptr, first_phase, n, k, cap, n_sample, stride, tiles_full, cfg.sample_z)
    # Launches are numbered from 1: the state records which launch wrote it. The rounds differ in
    # that number only, so Triton's launch path runs for the first one alone (_host.launch).
    number = 1
    if use_sample:
        for _ in range(cfg.sample_rounds):
            launch(_round_kernel, round_grid, *head, number, *tail, **round_meta)
            number += 1
        compact_tiles = cdiv(n, cfg.compact_block)
        launch(
            _compact_kernel,
            (min(compact_tiles, max_programs), groups),
            rows,
            cand,
            state,
            s_ptr,
            s_bits,
            number,
            mode,
            s_is_ptr,
            n,
            k,
            cap,
            compact_tiles,
            BLOCK=cfg.compact_block,
            num_warps=cfg.num_warps,
        )
        number += 1
    for _ in range(_HIST_ROUNDS):
        launch(_round_kernel, round_grid, *head, number, *tail, **round_meta)
        number += 1
    if debug_states is not None:
        debug_states.append(state.view(groups, -1).cpu())
    return state, s_ptr, s_bits, s_is_ptr


def _cand_buffer(n_total: int, packed, cfg: Config, device) -> torch.Tensor:
    """Candidate keys: numel/32 int32 slots (in the packed mask's storage when there is one), or a
    small buffer of its own when that gives more room (small tensors)."""
    dedicated = min(cfg.cand_dedicated_max, max(n_total, 1))
    big = n_total // 32
    if big <= dedicated:
        return _empty(dedicated, dtype=torch.int32, device=device)
    if packed is not None:
        return packed[: big * 4].view(torch.int32)
    return _empty(big, dtype=torch.int32, device=device)


def topk_threshold(x2d: torch.Tensor, sparsity) -> torch.Tensor:
    """Backend op "topk.threshold": the quantile threshold of |x| for each row, float32 (G,), no sync."""
    if x2d.dim() != 2:
        raise ValueError(f"x2d must be 2-D (groups, elements), got shape {tuple(x2d.shape)}")
    groups, n = x2d.shape
    if n == 0 or groups == 0:
        return torch.zeros(groups, dtype=torch.float32, device=x2d.device)
    cfg = config
    rows = x2d.contiguous()
    t_out = _empty(groups, dtype=torch.float32, device=x2d.device)
    cand = _cand_buffer(rows.numel(), None, cfg, rows.device)
    if cand.numel() < groups:  # at least one slot per row
        cand = _empty(groups, dtype=torch.int32, device=rows.device)
    _select(rows, groups, n, QUANTILE.value, 0, sparsity, t_out, cand, cfg)
    return t_out


def topk_mask_(x: torch.Tensor, sparsity, k, want_packed: bool):
    """Backend op "topk.mask_": zero all but the largest-magnitude entries of x in place.

    Returns (x, threshold 0-dim float32, packed uint8 mask or None)."""
    n = x.numel()
    device = x.device
    n_bytes = cdiv(n, 8)
    if n == 0 or k == 0:
        # Nothing is kept: t = +inf as in the reference.
        x.zero_()
        t = torch.full((), float("inf"), dtype=torch.float32, device=device)
        packed = torch.zeros(n_bytes, dtype=torch.uint8, device=device) if want_packed else None
        return x, t, packed
    cfg = config
    work = x if x.is_contiguous() else x.contiguous()
    flat = work.view(-1)
    packed = _empty(n_bytes, dtype=torch.uint8, device=device) if want_packed else None
    cand = _cand_buffer(n, packed, cfg, device)
    t_out = _empty((), dtype=torch.float32, device=device)
    mode = KMODE.value if k is not None else QUANTILE.value
    k_val = int(k) if k is not None else 0
    state, s_ptr, s_bits, s_is_ptr = _select(flat, 1, n, mode, k_val, sparsity, t_out, cand, cfg)
    del cand  # its storage may be the packed mask, written below
    block = cfg.kmode_mask_block if mode == KMODE.value else cfg.mask_block
    warps = max(1, min(cfg.num_warps, block // 256))  # 8+ elements per thread
    tiles = cdiv(n, block)
    if mode == KMODE.value:
        tpc = next_pow2(cdiv(tiles, cfg.max_tie_chunks))
        n_chunks = cdiv(tiles, tpc)
        tie_counts = _empty(n_chunks, dtype=torch.int64, device=device)
        launch(
            _tie_count_kernel,
            (n_chunks,),
            flat,
            state,
            t_out,
            tie_counts,
            n,
            n_chunks,
            BLOCK=block,
            TPC=tpc,
            num_warps=warps,
        )
        tie_incl = torch.cumsum(tie_counts, 0)
    else:
        tpc, n_chunks = 1, tiles
        tie_counts = tie_incl = state
    launch(
        _mask_kernel,
        (n_chunks,),
        flat,
        packed if packed is not None else state,
        state,
        t_out,
        s_ptr,
        s_bits,
        s_is_ptr,
        tie_counts,
        tie_incl,
        n,
        n_chunks,
        MODE=mode,
        WANT_PACKED=want_packed,
        BLOCK=block,
        TPC=tpc,
        num_warps=warps,
    )
    if work is not x:
        x.copy_(work)
    return x, t_out, packed


def register() -> None:
    _backend.register("topk.threshold", "triton", topk_threshold)
    _backend.register("topk.mask_", "triton", topk_mask_)
