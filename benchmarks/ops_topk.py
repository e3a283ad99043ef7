"""In-place top-k magnitude masking: pysnell's backends vs torch.topk + scatter, torch.kthvalue,
torch.quantile and the one-pass floor (spec/TOPK.md).

Full (GPU): keep 10% (sparsity 0.9) of an fp32 tensor of 768x768, 3072x768, 4096x4096 and
11008x4096, and of a bf16 one of 4096x4096 and 11008x4096. Quick (CPU): two tiny fp32 tensors
(Triton interpreted), a few calls each: it proves the harness, nothing about speed.

Providers (one group per case and dtype, baseline "torch.topk+scatter"):
- pysnell-<backend>: pysnell.topk_mask_(x, sparsity=0.9) with each backend that has a top-k
  kernel on this device ("triton", "cuda"), forced with pysnell.set_backend, and the "torch"
  reference;
- torch.topk+scatter: k = N - floor(0.9 (N - 1)) - 1 largest |x| by torch.topk, a bool mask by
  scatter_, masked_fill_ of the rest (ties broken as topk breaks them);
- torch.kthvalue: the same k-th largest |x| as a threshold (up to 2.4M elements: it takes
  hundreds of ms above);
- torch.quantile: t = torch.quantile(|x|, 0.9), keep |x| > t (an error row above 2^24
  elements, where torch.quantile raises);
- one-pass floor: x.mul_(1.0), one read and one write of the tensor in place.

Timing: masking destroys its input, so every timed call gets a fresh copy: before each call x is
restored with copy_ from a pristine tensor and the L2 cache is flushed (a 256 MiB write), both
outside the CUDA events that time the call (the harness's method, plus the restore). Every
provider's output is checked once against pysnell.ops.topk.reference before it is timed (row
field "check"). peak_mib is the memory one call allocates above the resident tensor.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

import pysnell
from pysnell import _backend
from pysnell.ops.topk import reference as ref

from . import harness

OP = "topk_mask_"
BASELINE = "torch.topk+scatter"
SPARSITY = 0.9
FULL_CASES = [
    ((768, 768), torch.float32),
    ((3072, 768), torch.float32),
    ((4096, 4096), torch.float32),
    ((11008, 4096), torch.float32),
    ((4096, 4096), torch.bfloat16),
    ((11008, 4096), torch.bfloat16),
]
QUICK_CASES = [((24, 40), torch.float32), ((33, 29), torch.float32)]
KTHVALUE_MAX_NUMEL = 3072 * 768


def _k_for(n: int) -> int:
    """Entries the quantile rule keeps for random data (no ties): those above rank floor(s (N-1))."""
    return n - math.floor(SPARSITY * (n - 1)) - 1


def _topk_scatter(x):
    flat = x.view(-1)
    idx = flat.abs().topk(_k_for(flat.numel()), sorted=False).indices
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, idx, True)
    flat.masked_fill_(~keep, 0)
    return x


def _kthvalue(x):
    flat = x.view(-1)
    mag = flat.abs().float()
    t = torch.kthvalue(mag, flat.numel() - _k_for(flat.numel()) + 1).values
    flat.masked_fill_(mag < t, 0)
    return x


def _quantile(x):
    flat = x.view(-1)
    mag = flat.abs().float()
    flat.masked_fill_(mag <= torch.quantile(mag, SPARSITY), 0)
    return x


def _floor(x):
    return x.mul_(1.0)


def _pysnell(backend: str, relaunch: bool = True):
    def fn(x):
        with harness.forced_backend(backend), _relaunch(relaunch):
            pysnell.topk_mask_(x, sparsity=SPARSITY)
            ran = pysnell.last_backend("topk.mask_")
        if ran != backend:
            raise RuntimeError(f"asked for the {backend} backend, {ran} ran")
        return x

    return fn


def _relaunch(on: bool):
    """Triton's rounds after the first replayed (the default) or each through Triton's launch path."""
    if on:
        return contextlib.nullcontext()
    from pysnell.triton_kernels import _host

    return _host.use_relaunch(False)


def _providers(device: torch.device, numel: int):
    providers = {}
    for backend in ("triton", "cuda", "torch"):
        if _backend.available("topk.mask_", backend, device):
            providers[f"pysnell-{backend}"] = _pysnell(backend)
    if device.type == "cuda" and "pysnell-triton" in providers:  # what the replayed rounds save
        providers["pysnell-triton-norelaunch"] = _pysnell("triton", relaunch=False)
    providers[BASELINE] = _topk_scatter
    if numel <= KTHVALUE_MAX_NUMEL:
        providers["torch.kthvalue"] = _kthvalue
    providers["torch.quantile"] = _quantile
    providers["one-pass floor"] = _floor
    return providers


def _check(name: str, out: torch.Tensor, src: torch.Tensor) -> str:
    if name == "one-pass floor":
        return "exact" if torch.equal(out, src) else "changed the values"
    want = src.clone()
    keep, _ = ref.keep_mask(src, sparsity=SPARSITY)
    want.masked_fill_(~keep.view(src.shape), 0)
    if torch.equal(out, want):
        return "exact"
    if name.startswith("pysnell"):
        raise AssertionError(f"{name}: output differs from the reference")
    wrong = int((out != want).sum())
    return f"{wrong} entries differ from the reference (tie rule / rounding)"


def _time_destructive(fn, pristine, x, *, device: str, warmup: int, reps: int) -> dict:
    """harness.time_fn for an op that destroys its input: restore and flush outside the events."""
    cuda = torch.device(device).type == "cuda"
    flush = torch.empty(harness.L2_FLUSH_BYTES, dtype=torch.int8, device=device) if cuda else None
    for _ in range(warmup):
        x.copy_(pristine)
        fn(x)
    times = []
    if cuda:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends):
            x.copy_(pristine)
            flush.zero_()
            start.record()
            fn(x)
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(reps):
            x.copy_(pristine)
            t0 = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t0) * 1e3)
    del flush
    return harness._quantiles(times)


def _bench_case(shape, dtype, device: str, full: bool) -> list[dict]:
    dev = torch.device(device)
    pristine = torch.randn(shape, device=dev).to(dtype)
    x = torch.empty_like(pristine)
    numel = pristine.numel()
    case = f"{'x'.join(map(str, shape))} keep {1 - SPARSITY:.0%}"
    rows = []
    for name, fn in _providers(dev, numel).items():
        ident = dict(op=OP, case=case, provider=name, baseline=BASELINE, dtype=dtype, device=device)
        try:
            x.copy_(pristine)
            check = _check(name, fn(x), pristine)
            slow = name == "torch.kthvalue" or (not full and name.startswith("pysnell-triton"))
            warmup, reps = (1, 3) if slow or not full else (5, 20)
            row = harness.base_row(**ident)
            row.update(_time_destructive(fn, pristine, x, device=device, warmup=warmup, reps=reps))
            x.copy_(pristine)
            row["peak_mib"] = harness.peak_mib(lambda fn=fn: fn(x), device=device)
            row.update(check=check, size=numel)
        except Exception as exc:  # noqa: BLE001 - a provider that cannot run (or is wrong) is an error row
            row = harness.error_row(exc, **ident)
            row["size"] = numel
        rows.append(row)
    return rows


def run(full: bool, device: str) -> list[dict]:
    rows = []
    for shape, dtype in FULL_CASES if full else QUICK_CASES:
        rows.extend(_bench_case(shape, dtype, device, full))
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return rows
