"""Every bad input gets a clear exception naming the argument, and leaves the module's state untouched."""

import copy

import pytest
import torch
from torch import nn

import pysnell
from pysnell.models import VIT_TARGETS, TinyViT


def snapshot(module):
    """Everything that defines a module's state: tensors (values, dtypes), flags, the merged flag."""
    state = {k: (v.detach().clone(), v.dtype) for k, v in module.state_dict().items()}
    grads = {k: p.requires_grad for k, p in module.named_parameters()}
    extra = {k: getattr(m, "merged", None) for k, m in module.named_modules()}
    modules = {k: type(m) for k, m in module.named_modules()}
    return state, grads, extra, modules


def assert_unchanged(module, snap):
    state, grads, extra, modules = snapshot(module)
    assert modules == snap[3]
    assert state.keys() == snap[0].keys()
    for k in state:
        assert torch.equal(state[k][0], snap[0][k][0]) and state[k][1] == snap[0][k][1], k
    assert grads == snap[1] and extra == snap[2]


def layer(m=6, n=5, **kw):
    kw.setdefault("r", 4)
    kw.setdefault("sparsity", 0.5)
    return pysnell.SNELLLinear(nn.Linear(n, m), **kw)


# ---------------------------------------------------------------- sparsity outside [0, 1)


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan"), float("inf")])
def test_sparsity_out_of_range(bad):
    base = nn.Linear(5, 6)
    with pytest.raises(ValueError, match=r"sparsity.*\[0, 1\)"):
        pysnell.SNELLLinear(base, sparsity=bad)
    assert base.weight.requires_grad  # the failed wrapper did not freeze the base
    lay = layer()
    snap = snapshot(lay)
    with pytest.raises(ValueError, match="sparsity"):
        lay.set_sparsity(bad)
    with pytest.raises(ValueError, match="sparsity"):
        lay.sparsity = bad
    with pytest.raises(ValueError, match="sparsity"):
        lay.sparsity = torch.tensor(bad, dtype=torch.float64)
    assert_unchanged(lay, snap)
    delta = torch.randn(6, 5)
    with pytest.raises(ValueError, match="sparsity"):
        pysnell.sparsify(delta, bad)
    with pytest.raises(ValueError, match="sparsity"):
        pysnell.sparsify(delta, torch.tensor(bad, dtype=torch.float64))
    x = torch.randn(7, 3)
    x0 = x.clone()
    with pytest.raises(ValueError, match="sparsity"):
        pysnell.topk_mask_(x, sparsity=bad)
    assert torch.equal(x, x0)
    with pytest.raises(ValueError, match="sparsity"):
        pysnell.SNELLConfig(target_modules=["qkv"], sparsity=bad)
    with pytest.raises(ValueError, match="sparsity"):
        pysnell.snell_linear(torch.randn(2, 5), lay.base.weight, None, lay.snell_A, lay.snell_B, sparsity=bad, pieces=2)


def test_sparsity_wrong_type():
    with pytest.raises(TypeError, match="sparsity"):
        layer(sparsity="0.5")
    with pytest.raises(ValueError, match="sparsity"):
        pysnell.sparsify(torch.randn(3, 3), torch.tensor([0.1, 0.2]))


# ---------------------------------------------------------------- r, pieces, kernel, mode


def test_r_not_divisible_by_pieces():
    base = nn.Linear(5, 6)
    with pytest.raises(ValueError, match=r"r=5.*pieces=2"):
        pysnell.SNELLLinear(base, r=5, pieces=2)
    assert base.weight.requires_grad
    with pytest.raises(ValueError, match=r"r=6.*pieces=4"):
        pysnell.kernel_merge(torch.randn(6, 5), torch.randn(4, 6), pieces=4)
    with pytest.raises(ValueError, match=r"r=5.*pieces=2"):
        pysnell.SNELLConfig(target_modules=["qkv"], r=5, pieces=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="pieces"):
            pysnell.SNELLLinear(nn.Linear(5, 6), r=4, pieces=bad)
        with pytest.raises(ValueError, match="pieces"):
            pysnell.SNELLConfig(target_modules=["qkv"], r=4, pieces=bad)
    for bad in (0, -2, 2.0):
        with pytest.raises(ValueError, match="r must be a positive int"):
            pysnell.SNELLLinear(nn.Linear(5, 6), r=bad)


def test_unknown_kernel_or_mode():
    with pytest.raises(ValueError, match=r"kernel must be one of .*'nope'"):
        layer(kernel="nope")
    with pytest.raises(ValueError, match=r"mode must be one of .*'nope'"):
        layer(mode="nope")
    A, B = torch.randn(4, 5), torch.randn(6, 4)
    with pytest.raises(ValueError, match="kernel"):
        pysnell.kernel_merge(A, B, kernel="Piecewise")
    with pytest.raises(ValueError, match="mode"):
        pysnell.sparsify(torch.randn(3, 3), 0.5, mode="topk")
    with pytest.raises(ValueError, match="mode"):
        pysnell.snell_linear(torch.randn(2, 5), None, None, A, B, sparsity=0.5, mode="binary")
    with pytest.raises(ValueError, match="kernel"):
        pysnell.SNELLConfig(target_modules=["qkv"], kernel="lora")
    with pytest.raises(ValueError, match="mode"):
        pysnell.SNELLConfig(target_modules=["qkv"], mode="lora")


def test_out_groups_must_divide_out_features():
    with pytest.raises(ValueError, match=r"out_groups.*out_features=6"):
        layer(out_groups=4)
    with pytest.raises(ValueError, match="out_groups"):
        pysnell.kernel_merge(torch.randn(4, 5), torch.randn(6, 4), out_groups=4)
    with pytest.raises(ValueError, match="out_groups"):
        pysnell.sparsify(torch.randn(6, 5), 0.5, out_groups=4)


# ---------------------------------------------------------------- shapes


def test_factors_of_the_wrong_shape_for_the_base_layer():
    lay = layer(m=6, n=5)
    x = torch.randn(3, 5)
    weight, bias = lay.base.weight, lay.base.bias
    A, B = lay.snell_A.detach(), lay.snell_B.detach()
    with pytest.raises(ValueError, match=r"A must be \(r, in=5\)"):
        pysnell.snell_linear(x, weight, bias, torch.randn(4, 7), B, sparsity=0.5)
    with pytest.raises(ValueError, match=r"B must be \(out=6, r\)"):
        pysnell.snell_linear(x, weight, bias, A, torch.randn(7, 4), sparsity=0.5)
    with pytest.raises(ValueError, match=r"B must be \(out, r=4\)"):
        pysnell.snell_linear(x, weight, bias, A, torch.randn(6, 3), sparsity=0.5)
    with pytest.raises(ValueError, match=r"A must be 2-D"):
        pysnell.kernel_merge(torch.randn(4), B)
    with pytest.raises(ValueError, match=r"bias must have shape \(out=6,\)"):
        pysnell.snell_linear(x, weight, torch.randn(5), A, B, sparsity=0.5)
    # A module whose factor was replaced by one of the wrong shape: forward refuses, nothing changes.
    with torch.no_grad():
        lay.snell_A = nn.Parameter(torch.randn(4, 7))
    snap = snapshot(lay)
    with pytest.raises(ValueError, match=r"A must be \(r, in=5\)"):
        lay(x)
    with pytest.raises(ValueError, match=r"A must be \(r, in=5\)"):
        lay.merge()
    assert_unchanged(lay, snap)


def test_input_of_the_wrong_width():
    lay = layer(m=6, n=5)
    snap = snapshot(lay)
    with pytest.raises(ValueError, match=r"x must have in_features=5"):
        lay(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"x must"):
        lay(torch.tensor(1.0))
    assert_unchanged(lay, snap)
    mon = pysnell.MonarchLinear(10, 7, nblocks=3)
    with pytest.raises(ValueError, match=r"x must have in_features=10"):
        mon(torch.randn(2, 9))


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_dtypes(dtype):
    x_bad = torch.ones(3, 5).to(dtype)
    lay = layer(m=6, n=5)
    snap = snapshot(lay)
    with pytest.raises(TypeError, match=r"x must have a floating dtype"):
        lay(x_bad)
    assert_unchanged(lay, snap)
    A, B = torch.randn(4, 5), torch.randn(6, 4)
    with pytest.raises(TypeError, match=r"A must have a floating dtype"):
        pysnell.kernel_merge(A.to(dtype), B)
    with pytest.raises(TypeError, match=r"B must have a floating dtype"):
        pysnell.kernel_merge(A, B.to(dtype))
    with pytest.raises(TypeError, match=r"delta must have a floating dtype"):
        pysnell.sparsify(torch.ones(4, 4).to(dtype), 0.5)
    with pytest.raises(TypeError, match=r"x must have a floating dtype"):
        pysnell.topk_mask_(torch.ones(4, 4).to(dtype), k=2)
    with pytest.raises(TypeError, match=r"x must have a floating dtype"):
        pysnell.topk_mask(torch.ones(4, 4).to(dtype), sparsity=0.5)
    w1, w2 = torch.randn(2, 3, 5), torch.randn(3, 2, 2)
    with pytest.raises(TypeError, match=r"x must have a floating dtype"):
        pysnell.monarch_matmul(torch.ones(4, 10).to(dtype), w1, w2)
    with pytest.raises(TypeError, match=r"w1 must have a floating dtype"):
        pysnell.monarch_matmul(torch.ones(4, 10), w1.to(dtype), w2)
    mon = pysnell.MonarchLinear(10, 7, nblocks=3)
    snap = snapshot(mon)
    with pytest.raises(TypeError, match=r"x must have a floating dtype"):
        mon(torch.ones(2, 10).to(dtype))
    assert_unchanged(mon, snap)
    with pytest.raises(TypeError, match=r"weight must have a floating dtype"):
        pysnell.monarch_project(torch.ones(8, 8).to(dtype), 2)


def test_non_tensor_arguments():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        pysnell.topk_mask_([1.0, 2.0], k=1)
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        pysnell.SNELLLinear(nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        pysnell.MonarchLinear.from_linear(nn.Conv1d(3, 3, 1))


# ---------------------------------------------------------------- devices ("meta" plays a second device)


def test_parameters_and_input_on_different_devices():
    lay = layer(m=6, n=5)
    snap = snapshot(lay)
    x_meta = torch.randn(3, 5, device="meta")
    with pytest.raises(ValueError, match=r"one device.*x on meta"):
        lay(x_meta)
    assert_unchanged(lay, snap)
    A, B = torch.randn(4, 5), torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"one device.*B on meta"):
        pysnell.kernel_merge(A, B.to("meta"))
    with pytest.raises(ValueError, match=r"one device.*bias on meta"):
        pysnell.snell_linear(torch.randn(3, 5), lay.base.weight, torch.randn(6, device="meta"), A, B, sparsity=0.5)
    with pytest.raises(ValueError, match=r"one device.*alpha on meta"):
        pysnell.kernel_merge(A, B, kernel="rbf", alpha=torch.tensor(1.0, device="meta"))
    w1, w2 = torch.randn(2, 3, 5), torch.randn(3, 2, 2)
    with pytest.raises(ValueError, match=r"one device.*w2 on meta"):
        pysnell.monarch_matmul(torch.randn(4, 10), w1, w2.to("meta"))
    mon = pysnell.MonarchLinear(10, 7, nblocks=3)
    snap = snapshot(mon)
    with pytest.raises(ValueError, match=r"one device.*x on meta"):
        mon(torch.randn(2, 10, device="meta"))
    assert_unchanged(mon, snap)


# ---------------------------------------------------------------- top-k k / mode


@pytest.mark.parametrize("k", [-1, 13, 100])
def test_k_out_of_range(k):
    x = torch.randn(3, 4)
    x0 = x.clone()
    with pytest.raises(ValueError, match=r"k must be in \[0, numel=12\]"):
        pysnell.topk_mask_(x, k=k)
    with pytest.raises(ValueError, match=r"k must be in \[0, numel=12\]"):
        pysnell.topk_mask(x, k=k)
    assert torch.equal(x, x0)


def test_k_and_sparsity_together_or_neither():
    x = torch.randn(3, 4)
    x0 = x.clone()
    with pytest.raises(ValueError, match="exactly one of sparsity"):
        pysnell.topk_mask_(x, k=2, sparsity=0.5)
    with pytest.raises(ValueError, match="exactly one of sparsity"):
        pysnell.topk_mask_(x)
    with pytest.raises(TypeError, match="k must be an int"):
        pysnell.topk_mask_(x, k=2.0)
    with pytest.raises(TypeError, match="k must be an int"):
        pysnell.topk_mask_(x, k=True)
    assert torch.equal(x, x0)


# ---------------------------------------------------------------- Monarch shapes


def test_monarch_factors_that_do_not_chain():
    x = torch.randn(4, 10)
    w1 = torch.randn(2, 3, 5)  # k=2, q=3, p=5: k·p = 10, k·q = 6
    with pytest.raises(ValueError, match=r"do not chain.*k·q=6.*l·r=8"):
        pysnell.monarch_matmul(x, w1, torch.randn(4, 2, 2))
    with pytest.raises(ValueError, match=r"x has 9 features but w1 .* expects k·p=10"):
        pysnell.monarch_matmul(torch.randn(4, 9), w1, torch.randn(3, 2, 2))
    with pytest.raises(ValueError, match=r"w1 must be 3-D"):
        pysnell.monarch_matmul(x, torch.randn(10, 6), torch.randn(3, 2, 2))
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        pysnell.monarch_matmul(x, w1, torch.randn(3, 2, 2), torch.randn(5))


@pytest.mark.parametrize("size", [(3, 8, 4), (8, 3, 4), (5, 5, 6)])
def test_nblocks_larger_than_the_features(size):
    n, m, b = size
    with pytest.raises(ValueError, match=rf"nblocks={b} must not exceed"):
        pysnell.MonarchLinear(n, m, nblocks=b)
    with pytest.raises(ValueError, match=rf"nblocks={b} must not exceed"):
        pysnell.MonarchLinear.from_linear(nn.Linear(n, m), nblocks=b)
    with pytest.raises(ValueError, match=rf"nblocks={b} must not exceed"):
        pysnell.monarch_project(torch.randn(m, n), b)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_nblocks_not_a_positive_int(bad):
    with pytest.raises(ValueError, match="nblocks must be a positive int"):
        pysnell.MonarchLinear(8, 8, nblocks=bad)


# ---------------------------------------------------------------- failing calls leave state untouched


def test_failed_merge_calls_leave_the_layer_untouched(seed):
    lay = layer()
    snap = snapshot(lay)
    with pytest.raises(RuntimeError, match="not merged"):
        lay.unmerge()
    assert_unchanged(lay, snap)
    lay.merge()
    snap = snapshot(lay)
    with pytest.raises(RuntimeError, match="already merged"):
        lay.merge()
    assert_unchanged(lay, snap)


def test_failed_inject_leaves_the_model_untouched():
    model = TinyViT(img_size=8, patch=2, dim=24, depth=2, heads=2, num_classes=5)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="target_modules"):
        pysnell.inject(model, pysnell.SNELLConfig(target_modules=["typo"]))
    assert_unchanged(model, snap)
    # qkv (72 outputs) cannot form 5 groups: found after other layers were already built
    cfg = pysnell.SNELLConfig(target_modules=VIT_TARGETS, modules_to_save=["head"], out_groups={"qkv": 5})
    with pytest.raises(ValueError, match="out_groups"):
        pysnell.inject(model, cfg)
    assert_unchanged(model, snap)
    assert getattr(model, "pysnell_config", None) is None


def test_failed_load_adapter_leaves_the_model_untouched(tmp_path):
    donor = TinyViT(img_size=8, patch=2, dim=24, depth=2, heads=2, num_classes=5)
    pysnell.inject(donor, pysnell.SNELLConfig(target_modules=VIT_TARGETS, modules_to_save=["head"], r=4))
    pysnell.save_adapter(donor, str(tmp_path))
    # same names, different width: the head (modules_to_save) no longer fits
    other = TinyViT(img_size=8, patch=2, dim=24, depth=2, heads=2, num_classes=7)
    snap = snapshot(other)
    with pytest.raises(ValueError, match="head"):
        pysnell.load_adapter(other, str(tmp_path))
    assert_unchanged(other, snap)
    assert getattr(other, "pysnell_config", None) is None
    # already injected: nothing copied before the mismatch is found
    injected = copy.deepcopy(other)
    pysnell.inject(injected, pysnell.SNELLConfig(target_modules=VIT_TARGETS, modules_to_save=["head"], r=4))
    snap = snapshot(injected)
    with pytest.raises(ValueError, match="head"):
        pysnell.load_adapter(injected, str(tmp_path))
    assert_unchanged(injected, snap)


def test_adapter_with_an_invalid_sparsity_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    donor = TinyViT(img_size=8, patch=2, dim=24, depth=2, heads=2, num_classes=5)
    pysnell.inject(donor, pysnell.SNELLConfig(target_modules=VIT_TARGETS, r=4))
    pysnell.save_adapter(donor, str(tmp_path))
    weights = next(p for p in tmp_path.iterdir() if p.suffix == ".safetensors")
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith("blocks.1.mlp.fc2.sparsity"))
    state[key] = torch.tensor(1.5, dtype=torch.float64)
    save_file(state, str(weights))
    model = TinyViT(img_size=8, patch=2, dim=24, depth=2, heads=2, num_classes=5)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc2\.sparsity"):
        pysnell.load_adapter(model, str(tmp_path))
    assert_unchanged(model, snap)


def test_other_bad_layer_arguments():
    for name in ("dropout", "drop_path"):
        for bad in (-0.1, 1.0):
            with pytest.raises(ValueError, match=name):
                layer(**{name: bad})
    with pytest.raises(ValueError, match="target_modules is required"):
        pysnell.SNELLConfig()
