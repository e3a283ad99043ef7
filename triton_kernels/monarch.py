"""Triton kernels for the Monarch multiply (spec/MONARCH.md), forward and backward.

Notation: x (T, n_in ≤ k·p), w1 (k, q, p), w2 (l, s, r), l·r = k·q, QL = q // l, y (T, m ≤ l·s).
With q % l == 0, intermediate column ri = ki·QL + rr of output block li is row qj = rr·l + li of
stage-1 block ki, so block li's intermediate is `w1.view(k, QL, l, p)[:, :, li, :]` applied to x,
already in w2's column order. Every kernel below walks those strided views with pointer
arithmetic: no permutation copies, no padded copies (missing features are masked to zero,
extra outputs are not written).

Kernels (each a 2-D `tl.dot` per block, fp32 accumulation; the 16-bit intermediate is rounded to
the input dtype between the stages, as the reference's bmm does):
- `_two_stage_kernel`: one program per (token tile, output block) computes its slice of the
  intermediate on chip and multiplies it by the second factor at once. Forward (block li:
  x -> w1 rows -> w2[li] -> y columns si·l + li with the bias, or block order: see STORES) and,
  mirrored, dX (block ki: dy of block li -> w2[li] -> w1[ki] -> dx columns ki·p + pp). One
  launch each. A bias is added to the product rounded to the output dtype (the reference's y + b).
- `_two_stage_wgrad_kernel`: dW2 and dW1 as reductions over tokens, recomputing the
  intermediate (dW2) or the intermediate gradient (dW1) on chip, tile by tile.
- `_gemm_kernel` / `_wgrad_kernel`: the single-stage versions for blocks too wide to keep a
  whole block row on chip (> 256), or too many blocks (> 8: every fused program re-reads the
  whole token row of the other side): the intermediate goes through memory once, in w2's
  column order (T, l·r). `plan()` says which products use which.
- `_deinterleave_kernel`: dy (columns si·l + li) into block order (li·s + si) once per
  backward, so every backward load is contiguous.
- `_interleave_kernel`: its mirror for the forward, in place. A forward program owns one output
  block, whose columns si·l + li are l apart in y: stored there directly, they are 16-bit scalar
  stores and every 32-byte sector of y is written piecewise by l programs. Instead the forward
  GEMM stores y in block order (contiguous vector stores) and one pass per row permutes it and
  adds the bias (the reference's rounding: product rounded, then + bias). STORES says when.
When q % l != 0 (e.g. MonarchLinear(1000, 1000, 4): q = 250, l = 4) an output block takes rows of
a varying run of stage-1 blocks, so every product runs split, with the permutation as an index
map over the global intermediate index f = ki·q + qj -> column (f % l)·r + f // l.
Weight gradients never use atomics: tokens are split into a fixed number of chunks, each
writes an fp32 partial, and the partials are summed in a fixed order. Shapes the kernels do not
serve (float64, factors of 2^31+ elements) run the torch implementation, logged once.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from pysnell import _backend
from pysnell.ops.monarch.function import _torch_backward, _torch_forward

from ._host import cdiv, interpreting, launch, next_pow2, sm_count

# Widest block row (columns of one output block, or of one weight-gradient tile row) that a
# fused kernel keeps on chip as an fp32 accumulator next to its operand tiles.
MAX_ONCHIP = 256
PATHS = ("auto", "fused", "split")
# How the forward writes y, whose column si·l + li interleaves the output blocks:
# "interleave": the GEMM stores block order (li·s + si, contiguous vector stores) and one in-place
# pass per row permutes it (+ bias); "scatter": the GEMM stores each element at its interleaved
# column (no extra pass, but 16-bit scalar stores l columns apart: every 32-byte sector of y is
# written piecewise by l programs); "auto": interleave where it applies (see _store_plan).
STORES = ("auto", "interleave", "scatter")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SETTINGS = {"path": ("PYSNELL_MONARCH_PATH", PATHS), "store": ("PYSNELL_MONARCH_STORE", STORES)}
_setting = {"path": "auto", "store": "auto"}


def _set(what: str, name: str) -> None:
    env, choices = _SETTINGS[what]
    if name not in choices:
        raise ValueError(f"Monarch kernel {what} ({env}) must be one of {choices}, got {name!r}")
    _setting[what] = name


@contextlib.contextmanager
def _use(what: str, name: str):
    before = _setting[what]
    _set(what, name)
    try:
        yield
    finally:
        _set(what, before)


def set_path(name: str) -> None:
    """Kernel plan, for measurements: "auto" (see plan()), "fused" (on chip wherever the block
    fits, whatever the number of blocks) or "split" (intermediate always through memory).
    The environment variable PYSNELL_MONARCH_PATH sets the initial value."""
    _set("path", name)


def use_path(name: str):
    return _use("path", name)


def set_store(name: str) -> None:
    """How the forward stores y, for measurements (STORES above); PYSNELL_MONARCH_STORE sets the
    initial value."""
    _set("store", name)


def use_store(name: str):
    return _use("store", name)


for _what, (_env, _choices) in _SETTINGS.items():
    _value = os.environ.get(_env, "auto").strip().lower() or "auto"
    if _value in _choices:
        _setting[_what] = _value
    else:  # a typo must not take the other Triton families down with this module
        _backend.log.warning("pysnell: %s=%r is not one of %s; using 'auto'", _env, _value, _choices)


# ----------------------------------------------------------------------------------------------
# Kernels. Pointer tiles are built once; loops add scalar offsets and compare index vectors
# with scalar remainders (cheap address math on the GPU, and few vector ops when interpreting).
# UPCAST (interpreter only) computes in fp32: the interpreter's 16-bit arithmetic is unreliable.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _index(i, D: tl.constexpr, HI: tl.constexpr, LO: tl.constexpr):
    """Address offset of index i: i·LO, or (i // D)·HI + (i % D)·LO when D > 0."""
    if D == 0:
        return i * LO
    else:
        return (i // D) * HI + (i % D) * LO


@triton.jit
def _stage_one(
    in_tile,
    in_rows_ok,
    in_cols,
    in_left,
    wa_tile,
    u_ok,
    IN_V: tl.constexpr,
    WA_V: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BU: tl.constexpr,
    BV: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(BT, BU) fp32 = Σ over v < V of in_tile[:, v] · wa_tile[v, :].

    in_tile (BT, BV) and wa_tile (BV, BU) point at v = 0; input column v is valid while
    in_cols[v] < in_left (the implicit zero padding of x / dy).
    """
    offs_v = tl.arange(0, BV)
    h = tl.zeros((BT, BU), dtype=tl.float32)
    for v0 in range(0, V, BV):
        v0 = tl.cast(v0, tl.int64)
        v_ok = offs_v < V - v0
        a = tl.load(in_tile + v0 * IN_V, mask=in_rows_ok & (v_ok & (in_cols < in_left - v0 * IN_V))[None, :], other=0.0)
        w = tl.load(wa_tile + v0 * WA_V, mask=v_ok[:, None] & u_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        h = tl.dot(a, w, h, input_precision=PRECISION)
    return h


@triton.jit
def _two_stage_kernel(
    in_ptr,
    wa_ptr,
    wb_ptr,
    bias_ptr,
    out_ptr,
    T,
    n_in,
    n_out,
    stride_in,
    stride_out,
    IN_C: tl.constexpr,
    IN_V: tl.constexpr,
    WA_B: tl.constexpr,
    WA_C: tl.constexpr,
    WA_U: tl.constexpr,
    WA_V: tl.constexpr,
    WB_B: tl.constexpr,
    WB_C: tl.constexpr,
    WB_U: tl.constexpr,
    WB_J: tl.constexpr,
    OUT_B: tl.constexpr,
    OUT_J: tl.constexpr,
    NC: tl.constexpr,
    U: tl.constexpr,
    V: tl.constexpr,
    J: tl.constexpr,
    BT: tl.constexpr,
    BU: tl.constexpr,
    BV: tl.constexpr,
    BJ: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[t, b·OUT_B + j·OUT_J] = Σ_c Σ_u wb[b, c, u, j] · (Σ_v wa[b, c, u, v] · in[t, c·IN_C + v·IN_V]).

    Forward: b = li, c = ki, u = rr, v = pp, j = si. dX: b = ki, c = li, u = rr, v = si, j = pp.
    One program per (b, token tile, j tile); the caller makes BJ cover J, so each (BT, BU) slice
    of the intermediate is computed once, rounded to the tensors' dtype (as the reference's
    bmm output is) and multiplied by the second factor at once.
    """
    # sizes as int64: address math cannot overflow, and the interpreter skips its overflow checks
    T = tl.cast(T, tl.int64)
    n_in = tl.cast(n_in, tl.int64)
    n_out = tl.cast(n_out, tl.int64)
    # token tiles on axis 0 (CUDA caps axes 1 and 2 at 65535)
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    pid_j = tl.program_id(2)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_u = tl.arange(0, BU)
    offs_v = tl.arange(0, BV)
    offs_j = pid_j * BJ + tl.arange(0, BJ)
    rows_ok = (offs_t < T)[:, None]
    j_ok = offs_j < J
    in_cols = offs_v * IN_V
    in_tile = in_ptr + offs_t.to(tl.int64)[:, None] * stride_in + in_cols[None, :]
    wa_tile = wa_ptr + b * WA_B + offs_v[:, None] * WA_V + offs_u[None, :] * WA_U
    wb_tile = wb_ptr + b * WB_B + offs_u[:, None] * WB_U + offs_j[None, :] * WB_J
    NU: tl.constexpr = (U + BU - 1) // BU
    acc = tl.zeros((BT, BJ), dtype=tl.float32)
    # When V fits one tile the inner loop folds away and this is the only loop: all of its
    # loads are pipelined.
    for it in range(NC * NU):
        c = tl.cast(it // NU, tl.int64)
        u0 = tl.cast(it % NU, tl.int64) * BU
        u_ok = offs_u < U - u0
        h = _stage_one(
            in_tile + c * IN_C,
            rows_ok,
            in_cols,
            n_in - c * IN_C,
            wa_tile + (c * WA_C + u0 * WA_U),
            u_ok,
            IN_V,
            WA_V,
            V,
            BT,
            BU,
            BV,
            UPCAST,
            PRECISION,
        )
        wb = tl.load(wb_tile + (c * WB_C + u0 * WB_U), mask=u_ok[:, None] & j_ok[None, :], other=0.0)
        h = h.to(out_ptr.dtype.element_ty)
        if UPCAST:
            h = h.to(tl.float32)
            wb = wb.to(tl.float32)
        acc = tl.dot(h, wb, acc, input_precision=PRECISION)
    out_cols = b * OUT_B + offs_j * OUT_J
    cols_ok = j_ok & (out_cols < n_out)
    if HAS_BIAS:
        # the reference's y + bias: the product rounded to the output dtype, then the bias added
        acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        acc += tl.load(bias_ptr + out_cols, mask=cols_ok, other=0.0).to(tl.float32)[None, :]
    out_tile = out_ptr + offs_t.to(tl.int64)[:, None] * stride_out + out_cols[None, :]
    tl.store(out_tile, acc.to(out_ptr.dtype.element_ty), mask=rows_ok & cols_ok[None, :])


@triton.jit
def _two_stage_wgrad_kernel(
    g_ptr,
    in_ptr,
    wa_ptr,
    out_ptr,
    T,
    n_g,
    n_in,
    stride_g,
    stride_in,
    G_B: tl.constexpr,
    G_J: tl.constexpr,
    IN_C: tl.constexpr,
    IN_V: tl.constexpr,
    WA_B: tl.constexpr,
    WA_C: tl.constexpr,
    WA_U: tl.constexpr,
    WA_V: tl.constexpr,
    O_B: tl.constexpr,
    O_C: tl.constexpr,
    O_U: tl.constexpr,
    O_J: tl.constexpr,
    O_SPLIT: tl.constexpr,
    NC: tl.constexpr,
    U: tl.constexpr,
    V: tl.constexpr,
    J: tl.constexpr,
    BT: tl.constexpr,
    BU: tl.constexpr,
    BV: tl.constexpr,
    BJ: tl.constexpr,
    TILES: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[split, b, c, u, j] = Σ_t g[t, b·G_B + j·G_J] · h[t, b, c, u] over the split's TILES·BT tokens,
    with h[t, b, c, u] = Σ_v wa[b, c, u, v] · in[t, c·IN_C + v·IN_V] recomputed per token tile.

    dW2: b = li, c = ki, u = rr, j = si, g = dy, in = x, wa = w1 rows (h = intermediate).
    dW1: b = ki, c = li, u = rr, j = pp, g = x, in = dy, wa = w2 columns (h = its gradient).
    """
    # sizes as int64: address math cannot overflow, and the interpreter skips its overflow checks
    T = tl.cast(T, tl.int64)
    n_g = tl.cast(n_g, tl.int64)
    n_in = tl.cast(n_in, tl.int64)
    pid_cu = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    NU: tl.constexpr = (U + BU - 1) // BU
    c = pid_cu // NU
    u0 = (pid_cu % NU) * BU
    offs_t = tl.arange(0, BT)
    offs_u = tl.arange(0, BU)
    offs_v = tl.arange(0, BV)
    offs_j = tl.arange(0, BJ)
    u_ok = offs_u < U - u0
    j_ok = offs_j < J
    g_cols = offs_j * G_J
    g_cols_ok = j_ok & (g_cols < n_g - b * G_B)
    in_cols = offs_v * IN_V
    split = tl.cast(split, tl.int64)
    t_first = split * (TILES * BT)
    rows = (t_first + offs_t).to(tl.int64)[:, None]
    g_tile = g_ptr + rows * stride_g + b * G_B + g_cols[None, :]
    in_tile = in_ptr + rows * stride_in + c * IN_C + in_cols[None, :]
    wa_tile = wa_ptr + (b * WA_B + c * WA_C + u0 * WA_U) + offs_v[:, None] * WA_V + offs_u[None, :] * WA_U
    acc = tl.zeros((BJ, BU), dtype=tl.float32)
    for i in range(TILES):
        step = tl.cast(i, tl.int64) * BT
        rows_ok = (offs_t < T - (t_first + step))[:, None]
        h = _stage_one(
            in_tile + step * stride_in,
            rows_ok,
            in_cols,
            n_in - c * IN_C,
            wa_tile,
            u_ok,
            IN_V,
            WA_V,
            V,
            BT,
            BU,
            BV,
            UPCAST,
            PRECISION,
        )
        g = tl.load(g_tile + step * stride_g, mask=rows_ok & g_cols_ok[None, :], other=0.0)
        h = h.to(g_ptr.dtype.element_ty)
        if UPCAST:
            g = g.to(tl.float32)
            h = h.to(tl.float32)
        acc = tl.dot(tl.trans(g), h, acc, input_precision=PRECISION)
    out_tile = (
        out_ptr + split * O_SPLIT + (b * O_B + c * O_C + u0 * O_U) + offs_u[None, :] * O_U + offs_j[:, None] * O_J
    )
    tl.store(out_tile, acc.to(out_ptr.dtype.element_ty), mask=j_ok[:, None] & u_ok[None, :])


@triton.jit
def _gemm_kernel(
    in_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    T,
    n_in,
    n_out,
    stride_in,
    stride_out,
    NB: tl.constexpr,
    K: tl.constexpr,
    J: tl.constexpr,
    IN_B: tl.constexpr,
    IN_D: tl.constexpr,
    IN_HI: tl.constexpr,
    IN_LO: tl.constexpr,
    W_B: tl.constexpr,
    WK_D: tl.constexpr,
    WK_HI: tl.constexpr,
    WK_LO: tl.constexpr,
    WJ_D: tl.constexpr,
    WJ_HI: tl.constexpr,
    WJ_LO: tl.constexpr,
    OUT_B: tl.constexpr,
    OUT_D: tl.constexpr,
    OUT_HI: tl.constexpr,
    OUT_LO: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BJ: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    IN_G: tl.constexpr = 0,
    OUT_G: tl.constexpr = 0,
):
    """out[t, b·OUT_B + map(j)] = Σ_k in[t, b·IN_B + map(k)] · w[b·W_B + map(k) + map(j)] (+ bias).

    Each map is i·LO, or (i // D)·HI + (i % D)·LO when D > 0 (the Monarch permutation inside a
    block). With IN_G (OUT_G) > 0 the input (output) map takes the global index b·IN_G + k instead,
    and IN_B (OUT_B) is 0: the permutation of q % l != 0, which does not stay inside a block.
    Programs are ordered j tile, then block, then token tile: neighbours share input rows.
    """
    # sizes as int64: address math cannot overflow, and the interpreter skips its overflow checks
    T = tl.cast(T, tl.int64)
    n_in = tl.cast(n_in, tl.int64)
    n_out = tl.cast(n_out, tl.int64)
    pid = tl.program_id(0)
    NJ: tl.constexpr = (J + BJ - 1) // BJ
    pid_j = pid % NJ
    b = (pid // NJ) % NB
    pid_t = pid // (NJ * NB)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_j = pid_j * BJ + tl.arange(0, BJ)
    rows_ok = (offs_t < T)[:, None]
    j_ok = offs_j < J
    rows_in = in_ptr + offs_t.to(tl.int64)[:, None] * stride_in + b * IN_B
    w_cols = w_ptr + b * W_B + _index(offs_j, WJ_D, WJ_HI, WJ_LO)[None, :]
    in_left = n_in - b * IN_B
    acc = tl.zeros((BT, BJ), dtype=tl.float32)
    for k0 in range(0, K, BK):
        # index vectors from the induction variable keep their alignment visible to the compiler
        kk = k0 + offs_k
        k_ok = kk < K
        if IN_G == 0:
            in_cols = _index(kk, IN_D, IN_HI, IN_LO)
        else:
            in_cols = _index(b * IN_G + kk, IN_D, IN_HI, IN_LO)
        in_ok = k_ok & (in_cols < in_left)
        a_ptrs = rows_in + in_cols[None, :]
        w_ptrs = w_cols + _index(kk, WK_D, WK_HI, WK_LO)[:, None]
        a = tl.load(a_ptrs, mask=rows_ok & in_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & j_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if OUT_G == 0:
        out_cols = b * OUT_B + _index(offs_j, OUT_D, OUT_HI, OUT_LO)
    else:
        out_cols = _index(b * OUT_G + offs_j, OUT_D, OUT_HI, OUT_LO)
    cols_ok = j_ok & (out_cols < n_out)
    if HAS_BIAS:
        # the reference's y + bias: the product rounded to the output dtype, then the bias added
        acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        acc += tl.load(bias_ptr + out_cols, mask=cols_ok, other=0.0).to(tl.float32)[None, :]
    out_tile = out_ptr + offs_t.to(tl.int64)[:, None] * stride_out + out_cols[None, :]
    tl.store(out_tile, acc.to(out_ptr.dtype.element_ty), mask=rows_ok & cols_ok[None, :])


@triton.jit
def _wgrad_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    T,
    n_a,
    n_b,
    stride_a,
    stride_b,
    I: tl.constexpr,
    J: tl.constexpr,
    A_B: tl.constexpr,
    A_D: tl.constexpr,
    A_HI: tl.constexpr,
    A_LO: tl.constexpr,
    B_B: tl.constexpr,
    B_LO: tl.constexpr,
    O_B: tl.constexpr,
    O_D: tl.constexpr,
    O_HI: tl.constexpr,
    O_LO: tl.constexpr,
    O_J: tl.constexpr,
    O_SPLIT: tl.constexpr,
    BT: tl.constexpr,
    BI: tl.constexpr,
    BJ: tl.constexpr,
    TILES: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    A_G: tl.constexpr = 0,
):
    """out[split, blk, map(i), j] = Σ_t a[t, blk·A_B + map(i)] · b[t, blk·B_B + j·B_LO] over TILES·BT tokens.

    With A_G > 0 the a map takes the global index blk·A_G + i (A_B = 0), as in _gemm_kernel.
    """
    # sizes as int64: address math cannot overflow, and the interpreter skips its overflow checks
    T = tl.cast(T, tl.int64)
    n_a = tl.cast(n_a, tl.int64)
    n_b = tl.cast(n_b, tl.int64)
    pid = tl.program_id(0)
    blk = tl.program_id(1)
    split = tl.program_id(2)
    NJ: tl.constexpr = (J + BJ - 1) // BJ
    offs_t = tl.arange(0, BT)
    offs_i = (pid // NJ) * BI + tl.arange(0, BI)
    offs_j = (pid % NJ) * BJ + tl.arange(0, BJ)
    i_ok = offs_i < I
    j_ok = offs_j < J
    if A_G == 0:
        a_cols = _index(offs_i, A_D, A_HI, A_LO)
    else:
        a_cols = _index(blk * A_G + offs_i, A_D, A_HI, A_LO)
    b_cols = offs_j * B_LO
    a_cols_ok = i_ok & (a_cols < n_a - blk * A_B)
    b_cols_ok = j_ok & (b_cols < n_b - blk * B_B)
    split = tl.cast(split, tl.int64)
    t_first = split * (TILES * BT)
    rows = (t_first + offs_t).to(tl.int64)[:, None]
    a_tile = a_ptr + rows * stride_a + blk * A_B + a_cols[None, :]
    b_tile = b_ptr + rows * stride_b + blk * B_B + b_cols[None, :]
    acc = tl.zeros((BI, BJ), dtype=tl.float32)
    for i in range(TILES):
        step = tl.cast(i, tl.int64) * BT
        rows_ok = (offs_t < T - (t_first + step))[:, None]
        a = tl.load(a_tile + step * stride_a, mask=rows_ok & a_cols_ok[None, :], other=0.0)
        bt = tl.load(b_tile + step * stride_b, mask=rows_ok & b_cols_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(tl.trans(a), bt, acc, input_precision=PRECISION)
    out_rows = _index(offs_i, O_D, O_HI, O_LO)
    out_tile = out_ptr + split * O_SPLIT + blk * O_B + out_rows[:, None] + offs_j[None, :] * O_J
    tl.store(out_tile, acc.to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & j_ok[None, :])


@triton.jit
def _deinterleave_kernel(
    src_ptr,
    dst_ptr,
    T,
    n_src,
    stride_src,
    L: tl.constexpr,
    S: tl.constexpr,
    BT: tl.constexpr,
    BS: tl.constexpr,
    BL: tl.constexpr,
):
    """dst[t, li·S + si] = src[t, si·L + li], zero where si·L + li ≥ n_src (dy in w2's block order)."""
    # sizes as int64: address math cannot overflow, and the interpreter skips its overflow checks
    T = tl.cast(T, tl.int64)
    n_src = tl.cast(n_src, tl.int64)
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_s = pid_s * BS + tl.arange(0, BS)
    offs_l = tl.arange(0, BL)
    rows = offs_t.to(tl.int64)[:, None, None]
    t_ok = (offs_t < T)[:, None, None]
    col = offs_s[None, :, None] * L + offs_l[None, None, :]
    ok_in = t_ok & (offs_s < S)[None, :, None] & (offs_l < L)[None, None, :] & (col < n_src)
    v = tl.permute(tl.load(src_ptr + rows * stride_src + col, mask=ok_in, other=0.0), (0, 2, 1))
    dst = dst_ptr + rows * (L * S) + offs_l[None, :, None] * S + offs_s[None, None, :]
    tl.store(dst, v, mask=t_ok & (offs_l < L)[None, :, None] & (offs_s < S)[None, None, :])


@triton.jit
def _interleave_kernel(
    y_ptr,
    bias_ptr,
    T,
    stride_y,
    L: tl.constexpr,
    S: tl.constexpr,
    BT: tl.constexpr,
    BL: tl.constexpr,
    BS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """In place, whole rows: y[t, si·L + li] = y[t, li·S + si] (+ bias[si·L + li]), y (T, L·S).

    The bias is added to the already rounded product, in fp32, and rounded once more: the
    reference's y + bias. Each program owns BT whole rows and reads all of them before it writes.
    """
    T = tl.cast(T, tl.int64)
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_l = tl.arange(0, BL)
    offs_s = tl.arange(0, BS)
    rows = y_ptr + offs_t.to(tl.int64)[:, None, None] * stride_y
    t_ok = (offs_t < T)[:, None, None]
    block_order = offs_l[None, :, None] * S + offs_s[None, None, :]
    v = tl.load(rows + block_order, mask=t_ok & (offs_l < L)[None, :, None] & (offs_s < S)[None, None, :])
    # in place: no thread of the program may store before every thread has loaded
    tl.debug_barrier()
    v = tl.permute(v, (0, 2, 1))
    cols = offs_s[None, :, None] * L + offs_l[None, None, :]
    ok = t_ok & (offs_s < S)[None, :, None] & (offs_l < L)[None, None, :]
    if HAS_BIAS:
        v = (v.to(tl.float32) + tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)).to(v.dtype)
    tl.store(rows + cols, v, mask=ok)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, numel, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """out = Σ_s part[s] (fp32, s in order: deterministic), rounded once to out's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    src = part_ptr + offs
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(SPLITS):
        acc += tl.load(src, mask=ok, other=0.0)
        src += numel
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# Host side: shapes, tile choices, launches
# ----------------------------------------------------------------------------------------------

# A fused program reads the whole token row of the other side once per block of its own side
# (x once per output block, dy once per input block): beyond this many blocks those L2 re-reads
# cost more than sending the intermediate through memory once.
MAX_FUSED_REREADS = 8
# Cap on the fp32 partial sums of one weight gradient (bytes): splits beyond it are not worth it.
_PARTIALS_BYTES = 32 * 2**20
_SMEM_BUDGET = 200 * 2**10  # bytes of operand tiles in flight per program (H100: 227 KB per block)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, next_pow2(n))


def _precision(dtype) -> str:
    # fp32 stays IEEE fp32 unless torch itself allows TF32 for matmuls (same math as the torch backend).
    if dtype is torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _token_splits(programs: int, T: int, bt: int, w_numel: int, device: torch.device) -> tuple[int, int]:
    """(splits, token tiles per split) for a weight gradient with `programs` programs per split.

    Enough splits for one program per SM (none when the gradient already has that many: no
    fp32 partials then), each ≥ 4 token tiles, partials ≤ 32 MiB. The tiles per split are a power
    of two (a compile-time loop count), so a new T compiles few variants.
    """
    tiles = cdiv(T, bt)
    if device.type != "cuda":
        want = 2 if tiles >= 2 else 1  # exercises the partial-sum path under the interpreter
    else:
        want = cdiv(sm_count(device), max(programs, 1))
        want = max(1, min(want, tiles // 4, _PARTIALS_BYTES // (4 * w_numel), 64))
    per_split = next_pow2(cdiv(tiles, want))
    return cdiv(tiles, per_split), per_split


def _unsupported(x2, w1, w2, more=()) -> str | None:
    k, q, p = w1.shape
    if x2.dtype not in _DTYPES:
        return f"dtype {x2.dtype} (the kernels serve float32, float16 and bfloat16)"
    tensors = (x2, w1, w2, *[t for t in more if t is not None])
    if any(t.dtype != x2.dtype for t in tensors):
        raise ValueError(
            "monarch (triton): x2, w1, w2, bias and dy2 must share one dtype, got "
            + ", ".join(str(t.dtype) for t in tensors)
        )
    if max(w1.numel(), w2.numel(), k * q) >= 2**31:
        return "a factor with 2^31 or more elements"
    return None


def _fallback(op: str, w1, w2, dtype, reason: str) -> None:
    _backend._warn_once(
        ("monarch-triton-fallback", op, tuple(w1.shape), tuple(w2.shape), dtype),
        f"pysnell: {op} (triton) cannot serve w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}, {dtype}: {reason}; "
        "running the torch implementation for this shape",
    )


def _empty(shape, device, dtype):
    """Every buffer the kernels write (outputs, scratch, partials); tests poison it with NaN."""
    return torch.empty(shape, device=device, dtype=dtype)


def _rows(t):
    """A 2-D tensor whose feature dim is contiguous (the token stride is passed to the kernels)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_opts(num_warps: int, num_stages: int) -> dict:
    return {} if interpreting() else {"num_warps": num_warps, "num_stages": num_stages}


def _stages(stage_bytes: int, most: int = 4) -> int:
    return max(1, min(most, _SMEM_BUDGET // stage_bytes))


def _two_stage_tiles(U, V, J, dtype, wgrad: bool):
    """(BT, BU, BV, BJ, warps, stages) for the fused kernels (J ≤ MAX_ONCHIP).

    BV covers V when it fits (16-bit: ≤ 256), so the only loop is the one over intermediate
    chunks (or token tiles) and all of its loads are pipelined.
    """
    BJ = _pow2(J)
    if interpreting():  # small caps: the tests' small shapes still run every loop
        return 32, 16, min(_pow2(V), 32), BJ, 4, 1
    esize = torch.finfo(dtype).bits // 8
    BU = min(_pow2(U), 64 if esize == 2 else 16)
    BV = min(_pow2(V), 256 if esize == 2 else 32)
    BT = 64 if esize == 2 else 32  # fp32 (IEEE) dots run on FMA units and hold more registers
    # operand tiles per stage: input (BT, BV), first factor (BV, BU), second factor or g (BU|BT, BJ)
    stage_bytes = (BT * BV + BV * BU + (BT if wgrad else BU) * BJ) * esize
    return BT, BU, BV, BJ, 8 if BJ >= 128 else 4, _stages(stage_bytes)


# Programs a split GEMM should give the GPU at least (one per SM) where a smaller tile allows it,
# when the device is not a CUDA one (the compile-only harness): an H100's SM count.
_DEFAULT_SMS = 132


def _gemm_tiles(T, NB, K, J, dtype, device):
    """(BT, BK, BJ, warps, stages) of the split GEMMs.

    16-bit: 128×256 output tiles when there are enough of them; with few tokens the token tile
    shrinks to the tokens (a 1-token step with 128-row tiles issues 128× the MMA work it needs; 16
    rows run mma.sync, 64 and 128 wgmma), and the output tile narrows (256 → 64 columns) until the
    grid has a program per SM: at T = 16 a 4096-wide layer with 4 blocks had 16 programs. Blocks
    that are not a multiple of 8 elements (nblocks = 3 on 1024) load element by element, and 256
    columns of such addresses spilled registers on sm_90 (48–544 B): they get 128 (fp32: 64 of 128).
    """
    if interpreting():
        return 32, 16, min(_pow2(J), 32), 4, 1
    return _gpu_gemm_tiles(T, NB, K, J, dtype, sm_count(device) if device.type == "cuda" else _DEFAULT_SMS)


def _gpu_gemm_tiles(T, NB, K, J, dtype, sms):
    aligned = K % 8 == 0 and J % 8 == 0  # else element-by-element loads: an address per element
    if dtype == torch.float32:
        return 64, 32, min(_pow2(J), 128 if aligned else 64), 4, 3
    BT = 16 if T <= 16 else 64 if T <= 64 else 128
    BJ = 256 if J >= 256 and BT == 128 and aligned else min(_pow2(J), 128)
    while BJ > 64 and cdiv(T, BT) * NB * cdiv(J, BJ) < sms:
        BJ //= 2
    # 128-row tiles keep the 8 warps measured on the H200 (4 spill with the gathered index maps)
    return BT, 64, BJ, 8 if BT == 128 else 4, 3


def _wgrad_tiles(I, J, dtype, gathered=False):
    """gathered: the a operand's columns are a scattered index map (q % l != 0), loaded element by
    element; tiles half as wide keep its addresses in registers (sm_90 spilled at 128: 16-bit I,
    fp32 J)."""
    if interpreting():
        return 32, min(_pow2(I), 32), min(_pow2(J), 32), 4, 1
    if dtype == torch.float32:
        return 32, min(_pow2(I), 64), min(_pow2(J), 64 if gathered else 128), 4, 3
    return 64, min(_pow2(I), 64 if gathered else 128), min(_pow2(J), 128), 8, 3


def _run_two_stage(inp, wa, wb, bias, out, n_in, n_out, *, maps, NB, NC, U, V, J):
    T = inp.shape[0]
    BT, BU, BV, BJ, warps, stages = _two_stage_tiles(U, V, J, inp.dtype, wgrad=False)
    grid = (cdiv(T, BT), NB, cdiv(J, BJ))
    launch(
        _two_stage_kernel,
        grid,
        inp,
        wa,
        wb,
        bias if bias is not None else out,
        out,
        T,
        n_in,
        n_out,
        inp.stride(0),
        out.stride(0),
        **maps,
        NC=NC,
        U=U,
        V=V,
        J=J,
        BT=BT,
        BU=BU,
        BV=BV,
        BJ=BJ,
        HAS_BIAS=bias is not None,
        UPCAST=interpreting(),
        PRECISION=_precision(inp.dtype),
        **_launch_opts(warps, stages),
    )


def _run_gemm(inp, w, bias, out, n_in, n_out, *, maps, NB, K, J):
    T = inp.shape[0]
    BT, BK, BJ, warps, stages = _gemm_tiles(T, NB, K, J, inp.dtype, inp.device)
    grid = (cdiv(T, BT) * NB * cdiv(J, BJ),)
    launch(
        _gemm_kernel,
        grid,
        inp,
        w,
        bias if bias is not None else out,
        out,
        T,
        n_in,
        n_out,
        inp.stride(0),
        out.stride(0),
        NB=NB,
        K=K,
        J=J,
        **maps,
        BT=BT,
        BK=BK,
        BJ=BJ,
        HAS_BIAS=bias is not None,
        UPCAST=interpreting(),
        PRECISION=_precision(inp.dtype),
        **_launch_opts(warps, stages),
    )


def _partials(splits, w_shape, like):
    # splits == 1 writes the gradient itself; otherwise fp32 partials, summed in a fixed order.
    if splits == 1:
        return _empty(w_shape, like.device, like.dtype)
    return _empty((splits, *w_shape), like.device, torch.float32)


def _finish(out, splits, dtype):
    """The weight gradient from its partials: one launch (torch's sum and cast would be two)."""
    if splits == 1:
        return out
    grad = _empty(out.shape[1:], out.device, dtype)
    numel = grad.numel()
    block = 256 if interpreting() else 1024
    launch(_sum_splits_kernel, (cdiv(numel, block),), out, grad, numel, SPLITS=splits, BLOCK=block,
           **_launch_opts(4, 1))  # fmt: skip
    return grad


def _run_two_stage_wgrad(g, inp, wa, w_shape, n_g, n_in, *, maps, NB, NC, U, V, J):
    T = g.shape[0]
    BT, BU, BV, BJ, warps, stages = _two_stage_tiles(U, V, J, g.dtype, wgrad=True)
    per_split = NC * cdiv(U, BU)
    numel = w_shape[0] * w_shape[1] * w_shape[2]
    splits, tiles = _token_splits(per_split * NB, T, BT, numel, g.device)
    out = _partials(splits, w_shape, g)
    launch(
        _two_stage_wgrad_kernel,
        (per_split, NB, splits),
        g,
        inp,
        wa,
        out,
        T,
        n_g,
        n_in,
        g.stride(0),
        inp.stride(0),
        **maps,
        O_SPLIT=numel,
        TILES=tiles,
        NC=NC,
        U=U,
        V=V,
        J=J,
        BT=BT,
        BU=BU,
        BV=BV,
        BJ=BJ,
        UPCAST=interpreting(),
        PRECISION=_precision(g.dtype),
        **_launch_opts(warps, stages),
    )
    return _finish(out, splits, g.dtype)


def _run_wgrad(a, b, w_shape, n_a, n_b, *, maps, NB, I, J):
    T = a.shape[0]
    BT, BI, BJ, warps, stages = _wgrad_tiles(I, J, a.dtype, gathered=maps.get("A_G", 0) != 0)
    tiles_ij = cdiv(I, BI) * cdiv(J, BJ)
    numel = w_shape[0] * w_shape[1] * w_shape[2]
    splits, tiles = _token_splits(tiles_ij * NB, T, BT, numel, a.device)
    out = _partials(splits, w_shape, a)
    launch(
        _wgrad_kernel,
        (tiles_ij, NB, splits),
        a,
        b,
        out,
        T,
        n_a,
        n_b,
        a.stride(0),
        b.stride(0),
        I=I,
        J=J,
        **maps,
        O_SPLIT=numel,
        TILES=tiles,
        BT=BT,
        BI=BI,
        BJ=BJ,
        UPCAST=interpreting(),
        PRECISION=_precision(a.dtype),
        **_launch_opts(warps, stages),
    )
    return _finish(out, splits, a.dtype)


# Widest y row the in-place interleave pass holds in registers (elements, padded to powers of
# two): 11008 = 4 · 2752 pads to 16384.
MAX_INTERLEAVE_ROW = 16384
# Below this many tokens the forward scatters its stores: y is small and a second launch likely
# costs more than the piecewise sector writes it saves (reasoned, not measured; see the README).
MIN_INTERLEAVE_TOKENS = 64


def _store_plan(T: int, l: int, s: int, out_features: int) -> str:
    """How a forward with T tokens and w2 (l, s, r) stores y: "interleave" or "scatter" (STORES)."""
    store = _setting["store"]
    fits = l > 1 and out_features == l * s and next_pow2(l) * next_pow2(s) <= MAX_INTERLEAVE_ROW
    if store == "scatter" or not fits:
        return "scatter"
    return "interleave" if store == "interleave" or T >= MIN_INTERLEAVE_TOKENS else "scatter"


def _interleave_(y, l, s, bias):
    """y (T, l·s) from block order (column li·s + si) to Monarch order (si·l + li), + bias, in place."""
    T = y.shape[0]
    BL, BS = next_pow2(l), next_pow2(s)
    row = BL * BS
    if interpreting():
        BT, warps = 2, 4
    else:
        BT = max(1, 8192 // row)
        warps = 8 if BT * row >= 8192 else 4
    launch(
        _interleave_kernel,
        (cdiv(T, BT),),
        y,
        bias if bias is not None else y,
        T,
        y.stride(0),
        L=l,
        S=s,
        BT=BT,
        BL=BL,
        BS=BS,
        HAS_BIAS=bias is not None,
        **_launch_opts(warps, 1),
    )


def _deinterleave(dy2, l, s):
    """dy in block order (T, l·s): column li·s + si holds dy column si·l + li (zero past out_features)."""
    T = dy2.shape[0]
    out = _empty((T, l * s), dy2.device, dy2.dtype)
    BL = next_pow2(l)
    BS = max(16, 512 // BL) if not interpreting() else 16
    BT = 16
    grid = (cdiv(T, BT), cdiv(s, BS))
    # 8 warps for the 8192-element tile: with 4, l = 8 spills (sm_90)
    launch(
        _deinterleave_kernel,
        grid,
        dy2,
        out,
        T,
        dy2.shape[1],
        dy2.stride(0),
        L=l,
        S=s,
        BT=BT,
        BS=BS,
        BL=BL,
        **_launch_opts(8, 1),
    )
    return out


# --- the products, as index maps over the contiguous factors ------------------------------------
# dyb below is dy in block order (T, l·s), column li·s + si (see _deinterleave).


def _forward_fused(x2, w1, w2, bias, y, block_order):
    k, q, p = w1.shape
    l, s, r = w2.shape
    QL = q // l
    maps = dict(
        IN_C=p, IN_V=1,  # x column ki·p + pp
        WA_B=p, WA_C=q * p, WA_U=l * p, WA_V=1,  # w1[ki, rr·l + li, pp]
        WB_B=s * r, WB_C=QL, WB_U=1, WB_J=r,  # w2[li, si, ki·QL + rr]
        # y column li·s + si (block order) or si·l + li
        OUT_B=s if block_order else 1, OUT_J=1 if block_order else l,
    )  # fmt: skip
    _run_two_stage(x2, w1, w2, bias, y, x2.shape[1], y.shape[1], maps=maps, NB=l, NC=k, U=QL, V=p, J=s)


def _dx_fused(dyb, w1, w2, dx):
    k, q, p = w1.shape
    l, s, r = w2.shape
    QL = q // l
    maps = dict(
        IN_C=s, IN_V=1,  # dyb column li·s + si
        WA_B=QL, WA_C=s * r, WA_U=1, WA_V=r,  # w2[li, si, ki·QL + rr]
        WB_B=q * p, WB_C=p, WB_U=l * p, WB_J=1,  # w1[ki, rr·l + li, pp]
        OUT_B=p, OUT_J=1,  # dx column ki·p + pp
    )  # fmt: skip
    _run_two_stage(dyb, w2, w1, None, dx, l * s, dx.shape[1], maps=maps, NB=k, NC=l, U=QL, V=s, J=p)


def _dw2_fused(dyb, x2, w1, w2):
    k, q, p = w1.shape
    l, s, r = w2.shape
    QL = q // l
    maps = dict(
        G_B=s, G_J=1,  # dyb column li·s + si
        IN_C=p, IN_V=1,  # x column ki·p + pp
        WA_B=p, WA_C=q * p, WA_U=l * p, WA_V=1,  # w1[ki, rr·l + li, pp]
        O_B=s * r, O_C=QL, O_U=1, O_J=r,  # dw2[li, si, ki·QL + rr]
    )  # fmt: skip
    return _run_two_stage_wgrad(dyb, x2, w1, w2.shape, l * s, x2.shape[1], maps=maps, NB=l, NC=k, U=QL, V=p, J=s)


def _dw1_fused(dyb, x2, w1, w2):
    k, q, p = w1.shape
    l, s, r = w2.shape
    QL = q // l
    maps = dict(
        G_B=p, G_J=1,  # x column ki·p + pp
        IN_C=s, IN_V=1,  # dyb column li·s + si
        WA_B=QL, WA_C=s * r, WA_U=1, WA_V=r,  # w2[li, si, ki·QL + rr]
        O_B=q * p, O_C=p, O_U=l * p, O_J=1,  # dw1[ki, rr·l + li, pp]
    )  # fmt: skip
    return _run_two_stage_wgrad(x2, dyb, w2, w1.shape, x2.shape[1], l * s, maps=maps, NB=k, NC=l, U=QL, V=s, J=p)


# The intermediate in memory is (T, l·r): block li's inputs in w2's column order. Inside a
# stage-1 block the columns are taken in the order f = li·QL + rr (row rr·l + li of w1[ki]), so
# runs of QL columns are contiguous on both sides.


def _mid_split(x2, w1, w2):
    k, q, p = w1.shape
    l, _, r = w2.shape
    QL = q // l
    mid = _empty((x2.shape[0], l * r), x2.device, x2.dtype)
    if q % l:
        maps = dict(
            IN_B=p, IN_D=0, IN_HI=0, IN_LO=1,  # x column ki·p + pp
            W_B=q * p, WK_D=0, WK_HI=0, WK_LO=1, WJ_D=0, WJ_HI=0, WJ_LO=p,  # w1[ki, qj, pp]
            OUT_B=0, OUT_G=q, OUT_D=l, OUT_HI=1, OUT_LO=r,  # mid column li·r + ri, (ri, li) = divmod(ki·q + qj, l)
        )  # fmt: skip
    else:
        maps = dict(
            IN_B=p, IN_D=0, IN_HI=0, IN_LO=1,  # x column ki·p + pp
            W_B=q * p, WK_D=0, WK_HI=0, WK_LO=1, WJ_D=QL, WJ_HI=p, WJ_LO=l * p,  # w1[ki, rr·l + li, pp]
            OUT_B=QL, OUT_D=QL, OUT_HI=r, OUT_LO=1,  # mid column li·r + ki·QL + rr
        )  # fmt: skip
    _run_gemm(x2, w1, None, mid, x2.shape[1], l * r, maps=maps, NB=k, K=p, J=q)
    return mid


def _out_from_mid(mid, w2, bias, y, block_order):
    l, s, r = w2.shape
    maps = dict(
        IN_B=r, IN_D=0, IN_HI=0, IN_LO=1,  # mid column li·r + ri
        W_B=s * r, WK_D=0, WK_HI=0, WK_LO=1, WJ_D=0, WJ_HI=0, WJ_LO=r,  # w2[li, si, ri]
        # y column li·s + si (block order) or si·l + li
        OUT_B=s if block_order else 1, OUT_D=0, OUT_HI=0, OUT_LO=1 if block_order else l,
    )  # fmt: skip
    _run_gemm(mid, w2, bias, y, l * r, y.shape[1], maps=maps, NB=l, K=r, J=s)


def _dmid_split(dyb, w2):
    l, s, r = w2.shape
    dmid = _empty((dyb.shape[0], l * r), dyb.device, dyb.dtype)
    maps = dict(
        IN_B=s, IN_D=0, IN_HI=0, IN_LO=1,  # dyb column li·s + si
        W_B=s * r, WK_D=0, WK_HI=0, WK_LO=r, WJ_D=0, WJ_HI=0, WJ_LO=1,  # w2[li, si, ri]
        OUT_B=r, OUT_D=0, OUT_HI=0, OUT_LO=1,  # dmid column li·r + ri
    )  # fmt: skip
    _run_gemm(dyb, w2, None, dmid, l * s, l * r, maps=maps, NB=l, K=s, J=r)
    return dmid


def _dx_from_dmid(dmid, w1, w2, dx):
    k, q, p = w1.shape
    l, _, r = w2.shape
    QL = q // l
    if q % l:
        maps = dict(
            IN_B=0, IN_G=q, IN_D=l, IN_HI=1, IN_LO=r,  # dmid column li·r + ri, (ri, li) = divmod(ki·q + qj, l)
            W_B=q * p, WK_D=0, WK_HI=0, WK_LO=p, WJ_D=0, WJ_HI=0, WJ_LO=1,  # w1[ki, qj, pp]
            OUT_B=p, OUT_D=0, OUT_HI=0, OUT_LO=1,  # dx column ki·p + pp
        )  # fmt: skip
    else:
        maps = dict(
            IN_B=QL, IN_D=QL, IN_HI=r, IN_LO=1,  # dmid column li·r + ki·QL + rr
            W_B=q * p, WK_D=QL, WK_HI=p, WK_LO=l * p, WJ_D=0, WJ_HI=0, WJ_LO=1,  # w1[ki, rr·l + li, pp]
            OUT_B=p, OUT_D=0, OUT_HI=0, OUT_LO=1,  # dx column ki·p + pp
        )  # fmt: skip
    _run_gemm(dmid, w1, None, dx, l * r, dx.shape[1], maps=maps, NB=k, K=q, J=p)


def _dw2_from_mid(dyb, mid, w2):
    l, s, r = w2.shape
    maps = dict(
        A_B=s, A_D=0, A_HI=0, A_LO=1,  # dyb column li·s + si
        B_B=r, B_LO=1,  # mid column li·r + ri
        O_B=s * r, O_D=0, O_HI=0, O_LO=r, O_J=1,  # dw2[li, si, ri]
    )  # fmt: skip
    return _run_wgrad(dyb, mid, w2.shape, l * s, l * r, maps=maps, NB=l, I=s, J=r)


def _dw1_from_dmid(dmid, x2, w1, w2):
    k, q, p = w1.shape
    l, _, r = w2.shape
    QL = q // l
    if q % l:
        maps = dict(
            A_B=0, A_G=q, A_D=l, A_HI=1, A_LO=r,  # dmid column li·r + ri, (ri, li) = divmod(ki·q + qj, l)
            B_B=p, B_LO=1,  # x column ki·p + pp
            O_B=q * p, O_D=0, O_HI=0, O_LO=p, O_J=1,  # dw1[ki, qj, pp]
        )  # fmt: skip
    else:
        maps = dict(
            A_B=QL, A_D=QL, A_HI=r, A_LO=1,  # dmid column li·r + ki·QL + rr
            B_B=p, B_LO=1,  # x column ki·p + pp
            O_B=q * p, O_D=QL, O_HI=p, O_LO=l * p, O_J=1,  # dw1[ki, rr·l + li, pp]
        )  # fmt: skip
    return _run_wgrad(dmid, x2, w1.shape, l * r, x2.shape[1], maps=maps, NB=k, I=q, J=p)


# --- plans and registered ops -------------------------------------------------------------------


def plan(w1_shape, w2_shape) -> dict:
    """Which kernel serves each product for these factor shapes ("fused" or "split")."""
    # cached per shape and setting (it runs on every forward and backward)
    return dict(_plan(tuple(w1_shape), tuple(w2_shape), _setting["path"], MAX_ONCHIP, MAX_FUSED_REREADS))


@functools.lru_cache(maxsize=256)
def _plan(w1_shape, w2_shape, path, max_onchip, max_rereads) -> tuple:
    k, q, p = w1_shape
    l, s, _ = w2_shape

    def pick(width, rereads):
        # q % l != 0: an output block takes rows from a varying run of stage-1 blocks, so only the
        # split kernels (the permutation as an index map over the intermediate in memory) serve it.
        # A fused kernel keeps a `width`-wide block row on chip and re-reads the other side's token
        # row `rereads` times.
        if q % l or path == "split" or _pow2(width) > max_onchip:
            return "split"
        return "fused" if path == "fused" or rereads <= max_rereads else "split"

    return (
        ("forward", pick(s, l)),  # reads x once per output block
        ("dw2", pick(s, max(k, l))),
        ("dw1", pick(p, max(k, l))),
        ("dx", pick(p, k)),  # reads dy once per input block
    )


def _device_ctx(t):
    """Triton launches on the current device: switch to the tensors' one when it is another."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def monarch_forward(x2, w1, w2, bias, out_features):
    """The "monarch.forward" op: y2 (T, out_features) = Monarch(w1, w2)·x2 (+ bias)."""
    reason = _unsupported(x2, w1, w2, (bias,))
    if reason is not None:
        _fallback("monarch.forward", w1, w2, x2.dtype, reason)
        return _torch_forward(x2, w1, w2, bias, out_features)
    x2, w1, w2 = _rows(x2), w1.contiguous(), w2.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = _empty((x2.shape[0], out_features), x2.device, x2.dtype)
    if x2.shape[0] == 0:
        return y
    with _device_ctx(x2):
        # interleave: the product goes to y in block order and one pass puts it in Monarch order
        interleave = _store_plan(x2.shape[0], w2.shape[0], w2.shape[1], out_features) == "interleave"
        product_bias = None if interleave else bias
        if plan(w1.shape, w2.shape)["forward"] == "fused":
            _forward_fused(x2, w1, w2, product_bias, y, block_order=interleave)
        else:
            _out_from_mid(_mid_split(x2, w1, w2), w2, product_bias, y, block_order=interleave)
        if interleave:
            _interleave_(y, w2.shape[0], w2.shape[1], bias)
    return y


def monarch_backward(dy2, x2, w1, w2, needs=(True, True, True)):
    """The "monarch.backward" op: (dx2, dw1, dw2), each None when not needed."""
    need_x, need_w1, need_w2 = needs
    reason = _unsupported(x2, w1, w2, (dy2,))
    if reason is not None:
        _fallback("monarch.backward", w1, w2, x2.dtype, reason)
        return _torch_backward(dy2, x2, w1, w2, needs)
    x2, w1, w2 = _rows(x2), w1.contiguous(), w2.contiguous()
    l, s, _ = w2.shape
    T = x2.shape[0]
    if T == 0:
        zeros = lambda t, need: torch.zeros_like(t) if need else None
        return zeros(x2, need_x), zeros(w1, need_w1), zeros(w2, need_w2)
    how = plan(w1.shape, w2.shape)
    dx = dw1 = dw2 = None
    with _device_ctx(x2):
        # Every backward product reads dy by output block: one pass puts it in that order so
        # all later loads are contiguous (reading it at stride l would fetch each sector l times).
        dyb = _deinterleave(_rows(dy2), l, s)
        if need_w2:
            if how["dw2"] == "fused":
                dw2 = _dw2_fused(dyb, x2, w1, w2)
            else:
                mid = _mid_split(x2, w1, w2)
                dw2 = _dw2_from_mid(dyb, mid, w2)
                del mid  # freed before the intermediate gradient is allocated
        if need_x or need_w1:
            # A materialised intermediate gradient, when either product needs it, serves both.
            if (need_w1 and how["dw1"] == "split") or (need_x and how["dx"] == "split"):
                dmid = _dmid_split(dyb, w2)
                del dyb  # everything after reads dmid: freed before dx is allocated
                if need_w1:
                    dw1 = _dw1_from_dmid(dmid, x2, w1, w2)
                if need_x:
                    dx = _empty(x2.shape, x2.device, x2.dtype)
                    _dx_from_dmid(dmid, w1, w2, dx)
            else:
                if need_w1:
                    dw1 = _dw1_fused(dyb, x2, w1, w2)
                if need_x:
                    dx = _empty(x2.shape, x2.device, x2.dtype)
                    _dx_fused(dyb, w1, w2, dx)
    return dx, dw1, dw2


def register() -> None:
    _backend.register("monarch.forward", "triton", monarch_forward)
    _backend.register("monarch.backward", "triton", monarch_backward)
