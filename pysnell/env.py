"""`python -m pysnell.env`: which backends exist, are built and are usable here, with versions and the GPU.

Nothing is built unless asked: `--build` loads (and if needed JIT-builds) the CUDA extension and
reports how long that took. `--json` prints the report as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

# Every environment variable pysnell reads (the README's table says what each does).
ENV_VARS = (
    "PYSNELL_BACKEND",
    "PYSNELL_CACHE_DIR",
    "PYSNELL_BUILD_LOCK_TIMEOUT",
    "PYSNELL_VERBOSE_BUILD",
    "PYSNELL_BUILD_CUDA",
    "PYSNELL_MONARCH_PATH",
    "PYSNELL_MONARCH_STORE",
    "PYSNELL_TRITON_RELAUNCH",
    "TORCH_CUDA_ARCH_LIST",
    "MAX_JOBS",
    "TRITON_INTERPRET",
)


def _triton_state(torch) -> dict:
    from . import _backend

    state = {"installed": False, "version": None, "interpreter": _backend.triton_interpret()}
    try:
        import triton
    except Exception as exc:  # noqa: BLE001 - any import failure means "not installed"
        state["error"] = f"{type(exc).__name__}: {exc}"
        return state
    state["installed"] = True
    state["version"] = getattr(triton, "__version__", "?")
    error = _backend.load_error("triton")
    state["kernels_loaded"] = error is None
    if error is not None:
        state["error"] = error
    else:  # a family whose module failed to load leaves its ops to the other backends
        from .triton_kernels import FAMILY_ERRORS, _host

        state["family_errors"] = dict(FAMILY_ERRORS)
        state["relaunch"] = _host.relaunch_state()
    state["ops"] = sorted(op for op, impls in _backend._registry.items() if "triton" in impls)
    if torch.cuda.is_available():
        state["usable"] = error is None
        state["where"] = "GPU"
    else:
        state["usable"] = error is None and state["interpreter"]
        state["where"] = "CPU via the interpreter (TRITON_INTERPRET=1)" if state["interpreter"] else "needs a GPU"
    return state


def _cuda_state(torch, build: bool) -> dict:
    from . import _cuda_ops, _jit

    state = {
        "torch_cuda": torch.version.cuda,
        "ops": list(_cuda_ops.OPS),
        "cuda_home": None,
        "nvcc": None,
        "nvcc_version": None,
        "ninja": False,
    }
    try:
        from torch.utils import cpp_extension

        state["cuda_home"] = cpp_extension.CUDA_HOME
        state["ninja"] = bool(cpp_extension.is_ninja_available())
        nvcc = _jit.find_nvcc()
        state["nvcc"] = nvcc
        state["nvcc_version"] = _jit.nvcc_version(nvcc) if nvcc else None
    except Exception as exc:  # noqa: BLE001 - report, do not fail
        state["toolchain_error"] = f"{type(exc).__name__}: {exc}"
    state.update(_jit.built_state())
    state["source_hash"] = _jit.source_hash()
    problem = None
    try:
        _jit.check_torch_cuda()
        if not state["aot_current"]:
            _jit.check_toolchain()
    except _jit.CudaBackendError as exc:
        problem = str(exc)
    state["buildable"] = problem is None
    if problem:
        state["problem"] = problem
    if build and problem is None:
        from . import _backend

        error = _backend.load_error("cuda")
        state["usable"] = error is None
        state["load"] = dict(_jit.last_load)
        if error:
            state["problem"] = error
    else:
        state["usable"] = None if problem is None else False
    return state


def report(build: bool = False) -> dict:
    import torch

    from . import __version__, _backend

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            gpus.append({"index": i, "name": torch.cuda.get_device_name(i), "capability": f"{major}.{minor}"})
    return {
        "pysnell": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": gpus,
        "backend_setting": _backend.get_backend(),
        "auto_order_cuda": ["cuda", "triton", "torch"],
        "auto_preference": {op: list(order) for op, order in _backend._auto_preference.items()},
        "env": {k: os.environ.get(k) for k in ENV_VARS},
        "backends": {
            "torch": {"usable": True, "what": "pure-PyTorch reference, always available"},
            "triton": _triton_state(torch),
            "cuda": _cuda_state(torch, build),
        },
    }


def _yes(v) -> str:
    return {True: "yes", False: "no", None: "not checked"}[v]


def format_report(r: dict) -> str:
    lines = [
        f"pysnell {r['pysnell']}  (python {r['python']}, {r['platform']})",
        f"torch {r['torch']}  CUDA: {r['torch_cuda'] or 'none (CPU build)'}  "
        f"device available: {_yes(r['cuda_available'])}",
    ]
    if r["gpus"]:
        for g in r["gpus"]:
            lines.append(f"GPU {g['index']}: {g['name']} (compute capability {g['capability']})")
    else:
        lines.append("GPU: none")
    lines.append(f"backend setting: {r['backend_setting']} (PYSNELL_BACKEND / pysnell.set_backend)")
    pref = r["auto_preference"]
    lines.append(
        "auto order on CUDA tensors: cuda -> triton -> torch"
        + (f"; measured overrides: {pref}" if pref else " (no measured overrides)")
        + "; CPU tensors: torch"
    )
    settings = {k: v for k, v in r["env"].items() if v is not None}
    shown = ", ".join(f"{k}={v}" for k, v in settings.items())
    lines.append("environment: " + (shown or "none of the variables in the README's table is set"))
    lines.append("")
    lines.append("torch  : usable (reference implementation of every op)")
    t = r["backends"]["triton"]
    if not t["installed"]:
        lines.append(f"triton : not installed ({t.get('error', '')})")
    else:
        lines.append(
            f"triton : {t['version']}, kernels loaded: {_yes(t.get('kernels_loaded'))}, "
            f"interpreter mode: {'on' if t['interpreter'] else 'off'}, usable: {_yes(t.get('usable'))} ({t['where']})"
        )
        lines.append(f"         ops: {', '.join(t.get('ops', [])) or 'none'}")
        if t.get("relaunch"):
            lines.append(f"         direct launches (Triton's launch path once per specialisation): {t['relaunch']}")
        if t.get("error"):
            lines.append(f"         error: {t['error']}")
        for family, reason in t.get("family_errors", {}).items():
            lines.append(f"         {family} kernels failed to load: {reason}")
    c = r["backends"]["cuda"]
    lines.append(
        f"cuda   : torch CUDA {c['torch_cuda'] or 'none'}, nvcc: {c['nvcc'] or 'not found'}"
        + (f" ({c['nvcc_version']})" if c.get("nvcc_version") else "")
        + f", ninja: {_yes(c['ninja'])}"
    )
    aot = c["aot_library"]
    lines.append(
        "         ahead-of-time build: "
        + (f"{aot} ({'current' if c['aot_current'] else 'stale: built from other sources'})" if aot else "none")
    )
    jit = f"built ({c.get('jit_build_seconds')} s)" if c["jit_built"] else "not built yet (builds on first CUDA op)"
    lines.append(f"         JIT cache: {c['cache_dir']}: {jit}")
    lines.append(f"         sources: {c['source_hash']}, ops: {', '.join(c['ops'])}")
    if c.get("load"):
        lines.append(f"         loaded now: {c['load']}")
    lines.append(f"         buildable: {_yes(c['buildable'])}, usable: {_yes(c['usable'])}")
    if c.get("problem"):
        lines.append(f"         why not: {c['problem']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pysnell.env", description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="load (JIT-building if needed) the CUDA extension now")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    r = report(build=args.build)
    print(json.dumps(r, indent=2, default=str) if args.json else format_report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
