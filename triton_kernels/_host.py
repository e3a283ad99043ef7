"""Integer helpers for host code.

`triton.cdiv` and `triton.next_power_of_2` are constexpr functions in Triton 3.x: a host call costs
a few µs (argument unwrapping), about 150× a plain integer expression, and a layer's fwd+bwd makes
dozens of them. Kernels keep using `tl.cdiv`; host code uses these.
"""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ≥ n (n ≥ 1), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
