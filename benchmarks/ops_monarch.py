"""Monarch multiply: dense nn.Linear vs the public two-bmm reference vs pysnell's backends.

Full (GPU, bf16, every provider under bf16 autocast as in mixed-precision training): T = 8192
tokens for n=1024 nblocks=4, n=4096 nblocks=4, n=4096 nblocks=16, 768→3072 and 3072→768 with
nblocks=4, plus T = 1, 16, 512 at n=4096 nblocks=4; forward, and forward + backward.
Quick (CPU, fp32): tiny sizes, seconds.

Providers (one group per case and pass, baseline "dense"):
- dense: nn.Linear(in, out), same in/out;
- fly_ref: our implementation of the public reference (spec/MONARCH.md §4): input padded by
  F.pad, 2 torch.bmm + permutation copies, the permuted intermediate saved for backward,
  inputs cast to fp16 under autocast as the public code's custom_fwd does;
- pysnell-<backend>: MonarchLinear with each backend that has a Monarch kernel here (torch,
  triton, cuda); for Triton in full mode also the other kernel plans ("-split": intermediate
  through memory, "-fused": on chip) and the other forward store ("-scatter": y stored at its
  interleaved columns instead of block order + an in-place interleave pass) wherever they
  differ from the automatic one.
- dense_graph, pysnell-<backend>_graph (full, GPU, T = 8192 only): dense and the automatic
  triton / cuda kernels, each pass captured once into a CUDA graph and timed as replays: the GPU's
  time alone, with no host cost (the eager rows at these sizes are partly host-bound). Their ratios
  are against eager dense, the group's baseline: divide by dense_graph's for graph against graph.
Each provider's output (and dx for fwd+bwd) is checked once against the dense oracle
x·Mᵀ + b (M from the factors, fp32) before timing; a provider that fails is an error row. A graphed
provider's replay is checked the same way.
"""

from __future__ import annotations

import contextlib
import gc

import torch
import torch.nn.functional as F
from torch import nn

import pysnell
from pysnell import _backend
from pysnell.ops.monarch.reference import dense_matrix

from .harness import cuda_graph, error_row, forced_backend, measure, rel_rmse

OP = "monarch"
BASELINE = "dense"
GRAPH = "_graph"  # suffix of the providers timed as CUDA graph replays
GRAPH_MIN_TOKENS = 8192  # graph rows only where the kernels, not the host, should decide
# (tokens, in_features, out_features, nblocks)
FULL_CASES = [
    (8192, 1024, 1024, 4),
    (8192, 4096, 4096, 4),
    (8192, 4096, 4096, 16),
    (8192, 768, 3072, 4),
    (8192, 3072, 768, 4),
    (1, 4096, 4096, 4),
    (16, 4096, 4096, 4),
    (512, 4096, 4096, 4),
]
# Quick runs the Triton kernels under the interpreter (≈ 1 s per call): two small cases only.
QUICK_CASES = [(32, 64, 64, 4), (32, 96, 40, 2)]
# Relative RMSE against the fp32 dense oracle: bf16/fp16 rounding of inputs, intermediate, output.
CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


class _FlyMultiply(torch.autograd.Function):
    """Two bmm with permutation copies between them, saving the permuted intermediate (fly layout)."""

    @staticmethod
    def forward(ctx, x, w1, w2):
        k, q, p = w1.shape
        l, s, r = w2.shape
        tokens = x.shape[0]
        out1 = torch.bmm(x.reshape(tokens, k, p).transpose(0, 1), w1.transpose(1, 2))  # (k, T, q)
        # permutation copy: block li's inputs, columns in w2's order
        mid = out1.transpose(0, 1).reshape(tokens, r, l).permute(2, 0, 1).contiguous()  # (l, T, r)
        out2 = torch.bmm(mid, w2.transpose(1, 2))  # (l, T, s)
        ctx.save_for_backward(x, w1, w2, mid)
        return out2.permute(1, 2, 0).reshape(tokens, s * l)  # second permutation copy

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, mid = ctx.saved_tensors
        k, q, p = w1.shape
        l, s, r = w2.shape
        tokens = x.shape[0]
        dout2 = dy.reshape(tokens, s, l).permute(2, 0, 1).contiguous()  # (l, T, s)
        dw2 = torch.bmm(dout2.transpose(1, 2), mid) if ctx.needs_input_grad[2] else None
        dx = dw1 = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dmid = torch.bmm(dout2, w2)  # (l, T, r)
            dout1 = dmid.permute(1, 2, 0).reshape(tokens, k, q).transpose(0, 1).contiguous()  # (k, T, q)
            if ctx.needs_input_grad[0]:
                dx = torch.bmm(dout1, w1).transpose(0, 1).reshape(tokens, k * p)
            if ctx.needs_input_grad[1]:
                dw1 = torch.bmm(dout1.transpose(1, 2), x.reshape(tokens, k, p).transpose(0, 1))
        return dx, dw1, dw2


class FlyMonarchLinear(nn.Module):
    """The public reference layer: pad x, multiply in fp16 under autocast, slice, add the bias."""

    def __init__(self, layer: pysnell.MonarchLinear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.blkdiag1 = nn.Parameter(layer.blkdiag1.detach().clone())
        self.blkdiag2 = nn.Parameter(layer.blkdiag2.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone()) if layer.bias is not None else None

    def forward(self, x):
        k, _, p = self.blkdiag1.shape
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[-1] < k * p:
            x2 = F.pad(x2, (0, k * p - x2.shape[-1]))
        w1, w2 = self.blkdiag1, self.blkdiag2
        if torch.is_autocast_enabled(x.device.type):  # the public code's custom_fwd(cast_inputs=float16)
            x2, w1, w2 = x2.half(), w1.half(), w2.half()
        with torch.autocast(x.device.type, enabled=False):
            y = _FlyMultiply.apply(x2, w1, w2)[:, : self.out_features]
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


@contextlib.contextmanager
def _pysnell_backend(name: str, variant: tuple[str, str] | None):
    """The backend forced to `name` and, for Triton, the kernel (plan, store) to `variant` (None: automatic)."""
    with forced_backend(name):
        if variant is None:
            yield
            return
        from pysnell.triton_kernels import monarch as triton_monarch

        path, store = variant
        with triton_monarch.use_path(path), triton_monarch.use_store(store):
            yield


def _triton_variants(layer, tokens) -> dict[str, tuple[str, str]]:
    """Provider suffix -> Triton (plan, store), for each variant that differs from the automatic
    one on this shape: the other plans ("-split", "-fused") and the other forward store
    ("-scatter": y stored at its interleaved columns, see triton_kernels/monarch.py STORES)."""
    from pysnell.triton_kernels import monarch as triton_monarch

    w1, w2 = tuple(layer.blkdiag1.shape), tuple(layer.blkdiag2.shape)
    plans = {}
    for name in ("auto", "split", "fused"):
        with triton_monarch.use_path(name):
            plans[name] = triton_monarch.plan(w1, w2)
    out = {"": ("auto", "auto")}
    for name in ("split", "fused"):
        if plans[name] != plans["auto"]:
            out[f"-{name}"] = (name, "auto")
    if _store(tokens, layer) != "scatter":
        out["-scatter"] = ("auto", "scatter")
    return out


def _store(tokens, layer) -> str:
    from pysnell.triton_kernels import monarch as triton_monarch

    l, s, _ = layer.blkdiag2.shape
    return triton_monarch._store_plan(tokens, l, s, layer.out_features)


def _providers(dense, mon, fly, device, full, tokens):
    """(name, module, backend context) for every provider that can run here."""
    provs = [("dense", dense, contextlib.nullcontext), ("fly_ref", fly, contextlib.nullcontext)]
    dev = torch.device(device)
    for backend in ("torch", "triton", "cuda"):
        ok = all(_backend.available(op, backend, dev) for op in ("monarch.forward", "monarch.backward"))
        if not ok:
            continue
        variants = _triton_variants(mon, tokens) if backend == "triton" and full else {"": None}
        for suffix, variant in variants.items():
            provs.append((f"pysnell-{backend}{suffix}", mon, lambda b=backend, v=variant: _pysnell_backend(b, v)))
    return provs


def _bench_case(case, device, full, dtype, autocast):
    T, n_in, n_out, nblocks = case
    label = f"T{T} {n_in}x{n_out} nb{nblocks}"
    torch.manual_seed(0)
    dense = nn.Linear(n_in, n_out, device=device, dtype=dtype)
    mon = pysnell.MonarchLinear(n_in, n_out, nblocks, device=device, dtype=dtype)
    fly = FlyMonarchLinear(mon)
    x = torch.randn(T, n_in, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(T, n_out, device=device, dtype=dtype)
    with torch.no_grad():  # the dense oracle of the Monarch layers (fp32)
        M = dense_matrix(mon.blkdiag1.float(), mon.blkdiag2.float())[:n_out, :n_in]
        y_oracle = x.float() @ M.t() + mon.bias.float()
        dx_oracle = dy.float() @ M
    amp = torch.autocast(torch.device(device).type, dtype=dtype) if autocast else contextlib.nullcontext()
    timing = dict(warmup=5, reps=20) if full else dict(warmup=1, reps=2)
    extra = dict(tokens=T, in_features=n_in, out_features=n_out, nblocks=nblocks)
    rows = []
    for name, module, backend_ctx in _providers(dense, mon, fly, device, full, T):
        params = list(module.parameters())

        def fwd(module=module):
            with amp:
                return module(x)

        def fwd_bwd(module=module):
            with amp:
                y = module(x)
            y.backward(dy)

        for pass_, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            ident = dict(op=OP, case=label, provider=name, baseline=BASELINE, dtype=dtype, device=device, pass_=pass_)
            try:
                with backend_ctx():
                    check = _check(name, module, x, dy, y_oracle, dx_oracle, amp, dtype, pass_)
                    row = measure(fn, **ident, **timing, grad_to_none=[x, *params], check=check, **extra)
                    if name.startswith("pysnell-triton"):
                        from pysnell.triton_kernels import monarch as triton_monarch

                        plan = triton_monarch.plan(tuple(mon.blkdiag1.shape), tuple(mon.blkdiag2.shape))
                        plan["store"] = _store(T, mon)
                        row["plan"] = " ".join(f"{k}={v}" for k, v in plan.items())
                    if name.startswith("pysnell-"):
                        ran = pysnell.last_backend("monarch.forward")
                        want = name.split("-")[1]
                        if ran != want:
                            raise AssertionError(f"asked for the {want} backend, {ran} ran")
            except Exception as exc:  # noqa: BLE001 - one provider failing must not stop the others
                row = error_row(exc, **ident)
                row.update(extra)
            rows.append(row)
            _clear_grads(x, params)
    if full and torch.device(device).type == "cuda" and T >= GRAPH_MIN_TOKENS:
        for name, module, backend_ctx in _providers(dense, mon, fly, device, False, T):
            if name in ("dense", "pysnell-triton", "pysnell-cuda"):
                rows += _graph_rows(name, module, backend_ctx, x, dy, y_oracle, dx_oracle, dtype, timing, extra, label)
            gc.collect()
            torch.cuda.empty_cache()
    return rows


def _graph_rows(name, module, backend_ctx, x, dy, y_oracle, dx_oracle, dtype, timing, extra, label):
    """fwd and fwd+bwd of one provider captured into CUDA graphs and timed as replays (autocast
    without its cast cache, as graph capture needs; the modules are already in `dtype`)."""
    rows = []
    params = list(module.parameters())
    tol = CHECK_TOL[dtype]
    for pass_ in ("fwd", "fwd+bwd"):
        ident = dict(op=OP, case=label, provider=name + GRAPH, baseline=BASELINE, dtype=dtype, device=x.device.type,
                     pass_=pass_)  # fmt: skip
        leaves = [x, *params] if pass_ == "fwd+bwd" else []

        def step(module=module, pass_=pass_):
            with torch.autocast("cuda", dtype=dtype, cache_enabled=False):
                if pass_ == "fwd":
                    with torch.no_grad():
                        return module(x)
                y = module(x)
            y.backward(dy)
            return y

        try:
            with backend_ctx():
                graph, y = cuda_graph(step, leaves)
                graph.replay()
                torch.cuda.synchronize()
                errs = {"y": rel_rmse(y, y_oracle)}
                if pass_ == "fwd+bwd":
                    errs["dx"] = rel_rmse(x.grad, dx_oracle)
                msg = ", ".join(f"{k} rel. RMSE {v:.1e}" for k, v in errs.items())
                if not all(v <= tol for v in errs.values()):
                    raise AssertionError(f"{name} replay: {msg} > {tol}")
                row = measure(graph.replay, **ident, **timing, check="ok: replay " + msg, **extra)
                row["peak_mib"] = float("nan")  # allocated once, at capture: the eager row's peak applies
                del graph, y
        except Exception as exc:  # noqa: BLE001 - one provider failing must not stop the others
            row = error_row(exc, **ident)
            row.update(extra)
        rows.append(row)
        _clear_grads(x, params)
    return rows


def _clear_grads(x, params):
    x.grad = None
    for p in params:
        p.grad = None


def _check(name, module, x, dy, y_oracle, dx_oracle, amp, dtype, pass_) -> str:
    """Output (and dx for fwd+bwd) against the dense oracle; raises when off."""
    x.grad = None
    with amp:
        y = module(x)
    if not torch.isfinite(y).all():
        raise AssertionError(f"{name}: non-finite output")
    if name == "dense":
        return "ok: baseline"
    tol = CHECK_TOL[dtype]
    err_y = rel_rmse(y, y_oracle)
    msg = f"y rel. RMSE {err_y:.1e}"
    if err_y > tol:
        raise AssertionError(f"{name}: {msg} > {tol}")
    if pass_ == "fwd+bwd":
        y.backward(dy)
        err_dx = rel_rmse(x.grad, dx_oracle)
        msg += f", dx {err_dx:.1e}"
        if err_dx > tol:
            raise AssertionError(f"{name}: {msg} > {tol}")
        x.grad = None
        for p in module.parameters():
            p.grad = None
    return "ok: " + msg


def run(full: bool, device: str) -> list[dict]:
    cuda = torch.device(device).type == "cuda"
    if full and cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (only matters for fp32 rows)
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for case in FULL_CASES if full else QUICK_CASES:
        rows.extend(_bench_case(case, device, full, dtype, autocast=cuda))
        gc.collect()  # the case's layers and activations go before the next case is built
        if cuda:
            torch.cuda.empty_cache()
    return rows
