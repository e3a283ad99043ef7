"""Adapter injection into existing models, merge, save/load (peft-style target matching)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ._checks import check_choice, check_positive_int, check_sparsity
from .nn.monarch_linear import MonarchLinear
from .nn.snell_linear import SNELLLinear
from .ops.snell import reference as ref

# The earlier pysnell-only layout, still read by load_adapter; save_adapter writes peft's layout.
CONFIG_NAME = "pysnell_config.json"
WEIGHTS_NAME = "pysnell_adapter.safetensors"


@dataclass
class SNELLConfig:
    """Which linears get a SNELL adapter, and its hyper-parameters.

    target_modules / exclude_modules follow peft: a string is a full-match regex on the module
    name; a list matches a name exactly or as a ".name" suffix. `out_groups` maps the same kind
    of pattern to a group count (default: timm's fused "qkv" gets 3 thresholds, like the reference's
    separate q, k, v). `modules_to_save` stay fully trainable (e.g. a classifier head).
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    r: int = 8
    sparsity: float = 0.9
    kernel: str = "piecewise"
    pieces: int = 2
    scale: float = 0.1
    mode: str = "reference"
    dropout: float = 0.0
    drop_path: float = 0.0
    learnable_coeffs: bool = False
    out_groups: dict[str, int] = field(default_factory=lambda: {"qkv": 3})

    def __post_init__(self):
        if self.target_modules is None:
            raise ValueError("target_modules is required (a regex string or a list of module names)")
        check_sparsity(self.sparsity)
        check_choice("kernel", self.kernel, ref.KERNELS)
        check_choice("mode", self.mode, ref.MODES)
        check_positive_int("r", self.r)
        check_positive_int("pieces", self.pieces)
        if self.r % self.pieces:
            raise ValueError(f"r={self.r} must be divisible by pieces={self.pieces}")

    def layer_kwargs(self) -> dict:
        """SNELLLinear's keyword arguments for this config (out_groups is per module: _groups_for)."""
        names = ("r", "sparsity", "kernel", "pieces", "scale", "mode", "dropout", "drop_path", "learnable_coeffs")
        return {name: getattr(self, name) for name in names}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SNELLConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _matches(name: str, patterns) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _inside(name: str, patterns) -> bool:
    """The module or one of its parents matches (peft never targets anything inside modules_to_save)."""
    parts = name.split(".")
    return any(_matches(".".join(parts[:i]), patterns) for i in range(len(parts), 0, -1))


def _groups_for(name: str, out_groups: dict[str, int]) -> int:
    for pattern, g in (out_groups or {}).items():
        if _matches(name, pattern if any(c in pattern for c in ".*[]()|+?^$\\") else [pattern]):
            return int(g)
    return 1


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, config: SNELLConfig) -> nn.Module:
    """Replace matching nn.Linear layers by SNELLLinear in place; freeze everything else.

    Returns the model. Raises if no module matched (a typo in target_modules must not train nothing).
    """
    if getattr(model, "pysnell_config", None) is not None:
        raise RuntimeError("model already has SNELL adapters; call merge_and_unload first")
    targets = _linear_targets(model, config.target_modules, config.exclude_modules, config.modules_to_save)
    # Build every layer before touching the model, so that a bad layer (e.g. out_groups not dividing
    # a width) leaves it exactly as it was; SNELLLinear freezes its base, so restore those flags too.
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        layers = [
            (
                name,
                SNELLLinear(
                    model.get_submodule(name), out_groups=_groups_for(name, config.out_groups), **config.layer_kwargs()
                ),
            )
            for name in targets
        ]
    except Exception:
        _restore_requires_grad(flags)
        raise
    model.requires_grad_(False)
    for name, layer in layers:
        _set_submodule(model, name, layer)
    for name, mod in model.named_modules():
        if config.modules_to_save and _matches(name, config.modules_to_save):
            mod.requires_grad_(True)
    model.pysnell_config = config
    return model


def _linear_targets(model: nn.Module, target_modules, exclude_modules=None, modules_to_save=None) -> list[str]:
    """Names of the nn.Linear modules that peft's matching rules select (see SNELLConfig)."""
    targets = [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear)
        and _matches(name, target_modules)
        and not _matches(name, exclude_modules)
        and not _inside(name, modules_to_save)
    ]
    if not targets:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear in the model")
    return targets


def monarchize(
    model: nn.Module, target_modules, nblocks: int = 4, *, exclude_modules=None, project: bool = True
) -> nn.Module:
    """Replace matching nn.Linear layers by MonarchLinear in place; returns the model.

    Matching follows SNELLConfig (a string is a full-match regex, a list matches a name exactly or
    as a ".name" suffix). project=True starts each layer from the closest Monarch factors of its
    dense weight (`MonarchLinear.from_linear`, per-block truncated SVD); project=False from
    MonarchLinear's own initialisation. The new layers' parameters are trainable; no other
    parameter's requires_grad changes. Every layer is built before any is swapped in, so a layer
    that cannot take `nblocks` leaves the model unchanged (the error names it).
    """
    layers = []
    for name in _linear_targets(model, target_modules, exclude_modules):
        linear = model.get_submodule(name)
        try:
            layer = MonarchLinear.from_linear(linear, nblocks, project=project)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        layers.append((name, layer))
    for name, layer in layers:
        _set_submodule(model, name, layer)
    return model


def _restore_requires_grad(flags: dict) -> None:
    for p, flag in flags.items():
        p.requires_grad_(flag)


def _uninject(model: nn.Module, flags: dict) -> None:
    """Undo a fresh `inject` (no merge happened): the plain linears back, the old trainable flags."""
    for name, layer in snell_layers(model):
        _set_submodule(model, name, layer.base)
    _restore_requires_grad(flags)
    model.__dict__.pop("pysnell_config", None)


def snell_layers(model: nn.Module):
    """(name, SNELLLinear) pairs of a model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SNELLLinear)]


def merge_and_unload(model: nn.Module, progressbar: bool = False) -> nn.Module:
    """Fold every SNELL update into its base weight (fp32 math) and put the plain nn.Linear back."""
    layers = snell_layers(model)
    iterator = layers
    if progressbar:
        from tqdm.auto import tqdm

        iterator = tqdm(layers, desc="merging SNELL layers")
    for name, layer in iterator:
        if not layer.merged:
            layer.merge()
        _set_submodule(model, name, layer.base)
    model.pysnell_config = None
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Run the base model: every SNELL layer (unmerged) is bypassed inside the block."""
    layers = [m for _, m in snell_layers(model)]
    if any(m.merged for m in layers):
        raise RuntimeError("disable_adapter needs unmerged layers; call unmerge() first")
    saved = [m.forward for m in layers]
    try:
        for m in layers:
            m.forward = m.base.forward
        yield model
    finally:
        for m, fwd in zip(layers, saved):
            m.forward = fwd


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor plus each SNELL layer's sparsity (what defines the adapter)."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for name, layer in snell_layers(model):
        state[f"{name}.sparsity" if name else "sparsity"] = layer.sparsity.detach()
    return state


def save_adapter(model: nn.Module, directory: str) -> None:
    """Write the adapter to `directory` in peft's layout: adapter_config.json (peft_type "SNELL" and the
    config) and adapter_model.safetensors (the trainable tensors and sparsities). peft loads it with
    PeftModel.from_pretrained once pysnell.peft_integration.register() has run."""
    from .peft_integration import write_peft_files

    config = getattr(model, "pysnell_config", None)
    if config is None:
        raise ValueError("model has no SNELL adapters (inject it first)")
    write_peft_files(directory, adapter_state_dict(model), config, model.__dict__.get("name_or_path") or None)


def load_adapter(model: nn.Module, directory: str) -> nn.Module:
    """Load an adapter written by save_adapter or peft's save_pretrained; injects it first if the model has none."""
    from safetensors.torch import load_file

    from .peft_integration import read_peft_files

    if os.path.exists(os.path.join(directory, CONFIG_NAME)):  # the earlier pysnell-only layout
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            config = SNELLConfig.from_dict(json.load(f))
        state = load_file(os.path.join(directory, WEIGHTS_NAME))
    else:
        config, state = read_peft_files(directory)
    fresh = getattr(model, "pysnell_config", None) is None
    flags = {p: p.requires_grad for p in model.parameters()}
    if fresh:
        inject(model, config)
    # Check everything before copying anything: a failed load leaves the model as it was.
    try:
        own = dict(model.named_parameters())
        own.update({k: v for k, v in model.named_buffers()})
        missing = [k for k in adapter_state_dict(model) if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise ValueError(f"adapter does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        sparsity_keys = {f"{name}.sparsity" if name else "sparsity" for name, _ in snell_layers(model)}
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise ValueError(f"{k}: adapter has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
            if k in sparsity_keys:
                check_sparsity(v, name=k)
    except Exception:
        if fresh:
            _uninject(model, flags)
        raise
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    trainable, total = count_parameters(model)
    pct = 100.0 * trainable / max(total, 1)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")
