"""Timing and memory helpers shared by every benchmark module.

Each `benchmarks/ops_<family>.py` exposes `run(full: bool, device: str) -> list[dict]` and
builds its rows with `measure(...)`. A row's keys: op, case, provider, baseline, dtype, pass,
median_ms, p20_ms, p80_ms, peak_mib, plus anything case-specific. The runner adds the device
name, package versions and git revision, and the ratio of each row to its group's baseline.
"""

from __future__ import annotations

import statistics
import time

import torch


def _quantiles(times_ms):
    times = sorted(times_ms)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7]}


def time_fn(fn, *, device: str, warmup: int = 5, reps: int = 20) -> dict:
    """Median/p20/p80 milliseconds of fn(): CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def peak_mib(fn, *, device: str) -> float:
    """Peak device memory allocated by fn() above what existed before it (MiB); NaN on CPU."""
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
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
    **extra,
) -> dict:
    """One result row for fn on this device."""
    row = {
        "op": op,
        "case": case,
        "provider": provider,
        "baseline": baseline,
        "dtype": str(dtype).replace("torch.", ""),
        "pass": pass_,
        "device": device,
    }
    row.update(time_fn(fn, device=device, warmup=warmup, reps=reps))
    row["peak_mib"] = peak_mib(fn, device=device)
    row.update(extra)
    return row
