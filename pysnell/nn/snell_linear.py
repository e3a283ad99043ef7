"""SNELLLinear: a drop-in wrapper of a frozen nn.Linear with a sparse kernelized-LoRA update."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import functional as PF
from .._checks import check_choice, check_drop_rate, check_positive_int, check_sparsity, check_sparsity_arg
from ..ops.snell import reference as ref


class SNELLLinear(nn.Module):
    """y = base(x) + DropPath(Dropout(x)·Sᵀ), S = sparsify(κ(snell_B, snell_A)).

    The base layer stays frozen. Trainable: `snell_A` (r, in), `snell_B` (out, r), plus the
    kernel's scalars (α, β, γ for rbf / sigmoid / snella; piece coefficients when
    `learnable_coeffs`). Adapter tensors are fp32 whatever the base dtype.
    `layer.sparsity` is a float64 buffer (state_dict, EMA copies and checkpoints carry it);
    set it with `layer.set_sparsity(s)` or by assigning a float.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int = 8,
        sparsity: float = 0.9,
        kernel: str = "piecewise",
        pieces: int = 2,
        scale: float = 0.1,
        mode: str = "reference",
        dropout: float = 0.0,
        drop_path: float = 0.0,
        out_groups: int = 1,
        learnable_coeffs: bool = False,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        check_positive_int("r", r)
        check_positive_int("pieces", pieces)
        if r % pieces:
            raise ValueError(f"r={r} must be divisible by pieces={pieces}")
        check_choice("kernel", kernel, ref.KERNELS)
        check_choice("mode", mode, ref.MODES)
        s = check_sparsity(sparsity)
        rates = check_drop_rate("dropout", dropout), check_drop_rate("drop_path", drop_path)  # before base is touched
        m, n = base.out_features, base.in_features
        if isinstance(out_groups, bool) or not isinstance(out_groups, int) or out_groups < 1 or m % out_groups:
            raise ValueError(f"out_groups must be a positive int dividing out_features={m}, got {out_groups!r}")
        self.base = base
        base.requires_grad_(False)
        self.r, self.pieces, self.scale, self.kernel, self.mode = r, pieces, float(scale), kernel, mode
        self.dropout, self.drop_path = rates
        self.out_groups = out_groups
        self.learnable_coeffs = bool(learnable_coeffs)
        dev = base.weight.device
        d = r // pieces
        m_group = m // out_groups
        # Reference init: uniform ±1/sqrt(n·d) for A, ±1/sqrt(m·d) for B (per group, as separate layers).
        self.snell_A = nn.Parameter(torch.empty(r, n, device=dev).uniform_(-1, 1) / math.sqrt(n * d))
        self.snell_B = nn.Parameter(torch.empty(m, r, device=dev).uniform_(-1, 1) / math.sqrt(m_group * d))
        coeffs = ref.default_coeffs(pieces, self.scale, device=dev)
        if self.learnable_coeffs:
            self.snell_coeffs = nn.Parameter(coeffs)
        else:
            self.register_buffer("snell_coeffs", coeffs)
        # Kernel scalars as 1-element vectors, not 0-dim: FSDP (1 and 2) cannot shard 0-dim parameters.
        for name, value in ref.SCALAR_INIT.get(kernel, {}).items():
            setattr(self, f"snell_{name}", nn.Parameter(torch.tensor([value], device=dev)))
        self.register_buffer("sparsity", torch.tensor(s, dtype=torch.float64, device=dev))
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def set_sparsity(self, sparsity) -> None:
        """Change the fraction of ΔW zeroed (validated; written into the buffer in place)."""
        s = check_sparsity(sparsity)
        with torch.no_grad():
            self.sparsity.fill_(s)

    def __setattr__(self, name, value):
        if name == "sparsity" and "sparsity" in self.__dict__.get("_buffers", {}):
            if not isinstance(value, torch.Tensor):
                self.set_sparsity(value)
                return
            # A tensor replaces the buffer (functional_call does that), validated and kept float64.
            check_sparsity_arg(value)
            value = value.detach().to(torch.float64).reshape(())
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        # .half()/.to(dtype) must not round the sparsity: keep it float64, follow the device only.
        before = self.sparsity
        out = super()._apply(fn, recurse)
        if self.sparsity.dtype != torch.float64:
            self._buffers["sparsity"] = before.to(device=self.sparsity.device, dtype=torch.float64)
        return out

    def _tensor(self, name: str):
        """A parameter or buffer by name, read from the module's registries first: Module.__getattr__
        costs about a µs per name on every call. A wrapper that moved it elsewhere (FSDP's views, a
        plain attribute) is still found; a name the module lacks gives None."""
        t = self._parameters.get(name)
        if t is None:
            t = self._buffers.get(name)
            if t is None:
                t = getattr(self, name, None)
        return t

    def _kernel_tensors(self):
        has_scalars = self.kernel in ref.SCALAR_INIT  # other kernels have no α, β, γ: no lookups
        return {
            "coeffs": self._tensor("snell_coeffs"),
            "alpha": self._tensor("snell_alpha") if has_scalars else None,
            "beta": self._tensor("snell_beta") if has_scalars else None,
            "gamma": self._tensor("snell_gamma") if has_scalars else None,
        }

    def _snell_kwargs(self):
        return dict(
            kernel=self.kernel,
            pieces=self.pieces,
            scale=self.scale,
            mode=self.mode,
            out_groups=self.out_groups,
            **self._kernel_tensors(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        base = self.base
        return PF.snell_linear(
            x,
            base.weight,
            base.bias,
            self._tensor("snell_A"),
            self._tensor("snell_B"),
            sparsity=self._tensor("sparsity"),
            dropout=self.dropout,
            drop_path=self.drop_path,
            training=self.training,
            **self._snell_kwargs(),
        )

    def delta_weight(self) -> torch.Tensor:
        """The sparse update S (out, in) in fp32, differentiable w.r.t. the adapter tensors."""
        kw = self._snell_kwargs()
        mode, groups = kw.pop("mode"), kw["out_groups"]
        PF.check_snell_factors(  # against the base layer, before merge() writes anything
            self.snell_A,
            self.snell_B,
            kernel=self.kernel,
            pieces=self.pieces,
            out_groups=groups,
            in_features=self.in_features,
            out_features=self.out_features,
        )
        delta = PF.kernel_merge(self.snell_A, self.snell_B, **kw)
        return PF.sparsify(delta, self.sparsity, mode, out_groups=groups)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold S into the base weight (in fp32, then cast); forward then costs one plain GEMM."""
        if self.merged:
            raise RuntimeError("SNELLLinear is already merged")
        w = self.base.weight
        w.copy_((w.to(torch.float32) + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge() (exact in fp32; within one rounding of the base dtype otherwise)."""
        if not self.merged:
            raise RuntimeError("SNELLLinear is not merged")
        w = self.base.weight
        w.copy_((w.to(torch.float32) - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"kernel={self.kernel!r}, pieces={self.pieces}, mode={self.mode!r}, "
            f"sparsity={float(self.sparsity):.4g}, out_groups={self.out_groups}, merged={self.merged}"
        )
