"""Ratios, comparison with an older run, and the files a run writes (JSON, CSV, Markdown, PNG).

Ratios: a group is op + case + dtype + pass; its baseline is the row whose provider is the
group's `baseline` name. time ÷ base = median_ms / baseline median_ms and mem ÷ base =
peak_mib / baseline peak_mib (both < 1: faster / smaller than the baseline).
Comparison: rows match an older run's rows on (op, case, provider, dtype, pass);
speed-up vs old = old median_ms / new median_ms (> 1: faster now).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import OrderedDict

from .harness import REQUIRED_KEYS, is_finite

META_KEYS = ("device_name", "torch", "triton", "cuda", "git_rev", "run_id")
DERIVED_KEYS = ("module", "ratio_time", "ratio_mem", "old_median_ms", "speedup_vs_old", "error")
GROUP_KEYS = ("op", "case", "dtype", "pass")
MATCH_KEYS = ("op", "case", "provider", "dtype", "pass")


def group_key(row) -> tuple:
    return tuple(row[k] for k in GROUP_KEYS)


def _ratio(a, b):
    return a / b if is_finite(a) and is_finite(b) and b > 0 else float("nan")


def add_ratios(rows: list[dict]) -> list[str]:
    """Fill ratio_time / ratio_mem from each group's baseline row; return problems found."""
    providers = {}
    for row in rows:
        providers.setdefault(group_key(row), {})[row["provider"]] = row
    problems = []
    for row in rows:
        base = providers[group_key(row)].get(row["baseline"])
        if base is None:
            problems.append(f"{'/'.join(map(str, group_key(row)))}: baseline {row['baseline']!r} has no row")
        row["ratio_time"] = _ratio(row["median_ms"], base["median_ms"]) if base else float("nan")
        row["ratio_mem"] = _ratio(row["peak_mib"], base["peak_mib"]) if base else float("nan")
    return sorted(set(problems))


def load_run(path: str) -> tuple[dict, list[str], list[dict]]:
    """(meta, notes, rows) of a results.json written by the runner (a bare list of rows also works)."""
    with open(path) as f:
        data = json.load(f)
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a results.json with a list of rows")
    for row in rows:
        for key in ("median_ms", "p20_ms", "p80_ms", "peak_mib", "ratio_time", "ratio_mem"):
            if key in row and row[key] is None:
                row[key] = float("nan")
    meta = data.get("meta", {}) if isinstance(data, dict) else {}
    notes = data.get("notes", []) if isinstance(data, dict) else []
    return meta, notes, rows


def load_rows(path: str) -> list[dict]:
    return load_run(path)[2]


def add_compare(rows: list[dict], old_rows: list[dict]) -> int:
    """Fill old_median_ms / speedup_vs_old; return how many rows matched."""
    old = {tuple(r.get(k) for k in MATCH_KEYS): r for r in old_rows}
    matched = 0
    for row in rows:
        prev = old.get(tuple(row[k] for k in MATCH_KEYS))
        row["old_median_ms"] = prev["median_ms"] if prev else float("nan")
        row["speedup_vs_old"] = _ratio(row["old_median_ms"], row["median_ms"])
        matched += prev is not None
    return matched


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json(path, meta, notes, rows):
    """NaN (not measured, e.g. CPU memory, or failed) is written as null."""
    with open(path, "w") as f:
        json.dump(_jsonable({"meta": meta, "notes": notes, "rows": rows}), f, indent=1)


def columns(rows) -> list[str]:
    cols = list(REQUIRED_KEYS) + [k for k in DERIVED_KEYS + META_KEYS if any(k in r for r in rows)]
    extras = sorted({k for r in rows for k in r} - set(cols))
    return cols + extras


def write_csv(path, rows):
    cols = columns(rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in _jsonable(row).items()})


def fmt(value, kind="ms") -> str:
    if not is_finite(value):
        return "–"
    if kind == "ratio":
        return f"{value:.2f}"
    a = abs(value)
    if a >= 100:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.3f}"
    return f"{value:.4f}"


def _by_module(rows):
    out = OrderedDict()
    for row in rows:
        out.setdefault(row.get("module", "?"), []).append(row)
    return out


def _header_line(meta) -> str:
    return (
        f"{meta.get('device_name')} · mode {meta.get('mode')} · torch {meta.get('torch')} · "
        f"triton {meta.get('triton')} · CUDA {meta.get('cuda')} · git {meta.get('git_rev')} · {meta.get('run_id')}"
    )


def _provider_cell(row, compare) -> str:
    if row.get("error"):
        return f"{row['provider']} error"
    cell = f"{row['provider']} {fmt(row['ratio_time'], 'ratio')}"
    if is_finite(row.get("ratio_mem")):
        cell += f" ({fmt(row['ratio_mem'], 'ratio')})"
    if compare and is_finite(row.get("speedup_vs_old")):
        cell += f" [×{row['speedup_vs_old']:.2f} vs old]"
    return cell


def summary_markdown(meta, rows, compare=False) -> str:
    """One line per group: the baseline's time and every other provider's ratios (compact)."""
    lines = [
        f"## Summary — {_header_line(meta)}",
        "",
        "time ÷ base (mem ÷ base) per provider; < 1 = faster (smaller) than the group's baseline."
        + (" [×N vs old] = speed-up over the --compare run." if compare else ""),
        "",
    ]
    for key, when in (("host_probe_us", "start"), ("host_probe_end_us", "end")):
        probe = meta.get(key)
        if isinstance(probe, dict):
            lines += [f"Host probe at the {when}, µs per call: " + "; ".join(f"{k} {v}" for k, v in probe.items()), ""]
    lines += [
        "| op | case | dtype | pass | baseline: median ms (peak MiB) | others: time ÷ base (mem ÷ base) |",
        "|---|---|---|---|---|---|",
    ]
    groups = OrderedDict()
    for row in rows:
        groups.setdefault(group_key(row), []).append(row)
    for key, members in groups.items():
        base_name = members[0]["baseline"]
        base = next((r for r in members if r["provider"] == base_name), None)
        if base is None:
            base_cell = f"{base_name}: missing"
        elif base.get("error"):
            base_cell = f"{base_name}: error"
        else:
            base_cell = f"{base_name} {fmt(base['median_ms'])}"
            if is_finite(base["peak_mib"]):
                base_cell += f" ({base['peak_mib']:.0f})"
            if compare and is_finite(base.get("speedup_vs_old")):
                base_cell += f" [×{base['speedup_vs_old']:.2f} vs old]"
        others = " · ".join(_provider_cell(r, compare) for r in members if r is not base)
        lines.append(f"| {' | '.join(map(str, key))} | {base_cell} | {others} |")
    return "\n".join(lines) + "\n"


def results_markdown(meta, notes, rows, compare=False) -> str:
    """The summary, the notes, then every row per module."""
    parts = [f"# pysnell benchmarks\n\n{summary_markdown(meta, rows, compare)}"]
    if notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    head = "| op | case | dtype | pass | provider | median ms | p20–p80 ms | peak MiB | time ÷ base | mem ÷ base |"
    rule = "|---|---|---|---|---|---|---|---|---|---|"
    if compare:
        head += " old ms | speed-up vs old |"
        rule += "---|---|"
    for module, members in _by_module(rows).items():
        lines = [f"## {module}", "", head, rule]
        for r in members:
            provider = r["provider"] + (" (base)" if r["provider"] == r["baseline"] else "")
            if r.get("error"):
                cells = [f"error: {r['error'][:120]}", "", "", "", ""]
            else:
                cells = [
                    fmt(r["median_ms"]),
                    f"{fmt(r['p20_ms'])}–{fmt(r['p80_ms'])}",
                    fmt(r["peak_mib"]),
                    fmt(r["ratio_time"], "ratio"),
                    fmt(r["ratio_mem"], "ratio"),
                ]
            if compare:
                cells += [fmt(r.get("old_median_ms")), fmt(r.get("speedup_vs_old"), "ratio")]
            fields = [r["op"], r["case"], r["dtype"], r["pass"], provider] + cells
            lines.append("| " + " | ".join(str(c).replace("|", "/") for c in fields) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


# ---- plots -----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series_label(row):
    return f"{row['provider']} {row['dtype']} {row['pass']}"


def plot_ops(rows, path, title) -> None:
    """Time and memory against size, one row of two panels per op, one line per provider/dtype/pass.

    x is the rows' numeric "size" when every row of the op has one, else the cases in order.
    """
    plt = _pyplot()
    ops = list(OrderedDict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(len(ops), 2, figsize=(13, 3.6 * len(ops)), squeeze=False)
    for (ax_t, ax_m), op in zip(axes, ops):
        members = [r for r in rows if r["op"] == op]
        numeric = all(is_finite(r.get("size")) for r in members)
        cases = list(OrderedDict.fromkeys(r["case"] for r in members))
        series = OrderedDict()
        for r in members:
            series.setdefault(_series_label(r), []).append(r)
        for ax, key, label in ((ax_t, "median_ms", "median ms"), (ax_m, "peak_mib", "peak MiB")):
            drawn = False
            for name, pts in series.items():
                pts = [p for p in pts if is_finite(p[key]) and p[key] > 0]
                if not pts:
                    continue
                pts.sort(key=lambda p: p["size"] if numeric else cases.index(p["case"]))
                xs = [p["size"] if numeric else cases.index(p["case"]) for p in pts]
                ax.plot(xs, [p[key] for p in pts], marker="o", label=name)
                drawn = True
            ax.set_title(f"{op}: {label}", fontsize=9)
            if not drawn:
                ax.text(0.5, 0.5, "not measured on this device", ha="center", va="center", transform=ax.transAxes)
                continue
            ax.set_yscale("log")
            if numeric:
                ax.set_xscale("log")
                ax.set_xlabel("size")
            else:
                ax.set_xticks(range(len(cases)))
                ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=7)
        handles, labels = ax_t.get_legend_handles_labels()
        if handles:
            ax_t.legend(fontsize=6, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_bars(rows, path, title) -> None:
    """Whole-model bars: step time, peak memory above the step's start, whole peak; per setting."""
    plt = _pyplot()
    ops = list(OrderedDict.fromkeys(r["op"] for r in rows))
    metrics = (
        ("median_ms", "step ms"),
        ("peak_mib", "peak MiB (above start)"),
        ("peak_total_mib", "peak MiB (whole method)"),
    )
    fig, axes = plt.subplots(len(ops), len(metrics), figsize=(15, 3.8 * len(ops)), squeeze=False)
    for axrow, op in zip(axes, ops):
        members = [r for r in rows if r["op"] == op]
        cases = list(OrderedDict.fromkeys(r["case"] for r in members))
        providers = list(OrderedDict.fromkeys(r["provider"] for r in members))
        width = 0.8 / max(1, len(providers))
        for ax, (key, label) in zip(axrow, metrics):
            drawn = False
            for i, prov in enumerate(providers):
                xs, ys = [], []
                for j, case in enumerate(cases):
                    hit = [r for r in members if r["provider"] == prov and r["case"] == case]
                    if hit and is_finite(hit[0].get(key)):
                        xs.append(j + i * width)
                        ys.append(hit[0][key])
                if ys:
                    ax.bar(xs, ys, width=width, label=prov)
                    drawn = True
            ax.set_title(f"{op}: {label}", fontsize=9)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
            ax.set_xticklabels(cases, fontsize=7)
            if not drawn:
                ax.text(0.5, 0.5, "not measured on this device", ha="center", va="center", transform=ax.transAxes)
        axrow[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_module(module, rows, out_dir, meta) -> str:
    path = os.path.join(out_dir, f"plot_{module}.png")
    title = f"{module} — {meta.get('device_name')} ({meta.get('mode')}, git {meta.get('git_rev')})"
    (plot_bars if module == "model" else plot_ops)(rows, path, title)
    return path
