"""The host side of one layer step, measurable without a GPU: launches per step and Python time.

    python -m benchmarks.host_cost [--backend triton|torch] [--steps N]

On a GPU a small layer step is host-bound when enqueueing it takes longer than running it, so the
number of launches a step makes and the Python time around them are worth watching on their own.
This script runs the pysnell layers on CPU (Triton under the interpreter, set here) and reports:
- launches: Triton kernels, and aten ops that launch a kernel on a GPU (not views, not empty);
- host_us: the best mean of several runs of a step with every Triton launch replaced by a no-op,
  i.e. pysnell's own Python and the aten calls around the kernels, on this CPU (the launch cost
  itself, a few µs to tens of µs per Triton kernel on a GPU host, comes on top);
next to nn.Linear (full fine-tuning) for the same shape. The layer's sparsity buffer lives on the
CPU here, so its value is read on the host (the `eq.Scalar`); a GPU buffer is judged on the device
with no launch. CPU times prove nothing about kernels; the GPU side is benchmarks/profile_gpu.py.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: CPU tensors run the kernels

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import pysnell  # noqa: E402

from . import harness  # noqa: E402

# aten ops that run no kernel on a GPU (metadata, allocation, autograd bookkeeping), by exact name
_NO_KERNEL = frozenset({
    "view", "_unsafe_view", "_reshape_alias", "reshape", "view_as", "t", "transpose", "permute", "select",
    "slice", "detach", "alias", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    "expand", "expand_as", "unsqueeze", "squeeze", "as_strided", "set_", "split", "split_with_sizes",
    "unbind", "promote_types", "_local_scalar_dense", "lift_fresh",
})  # fmt: skip
IN_F, OUT_F, TOKENS = 64, 48, 8


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not self.paused and func.overloadpacket.__name__ not in _NO_KERNEL:
            self.ops[name.removeprefix("aten.").removesuffix(".default")] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _triton_launches(mode: str, counter: collections.Counter, watch: _Count | None = None):
    """Wrap every Triton kernel of pysnell: mode "count" runs and counts it, "stub" skips it."""
    from pysnell.triton_kernels import monarch, snell, topk

    saved = []
    for module in (snell, monarch, topk):
        for name in dir(module):
            kernel = getattr(module, name)
            if name.startswith("_") and name.endswith("_kernel") and hasattr(kernel, "fn"):
                saved.append((module, name, kernel))
                setattr(module, name, _Launcher(kernel, name, mode, counter, watch))
    try:
        yield
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)


class _Launcher:
    def __init__(self, kernel, name, mode, counter, watch):
        self.kernel, self.name, self.mode, self.counter, self.watch = kernel, name, mode, counter, watch

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counter[self.name.strip("_")] += 1
            if self.mode == "stub":
                return None
            if self.watch is not None:
                self.watch.paused = True  # the interpreter's own tensor traffic is not a GPU launch
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                if self.watch is not None:
                    self.watch.paused = False

        return launch


def _steps():
    """(name, fwd, fwd+bwd) closures on fresh random data."""
    torch.manual_seed(0)
    x = torch.randn(TOKENS, IN_F, requires_grad=True)
    dy = torch.randn(TOKENS, OUT_F)  # a real gradient (sum()'s is an expanded view that some paths copy)
    dense = torch.nn.Linear(IN_F, OUT_F)
    snell = pysnell.SNELLLinear(torch.nn.Linear(IN_F, OUT_F), r=8, sparsity=0.9)
    # the reference's training recipe: the branch form (keep bits drawn, packed and applied per step)
    snell_drop = pysnell.SNELLLinear(torch.nn.Linear(IN_F, OUT_F), r=8, sparsity=0.9, dropout=0.1, drop_path=0.1)
    monarch = pysnell.MonarchLinear(IN_F, OUT_F, nblocks=4)
    out = []
    layers = (
        ("nn.Linear (full FT)", dense),
        ("SNELLLinear r=8", snell),
        ("SNELLLinear r=8, dropout + drop-path (training)", snell_drop.train()),
        ("MonarchLinear nb=4", monarch),
    )
    for name, layer in layers:
        params = [p for p in layer.parameters() if p.requires_grad]

        def fwd(layer=layer):
            with torch.no_grad():
                layer(x)

        def fwd_bwd(layer=layer, params=params):
            x.grad = None
            for p in params:
                p.grad = None
            layer(x).backward(dy)

        out.append((name, fwd, fwd_bwd))
    return out


def _count(step) -> tuple[dict, dict]:
    step()  # caches (default constants) filled outside the count
    triton, watch = collections.Counter(), _Count()
    with _triton_launches("count", triton, watch), watch:
        step()
    return dict(triton), dict(watch.ops)


def _host_us(step, steps: int) -> float:
    with _triton_launches("stub", collections.Counter()):
        return harness.best_mean_us(step, steps, warmup=20, rounds=5)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="triton", choices=["triton", "torch"])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pysnell.set_backend(args.backend)
    print(f"host cost of one layer step, {IN_F}->{OUT_F}, {TOKENS} tokens, backend {args.backend}, CPU")
    print("| layer | pass | Triton launches | other kernels (aten) | host µs (launches stubbed) |")
    print("|---|---|---:|---|---:|")
    for name, fwd, fwd_bwd in _steps():
        for pass_, step in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            triton, aten = _count(step)
            others = ", ".join(f"{op} ×{n}" for op, n in sorted(aten.items())) or "–"
            kernels = ", ".join(f"{k} ×{n}" for k, n in sorted(triton.items())) or "–"
            print(f"| {name} | {pass_} | {sum(triton.values())} ({kernels}) | {sum(aten.values())}: {others} | "
                  f"{_host_us(step, args.steps):.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
