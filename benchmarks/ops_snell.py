"""One SNELL layer, forward + backward: pysnell's backends vs full fine-tuning, LoRA and the SNELL
reference semantics (spec/SNELL.md, baselines in ANCHORS.md).

Full (GPU): r = 8 and sparsity 0.9 at T=12608 tokens for 768→768, 768→3072, 3072→768 and at
T=4096 for 4096→4096, 4096→11008, 11008→4096, in bf16 and fp32 (TF32 off); r = 32 at the two
target shapes (T=12608 768→3072, T=4096 4096→11008) in bf16. Quick (CPU): two tiny fp32 layers,
a few calls each: it proves the harness, nothing about speed.

Providers (one group per case and dtype, baseline "full_ft"; every one is our own code):
- full_ft: nn.Linear with W and b trainable (the three GEMMs of full fine-tuning);
- lora: frozen W0, trainable A (r×in), B (out×r) in the activation dtype, y = xW0ᵀ + b + (xAᵀ)Bᵀ;
- snell_ref_ckpt: the public code's semantics: cdist merge (default compute mode), threshold
  torch.quantile(|ΔW|, s), S = ΔW·sg(|ΔW|)·[|ΔW| > t], a separate branch x·Sᵀ checkpointed (so
  backward redoes the merge and the quantile). torch.quantile refuses more than 2^24 entries:
  that case is an error row;
- snell_topk_eager / snell_topk_compiled: the same branch with the threshold from torch.topk
  (the two order statistics of the quantile rule, interpolated), eager and torch.compile'd (the
  compiled one only at the two target shapes in bf16: compiling takes tens of seconds);
- pysnell_<backend>: pysnell.functional.snell_linear (fused W0 + S, the sparsity a float64
  device buffer as in SNELLLinear) with each backend that has "snell.layer_forward" here;
- full_ft_graph, pysnell_<backend>_graph (GPU, bf16, r = 8): the same fwd+bwd captured once into a
  CUDA graph and timed as graph replays: the GPU's time alone, with no host cost (what
  torch.cuda.graph or torch.compile(mode="reduce-overhead") leaves). Their output and gradients
  are checked after a replay; peak memory is the eager row's (NaN here).
- pysnell_triton_fpfusion_graph (same cases): pysnell_triton_graph with FP contraction allowed in
  the kernels that regenerate ΔW (snell.STRICT_FP cleared): against pysnell_triton_graph, what
  rounding ΔW alike in forward and backward costs on the GPU.
- op snell_layer_train (the two target shapes, bf16, r = 8): the training branch form with
  Dropout(0.1) on the branch input and DropPath(0.1) on its output, as the reference trains:
  full_ft, lora_dropout (LoRA with Dropout(0.1) on its input, as peft's lora_dropout) and
  pysnell_<backend> (snell_linear(..., dropout=0.1, drop_path=0.1, training=True): the keep mask
  saved as bits, x ⊙ D rebuilt in backward). Its pysnell rows are checked against pysnell's torch
  backend in fp32 on the same draws (same seed).
Every provider's output and its trainable gradients are checked once against an fp32 oracle
(pysnell's torch backend, or plain formulas for full FT / LoRA) before it is timed (row field
"check"); a failed check is an error row, never timed. GPU rows of pysnell_triton also record how
many kernels (and memsets) one forward and one backward launch ("launches_fwd", "launches_bwd").
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pysnell import _backend
from pysnell.functional import snell_linear
from pysnell.ops.snell import function as snell_fn
from pysnell.ops.snell import reference as ref
from pysnell.ops.snell.reference import KernelParams, SnellSpec

from . import harness

OP = "snell_layer"
BASELINE = "full_ft"
SPARSITY = 0.9
PIECES = 2
SCALE = 0.1
QUANTILE_MAX_NUMEL = 2**24
# (tokens, in, out)
FULL_SHAPES = [
    (12608, 768, 768),
    (12608, 768, 3072),
    (12608, 3072, 768),
    (4096, 4096, 4096),
    (4096, 4096, 11008),
    (4096, 11008, 4096),
]
TARGETS = {(12608, 768, 3072), (4096, 4096, 11008)}
BRANCH_SHAPES = TARGETS | {(9, 19, 27)}  # the training branch form: the target shapes (and one quick shape)
GRAPH = "_graph"  # suffix of the providers timed as CUDA graph replays
# Suffix of a Triton provider run with FP contraction allowed in the kernels that regenerate ΔW
# (snell.STRICT_FP cleared): what consistent rounding between forward and backward costs.
FP_FUSION = "_fpfusion"
QUICK_SHAPES = [(16, 24, 20), (9, 19, 27)]
# Tolerances of the one-off checks (relative RMSE against the fp32 oracle): outputs, gradients.
# fp32 gradients: with 16M+ entries adjacent order statistics of |ΔW| are ~1e-7 apart, so entries
# within rounding of the threshold flip between any two implementations of the distances (an H200
# run measured dA 3.6e-4 for torch.topk semantics and 1.2e-3 for the Triton layer at 4096×4096).
TOLERANCE = {torch.float32: (1e-4, 5e-3), torch.bfloat16: (3e-2, 6e-2)}


class _Case:
    """Inputs shared by the providers of one (shape, dtype, r)."""

    def __init__(self, T, n, m, r, dtype, device):
        d = r // PIECES
        self.T, self.n, self.m, self.r, self.dtype, self.device = T, n, m, r, dtype, device
        self.x = torch.randn(T, n, device=device, dtype=dtype).requires_grad_()
        self.dy = torch.randn(T, m, device=device, dtype=dtype)
        self.w0 = (torch.randn(m, n, device=device) / math.sqrt(n)).to(dtype)
        self.b0 = (torch.randn(m, device=device) * 0.1).to(dtype)
        # SNELL factors: the reference init, scaled up so that S is not negligible next to W0.
        self.A = ((torch.rand(r, n, device=device) * 2 - 1) * 8 / math.sqrt(n * d)).requires_grad_()
        self.B = ((torch.rand(m, r, device=device) * 2 - 1) * 8 / math.sqrt(m * d)).requires_grad_()
        self.coeffs = ref.default_coeffs(PIECES, SCALE, device=device)
        self.sparsity = torch.tensor(SPARSITY, dtype=torch.float64, device=device)  # a layer's buffer
        self.numel = m * n


def _fp32_snell_oracle(case):
    """y, dx, dA, dB of the fused SNELL layer in fp32 (pysnell's torch backend, exact selection)."""
    x = case.x.detach().float()
    w0, b0 = case.w0.float(), case.b0.float()
    A, B = case.A.detach(), case.B.detach()
    one = torch.ones((), device=case.device)
    params = KernelParams(case.coeffs, one, one, one)
    spec = SnellSpec("piecewise", PIECES, "reference", 1)
    y, t = snell_fn._torch_layer_forward(x, w0, b0, A, B, params, spec, case.sparsity)
    needs = (True, False, False, True, True, False, False, False, False)
    dx, _, _, dA, dB, *_ = snell_fn._torch_layer_backward(
        case.dy.float(), x, w0, A, B, params, spec, case.sparsity, t, needs
    )
    return y, dx, dA, dB


def _snell_branch_factory(case, threshold_fn):
    """The reference's branch x·Sᵀ with S = ΔW·sg(|ΔW|)·[|ΔW| > t] (merge by cdist, default mode)."""
    coeffs, s = case.coeffs, SPARSITY
    d = case.r // PIECES

    def branch(x, A, B):
        delta = None
        for p in range(PIECES):
            dist = torch.cdist(B[:, p * d : (p + 1) * d].unsqueeze(0), A[p * d : (p + 1) * d].t().unsqueeze(0))[0]
            term = coeffs[p] * dist
            delta = term if delta is None else delta + term
        mag = delta.detach().abs()
        t = threshold_fn(mag, s)
        S = delta * mag * (mag > t)
        return F.linear(x, S.to(x.dtype))

    return branch


def _quantile_threshold(mag, s):
    return torch.quantile(mag.flatten(), s)


def _topk_threshold(mag, s):
    """torch.quantile's linear rule from torch.topk: the order statistics at floor / ceil(s(N-1))."""
    flat = mag.flatten()
    n = flat.numel()
    pos = s * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    top = torch.topk(flat, n - lo).values  # descending: top[-1] is v[lo], top[-2] is v[lo + 1]
    v_lo = top[-1]
    v_hi = top[-2] if hi > lo else v_lo
    return _lerp(v_lo, v_hi, pos - lo)


def _lerp(a, b, w: float):
    """reference.lerp's formula for a float weight."""
    return a + w * (b - a) if w < 0.5 else b - (b - a) * (1.0 - w)


def _reference_provider(case, threshold_fn, compiled=False):
    branch = _snell_branch_factory(case, threshold_fn)
    if compiled:
        branch = torch.compile(branch)

    def forward():
        base = F.linear(case.x, case.w0, case.b0)
        return base + checkpoint(branch, case.x, case.A, case.B, use_reentrant=False)

    return forward, [case.x, case.A, case.B]


def _pysnell_provider(case, dropout=0.0):
    """Forward only; the caller forces the backend around forward and backward. dropout > 0: the
    training branch form with Dropout and DropPath at that rate (new draws every call)."""

    def forward():
        return snell_linear(
            case.x, case.w0, case.b0, case.A, case.B, sparsity=case.sparsity, kernel="piecewise",
            pieces=PIECES, scale=SCALE, mode="reference", dropout=dropout, drop_path=dropout, training=dropout > 0,
        )  # fmt: skip

    return forward, [case.x, case.A, case.B]


def _full_ft_provider(case):
    W = case.w0.detach().clone().requires_grad_()
    b = case.b0.detach().clone().requires_grad_()

    def forward():
        return F.linear(case.x, W, b)

    return forward, [case.x, W, b]


def _lora_provider(case, dropout=0.0):
    """LoRA; dropout > 0 drops its input as peft's lora_dropout does."""
    A = (case.A.detach() / 8).to(case.dtype).requires_grad_()
    B = (case.B.detach() / 8).to(case.dtype).requires_grad_()

    def forward():
        x = F.dropout(case.x, dropout) if dropout else case.x
        return F.linear(case.x, case.w0, case.b0) + F.linear(F.linear(x, A), B)

    return forward, [case.x, A, B]


def _check(name, case, forward, leaves, oracle, backend) -> str:
    """One forward + backward against the fp32 oracle: "ok: ..." or the reason it failed."""
    for t in leaves:
        t.grad = None
    with harness.forced_backend(backend):
        y = forward()
        y.backward(case.dy)
        if backend is not None:
            ran = (_backend.last_backend("snell.layer_forward"), _backend.last_backend("snell.layer_backward"))
            if ran != (backend, backend):
                return f"backend {backend} requested, {ran} ran"
    verdict = _judge(name, case, y, leaves, oracle)
    for t in leaves:
        t.grad = None
    return verdict


def _judge(name, case, y, leaves, oracle) -> str:
    """y and the leaves' gradients against the fp32 oracle: "ok: ..." or the reason they fail."""
    if name == "full_ft":
        W, b = leaves[1], leaves[2]
        want = [F.linear(case.x.detach().float(), W.detach().float(), b.detach().float()),
                case.dy.float() @ W.detach().float(), case.dy.float().t() @ case.x.detach().float()]  # fmt: skip
        got = [y, case.x.grad, W.grad]
    elif name == "lora":
        A, B = leaves[1].detach().float(), leaves[2].detach().float()
        x, dy = case.x.detach().float(), case.dy.float()
        want = [F.linear(x, case.w0.float(), case.b0.float()) + x @ A.t() @ B.t(),
                (dy @ B) @ A + dy @ case.w0.float(), B.t() @ dy.t() @ x]  # fmt: skip
        got = [y, case.x.grad, leaves[1].grad]
    else:
        y_o, dx_o, dA_o, dB_o = oracle
        want = [y_o, dx_o, dA_o, dB_o]
        got = [y, case.x.grad, case.A.grad, case.B.grad]
    if name == "pysnell_torch" and case.dtype == torch.float32:
        return "ok: is the oracle (pysnell's torch backend in fp32), not checked against itself"
    return _verdict(case, got, want)


def _verdict(case, got, want) -> str:
    """Output, then gradients (dx, dA, dB), against the oracle's within the dtype's tolerances."""
    tol_y, tol_g = TOLERANCE.get(case.dtype, TOLERANCE[torch.bfloat16])
    labels = ("y", "dx", "dA", "dB")
    errs = [harness.rel_rmse(g, w) for g, w in zip(got, want)]
    for i, err in enumerate(errs):
        if not math.isfinite(err) or err > (tol_y if i == 0 else tol_g):
            return f"{labels[i]} rel-RMSE {err:.2e} > {tol_y if i == 0 else tol_g:.0e}"
    return "ok: rel-RMSE " + ", ".join(f"{labels[i]} {e:.1e}" for i, e in enumerate(errs))


def _count_launches(fn, device) -> tuple[int, int]:
    """(kernels, memsets) one call of fn launches on the GPU, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = memsets = 0
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.name.lower()
        if "memset" in name:
            memsets += 1
        elif "memcpy" not in name:
            kernels += 1
    return kernels, memsets


def _providers(case, full, cuda, compiled_only):
    target = (case.T, case.n, case.m) in TARGETS
    if compiled_only:
        if full and cuda and target and case.dtype == torch.bfloat16 and case.r == 8:
            return [("snell_topk_compiled", lambda: _reference_provider(case, _topk_threshold, compiled=True))]
        return []
    out = [("full_ft", lambda: _full_ft_provider(case)), ("lora", lambda: _lora_provider(case))]
    if case.numel > QUANTILE_MAX_NUMEL:
        out.append(("snell_ref_ckpt", None))
    else:
        out.append(("snell_ref_ckpt", lambda: _reference_provider(case, _quantile_threshold)))
    out.append(("snell_topk_eager", lambda: _reference_provider(case, _topk_threshold)))
    for backend in ("torch", "triton", "cuda"):
        if _backend.available("snell.layer_forward", backend, torch.device(case.device)):
            out.append((f"pysnell_{backend}", lambda: _pysnell_provider(case)))
    if full and cuda and case.dtype == torch.bfloat16 and case.r == 8:
        # the same steps replayed from a CUDA graph: GPU time alone, no host cost
        out.append(("full_ft" + GRAPH, lambda: _full_ft_provider(case)))
        for backend in ("triton", "cuda"):
            if _backend.available("snell.layer_forward", backend, torch.device(case.device)):
                out.append((f"pysnell_{backend}{GRAPH}", lambda: _pysnell_provider(case)))
        if _backend.available("snell.layer_forward", "triton", torch.device(case.device)):
            out.append((f"pysnell_triton{FP_FUSION}{GRAPH}", lambda: _pysnell_provider(case)))
    return out


@contextlib.contextmanager
def _fp_fusion(on: bool):
    """When on, the Triton kernels that regenerate ΔW may contract FP ops again (snell.STRICT_FP
    cleared for the block): forward and backward may then round ΔW differently near the threshold."""
    if not on:
        yield
        return
    from pysnell.triton_kernels import snell as triton_snell

    saved = dict(triton_snell.STRICT_FP)
    triton_snell.STRICT_FP.clear()
    try:
        yield
    finally:
        triton_snell.STRICT_FP.update(saved)


def _step_of(case, forward, backend):
    """One timed fwd+bwd of a provider, under its backend."""

    def step():
        with harness.forced_backend(backend):
            y = forward()
            y.backward(case.dy)
            return y

    return step


def _error_row(reason, name, ident, extra) -> dict:
    row = harness.error_row(reason, provider=name, **ident)
    row.update(extra)
    return row


def _provider_failed(exc, name, label, dtype, ident, extra, notes) -> dict:
    """The row of a provider that raised (the runner's time limit is re-raised: it ends the module)."""
    if type(exc).__name__ == "ModuleTimeout":
        raise exc
    if not isinstance(exc, torch.OutOfMemoryError):
        notes.append(f"snell: {name} {label} {dtype}: {type(exc).__name__}: {exc}"[:300])
    return _error_row(exc, name, ident, extra)


def _bench_case(T, n, m, r, dtype, device, full, notes, compiled_only=False):
    cuda = torch.device(device).type == "cuda"
    case = _Case(T, n, m, r, dtype, device)
    oracle = _fp32_snell_oracle(case)
    label = f"T{T}-{n}x{m}-r{r}"
    ident = {"op": OP, "case": label, "baseline": BASELINE, "dtype": dtype, "device": device, "pass_": "fwd+bwd"}
    extra = {"size": m * n, "tokens": T, "in_features": n, "out_features": m, "r": r, "sparsity": SPARSITY}
    reps, warmup = (10, 3) if full else (2, 1)
    rows = []
    for name, make in _providers(case, full, cuda, compiled_only):
        if make is None:
            rows.append(_error_row(f"torch.quantile refuses {case.numel} > 2^24 entries", name, ident, extra))
            continue
        graphed = name.endswith(GRAPH)
        eager_name = name.removesuffix(GRAPH)
        fp_fusion = eager_name.endswith(FP_FUSION)
        eager_name = eager_name.removesuffix(FP_FUSION)
        backend = eager_name[len("pysnell_") :] if eager_name.startswith("pysnell_") else None
        try:
            with _fp_fusion(fp_fusion):
                forward, leaves = make()
                check = _check(eager_name, case, forward, leaves, oracle, backend)
                if not check.startswith("ok"):
                    rows.append(_error_row(f"check failed: {check}", name, ident, extra))
                    continue
                step = _step_of(case, forward, backend)
                if graphed:
                    graph, y = harness.cuda_graph(step, leaves)
                    graph.replay()
                    check = _judge(eager_name, case, y, leaves, oracle)  # what the replay computed
                    if not check.startswith("ok"):
                        rows.append(_error_row(f"replay check failed: {check}", name, ident, extra))
                        continue
                    row = harness.measure(
                        graph.replay, provider=name, warmup=warmup, reps=reps, check=check, **ident, **extra
                    )
                    row["peak_mib"] = float("nan")  # allocated once, at capture: the eager row's peak applies
                    del graph, y
                else:
                    row = harness.measure(
                        step,
                        provider=name,
                        warmup=warmup,
                        reps=reps,
                        grad_to_none=leaves,
                        check=check,
                        **ident,
                        **extra,
                    )
                if cuda and name == "pysnell_triton":
                    with harness.forced_backend(backend):
                        fwd_k, fwd_m = _count_launches(forward, device)
                        y = forward()
                        bwd_k, bwd_m = _count_launches(functools.partial(y.backward, case.dy), device)
                        # y's autograd graph holds the leaves' AccumulateGrad nodes, made on this (default)
                        # stream: alive, they break a later capture of the same leaves on a side stream.
                        del y
                    row.update(launches_fwd=fwd_k, memsets_fwd=fwd_m, launches_bwd=bwd_k, memsets_bwd=bwd_m)
                rows.append(row)
        except Exception as exc:  # noqa: BLE001 - one provider's failure is a row, the rest still run
            rows.append(_provider_failed(exc, name, label, dtype, ident, extra, notes))
        finally:
            for t in (case.x, case.A, case.B):
                t.grad = None
            if cuda:
                torch.cuda.empty_cache()
    return rows


TRAIN_OP = "snell_layer_train"
DROPOUT = 0.1  # on the branch input, and DropPath at the same rate on its output
DRAW_SEED = 0  # the branch check's draws


def _branch_check(case, forward, backend) -> str:
    """The pysnell branch form against pysnell's torch backend in fp32 on the same draws (same seed)."""
    x32 = case.x.detach().float().requires_grad_()
    A32, B32 = case.A.detach().clone().requires_grad_(), case.B.detach().clone().requires_grad_()
    with harness.forced_backend("torch"):
        torch.manual_seed(DRAW_SEED)
        want = snell_linear(
            x32, case.w0.float(), case.b0.float(), A32, B32, sparsity=case.sparsity, kernel="piecewise",
            pieces=PIECES, scale=SCALE, mode="reference", dropout=DROPOUT, drop_path=DROPOUT, training=True,
        )  # fmt: skip
        want_grads = torch.autograd.grad(want, [x32, A32, B32], case.dy.float())
    with harness.forced_backend(backend):
        torch.manual_seed(DRAW_SEED)
        y = forward()
        got_grads = torch.autograd.grad(y, [case.x, case.A, case.B], case.dy)
        ops = ("snell.layer_forward", "snell.layer_backward", "snell.dropout_apply")
        ran = tuple(_backend.last_backend(op) for op in ops)
        if ran != (backend,) * len(ops):
            return f"backend {backend} requested, {dict(zip(ops, ran))} ran"
    return _verdict(case, (y, *got_grads), (want, *want_grads))


def _bench_branch_case(T, n, m, dtype, device, full, notes):
    """Training with dropout and drop-path (op snell_layer_train): time and peak memory of one fwd+bwd."""
    case = _Case(T, n, m, 8, dtype, device)
    label = f"T{T}-{n}x{m}-r8-drop{DROPOUT}-path{DROPOUT}"
    ident = {"op": TRAIN_OP, "case": label, "baseline": BASELINE, "dtype": dtype, "device": device, "pass_": "fwd+bwd"}
    extra = {"size": m * n, "tokens": T, "in_features": n, "out_features": m, "r": 8, "sparsity": SPARSITY}
    reps, warmup = (10, 3) if full else (2, 1)
    providers = [("full_ft", lambda: _full_ft_provider(case)), ("lora_dropout", lambda: _lora_provider(case, DROPOUT))]
    for backend in ("torch", "triton", "cuda"):
        if _backend.available("snell.layer_forward", backend, torch.device(device)):
            providers.append((f"pysnell_{backend}", lambda: _pysnell_provider(case, DROPOUT)))
    rows = []
    for name, make in providers:
        backend = name[len("pysnell_") :] if name.startswith("pysnell_") else None
        try:
            forward, leaves = make()
            if backend is not None:
                check = _branch_check(case, forward, backend)
            else:  # full FT's formulas are checked in the snell_layer group; LoRA's draws are its own
                check = "ok: not checked here" if name == "full_ft" else "ok: random draws, not checked"
            if not check.startswith("ok"):
                rows.append(_error_row(f"check failed: {check}", name, ident, extra))
                continue
            step = _step_of(case, forward, backend)
            rows.append(
                harness.measure(
                    step, provider=name, warmup=warmup, reps=reps, grad_to_none=leaves, check=check, **ident, **extra
                )
            )
        except Exception as exc:  # noqa: BLE001 - one provider's failure is a row, the rest still run
            rows.append(_provider_failed(exc, name, label, dtype, ident, extra, notes))
        finally:
            for t in (case.x, case.A, case.B):
                t.grad = None
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _plan(full, cuda):
    """(T, in, out, r, dtype, compiled only), most important first: a run cut short keeps the
    targets; the torch.compile'd provider (tens of seconds to compile) comes last."""
    if not full:
        return [(T, n, m, 8, torch.float32, False) for T, n, m in QUICK_SHAPES]
    plan = [(T, n, m, 8, torch.bfloat16, False) for T, n, m in FULL_SHAPES if (T, n, m) in TARGETS]
    plan += [(T, n, m, 8, torch.bfloat16, False) for T, n, m in FULL_SHAPES if (T, n, m) not in TARGETS]
    plan += [(T, n, m, 32, torch.bfloat16, False) for T, n, m in FULL_SHAPES if (T, n, m) in TARGETS]
    plan += [(T, n, m, 8, torch.float32, False) for T, n, m in FULL_SHAPES]
    plan += [(T, n, m, 8, torch.bfloat16, True) for T, n, m in FULL_SHAPES if (T, n, m) in TARGETS]
    return plan


def run(full: bool, device: str, notes: list | None = None) -> list[dict]:
    notes = notes if notes is not None else []
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows mean fp32
        torch.backends.cudnn.allow_tf32 = False
    rows = []
    try:
        for T, n, m, r, dtype, compiled_only in _plan(full, cuda):
            if r == 8 and not compiled_only and (dtype == torch.bfloat16 or not full) and (T, n, m) in BRANCH_SHAPES:
                rows.extend(_bench_branch_case(T, n, m, dtype, device, full, notes))
            rows.extend(_bench_case(T, n, m, r, dtype, device, full, notes, compiled_only))
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    except Exception as exc:  # keep what finished when the runner's time limit strikes
        if type(exc).__name__ != "ModuleTimeout":
            raise
        notes.append(f"snell: stopped early ({exc}); {len(rows)} rows kept")
    return rows
