"""Triton's Python launch cost per pysnell kernel, measured without a GPU.

    python -m benchmarks.launch_cost

Every Triton launch runs Python before the driver call: binding and specialising the arguments,
the compile-cache lookup, and a check that each global constant the kernel uses is unchanged.
On a small layer step that cost, times the launches per step, can exceed the kernels' own time.
This script compiles each kernel of a SNELL layer step, a Monarch layer step and a top-k call once
under pysnell.triton_kernels._aot.compile_only (sm_90, Triton's bundled ptxas, no launch), then times
`JITFunction.run(..., warmup=True)` on the cache hit: the whole Python path of a launch except
the final driver call (a few µs more on a GPU host). A second table times each whole call, all of
pysnell's and Triton's Python up to a launcher that only records (_aot.fake_launches), with
_host.launch's direct launches and without. Times are this CPU's; compare versions here.
"""

from __future__ import annotations

import argparse
import os
import time

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter has no launch path to time
    raise SystemExit("benchmarks.launch_cost compiles for sm_90: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton.runtime.jit as jit  # noqa: E402


def _workloads(whole_calls: bool = False):
    """One call of each op family on CPU tensors shaped like a small GPU step (bf16).

    whole_calls: the SNELL layer at 96², 16 tokens, fp32, whose GEMMs (aten calls, computed on this
    CPU, a few µs) stay small beside the host code being timed."""
    from pysnell.triton_kernels import monarch, snell, topk

    from pysnell.functional import kernel_params
    from pysnell.ops.monarch.function import monarch_shapes
    from pysnell.ops.snell.reference import KernelParams, SnellSpec

    m = n = 96 if whole_calls else 768
    tokens, dtype = (16, torch.float32) if whole_calls else (64, torch.bfloat16)
    A, B = torch.rand(8, n) * 0.1, torch.rand(m, 8) * 0.1
    params = KernelParams(*kernel_params(A, "piecewise", 2, 0.1))
    spec = SnellSpec("piecewise", 2, "reference", 1)
    x, W, dy = (torch.randn(s, dtype=dtype) for s in ((tokens, n), (m, n), (tokens, m)))
    yield "SNELL layer fwd", lambda: snell.layer_forward(x, W, None, A, B, params, spec, 0.9)
    t = torch.zeros(1)
    yield "SNELL layer bwd", lambda: snell.layer_backward(dy, x, W, A, B, params, spec, 0.9, t, (True,) * 9)
    w1s, w2s = monarch_shapes(1024, 1024, 4)
    w1, w2 = torch.randn(w1s, dtype=torch.bfloat16), torch.randn(w2s, dtype=torch.bfloat16)
    xm, dym, bias = torch.randn(64, 1024, dtype=torch.bfloat16), torch.randn(64, 1024, dtype=torch.bfloat16), None
    yield "Monarch fwd", lambda: monarch.monarch_forward(xm, w1, w2, bias, 1024)
    yield "Monarch bwd", lambda: monarch.monarch_backward(dym, xm, w1, w2, (True, True, True))
    xt = torch.randn(768, 768)
    yield "top-k mask_ 768²", lambda: topk.topk_mask_(xt, 0.9, None, False)
    xt4 = torch.randn(4096, 4096)
    yield "top-k mask_ 4096²", lambda: topk.topk_mask_(xt4, 0.9, None, False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=1000)
    parser.add_argument(
        "--plain-constexpr",
        action="store_true",
        help="kernel constants as plain tl.constexpr (what KernelConstant replaced), for comparison",
    )
    args = parser.parse_args(argv)
    if args.plain_constexpr:
        import triton.language as tl
        from pysnell.triton_kernels import _host

        _host.KernelConstant = tl.constexpr  # before the kernel modules import it
    from pysnell.triton_kernels._aot import compile_only

    run = jit.JITFunction.run  # the real launch path, timed below on the compile-cache hit
    with compile_only() as calls:
        steps = []
        for label, fn in _workloads():
            first = len(calls)
            fn()
            steps.append((label, calls[first:]))
        _time_launches(steps, run, args.reps)
    _time_calls(max(1, args.reps // 5))
    return 0


def _time_calls(reps: int) -> None:
    """Each whole call under a driver whose launcher only records (_aot.fake_launches): all of
    pysnell's and Triton's Python, with launches made directly after their specialisation's first one
    (_host.launch: every launch of a repeated call) or all through Triton's path.
    The SNELL layer runs at a small fp32 shape: its aten GEMMs compute on this CPU."""
    from pysnell.triton_kernels import _host
    from pysnell.triton_kernels._aot import fake_launches

    from . import harness

    print()
    print("Whole call: host Python up to the driver (launcher stubbed), this CPU, µs per call")
    print("| op | Triton launches | every launch through Triton's path | direct launches (_host.launch) |")
    print("|---|---:|---:|---:|")
    with fake_launches() as launches:
        for label, fn in _workloads(whole_calls=True):
            fn()  # compiled here (the compile cache makes it quick after the table above)
            launches.clear()
            fn()
            n_launches = len(launches)
            best = {}
            for on in (False, True):
                with _host.use_relaunch(on):
                    best[on] = harness.best_mean_us(fn, reps, warmup=10, rounds=3, before_round=launches.clear)
            print(f"| {label} | {n_launches} | {best[False]:.1f} | {best[True]:.1f} |")


def _time_launches(steps, run, reps: int) -> None:
    print("Triton launch cost (Python, compile-cache hit, no driver call), this CPU")
    print("| op | kernel | args | global constants | µs per launch |")
    print("|---|---|---:|---:|---:|")
    for label, launches in steps:
        total = 0.0
        for fn, fargs, grid, kwargs, _ in launches:
            for _ in range(10):
                run(fn, *fargs, grid=grid, warmup=True, **kwargs)
            t0 = time.perf_counter()
            for _ in range(reps):
                run(fn, *fargs, grid=grid, warmup=True, **kwargs)
            us = (time.perf_counter() - t0) * 1e6 / reps
            total += us
            n_args = len(fargs) + len(kwargs)
            print(f"| {label} | {fn.fn.__name__} | {n_args} | {len(fn.used_global_vals)} | {us:.1f} |")
        print(f"| {label} | **all {len(launches)} launches** | | | **{total:.1f}** |")


if __name__ == "__main__":
    raise SystemExit(main())
