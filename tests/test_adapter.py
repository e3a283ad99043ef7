"""Adapter injection, matching rules, training, save/load, merge_and_unload, on TinyViT (and timm's ViT)."""

import copy
import os
import re

import pytest
import torch
from torch import nn

import pysnell
from pysnell.models import VIT_TARGETS, TinyViT


def tiny_vit():
    return TinyViT(img_size=8, patch=2, dim=24, depth=2, heads=2, mlp_ratio=2.0, num_classes=5)


def vit_config(**kw):
    kw.setdefault("sparsity", 0.5)
    return pysnell.SNELLConfig(target_modules=VIT_TARGETS, modules_to_save=["head"], r=4, **kw)


def randomise_adapter(model):
    """Trained-looking adapter tensors (the init gives an almost zero update) and varied sparsities."""
    with torch.no_grad():
        for i, (_, layer) in enumerate(pysnell.adapter.snell_layers(model)):
            layer.snell_A.normal_(0, 0.3)
            layer.snell_B.normal_(0, 0.3)
            layer.set_sparsity(0.3 + 0.1 * (i % 5))
        model.head.weight.normal_()


def test_inject_on_tiny_vit(seed):
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pysnell.inject(model, vit_config())
    layers = dict(pysnell.adapter.snell_layers(model))
    expected = {f"blocks.{b}.{name}" for b in range(2) for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert set(layers) == expected
    for name, layer in layers.items():
        assert layer.out_groups == (3 if name.endswith("qkv") else 1), name
        assert torch.equal(layer.base.weight, before[f"{name}.weight"])  # the base is untouched
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    expected_trainable = {f"{n}.snell_{ab}" for n in expected for ab in "AB"} | {"head.weight", "head.bias"}
    assert trainable == expected_trainable
    assert isinstance(model.patch_embed, nn.Linear)  # "proj" must not match "patch_embed"
    with pytest.raises(RuntimeError, match="already has SNELL adapters"):
        pysnell.inject(model, vit_config())


def test_training_changes_only_the_trainable_tensors(seed):
    model = pysnell.inject(tiny_vit(), vit_config())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images, labels = torch.randn(6, 1, 8, 8), torch.randint(0, 5, (6,))
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in model.state_dict().items():
        changed = not torch.equal(v, before[k])
        assert changed == (k in trainable), k


def _module_names():
    return [
        "proj",
        "attn.proj",
        "attn.out_proj",
        "blocks.0.attn.qkv",
        "blocks.1.attn.qkv",
        "blocks.10.attn.qkv",
        "qkv_extra",
        "mlp.fc1",
        "encoder.fc1x",
        "head",
    ]


class Named(nn.Module):
    """Linears at the given dotted names (intermediate containers built on the way)."""

    def __init__(self, names):
        super().__init__()
        for name in names:
            parent = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, nn.Linear(4, 6))


def _injected(target, exclude=None, save=None):
    model = Named(_module_names())
    cfg = pysnell.SNELLConfig(target_modules=target, exclude_modules=exclude, modules_to_save=save, r=2, sparsity=0.3)
    pysnell.inject(model, cfg)
    return {n for n, _ in pysnell.adapter.snell_layers(model)}


def test_matching_rules():
    # a list: exact name or ".name" suffix, never a substring
    assert _injected(["proj"]) == {"proj", "attn.proj"}
    assert _injected(["qkv"]) == {"blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.10.attn.qkv"}
    assert _injected(["attn.qkv", "fc1"]) == {"blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.10.attn.qkv", "mlp.fc1"}
    # a string: a regex that must match the whole name
    assert _injected(r"blocks\.1\..*") == {"blocks.1.attn.qkv"}
    assert _injected(r".*\.(qkv|fc1)") == {"blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.10.attn.qkv", "mlp.fc1"}
    assert _injected("proj") == {"proj"}
    # exclude_modules: same rules, applied after
    assert _injected(["qkv"], exclude=["blocks.1.attn.qkv"]) == {"blocks.0.attn.qkv", "blocks.10.attn.qkv"}
    assert _injected(["qkv", "proj"], exclude=r".*\.1\d*\..*") == {"blocks.0.attn.qkv", "proj", "attn.proj"}
    # modules_to_save are never wrapped (as in peft), they train in full
    assert _injected(["proj", "head"], save=["head"]) == {"proj", "attn.proj"}
    with pytest.raises(ValueError, match="target_modules"):
        _injected(["nothing_here"])


def test_matching_rules_agree_with_peft():
    tuners_utils = pytest.importorskip("peft.tuners.tuners_utils")
    from peft import LoraConfig

    cases = [
        (["proj"], None, None),
        (["qkv", "fc1"], ["blocks.1.attn.qkv"], None),
        (r".*\.(qkv|fc1)", None, None),
        (r".*qkv.*", r"blocks\.10\..*", None),
        (["proj", "head"], None, ["head"]),
        (["attn.proj", "blocks.0.attn.qkv"], r"attn\.proj", None),
    ]
    for target, exclude, save in cases:
        cfg = LoraConfig(target_modules=target, exclude_modules=exclude, modules_to_save=save)
        expected = {
            n
            for n in _module_names()
            if tuners_utils.check_target_module_exists(cfg, n)
            and not isinstance(tuners_utils.check_target_module_exists(cfg, n), tuners_utils._ExcludedModule)
        }
        assert _injected(target, exclude, save) == expected, (target, exclude, save)


def test_save_load_round_trip_is_exact(seed, tmp_path):
    base = tiny_vit()
    fresh = copy.deepcopy(base)
    also_fresh = copy.deepcopy(base)
    model = pysnell.inject(base, vit_config(mode="paper"))
    randomise_adapter(model)
    pysnell.save_adapter(model, str(tmp_path))
    files = set(os.listdir(tmp_path))
    assert any(f.endswith(".json") for f in files) and any(f.endswith(".safetensors") for f in files)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / next(f for f in files if f.endswith(".safetensors"))))
    # only the adapter: trainable tensors and sparsities, never the frozen base
    assert not any(re.search(r"base\.weight$|blocks\.\d+\.norm", k) for k in saved)
    assert len(saved) == 8 * 3 + 2

    loaded = pysnell.load_adapter(fresh, str(tmp_path))  # un-injected: load injects
    assert loaded is fresh and fresh.pysnell_config.mode == "paper"
    want = model.state_dict()
    got = fresh.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
        assert want[k].dtype == got[k].dtype, k
    images = torch.randn(3, 1, 8, 8)
    assert torch.equal(model(images), fresh(images))
    trainable = {k for k, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {k for k, p in model.named_parameters() if p.requires_grad}

    # loading into an already injected model overwrites its adapter
    pysnell.inject(also_fresh, vit_config(mode="paper"))
    pysnell.load_adapter(also_fresh, str(tmp_path))
    assert torch.equal(model(images), also_fresh(images))


def test_merge_and_unload_gives_the_adapted_outputs(seed):
    model = pysnell.inject(tiny_vit(), vit_config())
    randomise_adapter(model)
    model.eval()
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        adapted = model(images)
        with pysnell.disable_adapter(model):
            plain = model(images)
    assert not torch.allclose(adapted, plain, atol=1e-3)  # the adapter matters
    merged = pysnell.merge_and_unload(model)
    assert merged is model and not pysnell.adapter.snell_layers(model)
    assert all(type(m) is not pysnell.SNELLLinear for m in model.modules())
    assert isinstance(model.blocks[0].attn.qkv, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(images), adapted, rtol=1e-5, atol=1e-5)


def test_print_trainable_parameters(seed, capsys):
    model = pysnell.inject(tiny_vit(), vit_config())
    pysnell.print_trainable_parameters(model)
    out = capsys.readouterr().out
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    m = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)\n", out)
    assert m, out
    assert int(m.group(1).replace(",", "")) == trainable
    assert int(m.group(2).replace(",", "")) == total
    assert abs(float(m.group(3)) - 100 * trainable / total) < 1e-3
    # r·(m+n) per adapted matrix, plus the head
    d, hidden = 24, 48
    per_block = 4 * ((3 * d + d) + (d + d) + (hidden + d) + (d + hidden))
    assert trainable == 2 * per_block + (24 * 5 + 5)


def test_inject_on_timm_vit(seed):
    try:
        import timm

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3)
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"timm unavailable: {type(exc).__name__}: {exc}")
    pysnell.inject(model, vit_config())
    layers = dict(pysnell.adapter.snell_layers(model))
    assert len(layers) == 4 * len(model.blocks)
    assert layers["blocks.0.attn.qkv"].out_groups == 3
    assert isinstance(model.patch_embed.proj, nn.Conv2d)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert all(".snell_" in k or k.startswith("head.") for k in trainable)
    model.eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        y = model(images)
    assert y.shape == (1, 3) and torch.isfinite(y).all()
    pysnell.merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(model(images), y, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- monarchize


def test_monarchize_swaps_the_targets_and_trains_them(seed):
    model = tiny_vit()
    frozen = {n for n, p in model.named_parameters() if "head" in n}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    pysnell.monarchize(model, VIT_TARGETS, nblocks=4, exclude_modules=["blocks.1.mlp.fc2"])
    swapped = {n for n, m in model.named_modules() if isinstance(m, pysnell.MonarchLinear)}
    expected = {f"blocks.{b}.{name}" for b in range(2) for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert swapped == expected - {"blocks.1.mlp.fc2"}
    assert isinstance(model.get_submodule("blocks.1.mlp.fc2"), nn.Linear)
    for name in swapped:
        assert all(p.requires_grad for p in model.get_submodule(name).parameters()), name
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in frozen)
    images = torch.randn(3, 1, 8, 8)
    model(images).square().sum().backward()
    assert model.blocks[0].attn.qkv.blkdiag1.grad.abs().sum() > 0


def test_monarchize_projects_the_dense_weights(seed):
    # one block per factor represents any dense matrix: the projected model computes the same function
    model = tiny_vit().double()
    images = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    want = model(images)
    pysnell.monarchize(model, VIT_TARGETS, nblocks=1)
    torch.testing.assert_close(model(images), want, rtol=1e-9, atol=1e-9)
    # four blocks: the closest Monarch layer, not the same one; project=False: a fresh initialisation
    dense = tiny_vit()
    projected, fresh = copy.deepcopy(dense), copy.deepcopy(dense)
    pysnell.monarchize(projected, ["fc1"], nblocks=4)
    pysnell.monarchize(fresh, ["fc1"], nblocks=4, project=False)
    layer, w = projected.blocks[0].mlp.fc1, dense.blocks[0].mlp.fc1.weight
    best = pysnell.monarch_project(w.detach(), 4)
    torch.testing.assert_close(layer.blkdiag1, best[0].to(layer.blkdiag1))
    err_projected = (layer.dense_weight() - w).norm()
    err_fresh = (fresh.blocks[0].mlp.fc1.dense_weight() - w).norm()
    assert err_projected < err_fresh
    torch.testing.assert_close(layer.bias, dense.blocks[0].mlp.fc1.bias)


def test_monarchize_refuses_clearly_and_leaves_the_model_alone(seed):
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        pysnell.monarchize(model, ["no_such_layer"])
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: nblocks=32 must not exceed in_features=24"):
        pysnell.monarchize(model, VIT_TARGETS, nblocks=32)
    assert not any(isinstance(m, pysnell.MonarchLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
