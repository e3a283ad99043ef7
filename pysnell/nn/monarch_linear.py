"""MonarchLinear: a structured drop-in for nn.Linear (fly layout, parameters blkdiag1/blkdiag2)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_float_tensor, check_same_device
from ..functional import autocast_off
from ..ops.monarch.function import MonarchMatmulFunction, monarch_project, monarch_shapes


class MonarchLinear(nn.Module):
    """y = Monarch(blkdiag1, blkdiag2)·x + bias, with nblocks blocks per factor.

    Sizes nblocks does not divide are handled as zero features (spec/MONARCH.md §2): the
    kernels treat the missing inputs as zeros and cut the extra outputs.
    """

    def __init__(
        self, in_features: int, out_features: int, nblocks: int = 4, bias: bool = True, device=None, dtype=None
    ):
        super().__init__()
        w1_shape, w2_shape = monarch_shapes(in_features, out_features, nblocks)
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        kw = {"device": device, "dtype": dtype}
        self.blkdiag1 = nn.Parameter(torch.empty(w1_shape, **kw))
        self.blkdiag2 = nn.Parameter(torch.empty(w2_shape, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each factor uniform in ±1/sqrt(fan_in), fan_in = the block's input size.
        for w in (self.blkdiag1, self.blkdiag2):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, nblocks: int = 4, project: bool = True) -> "MonarchLinear":
        """The Monarch layer closest (Frobenius, per block) to a dense nn.Linear, with its bias.

        project=False: a freshly initialised layer of the same sizes, bias, device and dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            nblocks,
            bias=linear.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        if not project:
            return layer
        with torch.no_grad():
            w1, w2 = monarch_project(w.detach(), nblocks)  # float64 SVD inside, whatever the dtype
            layer.blkdiag1.copy_(w1)
            layer.blkdiag2.copy_(w2)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor("x", x)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have in_features={self.in_features} in its last dim, got {tuple(x.shape)}")
        check_same_device(x=x, blkdiag1=self.blkdiag1, blkdiag2=self.blkdiag2)
        dt = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)  # autocast's dtype, bf16 stays bf16
        w1, w2 = self.blkdiag1.to(dt), self.blkdiag2.to(dt)
        bias = None if self.bias is None else self.bias.to(dt)
        with autocast_off(x.device.type):
            return MonarchMatmulFunction.apply(x.to(dt), w1, w2, bias, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense (out, in) weight."""
        eye = torch.eye(self.in_features, dtype=self.blkdiag1.dtype, device=self.blkdiag1.device)
        w1, w2 = self.blkdiag1, self.blkdiag2
        return MonarchMatmulFunction.apply(eye, w1, w2, None, self.out_features).t()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
            f"bias={self.bias is not None}"
        )
