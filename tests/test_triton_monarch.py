"""Triton Monarch kernels (triton_kernels/monarch.py) against the dense oracle and the torch backend.

CPU runs them under the Triton interpreter (TRITON_INTERPRET=1, set by conftest) in fp32 and fp16;
on a GPU the same tests run compiled, and the GPU-marked ones add bf16 at the benchmark shapes.
Every plan is exercised: "auto" (fused where a block fits on chip), "split" (intermediate through
memory), "mixed" (small on-chip limit: some products fused, others split) and "fused" forced.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from oracles import monarch_dense, rel_rmse

import pysnell
from pysnell import MonarchLinear
from pysnell.ops.monarch.function import _torch_forward, monarch_shapes

pytest.importorskip("triton")
tm = pytest.importorskip("pysnell.triton_kernels.monarch")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative to the largest reference magnitude: fp32 accumulates in fp32; fp16 rounds the
# intermediate and the output to fp16 (≈ 5e-4 each).
TOL = {torch.float32: 2e-5, torch.float16: 6e-3, torch.bfloat16: 3e-2}

# (in, out, nblocks) -> w1 (k, q, p), w2 (l, s, r). The "uneven" ones have q % l != 0: an output
# block takes rows of a varying run of stage-1 blocks, and every product runs split.
LAYERS = {
    "square": (64, 64, 4),  # (4, 16, 16), (4, 16, 16): QL = 4
    "padded-in-cut-out": (27, 39, 2),  # (2, 14, 14), (2, 20, 14): x has 27 of 28 features, 39 of 40 outputs
    "padded-wide": (61, 70, 4),  # (4, 16, 16), (4, 18, 16): 61 of 64 inputs, 70 of 72 outputs
    "in>out": (96, 40, 2),  # (2, 20, 48), (2, 20, 20)
    "one-block": (40, 24, 1),  # (1, 24, 40), (1, 24, 24): l = 1
    "long-blocks": (160, 96, 2),  # (2, 48, 80), (2, 48, 48): V > one tile, QL = 24 > one chunk
    "nine-blocks": (81, 81, 9),  # (9, 9, 9), (9, 9, 9): QL = 1; "auto" splits (9 blocks re-read)
    "uneven": (50, 70, 3),  # (3, 17, 17), (3, 24, 17): q = 17, l = 3
    "uneven-in>out": (48, 40, 4),  # (4, 10, 12), (4, 10, 10): q = 10, l = 4, 48 -> 40
}
BENCH_CASES = [(1024, 1024, 4), (4096, 4096, 4), (4096, 4096, 16), (768, 3072, 4), (3072, 768, 4)]


@pytest.fixture
def triton_backend(backend):
    backend.set_backend("triton")
    return backend


@pytest.fixture
def plan_path(request, monkeypatch):
    """Sets the kernel plan for one test: auto, split, fused, or mixed (on-chip limit of 16)."""
    name = request.param
    if name == "mixed":
        monkeypatch.setattr(tm, "MAX_ONCHIP", 16)
        name = "auto"
    with tm.use_path(name):
        yield request.param


def _close(got, want, dtype, what):
    assert got is not None, f"{what}: missing"
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = want.abs().max().item() or 1.0
    err = (got - want).abs().max().item() / scale
    assert err <= TOL[dtype], f"{what}: max error {err:.2e} of scale {scale:.3g} > {TOL[dtype]:.0e}"


def _dense_oracle(x, w1, w2, bias, out_features, dy):
    """y and the gradients of x, w1, w2, bias from the dense matrix of spec/MONARCH.md §1 (float64, on
    x's device: the GPU tests' layers are large, and their test processes share the host's cores)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, w1, w2)]
    xd, w1d, w2d = leaves
    M = monarch_dense(w1d, w2d)[:out_features, : x.shape[-1]]
    y = xd @ M.t()
    if bias is not None:
        bd = bias.detach().double().requires_grad_()
        leaves.append(bd)
        y = y + bd
    y.backward(dy.detach().double())
    return y.detach(), [t.grad for t in leaves]


def _layer_run(layer, x, dy):
    x = x.detach().requires_grad_()  # keeps x's strides
    for p in layer.parameters():
        p.grad = None
    y = layer(x)
    y.backward(dy)
    grads = [x.grad, layer.blkdiag1.grad, layer.blkdiag2.grad]
    if layer.bias is not None:
        grads.append(layer.bias.grad)
    return y.detach(), grads


GRAD_NAMES = ("dx", "dblkdiag1", "dblkdiag2", "dbias")


def _check_layer(triton_backend, sizes, dtype, T=37, bias=True):
    n_in, n_out, nblocks = sizes
    layer = MonarchLinear(n_in, n_out, nblocks, bias=bias, device=DEVICE, dtype=dtype)
    # column slices: the kernels get row strides wider than the features
    x = torch.randn(T, n_in + 3, device=DEVICE, dtype=dtype)[:, :n_in]
    dy = torch.randn(T, n_out + 5, device=DEVICE, dtype=dtype)[:, :n_out]
    triton_backend.set_backend("triton")
    y, grads = _layer_run(layer, x, dy)
    assert pysnell.last_backend("monarch.forward") == "triton"
    assert pysnell.last_backend("monarch.backward") == "triton"
    y_ref, grads_ref = _dense_oracle(x, layer.blkdiag1, layer.blkdiag2, layer.bias, n_out, dy)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], n_out)
    _close(y, y_ref, dtype, "y")
    for got, want, name in zip(grads, grads_ref, GRAD_NAMES):
        _close(got, want, dtype, name)
    # and the torch backend agrees (same dtype, same rounding points)
    triton_backend.set_backend("torch")
    y_t, grads_t = _layer_run(layer, x, dy)
    _close(y, y_t, dtype, "y vs torch backend")
    for got, want, name in zip(grads, grads_t, GRAD_NAMES):
        _close(got, want, dtype, f"{name} vs torch backend")


@pytest.mark.parametrize("plan_path", ["auto", "split", "mixed"], indirect=True)
@pytest.mark.parametrize("name", [n for n in LAYERS if n != "nine-blocks"])
def test_layer_fp32_matches_dense_oracle(seed, triton_backend, plan_path, name):
    _check_layer(triton_backend, LAYERS[name], torch.float32)


@pytest.mark.parametrize("plan_path", ["auto"], indirect=True)
def test_layer_many_blocks(seed, triton_backend, plan_path):
    _check_layer(triton_backend, LAYERS["nine-blocks"], torch.float32, T=20, bias=False)


@pytest.mark.parametrize("plan_path", ["auto", "split"], indirect=True)
@pytest.mark.parametrize("name", ["padded-wide", "in>out", "uneven"])
def test_layer_fp16_matches_dense_oracle(seed, triton_backend, plan_path, name):
    _check_layer(triton_backend, LAYERS[name], torch.float16)


def test_plans_cover_both_paths():
    # what the parametrised tests above rely on
    shapes = lambda name: monarch_shapes(*LAYERS[name])
    with tm.use_path("auto"):
        assert set(tm.plan(*shapes("square")).values()) == {"fused"}
        assert set(tm.plan(*shapes("nine-blocks")).values()) == {"split"}
    with tm.use_path("split"):
        assert set(tm.plan(*shapes("square")).values()) == {"split"}
    with tm.use_path("fused"):
        assert set(tm.plan(*shapes("nine-blocks")).values()) == {"fused"}
        # the fused kernels need q % l == 0: uneven shapes stay split whatever the path
        assert set(tm.plan(*shapes("uneven")).values()) == {"split"}


def test_benchmark_shapes_are_served():
    # every layer shape the benchmark uses runs on the kernels (no fallback), with the plan below
    expected = {
        (1024, 1024, 4): dict(forward="fused", dw2="fused", dw1="fused", dx="fused"),
        (4096, 4096, 4): dict(forward="split", dw2="split", dw1="split", dx="split"),  # 1024-wide blocks
        (4096, 4096, 16): dict(forward="split", dw2="split", dw1="split", dx="split"),  # 16 re-reads
        (768, 3072, 4): dict(forward="split", dw2="split", dw1="fused", dx="fused"),  # s = 768
        (3072, 768, 4): dict(forward="fused", dw2="fused", dw1="split", dx="split"),  # p = 768
    }
    for sizes, want in expected.items():
        w1_shape, w2_shape = monarch_shapes(*sizes)
        meta = lambda shape: torch.empty(shape, device="meta", dtype=torch.bfloat16)
        assert tm._unsupported(meta((8, sizes[0])), meta(w1_shape), meta(w2_shape)) is None, sizes
        with tm.use_path("auto"):
            assert tm.plan(w1_shape, w2_shape) == want, sizes


@pytest.mark.parametrize(
    "needs",
    [(True, False, False), (False, True, True), (False, False, True), (True, True, False)],
    ids=["x-only", "weights-only", "w2-only", "x-and-w1"],
)
def test_functional_with_partial_gradients(seed, triton_backend, needs):
    (k, q, p), (l, s, r) = monarch_shapes(48, 90, 4)  # (4, 12, 12), (4, 23, 12): 90 of 92 outputs
    x = torch.randn(3, 7, k * p, device=DEVICE).requires_grad_(needs[0])
    w1 = torch.randn(k, q, p, device=DEVICE).requires_grad_(needs[1])
    w2 = torch.randn(l, s, r, device=DEVICE).requires_grad_(needs[2])
    bias = torch.randn(l * s, device=DEVICE)
    y = pysnell.monarch_matmul(x, w1, w2, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert pysnell.last_backend("monarch.backward") == "triton"
    y_ref, (dx, dw1, dw2, _) = _dense_oracle(x, w1, w2, bias, l * s, dy)
    _close(y, y_ref, torch.float32, "y")
    for leaf, want, need, name in zip((x, w1, w2), (dx, dw1, dw2), needs, GRAD_NAMES):
        if need:
            _close(leaf.grad, want, torch.float32, name)
        else:
            assert leaf.grad is None, f"{name} computed though not needed"


@pytest.mark.parametrize("path", ["auto", "split"])
@pytest.mark.parametrize(("n_out", "store"), [(70, "scatter"), (72, "interleave")])
def test_poisoned_buffers_are_fully_written(seed, monkeypatch, path, n_out, store):
    # every buffer the kernels write (outputs, scratch, fp32 partials) starts as NaN; 72 outputs
    # are l·s, so the forward can store block order and interleave in place (70 cannot)
    def poisoned(shape, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(tm, "_empty", poisoned)
    w1_shape, w2_shape = monarch_shapes(61, n_out, 4)
    x = torch.randn(37, 61, device=DEVICE)
    w1, w2 = torch.randn(w1_shape, device=DEVICE), torch.randn(w2_shape, device=DEVICE)
    bias, dy = torch.randn(n_out, device=DEVICE), torch.randn(37, n_out, device=DEVICE)
    with tm.use_path(path), tm.use_store("interleave"):
        assert tm._store_plan(37, *w2_shape[:2], n_out) == store
        y = tm.monarch_forward(x, w1, w2, bias, n_out)
        dx, dw1, dw2 = tm.monarch_backward(dy, x, w1, w2, (True, True, True))
    y_ref, (dx_ref, dw1_ref, dw2_ref, _) = _dense_oracle(x, w1, w2, bias, n_out, dy)
    for got, want, name in zip((y, dx, dw1, dw2), (y_ref, dx_ref, dw1_ref, dw2_ref), ("y", *GRAD_NAMES)):
        _close(got, want, torch.float32, name)


@pytest.mark.parametrize("path", ["auto", "split"])
@pytest.mark.parametrize("store", ["interleave", "scatter"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ["square", "in>out", "long-blocks", "nine-blocks"])
def test_forward_stores_match_the_oracle_and_the_torch_backend(seed, path, store, dtype, name):
    # y written block by block and interleaved in place (+ bias), or stored at its interleaved columns
    n_in, n_out, nblocks = LAYERS[name]
    w1_shape, w2_shape = monarch_shapes(n_in, n_out, nblocks)
    x = torch.randn(19, n_in + 2, device=DEVICE, dtype=dtype)[:, :n_in]
    w1, w2 = torch.randn(w1_shape, device=DEVICE, dtype=dtype), torch.randn(w2_shape, device=DEVICE, dtype=dtype)
    bias = torch.randn(n_out, device=DEVICE, dtype=dtype)
    with tm.use_path(path), tm.use_store(store):
        assert tm._store_plan(19, *w2_shape[:2], n_out) == store
        y = tm.monarch_forward(x, w1, w2, bias, n_out)
    y_ref, _ = _dense_oracle(x, w1, w2, bias, n_out, torch.zeros(19, n_out))
    _close(y, y_ref, dtype, "y")
    _close(y, _torch_forward(x, w1, w2, bias, n_out), dtype, "y vs torch backend")


def test_store_plan():
    with tm.use_store("auto"):
        assert tm._store_plan(64, 4, 1024, 4096) == "interleave"
        assert tm._store_plan(63, 4, 1024, 4096) == "scatter"  # few tokens: one launch less
        assert tm._store_plan(8192, 4, 1024, 4095) == "scatter"  # out_features < l·s: no room for block order
        assert tm._store_plan(8192, 1, 4096, 4096) == "scatter"  # one block: already in order
        assert tm._store_plan(8192, 4, 2752, 11008) == "interleave"  # a LLaMA MLP row, 16384 padded
        assert tm._store_plan(8192, 4, 8192, 32768) == "scatter"  # a row too wide for one program
    with tm.use_store("interleave"):
        assert tm._store_plan(1, 4, 1024, 4096) == "interleave"
        assert tm._store_plan(1, 4, 1024, 4095) == "scatter"
    with tm.use_store("scatter"):
        assert tm._store_plan(8192, 4, 1024, 4096) == "scatter"
    with pytest.raises(ValueError, match="PYSNELL_MONARCH_STORE"):
        tm.set_store("gather")


def test_split_gemm_tiles_follow_the_token_count():
    # 16-bit: 128-row tiles once there are enough tokens, the tiles measured on the H200 at T = 8192
    # (256 or 128 columns, 8 warps); fewer tokens shrink the token tile, then the columns until the
    # grid has a program per SM (132 here)
    bf16 = torch.bfloat16
    assert tm._gpu_gemm_tiles(8192, 4, 1024, 1024, bf16, 132) == (128, 64, 256, 8, 3)
    assert tm._gpu_gemm_tiles(8192, 4, 192, 192, bf16, 132) == (128, 64, 128, 8, 3)
    # blocks that are not a multiple of 8 elements load element by element: 256 columns spilled
    assert tm._gpu_gemm_tiles(8192, 3, 342, 342, bf16, 132) == (128, 64, 128, 8, 3)
    assert tm._gpu_gemm_tiles(512, 4, 1024, 1024, bf16, 132) == (128, 64, 64, 8, 3)  # 256 programs
    assert tm._gpu_gemm_tiles(64, 4, 1024, 1024, bf16, 132) == (64, 64, 64, 4, 3)
    assert tm._gpu_gemm_tiles(1, 4, 1024, 1024, bf16, 132) == (16, 64, 64, 4, 3)  # 64 programs, not 16
    assert tm._gpu_gemm_tiles(1, 4, 1024, 1024, torch.float32, 132) == (64, 32, 128, 4, 3)
    assert tm._gpu_gemm_tiles(8192, 3, 342, 342, torch.float32, 132) == (64, 32, 64, 4, 3)
    for T in (1, 16, 17, 64, 65, 512, 8192):
        BT, _, BJ, _, _ = tm._gpu_gemm_tiles(T, 4, 1024, 1024, torch.float16, 132)
        assert BT >= min(T, 16) and (BT == 16 or BT >= min(T, 64)) and BJ >= 64


@pytest.mark.parametrize("T", [1, 16, 40, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_gemms_with_the_gpus_tiles(seed, monkeypatch, triton_backend, T, dtype):
    # the tiles a GPU picks for T tokens (16-bit rules for both dtypes: the interpreter computes in
    # fp32 anyway), run by the interpreter: token and column tiles wider than the data stay masked
    def gpu_tiles(T_, NB, K, J, dtype_, device):
        return tm._gpu_gemm_tiles(T_, NB, K, J, torch.float16, 132)

    monkeypatch.setattr(tm, "_gemm_tiles", gpu_tiles)
    with tm.use_path("split"):
        _check_layer(triton_backend, LAYERS["in>out"], dtype, T=T)


def test_weight_gradients_are_deterministic(seed):
    w1_shape, w2_shape = monarch_shapes(32, 32, 2)
    x, dy = torch.randn(70, 32, device=DEVICE), torch.randn(70, 32, device=DEVICE)  # 3 token tiles, 2 splits
    w1, w2 = torch.randn(w1_shape, device=DEVICE), torch.randn(w2_shape, device=DEVICE)
    for path in ("auto", "split"):
        with tm.use_path(path):
            first = tm.monarch_backward(dy, x, w1, w2, (False, True, True))
            again = tm.monarch_backward(dy, x, w1, w2, (False, True, True))
        assert all(torch.equal(a, b) for a, b in zip(first[1:], again[1:])), path


def test_uneven_permutation_runs_on_the_kernels_without_fallback(seed, triton_backend, caplog, monkeypatch):
    # q % l != 0 used to fall back to torch; now every product runs split on the kernels
    monkeypatch.setattr(pysnell._backend, "_warned", set())
    sizes = (22, 22, 4)  # w1 (4, 6, 6), w2 (4, 6, 6): q = 6, l = 4, 22 of 24 features
    (k, q, p), (l, s, r) = monarch_shapes(*sizes)
    assert q % l
    with caplog.at_level(logging.WARNING, logger="pysnell"):
        _check_layer(triton_backend, sizes, torch.float32, T=9)
    assert "cannot serve" not in caplog.text


def test_float64_falls_back_and_passes_gradcheck(seed, triton_backend, caplog, monkeypatch):
    monkeypatch.setattr(pysnell._backend, "_warned", set())
    (k, q, p), (l, s, r) = monarch_shapes(12, 8, 2)  # (2, 4, 6), (2, 4, 4): servable but for the dtype
    x = torch.randn(3, k * p, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w1 = torch.randn(k, q, p, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w2 = torch.randn(l, s, r, dtype=torch.float64, device=DEVICE, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="pysnell"):
        assert torch.autograd.gradcheck(lambda *a: pysnell.monarch_matmul(*a), (x, w1, w2))
    assert "dtype torch.float64" in caplog.text


def test_mixed_dtypes_are_rejected_clearly():
    w1_shape, w2_shape = monarch_shapes(16, 16, 2)
    x = torch.randn(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="must share one dtype"):
        tm.monarch_forward(
            x, torch.randn(w1_shape, device=DEVICE).half(), torch.randn(w2_shape, device=DEVICE), None, 16
        )


def test_no_tokens(triton_backend):
    layer = MonarchLinear(24, 20, 2, device=DEVICE)
    x = torch.randn(0, 24, device=DEVICE, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 20)
    y.sum().backward()
    assert x.grad.shape == (0, 24) and torch.equal(layer.blkdiag1.grad, torch.zeros_like(layer.blkdiag1))


# -------------------------------------------------------------------------------------------
# Compiles for an H100 (sm_90) here, without a GPU: the interpreter accepts code a GPU may not.
# -------------------------------------------------------------------------------------------

_AOT = textwrap.dedent(
    """
    import json, os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    from pysnell.triton_kernels._aot import compile_only, resource_usage
    import pysnell.triton_kernels.monarch as tm
    from pysnell.ops.monarch.function import _torch_forward, monarch_shapes
    report = []
    for sizes, path, T in json.loads(sys.argv[1]):
        w1s, w2s = monarch_shapes(*sizes)
        e = lambda *shape: torch.empty(shape, dtype=torch.bfloat16)
        x, dy, b = e(T, sizes[0]), e(T, sizes[1]), e(sizes[1])
        with compile_only() as calls, tm.use_path(path):
            tm.monarch_forward(x, e(*w1s), e(*w2s), b, sizes[1])
            tm.monarch_backward(dy, x, e(*w1s), e(*w2s), (True, True, True))
        for fn, _, _, kw, k in calls:
            report.append(dict(sizes=sizes, path=path, kernel=fn.fn.__name__, **resource_usage(k),
                               smem=k.metadata.shared, wgmma="wgmma" in k.asm["ptx"],
                               mma_sync="mma.sync" in k.asm["ptx"], BT=kw.get("BT")))
    print(json.dumps(report))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU tests compile and run the kernels themselves")
def test_kernels_compile_for_sm90_without_spills():
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump").exists():
        pytest.skip("this Triton has no NVIDIA backend tools")
    # every kernel once, and the global-index maps of q % l != 0 (1000/4: q = 250, l = 4)
    # and l = 8 (the row permutations' layouts change with the block count)
    # (tokens pick the split GEMMs' tiles: 16 rows (mma.sync) at 16, 64 at 64, 128×64 at 256, 128×256 at
    # 8192, 128×128 there for blocks that are not a multiple of 8)
    jobs = [
        ((1024, 1024, 4), "auto", 256),
        ((768, 3072, 4), "split", 256),
        ((1000, 1000, 4), "auto", 256),
        ((768, 3072, 8), "auto", 256),
        ((1024, 1024, 4), "split", 16),
        ((1024, 1024, 4), "split", 64),
        ((1024, 1024, 4), "split", 8192),
        ((1024, 1024, 3), "split", 8192),  # 342-element blocks: loads element by element
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _AOT, json.dumps(jobs)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    names = {r["kernel"] for r in report}
    assert names == {
        "_two_stage_kernel",
        "_two_stage_wgrad_kernel",
        "_gemm_kernel",
        "_wgrad_kernel",
        "_deinterleave_kernel",
        "_interleave_kernel",
        "_sum_splits_kernel",
    }, names
    for r in report:
        assert r["stack"] == 0, f"register spills: {r}"
        assert r["smem"] <= 227 * 1024, f"more shared memory than an H100 block has: {r}"
        copies = ("_deinterleave_kernel", "_interleave_kernel", "_sum_splits_kernel")  # no MMA
        if r["kernel"] == "_gemm_kernel" and r["BT"] == 16:  # below wgmma's 64 rows: mma.sync
            assert r["mma_sync"], f"no tensor-core MMA: {r}"
        else:
            assert r["wgmma"] or r["kernel"] in copies, f"no Hopper tensor-core MMA: {r}"
    gemm_tiles = {r["BT"] for r in report if r["kernel"] == "_gemm_kernel"}
    assert gemm_tiles == {16, 64, 128}, gemm_tiles


# -------------------------------------------------------------------------------------------
# GPU: bf16 at the benchmark shapes, autocast, small token counts
# -------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("T", [8192, 512, 64, 16, 1])  # every split-GEMM tile (see _gpu_gemm_tiles)
@pytest.mark.parametrize("sizes", BENCH_CASES, ids=lambda s: f"{s[0]}x{s[1]}-nb{s[2]}")
def test_gpu_bf16_benchmark_shapes(seed, triton_backend, sizes, T):
    if T < 8192 and sizes != (4096, 4096, 4):
        pytest.skip("small T only at n=4096, nblocks=4 (as the benchmark)")
    n_in, n_out, nblocks = sizes
    layer = MonarchLinear(n_in, n_out, nblocks, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(T, n_in, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(T, n_out, device="cuda", dtype=torch.bfloat16)
    y, grads = _layer_run(layer, x, dy)
    assert pysnell.last_backend("monarch.forward") == "triton"
    # reference: the torch implementation in fp32 on the same bf16 values
    ref = MonarchLinear(n_in, n_out, nblocks, device="cuda", dtype=torch.float32)
    with torch.no_grad():
        for a, b in zip(ref.parameters(), layer.parameters()):
            a.copy_(b.float())
    triton_backend.set_backend("torch")
    y_ref, grads_ref = _layer_run(ref, x.float(), dy.float())
    assert y.dtype == torch.bfloat16
    for got, want, name in zip((y, *grads), (y_ref, *grads_ref), ("y", *GRAD_NAMES)):
        assert torch.isfinite(got).all(), name
        err = rel_rmse(got, want)
        assert err < 1.5e-2, f"{name}: relative RMSE {err:.2e}"


@pytest.mark.gpu
def test_gpu_autocast_stays_bf16(seed, triton_backend):
    layer = MonarchLinear(1024, 1024, 4, device="cuda")  # fp32 parameters
    x = torch.randn(512, 1024, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert pysnell.last_backend("monarch.forward") == "triton"
    y.float().sum().backward()
    assert layer.blkdiag1.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    with torch.no_grad():
        want = x @ layer.dense_weight().t() + layer.bias
    assert rel_rmse(y, want) < 1.5e-2


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "path"), [(torch.float32, "auto"), (torch.float16, "split")])
def test_gpu_fp32_fp16_medium(seed, triton_backend, dtype, path):
    # (768, 1000, 4): w1 (4, 192, 192), w2 (4, 250, 192); s = 250 is not a power of two
    with tm.use_path(path):
        _check_layer(triton_backend, (768, 1000, 4), dtype, T=300)
