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
- `launch(kernel, grid, *args, **kwargs)`: `kernel[grid](...)` with Triton's Python launch path
  paid once per specialisation, not per launch (every pysnell kernel launches through it).
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
# launch: Triton's Python launch path paid once per specialisation, not once per launch.

RELAUNCH_ENV = "PYSNELL_TRITON_RELAUNCH"
# The launch statement below is JITFunction.run's in these Triton releases (checked by
# tests/test_triton_launch.py); other releases take Triton's own path every time.
RELAUNCH_TRITON = ("3.6",)
_relaunch = {
    "on": os.environ.get(RELAUNCH_ENV, "1").strip() != "0",
    "supported": knobs is not None and ".".join(triton.__version__.split(".")[:2]) in RELAUNCH_TRITON,
}
MAX_PLANS_PER_SITE = 64  # compiled kernels remembered per call shape (cleared when full)
MAX_SITES = 1024  # call shapes remembered (cleared when full)
replays = 0  # launches that skipped Triton's path (tests and benchmarks read it)
_observer = None  # tests: called as (kernel, grid, args, kwargs) after each replayed launch


def set_relaunch(on: bool) -> None:
    """Whether `launch` may skip Triton's launch path (PYSNELL_TRITON_RELAUNCH=0 sets False), for
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
    """One line for `python -m pysnell.env`: whether launches skip Triton's launch path."""
    if not _relaunch["supported"]:
        return f"off (written for Triton {', '.join(RELAUNCH_TRITON)}, this is {triton.__version__})"
    if not _relaunch["on"]:
        return f"off ({RELAUNCH_ENV}=0 or set_relaunch(False))"
    return "on (GPU launches)" if not INTERPRETED else "on, unused under the interpreter"


def relaunch_enabled() -> bool:
    return _relaunch["on"] and _relaunch["supported"] and not INTERPRETED


def launch(kernel, grid, *args, **kwargs):
    """`kernel[grid](*args, **kwargs)`, with Triton's Python launch path run once per specialisation.

    Every launch through `kernel[grid]` runs Python before the driver call (argument binding,
    specialisation, the compile-cache lookup, global-constant checks): an empty kernel with 31
    arguments took 26 µs to launch on an H200 machine's host (benchmarks/host_profile.py), and a SNELL
    or Monarch layer step makes 5 to 8 launches. Here the first launch of each specialisation takes
    Triton's path and its compiled kernel is kept; a later launch that specialises alike launches it
    directly, with the statements JITFunction.run ends with. "Alike": the same call shape (positional
    count, keyword names), equal constexprs and options of the same types, Triton's debug and
    instrumentation knobs unchanged, the same current device, and per runtime argument a key at least
    as fine as Triton's own specialisation under the parameter's do_not_specialize flags (tensor:
    dtype and 16-byte alignment; int: ==1, multiple of 16, 32/64-bit range; float, bool, None: the
    type). Anything else (a callable grid, an argument of another type, another Triton, the
    interpreter, PYSNELL_TRITON_RELAUNCH=0) takes Triton's path. Kernel globals are compile-time
    constants here: Triton's check that they did not change runs on the first launch of each
    specialisation only.
    """
    if not relaunch_enabled() or callable(grid):
        return kernel[grid](*args, **kwargs)
    names = tuple(kwargs)
    site = _SITES.get((id(kernel), len(args), names))
    if site is None:
        if len(_SITES) >= MAX_SITES:  # kernels made at run time come and go: stay bounded
            _SITES.clear()
        site = _SITES[(id(kernel), len(args), names)] = _Site(kernel, len(args), names)
    if not site.ok:
        return kernel[grid](*args, **kwargs)
    given = args + tuple(kwargs.values())
    values = site.values(given)
    key = site.key(values, given)
    device = driver.active.get_current_device()
    try:
        compiled = site.plans.get((device, key)) if key is not None else None
    except TypeError:  # an unhashable constexpr or option: Triton's path
        key = compiled = None
    if compiled is None:
        compiled = kernel[grid](*args, **kwargs)
        if key is not None and _launchable(compiled):
            if len(site.plans) >= MAX_PLANS_PER_SITE:
                site.plans.clear()
            site.plans[(device, key)] = compiled
        return compiled
    stream = driver.active.get_current_stream(device)
    n = len(grid)
    # As JITFunction.run launches after its compile-cache hit.
    launch_metadata = compiled.launch_metadata(grid, stream, *values)
    compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, compiled.function,
                 compiled.packed_metadata, launch_metadata, knobs.runtime.launch_enter_hook,
                 knobs.runtime.launch_exit_hook, *values)  # fmt: skip
    global replays
    replays += 1
    if _observer is not None:
        _observer(kernel, grid, args, kwargs)
    return compiled


def _launchable(compiled) -> bool:
    return compiled is not None and not hasattr(compiled, "result") and hasattr(compiled, "packed_metadata")


_SITES: dict = {}  # (id(kernel), positional count, keyword names) -> _Site (each holds its kernel)
_INT_RANGE = (-(2**31), 2**31, 2**63)


class _Site:
    """One call shape of a kernel: where each parameter's value comes from (a positional argument, a
    keyword or the default), which parameters are constexprs, which keywords are options, and the
    compiled kernel per specialisation."""

    def __init__(self, kernel, n_args: int, names: tuple):
        self.kernel = kernel  # keeps id(kernel) from being reused while this entry exists
        self.plans = {}
        self.ok = False
        params = getattr(kernel, "params", None)
        if params is None or getattr(kernel, "pre_run_hooks", None) or n_args > len(params):
            return  # not a JITFunction (a stub, a wrapper) or one with hooks: Triton's path always
        kw_index = {name: n_args + i for i, name in enumerate(names)}
        param_names = {p.name for p in params}
        defaults, source = [], []
        for i, p in enumerate(params):
            if i < n_args:
                source.append(i)
            elif p.name in kw_index:
                source.append(kw_index[p.name])
            elif p.has_default:
                source.append(n_args + len(names) + len(defaults))
                defaults.append(p.default)
            else:
                return  # a missing argument: Triton's path raises its own error
        self.defaults = tuple(defaults)
        self.source = tuple(source)
        self.constexprs = tuple(i for i, p in enumerate(params) if p.is_constexpr)
        # runtime parameters with Triton's flags: values specialise (==1, divisibility) and on alignment
        self.runtime = tuple(
            (i, not p.do_not_specialize, not p.do_not_specialize and not p.do_not_specialize_on_alignment)
            for i, p in enumerate(params)
            if not p.is_constexpr
        )
        self.options = tuple(kw_index[name] for name in names if name not in param_names)
        self.ok = True

    def values(self, given: tuple) -> list:
        """Every parameter's value in signature order, as the binder lists them."""
        full = given + self.defaults
        return [full[i] for i in self.source]

    def key(self, values: list, given: tuple):
        """What the compiled kernel depends on, or None for an argument type this does not model."""
        fixed = tuple([values[i] for i in self.constexprs] + [given[i] for i in self.options])
        parts = [fixed, tuple(map(type, fixed)), knobs.runtime.debug, knobs.compilation.instrumentation_mode]
        lo, hi, top = _INT_RANGE
        for i, specialise, align in self.runtime:
            v = values[i]
            t = type(v)
            if t is int:
                parts.append((specialise and v == 1, align and v & 15 == 0, lo <= v < hi, v < top))
            elif t is float or t is bool or v is None:
                parts.append(t)
            elif isinstance(v, torch.Tensor):
                parts.append((v.dtype, align and v.data_ptr() & 15 == 0))
            else:
                return None
        return tuple(parts)
