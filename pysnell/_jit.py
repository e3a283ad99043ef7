"""Build and load pysnell's CUDA extension (csrc/), lazily, on the first op on a CUDA tensor.

`load_cuda_backend` is registered with pysnell._backend as the "cuda" loader; it never runs at import.
It loads, in this order:
1. an ahead-of-time build installed with the package (`PYSNELL_BUILD_CUDA=1 pip install
   --no-build-isolation .`), if it was built from the current sources (the hash stamped beside it);
2. a JIT build from the versioned cache directory
   `$PYSNELL_CACHE_DIR` (default `~/.cache/pysnell`) / `<pysnell>-torch<v>-cu<v>-<arch>-<source hash>`,
   building it first with torch.utils.cpp_extension.load and ninja if it is not there.
Builds run inside our own file lock with a timeout (PYSNELL_BUILD_LOCK_TIMEOUT seconds, default 900):
a second process waits for the first one's build and then loads it instead of building again. The
lock is an OS lock that dies with its holder; torch's own lock file in the build directory does not,
so one found there while we hold ours was left by a killed build: it is removed, with a warning.
TORCH_CUDA_ARCH_LIST (default: the visible GPUs' archs only) and MAX_JOBS pass through to torch.

Every failure raises a CudaBackendError whose message says how to fix it; pysnell._backend records it,
and the ops fall back to Triton or torch with the same math and the same saved state.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import torch

from ._cuda_ops import apply_auto_preference
from .csrc import CXX_FLAGS as _CXX_FLAGS
from .csrc import NVCC_FLAGS as _NVCC_FLAGS
from .csrc import SOURCES, directory, hash_define, source_hash

log = logging.getLogger("pysnell")

LIBRARY_NAMESPACE = "pysnell_cuda"
DEFAULT_LOCK_TIMEOUT_S = 900.0
_MARKER = "pysnell_build.json"
_TORCH_LOCK = "lock"  # torch.utils.file_baton's lock file in the build directory

apply_auto_preference()  # measured "auto" winners (pysnell/_cuda_ops.py), in place before the first op

# What the last successful load did (read by `python -m pysnell.env` and the GPU tests).
last_load: dict = {}
_loaded_library: str | None = None


class CudaBackendError(RuntimeError):
    """The CUDA extension cannot be used; the message says why and how to fix it."""


class CudaUnavailable(CudaBackendError):
    pass


class NvccNotFound(CudaBackendError):
    pass


class CudaVersionMismatch(CudaBackendError):
    pass


class CudaBuildError(CudaBackendError):
    pass


class BuildLockTimeout(CudaBackendError):
    pass


_FALLBACK = "Until then pysnell runs these ops with Triton or torch (same results, slower)."


# ---- where things live


def cache_root() -> Path:
    env = os.environ.get("PYSNELL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pysnell"


def arch_tag() -> str:
    """The archs a build targets: TORCH_CUDA_ARCH_LIST when set, else the visible GPUs' (local arch only)."""
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if listed:
        return "arch" + re.sub(r"[^0-9A-Za-z.+]+", "_", listed)
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return "sm" + "_".join(f"{a}{b}" for a, b in caps)
    return "nogpu"


def build_key() -> str:
    from . import __version__

    parts = (__version__, f"torch{torch.__version__}", f"cu{torch.version.cuda}", arch_tag(), source_hash())
    return re.sub(r"[^0-9A-Za-z._+-]+", "_", "-".join(parts))


def build_dir() -> Path:
    return cache_root() / build_key()


def lock_path() -> Path:
    return cache_root() / f"{build_key()}.lock"


def lock_timeout() -> float:
    raw = os.environ.get("PYSNELL_BUILD_LOCK_TIMEOUT", "")
    try:
        return float(raw) if raw else DEFAULT_LOCK_TIMEOUT_S
    except ValueError:
        raise CudaBackendError(f"PYSNELL_BUILD_LOCK_TIMEOUT must be a number of seconds, got {raw!r}") from None


def aot_library() -> Path | None:
    """The ahead-of-time build's library inside the installed package, if there is one."""
    package = Path(__file__).resolve().parent
    for candidate in sorted(package.glob("_C*.so")) + sorted(package.glob("_C*.pyd")):
        return candidate
    return None


def aot_hash_file(library: Path) -> Path:
    return library.with_name(library.name + ".srchash")


# ---- toolchain checks (each one a separate function so tests can simulate failures)


def find_nvcc() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home:
        path = Path(home) / "bin" / "nvcc"
        if path.exists():
            return str(path)
    return shutil.which("nvcc")


def nvcc_version(nvcc: str) -> str | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def ninja_available() -> bool:
    from torch.utils import cpp_extension

    return cpp_extension.is_ninja_available()


def check_torch_cuda() -> None:
    if torch.version.cuda is None:
        raise CudaUnavailable(
            f"this torch ({torch.__version__}) was built without CUDA, so the CUDA extension cannot be built "
            "or run. Install a CUDA build of torch (https://pytorch.org/get-started/locally/)."
        )
    if not torch.cuda.is_available():
        raise CudaUnavailable(
            "no CUDA device is visible (torch.cuda.is_available() is False): check the driver and CUDA_VISIBLE_DEVICES."
        )


def check_toolchain() -> str:
    """Return nvcc's path, or raise with what to install."""
    want = torch.version.cuda
    nvcc = find_nvcc()
    if nvcc is None:
        raise NvccNotFound(
            f"nvcc was not found (CUDA_HOME={os.environ.get('CUDA_HOME')!r}, not on PATH), so the CUDA extension "
            f"cannot be JIT-built. Install the CUDA {want} toolkit (e.g. `conda install -c nvidia cuda-nvcc={want}` "
            f"or the NVIDIA installer) and set CUDA_HOME to it, or install pysnell with a prebuilt extension "
            f"(`PYSNELL_BUILD_CUDA=1 pip install --no-build-isolation .` on a machine with nvcc). {_FALLBACK}"
        )
    have = nvcc_version(nvcc)
    if have is None:
        raise NvccNotFound(
            f"`{nvcc} --version` failed: reinstall the CUDA {want} toolkit or fix CUDA_HOME. {_FALLBACK}"
        )
    if want and have.split(".")[0] != want.split(".")[0]:
        raise CudaVersionMismatch(
            f"nvcc {have} ({nvcc}) does not match the CUDA {want} this torch was built with: the major versions "
            f"must agree. Point CUDA_HOME at a CUDA {want.split('.')[0]}.x toolkit, or install a torch built for "
            f"CUDA {have}. {_FALLBACK}"
        )
    if not ninja_available():
        raise CudaBuildError(f"ninja is not installed: `pip install ninja`. {_FALLBACK}")
    return nvcc


# ---- build and load


def _load_library(path: str) -> None:
    global _loaded_library
    if _loaded_library is not None:
        if _loaded_library != path:
            raise CudaBackendError(
                f"another pysnell CUDA library ({_loaded_library}) is already loaded in this process; "
                "restart Python to load a different build"
            )
        return
    torch.ops.load_library(path)
    _loaded_library = path


def _compile(name: str, sources: list[str], build_directory: str, verbose: bool) -> str:
    """Run torch's JIT build (ninja); return the library path."""
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=[*_CXX_FLAGS, hash_define()],
        extra_cuda_cflags=[*_NVCC_FLAGS, hash_define()],
        extra_include_paths=[str(directory())],
        build_directory=build_directory,
        verbose=verbose,
        with_cuda=True,
        is_python_module=False,
    )


def _read_marker(directory_: Path) -> dict | None:
    try:
        marker = json.loads((directory_ / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not Path(str(marker.get("library", ""))).exists():
        return None
    return marker


def _remove_stale_torch_lock(directory_: Path) -> None:
    stale = directory_ / _TORCH_LOCK
    if stale.exists():
        log.warning(
            "pysnell: removed %s, a torch build lock left behind by a killed build (it would make every later "
            "build wait forever)",
            stale,
        )
        stale.unlink(missing_ok=True)


def _build_error(exc: BaseException, directory_: Path) -> CudaBuildError:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    shown = "\n".join((errors or lines)[-12:])
    return CudaBuildError(
        f"compiling pysnell's CUDA extension failed in {directory_}:\n{shown}\n"
        "Fix: check that nvcc matches torch's CUDA version and that the GPU arch is supported "
        "(TORCH_CUDA_ARCH_LIST), rerun with PYSNELL_VERBOSE_BUILD=1 for the full log, and report the error. "
        f"{_FALLBACK}"
    )


def _build_locked(timeout: float) -> dict:
    """Build (or find) the JIT library under our lock; return the marker dict."""
    from filelock import FileLock, Timeout

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    lock_file = lock_path()
    owner_file = lock_file.with_name(lock_file.name + ".owner")
    directory_ = build_dir()
    waited = time.perf_counter()
    lock = FileLock(str(lock_file), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        try:
            owner = owner_file.read_text().strip()
        except OSError:
            owner = "unknown"
        raise BuildLockTimeout(
            f"waited {timeout:.0f} s for the build lock {lock_file} (held by {owner}). Another process is building "
            "pysnell's CUDA extension, or its build hung: wait for it, kill it, or raise PYSNELL_BUILD_LOCK_TIMEOUT. "
            "The lock is released automatically when its holder exits. "
            f"{_FALLBACK}"
        ) from None
    try:
        waited = time.perf_counter() - waited
        owner_file.write_text(f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n")
        marker = _read_marker(directory_)
        if marker is not None:  # built by an earlier run or by the process we waited for
            return dict(marker, built=False, waited_s=round(waited, 3))
        directory_.mkdir(parents=True, exist_ok=True)
        _remove_stale_torch_lock(directory_)
        sources = [str(directory() / name) for name in SOURCES]
        verbose = os.environ.get("PYSNELL_VERBOSE_BUILD", "0") == "1"
        log.warning("pysnell: building the CUDA extension in %s (first use; takes a minute or two)", directory_)
        start = time.perf_counter()
        try:
            library = _compile(f"pysnell_cuda_{source_hash()}", sources, str(directory_), verbose)
        except Exception as exc:  # noqa: BLE001 - any compiler/linker failure
            raise _build_error(exc, directory_) from exc
        seconds = time.perf_counter() - start
        if not isinstance(library, str) or not Path(library).exists():
            raise CudaBuildError(f"the build in {directory_} produced no library ({library!r}). {_FALLBACK}")
        marker = {"library": library, "build_seconds": round(seconds, 2), "key": build_key(), "hash": source_hash()}
        (directory_ / _MARKER).write_text(json.dumps(marker))
        log.info("pysnell: built the CUDA extension in %.1f s", seconds)
        return dict(marker, built=True, waited_s=round(waited, 3))
    finally:
        owner_file.unlink(missing_ok=True)
        lock.release()


def _try_aot() -> dict | None:
    library = aot_library()
    if library is None:
        return None
    try:
        stamped = aot_hash_file(library).read_text().strip()
    except OSError:
        stamped = None
    if stamped != source_hash():
        log.warning(
            "pysnell: ignoring the ahead-of-time CUDA build %s: it was built from other sources (hash %s, now %s)",
            library,
            stamped,
            source_hash(),
        )
        return None
    return {"library": str(library), "built": False, "aot": True, "hash": stamped}


def ensure_library() -> dict:
    """Load the CUDA library (AOT build, cached JIT build, or a fresh JIT build); return what happened."""
    check_torch_cuda()
    info = _try_aot()
    if info is None:
        check_toolchain()
        info = _build_locked(lock_timeout())
        info["aot"] = False
    _load_library(info["library"])
    got = torch.ops.pysnell_cuda.build_info()
    if got != source_hash():
        raise CudaBackendError(f"loaded {info['library']} but it reports source hash {got}, expected {source_hash()}")
    last_load.clear()
    last_load.update(info)
    return info


def load_cuda_backend() -> None:
    """The "cuda" loader for pysnell._backend: load the library and register its ops."""
    try:
        ensure_library()
    except CudaBackendError as exc:
        log.warning("pysnell: CUDA backend unavailable: %s", exc)
        raise
    from . import _cuda_ops

    _cuda_ops.register()


def built_state() -> dict:
    """What exists without building anything (for `python -m pysnell.env`)."""
    state = {"cache_dir": str(build_dir()), "jit_built": False, "aot_library": None, "aot_current": False}
    marker = _read_marker(build_dir())
    if marker is not None:
        state["jit_built"] = True
        state["jit_library"] = marker["library"]
        state["jit_build_seconds"] = marker.get("build_seconds")
    library = aot_library()
    if library is not None:
        state["aot_library"] = str(library)
        try:
            state["aot_current"] = aot_hash_file(library).read_text().strip() == source_hash()
        except OSError:
            state["aot_current"] = False
    state["loaded"] = _loaded_library
    return state
