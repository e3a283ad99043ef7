"""SNELL as a peft method: `get_peft_model`, `save_pretrained`, `PeftModel.from_pretrained`, merges.

    import peft, pysnell
    pysnell.peft_integration.register()          # once, idempotent
    model = peft.get_peft_model(base, pysnell.SNELLConfig(target_modules=["query", "value"], r=8))
    model.save_pretrained("out")                 # also loads with pysnell.load_adapter(fresh_base, "out")
    with model.disable_adapter(): ...            # the base model's outputs
    merged = model.merge_and_unload(progressbar=True)

peft (0.21) refuses `register_peft_method` for names outside its closed PeftType enum, so `register()`
puts the string key "SNELL" into peft's three internal mapping dicts (config, tuner, prefix), which is
what peft 0.21 reads everywhere, including in get/set_peft_model_state_dict. That is internal API, so it
is guarded by a version range (SUPPORTED_PEFT). peft 0.18–0.20 cannot work this way: their
get_peft_model_state_dict accepts only enum members (`config.peft_type in list(PeftType)`) and
save_pretrained fails with "Unknown PEFT type"; peft 0.17 does not import under transformers 5.

On disk both libraries use the same layout, so adapters move freely between them:
adapter_config.json (peft_type "SNELL" plus the SNELLConfig fields) and adapter_model.safetensors
(keys "base_model.model.<module>.snell_A", ..., "<module>.sparsity" and the modules_to_save tensors).
pysnell.save_adapter writes these next to its own files, pysnell.load_adapter reads them. The
helpers for that layout below need no peft.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import warnings

import torch
from torch import nn

from . import functional as PF
from .adapter import SNELLConfig, _groups_for
from .nn.snell_linear import SNELLLinear
from .ops.snell import reference as ref

PEFT_TYPE = "SNELL"
PREFIX = "snell_"
# [lowest, first unsupported): the internal mapping dicts work end to end in this range.
SUPPORTED_PEFT = ("0.21.0", "0.22.0")  # also in pyproject.toml (extras) and the Makefile (PEFT_LOWEST/BELOW)

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."

# Attributes get_peft_model / PeftModel read from a config before the tuner sees it; pysnell.SNELLConfig
# gets them as class attributes in register(), and the tuner turns it into a SNELLPeftConfig.
_PEFT_FACING_ATTRS = {
    "peft_type": PEFT_TYPE,
    "task_type": None,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": False,
    "is_prompt_learning": False,
    "is_adaption_prompt": False,
}

_lock = threading.Lock()
_classes: dict[str, type] = {}


# ---------------------------------------------------------------------------------------------------------
# The shared on-disk layout (no peft needed)


def peft_config_dict(config: SNELLConfig, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json contents for a pysnell config (what SNELLPeftConfig.save_pretrained writes)."""
    out = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    out.update(
        peft_type=PEFT_TYPE,
        task_type=getattr(config, "task_type", None),
        base_model_name_or_path=base_model_name_or_path,
        revision=None,
        inference_mode=True,
        auto_mapping=None,
    )
    return out


def to_peft_keys(state: dict) -> dict:
    """pysnell adapter keys ("layer.snell_A") -> peft checkpoint keys ("base_model.model.layer.snell_A")."""
    return {PEFT_KEY_PREFIX + k: v for k, v in state.items()}


def from_peft_keys(state: dict) -> dict:
    """peft checkpoint keys -> pysnell adapter keys."""
    return {k.removeprefix(PEFT_KEY_PREFIX): v for k, v in state.items()}


def write_peft_files(directory: str, state: dict, config: SNELLConfig, base_model_name_or_path=None) -> None:
    """Write an adapter in peft's layout (used by pysnell.save_adapter)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    save_file(
        {k: v.contiguous().cpu() for k, v in to_peft_keys(state).items()}, os.path.join(directory, PEFT_WEIGHTS_NAME)
    )
    with open(os.path.join(directory, PEFT_CONFIG_NAME), "w") as f:
        json.dump(peft_config_dict(config, base_model_name_or_path), f, indent=2, sort_keys=True)


def read_peft_files(directory: str) -> tuple[SNELLConfig, dict]:
    """Read a SNELL adapter saved by peft (or by pysnell): (config, state with pysnell keys)."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, PEFT_CONFIG_NAME)) as f:
        config_dict = json.load(f)
    if config_dict.get("peft_type") != PEFT_TYPE:
        raise ValueError(
            f"{directory} holds a peft adapter of type {config_dict.get('peft_type')!r}, not a SNELL adapter"
        )
    state = from_peft_keys(load_file(os.path.join(directory, PEFT_WEIGHTS_NAME)))
    return SNELLConfig.from_dict(config_dict), state


# ---------------------------------------------------------------------------------------------------------
# Registration


def _version_tuple(text: str) -> tuple:
    from packaging.version import Version

    return Version(text).release


def check_peft_version(version: str | None = None) -> str:
    """The installed peft version, or a clear error when the bridge does not support it."""
    if version is None:
        try:
            import peft
        except ImportError as exc:
            raise ImportError("the SNELL peft bridge needs peft: pip install 'pysnell[peft]'") from exc
        version = peft.__version__
    low, high = SUPPORTED_PEFT
    if not (_version_tuple(low) <= _version_tuple(version) < _version_tuple(high)):
        raise RuntimeError(
            f"pysnell's peft bridge supports peft>={low},<{high}, found peft {version}. It registers SNELL in "
            "peft's internal mapping dicts, which older peft does not consult when saving (save_pretrained "
            "fails with 'Unknown PEFT type') and newer peft may have changed. Install a supported version: "
            f"pip install 'peft>={low},<{high}' (or use pysnell.inject / save_adapter without peft)."
        )
    return version


def register() -> dict[str, type]:
    """Make SNELL a peft method (idempotent). Returns {"config": ..., "tuner": ..., "layer": ...}."""
    check_peft_version()
    from peft import mapping

    with _lock:
        if not _classes:
            _classes.update(_build_classes())
        for name in (
            "PEFT_TYPE_TO_CONFIG_MAPPING",
            "PEFT_TYPE_TO_TUNER_MAPPING",
            "PEFT_TYPE_TO_PREFIX_MAPPING",
        ):
            if not isinstance(getattr(mapping, name, None), dict):
                raise RuntimeError(f"peft.mapping.{name} is missing: this peft's internals are not supported")
        owner = mapping.PEFT_TYPE_TO_PREFIX_MAPPING.get(PEFT_TYPE)
        clash = [t for t, p in mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == PREFIX and t != PEFT_TYPE]
        if clash or (owner is not None and mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(PEFT_TYPE) is not _classes["tuner"]):
            raise RuntimeError(f"another peft method already uses the name {PEFT_TYPE!r} or the prefix {PREFIX!r}")
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = _classes["config"]
        mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = _classes["tuner"]
        mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = PREFIX
        for attr, value in _PEFT_FACING_ATTRS.items():
            if attr not in SNELLConfig.__dict__:
                setattr(SNELLConfig, attr, value)
    return dict(_classes)


def is_registered() -> bool:
    try:
        from peft import mapping
    except ImportError:
        return False
    return bool(_classes) and mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(PEFT_TYPE) is _classes.get("tuner")


def __getattr__(name):
    # SNELLPeftConfig / SNELLPeftModel / SNELLPeftLinear exist once peft is importable.
    lookup = {"SNELLPeftConfig": "config", "SNELLPeftModel": "tuner", "SNELLPeftLinear": "layer"}
    if name in lookup:
        return register()[lookup[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------------
# The peft classes (built on first register(): they subclass peft's bases)


def _build_classes() -> dict[str, type]:
    from peft.config import PeftConfig
    from peft.tuners._buffer_dict import BufferDict
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge

    snell_fields = []
    for f in dataclasses.fields(SNELLConfig):
        if f.default is not dataclasses.MISSING:
            default = dataclasses.field(default=f.default)
        else:
            default = dataclasses.field(default_factory=f.default_factory)
        snell_fields.append((f.name, f.type, default))

    def config_post_init(self):
        PeftConfig.__post_init__(self)
        self.peft_type = PEFT_TYPE
        self.to_snell_config()  # pysnell's own validation, with its error messages

    def to_snell_config(self) -> SNELLConfig:
        return SNELLConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SNELLConfig)})

    @classmethod
    def from_snell_config(cls, config: SNELLConfig):
        """A SNELLPeftConfig with the fields of a pysnell.SNELLConfig (and the peft attributes it was given)."""
        kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(SNELLConfig)}
        for attr in ("task_type", "base_model_name_or_path", "revision", "inference_mode"):
            kwargs[attr] = getattr(config, attr, _PEFT_FACING_ATTRS[attr])
        return cls(**kwargs)

    SNELLPeftConfig = dataclasses.make_dataclass(
        "SNELLPeftConfig",
        snell_fields,
        bases=(PeftConfig,),
        namespace={
            "__post_init__": config_post_init,
            "to_snell_config": to_snell_config,
            "from_snell_config": from_snell_config,
            "__doc__": "pysnell.SNELLConfig as a peft config (peft_type 'SNELL'); same fields, same checks.",
            "__module__": __name__,
        },
    )

    def as_peft_config(config):
        if isinstance(config, SNELLPeftConfig):
            return config
        if isinstance(config, SNELLConfig):
            return SNELLPeftConfig.from_snell_config(config)
        raise TypeError(f"expected a pysnell.SNELLConfig or SNELLPeftConfig, got {type(config).__name__}")

    class SNELLPeftLinear(nn.Module, BaseTunerLayer):
        """An nn.Linear with SNELL adapters keyed by adapter name (peft's tuner-layer conventions).

        Parameter names match pysnell.SNELLLinear (snell_A, snell_B, snell_coeffs, snell_alpha, ...,
        sparsity), so checkpoints move between the two with only the "base_model.model." prefix.
        Adapter tensors are fp32 whatever the base dtype; merges run in fp32. One adapter is active at
        a time (set_adapter switches).
        """

        adapter_layer_names = ("snell_A", "snell_B", "snell_coeffs", "snell_alpha", "snell_beta", "snell_gamma")
        other_param_names = ("sparsity", "snell_settings")

        def __init__(self, base_layer: nn.Linear, adapter_name: str, config, out_groups: int):
            super().__init__()
            BaseTunerLayer.__init__(self)
            self.base_layer = base_layer
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
            for name in self.adapter_layer_names:
                setattr(self, name, nn.ParameterDict())
            self.sparsity = BufferDict(persistent=True)
            self.snell_settings: dict[str, dict] = {}
            self._disable_adapters = False
            self.merged_adapters = []
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, config, out_groups)

        def update_layer(self, adapter_name: str, config, out_groups: int) -> None:
            # SNELLLinear validates the settings and initialises the tensors exactly as pysnell.inject does.
            # config is a SNELLPeftConfig, which has every SNELLConfig field: layer_kwargs reads only those.
            proto = SNELLLinear(self.base_layer, out_groups=out_groups, **SNELLConfig.layer_kwargs(config))
            self.snell_A[adapter_name] = proto.snell_A
            self.snell_B[adapter_name] = proto.snell_B
            if config.learnable_coeffs:
                self.snell_coeffs[adapter_name] = proto.snell_coeffs
            for name in ref.SCALAR_INIT.get(config.kernel, {}):
                getattr(self, f"snell_{name}")[adapter_name] = getattr(proto, f"snell_{name}")
            self.sparsity[adapter_name] = proto.sparsity
            self.snell_settings[adapter_name] = dict(
                kernel=config.kernel,
                pieces=config.pieces,
                scale=float(config.scale),
                mode=config.mode,
                out_groups=out_groups,
                dropout=float(config.dropout),
                drop_path=float(config.drop_path),
            )
            self.set_adapter(self.active_adapters)

        def _apply(self, fn, recurse=True):
            # .half()/.to(dtype) must not round the sparsities: keep them float64, follow the device only.
            before = {k: self.sparsity[k] for k in self.sparsity}
            out = super()._apply(fn, recurse)
            for k, old in before.items():
                if self.sparsity[k].dtype != torch.float64:
                    self.sparsity[k] = old.to(device=self.sparsity[k].device, dtype=torch.float64)
            return out

        def _functional_kwargs(self, adapter_name: str) -> dict:
            settings = {k: v for k, v in self.snell_settings[adapter_name].items() if k not in ("dropout", "drop_path")}
            return dict(
                settings,
                coeffs=self.snell_coeffs[adapter_name] if adapter_name in self.snell_coeffs else None,
                alpha=self.snell_alpha[adapter_name] if adapter_name in self.snell_alpha else None,
                beta=self.snell_beta[adapter_name] if adapter_name in self.snell_beta else None,
                gamma=self.snell_gamma[adapter_name] if adapter_name in self.snell_gamma else None,
            )

        def _active(self) -> str | None:
            names = [a for a in self.active_adapters if a in self.snell_A]
            if len(names) > 1:
                raise RuntimeError(f"SNELL runs one adapter at a time; active adapters are {names} (use set_adapter)")
            return names[0] if names else None

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if self.disable_adapters:
                if self.merged:
                    self.unmerge()
                return self.base_layer(x, *args, **kwargs)
            name = self._active()
            if self.merged or name is None:
                return self.base_layer(x, *args, **kwargs)
            settings = self.snell_settings[name]
            kw = self._functional_kwargs(name)
            return PF.snell_linear(
                x,
                self.base_layer.weight,
                self.base_layer.bias,
                self.snell_A[name],
                self.snell_B[name],
                sparsity=self.sparsity[name],
                dropout=settings["dropout"],
                drop_path=settings["drop_path"],
                training=self.training,
                **kw,
            )

        def delta_weight(self, adapter_name: str) -> torch.Tensor:
            """The sparse update S (out, in) of one adapter, fp32."""
            kw = self._functional_kwargs(adapter_name)
            mode = kw.pop("mode")
            delta = PF.kernel_merge(self.snell_A[adapter_name], self.snell_B[adapter_name], **kw)
            return PF.sparsify(delta, self.sparsity[adapter_name], mode, out_groups=kw["out_groups"])

        @torch.no_grad()
        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            """Fold adapters into the base weight, in fp32 then cast to the base dtype."""
            weight = self.get_base_layer().weight
            for name in check_adapters_to_merge(self, adapter_names):
                if name not in self.snell_A:
                    continue
                merged = weight.to(torch.float32) + self.delta_weight(name)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs or infs in the merged weights of adapter {name!r}; not merged")
                weight.copy_(merged.to(weight.dtype))
                self.merged_adapters.append(name)

        @torch.no_grad()
        def unmerge(self) -> None:
            if not self.merged:
                warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
                return
            weight = self.get_base_layer().weight
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                weight.copy_((weight.to(torch.float32) - self.delta_weight(name)).to(weight.dtype))

        def __repr__(self) -> str:
            return "snell." + super().__repr__()

    class SNELLPeftModel(BaseTuner):
        """peft tuner for SNELL: replaces the matching nn.Linear layers by SNELLPeftLinear."""

        prefix = PREFIX
        tuner_layer_cls = SNELLPeftLinear
        target_module_mapping: dict = {}

        def __init__(self, model, peft_config, adapter_name="default", low_cpu_mem_usage=False, state_dict=None):
            # A pysnell.SNELLConfig given to get_peft_model becomes a SNELLPeftConfig here.
            if isinstance(peft_config, dict):
                peft_config = {k: as_peft_config(v) for k, v in peft_config.items()}
            else:
                peft_config = as_peft_config(peft_config)
            super().__init__(
                model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict
            )

        def inject_adapter(self, model, adapter_name, *args, **kwargs):
            self.peft_config[adapter_name] = as_peft_config(self.peft_config[adapter_name])
            return super().inject_adapter(model, adapter_name, *args, **kwargs)

        def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
            out_groups = _groups_for(current_key, peft_config.out_groups)
            if isinstance(target, SNELLPeftLinear):
                target.update_layer(adapter_name, peft_config, out_groups)
                return
            if not isinstance(target, nn.Linear):
                raise TypeError(
                    f"SNELL adapts nn.Linear layers only; {current_key!r} is a {type(target).__name__} "
                    "(narrow target_modules)"
                )
            new_module = SNELLPeftLinear(target, adapter_name, peft_config, out_groups)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)

    return {"config": SNELLPeftConfig, "tuner": SNELLPeftModel, "layer": SNELLPeftLinear}
