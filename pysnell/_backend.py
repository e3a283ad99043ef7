"""Backend selection: which implementation (cuda, triton, torch) runs an op.

Every op family registers one implementation per backend under an op name
("topk.select", "monarch.forward", ...). The autograd Functions ask `pick(op,
tensor)` which one to run. The choice changes speed only: every backend
computes the same math and the Functions save the same state.

Order for CUDA tensors under "auto": built CUDA extension -> Triton -> torch.
CPU tensors use torch, or Triton when TRITON_INTERPRET=1 and the backend is
forced to "triton" (that is how CI tests the kernels without a GPU).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import torch

log = logging.getLogger("pysnell")

BACKENDS = ("auto", "cuda", "triton", "torch")

_registry: dict[str, dict[str, Callable]] = {}
# Loaders for optional backends: called once, on the first op that could use them.
_loaders: dict[str, Callable[[], None]] = {}
_loaded: set[str] = set()
_load_errors: dict[str, str] = {}
_last_used: dict[str, str] = {}
_warned: set[tuple] = set()
_lock = threading.Lock()
# Ops whose "auto" choice was measured to prefer another backend than the default order: per op, size
# tiers ((largest size or None, order), ...), smallest first; a plain order is one tier for every size.
_auto_preference: dict[str, tuple[tuple[int | None, tuple[str, ...]], ...]] = {}


def _env_backend() -> str:
    name = os.environ.get("PYSNELL_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"PYSNELL_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


_current = _env_backend()


def set_backend(name: str) -> None:
    """Force a backend for every op: "auto", "cuda", "triton" or "torch"."""
    global _current
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _current = name.lower()


def get_backend() -> str:
    """The backend requested by set_backend / PYSNELL_BACKEND (may be "auto")."""
    return _current


def last_backend(op: str | None = None):
    """Which backend ran `op` last (or a dict of all ops when op is None)."""
    if op is None:
        return dict(_last_used)
    return _last_used.get(op)


def register(op: str, backend: str, fn: Callable) -> None:
    if backend not in BACKENDS[1:]:
        raise ValueError(f"unknown backend {backend!r}")
    _registry.setdefault(op, {})[backend] = fn


def register_loader(backend: str, loader: Callable[[], None]) -> None:
    """A callable that imports a backend's kernels and registers them (run lazily)."""
    _loaders[backend] = loader


def set_auto_preference(op: str, order) -> None:
    """Override the "auto" order for one op (decided by measurement, see README).

    `order` is a backend order, e.g. ("triton", "torch"), or size tiers
    ((limit, order), ..., (None, order)): the first tier whose limit is at least the problem size that
    the op's caller passes to `pick` (the op decides what size means: weight entries, tokens)."""
    if order and isinstance(order[0], str):
        order = ((None, tuple(order)),)
    tiers = tuple((limit, tuple(names)) for limit, names in order)
    limits = [limit for limit, _ in tiers]
    if not tiers or limits[-1] is not None or None in limits[:-1] or limits[:-1] != sorted(limits[:-1]):
        raise ValueError(f"order for {op}: tiers must rise and end with (None, order), got {order!r}")
    for _, names in tiers:
        unknown = [b for b in names if b not in BACKENDS or b == "auto"]
        if unknown or not names:
            raise ValueError(f"order for {op}: unknown backends {unknown} in {names!r}")
    _auto_preference[op] = tiers


def _auto_order(op: str, size: int | None) -> tuple[str, ...]:
    for limit, order in _auto_preference.get(op, ((None, ("cuda", "triton", "torch")),)):
        if limit is None or (size is not None and size <= limit):
            return order
    raise AssertionError("unreachable: the last tier has no limit")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _ensure_loaded(backend: str) -> bool:
    if backend in _loaded:
        return backend not in _load_errors
    with _lock:
        if backend in _loaded:
            return backend not in _load_errors
        loader = _loaders.get(backend)
        if loader is None:
            _load_errors[backend] = "not part of this build"
        else:
            try:
                loader()
            except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
                _load_errors[backend] = f"{type(exc).__name__}: {exc}"
        _loaded.add(backend)
    return backend not in _load_errors


def load_error(backend: str) -> str | None:
    _ensure_loaded(backend)
    return _load_errors.get(backend)


def _device_ok(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "cuda":
        return device.type == "cuda"
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpret())
    return False


def available(op: str, backend: str, device: torch.device) -> bool:
    if backend != "torch" and not _ensure_loaded(backend):
        return False
    return backend in _registry.get(op, {}) and _device_ok(backend, device)


def _warn_once(key: tuple, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)


def pick(op: str, device: torch.device, size: int | None = None) -> tuple[str, Callable]:
    """Return (backend name, implementation) for `op` on `device`. `size` selects the op's "auto"
    tier where the measured winner depends on the problem size (None: the largest tier)."""
    wanted = _current
    if wanted == "auto":
        if device.type == "cuda":
            order = _auto_order(op, size)
        else:
            order = ("torch",)
    else:
        order = (wanted, "torch") if wanted != "torch" else ("torch",)
    for backend in order:
        if available(op, backend, device):
            if wanted not in ("auto", backend):
                reason = _load_errors.get(wanted) or f"no {wanted} kernel for {op} on {device.type}"
                _warn_once(
                    (op, wanted, device.type),
                    f"pysnell: {op} falls back from {wanted} to {backend} ({reason})",
                )
            _last_used[op] = backend
            return backend, _registry[op][backend]
    raise RuntimeError(f"pysnell: no implementation of {op} for device {device}")
