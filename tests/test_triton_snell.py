"""Triton SNELL layer (triton_kernels/snell.py) against the torch backend.

CPU: the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest) with
fp32 data and small odd shapes; every buffer a kernel must write starts as NaN (snell.POISON).
The distances are computed differently from torch.cdist, so ΔW and the thresholds agree to the
last bits only; sparsities are chosen half-way between two order statistics (weight 0.5) and a
draw with a reference entry within 1e-5 of a threshold is redrawn, so that the kept sets must be
identical. test_kept_set_outside_rounding_band checks the kept set with ties allowed.
GPU (marked): bf16 and fp32 at the benchmark shapes.
"""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch
import torch.nn.functional as F
from oracles import random_kernel_scalars, rel_rmse

from pysnell import _backend
from pysnell.functional import kernel_merge, kernel_params, snell_linear
from pysnell.ops.snell import function as fn
from pysnell.ops.snell import reference as ref
from pysnell.ops.snell.reference import KernelParams, SnellSpec

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)
ts = pytest.importorskip("pysnell.triton_kernels.snell")

ALL_NEEDS = (True,) * 9
# The interpreter evaluates masked-out lanes too (rsqrt(0), -inf - -inf): numpy warns, results are masked.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(ts, "POISON", True)


def _mid_sparsity(target: float, n: int) -> float:
    """A sparsity whose quantile position s·(n-1) sits half-way between two ranks (weight 0.5)."""
    lo = min(max(int(target * (n - 1)), 0), n - 2)
    return (lo + 0.5) / (n - 1)


def _params(kernel, r, pieces, n, device, learnable=True):
    """Kernel tensors: random coefficients when learnable, snella scalars away from their init."""
    A = torch.empty(r, n, device=device)
    coeffs, alpha, beta, gamma = kernel_params(A, kernel, pieces, 0.1)
    if learnable and kernel != "linear":
        coeffs = coeffs * (1 + 0.5 * torch.rand_like(coeffs))
    if kernel in ("snella", "rbf", "sigmoid"):
        alpha, beta, gamma = random_kernel_scalars(kernel, device)
    return KernelParams(coeffs, alpha, beta, gamma)


def _factors(r, n, m, groups, pieces, device, scale=1.0):
    d = r // pieces
    A = (torch.rand(r, n, device=device) * 2 - 1) * scale / math.sqrt(n * d) * 4
    B = (torch.rand(m, r, device=device) * 2 - 1) * scale / math.sqrt(m // groups * d) * 4
    return A, B


def _near_threshold(delta, thresholds, groups, tol=1e-5):
    """Mask (delta's shape) of the entries within rounding of their group's threshold: where two
    backends, each computing ΔW in its own rounding, may decide differently."""
    mag = delta.abs().reshape(groups, -1)
    t = thresholds.reshape(groups, 1)
    scale = mag.max(dim=1, keepdim=True).values
    return ((mag - t).abs() <= tol * t.abs() + 1e-6 * scale).view(delta.shape)


def _ambiguous(delta, thresholds, groups, tol=1e-5):
    """How many reference entries lie within rounding of a threshold."""
    return _near_threshold(delta, thresholds, groups, tol).sum().item()


def _close(got, want, rtol, what):
    """Max error relative to the reference's largest entry (long reductions, mixed signs)."""
    assert got is not None and want is not None, what
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten poisoned output?)"
    scale = want.abs().max().clamp_min(1e-30)
    err = ((got.double() - want.double()).abs().max() / scale).item()
    assert err <= rtol, f"{what}: max error {err:.2e} of max |ref| > {rtol:.0e}"


def _as_accurate(got, want32, want64, what, slack=10.0):
    """As accurate as the torch fp32 backend: error against a float64 evaluation of the reference
    at most `slack` times the torch fp32 error, plus 2e-6 of the largest entry. `want32` may be a
    list of fp32 evaluations in different summation orders: their worst error is the fp32 noise
    (one order can be lucky on a sum that cancels, e.g. dα = Σ G·K over every entry)."""
    assert got is not None and want64 is not None, what
    assert got.shape == want64.shape, (what, got.shape, want64.shape)
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten poisoned output?)"
    err = (got.double() - want64).abs().max().item()
    evaluations = want32 if isinstance(want32, (list, tuple)) else [want32]
    base = max((w.double() - want64).abs().max().item() for w in evaluations)
    bound = slack * base + 2e-6 * want64.abs().max().item()
    assert err <= bound, f"{what}: error {err:.2e} vs float64, torch fp32 error {base:.2e}"


def _double(*tensors):
    return [None if t is None else t.double() if isinstance(t, torch.Tensor) else t for t in tensors]


def _torch_grads_reordered(dy, x, W, A, B, params, spec, s, t, needs):
    """The torch backend's gradients with the output rows permuted inside each group (the same math
    summed in another order), mapped back to the original rows."""
    groups, m = spec.out_groups, B.shape[0]
    m_g = m // groups
    perm = torch.cat([g * m_g + torch.randperm(m_g) for g in range(groups)])
    inv = torch.argsort(perm)
    pick = lambda t_, dim: None if t_ is None else t_.index_select(dim, perm)
    g = fn._torch_layer_backward(dy[:, perm], x, pick(W, 0), A, B[perm], params, spec, s, t, needs)
    dx, dW, dbias, dA, dB, *scalars = g
    unpick = lambda t_, dim: None if t_ is None else t_.index_select(dim, inv)
    return (dx, unpick(dW, 0), unpick(dbias, 0), dA, unpick(dB, 0), *scalars)


def _draw(kernel, mode, groups, m, n, r, T, pieces, sparsity, has_weight, device):
    """Fresh data whose reference has no entry within rounding of a threshold (redrawn otherwise)."""
    for _ in range(6):
        A, B = _factors(r, n, m, groups, pieces, device)
        params = _params(kernel, r, pieces, n, device)
        spec = SnellSpec(kernel, pieces, mode, groups)
        delta = ref.merge(A, B, params, spec)
        t_ref = fn.thresholds_for(delta, sparsity, groups)
        if ref.known_zero_sparsity(sparsity) or _ambiguous(delta, t_ref, groups) == 0:
            break
    else:
        pytest.fail("could not draw data away from the threshold")
    x = torch.randn(T, n, device=device)
    W = torch.randn(m, n, device=device) / math.sqrt(n) if has_weight else None
    bias = torch.randn(m, device=device) if has_weight else None
    dy = torch.randn(T, m, device=device)
    return A, B, params, spec, x, W, bias, dy


# (kernel, mode, groups, out, r, target sparsity, sparsity kind, weight?)
CASES = [
    ("piecewise", "reference", 1, 21, 8, 0.9, "float", True),
    ("piecewise", "paper", 3, 27, 4, 0.6, "tensor", True),
    ("piecewise", "mask", 3, 27, 8, 0.3, "float", False),
    ("piecewise", "reference", 1, 21, 4, 0.0, "float", True),
    ("piecewise", "reference", 3, 27, 8, 0.0, "tensor", True),
    ("linear", "reference", 3, 27, 8, 0.75, "float", True),
    ("linear", "paper", 1, 21, 4, 0.5, "tensor", False),
    ("linear", "mask", 1, 21, 8, 0.9, "float", True),
    ("snella", "reference", 3, 27, 8, 0.9, "tensor", True),
    ("snella", "paper", 1, 21, 4, 0.4, "float", True),
    ("snella", "mask", 3, 27, 4, 0.7, "float", False),
    ("snella", "reference", 1, 21, 8, 0.0, "float", True),
    ("rbf", "reference", 3, 27, 8, 0.9, "tensor", True),
    ("rbf", "paper", 1, 21, 4, 0.5, "float", False),
    ("rbf", "mask", 1, 21, 8, 0.0, "float", True),
    ("sigmoid", "reference", 1, 21, 8, 0.8, "float", True),
    ("sigmoid", "mask", 3, 27, 4, 0.6, "tensor", True),
    ("sigmoid", "paper", 3, 27, 8, 0.0, "float", False),
    # ranks above 16: the rank sums run as loops, not unrolled (and wider padded ranks)
    ("piecewise", "reference", 3, 27, 20, 0.9, "float", True),
    ("snella", "paper", 1, 21, 24, 0.7, "tensor", False),
    ("rbf", "mask", 1, 21, 18, 0.6, "float", True),
    ("linear", "reference", 1, 21, 17, 0.8, "float", True),
]


def _sparsity_value(target, kind, groups, m, n, device):
    s = _mid_sparsity(target, (m // groups) * n) if target > 0 else 0.0
    if kind == "tensor":
        return torch.tensor(s, dtype=torch.float64, device=device)
    return s


@pytest.mark.parametrize("kernel,mode,groups,m,r,target,kind,has_weight", CASES)
def test_layer_matches_torch_backend(seed, kernel, mode, groups, m, r, target, kind, has_weight):
    n, T, pieces = 19, 7, 2
    s = _sparsity_value(target, kind, groups, m, n, "cpu")
    A, B, params, spec, x, W, bias, dy = _draw(kernel, mode, groups, m, n, r, T, pieces, s, has_weight, "cpu")
    y_ref, t_ref = fn._torch_layer_forward(x, W, bias, A, B, params, spec, s)
    y, t = ts.layer_forward(x, W, bias, A, B, params, spec, s)
    assert t.shape == (groups,) and t.dtype == torch.float32
    delta = ref.merge(A, B, params, spec)
    scale = delta.abs().reshape(groups, -1).max(dim=1).values
    assert ((t - t_ref).abs() <= 1e-5 * t_ref.abs() + 1e-6 * scale).all(), (t, t_ref)
    _close(y, y_ref, 1e-5, "y")

    needs = (True, has_weight, has_weight) + (True,) * 6
    g_ref = fn._torch_layer_backward(dy, x, W, A, B, params, spec, s, t_ref, needs)
    g_reordered = _torch_grads_reordered(dy, x, W, A, B, params, spec, s, t_ref, needs)
    p64 = KernelParams(*_double(*params))
    g_64 = fn._torch_layer_backward(*_double(dy, x, W, A, B), p64, spec, s, t_ref, needs)
    g = ts.layer_backward(dy, x, W, A, B, params, spec, s, t, needs)
    names = ("dx", "dweight", "dbias", "dA", "dB", "dcoeffs", "dalpha", "dbeta", "dgamma")
    for name, got, want, want2, want64 in zip(names, g, g_ref, g_reordered, g_64):
        if want is None:
            assert got is None, name
            continue
        _as_accurate(got, [want, want2], want64, name)


@pytest.mark.parametrize("value", [float("nan"), -0.5, 1.5, float("inf")])
def test_unchecked_device_sparsity_follows_the_torch_backend(seed, value):
    # A GPU sparsity buffer is never read on the host, so nothing validates it: whatever it holds,
    # the selection must be the reference's (position nan_to_num'd, then clamped to the ranks).
    # The threshold lands on each group's smallest or largest |ΔW|: all but that entry, or nothing, is kept.
    kernel, mode, groups, m, n, r, T = "piecewise", "reference", 3, 27, 19, 8, 7
    s = torch.tensor(value, dtype=torch.float64)
    A, B = _factors(r, n, m, groups, 2, "cpu")
    params = _params(kernel, r, 2, n, "cpu")
    spec = SnellSpec(kernel, 2, mode, groups)
    x, dy = torch.randn(T, n), torch.randn(T, m)
    W, bias = torch.randn(m, n) / math.sqrt(n), torch.randn(m)
    y_ref, t_ref = fn._torch_layer_forward(x, W, bias, A, B, params, spec, s)
    y, t = ts.layer_forward(x, W, bias, A, B, params, spec, s)
    scale = ref.merge(A, B, params, spec).abs().reshape(groups, -1).max(dim=1).values
    assert ((t - t_ref).abs() <= 1e-5 * t_ref.abs() + 1e-6 * scale).all(), (t, t_ref)
    _close(y, y_ref, 1e-5, "y")
    needs = (True,) * 9
    g_ref = fn._torch_layer_backward(dy, x, W, A, B, params, spec, s, t_ref, needs)
    g = ts.layer_backward(dy, x, W, A, B, params, spec, s, t, needs)
    for name, got, want in zip(("dx", "dweight", "dbias", "dA", "dB"), g, g_ref):
        _close(got, want, 1e-4, name)


def test_several_programs_per_kernel(seed, monkeypatch):
    """16-wide tiles: several programs per pass, so the last-program finalisation and the split
    partial reductions run across programs (and across groups)."""
    monkeypatch.setattr(ts, "INTERPRET_TILE", 16)
    kernel, mode, groups, m, n, r, T = "piecewise", "paper", 3, 54, 37, 8, 5
    s = _mid_sparsity(0.8, (m // groups) * n)
    A, B, params, spec, x, W, bias, dy = _draw(kernel, mode, groups, m, n, r, T, 2, s, True, "cpu")
    y_ref, t_ref = fn._torch_layer_forward(x, W, bias, A, B, params, spec, s)
    y, t = ts.layer_forward(x, W, bias, A, B, params, spec, s)
    _close(t, t_ref, 1e-5, "thresholds")
    _close(y, y_ref, 1e-5, "y")
    g_ref = fn._torch_layer_backward(dy, x, W, A, B, params, spec, s, t_ref, ALL_NEEDS)
    g = ts.layer_backward(dy, x, W, A, B, params, spec, s, t, ALL_NEEDS)
    for name, got, want in zip(("dx", "dweight", "dbias", "dA", "dB", "dcoeffs"), g, g_ref):
        _close(got, want, 1e-4 if name == "dcoeffs" else 2e-5, name)
    # Deterministic: the same call gives the same bits (no atomics in any floating-point sum).
    g2 = ts.layer_backward(dy, x, W, A, B, params, spec, s, t, ALL_NEEDS)
    for got, again in zip(g[3:6], g2[3:6]):
        assert torch.equal(got, again)


def _selection_case(m, n, groups):
    A, B = _factors(8, n, m, groups, 2, "cpu")
    params = _params("piecewise", 8, 2, n, "cpu", learnable=False)
    spec = SnellSpec("piecewise", 2, "reference", groups)
    return A, B, params, spec


@pytest.mark.parametrize("scenario", ["bracket", "miss"])
def test_pilot_selection_and_fallback(seed, monkeypatch, scenario):
    """Large matrices first bracket the quantile from a sample. 'bracket': the first full pass finds
    both ranks inside the bracket, one more pass at most resolves them, the last fallback pass
    never runs. 'miss': every sample hits entry 0, the bracket misses, and the fallback passes still
    find the exact order statistics."""
    m, n, groups = 27, 19, 3
    monkeypatch.setattr(ts, "PILOT_MIN_NUMEL", 0)
    monkeypatch.setattr(ts, "PILOT_SAMPLES", 32)
    monkeypatch.setattr(ts, "LARGE_BINS_LOG", 12)  # 2^12 bins: small histograms for the interpreter
    monkeypatch.setattr(ts, "KEEP_DEBUG_STATE", True)
    if scenario == "miss":
        monkeypatch.setattr(ts, "_SAMPLE_MULT", 2 * (m // groups) * n)  # k·MULT ≡ 0 (mod N)
        monkeypatch.setattr(ts, "PILOT_Z", 0.0)  # bracket = the pilot bin of entry 0
    A, B, params, spec = _selection_case(m, n, groups)
    numel = (m // groups) * n
    for target in (0.7, 0.05) if scenario == "bracket" else (0.7,):
        s = _mid_sparsity(target, numel)
        geo = ts._Geometry(A, B, params, spec)
        t = ts._select(geo, None, ts._sparsity_device(s, A.device))
        delta = ref.merge(A, B, params, spec)
        t_ref = fn.thresholds_for(delta, s, groups)
        scale = delta.abs().reshape(groups, -1).max(dim=1).values
        assert ((t - t_ref).abs() <= 1e-5 * t_ref.abs() + 1e-6 * scale).all(), (t, t_ref)
        state, counters, used_pilot = ts.last_selection
        assert used_pilot
        assert ((state[:, 3] & 2) != 0).all(), "selection did not finish"
        ran = [(counters[p].view(groups, 8)[:, 0] > 0).tolist() for p in range(counters.shape[0])]
        lo = math.floor(s * (numel - 1))
        first = counters[1].view(groups, 8)  # the pass over the bracket
        inside = [bool(first[g, 1] <= lo < first[g, 1] + first[g, 2]) for g in range(groups)]
        if scenario == "bracket":
            assert all(inside), "a 6-sigma bracket missed the quantile"
            assert ran[-1] == [False] * groups, ran
        else:
            assert not all(inside), "the degenerate sample should miss"
            assert any(ran[2]), ran  # rows: pilot, bracket pass, fallback passes


def test_kept_set_outside_rounding_band(seed):
    """S from the kernels (a forward on the identity) keeps exactly the reference's entries,
    except entries within rounding of the threshold; includes an integral quantile position
    (weight 0: the threshold is an entry itself)."""
    m, n, groups = 27, 19, 3
    A, B = _factors(8, n, m, groups, 2, "cpu")
    params = _params("piecewise", 8, 2, n, "cpu")
    numel = (m // groups) * n
    for s, mode in ((60 / (numel - 1), "mask"), (0.37, "reference")):
        spec = SnellSpec("piecewise", 2, mode, groups)
        eye = torch.eye(n)
        S_t, t = ts.layer_forward(eye, None, None, A, B, params, spec, s)  # rows of Sᵀ
        delta = ref.merge(A, B, params, spec)
        t_ref = fn.thresholds_for(delta, s, groups)
        keep_ref = (delta.abs().reshape(groups, -1) > t_ref.view(groups, 1)).reshape(m, n)
        keep = S_t.t() != 0
        mag = delta.abs().reshape(groups, -1)
        band = ((mag - t_ref.view(groups, 1)).abs() <= 1e-5 * mag.max(dim=1, keepdim=True).values).reshape(m, n)
        assert torch.equal(keep & ~band, keep_ref & ~band)
        per_group = keep.reshape(groups, -1).sum(1)
        want = torch.tensor([numel - math.floor(s * (numel - 1)) - 1] * groups)
        assert (per_group - want).abs().max() <= band.reshape(groups, -1).sum(1).max()


def test_nan_entries_rank_lowest(seed):
    """A NaN factor row makes ΔW rows NaN: they rank below every number and are never kept."""
    m, n, groups = 21, 19, 1
    A, B = _factors(8, n, m, groups, 2, "cpu")
    B[3] = float("nan")
    params = _params("piecewise", 8, 2, n, "cpu")
    spec = SnellSpec("piecewise", 2, "reference", groups)
    x, W = torch.randn(5, n), torch.randn(m, n)
    for target in (0.02, 0.5):  # inside the NaN block, and above it
        s = _mid_sparsity(target, m * n)
        y_ref, t_ref = fn._torch_layer_forward(x, W, None, A, B, params, spec, s)
        y, t = ts.layer_forward(x, W, None, A, B, params, spec, s)
        assert torch.isfinite(y).all()
        assert torch.allclose(t, t_ref, rtol=1e-5, atol=1e-7), (t, t_ref)
        _close(y, y_ref, 1e-5, "y")


def test_through_the_functional_api(seed, backend):
    """snell_linear with the triton backend forced: the Function dispatches to these kernels (3-D
    input, bias, learnable coefficients, a float64 sparsity buffer) and matches the torch backend."""
    m, n, r = 21, 19, 8
    A, B = _factors(r, n, m, 1, 2, "cpu")
    W, bias = torch.randn(m, n), torch.randn(m)
    x = torch.randn(2, 3, n)
    coeffs = torch.tensor([0.1, -0.12])
    s = torch.tensor(_mid_sparsity(0.8, m * n), dtype=torch.float64)
    results = {}
    for name in ("torch", "triton"):
        backend.set_backend(name)
        leaves = [t.clone().requires_grad_() for t in (x, A, B, coeffs)]
        y = snell_linear(leaves[0], W, bias, leaves[1], leaves[2], sparsity=s, kernel="piecewise", coeffs=leaves[3])
        y.pow(2).sum().backward()
        assert backend.last_backend("snell.layer_forward") == name
        assert backend.last_backend("snell.layer_backward") == name
        results[name] = [y.detach()] + [t.grad for t in leaves]
    for what, got, want in zip(("y", "dx", "dA", "dB", "dcoeffs"), results["triton"], results["torch"]):
        _close(got, want, 1e-4 if what == "dcoeffs" else 2e-5, what)


@pytest.mark.parametrize("kernel", ["piecewise", "snella", "rbf", "sigmoid"])
def test_merge_ops(seed, backend, kernel):
    """The "snell.merge" and "snell.merge_backward" ops: ΔW and its gradients through kernel_merge."""
    m, n, r, groups = 27, 19, 4, 3
    A, B = _factors(r, n, m, groups, 2, "cpu")
    params = _params(kernel, r, 2, n, "cpu")
    G = torch.randn(m, n)
    results = {}
    for name in ("torch", "triton"):
        backend.set_backend(name)
        leaves = [t.clone().requires_grad_() for t in (A, B, *params)]
        scalars = {} if kernel == "piecewise" else {"alpha": leaves[3], "beta": leaves[4], "gamma": leaves[5]}
        coeffs = {"coeffs": leaves[2]} if kernel in ("piecewise", "snella") else {}
        delta = kernel_merge(leaves[0], leaves[1], kernel, 2, out_groups=groups, **coeffs, **scalars)
        (delta * G).sum().backward()
        assert backend.last_backend("snell.merge") == name
        used = leaves[:2] + list(coeffs.values()) + list(scalars.values())
        results[name] = [delta.detach()] + [t.grad for t in used]
    for i, (got, want) in enumerate(zip(results["triton"], results["torch"])):
        _close(got, want, 1e-4 if i >= 3 else 2e-5, f"output {i}")


def test_unsupported_calls_fall_back_to_torch(seed, caplog, monkeypatch):
    """float64 factors run the torch implementation, logged once."""
    monkeypatch.setattr(_backend, "_warned", set())
    m, n, r = 21, 19, 4
    x, W = torch.randn(5, n), torch.randn(m, n)
    for kernel, dtype in (("piecewise", torch.float64), ("snella", torch.float64)):
        A, B = (t.to(dtype) for t in _factors(r, n, m, 1, 2, "cpu"))
        params = KernelParams(*(p.to(dtype) for p in kernel_params(A, kernel, 2, 0.1)))
        spec = SnellSpec(kernel, 2, "reference", 1)
        with caplog.at_level(logging.WARNING, logger="pysnell"):
            y, t = ts.layer_forward(x.to(dtype), W.to(dtype), None, A, B, params, spec, 0.5)
            ts.layer_forward(x.to(dtype), W.to(dtype), None, A, B, params, spec, 0.5)
        y_ref, t_ref = fn._torch_layer_forward(x.to(dtype), W.to(dtype), None, A, B, params, spec, 0.5)
        assert torch.equal(y, y_ref) and torch.equal(t, t_ref)
    messages = [r.getMessage() for r in caplog.records if "falls back to torch" in r.getMessage()]
    assert len(messages) == len(set(messages)) >= 1


# ------------------------------------------------------------------------------------------------
# The interpreter accepts programs the GPU compiler rejects: compile every launch for sm_90
# ------------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
import json, os, re, sys, torch
os.environ.pop("TRITON_INTERPRET", None)
# an fp32 add, sub or mul without a rounding mode: ptxas may fuse it into an fma
CONTRACTIBLE = re.compile(r"\b(?:add|sub|mul)(?:\.ftz)?\.f32\b")
from pysnell.triton_kernels._aot import compile_only, resource_usage
import pysnell.triton_kernels.snell as ts
from pysnell.functional import kernel_params
from pysnell.ops.snell.reference import KernelParams, SnellSpec

ts.PILOT_MIN_NUMEL, ts.PILOT_SAMPLES = 0, 64  # the pilot path on a small matrix
m, n, T = 96, 80, 8
report = []
for kernel, dtype, groups, r in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    A, B = torch.rand(r, n) * 0.1, torch.rand(m, r) * 0.1
    params = KernelParams(*kernel_params(A, kernel, 2, 0.1))
    spec = SnellSpec(kernel, 2, "reference", groups)
    x, W, dy = torch.randn(T, n, dtype=dtype), torch.randn(m, n, dtype=dtype), torch.randn(T, m, dtype=dtype)
    with compile_only() as calls:
        ts.layer_forward(x, W, None, A, B, params, spec, 0.9)
        ts.layer_backward(dy, x, W, A, B, params, spec, 0.9, torch.zeros(groups), (True,) * 9)
    for fn, _, _, _, k in calls:
        ptx = k.asm["ptx"]
        report.append(dict(case=[kernel, str(dtype), groups, r], kernel=fn.__name__, **resource_usage(k),
                           contractible=len(CONTRACTIBLE.findall(ptx)), fma=ptx.count("fma.rn.f32")))
for dtype in (torch.float32, torch.bfloat16, torch.float16):  # the branch form's keep-mask kernels
    with compile_only() as calls:
        bits = ts.dropout_pack(torch.rand(T, n + 3) < 0.5)
        for b in (bits, None):
            ts.dropout_apply(torch.randn(T, n + 3).to(dtype), b, torch.rand(T))
    for fn, _, _, _, k in calls:
        report.append(dict(case=["dropout", str(dtype)], kernel=fn.__name__, **resource_usage(k)))
print(json.dumps(report))
"""

# (kernel, dtype, groups, rank): every kernel family, every activation dtype, fused qkv, and the
# wider ranks (rank sums as loops, narrower backward tiles)
_COMPILE_CASES = [
    ("piecewise", "bfloat16", 1, 8),
    ("snella", "float32", 3, 8),
    ("linear", "float16", 1, 8),
    ("rbf", "bfloat16", 3, 8),
    ("sigmoid", "float32", 1, 8),
    ("piecewise", "bfloat16", 1, 32),
    ("piecewise", "float32", 1, 32),
    ("snella", "bfloat16", 3, 32),
]
# Bytes of register spill per thread accepted: the selection pass keeps 8-16 (its per-element
# accumulators); before the rank loops and rank-dependent backward tiles, r = 32 spilled 392-1184.
_MAX_SPILL = 80


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_heavy_spills(tmp_path):
    """Every kernel launch of the layer, forward and backward, pilot path included, compiles to an
    sm_90 cubin (Triton's bundled ptxas), with at most _MAX_SPILL bytes of register spill."""
    import json
    import subprocess
    import sys

    if HAS_CUDA:
        pytest.skip("the GPU tests compile and run the kernels")
    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("no NVIDIA tools bundled with Triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(_COMPILE_CASES)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = {r["kernel"] for r in report}
    assert {
        "_select_pass_kernel",
        "_weff_kernel",
        "_backward_kernel",
        "_reduce_kernel",
        "_column_pass_kernel",
        "_dropout_pack_kernel",
        "_dropout_apply_kernel",
    } <= kernels
    for r in report:
        assert r["stack"] <= _MAX_SPILL, f"register spills: {r}"
    # Every kernel that regenerates ΔW rounds it alike: no FP contraction left to LLVM or ptxas (each
    # fp32 add/sub/mul carries .rn), and the rank sums' explicit fmas are there.
    regenerating = {"_select_pass_kernel", "_weff_kernel", "_backward_kernel", "_column_pass_kernel"}
    for r in report:
        if r["kernel"] in regenerating:
            assert r["contractible"] == 0 and r["fma"] > 0, r


# ------------------------------------------------------------------------------------------------
# GPU: the benchmark shapes, bf16 and fp32, against the torch backend
# ------------------------------------------------------------------------------------------------
# (tokens, in, out, groups, kernel, dtype, sparsity, rank): the two benchmark targets, fused qkv with
# snella, and a device-side sparsity of 0 (S = ΔW, decided on the GPU without a sync).
GPU_CASES = [
    (12608, 768, 3072, 1, "piecewise", torch.bfloat16, 0.9, 8),
    (12608, 768, 3072, 1, "piecewise", torch.float32, 0.9, 8),
    (4096, 4096, 11008, 1, "piecewise", torch.bfloat16, 0.9, 8),
    (2048, 768, 2304, 3, "snella", torch.bfloat16, 0.9, 8),
    (2048, 768, 2304, 3, "snella", torch.float32, 0.5, 8),
    (2048, 768, 768, 1, "piecewise", torch.bfloat16, 0.0, 8),
    (2048, 768, 2304, 3, "rbf", torch.bfloat16, 0.9, 8),
    (2048, 768, 768, 1, "sigmoid", torch.float32, 0.7, 8),
    # wider ranks: rank sums as loops, narrower backward tiles (RP 64 with fp32 G_S, RP 128)
    (4096, 1024, 2048, 1, "piecewise", torch.bfloat16, 0.9, 32),
    (2048, 768, 2304, 3, "snella", torch.float32, 0.7, 32),
    (2048, 768, 768, 1, "rbf", torch.float32, 0.8, 64),
]


def _compare_with_torch_backend(T, n, m, groups, kernel, dtype, target, r, dev):
    """The Triton layer against the torch backend at one shape, forward and backward.

    Both select exactly, but each computes ΔW in its own rounding, so entries within rounding of the
    threshold may be kept by one and dropped by the other. With kernels whose |ΔW| is concentrated
    (rbf, sigmoid, snella) there are hundreds of such entries at a million, and each moves y by a whole
    entry. So the selection is checked entry by entry on Triton's own effective weight: it must equal
    W0 + S (the torch backend's S at Triton's threshold) everywhere except entries within rounding of
    the threshold, and there it must be W0 + S or the opposite decision. y and dx must then be the
    GEMMs of that weight; the factor and kernel-scalar gradients must be the torch backend's math on
    the set Triton kept, the scalars (single sums that cancel) judged against a float64 evaluation."""
    scale = 0.25 if kernel == "piecewise" else 2.0  # spread |ΔW|: the offset kernels concentrate it
    A, B = _factors(r, n, m, groups, 2, dev, scale=scale)
    params = _params(kernel, r, 2, n, dev)
    spec = SnellSpec(kernel, 2, "reference", groups)
    s = torch.tensor(target, dtype=torch.float64, device=dev)
    x = torch.randn(T, n, device=dev, dtype=dtype)
    W = (torch.randn(m, n, device=dev) / math.sqrt(n)).to(dtype)
    bias = torch.randn(m, device=dev, dtype=dtype)
    dy = torch.randn(T, m, device=dev, dtype=dtype)
    y, t = ts.layer_forward(x, W, bias, A, B, params, spec, s)
    delta = ref.merge(A, B, params, spec)
    t_ref = fn.thresholds_for(delta, s, groups)
    peak = delta.abs().reshape(groups, -1).max(dim=1).values
    assert ((t - t_ref).abs() <= 1e-5 * t_ref.abs() + 1e-6 * peak).all(), (t, t_ref)

    # The selection, entry by entry, on Triton's effective weight (fp32: nothing rounded away).
    geo = ts._Geometry(A, B, params, spec)
    stats = ts._column_pass(geo, 0, None) if geo.kernel == 2 else None
    sparsify = target > 0
    w_eff = ts._effective_weight(geo, W, stats, t, ts._sparsity_device(s, dev), sparsify, torch.float32)
    S = ref.sparsify_given_threshold(delta, t, spec.mode, s, groups)
    flipped_S = ref.sparsify_given_threshold(delta, torch.zeros_like(t), spec.mode, s, groups) - S  # kept ↔ dropped
    W32 = W.float()
    close = lambda got, want: (got - want).abs() <= 1e-5 * (want - W32).abs() + 1e-6 * W32.abs() + 1e-7
    same = close(w_eff, W32 + S)
    band = _near_threshold(delta, t, groups) if sparsify else torch.zeros_like(same)
    flip = ~same & band & close(w_eff, W32 + flipped_S)
    wrong = ~(same | flip)
    assert not wrong.any(), f"{int(wrong.sum())} entries of W0 + S wrong, e.g. at {wrong.nonzero()[:5].tolist()}"
    keep = torch.ones_like(same) if not sparsify else ref._keep(delta.abs().view(groups, -1, n), t, groups).view(m, n)
    keep ^= flip  # the set Triton kept
    flips = int(flip.sum())
    # What each entry within rounding of the threshold adds to W0 when kept: the backward kernel
    # regenerates ΔW in its own rounding, so its W_eff may decide those entries the other way.
    band_value = torch.where(band, (S + flipped_S).abs(), torch.zeros((), device=dev))
    del S, flipped_S, same, band, flip, wrong

    # y and dx are GEMMs of that weight; dbias a column sum.
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    w_run = w_eff.to(dtype)
    assert rel_rmse(y, F.linear(x, w_run, bias)) < tol, "y"
    needs = (True, False, True, True, True, True, True, True, True)
    g = ts.layer_backward(dy, x, W, A, B, params, spec, s, t, needs)
    dx_want = (dy @ w_run).float()
    # dx beyond what deciding the threshold's neighbours the other way can move it (|dy|·|those entries|)
    excess = ((g[0].float() - dx_want).abs() - dy.abs().float() @ band_value * (1 + 1e-5)).clamp_min(0)
    assert float(excess.pow(2).mean().sqrt() / dx_want.pow(2).mean().sqrt()) < tol, "dx"
    del band_value, excess, dx_want
    assert rel_rmse(g[2], dy.float().sum(0)) < max(tol, 1e-6), "dbias"
    del w_eff, w_run

    # Factor and scalar gradients: the torch backend's math (G_S as it computes it, then the chain
    # through sparsify and the kernel) on the set Triton kept, in fp32 and (the scalars, single sums
    # that cancel) in float64.
    def grads_on_kept_set(dy, x, A, B, params, delta):
        grad_s = (dy.t() @ x.to(dy.dtype)).to(A.dtype)
        # every entry's ∂S/∂ΔW, then Triton's kept set (mode "reference": G·|ΔW|, 0 where ΔW = 0)
        every = ref.sparsify_backward(grad_s, delta, torch.zeros_like(t), spec.mode, s, groups)
        grad_delta = torch.where(keep, every, torch.zeros((), dtype=every.dtype, device=dev))
        return ref.merge_backward(grad_delta, A, B, params, spec, (True,) * 4)

    want = grads_on_kept_set(dy, x, A, B, params, delta)
    del delta
    params64 = KernelParams(*(v.double() if isinstance(v, torch.Tensor) else v for v in params))
    A64, B64 = A.double(), B.double()
    want64 = grads_on_kept_set(dy.double(), x.double(), A64, B64, params64, ref.merge(A64, B64, params64, spec))
    names = ("dA", "dB", "dc", "da", "db", "dg")
    tol_factors = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for i in (0, 1):
        assert rel_rmse(g[3 + i], want[i]) < tol_factors, f"{names[i]} ({flips} entries flipped)"
    for i in range(2, 6):
        got = g[3 + i]
        if want[i] is None:
            assert got is None, names[i]
            continue
        assert torch.isfinite(got).all(), names[i]
        # As accurate as the torch backend's math on the same data (fp32 or bf16 G_S), or within 1e-2.
        err, base = rel_rmse(got, want64[i]), rel_rmse(want[i], want64[i])
        assert err < max(1e-2, 3 * base), f"{names[i]}: {err:.2e} vs float64, torch's math {base:.2e}"


def _forward_and_backward_agree(n, m, groups, kernel, target, r, dev):
    """Triton's kernels regenerate ΔW in one rounding (STRICT_FP): the selection's threshold is the
    reference quantile rule applied to the weight kernel's own ΔW (the `merge` op), bit for bit, and
    the effective weight the backward kernel writes equals the forward's, bit for bit."""
    scale = 0.25 if kernel == "piecewise" else 2.0
    A, B = _factors(r, n, m, groups, 2, dev, scale=scale)
    params = _params(kernel, r, 2, n, dev)
    spec = SnellSpec(kernel, 2, "reference", groups)
    s = torch.tensor(target, dtype=torch.float64, device=dev)
    W = torch.randn(m, n, device=dev) / math.sqrt(n)
    geo = ts._Geometry(A, B, params, spec)
    stats = ts._column_pass(geo, 0, None) if geo.kernel == 2 else None
    sparsity_t = ts._sparsity_device(s, dev)
    t = ts._select(geo, stats, sparsity_t)
    delta = ts.merge(A, B, params, spec)  # the weight kernel's ΔW, fp32, not sparsified
    assert torch.equal(t, fn.thresholds_for(delta, s, groups)), "threshold vs the kernels' own ΔW"
    forward = ts._effective_weight(geo, W, stats, t, sparsity_t, True, torch.float32)
    backward = torch.empty_like(forward)
    gs = torch.randn(m, n, device=dev)
    ts._factor_grads(geo, gs, W, stats, t, sparsity_t, True, backward)
    differ = forward != backward
    assert not differ.any(), f"{int(differ.sum())} entries of W_eff differ, e.g. at {differ.nonzero()[:5].tolist()}"
    kept = (forward != W).sum().item()
    assert 0 < kept < m * n  # a real selection


@pytest.mark.parametrize("kernel,groups,r", [("piecewise", 1, 8), ("snella", 3, 8), ("rbf", 3, 4), ("sigmoid", 1, 8)])
def test_forward_and_backward_regenerate_the_same_weight(seed, kernel, groups, r):
    if HAS_CUDA:
        pytest.skip("the GPU runs it at scale")
    _forward_and_backward_agree(40, 24 * groups, groups, kernel, 0.7, r, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "n,m,groups,kernel,target,r",
    [(768, 3072, 1, "piecewise", 0.9, 8), (768, 2304, 3, "snella", 0.9, 8), (768, 2304, 3, "rbf", 0.9, 8),
     (768, 768, 1, "sigmoid", 0.7, 8), (4096, 11008, 1, "piecewise", 0.9, 8), (1024, 2048, 1, "piecewise", 0.9, 32)],
)  # fmt: skip
def test_gpu_forward_and_backward_regenerate_the_same_weight(seed, n, m, groups, kernel, target, r):
    _forward_and_backward_agree(n, m, groups, kernel, target, r, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("T,n,m,groups,kernel,dtype,target,r", GPU_CASES)
def test_gpu_matches_torch_backend(seed, T, n, m, groups, kernel, dtype, target, r):
    _compare_with_torch_backend(T, n, m, groups, kernel, dtype, target, r, "cuda")


@pytest.mark.parametrize("kernel,groups,r", [("snella", 3, 8), ("rbf", 1, 4), ("piecewise", 1, 8), ("sigmoid", 3, 8)])
def test_gpu_comparison_runs_on_small_shapes(seed, kernel, groups, r):
    """The GPU comparison's own logic, at an interpreter-sized shape (the GPU runs it at scale)."""
    if HAS_CUDA:
        pytest.skip("the GPU runs the comparison itself")
    _compare_with_torch_backend(29, 40, 24 * groups, groups, kernel, torch.float32, 0.7, r, "cpu")


@pytest.mark.gpu
def test_gpu_layer_never_synchronises(seed, backend):
    """A training step of the layer (fwd + bwd, sparsity a float64 device buffer) makes no host
    synchronisation: no value is read back and no host value is copied in."""
    dev = "cuda"
    m, n, r, T = 3072, 768, 8, 512
    A, B = (t.requires_grad_() for t in _factors(r, n, m, 1, 2, dev, scale=0.25))
    W = (torch.randn(m, n, device=dev) / math.sqrt(n)).to(torch.bfloat16)
    x = torch.randn(T, n, device=dev, dtype=torch.bfloat16, requires_grad=True)
    s = torch.tensor(0.9, dtype=torch.float64, device=dev)
    backend.set_backend("triton")
    for check in (False, True):  # the first step compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if check else "default")
        try:
            y = snell_linear(x, W, None, A, B, sparsity=s)
            y.float().square().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert backend.last_backend("snell.layer_forward") == "triton"
    assert backend.last_backend("snell.layer_backward") == "triton"
