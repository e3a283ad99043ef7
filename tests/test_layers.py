"""SNELLLinear: gradients, conformance with the spec transcription, merge, shapes, regularisation, memory."""

import pytest
import torch
import torch.nn.functional as F
from oracles import merge as merge_oracle
from oracles import quantile_threshold, sort_threshold
from oracles import sparsify as sparsify_oracle
from torch import nn

import pysnell
from pysnell.functional import branch_regularisation
from pysnell.ops.snell import reference as ref

MODES = ["reference", "paper", "mask"]


def make_layer(m=6, n=5, r=4, bias=True, dtype=torch.float64, **kw):
    base = nn.Linear(n, m, bias=bias)
    layer = pysnell.SNELLLinear(base, r=r, **kw).to(dtype)
    with torch.no_grad():  # spread the factors: a ΔW with distinct, well separated magnitudes
        layer.snell_A.normal_(0, 0.5)
        layer.snell_B.normal_(0, 0.5)
    return layer


def kernel_tensors(layer):
    return (
        layer.snell_coeffs,
        getattr(layer, "snell_alpha", None),
        getattr(layer, "snell_beta", None),
        getattr(layer, "snell_gamma", None),
    )


def oracle_delta(layer, A=None, B=None, scalars=None, threshold=sort_threshold):
    """S from the transcription. The threshold defaults to the spec's float32 rule on a sort, exactly:
    paper mode's values depend on t's last bit. torch.quantile's kept sets are compared separately."""
    A = layer.snell_A if A is None else A
    B = layer.snell_B if B is None else B
    scalars = kernel_tensors(layer) if scalars is None else scalars
    delta = merge_oracle(A, B, layer.kernel, layer.pieces, *scalars, out_groups=layer.out_groups)
    return sparsify_oracle(delta, float(layer.sparsity), layer.mode, layer.out_groups, threshold=threshold)


def oracle_forward(layer, x, weight=None, bias=None, **kw):
    weight = layer.base.weight if weight is None else weight
    bias = layer.base.bias if bias is None else bias
    S = oracle_delta(layer, **kw)
    return F.linear(x, weight + S.to(weight.dtype), bias)


def trainable(layer):
    return {k: v for k, v in layer.named_parameters() if v.requires_grad}


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out_groups", [1, 3])
@pytest.mark.parametrize("sparsity, mode", [(0.5, "mask"), (0.0, "mask"), (0.0, "reference"), (0.0, "paper")])
def test_layer_gradcheck(seed, bias, out_groups, sparsity, mode):
    layer = make_layer(bias=bias, sparsity=sparsity, mode=mode, out_groups=out_groups)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    A = layer.snell_A.detach().clone().requires_grad_()
    B = layer.snell_B.detach().clone().requires_grad_()
    f = lambda x, A, B: torch.func.functional_call(layer, {"snell_A": A, "snell_B": B}, (x,))
    torch.autograd.gradcheck(f, (x, A, B))


@pytest.mark.parametrize("kernel", ["snella", "rbf"])
def test_layer_gradcheck_kernel_scalars_and_base(seed, kernel):
    # The Function also differentiates the base weight and bias and the kernel's learnable tensors.
    layer = make_layer(sparsity=0.4, mode="mask", kernel=kernel, out_groups=3, learnable_coeffs=True)
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    names = ["snell_A", "snell_B", "snell_coeffs", "snell_alpha", "snell_beta", "snell_gamma"]
    values = [getattr(layer, k).detach().clone().requires_grad_() for k in names]
    weight = layer.base.weight.detach().clone().requires_grad_()
    bias = layer.base.bias.detach().clone().requires_grad_()

    def f(x, weight, bias, *vals):
        return pysnell.snell_linear(
            x,
            weight,
            bias,
            vals[0],
            vals[1],
            sparsity=0.4,
            kernel=kernel,
            pieces=2,
            mode="mask",
            coeffs=vals[2],
            alpha=vals[3],
            beta=vals[4],
            gamma=vals[5],
            out_groups=3,
        )

    torch.autograd.gradcheck(f, (x, weight, bias, *values))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel", ["piecewise", "snella"])
@pytest.mark.parametrize("out_groups", [1, 3])
def test_layer_matches_transcription_forward_and_backward(seed, mode, kernel, out_groups):
    # reference: sg(|ΔW|), paper: t constant — the transcription uses .detach() exactly there.
    layer = make_layer(m=12, n=7, r=4, sparsity=0.6, mode=mode, kernel=kernel, out_groups=out_groups)
    layer.base.weight.requires_grad_(True)
    layer.base.bias.requires_grad_(True)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    inputs = [x] + [p for p in layer.parameters() if p.requires_grad]
    y = layer(x)
    expected = oracle_forward(layer, x)
    torch.testing.assert_close(y, expected)
    G = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs, G)
    exp = torch.autograd.grad(expected, inputs, G)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e)


def test_layer_backward_ignores_a_sparsity_change_after_forward(seed):
    layer = make_layer(m=9, n=8, sparsity=0.7)
    x = torch.randn(4, 8, dtype=torch.float64)
    layer(x).sum().backward()
    reference_grad = layer.snell_A.grad.clone()
    layer.zero_grad()
    y = layer(x)
    layer.set_sparsity(0.0)  # e.g. a SNELLA re-allocation between forward and backward
    y.sum().backward()
    torch.testing.assert_close(layer.snell_A.grad, reference_grad)


# ---------------------------------------------------------------- conformance, merge, shapes


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_layer_float32_conformance_and_delta_weight(seed, mode, sparsity):
    layer = make_layer(m=33, n=21, r=8, dtype=torch.float32, sparsity=sparsity, mode=mode, out_groups=3)
    x = torch.randn(5, 21)
    torch.testing.assert_close(layer(x), oracle_forward(layer, x), rtol=1e-5, atol=1e-5)
    S = layer.delta_weight()
    expected = oracle_delta(layer)
    torch.testing.assert_close(S, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(S != 0, expected != 0)
    assert torch.equal(S != 0, oracle_delta(layer, threshold=quantile_threshold) != 0)  # torch.quantile's set
    S.sum().backward()
    assert layer.snell_A.grad is not None and torch.isfinite(layer.snell_A.grad).all()


def test_default_init_gives_an_effectively_zero_update(seed):
    base = nn.Linear(64, 48)
    layer = pysnell.SNELLLinear(base, r=8, sparsity=0.9)
    d = 8 // 2
    assert float(layer.snell_A.detach().abs().max()) <= 1 / (64 * d) ** 0.5
    assert float(layer.snell_B.detach().abs().max()) <= 1 / (48 * d) ** 0.5
    # ΔW ≠ 0 at init, but the value-scaled sparse update is tiny next to the frozen weight
    assert float(layer.delta_weight().detach().abs().max()) < 1e-2 * float(base.weight.abs().max())
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert set(trainable(layer)) == {"snell_A", "snell_B"}


def test_merge_and_unmerge_float32(seed):
    layer = make_layer(m=17, n=13, r=4, dtype=torch.float32, sparsity=0.7, out_groups=1)
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(3, 13)
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.base.weight, w0 + layer.delta_weight().detach(), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight, w0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_merge_and_unmerge_bfloat16_base(seed):
    base = nn.Linear(24, 18).to(torch.bfloat16)
    layer = pysnell.SNELLLinear(base, r=4, sparsity=0.5)
    with torch.no_grad():
        layer.snell_A.normal_(0, 0.3)
        layer.snell_B.normal_(0, 0.3)
    assert layer.snell_A.dtype == torch.float32  # adapter tensors stay fp32
    w0 = base.weight.detach().clone()
    x = torch.randn(4, 24).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = F.linear(x.float(), w0.float() + oracle_delta(layer).detach(), base.bias.float())
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-2, atol=1e-2)
    layer.unmerge()
    # within one bf16 rounding of the merged weight
    torch.testing.assert_close(base.weight.float(), w0.float(), rtol=2**-7, atol=2**-7 * float(w0.abs().max()))


@pytest.mark.parametrize("lead", [(), (1,), (2, 3), (2, 1, 3)])
def test_input_of_shape_dots_in(seed, lead):
    layer = make_layer(m=9, n=7, dtype=torch.float32, sparsity=0.5)
    x = torch.randn(*lead, 7)
    y = layer(x)
    assert y.shape == (*lead, 9)
    torch.testing.assert_close(y, oracle_forward(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_empty_batch_forward_and_backward(seed, lead, dropout):
    layer = make_layer(m=9, n=7, dtype=torch.float32, sparsity=0.5, dropout=dropout, drop_path=dropout)
    x = torch.randn(*lead, 7, requires_grad=True)
    y = layer(x)
    assert y.shape == (*lead, 9)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(layer.snell_A.grad, torch.zeros_like(layer.snell_A))
    assert torch.equal(layer.snell_B.grad, torch.zeros_like(layer.snell_B))


def test_non_contiguous_input(seed):
    layer = make_layer(m=10, n=6, dtype=torch.float32, sparsity=0.5)
    big = torch.randn(4, 13, 5)
    x = big.permute(2, 0, 1)[:, :, 1:13:2].requires_grad_()  # (5, 4, 6), strided in every dim
    assert not x.is_contiguous() and x.shape[-1] == 6
    xc = x.detach().contiguous().requires_grad_()
    y, yc = layer(x), layer(xc)
    torch.testing.assert_close(y, yc)
    torch.testing.assert_close(y, oracle_forward(layer, xc), rtol=1e-5, atol=1e-5)
    G = torch.randn_like(y).transpose(0, 1).contiguous().transpose(0, 1)  # a non-contiguous gradient too
    params = [layer.snell_A, layer.snell_B]
    for g, gc in zip(torch.autograd.grad(y, [x] + params, G), torch.autograd.grad(yc, [xc] + params, G)):
        torch.testing.assert_close(g, gc)


def test_autocast_bfloat16(seed):
    layer = make_layer(m=12, n=10, dtype=torch.float32, sparsity=0.5)
    x = torch.randn(3, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=3e-2, atol=3e-2)


# ---------------------------------------------------------------- dropout / drop-path


def test_branch_form_in_training_and_fused_form_in_eval(seed):
    layer = make_layer(m=11, n=9, dtype=torch.float32, sparsity=0.5, dropout=0.5)
    x = torch.randn(6, 9, requires_grad=True)
    S = oracle_delta(layer)
    base = F.linear(x, layer.base.weight, layer.base.bias)
    layer.train()
    state = torch.get_rng_state()
    y = layer(x)
    torch.set_rng_state(state)
    bits, row_scale = branch_regularisation(x, 9, 0.5, 0.0)  # the layer's draws, drawn again
    keep = ref.dropout_unpack(bits, 9)
    assert 0 < int(keep.sum()) < keep.numel()
    xd = x * keep * 2.0  # Dropout(0.5): kept entries doubled
    expected = base + F.linear(xd, S)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, layer.eval()(x), atol=1e-3)  # dropout really acted
    G = torch.randn_like(y)
    params = [x, layer.snell_A, layer.snell_B]
    for g, e in zip(torch.autograd.grad(y, params, G), torch.autograd.grad(expected, params, G)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x), F.linear(x, layer.base.weight + S, layer.base.bias), rtol=1e-5, atol=1e-5)


def test_drop_path_drops_whole_samples(seed):
    layer = make_layer(m=11, n=9, dtype=torch.float32, sparsity=0.5, drop_path=0.5).train()
    x = torch.randn(64, 9)
    with torch.no_grad():
        y = layer(x)
        base = layer.base(x)
        branch = F.linear(x, oracle_delta(layer))
    dropped = torch.isclose(y, base, rtol=1e-5, atol=1e-6).all(1)
    scaled = torch.isclose(y, base + branch / 0.5, rtol=1e-4, atol=1e-5).all(1)
    assert (dropped | scaled).all()
    assert dropped.any() and scaled.any()  # P(all 64 samples alike) = 2^-63
    layer.eval()
    torch.testing.assert_close(layer(x), base + branch, rtol=1e-5, atol=1e-5)


def test_training_without_regularisation_is_the_fused_form(seed):
    layer = make_layer(m=11, n=9, dtype=torch.float32, sparsity=0.5).train()
    x = torch.randn(6, 9)
    torch.testing.assert_close(layer(x), layer.eval()(x))


# ---------------------------------------------------------------- the sparsity buffer


def test_sparsity_buffer(seed):
    layer = make_layer(dtype=torch.float32, sparsity=0.7)
    assert layer.sparsity.dtype == torch.float64 and float(layer.sparsity) == 0.7
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    assert "sparsity" in state and float(state["sparsity"]) == 0.7
    layer.half()
    assert layer.sparsity.dtype == torch.float64 and float(layer.sparsity) == 0.7
    assert layer.snell_A.dtype == torch.float16
    layer.to(torch.bfloat16)
    assert layer.sparsity.dtype == torch.float64 and float(layer.sparsity) == 0.7
    layer.float()
    buffer = layer.sparsity
    layer.sparsity = 0.25
    assert layer.sparsity is buffer and float(buffer) == 0.25 and buffer.dtype == torch.float64
    with pytest.raises(ValueError, match="sparsity"):
        layer.sparsity = 1.0
    assert float(layer.sparsity) == 0.25
    other = make_layer(dtype=torch.float32, sparsity=0.1)
    other.load_state_dict(state)
    assert float(other.sparsity) == 0.7
    # the buffer drives the selection: 0.7 of each group's ΔW is zeroed
    S = other.delta_weight()
    assert int((S != 0).sum()) == 30 - 1 - int(0.7 * 29)


def test_sparsity_tensor_assignment_is_validated_and_stays_float64(seed):
    layer = make_layer(dtype=torch.float32, sparsity=0.7)
    layer.sparsity = torch.tensor(0.5)
    assert layer.sparsity.dtype == torch.float64 and float(layer.sparsity) == 0.5
    with pytest.raises(ValueError, match="sparsity"):
        layer.sparsity = torch.tensor(1.5)
    assert float(layer.sparsity) == 0.5


def test_sparsity_snapshot_is_reused_until_the_buffer_changes(seed):
    """A training step copies each layer's sparsity once; any write to the buffer (fill_, load_state_dict,
    assignment of a new tensor) gives the next call a fresh copy, and backward keeps the value forward saw."""
    from pysnell.ops.snell.function import sparsity_snapshot

    layer = make_layer(dtype=torch.float64, sparsity=0.5)
    first = sparsity_snapshot(layer.sparsity)
    assert first is not layer.sparsity and float(first) == 0.5
    assert sparsity_snapshot(layer.sparsity) is first
    with torch.no_grad():
        assert sparsity_snapshot(layer.sparsity) is layer.sparsity  # nothing recorded, nothing copied
    x = torch.randn(7, 5)
    y = layer(x)  # forward sees 0.5
    layer.set_sparsity(0.8)  # in place: the version counter moves
    second = sparsity_snapshot(layer.sparsity)
    assert second is not first and float(second) == 0.8 and float(first) == 0.5
    y.sum().backward()
    got = layer.snell_A.grad.clone()
    layer.snell_A.grad = None
    layer.set_sparsity(0.5)
    layer(x).sum().backward()  # the same step at 0.5 from scratch: identical gradients
    torch.testing.assert_close(layer.snell_A.grad, got, rtol=0, atol=0)
    layer.load_state_dict({**layer.state_dict(), "sparsity": torch.tensor(0.3, dtype=torch.float64)})
    assert float(sparsity_snapshot(layer.sparsity)) == 0.3
    layer.sparsity = torch.tensor(0.625)  # a new tensor object
    assert float(sparsity_snapshot(layer.sparsity)) == 0.625


# ---------------------------------------------------------------- what forward saves, and memory


def _saved_during(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("kernel", ["piecewise", "snella"])
@pytest.mark.parametrize("training", [False, True])
def test_forward_saves_nothing_out_by_in(seed, kernel, training):
    m, n = 37, 29
    layer = make_layer(m=m, n=n, r=4, dtype=torch.float32, sparsity=0.9, kernel=kernel, dropout=0.1, drop_path=0.1)
    layer.train(training)
    x = torch.randn(3, n, requires_grad=True)
    saved, _ = _saved_during(lambda: layer(x))
    weight_storage = layer.base.weight.untyped_storage().data_ptr()
    for t in saved:
        if t.numel() >= m * n or t.shape == (m, n):
            # only the frozen base weight itself (no copy) may be that large: it is needed for dx
            assert t.untyped_storage().data_ptr() == weight_storage, tuple(t.shape)
    if not training:
        # x, W0 (the parameter itself), A, B, coeffs, thresholds; α, β, γ and the sparsity as 0-dim scalars
        shapes = sorted(tuple(t.shape) for t in saved)
        assert shapes == sorted([(3, n), (m, n), (4, n), (m, 4), (2,), (1,)] + [()] * 4)


def _peak_and_retained_bytes(fn):
    """CPU allocator peak and net bytes during fn, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak, current


def test_peak_cpu_memory_is_a_small_multiple_of_the_weight(seed):
    m, n, tokens = 320, 288, 4
    layer = make_layer(m=m, n=n, r=8, dtype=torch.float32, sparsity=0.9)
    x = torch.randn(tokens, n, requires_grad=True)
    unit = m * n * 4
    outs = []
    _, retained = _peak_and_retained_bytes(lambda: outs.append(layer(x)))
    # between forward and backward nothing out×in is alive (only y and the tiny saved tensors)
    assert retained < unit / 4, retained / unit
    # measured 5.0 (forward: two piece distances, their sum, the selection keys) and 5.25 (backward)
    peak, _ = _peak_and_retained_bytes(lambda: outs.pop().sum().backward())
    assert peak <= 6 * unit, peak / unit
    layer.zero_grad()
    peak, _ = _peak_and_retained_bytes(lambda: layer(x).sum().backward())
    assert peak <= 6 * unit, peak / unit

    # the same layer written naively (autograd through cdist and the mask) keeps several m×n alive
    def naive():
        y = oracle_forward(layer, x)
        outs.append(y)

    _, naive_retained = _peak_and_retained_bytes(naive)
    assert naive_retained > 2 * unit


# ---------------------------------------------------------------- activation checkpointing


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_activation_checkpointing_recomputes_the_same_step(seed, backend, backend_name, use_reentrant):
    # torch.utils.checkpoint re-runs the forward in backward: the selection, the dropout mask and the
    # Monarch intermediate must come out the same, so the gradients equal the plain step's bit for bit
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if backend_name == "triton":
        pytest.importorskip("pysnell.triton_kernels")
        if device == "cpu" and not pysnell._backend.triton_interpret():
            pytest.skip("the Triton backend serves CPU tensors only under TRITON_INTERPRET=1")
    backend.set_backend(backend_name)

    def build():
        torch.manual_seed(seed)
        fc1, fc2 = nn.Linear(24, 40), nn.Linear(40, 24)
        model = nn.Sequential(
            pysnell.SNELLLinear(fc1, r=4, sparsity=0.7, dropout=0.1),
            nn.GELU(),
            pysnell.SNELLLinear(fc2, r=4, sparsity=0.5, kernel="rbf", out_groups=3),
            pysnell.MonarchLinear(24, 36, nblocks=4),
        ).to(device)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.3)
        return model.train()

    x = torch.randn(2, 5, 24, device=device)
    grads = []
    for checkpointed in (False, True):
        model = build()
        torch.manual_seed(seed + 1)  # the dropout mask
        xx = x.clone().requires_grad_()
        if checkpointed:
            y = torch.utils.checkpoint.checkpoint(model, xx, use_reentrant=use_reentrant)
        else:
            y = model(xx)
        y.square().sum().backward()
        for op in ("snell.layer_backward", "monarch.backward"):
            assert pysnell.last_backend(op) == backend_name, op
        grads.append([xx.grad] + [p.grad for p in model.parameters() if p.requires_grad])
    for plain, recomputed in zip(*grads):
        assert torch.equal(plain, recomputed)
