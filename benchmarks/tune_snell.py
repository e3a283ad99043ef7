"""Sweep the Triton SNELL kernels' launch knobs at the benchmark shapes, one kernel at a time.

    python -m benchmarks.tune_snell [--out DIR] [--quick]

The layer benchmark times whole steps; this times the two Triton pieces the H200 profile of
session 6 named as the excess over full fine-tuning, each on its own (CUDA events, median of
`REPS` after warm-up, L2 flushed), for every setting of its knobs:
- the factor-gradient kernel (`_factor_grads`: the backward kernel and its reduction) at 4096→11008
  and 768→3072, bf16 G_S, r = 8: BACKWARD_TILE (rows, cols, warps; the 16-bit G_S tile of r ≤ 15)
  × BACKWARD_PROGRAMS_PER_SM;
- the selection (`_select`, every pass) at 768→3072, 768→2304 in 3 groups and 4096→11008: with
  and without the pilot pass (PILOT_MIN_NUMEL), which decides whether the first full pass is wide
  (one global atomic per entry) or narrow (a bracket around the sampled quantile).
Every setting's results are checked against the shipped setting's: the thresholds bit for bit (the
selection is exact), dA and dB to fp32 reordering (the split changes the summation order). A setting
that fails the check is reported and never "fastest". Writes tune_snell.json/md under --out.
`--quick` runs tiny shapes under the Triton interpreter to prove the script (times mean nothing).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

REPS = 30
# (label, m, n, groups): the layer benchmark's shapes, and the fused qkv of ViT-B
SHAPES = [("4096x11008", 11008, 4096, 1), ("768x3072", 3072, 768, 1), ("qkv 768x2304 G3", 2304, 768, 3)]
QUICK_SHAPES = [("40x24", 40, 24, 1), ("48x24 G3", 48, 24, 3)]
TILES = [(64, 64, 8), (64, 64, 4), (128, 64, 8), (64, 128, 8), (32, 64, 4), (128, 32, 8)]
PROGRAMS_PER_SM = [1, 2, 4]


def _setting(module, **values):
    """Set module constants; returns a function that restores them."""
    before = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    return lambda: [setattr(module, k, v) for k, v in before.items()]


def _time_ms(fn, cuda: bool) -> float:
    from .harness import time_fn

    return time_fn(fn, device="cuda" if cuda else "cpu", warmup=3, reps=REPS if cuda else 2)["median_ms"]


def _problem(m, n, groups, device, seed=0):
    from pysnell.triton_kernels import snell

    from pysnell.functional import kernel_params
    from pysnell.ops.snell.reference import KernelParams, SnellSpec

    g = torch.Generator(device="cpu").manual_seed(seed)
    r = 8
    A = (torch.rand(r, n, generator=g) * 2 - 1).div(n**0.5).to(device)
    B = (torch.rand(m, r, generator=g) * 2 - 1).div((m // groups) ** 0.5).to(device)
    params = KernelParams(*kernel_params(A, "piecewise", 2, 0.1))
    spec = SnellSpec("piecewise", 2, "reference", groups)
    geo = snell._Geometry(A, B, params, spec)
    sparsity = torch.full((), 0.9, dtype=torch.float64, device=device)
    gs = torch.randn(m, n, generator=g).to(
        device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    return geo, sparsity, gs


def tune_backward(shapes, device, cuda) -> list[dict]:
    from pysnell.triton_kernels import snell

    from .harness import rel_rmse

    rows = []
    for label, m, n, groups in shapes:
        geo, sparsity, gs = _problem(m, n, groups, device)
        thresholds = snell._select(geo, None, sparsity)
        w_out = torch.empty_like(gs)

        def run(geo=geo, gs=gs, thresholds=thresholds, sparsity=sparsity, w_out=w_out):
            return snell._factor_grads(geo, gs, None, None, thresholds, sparsity, True, w_out)

        ref_dA, ref_dB, _ = (t.clone() for t in run())
        settings = [(snell.BACKWARD_TILE, snell.BACKWARD_PROGRAMS_PER_SM)]
        if cuda:
            settings += [(t, p) for t, p in itertools.product(TILES, PROGRAMS_PER_SM) if (t, p) != settings[0]]
        for tile, pps in settings:

            def check(run=run, ref_dA=ref_dA, ref_dB=ref_dB):
                dA, dB, _ = run()
                err = max(rel_rmse(dA, ref_dA), rel_rmse(dB, ref_dB))
                return {"rel_err": err, "ok": err <= 1e-5}

            row = {"kernel": "factor_grads", "shape": label, "tile": list(tile), "programs_per_sm": pps}
            settings_ = {"BACKWARD_TILE": tile, "BACKWARD_PROGRAMS_PER_SM": pps}
            rows.append(_measure(row, settings_, check, run, cuda))
    return rows


def _measure(row, settings, check, run, cuda) -> dict:
    """Under the module settings: check the results (a dict with "ok"), then time run(). A setting
    that fails (out of shared memory or registers, say) becomes a row with its error, not a crash."""
    from pysnell.triton_kernels import snell

    restore = _setting(snell, **settings)
    try:
        row.update(check())
        row["ms"] = _time_ms(run, cuda)
    except Exception as exc:  # noqa: BLE001
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:200]}")
    finally:
        restore()
    print(json.dumps(row), flush=True)
    return row


def tune_select(shapes, device, cuda) -> list[dict]:
    from pysnell.triton_kernels import snell

    rows = []
    for label, m, n, groups in shapes:
        geo, sparsity, _ = _problem(m, n, groups, device)
        numel = (m // groups) * n
        want = snell._select(geo, None, sparsity).clone()
        for pilot_min in sorted({snell.PILOT_MIN_NUMEL, 1 << 18, 1 << 40}):
            pilot = numel >= pilot_min and numel > 4 * snell.PILOT_SAMPLES
            row = {"kernel": "select", "shape": label, "pilot_min_numel": pilot_min, "pilot": pilot}

            def run(geo=geo, s=sparsity):
                return snell._select(geo, None, s)

            def check(run=run, want=want):
                return {"ok": torch.equal(run(), want)}  # the selection is exact: bit for bit

            rows.append(_measure(row, {"PILOT_MIN_NUMEL": pilot_min}, check, run, cuda))
    return rows


def _table(rows) -> str:
    lines = ["| kernel | shape | setting | ms | check |", "|---|---|---|---:|---|"]
    best = {}
    for r in rows:
        if r.get("ok") and "ms" in r:
            key = (r["kernel"], r["shape"])
            best[key] = min(best.get(key, float("inf")), r["ms"])
    for r in rows:
        if r["kernel"] == "factor_grads":
            setting = f"tile {tuple(r['tile'])}, {r['programs_per_sm']}/SM"
        else:
            setting = f"pilot {'on' if r['pilot'] else 'off'} (min {r['pilot_min_numel']})"
        ms = f"{r['ms']:.3f}" if "ms" in r else "–"
        mark = " **best**" if "ms" in r and r.get("ok") and r["ms"] == best.get((r["kernel"], r["shape"])) else ""
        check = "ok" if r.get("ok") else r.get("error", f"differs (rel {r.get('rel_err')})")
        lines.append(f"| {r['kernel']} | {r['shape']} | {setting} | {ms}{mark} | {check} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if "triton" in sys.modules and os.environ["TRITON_INTERPRET"] != "1":
            raise SystemExit("--quick needs TRITON_INTERPRET=1 before triton is imported")
    cuda = torch.cuda.is_available() and not args.quick
    if not cuda and not args.quick:
        raise SystemExit("benchmarks.tune_snell times GPU kernels: run it on a CUDA GPU (or --quick on CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    shapes = SHAPES if cuda else QUICK_SHAPES
    rows = tune_backward(shapes[:2] if cuda else shapes, device, cuda) + tune_select(shapes, device, cuda)
    name = torch.cuda.get_device_name() if cuda else "CPU (interpreter: times mean nothing)"
    text = f"## Triton SNELL knob sweep — {name}\n\n{_table(rows)}\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tune_snell.json").write_text(json.dumps({"device": name, "rows": rows}, indent=1))
        (args.out / "tune_snell.md").write_text(text)
    return 0 if all(r.get("ok") for r in rows if r["kernel"] == "select") else 1  # the selection is exact


if __name__ == "__main__":
    raise SystemExit(main())
