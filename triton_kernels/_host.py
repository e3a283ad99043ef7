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
"""

import functools

import torch
import triton.language as tl

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
