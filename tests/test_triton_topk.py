"""Triton top-k selection and masking (triton_kernels/topk.py) against the torch reference, bit for bit.

CPU tests run the kernels under the Triton interpreter on small odd shapes; a shrunken launch
config (tiny tiles, a tiny sample, a tiny candidate buffer) reaches every path of the selection on
them: sample rounds, the compaction pass, candidate rounds, and the full-row rounds that take over
when the sample misses or the window overflows. GPU tests (marked) cover bf16/fp16/fp32 up to
11008x4096 (45M elements), the same paths at scale, memory and host synchronisation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pysnell
from pysnell import _backend
from pysnell.ops.topk import reference as ref
from pysnell.ops.topk.function import select_threshold

HAS_CUDA = torch.cuda.is_available()
tk = pytest.importorskip("pysnell.triton_kernels.topk")

cpu_only = pytest.mark.skipif(HAS_CUDA, reason="interpreter tests (the GPU runs the gpu-marked ones)")

PH_SAMPLE, PH_COMPACT, PH_FULL, PH_CAND = (tk.PH_SAMPLE.value, tk.PH_COMPACT.value, tk.PH_FULL.value, tk.PH_CAND.value)


@pytest.fixture
def triton_backend(backend):
    if not _backend.available("topk.mask_", "triton", torch.device("cuda" if HAS_CUDA else "cpu")):
        pytest.skip(f"Triton backend unavailable: {_backend.load_error('triton')}")
    backend.set_backend("triton")
    return backend


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the backend allocates starts as garbage (NaN / 0xFF): unwritten outputs show."""

    def empty(*shape, dtype, device):
        t = torch.empty(*shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1 if dtype != torch.uint8 else 255)

    monkeypatch.setattr(tk, "_empty", empty)


@pytest.fixture
def traces(monkeypatch):
    """The state block of every selection: which phases ran (bit p of the TRACE field)."""
    states = []
    monkeypatch.setattr(tk, "debug_states", states)

    def phases():
        return [{p for p in range(8) if int(s[0, tk.F_TRACE.value]) >> p & 1} for s in states]

    return phases


def _config(monkeypatch, **changes):
    cfg = dataclasses.replace(tk.config, **changes)
    monkeypatch.setattr(tk, "config", cfg)
    return cfg


# Tiny tiles and a tiny sample: the sample path, multi-program rounds and multi-chunk tie prefixes
# on a few thousand elements.
SMALL = dict(
    round_block=128,
    compact_block=128,
    mask_block=128,
    kmode_mask_block=64,
    max_programs=3,
    sample_min_numel=512,
    sample_min=64,
    sample_max=128,
)


def _expected(x, sparsity=None, k=None):
    keep, t = ref.keep_mask(x, sparsity=sparsity, k=k)
    out = x.clone()
    out.masked_fill_(~keep.view(x.shape), 0)
    return out, t.to(torch.float32).reshape(()), ref.pack_mask(keep)


def _check_mask(x, sparsity=None, k=None):
    """The backend op on a copy of x: same values (NaN included), threshold and packed mask."""
    out, t, packed = tk.topk_mask_(x.clone(), sparsity, k, True)
    want_out, want_t, want_packed = _expected(x, sparsity, k)
    assert torch.equal(out.isnan(), want_out.isnan()), (sparsity, k)
    assert torch.equal(out.nan_to_num(), want_out.nan_to_num()), (sparsity, k)
    assert t.shape == () and t.dtype == torch.float32
    assert torch.equal(t.nan_to_num(), want_t.nan_to_num()) and t.isnan() == want_t.isnan(), (float(t), float(want_t))
    assert packed.dtype == torch.uint8 and torch.equal(packed, want_packed), (sparsity, k)


def _device():
    return "cuda" if HAS_CUDA else "cpu"


# ---------------------------------------------------------------------------------------------------
# CPU (interpreter)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(37, 53), (3, 5, 67)])
def test_public_op_runs_triton_and_equals_reference(seed, triton_backend, poisoned, dtype, shape):
    x = torch.randn(shape).to(dtype)
    s = random.Random(seed).uniform(0.05, 0.95)
    y = x.clone()
    out, t = pysnell.topk_mask_(y, sparsity=s)
    assert out is y and pysnell.last_backend("topk.mask_") == "triton"
    want, want_t, _ = _expected(x, sparsity=s)
    assert torch.equal(y, want) and torch.equal(t, want_t)
    k = random.Random(seed + 1).randint(1, x.numel())
    y = x.clone()
    pysnell.topk_mask_(y, k=k)
    assert torch.equal(y, _expected(x, k=k)[0]) and int((y != 0).sum()) <= k
    _check_mask(x, sparsity=0.9)


@cpu_only
def test_ties_break_in_flat_index_order_across_programs(seed, monkeypatch, triton_backend, poisoned):
    _config(monkeypatch, **SMALL)
    x = torch.randint(-3, 4, (29, 37)).float()  # 7 values: every threshold is a heavy tie
    rng = random.Random(seed)
    for k in (rng.randint(1, 500), rng.randint(500, x.numel() - 1)):
        _check_mask(x, k=k)
    _check_mask(x, sparsity=rng.random())


@cpu_only
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in the lerp, as torch
def test_edge_cases(seed, triton_backend, poisoned):
    x = torch.randn(29, 31)
    _check_mask(x, k=0)  # keeps nothing, t = +inf
    _check_mask(x, k=x.numel())  # keeps everything
    _check_mask(x, sparsity=0.0)  # keeps everything, t = the smallest magnitude
    const = torch.full((13, 17), -2.5)
    _check_mask(const, k=100)  # all tied: the first 100 in flat order
    _check_mask(const, sparsity=0.6)  # t equals every value: nothing is strictly greater
    nan = torch.randn(19, 23)
    nan[torch.rand(nan.shape) < 0.3] = float("nan")
    n_numbers = int((~nan.isnan()).sum())
    _check_mask(nan, k=n_numbers + 7)  # NaN ranks lowest: 7 NaNs fill the last slots and stay NaN
    _check_mask(nan, sparsity=0.5)
    _check_mask(torch.tensor([float("nan")] * 9), sparsity=0.5)  # t = -1 (NaN's rank)
    _check_mask(torch.tensor([3.0]), k=1)
    # float64 ranks in float32 as the reference does: 1e300 and inf tie at inf, 1e-300 and -0.0 at 0
    wide = torch.randn(7, 11, dtype=torch.float64)
    wide.view(-1)[:12] = torch.tensor([1e300, -1e300, float("inf"), 1e-300, -0.0, 0.0, 3e-39] * 2)[:12]
    _check_mask(wide, k=2)
    _check_mask(wide, k=5)
    _check_mask(wide, sparsity=0.05)


@cpu_only
def test_threshold_per_group_with_tensor_sparsity(seed, triton_backend, poisoned):
    x = torch.randn(3, 311) * torch.tensor([[0.01], [1.0], [100.0]])
    for s in (0.37, torch.tensor(0.83, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float32)):
        t = select_threshold(x, s)
        assert pysnell.last_backend("topk.threshold") == "triton"
        assert t.shape == (3,) and t.dtype == torch.float32
        assert torch.equal(t, ref.quantile_threshold(ref.magnitude_keys(x), s))


@cpu_only
def test_sample_path_reaches_candidates(seed, monkeypatch, triton_backend, poisoned, traces):
    _config(monkeypatch, **SMALL)
    x = torch.randn(2001)
    _check_mask(x, sparsity=0.9)
    _check_mask(x.half(), k=random.Random(seed).randint(1, 2001))
    for phases in traces():
        assert {PH_SAMPLE, PH_COMPACT, PH_CAND} <= phases and PH_FULL not in phases


@cpu_only
@pytest.mark.parametrize("side", ["below", "above"])
def test_sample_miss_falls_back_to_full_row(seed, monkeypatch, triton_backend, poisoned, traces, side):
    cfg = _config(monkeypatch, **SMALL)
    n = 1501
    # The sampled entries are tiny and the rest huge (or the reverse): the sample's window around
    # the 50% quantile holds none of the row's middle entries.
    x = torch.rand(n) + 10.0
    sampled = tk.sample_positions(n, cfg)
    x[sampled] = torch.rand(sampled.numel()) * 1e-3
    if side == "above":
        x = 1.0 / x
    _check_mask(x, sparsity=0.5)
    _check_mask(x, k=n // 2)
    for phases in traces():
        assert {PH_SAMPLE, PH_COMPACT, PH_FULL} <= phases


@cpu_only
def test_window_overflow_falls_back_to_full_row(seed, monkeypatch, triton_backend, poisoned, traces):
    _config(monkeypatch, **SMALL, cand_dedicated_max=8)  # 8 candidate slots
    x = torch.randn(1999)
    _check_mask(x, sparsity=0.7)
    assert {PH_COMPACT, PH_FULL} <= traces()[0]


@cpu_only
def test_full_row_rounds_hand_over_to_candidates(seed, monkeypatch, triton_backend, poisoned, traces):
    # 1000 keys in 16 tiles of 64 read by 4 programs; 300 candidate slots. Round 1 (the whole key
    # range) overflows them; round 2 copies the 280 keys of the binade [1, 2) and hands over.
    _config(
        monkeypatch,
        round_block=64,
        compact_block=64,
        mask_block=64,
        kmode_mask_block=64,
        max_programs=4,
        cand_dedicated_max=300,
    )
    parts = (torch.rand(360) * 0.9 + 0.05, 1.0 + torch.rand(280) * 0.99, 2.0 + torch.rand(360) * 1.9)
    x = torch.cat(parts)[torch.randperm(1000)] * torch.where(torch.rand(1000) < 0.5, -1.0, 1.0)
    _check_mask(x, sparsity=random.Random(seed).uniform(0.37, 0.63))
    _check_mask(x, k=random.Random(seed).randint(361, 639))
    for phases in traces():
        assert {PH_FULL, PH_CAND} <= phases and PH_SAMPLE not in phases


def _lerp_cases():
    """(a, b, s) with v[lo] = a, v[hi] = b where torch.lerp's two branches round differently."""
    rng = torch.Generator().manual_seed(1234)
    cases = {}
    for _ in range(20000):
        a, b = (torch.rand(2, generator=rng) * torch.tensor([1.0, 50.0])).tolist()
        s = 4 / 9 + torch.rand((), generator=rng).item() / 9  # pos = 9s in (4, 5): lo = 4, hi = 5
        t_lo, t_hi = torch.tensor(a), torch.tensor(b)
        w = torch.tensor(9 * s - 4, dtype=torch.float64).float()
        low, high = t_lo + w * (t_hi - t_lo), t_hi - (t_hi - t_lo) * (1.0 - w)
        key = bool(w < 0.5)
        if key not in cases and not torch.equal(low, high):
            cases[key] = (a, b, s)
        if len(cases) == 2:
            return list(cases.values())
    raise AssertionError("no distinguishing case found")


@pytest.mark.parametrize("case", range(2))
def test_threshold_rounds_exactly_like_torch_lerp(triton_backend, case):
    """5 copies of a and 5 of b, s between ranks 4 and 5: the lerp branch and its rounding (no FMA) show."""
    a, b, s = _lerp_cases()[case]
    x = torch.tensor([a] * 5 + [b] * 5, device=_device()).view(1, -1)
    want = ref.quantile_threshold(ref.magnitude_keys(x), s)
    assert torch.equal(tk.topk_threshold(x, s), want)
    assert torch.equal(tk.topk_threshold(x, torch.tensor(s, dtype=torch.float64, device=_device())), want)


@cpu_only
def test_autograd_form_gradient(seed, triton_backend):
    x = torch.randn(23, 45, requires_grad=True)
    g = torch.randn(23, 45)
    out, t = pysnell.topk_mask(x, sparsity=0.8)
    assert pysnell.last_backend("topk.mask_") == "triton"
    (out * g).sum().backward()
    keep, want_t = ref.keep_mask(x.detach(), sparsity=0.8)
    keep = keep.view(x.shape)
    assert torch.equal(out.detach(), x.detach() * keep) and torch.equal(t, want_t.float())
    assert torch.equal(x.grad, g * keep)
    x.grad = None
    out, _ = pysnell.topk_mask(x, k=100)
    out.backward(g)
    assert torch.equal(x.grad, g * ref.keep_mask(x.detach(), k=100)[0].view(x.shape))


@cpu_only
def test_non_contiguous_input_is_masked_in_place(seed, triton_backend):
    base = torch.randn(40, 30)
    x = base.t()  # flat order is x's own (row-major) order, not the storage order
    want = _expected(x, k=77)[0]
    out, _ = pysnell.topk_mask_(x, k=77)
    assert out is x and torch.equal(x, want) and torch.equal(base, want.t())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("value", [float("nan"), -0.5, 1.5, float("inf"), float("-inf")])
@pytest.mark.parametrize("sampled", [False, True])
def test_unchecked_device_sparsity_follows_the_reference(seed, monkeypatch, triton_backend, value, sampled):
    # A GPU sparsity buffer is never read on the host (no sync), so nothing validates it: whatever it
    # holds, the kernels must pick what the reference picks (position nan_to_num'd, then clamped).
    if sampled:
        _config(monkeypatch, **SMALL)
    s = torch.tensor(value, dtype=torch.float64)
    x = torch.randn(3, 700)
    assert torch.equal(tk.topk_threshold(x, s), ref.quantile_threshold(ref.magnitude_keys(x), s))
    _check_mask(torch.randn(1200), sparsity=s)


@cpu_only
def test_threshold_rejects_a_non_matrix(triton_backend):
    with pytest.raises(ValueError, match="x2d must be 2-D"):
        tk.topk_threshold(torch.randn(5), 0.5)


# ---------------------------------------------------------------------------------------------------
# sm_90 compilation without a GPU: the interpreter accepts code that a GPU compiler may refuse.

_AOT = textwrap.dedent(
    """
    import json, os
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    from pysnell.triton_kernels._aot import compile_only, resource_usage
    import pysnell.triton_kernels.topk as tk
    # The host code as a GPU runs it (GPU launch config), on CPU tensors nothing reads.
    # Every kernel once (6 compilations): the sample path on an fp32 row divisible by 16, and
    # k-mode (tie counts) on a short bf16 row of odd length (full-row rounds only).
    with compile_only() as calls:
        tk.topk_mask_(torch.empty(4096 * 1024), 0.9, None, True)
        tk.topk_mask_(torch.empty(1001, dtype=torch.bfloat16), None, 123, True)
    compiled = {(fn.fn.__name__, k.hash): k for fn, _, _, _, k in calls}
    report = []
    for (name, _), k in compiled.items():
        report.append(dict(kernel=name, **resource_usage(k), smem=k.metadata.shared,
                           vector_loads="ld.global.v4" in k.asm["ptx"]))
    print(json.dumps(report))
    """
)


@pytest.mark.slow
@cpu_only
def test_kernels_compile_for_sm90():
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump").exists():
        pytest.skip("this Triton has no NVIDIA backend tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = {r["kernel"] for r in report}
    assert kernels == {"_round_kernel", "_compact_kernel", "_tie_count_kernel", "_mask_kernel"}, kernels
    for r in report:
        assert r["stack"] == 0, f"register spills: {r}"
        if r["kernel"] == "_compact_kernel":  # the full-row pass: 2 programs of 256 threads per SM
            assert r["regs"] <= 128, r
    # the aligned fp32 row streams with 16-byte loads in the passes over the whole tensor
    assert any(r["vector_loads"] for r in report if r["kernel"] == "_compact_kernel"), report
    assert any(r["vector_loads"] for r in report if r["kernel"] == "_mask_kernel"), report


# ---------------------------------------------------------------------------------------------------
# GPU

# Every shape and dtype of the issue, each dtype on a small and a large shape (each distinct
# dtype / alignment / path compiles its own kernels: a few seconds each).
GPU_CASES = [
    ((768, 768), torch.bfloat16),
    ((11008, 4096), torch.bfloat16),
    ((3072, 768), torch.float16),
    ((4096, 4096), torch.float16),
    ((768, 768), torch.float32),
    ((4096, 4096), torch.float32),
    ((11008, 4096), torch.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", GPU_CASES)
def test_gpu_equals_reference(seed, shape, dtype):
    x = torch.randn(shape, device="cuda").to(dtype)
    _check_mask(x, sparsity=0.9)  # keep 10%
    _check_mask(x, sparsity=random.Random(seed).random())
    _check_mask(x, k=random.Random(seed + 1).randint(1, x.numel()))


@pytest.mark.gpu
def test_gpu_threshold_groups_without_host_sync(seed):
    # 11010 rows: three equal groups of 15M elements (45M in all), as SNELL's fused qkv would split them
    x = torch.randn(11010, 4096, device="cuda") * torch.rand(11010, 1, device="cuda")
    s = torch.tensor(0.9, dtype=torch.float64, device="cuda")
    tk.topk_threshold(x.view(3, -1), s)  # compile outside the checked region
    tk.topk_mask_(x.clone(), s, None, True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        t = tk.topk_threshold(x.view(3, -1), s)
        out, t_mask, packed = tk.topk_mask_(x.clone(), s, None, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(t, ref.quantile_threshold(ref.magnitude_keys(x.view(3, -1)), s))
    _, want_t, want_packed = _expected(x, sparsity=s)
    assert torch.equal(t_mask, want_t) and torch.equal(packed, want_packed)


@pytest.mark.gpu
def test_gpu_paths_at_scale(seed, traces):
    n = 4096 * 1024
    x = torch.rand(n, device="cuda") + 10.0
    sampled = tk.sample_positions(n).cuda()
    x[sampled] = torch.rand(sampled.numel(), device="cuda") * 1e-3
    _check_mask(x, sparsity=0.5)  # the sample misses: full-row rounds
    _check_mask(1.0 / x, k=n // 3)
    ties = torch.randint(-2, 3, (11008, 4096), device="cuda").half()  # 5 values over 45M: overflow
    _check_mask(ties, k=random.Random(seed).randint(1, ties.numel()))
    _check_mask(ties, sparsity=0.5)
    phases = traces()
    assert all(PH_FULL in p for p in phases), phases
    normal = torch.randn(3072, 768, device="cuda")
    _check_mask(normal, sparsity=0.9)
    assert {PH_SAMPLE, PH_COMPACT, PH_CAND} <= traces()[-1] and PH_FULL not in traces()[-1]


@pytest.mark.gpu
def test_gpu_autograd_form_gradient(seed, backend):
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    backend.set_backend("triton")
    out, _ = pysnell.topk_mask(x, sparsity=0.9)
    assert pysnell.last_backend("topk.mask_") == "triton"
    out.backward(g)
    keep = ref.keep_mask(x.detach(), sparsity=0.9)[0].view(x.shape)
    assert torch.equal(out.detach(), x.detach() * keep) and torch.equal(x.grad, g * keep)


@pytest.mark.gpu
def test_gpu_extra_memory_within_budget(seed):
    x = torch.randn(11008, 4096, device="cuda")
    tk.topk_mask_(x.clone(), 0.9, None, True)  # compile first
    for args in ((0.9, None, True), (None, 4_000_000, True), (0.5, None, False)):
        y = x.clone()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _, _, packed = tk.topk_mask_(y, *args)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        assert extra <= 2**20 + x.numel() // 8, (args, extra)
