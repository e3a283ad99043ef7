"""One layer step for Nsight Compute: warm up, then run exactly one step inside the profiler window.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... \\
        python -m benchmarks.ncu_step --op snell --backend triton

The step runs between torch.cuda.profiler.start() and stop(), so ncu's `--profile-from-start off`
limits it to that step: compiles, the CUDA build and the warm-up steps stay outside. gpu_run.sh's
`ncu` step runs it for the three kernel families at the shapes where the kernels, not the host,
miss their targets:
- snell: the SNELL layer's fwd+bwd at 4096→11008, T = 4096, bf16, r = 8 (the selection pass took 4×
  the W_eff pass over the same ΔW in session 8);
- monarch: MonarchLinear fwd+bwd at 4096, 4 blocks, T = 8192, bf16 (its block GEMMs ran at about
  570 TFLOPS against cuBLAS's 785 on the dense layer);
- topk: topk_mask_ on 11008×4096 fp32 at 90% (3.3× the one-pass floor in session 8).
--quick runs the same code on the CPU at a tiny shape without a profiler (Triton interpreted), as
the tests do.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

OPS = ("snell", "monarch", "topk")
WARMUP_STEPS = 2


def _step(op: str, device: str, quick: bool):
    """(step, setup): setup() runs before each step outside the profiler window (fresh inputs)."""
    import pysnell

    dtype = torch.float32 if quick else torch.bfloat16
    if op == "snell":
        from . import ops_snell

        T, n, m = (16, 24, 20) if quick else (4096, 4096, 11008)
        case = ops_snell._Case(T, n, m, 8, dtype, device)
        forward, leaves = ops_snell._pysnell_provider(case)

        def setup():
            for t in leaves:
                t.grad = None

        def step():
            forward().backward(case.dy)

        return step, setup
    if op == "monarch":
        T, n, nb = (32, 64, 4) if quick else (8192, 4096, 4)
        layer = pysnell.MonarchLinear(n, n, nb, device=device, dtype=dtype)
        x = torch.randn(T, n, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(T, n, device=device, dtype=dtype)

        def setup():
            x.grad = None
            layer.zero_grad(set_to_none=True)

        def step():
            layer(x).backward(dy)

        return step, setup
    if op == "topk":
        rows, cols = (37, 29) if quick else (11008, 4096)
        source = torch.randn(rows, cols, device=device)
        work = torch.empty_like(source)

        def setup():
            work.copy_(source)

        def step():
            pysnell.topk_mask_(work, sparsity=0.9)

        return step, setup
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--op", choices=OPS, required=True)
    parser.add_argument("--backend", default="triton", choices=["triton", "cuda", "torch"])
    parser.add_argument("--quick", action="store_true", help="CPU, tiny shape, no profiler window")
    args = parser.parse_args(argv)
    if args.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
        device = "cpu"
    elif not torch.cuda.is_available():
        print("benchmarks.ncu_step needs a CUDA GPU (or --quick)", file=sys.stderr)
        return 2
    else:
        device = "cuda"

    from .harness import forced_backend

    with forced_backend(args.backend):
        step, setup = _step(args.op, device, args.quick)
        for _ in range(WARMUP_STEPS):
            setup()
            step()
        setup()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        import pysnell

        op_name = {"snell": "snell.layer_forward", "monarch": "monarch.forward", "topk": "topk.mask_"}[args.op]
        ran = pysnell.last_backend(op_name)
    if ran != args.backend:
        print(f"benchmarks.ncu_step: asked for the {args.backend} backend, {op_name} ran on {ran}", file=sys.stderr)
        return 1
    print(f"profiled one {args.op} step on {device} with the {ran} backend")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
