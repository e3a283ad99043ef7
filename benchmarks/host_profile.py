"""Where one layer step's host time goes, function by function (cProfile), on this machine.

    python -m benchmarks.host_profile [--out DIR] [--quick] [--top N]

benchmarks/profile_gpu.py says whether a step is host-bound; this says what the host does. For the
SNELL layer (768→3072, T=12608, bf16: full FT and each pysnell backend) and the Monarch layer
(T=1, 4096, nblocks 4: dense and each backend) it prints the host µs of one fwd+bwd step without a
profiler, then the functions with the most own time under cProfile (µs per step; cProfile inflates
Python's cost, so read shares, not totals). Triton rows are timed again with every launch through
Triton's own launch path (what _host.launch's direct launches save). First it times a few primitives on this host
(an empty tensor, a small aten kernel, an empty Triton kernel with 1 and with 32 arguments), so a
CPU-side measurement can be scaled to the GPU machine's host. `--quick` runs tiny CPU shapes
(Triton under the interpreter) to prove the script.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
from pathlib import Path

if "--quick" in sys.argv:  # CPU tensors run the kernels: the interpreter is chosen when kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from pysnell.triton_kernels import _host  # noqa: E402

import pysnell  # noqa: E402
from pysnell import _backend  # noqa: E402

from . import harness, ops_snell  # noqa: E402
from .harness import forced_backend  # noqa: E402

WARMUP, STEPS = 5, 40  # steps before timing, and timed steps (--quick: 1 and 2)


def _host_us(step, clear, sync) -> float:
    def cleared_step():
        clear()
        step()

    us = harness.best_mean_us(cleared_step, STEPS, warmup=WARMUP, rounds=1, before_round=sync)
    sync()
    return us


def _top(step, clear, sync, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(STEPS):
        clear()
        step()
    prof.disable()
    sync()
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # (cc, nc, tottime, cumtime, callers)
    lines = [f"    {'own µs':>8} {'cum µs':>8} {'calls':>6}  function"]
    for (path, line, name), (_, ncalls, tottime, cumtime, _) in rows:
        where = f"{Path(path).parent.name}/{Path(path).name}:{line}" if path != "~" else ""
        lines.append(
            f"    {tottime * 1e6 / STEPS:8.1f} {cumtime * 1e6 / STEPS:8.1f} {ncalls / STEPS:6.1f}  {name} {where}"
        )
    return "\n".join(lines)


@triton.jit
def _one_arg(x_ptr):
    pass


@triton.jit
def _many_args(x_ptr, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19,
               a20, a21, a22, a23, a24, a25, a26, a27, a28, a29, a30, B1: tl.constexpr):  # fmt: skip
    pass


def _primitives(device) -> list[tuple[str, float]]:
    """µs per call of a few host primitives on this machine."""
    x = torch.randn(4096, device=device)
    y = torch.empty_like(x)
    ints = list(range(3, 33))
    cases = [
        ("torch.empty(4096)", lambda: torch.empty(4096, device=device)),
        ("torch.add(x, 1, out=y)", lambda: torch.add(x, 1, out=y)),
        ("x.sum()", lambda: x.sum()),
        ("Triton launch, 1 argument", lambda: _one_arg[(1,)](x)),
        ("Triton launch, 31 arguments + 1 constexpr", lambda: _many_args[(1,)](x, *ints, B1=16)),
    ]
    if device.type == "cuda":
        cases.append(("torch.cuda.current_stream()", torch.cuda.current_stream))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = 2000 if device.type == "cuda" else 20
    out = []
    for name, fn in cases:
        out.append((name, harness.best_mean_us(fn, n, warmup=20, rounds=1, before_round=sync)))
        sync()
    return out


def _cases(quick: bool, device):
    dtype = torch.float32 if quick else torch.bfloat16
    T, n, m = (16, 24, 20) if quick else (12608, 768, 3072)
    case = ops_snell._Case(T, n, m, 8, dtype, device)
    backends = ("triton", "torch") if quick else ("triton", "cuda")
    yield f"snell_layer T{T} {n}x{m}", "full_ft", None, ops_snell._full_ft_provider(case), case.dy
    for backend in backends:
        if _backend.available("snell.layer_forward", backend, device):
            yield f"snell_layer T{T} {n}x{m}", f"pysnell_{backend}", backend, ops_snell._pysnell_provider(case), case.dy
    # the module path (SNELLLinear), as users call it
    layer = pysnell.SNELLLinear(torch.nn.Linear(n, m, device=device, dtype=dtype), r=8, sparsity=0.9)
    x = case.x

    def module_forward():
        return layer(x)

    for backend in backends:
        if _backend.available("snell.layer_forward", backend, device):
            leaves = [x, *(p for p in layer.parameters() if p.requires_grad)]
            yield f"SNELLLinear T{T} {n}x{m}", f"pysnell_{backend}", backend, (module_forward, leaves), case.dy
    T, n, nb = (1, 32, 4) if quick else (1, 4096, 4)
    dense = torch.nn.Linear(n, n, device=device, dtype=dtype)
    mon = pysnell.MonarchLinear(n, n, nb, device=device, dtype=dtype)
    xm = torch.randn(T, n, device=device, dtype=dtype, requires_grad=True)
    dym = torch.randn(T, n, device=device, dtype=dtype)
    for name, backend, module in (("dense", None, dense), *((f"pysnell_{b}", b, mon) for b in backends)):
        if backend is None or _backend.available("monarch.forward", backend, device):
            leaves = [xm, *module.parameters()]
            yield f"monarch T{T} {n} nb{nb}", name, backend, ((lambda module=module: module(xm)), leaves), dym


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--top", type=int, default=18)
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    if args.quick:
        global WARMUP, STEPS
        WARMUP, STEPS = 1, 2
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    report = io.StringIO()

    def say(text=""):
        print(text, flush=True)
        report.write(text + "\n")

    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    say(f"host profile on {where} · torch {torch.__version__}")
    say("primitives, µs per call:")
    for name, us in _primitives(device):
        say(f"  {us:8.2f}  {name}")
    summary = []
    for label, provider, backend, (forward, leaves), dy in _cases(args.quick, device):

        def step(forward=forward, backend=backend, dy=dy):
            with forced_backend(backend):
                forward().backward(dy)

        def clear(leaves=leaves):
            for t in leaves:
                t.grad = None

        try:
            us = _host_us(step, clear, sync)
            table = _top(step, clear, sync, args.top)
            if backend == "triton" and device.type == "cuda":  # what direct launches save (_host.launch)
                with _host.use_relaunch(False):
                    summary.append(
                        (label, f"{provider} (every launch through Triton's path)", _host_us(step, clear, sync))
                    )
        except Exception as exc:  # noqa: BLE001 - one provider failing must not stop the rest
            say(f"{label} · {provider}: {type(exc).__name__}: {exc}"[:300])
            continue
        summary.append((label, provider, us))
        say(f"\n{label} · {provider}: host {us:.0f} µs per fwd+bwd (no profiler); under cProfile, per step:")
        say(table)
    say("\n| case | provider | host µs per fwd+bwd |\n|---|---|---:|")
    for label, provider, us in summary:
        say(f"| {label} | {provider} | {us:.0f} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host_profile.txt").write_text(report.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
