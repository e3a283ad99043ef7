"""Triton helpers shared by the two exact selections (top-k masking and the SNELL threshold).

Both rank |x| in float32 with NaN below every number (the references' rule) through the same
order-preserving integer key, and both interpolate torch.quantile's two order statistics with
reference.lerp's formula.
"""

import triton
import triton.language as tl


@triton.jit
def magnitude_key(v):
    """uint31 ranking key of |v| as int32: NaN -> 0, otherwise the fp32 bits of |v| + 1."""
    bits = v.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.where(bits > 0x7F800000, 0, bits + 1)


@triton.jit
def key_to_float(key):
    """The float32 ranking value of a key (the NaN key -> -1.0, as the references rank NaN)."""
    bits = (key - 1).to(tl.int32)
    return tl.where(key == 0, -1.0, bits.to(tl.float32, bitcast=True))


@triton.jit
def lerp(a, b, w):
    """reference.lerp, operation for operation (bit-exact when the kernel is launched without fp
    fusion, as top-k's is; with fusion an FMA may move the last bit)."""
    d = b - a
    low = a + w * d
    high = b - d * (1.0 - w)
    return tl.where(w < 0.5, low, high)
