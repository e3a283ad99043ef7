"""Timing and memory helpers shared by every benchmark module.

Each `benchmarks/ops_<family>.py` exposes `run(full: bool, device: str) -> list[dict]` and
builds its rows with `measure(...)`. A row's keys: op, case, provider, baseline, dtype, pass,
device, median_ms, p20_ms, p80_ms, peak_mib, plus anything case-specific (a numeric "size"
is used as the x axis of the plots; an "error" string marks a provider that could not run).
The runner adds the device name, package versions and git revision, and the ratio of each
row to its group's baseline (group = op + case + dtype + pass).

GPU timing follows triton.testing.do_bench: warm-up calls, then one pair of CUDA events per
call, the L2 cache flushed (a 256 MiB write) before every timed call so no input is cache-hot
(what rotating input copies would achieve, without the copies), one synchronisation at the
end, and the median / p20 / p80 of the per-call times. CPU timing uses perf_counter.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time

import torch

REQUIRED_KEYS = (
    "op",
    "case",
    "provider",
    "baseline",
    "dtype",
    "pass",
    "device",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "peak_mib",
)
# Larger than the L2 of any current GPU (H100 50 MiB, H200 60 MiB, B200 126 MiB).
L2_FLUSH_BYTES = 256 * 2**20


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _quantiles(times_ms):
    times = sorted(times_ms)
    if len(times) >= 2:
        q = statistics.quantiles(times, n=10, method="inclusive")
    else:
        q = [times[0]] * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7]}


def _clear_grads(tensors):
    for t in tensors or ():
        t.grad = None


def rel_rmse(got, want) -> float:
    """Relative RMS error ‖got − want‖ / ‖want‖, in float64 (the providers' correctness checks)."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp_min(1e-30))


def time_fn(fn, *, device: str, warmup: int = 5, reps: int = 20, flush_l2: bool = True, grad_to_none=None) -> dict:
    """Median/p20/p80 milliseconds of fn(): CUDA events on a GPU, perf_counter on CPU.

    grad_to_none: tensors whose .grad is reset before every call (outside the timed region),
    so a fwd+bwd closure does not time gradient accumulation.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(warmup):
        _clear_grads(grad_to_none)
        fn()
    times = []
    if _is_cuda(device):
        torch.cuda.synchronize()
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if flush_l2 else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends):
            _clear_grads(grad_to_none)
            if flush is not None:
                flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in zip(starts, ends)]
        del flush
    else:
        for _ in range(reps):
            _clear_grads(grad_to_none)
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def best_mean_us(fn, reps: int, *, warmup: int, rounds: int, before_round=None) -> float:
    """The best, over `rounds` rounds of `reps` back-to-back calls, of the mean µs per fn() call
    (host-side timings on the CPU: the best round is the least disturbed one)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(rounds):
        if before_round is not None:
            before_round()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) * 1e6 / reps)
    return best


def cuda_graph(step, grads_of=()):
    """step() captured into a CUDA graph after two eager warm-up runs on a side stream (compiles,
    caches and the CUDA build happen there); returns (graph, step's output inside the graph). A
    captured backward allocates the gradients of `grads_of` from the graph's pool, and every replay
    rewrites them there."""
    global _capture_failure
    if _capture_failure is not None:
        raise RuntimeError(f"not captured: an earlier capture in this process failed ({_capture_failure})")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _clear_grads(grads_of)
            step()
    torch.cuda.current_stream().wait_stream(side)
    _clear_grads(grads_of)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = step()
    except Exception as exc:
        # A failed capture leaves the CUDA generator mid-capture, so every later capture (and any
        # later draw) in this process fails too: refuse further captures with the first reason.
        _capture_failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        raise
    return graph, out


_capture_failure = None


def peak_mib(fn, *, device: str, absolute: bool = False, grad_to_none=None) -> float:
    """Peak device memory of one fn() call (MiB); NaN on CPU (not measured there).

    By default the peak above what was allocated before the call (the op's own working set);
    absolute=True gives the whole peak, weights and optimizer state included.
    """
    if not _is_cuda(device):
        return float("nan")
    _clear_grads(grad_to_none)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = 0 if absolute else torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(
    fn,
    *,
    op: str,
    case: str,
    provider: str,
    baseline: str,
    dtype,
    device: str,
    pass_: str = "fwd",
    warmup: int = 5,
    reps: int = 20,
    flush_l2: bool = True,
    grad_to_none=None,
    absolute_peak: bool = False,
    **extra,
) -> dict:
    """One result row for fn on this device."""
    row = base_row(op=op, case=case, provider=provider, baseline=baseline, dtype=dtype, device=device, pass_=pass_)
    row.update(time_fn(fn, device=device, warmup=warmup, reps=reps, flush_l2=flush_l2, grad_to_none=grad_to_none))
    row["peak_mib"] = peak_mib(fn, device=device, absolute=absolute_peak, grad_to_none=grad_to_none)
    row.update(extra)
    return row


def base_row(*, op: str, case: str, provider: str, baseline: str, dtype, device: str, pass_: str = "fwd") -> dict:
    """The identifying part of a row (what measure() and error_row() share)."""
    return {
        "op": op,
        "case": case,
        "provider": provider,
        "baseline": baseline,
        "dtype": str(dtype).replace("torch.", ""),
        "pass": pass_,
        "device": str(device),
    }


def error_row(exc: BaseException | str, **ident) -> dict:
    """A row for a provider that could not run (e.g. torch.quantile above 2^24 elements)."""
    row = base_row(**ident)
    nan = float("nan")
    row.update({"median_ms": nan, "p20_ms": nan, "p80_ms": nan, "peak_mib": nan})
    msg = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    row["error"] = " ".join(str(msg).split())[:300]
    return row


def is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@contextlib.contextmanager
def forced_backend(name: str | None):
    """pysnell's backend forced to `name` (None: leave it as it is), restored afterwards."""
    if name is None:
        yield
        return
    import pysnell

    before = pysnell.get_backend()
    pysnell.set_backend(name)
    try:
        yield
    finally:
        pysnell.set_backend(before)
