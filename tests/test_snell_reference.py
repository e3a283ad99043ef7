"""SNELL merge and sparsification: Functions vs direct transcriptions of spec/SNELL.md §2–3."""

import pytest
import torch
from oracles import lerp_at, sort_threshold
from oracles import merge as merge_oracle
from oracles import sparsify as sparsify_oracle

import pysnell
from pysnell.ops.snell.function import SparsifyFunction

KERNELS = ["piecewise", "linear", "rbf", "sigmoid", "snella"]
MODES = ["reference", "paper", "mask"]
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=1e-2),
}

# Gradients of ‖b − a‖ subtract nearly equal terms when points are close (spec §2's closed form and
# autograd alike), so elementwise float32 tolerances are meaningless there: relative RMSE instead.
# Scalar parameters' gradients are single sums of m·n signed terms: a looser bound for those.
GRAD_RMSE = {torch.float64: 1e-10, torch.float32: 3e-5}


def assert_rel_rmse(got, expected, tol, name=""):
    got, expected = got.double(), expected.double()
    if expected.numel() <= 3:
        tol *= 10
    err = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
    assert err <= tol, f"{name}: relative RMSE {err:.3g} > {tol:.3g}"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e3 * tol * float(expected.abs().max()), msg=name)


def _factors(m, n, r, dtype=torch.float64, requires_grad=True):
    A = torch.randn(r, n, dtype=dtype) * 0.5
    B = torch.randn(m, r, dtype=dtype) * 0.5
    return A.requires_grad_(requires_grad), B.requires_grad_(requires_grad)


def _kernel_tensors(pieces, dtype=torch.float64):
    """Non-default learnable coefficients and scalars (γ away from 0 for snella's softmax temperature)."""
    coeffs = (torch.rand(pieces, dtype=dtype) - 0.5).requires_grad_()
    alpha = (torch.rand((), dtype=dtype) + 0.5).requires_grad_()
    beta = (torch.rand((), dtype=dtype) * 0.5 + 0.2).requires_grad_()
    gamma = (torch.rand((), dtype=dtype) + 0.5).requires_grad_()
    return coeffs, alpha, beta, gamma


# ---------------------------------------------------------------- kernel merge


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("out_groups, pieces", [(1, 2), (3, 2), (1, 1), (3, 3)])
def test_kernel_merge_gradcheck(seed, kernel, out_groups, pieces):
    A, B = _factors(m=6, n=5, r=2 * pieces)
    params = _kernel_tensors(pieces)

    def f(A, B, coeffs, alpha, beta, gamma):
        return pysnell.kernel_merge(
            A, B, kernel, pieces, coeffs=coeffs, alpha=alpha, beta=beta, gamma=gamma, out_groups=out_groups
        )

    # one full Jacobian per kernel; the other layouts check random projections of it
    torch.autograd.gradcheck(f, (A, B, *params), fast_mode=(out_groups, pieces) != (1, 2))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_merge_matches_cdist_transcription(seed, kernel, dtype):
    m, n, r, pieces, groups = 33, 19, 6, 3, 3
    A, B = _factors(m, n, r, dtype)
    params = _kernel_tensors(pieces, dtype)
    kw = dict(coeffs=params[0], alpha=params[1], beta=params[2], gamma=params[3], out_groups=groups)
    got = pysnell.kernel_merge(A, B, kernel, pieces, **kw)
    expected = merge_oracle(A, B, kernel, pieces, *params, out_groups=groups)
    torch.testing.assert_close(got, expected, **TOL[dtype])
    # hand-written backward vs autograd through cdist, the oracle in float64
    G = torch.randn(m, n, dtype=dtype)
    inputs = (A, B) + tuple(params)
    inputs64 = tuple(t.detach().double().requires_grad_() for t in inputs)
    expected64 = merge_oracle(*inputs64[:2], kernel, pieces, *inputs64[2:], out_groups=groups)
    got_grads = torch.autograd.grad(got, inputs, G, allow_unused=True)
    exp_grads = torch.autograd.grad(expected64, inputs64, G.double(), allow_unused=True)
    for name, g, e in zip(("A", "B", "coeffs", "alpha", "beta", "gamma"), got_grads, exp_grads):
        if e is None:
            assert g is None or torch.count_nonzero(g) == 0, name
        else:
            assert_rel_rmse(g, e, GRAD_RMSE[dtype], name)


def test_kernel_merge_default_piecewise_coefficients(seed):
    A, B = _factors(7, 9, 4, torch.float32, requires_grad=False)
    got = pysnell.kernel_merge(A, B)  # piecewise, pieces 2, scale 0.1: c = [+0.1, -0.1]
    d1 = torch.cdist(B[:, :2], A[:2].t())
    d2 = torch.cdist(B[:, 2:], A[2:].t())
    torch.testing.assert_close(got, 0.1 * d1 - 0.1 * d2, **TOL[torch.float32])
    torch.testing.assert_close(pysnell.kernel_merge(A, B, scale=0.3), 0.3 * d1 - 0.3 * d2, **TOL[torch.float32])


def test_piecewise_gradient_at_zero_distance_is_the_subgradient(seed):
    A, B = _factors(5, 4, 4, requires_grad=False)
    B[2, :2] = A[:2, 1]  # δ_0[2, 1] = 0
    B[0, 2:] = A[2:, 3]  # δ_1[0, 3] = 0
    A.requires_grad_()
    B.requires_grad_()
    G = torch.randn(5, 4, dtype=torch.float64)
    got = torch.autograd.grad(pysnell.kernel_merge(A, B), (A, B), G)
    expected = torch.autograd.grad(merge_oracle(A, B), (A, B), G)
    for g, e in zip(got, expected):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, e)


def test_piecewise_merge_is_numerically_full_rank(seed):
    A, B = _factors(48, 40, 4, torch.float64, requires_grad=False)
    assert torch.linalg.matrix_rank(pysnell.kernel_merge(A, B)) == 40
    assert torch.linalg.matrix_rank(pysnell.kernel_merge(A, B, "linear")) == 4


# ---------------------------------------------------------------- sparsify


@pytest.mark.parametrize("out_groups", [1, 3])
def test_sparsify_gradcheck_mask_mode(seed, out_groups):
    delta = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda d: pysnell.sparsify(d, 0.55, "mask", out_groups=out_groups), (delta,))


@pytest.mark.parametrize("mode", MODES)
def test_sparsify_gradcheck_at_sparsity_zero(seed, mode):
    delta = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda d: pysnell.sparsify(d, 0.0, mode), (delta,))
    assert torch.equal(pysnell.sparsify(delta, 0.0, mode), delta)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("out_groups", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.1234])
def test_sparsify_matches_quantile_transcription(seed, mode, out_groups, dtype, sparsity):
    delta = torch.randn(39, 53, dtype=dtype).requires_grad_()
    got = pysnell.sparsify(delta, sparsity, mode, out_groups=out_groups)
    expected = sparsify_oracle(delta, sparsity, mode, out_groups)
    if sparsity > 0:
        assert torch.equal(got != 0, expected != 0)  # identical kept sets to torch.quantile's
    if mode == "paper":
        # S = ΔW·(|ΔW| − t) depends on t's last float32 bit near the threshold: the spec's exact rule
        expected = sparsify_oracle(delta, sparsity, mode, out_groups, threshold=sort_threshold)
    torch.testing.assert_close(got, expected, **TOL[dtype])
    if sparsity > 0:
        kept_per_group = (got != 0).reshape(out_groups, -1).sum(1)
        n_group = delta.numel() // out_groups
        assert (kept_per_group <= n_group - int(sparsity * (n_group - 1))).all()
    # the hand-written backward vs autograd with .detach() where the spec says sg / constant
    G = torch.randn_like(got)
    (g,) = torch.autograd.grad(got, delta, G)
    (e,) = torch.autograd.grad(expected, delta, G)
    torch.testing.assert_close(g, e, **TOL[dtype])


def test_sparsify_mode_gradients_are_the_spec_formulas(seed):
    delta = torch.randn(21, 17, dtype=torch.float64, requires_grad=True)
    G = torch.randn(21, 17, dtype=torch.float64)
    mag = delta.detach().abs()
    t = torch.quantile(mag.float().reshape(-1).double(), 0.7).float().double()
    M = mag.float() > t.float()
    for mode, factor in (("reference", mag), ("paper", 2 * mag - t), ("mask", torch.ones_like(mag))):
        (g,) = torch.autograd.grad(pysnell.sparsify(delta, 0.7, mode), delta, G)
        torch.testing.assert_close(g, G * factor * M, rtol=1e-6, atol=1e-9)


def test_sparsify_accepts_a_sparsity_tensor(seed):
    delta = torch.randn(9, 10)
    s = torch.tensor(0.45, dtype=torch.float64)
    assert torch.equal(pysnell.sparsify(delta, s), pysnell.sparsify(delta, 0.45))
    assert torch.equal(pysnell.sparsify(delta, torch.tensor(0.0, dtype=torch.float64)), delta)


def test_sparsify_drops_nan_and_keeps_inf(seed):
    delta = torch.randn(8, 9)
    delta[1, 2] = float("nan")
    delta[4, 4] = float("-inf")
    for mode in MODES:
        S = pysnell.sparsify(delta, 0.5, mode)
        assert S[1, 2] == 0 and S[4, 4] == float("-inf")
        torch.testing.assert_close(S, sparsify_oracle(delta, 0.5, mode))


def test_sparsify_saves_delta_and_thresholds_only(seed):
    delta = torch.randn(6, 10, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        SparsifyFunction.apply(delta, 0.5, "reference", 2)
    assert [tuple(t.shape) for t in saved] == [(6, 10), (2,)]


def test_sparsify_above_two_to_the_24_elements(seed):
    # torch.quantile refuses more than 2^24 elements. The sorted magnitudes are known by construction:
    # float32 bit patterns of positive floats order like the integers, so a cumulative sum of random
    # steps, viewed as float32, is a sorted distinct vector. The threshold then comes from the spec's
    # rule on that sort; the matrix is a scrambled (transposed, row-flipped, random-sign) copy.
    rows = cols = 4100
    n = rows * cols
    assert n > 2**24
    v = torch.randint(1, 3, (n,), dtype=torch.int32).cumsum_(0).add_(0x3F800000).view(torch.float32)
    delta = v.view(rows, cols).t().contiguous()
    delta[1::2] = delta[1::2].flip(1)
    delta = torch.where(torch.rand(rows, cols) < 0.5, -delta, delta)
    s = 0.9 + 0.09 * float(torch.rand(()))
    t = lerp_at(v, s)
    S = pysnell.sparsify(delta, s, "mask")
    kept = S != 0
    assert torch.equal(kept, delta.abs() > t)
    assert torch.equal(S[kept], delta[kept])
    # distinct values: exactly the entries above v[lo], one fewer where float32 rounded t onto v[hi]
    lo = int(s * (n - 1))
    assert int(kept.sum()) == n - 1 - lo - int(bool(t == v[lo + 1]))


def test_coordinatewise_distance_matches_cdist(seed):
    """The GPU path of piece_distance (one pass per coordinate), checked on the CPU."""
    from pysnell.ops.snell.reference import coordinatewise_distance

    for d in (1, 3, 4):
        B = torch.randn(37, d, dtype=torch.float64)
        A = torch.randn(d, 23, dtype=torch.float64)
        want = torch.cdist(B[None], A.t()[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
        torch.testing.assert_close(coordinatewise_distance(B, A), want, rtol=1e-12, atol=1e-12)
    B32, A32 = torch.randn(50, 4), torch.randn(4, 31)
    torch.testing.assert_close(
        coordinatewise_distance(B32, A32), coordinatewise_distance(B32.double(), A32.double()).float()
    )
