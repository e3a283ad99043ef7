"""`python -m benchmarks`: run the benchmark modules, write JSON/CSV/Markdown/PNG, compare runs.

Modules: benchmarks/ops_<name>.py (any that exist, e.g. topk, monarch, snell) and
benchmarks/bench_model.py ("model"). Each has `run(full: bool, device: str) -> list[dict]`.
A module that is missing, fails to import, raises or runs past --module-timeout is skipped
with a note; the other modules still run. Results are rewritten after every module, so a
run cut short keeps what finished.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import importlib
import importlib.metadata
import inspect
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
RESULTS_DIR = PACKAGE_DIR / "results"
# Order of the modules in a run and in the reports.
KNOWN_MODULES = {
    "topk": "benchmarks.ops_topk",
    "monarch": "benchmarks.ops_monarch",
    "snell": "benchmarks.ops_snell",
    "model": "benchmarks.bench_model",
}
FILES = ("results.json", "results.csv", "results.md", "summary.md")


def available_modules() -> dict[str, str]:
    """Known modules plus any other benchmarks/ops_<name>.py on disk."""
    found = dict(KNOWN_MODULES)
    for path in sorted(PACKAGE_DIR.glob("ops_*.py")):
        found.setdefault(path.stem[len("ops_") :], f"benchmarks.{path.stem}")
    return found


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_name(device: str) -> str:
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    return "CPU " + (platform.processor() or platform.machine())


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "n/a"


def source_digest() -> str:
    """A hash of the package's sources: identifies the code of a tree copied without .git."""
    root = PACKAGE_DIR.parent
    digest = hashlib.sha1()
    for folder in ("pysnell", "triton_kernels", "csrc", "benchmarks"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".cu", ".cuh", ".cpp", ".h") and "results" not in path.parts:
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def git_revision() -> str:
    """PYSNELL_GIT_REV if set, else the git commit (+ "-dirty"), else "tree-<hash of the sources>"."""
    rev = os.environ.get("PYSNELL_GIT_REV", "").strip()
    if rev:
        return rev
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "tree-" + source_digest()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PACKAGE_DIR,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "tree-" + source_digest()


def run_meta(device: str, mode: str) -> dict:
    import torch

    return {
        "device_name": device_name(device),
        "device": device,
        "mode": mode,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda or "none",
        "git_rev": git_revision(),
        "run_id": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "pysnell": _version("pysnell"),
        "peft": _version("peft"),
        "timm": _version("timm"),
        "transformers": _version("transformers"),
        "threads": torch.get_num_threads(),
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    }


class ModuleTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise ModuleTimeout in the main thread after `seconds` (between Python operations)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _expire(signum, frame):
        raise ModuleTimeout(f"ran past --module-timeout {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _import(name: str, module_name: str, notes: list[str]):
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            notes.append(f"{name}: skipped ({module_name} does not exist yet)")
        else:
            notes.append(f"{name}: skipped (import failed: {type(exc).__name__}: {exc})")
        return None
    except Exception as exc:  # noqa: BLE001 - a broken module must not stop the others
        notes.append(f"{name}: skipped (import failed: {type(exc).__name__}: {exc})")
        return None
    if not callable(getattr(module, "run", None)):
        notes.append(f"{name}: skipped ({module_name} has no run(full, device))")
        return None
    return module


def check_row(row) -> str | None:
    """Why a row breaks the schema (None when it is fine)."""
    from .harness import REQUIRED_KEYS

    if not isinstance(row, dict):
        return f"row is a {type(row).__name__}, not a dict"
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        return f"row lacks {missing}"
    for key in ("op", "case", "provider", "baseline", "dtype", "pass", "device"):
        if not isinstance(row[key], str):
            return f"{key} must be a str, got {row[key]!r}"
    for key in ("median_ms", "p20_ms", "p80_ms", "peak_mib"):
        if isinstance(row[key], bool) or not isinstance(row[key], (int, float)):
            return f"{key} must be a number, got {row[key]!r}"
    return None


def run_module(name: str, module, full: bool, device: str, notes: list[str], timeout: float | None) -> list[dict]:
    """The module's rows, schema-checked and tagged with `module`; failures become notes."""
    kwargs = {"notes": notes} if "notes" in inspect.signature(module.run).parameters else {}
    t0 = time.perf_counter()
    try:
        with time_limit(timeout):
            rows = list(module.run(full, device, **kwargs))
    except Exception as exc:  # noqa: BLE001 - one module's failure is reported, the rest still run
        last = traceback.extract_tb(exc.__traceback__)[-1:]
        where = f" at {Path(last[0].filename).name}:{last[0].lineno}" if last else ""
        notes.append(f"{name}: failed after {time.perf_counter() - t0:.0f} s ({type(exc).__name__}: {exc}{where})")
        return []
    good = []
    for row in rows:
        problem = check_row(row)
        if problem:
            notes.append(f"{name}: dropped a row ({problem})")
            continue
        row["module"] = name
        good.append(row)
    print(f"[benchmarks] {name}: {len(good)} rows in {time.perf_counter() - t0:.1f} s", flush=True)
    return good


def write_outputs(out_dir: Path, meta, notes, rows, compare: bool) -> None:
    from . import report

    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_json(out_dir / "results.json", meta, notes, rows)
    report.write_csv(out_dir / "results.csv", rows)
    (out_dir / "results.md").write_text(report.results_markdown(meta, notes, rows, compare))
    (out_dir / "summary.md").write_text(report.summary_markdown(meta, rows, compare))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny sizes on CPU: proves the harness (default)")
    mode.add_argument("--full", action="store_true", help="the real sizes on a CUDA GPU")
    p.add_argument("--ops", default=None, help="comma-separated modules, e.g. topk,monarch,snell,model (default: all)")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results/<card> for --full)")
    p.add_argument("--compare", default=None, metavar="OLD.json", help="add speed-up columns against an older run")
    p.add_argument("--device", default=None, help="override the device (quick: cpu, full: cuda)")
    p.add_argument("--module-timeout", type=float, default=None, help="seconds per module before it is abandoned")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds for the whole run: each module may use twice its fair share of what is left",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (quick on CPU defaults to 1)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument(
        "--from-json",
        default=None,
        metavar="RUN.json",
        help="measure nothing: re-render a saved run (with --compare: against another run) into --out",
    )
    return p.parse_args(argv)


def rerender(args) -> int:
    """Tables, plots and speed-up columns for a saved run, without measuring anything."""
    from . import report

    try:
        meta, notes, rows = report.load_run(args.from_json)
        old_rows = report.load_rows(args.compare) if args.compare else None
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for row in rows:
        problem = check_row(row)
        if problem:
            print(f"error: {args.from_json}: {problem}", file=sys.stderr)
            return 2
    report.add_ratios(rows)
    if old_rows is not None:
        meta["compare"] = {"file": str(args.compare), "matched_rows": report.add_compare(rows, old_rows)}
    out_dir = Path(args.out) if args.out else RESULTS_DIR / "_scratch" / "report"
    write_outputs(out_dir, meta, notes, rows, old_rows is not None)
    if not args.no_plots:
        for module in dict.fromkeys(r.get("module", "ops") for r in rows):
            report.plot_module(module, [r for r in rows if r.get("module", "ops") == module], out_dir, meta)
    print(f"[benchmarks] re-rendered {args.from_json} into {out_dir}")
    print()
    print(report.summary_markdown(meta, rows, old_rows is not None))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return rerender(args)
    full = bool(args.full)
    import torch

    device = args.device or ("cuda" if full else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print(f"error: device {device!r} needs a CUDA GPU (use --quick on a CPU machine)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        # Triton kernels can only run interpreted here; must be set before anything imports triton.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if torch.device(device).type == "cpu":
        # One thread: stable CPU timings on a shared machine (two threads thrash under load).
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)

    modules = available_modules()
    wanted = list(modules) if args.ops is None else [s.strip() for s in args.ops.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in modules]
    if unknown or not wanted:
        print(f"error: --ops {args.ops!r}: unknown {unknown}; choose from {', '.join(modules)}", file=sys.stderr)
        return 2

    from . import report

    old_rows = None
    if args.compare:
        try:
            old_rows = report.load_rows(args.compare)
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: --compare {args.compare}: {exc}", file=sys.stderr)
            return 2

    meta = run_meta(device, "full" if full else "quick")
    if torch.device(device).type == "cuda":
        # Lent GPU machines' hosts differ (session 8's took 1.6x session 7's host time for the same
        # kernels): host-bound rows compare across runs only next to these.
        meta["host_probe_us"] = host_probe(device)
    if args.out:
        out_dir = Path(args.out)
    elif full:
        out_dir = RESULTS_DIR / slug(meta["device_name"])
    else:
        out_dir = RESULTS_DIR / "_scratch" / f"quick-{slug(torch.device(device).type)}"
    print(f"[benchmarks] {meta['mode']} on {meta['device_name']} -> {out_dir}", flush=True)

    notes: list[str] = []
    rows: list[dict] = []
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    for index, name in enumerate(wanted):
        module = _import(name, modules[name], notes)
        if module is None:
            print(f"[benchmarks] {notes[-1]}", flush=True)
            continue
        limit = module_time_limit(args.module_timeout, deadline, len(wanted) - index)
        new = run_module(name, module, full, device, notes, limit)
        _release_device(device)
        for row in new:
            row.update({k: meta[k] for k in report.META_KEYS})
        rows.extend(new)
        notes.extend(f"ratio: {p}" for p in report.add_ratios(rows) if f"ratio: {p}" not in notes)
        if old_rows is not None:
            matched = report.add_compare(rows, old_rows)
            meta["compare"] = {"file": str(args.compare), "matched_rows": matched}
        meta["backends"] = _backend_state()
        write_outputs(out_dir, meta, notes, rows, old_rows is not None)
        if new and not args.no_plots:
            try:
                report.plot_module(name, new, out_dir, meta)
            except Exception as exc:  # noqa: BLE001 - a plot must not lose the numbers
                notes.append(f"{name}: plot failed ({type(exc).__name__}: {exc})")
    meta["pysnell_env"] = _pysnell_env()
    if "host_probe_us" in meta:  # again at the end: a host that got busier during the run shows here
        meta["host_probe_end_us"] = host_probe(device)
    write_outputs(out_dir, meta, notes, rows, old_rows is not None)
    for note in notes:
        print(f"[benchmarks] note: {note}")
    print(f"[benchmarks] wrote {', '.join(FILES)} and plot_<module>.png to {out_dir}")
    print()
    print(report.summary_markdown(meta, rows, old_rows is not None))
    return 0


def host_probe(device: str) -> dict | str:
    """µs per call of a few host primitives on this machine (benchmarks.host_profile's)."""
    try:
        import torch

        from .host_profile import _primitives

        return {name: round(us, 2) for name, us in _primitives(torch.device(device))}
    except Exception as exc:  # noqa: BLE001 - a probe must not stop the benchmarks
        return f"not measured ({type(exc).__name__}: {exc})"


def module_time_limit(cap: float | None, deadline: float | None, modules_left: int) -> float | None:
    """--module-timeout, tightened under --budget-s so that later modules keep some time."""
    if deadline is None:
        return cap
    left = deadline - time.monotonic()
    share = max(5.0, min(2 * left / modules_left, left - 10.0 * (modules_left - 1)))
    return share if cap is None else min(cap, share)


def _release_device(device: str) -> None:
    import gc

    import torch

    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _pysnell_env() -> dict | str:
    """pysnell's own report of its backends and toolchain (builds nothing), when it has one."""
    try:
        from pysnell import env

        return env.report()
    except Exception as exc:  # noqa: BLE001 - informational only
        return f"unavailable ({type(exc).__name__}: {exc})"


def _backend_state() -> dict:
    """Which pysnell backends loaded (without triggering a load) and which ran each op last."""
    try:
        from pysnell import _backend
    except Exception:  # noqa: BLE001
        return {}
    errors = getattr(_backend, "_load_errors", {})
    loaded = getattr(_backend, "_loaded", set())
    return {
        "loaded": {b: errors.get(b, "ok") for b in sorted(loaded)},
        "last_used": _backend.last_backend(),
    }
