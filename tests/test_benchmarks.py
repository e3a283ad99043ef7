"""The benchmark runner in --quick mode on CPU: the rows it writes, its files, --compare, failures.

Performance is not asserted here (CPU numbers only prove that the harness works).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a package at the repo root, not installed
    sys.path.insert(0, str(REPO))

from benchmarks import bench_model, harness, report, runner  # noqa: E402

META_KEYS = ("device_name", "torch", "triton", "cuda", "git_rev")
STR_KEYS = ("op", "case", "provider", "baseline", "dtype", "pass", "device", "module")
TIME_KEYS = ("median_ms", "p20_ms", "p80_ms")
# A made-up older run: one model row, 10^6 ms, so its speed-up must come out far above 1.
OLD_KEY = {"op": "tinyvit_train_step", "case": "bs4-fp32", "provider": "full_ft", "dtype": "float32"}


def _run_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"runner failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick run of every module on CPU, with --compare against a made-up older run."""
    tmp = tmp_path_factory.mktemp("bench")
    old = tmp / "old.json"
    old.write_text(json.dumps({"rows": [{**OLD_KEY, "pass": "train_step", "median_ms": 1e6}]}))
    out = tmp / "run"
    t0 = time.perf_counter()
    proc = _run_cli("--quick", "--out", str(out), "--compare", str(old), "--module-timeout", "150")
    data = json.loads((out / "results.json").read_text())
    return types.SimpleNamespace(
        out=out, data=data, rows=data["rows"], stdout=proc.stdout, seconds=time.perf_counter() - t0
    )


def test_quick_run_writes_every_file(quick_run):
    for name in ("results.json", "results.csv", "results.md", "summary.md", "plot_model.png"):
        path = quick_run.out / name
        assert path.is_file() and path.stat().st_size > 0, f"{name} missing or empty"
    modules = {r["module"] for r in quick_run.rows}
    for module in modules:
        png = quick_run.out / f"plot_{module}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png.name} is not a PNG"
    # The summary is printed last.
    assert quick_run.stdout.rstrip().splitlines()[-1].startswith("| ")


def test_meta_records_the_environment(quick_run):
    meta = quick_run.data["meta"]
    assert meta["mode"] == "quick" and meta["device"] == "cpu"
    assert meta["torch"] == torch.__version__
    for key in META_KEYS + ("run_id", "python"):
        assert isinstance(meta[key], str) and meta[key], key


def test_rows_follow_the_schema(quick_run):
    rows = quick_run.rows
    assert rows
    for row in rows:
        for key in harness.REQUIRED_KEYS:
            assert key in row, f"{key} missing in {row}"
        for key in STR_KEYS:
            assert isinstance(row[key], str) and row[key], f"{key} in {row}"
        for key in META_KEYS:
            assert row[key] == quick_run.data["meta"][key]
        assert row["device"] == "cpu"
        if row.get("error"):
            assert all(row[k] is None for k in TIME_KEYS), row
            continue
        times = [row[k] for k in TIME_KEYS]
        assert all(isinstance(t, float) and math.isfinite(t) and t > 0 for t in times), row
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
        # Memory is not measured on CPU (null in JSON), finite wherever it is.
        assert row["peak_mib"] is None or math.isfinite(row["peak_mib"]), row


def test_every_module_on_disk_ran_and_every_baseline_is_present(quick_run):
    rows, notes = quick_run.rows, quick_run.data["notes"]
    on_disk = {p.stem[len("ops_") :] for p in (REPO / "benchmarks").glob("ops_*.py")} | {"model"}
    present = {r["module"] for r in rows}
    assert on_disk <= present, f"modules without rows: {on_disk - present}; notes: {notes}"
    groups = {}
    for row in rows:
        groups.setdefault(report.group_key(row), []).append(row)
    for key, members in groups.items():
        names = {r["baseline"] for r in members}
        assert len(names) == 1, f"group {key} names several baselines: {names}"
        base_name = names.pop()
        base = [r for r in members if r["provider"] == base_name]
        assert len(base) == 1, f"group {key}: baseline row missing or duplicated"
        assert not base[0].get("error"), f"group {key}: baseline failed: {base[0].get('error')}"
        assert base[0]["ratio_time"] == 1.0
        providers = [r["provider"] for r in members]
        assert len(providers) == len(set(providers)), f"group {key}: duplicate providers {providers}"
        for r in members:
            if not r.get("error"):
                assert r["ratio_time"] == pytest.approx(r["median_ms"] / base[0]["median_ms"])
    assert not any(n.startswith("ratio:") for n in notes), notes


def test_model_rows_cover_every_method_with_matching_adapters(quick_run):
    model = [r for r in quick_run.rows if r["module"] == "model"]
    ops = {r["op"] for r in model}
    assert "tinyvit_train_step" in ops
    for (op, case), members in _by(model, "op", "case").items():
        by_method = {r["provider"]: r for r in members}
        dropout_methods = bench_model.DROPOUT_METHODS if "fp32" not in case else ()
        assert set(by_method) == set(bench_model.METHODS + dropout_methods), (op, case)
        for method, r in by_method.items():
            assert not r.get("error"), f"{op} {case} {method}: {r['error']}"
            assert r["check"].startswith("ok"), r["check"]
            assert math.isfinite(r["loss"])
        full = by_method["full_ft"]
        assert full["trainable_params"] == full["total_params"]
        # LoRA-8, the SNELL reference and pysnell SNELL-8 train the same number of parameters: r·(m+n) + head.
        counts = {by_method[m]["trainable_params"] for m in ("peft_lora8", "snell_ref", "pysnell_snell8")}
        counts |= {by_method[m]["trainable_params"] for m in dropout_methods}
        assert len(counts) == 1 and counts.pop() < full["trainable_params"]
    cases = {r["case"] for r in model if r["op"] == "tinyvit_train_step"}
    assert cases == {"bs8-bf16-autocast", "bs4-fp32"}
    # Every SNELL row went through the fp32 check of the loss and the adapter gradients.
    snell = [r for r in model if r["provider"] in ("snell_ref", "pysnell_snell8")]
    assert snell and all("grads rel-RMSE" in r["check"] for r in snell)


def _by(rows, *keys):
    out = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def test_csv_and_markdown_match_the_json(quick_run):
    with open(quick_run.out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(quick_run.rows)
    for key in harness.REQUIRED_KEYS + META_KEYS + ("ratio_time",):
        assert key in table[0], key
    for got, want in zip(table, quick_run.rows):
        assert (got["op"], got["case"], got["provider"]) == (want["op"], want["case"], want["provider"])
        if want["median_ms"] is not None:
            assert float(got["median_ms"]) == pytest.approx(want["median_ms"])
    md = (quick_run.out / "results.md").read_text()
    summary = (quick_run.out / "summary.md").read_text()
    assert summary in md
    for op, case, dtype, pass_ in {report.group_key(r) for r in quick_run.rows}:
        assert f"| {op} | {case} | {dtype} | {pass_} |" in summary
    for r in quick_run.rows:
        assert f"| {r['provider']}" in md


def test_compare_adds_speedups_against_the_older_run(quick_run):
    assert quick_run.data["meta"]["compare"]["matched_rows"] == 1
    for row in quick_run.rows:
        hit = all(row[k] == v for k, v in OLD_KEY.items()) and row["pass"] == "train_step"
        if hit:
            assert row["old_median_ms"] == 1e6
            assert row["speedup_vs_old"] == pytest.approx(1e6 / row["median_ms"])
        else:
            assert row["old_median_ms"] is None and row["speedup_vs_old"] is None
    assert "vs old" in (quick_run.out / "results.md").read_text()


def test_rerender_a_saved_run_against_itself(quick_run, tmp_path):
    src = quick_run.out / "results.json"
    out = tmp_path / "again"
    _run_cli("--from-json", str(src), "--compare", str(src), "--out", str(out), "--no-plots")
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == len(quick_run.rows)
    timed = [r for r in rows if r["median_ms"] is not None]
    assert timed and all(r["speedup_vs_old"] == 1.0 for r in timed)


# ---- the runner's handling of broken modules, and the harness, in process ----------------------


def test_missing_and_broken_modules_become_notes(monkeypatch):
    notes = []
    assert runner._import("nope", "benchmarks.ops_does_not_exist", notes) is None
    assert "does not exist yet" in notes[-1]

    def boom(full, device):
        raise RuntimeError("kernel exploded")

    rows = runner.run_module("boom", types.SimpleNamespace(run=boom), False, "cpu", notes, None)
    assert rows == [] and "kernel exploded" in notes[-1]

    def bad_rows(full, device):
        good = harness.error_row("x", op="o", case="c", provider="p", baseline="p", dtype="float32", device="cpu")
        return [good, {"op": "o"}]

    rows = runner.run_module("bad", types.SimpleNamespace(run=bad_rows), False, "cpu", notes, None)
    assert len(rows) == 1 and rows[0]["module"] == "bad" and "dropped a row" in notes[-1]

    def slow(full, device):
        time.sleep(5)

    t0 = time.perf_counter()
    assert runner.run_module("slow", types.SimpleNamespace(run=slow), False, "cpu", notes, 0.2) == []
    assert time.perf_counter() - t0 < 3 and "module-timeout" in notes[-1]


def test_cli_rejects_unknown_modules_and_bad_compare(tmp_path, capsys):
    assert runner.main(["--quick", "--ops", "bogus", "--out", str(tmp_path)]) == 2
    assert "bogus" in capsys.readouterr().err
    missing = tmp_path / "nothing.json"
    assert runner.main(["--quick", "--ops", "model", "--compare", str(missing), "--out", str(tmp_path)]) == 2
    assert "nothing.json" in capsys.readouterr().err


def test_ratios_flag_a_missing_baseline():
    ident = dict(op="o", case="c", dtype="float32", device="cpu", pass_="fwd")
    rows = [
        {**harness.base_row(provider="a", baseline="a", **ident), "median_ms": 2.0, "peak_mib": 4.0},
        {**harness.base_row(provider="b", baseline="a", **ident), "median_ms": 1.0, "peak_mib": 8.0},
        {**harness.base_row(provider="z", baseline="missing", **{**ident, "case": "d"}), "median_ms": 1.0},
    ]
    rows[2]["peak_mib"] = float("nan")  # not measured: its memory ratio must stay NaN, not fail
    problems = report.add_ratios(rows)
    assert rows[0]["ratio_time"] == 1.0 and rows[1]["ratio_time"] == 0.5 and rows[1]["ratio_mem"] == 2.0
    assert math.isnan(rows[2]["ratio_time"]) and problems == ["o/d/float32/fwd: baseline 'missing' has no row"]


def test_measure_times_and_clears_grads(seed):
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)
    seen = []

    def fwd_bwd():
        seen.append(w.grad is None)
        (x @ w).square().sum().backward()

    row = harness.measure(
        fwd_bwd, op="mm", case="32x64", provider="torch", baseline="torch", dtype=torch.float32, device="cpu",
        pass_="fwd+bwd", warmup=2, reps=7, grad_to_none=[w], size=2048,
    )  # fmt: skip
    assert all(seen) and len(seen) == 2 + 7
    assert set(harness.REQUIRED_KEYS) <= set(row) and row["size"] == 2048 and row["dtype"] == "float32"
    assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
    assert math.isnan(row["peak_mib"])  # not measured on CPU


def test_reference_snell_threshold_by_sort_equals_torch_quantile(seed):
    layer = bench_model.RefSNELLLinear(torch.nn.Linear(37, 30), groups=3)
    with torch.no_grad():
        layer.snell_A.normal_()
        layer.snell_B.normal_()
    by_quantile = layer.sparse_delta()
    layer.threshold = "sort"
    by_sort = layer.sparse_delta()
    torch.testing.assert_close(by_sort, by_quantile, rtol=0, atol=0)
    kept = (by_sort != 0).reshape(3, -1).float().mean(1)
    assert torch.all((kept - 0.1).abs() < 0.02), kept  # 10% kept per group of 10 rows


def test_ops_plot_and_tables_from_rows_with_sizes_and_errors(tmp_path, seed):
    rows = []
    for size in (256, 1024, 4096):
        for provider in ("torch_topk", "pysnell"):
            row = harness.base_row(
                op="topk_mask_", case=f"n={size}", provider=provider, baseline="torch_topk", dtype="float32",
                device="cuda",
            )  # fmt: skip
            t = float(torch.rand(()) + 0.1) * size / 256
            row.update(median_ms=t, p20_ms=0.9 * t, p80_ms=1.1 * t, peak_mib=float(size), size=size, module="topk")
            rows.append(row)
    rows.append(
        harness.error_row(
            "RuntimeError: quantile() input tensor is too large",
            op="topk_mask_",
            case="n=4096",
            provider="torch_quantile",
            baseline="torch_topk",
            dtype="float32",
            device="cuda",
        )
    )
    rows[-1]["module"] = "topk"
    assert report.add_ratios(rows) == []
    meta = {"device_name": "test card", "mode": "full", "git_rev": "abc"}
    path = report.plot_module("topk", rows, str(tmp_path), meta)
    assert Path(path).read_bytes()[:4] == b"\x89PNG"
    md = report.results_markdown(meta, ["a note"], rows)
    assert "error: RuntimeError: quantile() input tensor is too large" in md and "- a note" in md
    assert "torch_quantile error" in report.summary_markdown(meta, rows)
    # a GPU run's host probe (runner.host_probe) heads the summary, at the start and at the end
    probed = dict(meta, host_probe_us={"torch.empty(4096)": 2.1}, host_probe_end_us="not measured (x)")
    summary = report.summary_markdown(probed, rows)
    assert "Host probe at the start, µs per call: torch.empty(4096) 2.1" in summary and "at the end" not in summary


def test_host_probe_times_the_primitives():
    from benchmarks import runner

    probe = runner.host_probe("cpu")
    assert isinstance(probe, dict), probe
    assert {"torch.empty(4096)", "Triton launch, 1 argument"} <= set(probe) and all(v > 0 for v in probe.values())


def test_step_profile_quick_writes_its_table(tmp_path):
    # benchmarks.profile_gpu on CPU: host and wall times for every provider, no kernel columns
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_gpu", "--quick", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "profile.json").read_text())
    providers = {(r["op"], r["provider"]) for r in data["rows"]}
    assert {("snell_layer", "full_ft"), ("snell_layer", "pysnell_torch"), ("monarch", "dense")} <= providers
    assert ("snell_layer", "pysnell_auto_dropout") in providers
    assert {("tinyvit_train_step", m) for m in ("full_ft", "peft_lora8", "pysnell_snell8")} <= providers
    for row in data["rows"]:
        assert "error" not in row, row
        assert row["host_ms"] > 0 and math.isfinite(row["wall_ms"]), row
    assert (tmp_path / "profile.md").read_text().count("\n| ") == len(data["rows"]) + 1


def test_host_profile_quick_profiles_every_case(tmp_path):
    # benchmarks.host_profile on CPU: host primitives, then a cProfile table per case and the summary
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.host_profile", "--quick", "--top", "5", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = (tmp_path / "host_profile.txt").read_text()
    assert "Triton launch, 31 arguments + 1 constexpr" in text
    summary = text[text.index("| case | provider |") :].splitlines()[2:]
    cases = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]) for line in summary}
    for label in ("snell_layer T16 24x20", "SNELLLinear T16 24x20"):
        assert {(label, "pysnell_triton"), (label, "pysnell_torch")} <= cases, cases
    assert ("monarch T1 32 nb4", "dense") in cases and ("snell_layer T16 24x20", "full_ft") in cases
    assert len(cases) == 8 and text.count("under cProfile, per step:") == 8
    assert all(float(line.strip("|").split("|")[2]) > 0 for line in summary)


def test_snell_knob_sweep_quick_checks_every_setting(tmp_path):
    # benchmarks.tune_snell on CPU: the shipped setting per kernel and shape, checked against itself
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.tune_snell", "--quick", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "tune_snell.json").read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"factor_grads", "select"}
    assert all(r["ok"] and r["ms"] > 0 for r in rows), rows
    assert {r["pilot_min_numel"] for r in rows if r["kernel"] == "select"} >= {1 << 18, 1 << 40}
    assert (tmp_path / "tune_snell.md").read_text().count("\n| ") == len(rows) + 1


def test_host_cost_counts_launches_on_cpu():
    # benchmarks.host_cost: launches per layer step are device-independent facts; check a few
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.host_cost", "--steps", "5"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in proc.stdout.splitlines()
            if line.startswith("| ") and "µs" not in line}  # fmt: skip
    assert rows[("nn.Linear (full FT)", "fwd")].split("|")[3].strip().startswith("0 ")  # no Triton kernel
    assert "weff_kernel ×1" in rows[("SNELLLinear r=8", "fwd")]  # W0 + S written once per forward
    assert "backward_kernel ×1" in rows[("SNELLLinear r=8", "fwd+bwd")]
    assert "two_stage_kernel ×1" in rows[("MonarchLinear nb=4", "fwd")]
    for line in rows.values():
        assert float(line.split("|")[5]) > 0


@pytest.mark.slow
def test_launch_cost_times_every_kernel_launch(tmp_path):
    # benchmarks.launch_cost compiles for sm_90 with Triton's ptxas and times the launch path
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists():
        pytest.skip("this Triton has no NVIDIA backend tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), TRITON_CACHE_DIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.launch_cost", "--reps", "20"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    totals = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if "launches**" in line}
    topk = {"top-k mask_ 768²", "top-k mask_ 4096²"}
    assert set(totals) == {"SNELL layer fwd", "SNELL layer bwd", "Monarch fwd", "Monarch bwd"} | topk
    per_launch, whole_calls = proc.stdout.split("Whole call")
    kernels = {line.split("|")[2].strip() for line in per_launch.splitlines() if line.startswith("| ")}
    assert {"_select_pass_kernel", "_weff_kernel", "_backward_kernel", "_round_kernel", "_mask_kernel"} <= kernels
    for line in totals.values():
        assert float(line.split("|")[5].strip(" *")) > 0
    # the whole-call table: launches per call and both timings, per op
    calls = {row[1].strip(): row[2:5] for row in (line.split("|") for line in whole_calls.splitlines()[3:])}
    assert set(calls) == set(totals), whole_calls
    assert calls["SNELL layer fwd"][0].strip() == "3" and calls["SNELL layer bwd"][0].strip() == "2"
    assert calls["top-k mask_ 768²"][0].strip() == "5" and calls["top-k mask_ 4096²"][0].strip() == "8"
    assert all(float(t) > 0 for row in calls.values() for t in row[1:])


def test_step_profile_tells_repeated_launches_apart():
    from benchmarks.profile_gpu import summarise_kernels

    step = [("memset", 1.0), ("_gemm_kernel", 100.0), ("_gemm_kernel", 50.0), ("addmm", 5.0)]
    events = [(10 * i, name, us) for i, (name, us) in enumerate(step * 3)]  # three identical steps
    out = summarise_kernels(events, 3)
    assert out["launches"] == 4 and math.isclose(out["kernel_ms"], 0.156)
    assert [name for name, _, _ in out["top"][:2]] == ["2:_gemm_kernel", "3:_gemm_kernel"]
    # steps that differ (e.g. a lazy first-step allocation) fall back to one row per kernel name
    uneven = summarise_kernels(events[:-1], 3)
    assert uneven["top"][0][0] == "_gemm_kernel" and math.isclose(uneven["top"][0][2], 0.15)


def test_monarch_full_mode_times_every_triton_variant(seed):
    # the plans and forward stores the GPU run compares (each provider runs what its name says)
    pytest.importorskip("pysnell.triton_kernels.monarch")
    import pysnell
    from benchmarks import ops_monarch
    from pysnell import _backend

    if not _backend.available("monarch.forward", "triton", torch.device("cpu")):
        pytest.skip("the Triton backend does not serve CPU tensors here (TRITON_INTERPRET unset)")
    mon = pysnell.MonarchLinear(32, 32, 4)  # fused automatically; split and scatter are the variants
    dense, fly = torch.nn.Linear(32, 32), ops_monarch.FlyMonarchLinear(mon)
    names = lambda tokens: [p[0] for p in ops_monarch._providers(dense, mon, fly, "cpu", True, tokens)]
    from pysnell.triton_kernels import monarch as tm

    assert {"pysnell-triton", "pysnell-triton-split", "pysnell-triton-scatter"} <= set(names(64))
    assert "pysnell-triton-scatter" not in names(16)  # few tokens: scatter is the automatic store
    x = torch.randn(64, 32)
    for name, module, ctx in ops_monarch._providers(dense, mon, fly, "cpu", True, 64):
        if not name.startswith("pysnell-triton"):
            continue
        with ctx():
            y = module(x)
            plan, store = tm.plan(mon.blkdiag1.shape, mon.blkdiag2.shape), ops_monarch._store(64, mon)
        assert pysnell.last_backend("monarch.forward") == "triton"
        assert store == ("scatter" if name.endswith("-scatter") else "interleave"), name
        assert set(plan.values()) == ({"split"} if name.endswith("-split") else {"fused"}), name
        with harness.forced_backend("torch"):
            torch.testing.assert_close(y, module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sabotage", ["sparsity", "gradient"])
@pytest.mark.parametrize("make_spec", [bench_model._vit_spec, bench_model._llama_spec], ids=["vit", "llama"])
def test_model_check_catches_a_wrong_snell_layer(monkeypatch, make_spec, sabotage):
    """The model benchmark's pre-timing check passes pysnell as built and fails it with one wrong layer
    on the quick-size models: sparsity 0.8 where the public code keeps 10% (the loss moves), or one
    factor's gradient 2% off (the loss does not: the gradient comparison must catch it)."""
    import pysnell

    spec = make_spec(False)
    torch.manual_seed(0)
    base = spec.build()
    batch = spec.make_batch(2, "cpu")
    assert bench_model.check_snell_equivalence(spec, base, batch, "cpu", torch.float32).startswith("ok")
    real_inject = bench_model.inject_pysnell

    def wrong_inject(model, spec_, *args):
        model = real_inject(model, spec_, *args)
        first = next(m for m in model.modules() if isinstance(m, pysnell.SNELLLinear))
        if sabotage == "sparsity":
            first.sparsity.fill_(0.8)
        else:
            first.snell_A.register_hook(lambda g: g * 1.02)
        return model

    monkeypatch.setattr(bench_model, "inject_pysnell", wrong_inject)
    with pytest.raises(AssertionError, match="SNELL check failed"):
        bench_model.check_snell_equivalence(spec, base, batch, "cpu", torch.float32)


def test_snell_benchmark_can_allow_fp_fusion_for_one_provider():
    pytest.importorskip("triton")
    from pysnell.triton_kernels import snell as triton_snell

    from benchmarks import ops_snell

    assert triton_snell.STRICT_FP == {"enable_fp_fusion": False}
    with ops_snell._fp_fusion(True):
        assert triton_snell.STRICT_FP == {}
    with ops_snell._fp_fusion(False):
        assert triton_snell.STRICT_FP == {"enable_fp_fusion": False}
    assert triton_snell.STRICT_FP == {"enable_fp_fusion": False}


@pytest.mark.parametrize("op", ["snell", "monarch", "topk"])
def test_ncu_step_runs_one_step_of_each_family(op, capsys):
    # what gpu_run's ncu step profiles, at a tiny shape on the CPU (no profiler window here)
    pytest.importorskip("triton")
    from benchmarks import ncu_step

    assert ncu_step.main(["--quick", "--op", op]) == 0
    assert f"profiled one {op} step on cpu with the triton backend" in capsys.readouterr().out
    assert ncu_step.main(["--quick", "--op", op, "--backend", "torch"]) == 0
