"""Where one layer step's time goes: host (Python + launches) against GPU (kernels), kernel by kernel.

    python -m benchmarks.profile_gpu [--out DIR] [--quick]

For the SNELL layer (each backend, and full fine-tuning) and the Monarch layer (each backend, and
dense) at the benchmark's target shapes, bf16 on a GPU, one fwd+bwd step, and the whole ViT-B training
step (full FT, peft LoRA-8, pysnell SNELL-8; bs 64, bf16 autocast) are measured three ways:
- host_ms: CPU time to enqueue one step (N steps back to back, no synchronisation, / N; the median of
  3 such windows);
- wall_ms: CUDA-event time of N steps back to back / N: max(host, GPU) when the host runs ahead (the
  median of 3 windows);
- kernel_ms: the sum of the step's kernel durations (torch.profiler), i.e. the GPU's busy time,
  with the launch count and the kernels that take the most time.
host_ms ≥ kernel_ms means the step is host-bound: fewer launches or less Python would speed it up,
faster kernels would not. `--quick` runs tiny CPU shapes (host_ms and wall_ms only) to prove the
script. Writes profile.json and profile.md under --out (default: stdout only).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

import torch

import pysnell
from pysnell import _backend

from . import ops_snell
from .harness import forced_backend

STEPS = 10  # back-to-back steps per measurement (≈ 20 launches each: far below the launch queue depth)
WINDOWS = 3  # host and wall times: the median of this many measurements
TOP_KERNELS = 6
# (label, T, in, out)
SNELL_CASES = [("T12608 768x768", 12608, 768, 768), ("T12608 768x3072", 12608, 768, 3072),
               ("T4096 4096x11008", 4096, 4096, 11008)]  # fmt: skip
MONARCH_CASES = [("T8192 4096 nb4", 8192, 4096, 4096, 4), ("T8192 4096 nb16", 8192, 4096, 4096, 16),
                 ("T8192 768x3072 nb4", 8192, 768, 3072, 4), ("T1 4096 nb4", 1, 4096, 4096, 4)]  # fmt: skip
QUICK_SNELL = [("T16 24x20", 16, 24, 20)]
QUICK_MONARCH = [("T16 32x32 nb4", 16, 32, 32, 4)]


def _sync(cuda):
    if cuda:
        torch.cuda.synchronize()


def _profile_step(step, clear, cuda) -> dict:
    """host_ms, wall_ms, and (GPU) kernel_ms, launches, top kernels of one step. host_ms and wall_ms are
    medians over WINDOWS windows of STEPS steps: one 10-step window of the ViT step (about 0.6 s) put
    pysnell and LoRA in the opposite order to the benchmark's medians in sessions 7 and 8."""

    def run(n):
        for _ in range(n):
            clear()
            step()

    run(3)  # warm-up: compiles, autotunes, fills the allocator's cache
    _sync(cuda)
    host, wall = [], []
    for _ in range(WINDOWS):
        # host: enqueue STEPS steps without waiting for the GPU
        t0 = time.perf_counter()
        run(STEPS)
        host.append((time.perf_counter() - t0) * 1e3 / STEPS)
        _sync(cuda)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(STEPS)
            end.record()
            torch.cuda.synchronize()
            wall.append(start.elapsed_time(end) / STEPS)
    out = {"host_ms": statistics.median(host)}
    out["wall_ms"] = statistics.median(wall) if cuda else out["host_ms"]
    if not cuda:
        return out
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(STEPS)
        torch.cuda.synchronize()
    gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    out.update(summarise_kernels([(e.time_range.start, e.name, e.time_range.elapsed_us()) for e in gpu], STEPS))
    return out


def summarise_kernels(events, steps: int) -> dict:
    """kernel_ms, launches and the heaviest launches per step from (start_us, name, duration_us) events.

    When every step launched the same sequence, launches are told apart by their place in the step
    ("2:_gemm_kernel"), so two launches of one kernel (e.g. Monarch's two split GEMMs) are not merged.
    """
    events = sorted(events)
    total_us = sum(d for _, _, d in events)
    out = {"kernel_ms": total_us / 1e3 / steps, "launches": len(events) / steps}
    per_step = len(events) // steps
    names = [name[:60] for _, name, _ in events]
    same_sequence = (
        per_step and len(events) == per_step * steps and all(names[i] == names[i % per_step] for i in range(len(names)))
    )
    per_launch = collections.defaultdict(lambda: [0, 0.0])
    for i, (_, name, dur) in enumerate(events):
        key = f"{i % per_step + 1}:{name[:60]}" if same_sequence else name[:60]
        per_launch[key][0] += 1
        per_launch[key][1] += dur
    top = sorted(per_launch.items(), key=lambda kv: -kv[1][1])[:TOP_KERNELS]
    out["top"] = [(name, count / steps, us / 1e3 / steps) for name, (count, us) in top]
    return out


def _snell_rows(cases, device, dtype, on_row) -> list[dict]:
    rows = []
    for label, T, n, m in cases:
        case = ops_snell._Case(T, n, m, 8, dtype, device)
        providers = [("full_ft", None, ops_snell._full_ft_provider(case))]
        # the torch backend is the reference (17-240x full FT on an H200): profiled in quick runs only
        for backend in ("triton", "cuda") if device != "cpu" else ("triton", "torch"):
            if _backend.available("snell.layer_forward", backend, torch.device(device)):
                providers.append((f"pysnell_{backend}", backend, ops_snell._pysnell_provider(case)))
        # the training branch form (dropout and drop-path 0.1) on the backend "auto" picks: its extra
        # elementwise passes and GEMMs, next to the fused step above
        providers.append(("pysnell_auto_dropout", None, ops_snell._pysnell_provider(case, ops_snell.DROPOUT)))
        for name, backend, (forward, leaves) in providers:

            def step(forward=forward, backend=backend, dy=case.dy):
                with forced_backend(backend):
                    forward().backward(dy)

            def clear(leaves=leaves):
                for t in leaves:
                    t.grad = None

            rows.append(_row("snell_layer", label, name, step, clear, device))
            on_row(rows[-1])
    return rows


def _monarch_rows(cases, device, dtype, on_row) -> list[dict]:
    rows = []
    for label, T, n_in, n_out, nblocks in cases:
        dense = torch.nn.Linear(n_in, n_out, device=device, dtype=dtype)
        mon = pysnell.MonarchLinear(n_in, n_out, nblocks, device=device, dtype=dtype)
        x = torch.randn(T, n_in, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(T, n_out, device=device, dtype=dtype)
        providers = [("dense", None, dense)]
        for backend in ("triton", "cuda", "torch"):
            dev = torch.device(device)
            if all(_backend.available(op, backend, dev) for op in ("monarch.forward", "monarch.backward")):
                providers.append((f"pysnell_{backend}", backend, mon))
        for name, backend, module in providers:

            def step(module=module, backend=backend, x=x, dy=dy):
                with forced_backend(backend):
                    module(x).backward(dy)

            def clear(module=module, x=x):
                x.grad = None
                for p in module.parameters():
                    p.grad = None

            rows.append(_row("monarch", label, name, step, clear, device))
            on_row(rows[-1])
    return rows


def _model_rows(full, device, on_row) -> list[dict]:
    """The whole-model training step (timm ViT-B bs 64 bf16 on a GPU, TinyViT on CPU): full FT,
    peft LoRA-8 and pysnell SNELL-8, as benchmarks.bench_model builds them (no equivalence check:
    that is the model benchmark's job)."""
    from . import bench_model

    spec = bench_model._vit_spec(full)
    case, bs, dtype = spec.settings[0]
    torch.manual_seed(0)
    with torch.device(device):
        base = spec.build()
    base.train()
    batch = spec.make_batch(bs, device)
    rows = []
    for method in ("full_ft", "peft_lora8", "pysnell_snell8"):
        try:
            model = bench_model.build_method(method, base, spec).train()
        except Exception as exc:  # noqa: BLE001 - e.g. peft missing: a row that says so
            rows.append({"op": spec.op, "case": case, "provider": method, "error": f"{type(exc).__name__}: {exc}"})
            on_row(rows[-1])
            continue
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        step = bench_model.make_step(spec, model, opt, batch, device, dtype)
        rows.append(_row(spec.op, case, method, step, lambda: None, device))
        on_row(rows[-1])
        del model, opt, step
        bench_model._release(device)
    return rows


def _row(op, label, provider, step, clear, device) -> dict:
    row = {"op": op, "case": label, "provider": provider}
    try:
        row.update(_profile_step(step, clear, torch.device(device).type == "cuda"))
    except Exception as exc:  # noqa: BLE001 - one provider failing must not stop the profile
        row["error"] = f"{type(exc).__name__}: {exc}"[:200]
    return row


def format_table(rows) -> str:
    lines = [
        "| op | case | provider | host ms | wall ms | kernel ms | launches | bound | top kernels (ms per step) |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['case']} | {r['provider']} | error: {r['error']} ||||||")
            continue
        kernel = r.get("kernel_ms")
        bound = "" if kernel is None else ("host" if r["host_ms"] >= kernel else "GPU")
        top = "; ".join(f"{name} ×{count:g}: {ms:.3f}" for name, count, ms in r.get("top", []))
        fmt = lambda v: "–" if v is None else f"{v:.3f}"
        lines.append(
            f"| {r['op']} | {r['case']} | {r['provider']} | {r['host_ms']:.3f} | {r['wall_ms']:.3f} | "
            f"{fmt(kernel)} | {r.get('launches', '–')} | {bound} | {top} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for profile.json / profile.md")
    parser.add_argument("--quick", action="store_true", help="tiny CPU shapes: proves the script only")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    card = torch.cuda.get_device_name() if cuda else "cpu"
    title = f"## Step profile — {card} · torch {torch.__version__} · {dtype}\n\n"
    done: list[dict] = []

    def on_row(row):
        # written after every row: a run stopped by its time limit keeps what it measured
        done.append(row)
        print(format_table([row]).splitlines()[-1], flush=True)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "profile.json").write_text(json.dumps({"device": card, "rows": done}, indent=1))
            (args.out / "profile.md").write_text(title + format_table(done) + "\n")

    rows = _snell_rows(SNELL_CASES if cuda else QUICK_SNELL, device, dtype, on_row)
    rows += _model_rows(cuda, device, on_row)  # before Monarch: issue 4's model target needs it most
    rows += _monarch_rows(MONARCH_CASES if cuda else QUICK_MONARCH, device, dtype, on_row)
    print()
    print(title + format_table(rows))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
