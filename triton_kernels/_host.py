"""Host-side helpers shared by the kernel families.

- `cdiv` and `next_pow2`: `triton.cdiv` and `triton.next_power_of_2` are constexpr functions in
  Triton 3.x; a host call costs a few µs (argument unwrapping), about 150× a plain integer
  expression, and a layer's fwd+bwd makes dozens of them. Kernels keep using `tl.cdiv`.
- `interpreting()`: whether the kernels run under the Triton interpreter (tile choices differ).
- `sm_count`: a CUDA device's streaming multiprocessors (grid sizing), cached per device.
- `KernelConstant`: a module-level constant for kernels. Before every launch Triton checks that
  each global constant a kernel uses still has the value it was compiled with (`new != old` per
  constant), and `tl.constexpr.__ne__` costs about 1 µs: the top-k round kernel, with 22 such
  constants, spent ~20 of its ~30 µs of launch overhead there. A KernelConstant's `!=` against
  another one is a plain value comparison; everywhere else (inside kernels, in the compile cache
  key) it is an ordinary `tl.constexpr`.
- `Relaunch`: launches of one kernel within one host call with Triton's Python launch path paid
  once (top-k's rounds launch the same kernel up to six times per call).
"""

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from triton.runtime import driver

try:
    from triton import knobs
except ImportError:  # Triton < 3.4 (no relaunch there)
    knobs = None

from pysnell import _backend

# Triton picks the interpreter when a kernel is decorated (at import), so this is fixed per process.
INTERPRETED = _backend.triton_interpret()


def interpreting() -> bool:
    return INTERPRETED


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ≥ n (n ≥ 1), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (an index-less device means the current one)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


class KernelConstant(tl.constexpr):
    """A tl.constexpr whose `!=` against another KernelConstant (the launch-time check) is a plain
    value comparison."""

    def __ne__(self, other):
        if type(other) is KernelConstant:
            return self.value != other.value
        return super().__ne__(other)


# --------------------------------------------------------------------------------------------------
# Relaunch: repeated launches of one kernel without Triton's Python launch path.

RELAUNCH_ENV = "PYSNELL_TRITON_RELAUNCH"
# The launch statement below is JITFunction.run's in these Triton releases (checked by
# tests/test_triton_launch.py); other releases take Triton's own path every time.
RELAUNCH_TRITON = ("3.6",)
_relaunch = {
    "on": os.environ.get(RELAUNCH_ENV, "1").strip() != "0",
    "supported": knobs is not None and ".".join(triton.__version__.split(".")[:2]) in RELAUNCH_TRITON,
}


def set_relaunch(on: bool) -> None:
    """Whether Relaunch may skip Triton's launch path (PYSNELL_TRITON_RELAUNCH=0 sets False), for
    measurements and as a way out."""
    _relaunch["on"] = bool(on)


@contextlib.contextmanager
def use_relaunch(on: bool):
    """set_relaunch for a block, restoring the previous setting after it."""
    before = _relaunch["on"]
    set_relaunch(on)
    try:
        yield
    finally:
        _relaunch["on"] = before


def relaunch_state() -> str:
    """One line for `python -m pysnell.env`: whether repeated launches skip Triton's launch path."""
    if not _relaunch["supported"]:
        return f"off (written for Triton {', '.join(RELAUNCH_TRITON)}, this is {triton.__version__})"
    if not _relaunch["on"]:
        return f"off ({RELAUNCH_ENV}=0 or set_relaunch(False))"
    return "on (GPU launches)" if not INTERPRETED else "on, unused under the interpreter"


def relaunch_enabled() -> bool:
    return _relaunch["on"] and _relaunch["supported"] and not INTERPRETED


class Relaunch:
    """Launches of one Triton kernel within one host call: `Relaunch(kernel)[grid](*args, **kwargs)`.

    Every launch through `kernel[grid]` runs ~15 µs of Python before the driver call (argument
    binding, specialisation, compile-cache lookup, global-constant checks; benchmarks/launch_cost.py).
    The first launch here takes that path and keeps the compiled kernel it returns. A later launch
    whose arguments specialise exactly as that one's did launches the compiled kernel directly, with
    the statements JITFunction.run ends with. "Exactly": bound the same way (same positional count,
    same keywords), equal options and constexprs of the same type, and every other argument that is
    not the same object specialised by Triton's own function (the binder's, with the parameter's
    flags) to the same result. Anything else, a callable grid or another device takes the full path.
    Make one per host call: it holds the first launch's arguments until it is dropped, and takes a
    tensor passed again as the same object to specialise as before (do not set_/resize_ it between).
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.replays = 0  # launches that skipped Triton's path (tests count them)
        self._first = None  # _FirstLaunch, once a launch went through Triton's path

    def __getitem__(self, grid):
        return functools.partial(self._launch, grid)

    def _launch(self, grid, *args, **kwargs):
        replayable = relaunch_enabled() and not callable(grid)
        first = self._first
        if replayable and first is not None:
            values = first.values_for(args, kwargs)
            if values is not None and first.specialises_alike(values):
                device = driver.active.get_current_device()
                if device == first.device:
                    kernel = first.compiled
                    stream = driver.active.get_current_stream(device)
                    g = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
                    # As JITFunction.run launches after its compile-cache hit.
                    launch_metadata = kernel.launch_metadata(grid, stream, *values)
                    kernel.run(*g, stream, kernel.function, kernel.packed_metadata, launch_metadata,
                               knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *values)  # fmt: skip
                    self.replays += 1
                    return kernel
        compiled = self.kernel[grid](*args, **kwargs)
        if replayable and first is None:
            self._first = _FirstLaunch.of(self.kernel, args, kwargs, compiled)
        return compiled


_NO_DEFAULT = object()
_SIGNATURES: dict = {}


def _signature(kernel):
    """(parameters, their names, per parameter the binder's flags: is_constexpr, is_const,
    specialise, align), read once per kernel."""
    sig = _SIGNATURES.get(kernel)
    if sig is None:
        params = tuple(kernel.params)
        flags = tuple(
            (p.is_constexpr, p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment) for p in params
        )
        sig = _SIGNATURES[kernel] = (params, frozenset(p.name for p in params), flags)
    return sig


class _FirstLaunch:
    """A launch that went through Triton's path: its compiled kernel, how its call bound to the
    kernel's parameters, every parameter's value, and what specialising one more value needs."""

    @classmethod
    def of(cls, kernel, args, kwargs, compiled):
        """None where a replay cannot be exact or this Triton is not the one the replay mirrors."""
        try:
            if compiled is None or kernel.pre_run_hooks or not hasattr(compiled, "packed_metadata"):
                return None
            self = cls()
            self.device = driver.active.get_current_device()
            _, _, _, self.backend, binder = kernel.device_caches[self.device]
            self.specialize = binder.__globals__["specialize_impl"]
            params, names, self.flags = _signature(kernel)
            if len(args) > len(params):
                return None
            # parameters after the positional ones: (name, from kwargs?, default)
            self.tail = tuple(
                (p.name, p.name in kwargs, p.default if p.has_default else _NO_DEFAULT) for p in params[len(args) :]
            )
            if any(not given and default is _NO_DEFAULT for _, given, default in self.tail):
                return None
            self.n_args = len(args)
            self.keys = tuple(kwargs)
            self.options = tuple((k, v) for k, v in kwargs.items() if k not in names)
            self.compiled = compiled
            self.values = self.values_for(args, kwargs)
            return self if self.values is not None else None
        except (AttributeError, KeyError, TypeError, ValueError):  # another Triton: its own path always
            return None

    def values_for(self, args, kwargs):
        """Every parameter's value in signature order (as the binder lists them), or None when the
        call binds differently or its options differ."""
        if len(args) != self.n_args or tuple(kwargs) != self.keys:
            return None
        for k, v in self.options:
            new = kwargs[k]
            if type(new) is not type(v) or new != v:
                return None
        return [*args, *(kwargs[name] if given else default for name, given, default in self.tail)]

    def specialises_alike(self, values) -> bool:
        specialize, backend = self.specialize, self.backend
        for new, old, (is_constexpr, is_const, spec, align) in zip(values, self.values, self.flags):
            if new is old:
                continue
            if is_constexpr:
                if type(new) is not type(old) or new != old:
                    return False
            elif specialize(backend, new, is_const, spec, align) != specialize(backend, old, is_const, spec, align):
                return False
        return True
