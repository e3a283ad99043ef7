"""Each backend's SNELL backward differentiates exactly the entries its forward kept.

A forward on x = I (as many tokens as inputs, no base weight) returns y = Sᵀ, so the kept set is
read off the output, entry by entry. With mode "mask" the gradient reaching ΔW is G_S ⊙ keep, and
with dy = G (small integers) the backward's G_S is Gᵀ exactly. The factor gradients must then be the float64
reference's merge backward of Gᵀ ⊙ (the forward's keep), column by column (dA) and row by row (dB).
An entry the backward decided the other way changes its column of dA by one of the column's m terms:
a few percent for random G, far above the tolerance. The Triton kernels round ΔW alike by
construction (snell.STRICT_FP, checked in test_triton_snell.py), and so do the CUDA kernels (one
`regen` with explicit-rounding intrinsics); this checks the outcome. The torch backend and, under
the interpreter, Triton run it on the CPU at a small shape; on a GPU every backend runs it at
768 inputs.
"""

from __future__ import annotations

import pytest
import torch
from oracles import random_kernel_scalars

import pysnell
from pysnell import _backend
from pysnell.functional import kernel_params
from pysnell.ops.snell import reference as ref
from pysnell.ops.snell.reference import KernelParams, SnellSpec

HAS_CUDA = torch.cuda.is_available()
BACKENDS = ("torch", "triton", "cuda")
CASES = [("piecewise", 1), ("snella", 3), ("rbf", 3), ("sigmoid", 1), ("linear", 1)]


@pytest.mark.parametrize("kernel,groups", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_differentiates_the_entries_the_forward_kept(seed, backend, kernel, groups):
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    if not _backend.available("snell.layer_forward", backend, device):
        pytest.skip(f"no {backend} SNELL layer on {device.type} here")
    n, m_g, r = (768, 384, 8) if HAS_CUDA else (40, 24, 8)
    m = m_g * groups
    scale = 0.25 if kernel in ("piecewise", "linear") else 2.0  # spread |ΔW| (offset kernels concentrate it)
    A = ((torch.rand(r, n, device=device) * 2 - 1) * scale * 4 / (n * r / 2) ** 0.5).requires_grad_()
    B = ((torch.rand(m, r, device=device) * 2 - 1) * scale * 4 / (m_g * r / 2) ** 0.5).requires_grad_()
    alpha, beta, gamma = random_kernel_scalars(kernel, device)
    sparsity = torch.tensor(0.8, dtype=torch.float64, device=device)
    x = torch.eye(n, device=device)
    # small integers: exact in tf32 and bf16, so G_S = Gᵀ exactly whatever precision a GEMM uses
    G = torch.randint(-4, 5, (n, m), device=device).float()
    before = pysnell.get_backend()
    pysnell.set_backend(backend)
    try:
        y = pysnell.snell_linear(
            x, None, None, A, B, sparsity=sparsity, kernel=kernel, pieces=2, scale=0.1, mode="mask",
            alpha=alpha, beta=beta, gamma=gamma, out_groups=groups,
        )  # fmt: skip
        y.backward(G)
        ran = (_backend.last_backend("snell.layer_forward"), _backend.last_backend("snell.layer_backward"))
    finally:
        pysnell.set_backend(before)
    assert ran == (backend, backend), ran
    S = y.detach().t()  # (m, n): x = I, so y = x Sᵀ = Sᵀ
    keep = S != 0
    kept = int(keep.sum())
    assert 0 < kept < m * n

    coeffs, *defaults = kernel_params(A.detach(), kernel, 2, 0.1, None, alpha, beta, gamma)
    params64 = KernelParams(*(t.double() if isinstance(t, torch.Tensor) else t for t in (coeffs, *defaults)))
    spec = SnellSpec(kernel, 2, "mask", groups)
    grad_delta = torch.where(keep, G.t().double(), torch.zeros((), dtype=torch.float64, device=device))
    want_A, want_B = ref.merge_backward(grad_delta, A.detach().double(), B.detach().double(), params64, spec,
                                        (False,) * 4)[:2]  # fmt: skip

    def off(got, want, dim):
        # per column of dA (dim 0) / row of dB (dim 1), relative to that column's or row's norm
        err = (got.double() - want).abs().amax(dim=dim)
        return err / (want.norm(dim=dim) + 1e-30)

    worst_A, worst_B = float(off(A.grad, want_A, 0).max()), float(off(B.grad, want_B, 1).max())
    # correct backends: up to 8e-7 on the CPU; a flipped entry: above 4e-4 in 20 draws at 768 × 384
    assert worst_A < 2e-5 and worst_B < 2e-5, (worst_A, worst_B, kept)
