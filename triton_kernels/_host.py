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
  paid once per specialisation, not per launch (every pysnell kernel launches through it); the
  specialisation key of a repeated launch comes from a binder generated per call site.
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
    specialisation only. The key of each launch comes from the call site's generated binder
    (`_binder`): the same facts in straight-line code, in under half the time of the per-argument
    loop (`values` + `key`).
    """
    if not relaunch_enabled() or callable(grid):
        return kernel[grid](*args, **kwargs)
    names = tuple(kwargs)
    site = _SITES.get((id(kernel), len(args), names))
    if site is None:
        if len(_SITES) >= MAX_SITES:  # kernels made at run time come and go: stay bounded
            _SITES.clear()
        site = _SITES[(id(kernel), len(args), names)] = _Site(kernel, args, kwargs)
    if not site.ok:
        return kernel[grid](*args, **kwargs)
    values, key = site.bind(args, kwargs)
    plans = site.bound_plans
    if key is None:  # an argument of another type than at the site's first call: the general key
        given = args + tuple(kwargs.values())
        values = site.values(given)
        key, plans = site.key(values, given), site.plans
    device = driver.active.get_current_device()
    try:
        compiled = plans.get((device, key)) if key is not None else None
    except TypeError:  # an unhashable constexpr or option: Triton's path
        key = compiled = None
    if compiled is None:
        compiled = kernel[grid](*args, **kwargs)
        if key is not None and _launchable(compiled):
            if len(plans) >= MAX_PLANS_PER_SITE:
                plans.clear()
            plans[(device, key)] = compiled
        return compiled
    stream = driver.active.get_current_stream(device)
    n = len(grid)
    # As JITFunction.run launches after its compile-cache hit (CompiledKernel.launch_metadata
    # returns None when there is no enter hook: skipped here, it is a call with every argument).
    enter_hook = knobs.runtime.launch_enter_hook
    launch_metadata = None if enter_hook is None else compiled.launch_metadata(grid, stream, *values)
    compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, compiled.function,
                 compiled.packed_metadata, launch_metadata, enter_hook, knobs.runtime.launch_exit_hook,
                 *values)  # fmt: skip
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
    compiled kernel per specialisation.

    `bind(args, kwargs)` is generated per site (Python source, as Triton generates its binder): it
    returns the parameter values in signature order and the specialisation key in straight-line code,
    under guards that each argument has the type it had at the site's first call (None for the key
    when a guard fails; `values` and `key` then compute the general key). It costs a fraction of the
    loop in `key`, which runs per argument."""

    def __init__(self, kernel, args: tuple, kwargs: dict):
        self.kernel = kernel  # keeps id(kernel) from being reused while this entry exists
        self.plans = {}  # (device, general key) -> compiled kernel
        self.bound_plans = {}  # (device, bind's key) -> compiled kernel: a key space of its own
        self.ok = False
        n_args, names = len(args), tuple(kwargs)
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
        self.bind = _binder(self, n_args, args + tuple(kwargs.values()))
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


def _never_bound(args, kwargs):
    return None, None


def _binder(site: _Site, n_args: int, given: tuple):
    """`bind(args, kwargs) -> (values, key | None)` for this site, generated from the first call.

    Per given argument (a default is the same object every call: neither guarded nor keyed):
    - constexpr or option: guard `type(v) is <its first type>`, key its value;
    - runtime tensor: guard isinstance Tensor, key its dtype and (as its flags allow) the 16-byte
      alignment of its address;
    - runtime int: guard `type(v) is int`, key ==1 and multiple of 16 (as its flags allow) and the
      32/64-bit range, as `key`;
    - runtime float, bool or None: guard the type (Triton types them without looking at the value);
    - anything else: no generated binder (the general key, which returns None for it: Triton's path).
    Plus Triton's debug and instrumentation knobs. The same facts as `key`, so the same decisions.
    """
    n_given = len(given)
    names = [f"g{i}" for i in range(n_given)]
    constexprs = set(site.constexprs)
    flags = {i: (specialise, align) for i, specialise, align in site.runtime}
    namespace = {"Tensor": torch.Tensor, "knobs": knobs}
    guards, key = [], []
    for param, src in enumerate(site.source):
        if src >= n_given:
            continue  # a default
        v, first = names[src], given[src]
        if param in constexprs:
            namespace[f"type_{src}"] = type(first)
            guards.append(f"type({v}) is type_{src}")
            key.append(v)
            continue
        specialise, align = flags[param]
        if isinstance(first, torch.Tensor):
            guards.append(f"isinstance({v}, Tensor)")
            key.append(f"{v}.dtype")
            if align:
                key.append(f"{v}.data_ptr() & 15 == 0")
        elif type(first) is int:
            guards.append(f"type({v}) is int")
            if specialise:
                key.append(f"{v} == 1")
            if align:
                key.append(f"{v} & 15 == 0")
            lo, hi, top = _INT_RANGE
            key += [f"{lo} <= {v} < {hi}", f"{v} < {top}"]
        elif first is None:
            guards.append(f"{v} is None")
        elif type(first) in (float, bool):
            guards.append(f"type({v}) is {type(first).__name__}")
        else:
            return _never_bound
    for src in site.options:
        namespace[f"type_{src}"] = type(given[src])
        guards.append(f"type({names[src]}) is type_{src}")
        key.append(names[src])
    key += ["knobs.runtime.debug", "knobs.compilation.instrumentation_mode"]
    namespace.update({f"default_{i}": d for i, d in enumerate(site.defaults)})
    values = [names[s] if s < n_given else f"default_{s - n_given}" for s in site.source]
    lines = ["def bind(args, kwargs):"]
    if n_args:
        lines.append(f"    {', '.join(names[:n_args])}, = args")
    if n_given > n_args:
        lines.append(f"    {', '.join(names[n_args:])}, = kwargs.values()")
    lines.append(f"    values = ({''.join(v + ', ' for v in values)})")
    lines.append(f"    if not ({' and '.join(guards) or 'True'}):")
    lines.append("        return values, None")
    lines.append(f"    return values, ({''.join(k + ', ' for k in key)})")
    name = getattr(getattr(site.kernel, "fn", None), "__name__", "kernel")
    exec(compile("\n".join(lines), f"<pysnell bind {name}>", "exec"), namespace)  # named for profiles
    return namespace["bind"]
