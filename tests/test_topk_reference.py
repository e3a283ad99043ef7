"""Threshold selection and in-place top-k masking against torch.quantile and explicit sorts (spec/TOPK.md)."""

import math

import pytest
import torch
from oracles import lerp_at, quantile_threshold, sort_threshold

import pysnell
from pysnell.ops.topk import reference as topk_ref
from pysnell.ops.topk.function import select_threshold

SHAPES = [(1,), (2,), (7,), (37, 53), (3, 129, 5), (67, 301)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _keys(x):
    return x.detach().abs().float().reshape(-1)


def _check_kept_set(keys, v, t, sparsity):
    """Exact arithmetic keeps key > v[lo] (v: sorted keys); float32 rounding of t may only move it onto v[hi]."""
    pos = sparsity * (keys.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    kept = keys > t
    if torch.equal(kept, keys > v[lo]):
        return
    # t rounded up to v[hi]: only possible when the fractional position is at least one half
    assert pos - lo >= 0.5 and torch.equal(t, v[hi]), (float(t), float(v[lo]), float(v[hi]), pos)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_equals_torch_quantile(seed, shape, dtype):
    _check_against_quantile(torch.randn(shape).to(dtype), (0.0, 0.1, 0.25, 0.37, 0.5, 0.9, 0.999))


def test_threshold_equals_torch_quantile_at_a_million(seed):
    _check_against_quantile(torch.randn(1001, 999), (0.25, 0.9, 0.999))


def _check_against_quantile(x, sparsities):
    keys = _keys(x)
    v = torch.sort(keys).values
    for s in sparsities:
        t = select_threshold(x.reshape(1, -1), s)[0]
        assert t.dtype == torch.float32 and t.device == x.device
        torch.testing.assert_close(t, quantile_threshold(keys, s), rtol=1e-6, atol=0)
        _check_kept_set(keys, v, t, s)
        if keys.numel() < 2**20 and s in (0.0, 0.25, 0.5):
            # A dyadic s gives torch.quantile's float32 rank exactly: same positions, same kept set.
            t_torch = torch.quantile(keys, s)
            torch.testing.assert_close(t, t_torch, rtol=1e-6, atol=0)
            assert torch.equal(keys > t, keys > t_torch)


@pytest.mark.parametrize("shape", SHAPES)
def test_threshold_is_the_float64_position_rule_on_a_sort(seed, shape):
    x = torch.randn(shape)
    keys = _keys(x)
    v = torch.sort(keys).values
    for s in [0.0, 0.5, 0.9] + torch.rand(4, dtype=torch.float64).mul(0.999).tolist():
        t = select_threshold(x.reshape(1, -1), s)[0]
        assert torch.equal(t, lerp_at(v, s)), s


def test_threshold_at_integral_positions_is_an_order_statistic(seed):
    x = torch.randn(1237)
    keys = _keys(x)
    v = torch.sort(keys).values
    for j in (0, 1, 618, 1235):
        s = j / 1236
        t = select_threshold(x.reshape(1, -1), s)[0]
        assert torch.equal(t, lerp_at(v, s))
        if s * 1236 == j:
            assert torch.equal(t, v[j])


def test_positions_are_exact_beyond_float32_range():
    # No data needed: the rank arithmetic alone, at sizes where float32 ranks would be wrong.
    for n in (2**24 + 3, 4096 * 11008, 2**31 + 11):
        for s in (0.1, 0.5, 0.9, 0.999, 1 - 2**-30):
            lo, hi, w = topk_ref.quantile_positions(topk_ref.sparsity_tensor(s, "cpu"), n)
            pos = s * (n - 1)
            assert int(lo) == math.floor(pos) and int(hi) == math.ceil(pos)
            assert abs(float(w) - (pos - math.floor(pos))) < 1e-6


def test_threshold_per_group_rows(seed):
    x = torch.randn(3, 401)
    t = select_threshold(x, 0.7)
    assert t.shape == (3,)
    for g in range(3):
        assert torch.equal(t[g], sort_threshold(_keys(x[g]), 0.7))


def test_threshold_accepts_a_sparsity_tensor(seed):
    x = torch.randn(5, 77)
    s = torch.tensor(0.63, dtype=torch.float64)
    assert torch.equal(select_threshold(x.reshape(1, -1), s), select_threshold(x.reshape(1, -1), 0.63))


# ---------------------------------------------------------------- topk_mask_


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (9,), (13, 31), (2, 7, 11)])
def test_sparsity_mode_in_place(seed, dtype, shape):
    x = torch.randn(shape).to(dtype)
    original = x.clone()
    ptr = x.data_ptr()
    s = 0.6
    out, t = pysnell.topk_mask_(x, sparsity=s)
    assert out is x and x.data_ptr() == ptr
    assert t.shape == () and t.dtype == torch.float32
    keys = _keys(original)
    assert torch.equal(t, sort_threshold(keys, s))
    keep = (keys > t).view(shape)
    assert torch.equal(x, torch.where(keep, original, torch.zeros_like(original)))


def test_sparsity_mode_non_contiguous_view(seed):
    base = torch.randn(17, 23)
    expected = base.clone()
    view = base.t()[3:, ::2]  # strided, non-contiguous: flat index is the view's row-major order
    assert not view.is_contiguous()
    vals = view.clone()
    _, t = pysnell.topk_mask_(view, sparsity=0.5)
    keep = vals.abs() > t
    expected.t()[3:, ::2] = torch.where(keep, vals, torch.zeros_like(vals))
    assert torch.equal(base, expected)


def test_sparsity_zero_keeps_everything(seed):
    x = torch.randn(11, 5)
    x[0, 0] = 0.0
    original = x.clone()
    pysnell.topk_mask_(x, sparsity=0.0)
    assert torch.equal(x, original)


def _expected_k_mask(keys, k):
    """Largest k keys, ties in increasing flat-index order (stable sort on −key)."""
    order = torch.sort(-keys, stable=True).indices[:k]
    keep = torch.zeros_like(keys, dtype=torch.bool)
    keep[order] = True
    return keep


@pytest.mark.parametrize("dtype", DTYPES)
def test_k_mode_keeps_exactly_k_with_index_ordered_ties(seed, dtype):
    # Few distinct magnitudes: ties everywhere, including at the k-th largest.
    x = (torch.randint(-3, 4, (7, 19)).to(dtype)) * 0.5
    n = x.numel()
    for k in (0, 1, 5, 40, 67, n - 1, n):
        y = x.clone()
        out, t = pysnell.topk_mask_(y, k=k)
        assert out is y
        keep = _expected_k_mask(_keys(x), k)
        assert int((y != 0).sum()) <= k
        assert torch.equal(y.reshape(-1), torch.where(keep, x.reshape(-1), torch.zeros_like(x.reshape(-1))))
        if k == 0:
            assert math.isinf(float(t))
        else:
            assert float(t) == float(torch.sort(_keys(x), descending=True).values[k - 1])


def test_k_mode_counts_exact_k_on_nonzero_data(seed):
    x = torch.randn(3, 5, 7)
    for k in (0, 1, 52, 105):
        y = x.clone()
        pysnell.topk_mask_(y, k=k)
        assert int((y != 0).sum()) == k
        assert torch.equal(y.reshape(-1), torch.where(_expected_k_mask(_keys(x), k), x.reshape(-1), 0.0))


def test_all_equal_inputs(seed):
    value = float(torch.randn(()))
    x = torch.full((6, 9), value)
    y = x.clone()
    _, t = pysnell.topk_mask_(y, sparsity=0.5)
    # every magnitude equals the quantile and the keep test is strict: nothing survives
    assert float(t) == abs(value) and int((y != 0).sum()) == 0
    for k in (0, 1, 13, 54):
        y = x.clone()
        pysnell.topk_mask_(y, k=k)
        assert torch.equal(y.reshape(-1) != 0, torch.arange(54) < k)


def test_nan_ranks_below_every_number(seed):
    x = torch.randn(41)
    nan_at = torch.tensor([0, 7, 8, 30])
    x[nan_at] = float("nan")
    x[3] = float("inf")
    keys = _keys(x)
    keys_nan_low = torch.where(torch.isnan(keys), torch.full_like(keys, -1.0), keys)

    y = x.clone()
    _, t = pysnell.topk_mask_(y, sparsity=0.5)
    assert torch.equal(t, sort_threshold(keys_nan_low, 0.5))
    assert not torch.isnan(y).any() and y[3] == float("inf")
    keep = keys_nan_low > t
    assert torch.equal(y[keep], x[keep]) and (y[~keep] == 0).all()

    y = x.clone()
    pysnell.topk_mask_(y, sparsity=0.0)  # sparsity 0 keeps everything, NaN included
    assert torch.isnan(y[nan_at]).all()

    y = x.clone()
    pysnell.topk_mask_(y, k=37)  # exactly the numbers
    assert not torch.isnan(y).any() and int((y != 0).sum()) == 37

    y = x.clone()
    pysnell.topk_mask_(y, k=39)  # two NaNs fill the remaining slots, lowest flat indices first
    assert torch.isnan(y[:8]).sum() == 2 and torch.isnan(y[[0, 7]]).all() and y[8] == 0 and y[30] == 0


def test_empty_tensor():
    x = torch.empty(0, 5)
    out, t = pysnell.topk_mask_(x, sparsity=0.5)
    assert out is x and t.shape == ()
    out, t = pysnell.topk_mask_(x, k=0)
    assert out is x


# ---------------------------------------------------------------- packed mask and autograd form


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_packed_mask_round_trip(seed, n):
    mask = torch.rand(n) < 0.4
    packed = topk_ref.pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
    assert torch.equal(topk_ref.unpack_mask(packed, n), mask)
    # bit i of byte j is element 8·j + i
    j = n // 2
    assert bool((int(packed[j // 8]) >> (j % 8)) & 1) == bool(mask[j])


@pytest.mark.parametrize("mode", [{"sparsity": 0.55}, {"k": 17}, {"sparsity": 0.0}])
def test_autograd_form_gradcheck(seed, mode):
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: pysnell.topk_mask(t, **mode)[0], (x,))


def test_autograd_form_gradient_is_the_mask_and_saves_packed_bits(seed):
    x = torch.randn(5, 13, requires_grad=True)
    x0 = x.detach().clone()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y, t = pysnell.topk_mask(x, k=20)
    assert [(s.dtype, s.numel()) for s in saved] == [(torch.uint8, 9)]
    assert not t.requires_grad
    assert torch.equal(x.detach(), x0)  # out of place: x itself is never modified
    g = torch.randn_like(y)
    y.backward(g)
    keep = _expected_k_mask(_keys(x), 20).view(x.shape)
    assert torch.equal(x.grad, g * keep)
    assert torch.equal(y, torch.where(keep, x.detach(), 0.0))
