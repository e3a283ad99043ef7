"""Monarch multiply, layer and projection against the dense oracle of spec/MONARCH.md §1 and §3."""

import pytest
import torch
from oracles import monarch_dense, monarch_dense_by_terms

import pysnell
from pysnell.ops.monarch.function import monarch_shapes

# (w1 shape (k, q, p), w2 shape (l, s, r)) with l·r = k·q: square, rectangular, k ≠ l, q % l ≠ 0
FACTOR_SHAPES = [
    ((4, 4, 4), (4, 4, 4)),
    ((3, 4, 2), (4, 5, 3)),
    ((2, 3, 5), (3, 1, 2)),
    ((4, 3, 3), (4, 3, 3)),
    ((1, 6, 7), (2, 3, 3)),
    ((5, 2, 3), (2, 7, 5)),
]
# (in, out, nblocks): divisible, padded non-divisible, rectangular both ways, q % l != 0
LAYER_SIZES = [(16, 16, 4), (12, 12, 4), (10, 7, 3), (8, 20, 2), (20, 8, 2), (13, 29, 4), (30, 11, 5)]
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}


def _factors(w1_shape, w2_shape, dtype=torch.float64):
    return torch.randn(w1_shape, dtype=dtype), torch.randn(w2_shape, dtype=dtype)


def test_oracle_is_the_spec_loop(seed):
    # the vectorised oracle against the spec's per-element four-step definition, once
    w1, w2 = _factors((3, 4, 2), (4, 5, 3))
    k, q, p = w1.shape
    l, s, r = w2.shape
    x = torch.randn(k * p, dtype=torch.float64)
    a, c, xs = w1.tolist(), w2.tolist(), x.tolist()
    out1 = [sum(a[ki][qj][pp] * xs[ki * p + pp] for pp in range(p)) for ki in range(k) for qj in range(q)]
    y = [0.0] * (l * s)
    for li in range(l):
        for si in range(s):
            y[si * l + li] = sum(c[li][si][ri] * out1[ri * l + li] for ri in range(r))
    torch.testing.assert_close(monarch_dense(w1, w2) @ x, torch.tensor(y, dtype=torch.float64))


@pytest.mark.parametrize("shapes", FACTOR_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_monarch_matmul_equals_dense_oracle(seed, shapes, dtype):
    w1, w2 = _factors(*shapes, dtype)
    k, _, p = w1.shape
    x = torch.randn(3, 5, k * p, dtype=dtype)
    bias = torch.randn(w2.shape[0] * w2.shape[1], dtype=dtype)
    M = monarch_dense(w1.double(), w2.double())
    expected = x.double() @ M.t()
    y = pysnell.monarch_matmul(x, w1, w2)
    assert y.shape == (3, 5, M.shape[0]) and y.dtype == dtype
    scale = float(expected.abs().max())
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), expected, rtol=tol["rtol"], atol=tol["atol"] * scale)
    yb = pysnell.monarch_matmul(x, w1, w2, bias)
    torch.testing.assert_close(yb.double(), expected + bias.double(), rtol=tol["rtol"], atol=tol["atol"] * scale)


@pytest.mark.parametrize("shapes", FACTOR_SHAPES[:4])
def test_monarch_matmul_gradcheck(seed, shapes):
    w1, w2 = _factors(*shapes)
    x = torch.randn(2, 3, w1.shape[0] * w1.shape[2], dtype=torch.float64)
    bias = torch.randn(w2.shape[0] * w2.shape[1], dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, w1, w2, bias))
    torch.autograd.gradcheck(pysnell.monarch_matmul, inputs)
    torch.autograd.gradcheck(lambda x, w1, w2: pysnell.monarch_matmul(x, w1, w2), inputs[:3])


def test_monarch_matmul_empty_and_non_contiguous(seed):
    w1, w2 = _factors((3, 4, 2), (4, 5, 3), torch.float32)
    w1.requires_grad_()
    y = pysnell.monarch_matmul(torch.randn(0, 6, requires_grad=True), w1, w2)
    assert y.shape == (0, 20)
    y.sum().backward()
    assert torch.equal(w1.grad, torch.zeros_like(w1))
    x = torch.randn(12, 9)[:, 1:7]  # (12, 6) strided view
    assert not x.is_contiguous()
    torch.testing.assert_close(
        pysnell.monarch_matmul(x, w1.detach(), w2), pysnell.monarch_matmul(x.contiguous(), w1.detach(), w2)
    )


# ---------------------------------------------------------------- MonarchLinear


def _layer_dense(layer):
    """The layer's (out, in) matrix from the oracle: pad, then cut (spec §2)."""
    M = monarch_dense(layer.blkdiag1.detach().double(), layer.blkdiag2.detach().double())
    return M[: layer.out_features, : layer.in_features]


@pytest.mark.parametrize("size", LAYER_SIZES)
def test_monarch_linear_shapes_and_init(size):
    n, m, b = size
    layer = pysnell.MonarchLinear(n, m, nblocks=b)
    in_blk, out_blk = -(-n // b), -(-m // b)
    if b * in_blk < b * out_blk:
        expected = ((b, in_blk, in_blk), (b, out_blk, in_blk))
    else:
        expected = ((b, out_blk, in_blk), (b, out_blk, out_blk))
    assert (tuple(layer.blkdiag1.shape), tuple(layer.blkdiag2.shape)) == expected
    for w in (layer.blkdiag1, layer.blkdiag2):
        assert float(w.detach().abs().max()) <= 1 / w.shape[-1] ** 0.5
    assert layer.bias.shape == (m,)


@pytest.mark.parametrize("size", LAYER_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_monarch_linear_equals_dense_oracle(seed, size, dtype):
    n, m, b = size
    layer = pysnell.MonarchLinear(n, m, nblocks=b, dtype=dtype)
    x = torch.randn(2, 3, n, dtype=dtype)
    expected = x.double() @ _layer_dense(layer).t() + layer.bias.double()
    y = layer(x)
    assert y.shape == (2, 3, m) and y.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), expected, rtol=tol["rtol"], atol=tol["atol"])
    torch.testing.assert_close(layer.dense_weight().double(), _layer_dense(layer), rtol=tol["rtol"], atol=tol["atol"])


@pytest.mark.parametrize("size", [(10, 7, 3), (13, 29, 4), (12, 12, 4)])
def test_monarch_linear_gradcheck_padded(seed, size):
    n, m, b = size
    layer = pysnell.MonarchLinear(n, m, nblocks=b, dtype=torch.float64)
    params = {k: v.detach().clone().requires_grad_() for k, v in layer.named_parameters()}
    x = torch.randn(4, n, dtype=torch.float64, requires_grad=True)

    def f(x, w1, w2, bias):
        return torch.func.functional_call(layer, {"blkdiag1": w1, "blkdiag2": w2, "bias": bias}, (x,))

    torch.autograd.gradcheck(f, (x, params["blkdiag1"], params["blkdiag2"], params["bias"]))


def test_monarch_linear_empty_batch_and_non_contiguous(seed):
    layer = pysnell.MonarchLinear(10, 7, nblocks=3)
    x = torch.randn(0, 10, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 7)
    y.sum().backward()
    assert x.grad.shape == (0, 10) and torch.equal(layer.blkdiag2.grad, torch.zeros_like(layer.blkdiag2))
    big = torch.randn(5, 21)
    xs = big[:, ::2][:, :10]
    assert not xs.is_contiguous()
    torch.testing.assert_close(layer(xs), layer(xs.contiguous()))


# ---------------------------------------------------------------- projection


@pytest.mark.parametrize("size", LAYER_SIZES)
def test_projection_recovers_a_monarch_matrix(seed, size):
    n, m, b = size
    w1_shape, w2_shape = monarch_shapes(n, m, b)
    w1, w2 = _factors(w1_shape, w2_shape)
    full = monarch_dense(w1, w2)
    # the layer's (out, in) cut, zero-padded again, is still a Monarch matrix: recovered exactly
    target = torch.zeros_like(full)
    target[:m, :n] = full[:m, :n]
    p1, p2 = pysnell.monarch_project(full[:m, :n], b)
    assert p1.shape == w1_shape and p2.shape == w2_shape
    torch.testing.assert_close(monarch_dense(p1, p2), target, rtol=1e-9, atol=1e-9)


def _block_ranks(w1_shape, w2_shape):
    """rank[li][ki] = #{ri : (ri·l + li) div q = ki}: the rank of block (li, ki) (spec §3)."""
    k, q, _ = w1_shape
    l, _, r = w2_shape
    ranks = [[0] * k for _ in range(l)]
    for li in range(l):
        for ri in range(r):
            ranks[li][(ri * l + li) // q] += 1
    return ranks


@pytest.mark.parametrize("size", [(16, 16, 4), (12, 12, 4), (8, 20, 2), (20, 8, 2)])
def test_projection_is_the_best_per_block_approximation(seed, size):
    # For a generic dense matrix the residual must equal, block by block, the singular values the
    # truncated SVD discards (Eckart–Young): checked from the spec's block formula, not the code.
    n, m, b = size
    w1_shape, w2_shape = monarch_shapes(n, m, b)
    l, s, _ = w2_shape
    k, _, p = w1_shape
    W = torch.randn(m, n, dtype=torch.float64)
    p1, p2 = pysnell.monarch_project(W, b)
    residual = W - monarch_dense(p1, p2)
    ranks = _block_ranks(w1_shape, w2_shape)
    for li in range(l):
        for ki in range(k):
            rows = torch.arange(s) * l + li
            cols = torch.arange(p) + ki * p
            block = W[rows][:, cols]
            sv = torch.linalg.svdvals(block)
            expected = float(sv[ranks[li][ki] :].square().sum())
            got = float(residual[rows][:, cols].square().sum())
            assert abs(got - expected) <= 1e-9 * (1 + float(sv.square().sum())), (li, ki)


def test_square_b_squared_blocks_are_rank_one(seed):
    ranks = _block_ranks(*monarch_shapes(16, 16, 4))
    assert all(r == 1 for row in ranks for r in row)


@pytest.mark.parametrize("size", [(16, 16, 4), (10, 7, 3), (13, 29, 4)])
def test_from_linear(seed, size):
    n, m, b = size
    w1, w2 = _factors(*monarch_shapes(n, m, b), torch.float32)
    linear = torch.nn.Linear(n, m)
    with torch.no_grad():
        linear.weight.copy_(monarch_dense(w1, w2)[:m, :n])
    layer = pysnell.MonarchLinear.from_linear(linear, nblocks=b)
    assert layer.blkdiag1.dtype == linear.weight.dtype and layer.nblocks == b
    assert torch.equal(layer.bias, linear.bias)
    x = torch.randn(6, n)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-4, atol=1e-4)
    no_bias = pysnell.MonarchLinear.from_linear(torch.nn.Linear(n, m, bias=False), nblocks=b)
    assert no_bias.bias is None


@pytest.mark.parametrize(
    ("n_in", "n_out", "nblocks"), [(64, 48, 4), (30, 50, 3), (17, 17, 9), (12, 40, 2), (96, 96, 1)]
)
def test_dense_oracle_einsum_equals_its_formula_term_by_term(n_in, n_out, nblocks):
    w1s, w2s = monarch_shapes(n_in, n_out, nblocks)
    w1, w2 = torch.randn(w1s, dtype=torch.float64), torch.randn(w2s, dtype=torch.float64)
    torch.testing.assert_close(monarch_dense(w1, w2), monarch_dense_by_terms(w1, w2), rtol=1e-12, atol=1e-12)
