"""Which backend should "auto" run first, per op? Times every backend op on cuda, triton and torch.

    python -m benchmarks.cuda_backend [--out DIR] [--quick]

On one GPU, at the shapes of ANCHORS.md, each backend op (the functions registered with
pysnell._backend, called directly: no autograd, no Python layer on top) is checked once against the
torch backend and then timed (CUDA events, median of 10 after 3 warm-ups). For each op, the winner is the
backend with the lowest geometric-mean time over the cases, among the backends whose results matched.
The script prints a table and the AUTO_PREFERENCE entries to paste into pysnell/_cuda_ops.py (only ops
whose winner is not CUDA need one: the default order is cuda -> triton -> torch), writes
cuda_backend.json into --out, and reports the CUDA extension's JIT build time. About a minute on an H100.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import pysnell
from pysnell import _backend, _jit
from pysnell.ops.snell.reference import KernelParams, SnellSpec

from .harness import rel_rmse, time_fn

BACKENDS = ("cuda", "triton", "torch")
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def _outputs(result):
    items = result if isinstance(result, tuple) else (result,)
    return [t for t in items if isinstance(t, torch.Tensor)]


def _matches(got, want, dtype) -> str | None:
    got, want = _outputs(got), _outputs(want)
    if len(got) != len(want):
        return f"{len(got)} outputs, torch gives {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape:
            return f"output {i}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if b.dtype == torch.uint8 or b.dtype == torch.bool:
            if not torch.equal(a, b):
                return f"output {i}: masks differ"
        elif b.numel() and rel_rmse(a, b) > TOL.get(dtype, 1e-4):
            return f"output {i}: relative RMSE {rel_rmse(a, b):.2e}"
    return None


def _snell_case(tokens, n, m, r, dtype):
    dev = "cuda"
    A = (torch.rand(r, n, device=dev) * 2 - 1) / math.sqrt(n * r / 2)
    B = (torch.rand(m, r, device=dev) * 2 - 1) / math.sqrt(m * r / 2)
    params = KernelParams(
        torch.tensor([0.1, -0.1], device=dev),
        torch.tensor(1.0, device=dev),
        torch.tensor(0.0, device=dev),
        torch.tensor(1.0, device=dev),
    )
    spec = SnellSpec("piecewise", 2, "reference", 1)
    x2 = torch.randn(tokens, n, device=dev, dtype=dtype)
    weight = torch.randn(m, n, device=dev, dtype=dtype) / math.sqrt(n)
    bias = torch.randn(m, device=dev, dtype=dtype)
    dy2 = torch.randn(tokens, m, device=dev, dtype=dtype)
    return A, B, params, spec, x2, weight, bias, dy2


def cases(quick: bool):
    """(op, case name, dtype, make_call) where make_call(impl) -> a zero-argument timed callable."""
    out = []
    topk_shapes = [(768, 768), (3072, 768)] if quick else [(768, 768), (3072, 768), (4096, 4096), (11008, 4096)]
    for shape in topk_shapes:
        src = torch.randn(shape, device="cuda")
        work = src.clone()

        def mask(impl, src=src, work=work):
            return lambda: impl(work.copy_(src), 0.9, None, False)

        def threshold(impl, src=src):
            return lambda: impl(src.view(1, -1), 0.9)

        out.append(("topk.mask_", f"{shape[0]}x{shape[1]} keep10% (+copy)", torch.float32, mask))
        out.append(("topk.threshold", f"{shape[0]}x{shape[1]}", torch.float32, threshold))
    snell_shapes = [(12608, 768, 3072)] if quick else [(12608, 768, 768), (12608, 768, 3072), (4096, 4096, 11008)]
    for tokens, n, m in snell_shapes:
        A, B, params, spec, x2, weight, bias, dy2 = _snell_case(tokens, n, m, 8, torch.bfloat16)
        # thresholds from the reference forward: every backend's backward gets the same ones
        t = _backend._registry["snell.layer_forward"]["torch"](x2, weight, bias, A, B, params, spec, 0.9)[1]
        needs = (True, False, False, True, True, False, False, False, False)

        def fwd(impl, a=(x2, weight, bias, A, B, params, spec)):
            return lambda: impl(*a, 0.9)

        def bwd(impl, a=(dy2, x2, weight, A, B, params, spec), t=t, needs=needs):
            return lambda: impl(*a, 0.9, t, needs)

        name = f"T={tokens} {n}->{m} r=8 bf16"
        out.append(("snell.layer_forward", name, torch.bfloat16, fwd))
        out.append(("snell.layer_backward", name, torch.bfloat16, bwd))
        out.append(
            ("snell.merge", f"{m}x{n} r=8 fp32", torch.float32, lambda impl, a=(A, B, params, spec): lambda: impl(*a))
        )
    for tokens, n in [(12608, 768)] if quick else [(12608, 768), (12608, 3072)]:
        keep = torch.rand(tokens, n, device="cuda") < 0.9
        v = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
        bits = _backend._registry["snell.dropout_pack"]["torch"](keep)
        row_scale = torch.rand(tokens, device="cuda") + 1
        name = f"T={tokens} n={n}"
        out.append(("snell.dropout_pack", name, torch.bool, lambda impl, k=keep: lambda: impl(k)))
        out.append(
            (
                "snell.dropout_apply",
                name + " bf16",
                torch.bfloat16,
                lambda impl, a=(v, bits, row_scale): lambda: impl(*a),
            )
        )
    monarch_shapes = [(8192, 1024, 4)] if quick else [(8192, 1024, 4), (8192, 4096, 4), (8192, 4096, 16)]
    for tokens, n, b in monarch_shapes:
        blk = n // b
        x2 = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
        w1 = torch.randn(b, blk, blk, device="cuda", dtype=torch.bfloat16) / math.sqrt(blk)
        w2 = torch.randn(b, blk, blk, device="cuda", dtype=torch.bfloat16) / math.sqrt(blk)
        dy2 = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
        name = f"T={tokens} n={n} nblocks={b} bf16"
        out.append(("monarch.forward", name, torch.bfloat16, lambda impl, a=(x2, w1, w2, None, n): lambda: impl(*a)))
        out.append(
            (
                "monarch.backward",
                name,
                torch.bfloat16,
                lambda impl, a=(dy2, x2, w1, w2, (True, True, True)): lambda: impl(*a),
            )
        )
    return out


def run(quick: bool) -> dict:
    start = time.perf_counter()
    cuda_error = _backend.load_error("cuda")  # JIT-builds on first use
    load_seconds = time.perf_counter() - start
    triton_error = _backend.load_error("triton")
    rows = []
    for op, case, dtype, make_call in cases(quick):
        impls = _backend._registry.get(op, {})
        # cloned: the in-place ops reuse one work buffer, which the next backend overwrites
        reference = tuple(t.clone() for t in _outputs(make_call(impls["torch"])()))
        torch.cuda.synchronize()
        for backend in BACKENDS:
            row = {"op": op, "case": case, "backend": backend}
            if backend not in impls or (backend == "cuda" and cuda_error) or (backend == "triton" and triton_error):
                row["error"] = "not available"
                rows.append(row)
                continue
            try:
                call = make_call(impls[backend])
                row["mismatch"] = _matches(call(), reference, dtype)
                row.update(time_fn(call, device="cuda", warmup=3, reps=10))
            except Exception as exc:  # noqa: BLE001 - a failing backend is a result, not a crash
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            torch.cuda.synchronize()
        del reference
        torch.cuda.empty_cache()
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "pysnell": pysnell.__version__,
        "cuda_load_error": cuda_error,
        "triton_load_error": triton_error,
        "cuda_load_seconds": round(load_seconds, 2),
        "cuda_load": dict(_jit.last_load),
        "rows": rows,
        "winners": winners(rows),
    }


def winners(rows) -> dict:
    """Per op: backends ordered by geometric-mean time over the cases every one of them ran correctly."""
    by_op: dict[str, dict[str, list[float]]] = {}
    ok_cases: dict[str, dict[str, set]] = {}
    for row in rows:
        if "median_ms" in row and not row.get("mismatch") and not row.get("error"):
            by_op.setdefault(row["op"], {}).setdefault(row["backend"], []).append(row["median_ms"])
            ok_cases.setdefault(row["op"], {}).setdefault(row["backend"], set()).add(row["case"])
    result = {}
    for op, times in by_op.items():
        n_cases = max(len(c) for c in ok_cases[op].values())
        complete = {b: t for b, t in times.items() if len(t) == n_cases}  # a backend that failed a case cannot win
        order = sorted(complete, key=lambda b: math.exp(sum(math.log(v) for v in complete[b]) / len(complete[b])))
        result[op] = order + [b for b in BACKENDS if b not in order]
    return result


def format_table(report: dict) -> str:
    lines = [
        f"GPU {report['gpu']}, torch {report['torch']}; CUDA extension load: {report['cuda_load_seconds']} s "
        f"({report['cuda_load'] or report['cuda_load_error']})",
        "",
    ]
    lines.append(f"| op | case | {' | '.join(BACKENDS)} |")
    lines.append("|---|---|" + "---|" * len(BACKENDS))
    cells: dict[tuple, dict] = {}
    for row in report["rows"]:
        key = (row["op"], row["case"])
        if "median_ms" in row and not row.get("mismatch"):
            text = f"{row['median_ms']:.3f} ms"
        else:
            text = row.get("error") or f"WRONG ({row.get('mismatch')})"
        cells.setdefault(key, {})[row["backend"]] = text
    for (op, case), by_backend in cells.items():
        lines.append(f"| {op} | {case} | " + " | ".join(by_backend.get(b, "-")[:60] for b in BACKENDS) + " |")
    lines.append("")
    prefs = {op: tuple(order) for op, order in report["winners"].items() if order[0] != "cuda"}
    lines.append("Winners (fastest first): " + json.dumps(report["winners"]))
    lines.append("Paste into pysnell/_cuda_ops.py:")
    lines.append("AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {")
    lines.extend(f'    "{op}": {order!r},' for op, order in sorted(prefs.items()))
    lines.append("}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cuda_backend", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for cuda_backend.json")
    parser.add_argument("--quick", action="store_true", help="one case per op family (about 20 s)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.cuda_backend needs a CUDA GPU")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    report = run(args.quick)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cuda_backend.json").write_text(json.dumps(report, indent=1, default=str))
    print(format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
