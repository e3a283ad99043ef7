"""Micro-benchmarks: one per op and per pysnell backend available on this machine.

    pytest benchmarks/micro --benchmark-only

On a CPU machine the sizes are tiny (this only proves the harness works; Triton runs
interpreted); on a GPU they are the real ViT-B / LLaMA / Monarch sizes. Every benchmark
first checks its output (and gradients) against the pure-PyTorch reference once, and that the
requested backend really ran (no silent fallback), then times fresh random inputs.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from torch import nn

import pysnell
from pysnell import _backend
from pysnell.ops.monarch import reference as monarch_ref
from pysnell.ops.snell import reference as snell_ref
from pysnell.ops.topk import reference as topk_ref

from ..harness import rel_rmse

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BACKENDS = ("torch", "triton", "cuda")
ROUNDS, WARMUP = (30, 5) if CUDA else (5, 1)
SPARSITY = 0.9
R = 8
# (rows, cols) or (T, in, out, dtype) per op: real sizes on a GPU, tiny on CPU.
SIZES = {
    "topk": (4096, 4096) if CUDA else (64, 96),
    "sparsify": (3072, 768) if CUDA else (48, 40),
    "merge": (3072, 768) if CUDA else (48, 40),
    "snell_layer": (12608, 768, 3072, torch.bfloat16) if CUDA else (32, 40, 48, torch.float32),
    "monarch": (8192, 4096, 4, torch.bfloat16) if CUDA else (32, 64, 4, torch.float32),
}


@pytest.fixture
def use_backend():
    """Select a backend for one op, skipping when it has no kernel here; restore afterwards."""
    before = pysnell.get_backend()

    def select(backend: str, op: str):
        if backend == "cuda" and not CUDA:
            pytest.skip("the cuda backend needs a GPU")
        if backend == "triton" and not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"):
            pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
        if not _backend.available(op, backend, DEVICE):
            reason = _backend.load_error(backend) if backend != "torch" else None
            pytest.skip(f"no {backend} implementation of {op} here" + (f" ({reason})" if reason else ""))
        pysnell.set_backend(backend)

    yield select
    pysnell.set_backend(before)


def _ran(op: str, backend: str):
    assert pysnell.last_backend(op) == backend, f"{op} ran on {pysnell.last_backend(op)}, not {backend}"


def _tol(dtype) -> float:
    return 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5


def _bench(benchmark, fn, setup=None, **info):
    def timed(*args):
        out = fn(*args)
        if CUDA:
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update({k: str(v) for k, v in info.items()} | {"device": str(DEVICE)})
    benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


def _pool(shape, dtype=torch.float32, copies=4):
    return [torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(copies)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_mask_(benchmark, use_backend, backend):
    use_backend(backend, "topk.mask_")
    benchmark.group = "topk_mask_"
    pool = _pool(SIZES["topk"])
    got, t = pysnell.topk_mask_(pool[0].clone(), sparsity=SPARSITY)
    _ran("topk.mask_", backend)
    want, t_ref = topk_ref.topk_mask_(pool[0].clone(), sparsity=SPARSITY)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(t, t_ref.to(t.dtype))
    # In place: every round masks a fresh copy of random data (the copy is not timed).
    inputs = itertools.cycle(pool)
    _bench(
        benchmark,
        lambda x: pysnell.topk_mask_(x, sparsity=SPARSITY),
        setup=lambda: ((next(inputs).clone(),), {}),
        backend=backend,
        shape=SIZES["topk"],
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparsify(benchmark, use_backend, backend):
    use_backend(backend, "topk.threshold")
    benchmark.group = "sparsify"
    delta = torch.randn(SIZES["sparsify"], device=DEVICE) * 0.01
    got = pysnell.sparsify(delta, SPARSITY)
    _ran("topk.threshold", backend)
    t = topk_ref.quantile_threshold(delta.abs().reshape(1, -1), SPARSITY)
    want = snell_ref.sparsify_given_threshold(delta, t, "reference", SPARSITY)
    torch.testing.assert_close(got, want)
    _bench(benchmark, lambda: pysnell.sparsify(delta, SPARSITY), backend=backend, shape=SIZES["sparsify"])


def _factors(m, n, requires_grad=False):
    A = (torch.rand(R, n, device=DEVICE) * 2 - 1).requires_grad_(requires_grad)
    B = (torch.rand(m, R, device=DEVICE) * 2 - 1).requires_grad_(requires_grad)
    return A, B


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_merge(benchmark, use_backend, backend):
    use_backend(backend, "snell.merge")
    benchmark.group = "kernel_merge"
    m, n = SIZES["merge"]
    A, B = _factors(m, n)
    got = pysnell.kernel_merge(A, B)
    _ran("snell.merge", backend)
    one = torch.ones((), device=DEVICE)
    params = snell_ref.KernelParams(snell_ref.default_coeffs(2, 0.1, device=DEVICE), one, one, one)
    want = snell_ref.merge(A, B, params, snell_ref.SnellSpec())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    _bench(benchmark, lambda: pysnell.kernel_merge(A, B), backend=backend, shape=(m, n, R))


def _snell_oracle(x, layer):
    """y = x (W0 + S)ᵀ + b in fp32 with autograd through cdist; S = ΔW·sg(|ΔW|)·[|ΔW| > t]."""
    A = layer.snell_A.detach().clone().requires_grad_(True)
    B = layer.snell_B.detach().clone().requires_grad_(True)
    xr = x.detach().float().requires_grad_(True)
    d = R // 2
    delta = 0.1 * torch.cdist(B[:, :d], A[:d].t()) - 0.1 * torch.cdist(B[:, d:], A[d:].t())
    t = topk_ref.quantile_threshold(delta.detach().abs().reshape(1, -1), SPARSITY)
    S = delta * delta.abs().detach() * (delta.abs() > t)
    y = xr @ (layer.base.weight.float() + S).t() + layer.base.bias.float()
    return y, (xr, A, B)


@pytest.mark.parametrize("backend", BACKENDS)
def test_snell_linear_fwd_bwd(benchmark, use_backend, backend):
    use_backend(backend, "snell.layer_forward")
    benchmark.group = "SNELLLinear fwd+bwd"
    T, n, m, dtype = SIZES["snell_layer"]
    layer = pysnell.SNELLLinear(nn.Linear(n, m, device=DEVICE, dtype=dtype), r=R, sparsity=SPARSITY)
    with torch.no_grad():  # adapters large enough that S matters in the check
        layer.snell_A.uniform_(-1, 1)
        layer.snell_B.uniform_(-1, 1)
    x = torch.randn(T, n, device=DEVICE, dtype=dtype, requires_grad=True)
    dy = torch.randn(T, m, device=DEVICE, dtype=dtype)
    y = layer(x)
    y.backward(dy)
    _ran("snell.layer_forward", backend)
    _ran("snell.layer_backward", backend)
    y_ref, (xr, A, B) = _snell_oracle(x, layer)
    y_ref.backward(dy.float())
    tol = _tol(dtype)
    for name, got, want in (
        ("y", y, y_ref),
        ("dx", x.grad, xr.grad),
        ("dA", layer.snell_A.grad, A.grad),
        ("dB", layer.snell_B.grad, B.grad),
    ):
        err = rel_rmse(got, want)
        assert err <= tol, f"{name}: relative RMSE {err:.3g} against the reference exceeds {tol}"
    params = [x, layer.snell_A, layer.snell_B]

    def setup():
        for p in params:
            p.grad = None
        return (), {}

    _bench(benchmark, lambda: layer(x).backward(dy), setup=setup, backend=backend, shape=(T, n, m), dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_monarch_matmul_fwd_bwd(benchmark, use_backend, backend):
    use_backend(backend, "monarch.forward")
    benchmark.group = "monarch_matmul fwd+bwd"
    T, n, nblocks, dtype = SIZES["monarch"]
    (k, q, p), (l, s, r) = pysnell.ops.monarch.function.monarch_shapes(n, n, nblocks)
    w1 = (torch.randn(k, q, p, device=DEVICE) / p**0.5).to(dtype).requires_grad_(True)
    w2 = (torch.randn(l, s, r, device=DEVICE) / r**0.5).to(dtype).requires_grad_(True)
    x = torch.randn(T, n, device=DEVICE, dtype=dtype, requires_grad=True)
    dy = torch.randn(T, n, device=DEVICE, dtype=dtype)
    y = pysnell.monarch_matmul(x, w1, w2)
    y.backward(dy)
    _ran("monarch.forward", backend)
    _ran("monarch.backward", backend)
    leaves = [t.detach().float().requires_grad_(True) for t in (x, w1, w2)]
    y_ref = monarch_ref.forward(*leaves)
    y_ref.backward(dy.float())
    tol = _tol(dtype)
    for name, got, want in (("y", y, y_ref), ("dx", x.grad, leaves[0].grad), ("dw1", w1.grad, leaves[1].grad)):
        err = rel_rmse(got, want)
        assert err <= tol, f"{name}: relative RMSE {err:.3g} against the reference exceeds {tol}"
    err = rel_rmse(w2.grad, leaves[2].grad)
    assert err <= tol, f"dw2: relative RMSE {err:.3g} against the reference exceeds {tol}"

    def setup():
        for t in (x, w1, w2):
            t.grad = None
        return (), {}

    _bench(
        benchmark,
        lambda: pysnell.monarch_matmul(x, w1, w2).backward(dy),
        setup=setup,
        backend=backend,
        shape=(T, n, nblocks),
        dtype=dtype,
    )
