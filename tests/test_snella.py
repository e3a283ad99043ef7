"""SNELLA (spec/SNELL.md §5): schedule, allocation, importance EMAs, the snella kernel's gradient,
checkpointing, a short TinyViT training run and bad input."""

from __future__ import annotations

import copy
import io
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pysnell
from pysnell import snella
from pysnell.models import VIT_TARGETS, TinyViT
from pysnell.snella import SNELLAAllocator, allocate_nonzeros, cubic_budget
from pysnell.train import snella_step


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: intra-op threads only fight over the 2 shared cores (≈10× slower under load).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_vit(sparsity=0.5, kernel="snella", mode="reference", dim=32, depth=2):
    model = TinyViT(dim=dim, depth=depth)
    cfg = pysnell.SNELLConfig(
        target_modules=VIT_TARGETS, kernel=kernel, r=4, sparsity=sparsity, mode=mode, modules_to_save=["head"]
    )
    return pysnell.inject(model, cfg)


def _two_layer_model(dtype=torch.float32):
    model = nn.Sequential(nn.Linear(7, 5), nn.GELU(), nn.Linear(5, 3))
    pysnell.inject(model, pysnell.SNELLConfig(target_modules=["0", "2"], kernel="snella", r=4, sparsity=0.3))
    return model.to(dtype)


def _sparsities(model):
    return {name: float(layer.sparsity) for name, layer in pysnell.adapter.snell_layers(model)}


def _train(model, allocator, steps, first=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for e in range(first, first + steps):
        x = torch.randn(8, 1, 8, 8, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        snella_step(model, F.cross_entropy(model(x), y), opt, allocator, e)
    return opt


# ---------------------------------------------------------------------------------------------
# Budget schedule
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("warmup,final,total", [(0, 0, 10), (3, 2, 20), (5, 0, 9), (0, 4, 7), (10, 10, 101)])
def test_cubic_budget_schedule(seed, warmup, final, total):
    v_init, v_tgt = random.Random(seed).uniform(5e3, 1e4), random.Random(seed + 1).uniform(0, 5e3)
    budget = lambda e: cubic_budget(e, v_init, v_tgt, warmup, final, total)
    span = total - final - warmup
    for e in range(0, warmup + 1):
        assert budget(e) == v_init
    for e in (total - final + 1, total, total + 1, total + 50):
        assert budget(e) == v_tgt
    assert budget(total - final) == pytest.approx(v_tgt, rel=1e-12)  # the cubic meets V_tgt
    mid = warmup + span / 2
    assert budget(mid) == pytest.approx(v_tgt + (v_init - v_tgt) / 8, rel=1e-12)
    e = warmup + 1
    assert budget(e) == pytest.approx(v_tgt + (v_init - v_tgt) * (1 - 1 / span) ** 3, rel=1e-12)
    values = [budget(e) for e in range(total + 3)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    # s_target < s_init: the same cubic, growing.
    grow = [cubic_budget(e, v_tgt, v_init, warmup, final, total) for e in range(total + 3)]
    assert all(a <= b for a, b in zip(grow, grow[1:])) and grow[0] == v_tgt and grow[-1] == v_init


def test_allocator_budget_is_rounded_schedule(seed):
    model = _tiny_vit()
    total_size = sum(layer.out_features * layer.in_features for _, layer in pysnell.adapter.snell_layers(model))
    alloc = SNELLAAllocator(model, 0.1, 0.9, total_steps=30, warmup=4, final=6)
    assert alloc.budget(0) == alloc.budget(4) == round(0.9 * total_size)
    assert alloc.budget(25) == alloc.budget(30) == alloc.budget(99) == round((1 - 0.9) * total_size)
    assert alloc.budget(14) == round(0.1 * total_size + 0.8 * total_size / 8)
    grow = SNELLAAllocator(model, 0.9, 0.1, total_steps=30, warmup=4, final=6)
    assert grow.budget(0) < grow.budget(14) < grow.budget(30) == round(0.9 * total_size)


# ---------------------------------------------------------------------------------------------
# Allocation
# ---------------------------------------------------------------------------------------------
def test_allocation_redistributes_remainder_exactly():
    # Layer 0 wants 450 but holds 10; its excess goes to the others in proportion to π.
    assert allocate_nonzeros(500, [10, 1000, 1000], [0.9, 0.05, 0.05]) == [10, 245, 245]
    # Unnormalised scores are fine; the floors' remainder is handed back too.
    assert allocate_nonzeros(10, [100, 100, 100], [1.0, 1.0, 1.0]) == [4, 3, 3]
    # Shares below one entry: one each to the largest shares.
    assert allocate_nonzeros(3, [100] * 5, [5, 4, 3, 2, 1]) == [2, 1, 0, 0, 0]
    assert allocate_nonzeros(0, [4, 5], [1, 2]) == [0, 0]
    assert allocate_nonzeros(9, [4, 5], [1, 0]) == [4, 5]  # zero-score layer filled only once the others are full


@pytest.mark.parametrize("scores", [[0.0, 0.0, 0.0], [float("nan"), 1.0, 2.0], [0.0, float("inf"), 1.0]])
def test_allocation_degenerate_scores_fall_back_to_size(scores):
    assert allocate_nonzeros(600, [100, 300, 800], scores) == [50, 150, 400]


def test_allocation_random_properties(seed):
    rng = random.Random(seed)
    for _ in range(300):
        layers = rng.randint(1, 12)
        sizes = [rng.choice([1, 3, rng.randint(1, 5000)]) for _ in range(layers)]
        kinds = [0.0, 1e-30, rng.random(), rng.random() * 1e6]
        scores = [rng.choice(kinds) for _ in range(layers)]
        budget = rng.randint(0, sum(sizes))
        alloc = allocate_nonzeros(budget, sizes, scores)
        assert sum(alloc) == budget
        assert all(0 <= v <= n for v, n in zip(alloc, sizes))
        total = math.fsum(scores)
        if total > 0:
            # Uncapped layers get at least their floor share of the first round.
            for v, n, s in zip(alloc, sizes, scores):
                assert v >= min(n, math.floor(budget * s / total))


def test_reserve_keeps_every_layer_alive():
    assert snella._reserve_one_each([0, 7, 3, 0], [5, 9, 9, 2]) == [1, 5, 3, 1]
    with pytest.raises(ValueError, match="one non-zero per layer"):
        snella._reserve_one_each([0, 1], [5, 5])


def test_allocate_nonzeros_bad_input():
    with pytest.raises(ValueError, match="budget"):
        allocate_nonzeros(11, [5, 5], [1, 1])
    with pytest.raises(ValueError, match="budget"):
        allocate_nonzeros(-1, [5, 5], [1, 1])
    with pytest.raises(ValueError, match="scores"):
        allocate_nonzeros(3, [5, 5], [1, -1])
    with pytest.raises(ValueError, match="scores has 1"):
        allocate_nonzeros(3, [5, 5], [1])


def test_step_without_importance_is_uniform_and_exact(seed):
    model = _tiny_vit()
    alloc = SNELLAAllocator(model, 0.2, 0.7, total_steps=10)
    assert alloc.step(10)  # no update_importance yet: all-zero scores (the public code crashes here)
    rows = alloc.allocation()
    assert sum(r["nonzeros"] for r in rows.values()) == alloc.budget(10)
    for r in rows.values():
        assert r["nonzeros"] <= r["size"]
        assert r["sparsity"] == pytest.approx(0.7, abs=2.0 / r["size"])
        assert r["sparsity"] == 1 - r["nonzeros"] / r["size"]


# ---------------------------------------------------------------------------------------------
# Importance EMAs
# ---------------------------------------------------------------------------------------------
def test_importance_emas_match_hand_computation(seed):
    model = _two_layer_model(torch.float64)
    b1, b2 = 0.7, 0.6
    alloc = SNELLAAllocator(model, 0.3, 0.6, total_steps=10, beta1=b1, beta2=b2)
    layers = dict(pysnell.adapter.snell_layers(model))
    factors = {f"{n}.{f}": getattr(layer, f) for n, layer in layers.items() for f in ("snell_A", "snell_B")}
    hand_i = {k: torch.zeros_like(p) for k, p in factors.items()}
    hand_u = {k: torch.zeros_like(p) for k, p in factors.items()}
    for step in range(4):
        for p in factors.values():
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.1)
            p.grad = torch.randn_like(p)
        factors["0.snell_A"].grad[0, 1] = float("nan")
        skipped = "2.snell_B" if step == 2 else None
        if skipped:
            factors[skipped].grad = None
        alloc.update_importance()
        for key, p in factors.items():
            if key == skipped:
                continue
            imp = (p.detach() * p.grad).abs()
            imp[torch.isnan(imp)] = 0.0
            hand_i[key] = b1 * hand_i[key] + (1 - b1) * imp
            hand_u[key] = b2 * hand_u[key] + (1 - b2) * (imp - hand_i[key]).abs()
        if step == 0:
            # U uses the UPDATED Ī: from zeros, U1 = (1−β2)·β1·I (the previous Ī would give (1−β2)·I).
            p = factors["2.snell_A"]
            torch.testing.assert_close(alloc.ema_uncertainty["2.snell_A"], (1 - b2) * b1 * (p * p.grad).abs())
        for key in factors:
            torch.testing.assert_close(alloc.ema_importance[key], hand_i[key], rtol=1e-12, atol=0)
            torch.testing.assert_close(alloc.ema_uncertainty[key], hand_u[key], rtol=1e-12, atol=0)
    assert alloc.ema_importance["0.snell_A"][0, 1] == hand_i["0.snell_A"][0, 1]  # NaN did not spread
    expected = [
        (hand_i[f"{n}.snell_A"] * hand_u[f"{n}.snell_A"]).mean()
        + (hand_i[f"{n}.snell_B"] * hand_u[f"{n}.snell_B"]).mean()
        for n in layers
    ]
    assert alloc.scores() == pytest.approx([float(v) for v in expected], rel=1e-12)


def test_multi_tensor_update_matches_reference(seed):
    shapes = [(4, 33), (17, 4), (1, 1), (8, 130)]
    thetas = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    grads[1][3, 2] = float("nan")
    grads[2][0, 0] = float("inf")
    emas_i = [torch.rand(s) for s in shapes]
    emas_u = [torch.rand(s) for s in shapes]
    expected = [
        snella.importance_update_reference(t, g, i, u, 0.85, 0.8) for t, g, i, u in zip(thetas, grads, emas_i, emas_u)
    ]
    snella.importance_update_(thetas, grads, emas_i, emas_u, 0.85, 0.8)
    for (ref_i, ref_u), got_i, got_u in zip(expected, emas_i, emas_u):
        assert torch.isfinite(got_i).all() and torch.isfinite(got_u).all()
        torch.testing.assert_close(got_i, ref_i, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got_u, ref_u, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The snella kernel's gradient
# ---------------------------------------------------------------------------------------------
def _snella_scalars():
    alpha = torch.empty((), dtype=torch.float64).uniform_(0.5, 1.5).requires_grad_()
    beta = torch.empty((), dtype=torch.float64).uniform_(-0.2, 0.2).requires_grad_()
    gamma = torch.empty((), dtype=torch.float64).uniform_(0.3, 1.2).requires_grad_()
    return alpha, beta, gamma


@pytest.mark.parametrize("out_groups", [1, 3])
def test_snella_kernel_merge_gradcheck(seed, out_groups):
    A = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    coeffs = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    alpha, beta, gamma = _snella_scalars()

    def f(A, B, coeffs, alpha, beta, gamma):
        return pysnell.kernel_merge(
            A, B, kernel="snella", pieces=2, coeffs=coeffs, alpha=alpha, beta=beta, gamma=gamma, out_groups=out_groups
        )

    assert torch.autograd.gradcheck(f, (A, B, coeffs, alpha, beta, gamma))


def test_snella_layer_mask_mode_gradcheck(seed):
    layer = pysnell.SNELLLinear(nn.Linear(5, 6), r=4, sparsity=0.4, kernel="snella", mode="mask").double().eval()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    alpha, beta, gamma = _snella_scalars()

    def f(x, A, B, alpha, beta, gamma):
        params = {"snell_A": A, "snell_B": B, "snell_alpha": alpha, "snell_beta": beta, "snell_gamma": gamma}
        return torch.func.functional_call(layer, params, (x,))

    assert torch.autograd.gradcheck(f, (x, A, B, alpha, beta, gamma))
    # The mask really bites: 40% of ΔW is zeroed.
    S = layer.delta_weight()
    assert int((S == 0).sum()) == 30 - round(0.6 * 30)


# ---------------------------------------------------------------------------------------------
# Allocator on a model: phases, checkpoint, EMA copies, training
# ---------------------------------------------------------------------------------------------
def test_phases_interval_and_final_freeze(seed):
    model = _tiny_vit()
    alloc = SNELLAAllocator(model, 0.3, 0.8, total_steps=12, warmup=2, final=3, interval=2)
    _train(model, alloc, 2)
    assert set(_sparsities(model).values()) == {0.3}  # warm-up: s_init everywhere
    _train(model, alloc, 1, first=3)
    assert set(_sparsities(model).values()) == {0.3}  # 3 % interval != 0: untouched
    _train(model, alloc, 1, first=4)
    after4 = _sparsities(model)
    assert len(set(after4.values())) > 1
    assert sum(r["nonzeros"] for r in alloc.allocation().values()) == alloc.budget(4)
    _train(model, alloc, 5, first=5)  # through step 9 = T − t_f
    _train(model, alloc, 1, first=10)  # first final step: one allocation at V_tgt
    frozen = _sparsities(model)
    assert alloc.frozen and sum(r["nonzeros"] for r in alloc.allocation().values()) == alloc.budget(12)
    _train(model, alloc, 4, first=11)
    assert _sparsities(model) == frozen


def _merge_kwargs(layer):
    kwargs = layer._snell_kwargs()
    kwargs.pop("mode")
    return kwargs


def test_training_moves_sparsity_and_keeps_budget(seed):
    model = _tiny_vit(mode="mask")
    alloc = SNELLAAllocator(model, 0.5, 0.8, total_steps=8, warmup=1, final=2)
    _train(model, alloc, 9, seed=seed)
    rows = alloc.allocation()
    sparsities = [r["sparsity"] for r in rows.values()]
    assert max(sparsities) - min(sparsities) > 0.05  # moved away from uniform
    total = sum(r["size"] for r in rows.values())
    assert sum(r["nonzeros"] for r in rows.values()) == round(0.2 * total) == alloc.budget(9)
    assert sum((1 - s) * r["size"] for s, r in zip(sparsities, rows.values())) == pytest.approx(
        alloc.budget(9), abs=1e-6
    )
    for name, layer in pysnell.adapter.snell_layers(model):
        r = rows[name]
        assert 1 <= r["nonzeros"] <= r["size"] and 0 <= float(layer.sparsity) < 1
        # The layer really keeps v_l entries (per-group thresholds may differ by < out_groups). Entries
        # tied with the v_l-th largest |ΔW| are kept all or none (the threshold is strict), so each
        # tie there may move the count by one more.
        S = layer.delta_weight()
        kept = int(torch.count_nonzero(S))
        delta = pysnell.kernel_merge(layer.snell_A, layer.snell_B, **_merge_kwargs(layer)).detach()
        mags = delta.abs().flatten().sort(descending=True).values
        n = r["nonzeros"]
        boundary_ties = int((mags == mags[n - 1]).sum()) - 1
        assert abs(kept - n) < layer.out_groups + boundary_ties or kept == n
    table = alloc.table()
    assert "blocks.1.mlp.fc2" in table and table.splitlines()[-1].startswith("total")


def test_checkpoint_round_trip(seed):
    model = _tiny_vit()
    alloc = SNELLAAllocator(model, 0.4, 0.85, total_steps=10, warmup=1, final=2, interval=1)
    _train(model, alloc, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "allocator": alloc.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = _tiny_vit(sparsity=0.4)
    resumed.load_state_dict(ckpt["model"])
    alloc2 = SNELLAAllocator(resumed, 0.4, 0.85, total_steps=10, warmup=1, final=2, interval=1)
    alloc2.load_state_dict(ckpt["allocator"])
    assert _sparsities(resumed) == _sparsities(model)
    assert alloc2.allocation() == alloc.allocation()
    assert alloc2.num_updates == alloc.num_updates == 4 and alloc2.last_step == 4
    # Both continue identically (same data, fresh optimizers on both sides).
    _train(model, alloc, 3, first=5, seed=7)
    _train(resumed, alloc2, 3, first=5, seed=7)
    for key in alloc.ema_importance:
        torch.testing.assert_close(alloc2.ema_importance[key], alloc.ema_importance[key], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(alloc2.ema_uncertainty[key], alloc.ema_uncertainty[key], rtol=1e-5, atol=1e-12)
    assert alloc2.allocation().keys() == alloc.allocation().keys()
    assert sum(r["nonzeros"] for r in alloc2.allocation().values()) == alloc2.budget(7)

    with pytest.raises(ValueError, match="total_steps: saved 10 vs 11"):
        SNELLAAllocator(resumed, 0.4, 0.85, total_steps=11, warmup=1, final=2).load_state_dict(ckpt["allocator"])
    other = _tiny_vit(depth=1)
    with pytest.raises(ValueError, match="SNELL layers"):
        SNELLAAllocator(other, 0.4, 0.85, total_steps=10, warmup=1, final=2).load_state_dict(ckpt["allocator"])


def test_ema_copies_carry_the_allocation(seed):
    model = _tiny_vit()
    ema = copy.deepcopy(model)
    alloc = SNELLAAllocator(model, 0.5, 0.9, total_steps=6, final=1)
    _train(model, alloc, 6)
    assert len(set(_sparsities(model).values())) > 1
    # load_state_dict (what an EMA-model reset or checkpoint load does) carries every s_l.
    ema.load_state_dict(model.state_dict())
    assert _sparsities(ema) == _sparsities(model)
    # timm's ModelEmaV2 averages every state entry, buffers included: the sparsities move too...
    decay = 0.9
    fresh = _tiny_vit(sparsity=0.5)
    with torch.no_grad():
        for ema_v, model_v in zip(fresh.state_dict().values(), model.state_dict().values()):
            ema_v.copy_(decay * ema_v + (1 - decay) * model_v)
    for name, s in _sparsities(fresh).items():
        assert s == pytest.approx(decay * 0.5 + (1 - decay) * _sparsities(model)[name])
    # ...and copy_sparsity_to pins them to exactly s_l.
    alloc.copy_sparsity_to(fresh)
    assert _sparsities(fresh) == _sparsities(model)


def test_timm_model_ema_carries_sparsity(seed):
    try:
        from timm.utils import ModelEmaV2
    except Exception as exc:  # noqa: BLE001 - timm cannot be imported on the CPU box (torchvision mismatch)
        pytest.skip(f"timm not importable: {exc}")
    model = _tiny_vit()
    ema = ModelEmaV2(model, decay=0.0)
    alloc = SNELLAAllocator(model, 0.5, 0.9, total_steps=6, final=1)
    _train(model, alloc, 6)
    ema.update(model)
    assert _sparsities(ema.module) == _sparsities(model)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"s_init": -0.1}, ValueError, "s_init must be in"),
        ({"s_init": 1.0}, ValueError, "s_init must be in"),
        ({"s_init": float("nan")}, ValueError, "s_init"),
        ({"s_init": "0.5"}, TypeError, "s_init"),
        ({"s_target": 1.0}, ValueError, "s_target must be in"),
        ({"s_target": 2.5}, ValueError, "s_target must be in"),
        ({"total_steps": 5, "warmup": 3, "final": 2}, ValueError, "total_steps must exceed"),
        ({"total_steps": 0}, ValueError, "total_steps"),
        ({"total_steps": 10.0}, TypeError, "total_steps"),
        ({"warmup": -1}, ValueError, "warmup"),
        ({"final": -2}, ValueError, "final"),
        ({"interval": 0}, ValueError, "interval"),
        ({"beta1": 1.0}, ValueError, "beta1"),
        ({"beta2": -0.5}, ValueError, "beta2"),
        ({"s_target": 0.9999}, ValueError, "s_target is too close to 1"),
    ],
)
def test_allocator_bad_input(kwargs, error, match):
    model = _two_layer_model()
    args = {"s_init": 0.1, "s_target": 0.5, "total_steps": 10, **kwargs}
    with pytest.raises(error, match=match):
        SNELLAAllocator(model, **args)


def test_allocator_bad_model_and_step():
    with pytest.raises(ValueError, match="no SNELLLinear"):
        SNELLAAllocator(nn.Sequential(nn.Linear(4, 4)), 0.1, 0.5, total_steps=10)
    with pytest.raises(TypeError, match="model"):
        SNELLAAllocator("model", 0.1, 0.5, total_steps=10)
    model = _two_layer_model()
    alloc = SNELLAAllocator(model, 0.6, 0.1, total_steps=10)  # s_target < s_init: allowed
    assert alloc.budget(10) > alloc.budget(0)
    with pytest.raises(ValueError, match="step"):
        alloc.step(-1)
    with pytest.raises(ValueError, match="different model"):
        snella_step(_two_layer_model(), torch.zeros((), requires_grad=True), None, alloc, 1)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_allocator_on_cuda_matches_cpu_without_sync(seed):
    model = _tiny_vit(dim=64, depth=3)
    gpu_model = copy.deepcopy(model).cuda()
    cpu_alloc = SNELLAAllocator(model, 0.3, 0.8, total_steps=10, warmup=1, final=2)
    gpu_alloc = SNELLAAllocator(gpu_model, 0.3, 0.8, total_steps=10, warmup=1, final=2)
    for _ in range(3):
        for (_, a), (_, b) in zip(pysnell.adapter.snell_layers(model), pysnell.adapter.snell_layers(gpu_model)):
            for f in ("snell_A", "snell_B"):
                g = torch.randn_like(getattr(a, f))
                getattr(a, f).grad = g
                getattr(b, f).grad = g.cuda()
        cpu_alloc.update_importance()
        torch.cuda.set_sync_debug_mode("error")
        try:
            gpu_alloc.update_importance()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for key, value in cpu_alloc.ema_importance.items():
        torch.testing.assert_close(gpu_alloc.ema_importance[key].cpu(), value, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(
            gpu_alloc.ema_uncertainty[key].cpu(), cpu_alloc.ema_uncertainty[key], rtol=1e-5, atol=1e-9
        )
    assert gpu_alloc.scores() == pytest.approx(cpu_alloc.scores(), rel=1e-4)
    gpu_alloc.step(5)
    assert sum(r["nonzeros"] for r in gpu_alloc.allocation().values()) == gpu_alloc.budget(5)
    x = torch.randn(4, 1, 8, 8, device="cuda")
    gpu_model(x).sum().backward()  # the new sparsities run on the GPU path
