"""The SNELL layer's branch form in training (dropout / drop-path): y = x W0ᵀ + b + (x ⊙ D) Sᵀ.

D = keep bits × row scale, drawn once per call by functional.branch_regularisation; the layer saves the
bits (T·⌈n/8⌉ bytes) and rebuilds x ⊙ D in backward. Checked here: the keep-mask ops of every backend
against the reference bit for bit, the draws' distribution, the layer against the spec's branch form
(transcription oracle) for the same draws, gradients (gradcheck in float64), what forward saves.
"""

import pytest
import torch
import torch.nn.functional as F
from oracles import merge as merge_oracle
from oracles import rel_rmse, sort_threshold
from oracles import sparsify as sparsify_oracle
from torch import nn

import pysnell
from pysnell import _backend, _library
from pysnell.functional import branch_regularisation, kernel_params
from pysnell.ops.snell import reference as ref
from pysnell.ops.snell.function import SNELLBranchFunction
from pysnell.ops.snell.reference import SnellSpec

HAS_CUDA = torch.cuda.is_available()
BACKENDS = ["torch", "triton"]


def _keep_ops(backend):
    _backend._ensure_loaded(backend)
    ops = _backend._registry
    return ops["snell.dropout_pack"][backend], ops["snell.dropout_apply"][backend]


# ---------------------------------------------------------------- the keep-mask ops


@pytest.mark.parametrize("T, n", [(1, 1), (5, 13), (7, 8), (3, 17), (0, 5), (4, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_keep_mask_ops_match_the_reference_bit_for_bit(seed, T, n, dtype):
    pack, apply = _keep_ops("triton")
    keep = torch.rand(T, n) < 0.6
    bits = pack(keep)
    assert bits.dtype == torch.uint8 and bits.shape == (T, ref.packed_width(n))
    assert torch.equal(bits, ref.dropout_pack(keep))
    assert torch.equal(ref.dropout_unpack(bits, n), keep)
    v = torch.randn(T, n).to(dtype)
    row_scale = torch.rand(T) * 3
    for b in (bits, None):
        got = apply(v, b, row_scale)
        want = ref.dropout_apply(v, b, row_scale)
        assert got.dtype == dtype and torch.equal(got, want)
    if T and n:  # the definition: one float32 product per element, dropped entries 0
        expect = (v.float() * keep.float() * row_scale[:, None]).to(dtype)
        assert torch.equal(ref.dropout_apply(v, bits, row_scale), expect)


def test_keep_mask_bit_layout_and_nan(seed):
    keep = torch.zeros(2, 11, dtype=torch.bool)
    keep[0, 0] = keep[0, 9] = keep[1, 7] = True
    bits = ref.dropout_pack(keep)
    assert bits.tolist() == [[1, 2], [128, 0]]  # bit j % 8 of byte j // 8, each row starting a byte
    v = torch.full((2, 11), float("nan"))
    for backend in BACKENDS:
        _, apply = _keep_ops(backend)
        out = apply(v, bits, torch.ones(2))
        assert out.isnan().all()  # a product, as F.dropout: a dropped NaN stays NaN


@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_mask_ops_reject_bad_arguments(backend):
    pack, apply = _keep_ops(backend)
    v = torch.randn(4, 9)
    with pytest.raises(ValueError, match="bits must be uint8 of shape"):
        apply(v, torch.zeros(4, 1, dtype=torch.uint8), torch.ones(4))
    with pytest.raises(ValueError, match="bits must be uint8"):
        apply(v, torch.zeros(4, 2, dtype=torch.int32), torch.ones(4))
    with pytest.raises(ValueError, match="row_scale must be a float tensor of shape"):
        apply(v, None, torch.ones(3))
    with pytest.raises(ValueError, match="keep must be a 2-D"):
        pack(torch.ones(4, 9))


# ---------------------------------------------------------------- the draws


def test_draws_follow_the_rates(seed):
    x = torch.randn(40, 25, 64)  # 40 samples of 25 tokens
    bits, row_scale = branch_regularisation(x, 64, 0.3, 0.25)
    keep = ref.dropout_unpack(bits, 64)
    assert keep.shape == (1000, 64)
    assert abs(keep.float().mean().item() - 0.7) < 0.02  # 64000 draws: 5 standard deviations
    per_sample = row_scale.view(40, 25)
    assert (per_sample == per_sample[:, :1]).all()  # drop-path: a whole sample at once
    scale = torch.tensor(1 / (0.7 * 0.75), dtype=torch.float32)
    assert ((per_sample[:, 0] == 0) | (per_sample[:, 0] == scale)).all()
    assert (per_sample[:, 0] == 0).any() and (per_sample[:, 0] != 0).any()  # P(fail) < 2^-15
    bits, row_scale = branch_regularisation(x, 64, 0.0, 0.5)
    assert bits is None
    bits, row_scale = branch_regularisation(x, 64, 0.5, 0.0)
    assert torch.equal(row_scale, torch.full((1000,), 2.0))
    bits, row_scale = branch_regularisation(torch.randn(64), 64, 0.5, 0.5)  # unbatched: one sample
    assert bits.shape == (1, 8) and row_scale.shape == (1,)


# ---------------------------------------------------------------- the layer


def _layer(m, n, r=4, kernel="piecewise", mode="reference", out_groups=1, dtype=torch.float64, **kw):
    layer = pysnell.SNELLLinear(
        nn.Linear(n, m), r=r, sparsity=0.5, kernel=kernel, mode=mode, out_groups=out_groups, **kw
    ).to(dtype)
    with torch.no_grad():  # well separated magnitudes: the kept set is the same in every backend
        layer.snell_A.normal_(0, 0.5)
        layer.snell_B.normal_(0, 0.5)
    return layer


def _scalars(layer):
    return (layer.snell_coeffs,) + tuple(getattr(layer, f"snell_{k}", None) for k in ("alpha", "beta", "gamma"))


def _oracle_branch(layer, x, bits, row_scale):
    """The spec's branch form with the same draws: x W0ᵀ + b + (x ⊙ D)·Sᵀ, S from the transcription."""
    delta = merge_oracle(
        layer.snell_A, layer.snell_B, layer.kernel, layer.pieces, *_scalars(layer), out_groups=layer.out_groups
    )
    S = sparsify_oracle(delta, float(layer.sparsity), layer.mode, layer.out_groups, threshold=sort_threshold)
    x2 = x.reshape(-1, x.shape[-1])
    xd = x2 * (ref.dropout_unpack(bits, x2.shape[1]).to(x2.dtype) * row_scale.to(x2.dtype)[:, None])
    y2 = F.linear(x2, layer.base.weight, layer.base.bias) + F.linear(xd, S.to(x2.dtype))
    return y2.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize(
    "kernel, mode, out_groups",
    [("piecewise", "reference", 1), ("snella", "paper", 3), ("rbf", "mask", 1), ("linear", "reference", 3)],
)
def test_layer_in_training_is_the_spec_branch_form(seed, backend, backend_name, kernel, mode, out_groups):
    backend.set_backend(backend_name)
    dtype = torch.float64 if backend_name == "torch" else torch.float32
    layer = _layer(m=9, n=13, kernel=kernel, mode=mode, out_groups=out_groups, dtype=dtype, dropout=0.3, drop_path=0.4)
    layer.train()
    x = torch.randn(5, 3, 13, dtype=dtype, requires_grad=True)
    state = torch.get_rng_state()
    y = layer(x)
    torch.set_rng_state(state)
    bits, row_scale = branch_regularisation(x, 13, 0.3, 0.4)  # the layer's draws, drawn again
    want = _oracle_branch(layer, x, bits, row_scale)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(y, want, **tol)
    G = torch.randn_like(y)
    params = [x] + [p for p in layer.parameters() if p.requires_grad]
    for got, exp in zip(torch.autograd.grad(y, params, G), torch.autograd.grad(want, params, G)):
        torch.testing.assert_close(got, exp, **tol)
    assert backend.last_backend("snell.dropout_apply") == backend_name


def test_gradcheck_of_the_branch_function(seed):
    torch.manual_seed(seed)
    n, m, r = 6, 5, 4
    x = torch.randn(7, n, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(m, n, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(m, dtype=torch.float64, requires_grad=True)
    A = torch.randn(r, n, dtype=torch.float64, requires_grad=True)
    B = torch.randn(m, r, dtype=torch.float64, requires_grad=True)
    params = kernel_params(A, "rbf", 2, 0.1, alpha=torch.tensor(1.3, dtype=torch.float64, requires_grad=True))
    bits, row_scale = branch_regularisation(x, n, 0.4, 0.3)
    spec = SnellSpec("rbf", 2, "mask", 1)

    def f(x, weight, bias, A, B, alpha):
        p = (params[0], alpha, params[2], params[3])
        return SNELLBranchFunction.apply(x, weight, bias, A, B, *p, 0.0, spec, bits, row_scale)

    assert torch.autograd.gradcheck(f, (x, weight, bias, A, B, params[1]))


def test_backends_agree_on_the_same_draws(seed, backend):
    layer = _layer(m=10, n=12, dtype=torch.float32, dropout=0.2, drop_path=0.2).train()
    x = torch.randn(4, 3, 12)
    outs = []
    for name in BACKENDS:
        backend.set_backend(name)
        torch.manual_seed(seed)
        outs.append(layer(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_forward_saves_bits_not_the_dropped_input(seed, backend, backend_name):
    """With dropout the layer saves x, the factors and ⌈n/8⌉ bytes per row, never a second (T, n) tensor."""
    backend.set_backend(backend_name)
    T, n, m = 40, 24, 16
    x = torch.randn(T, n, requires_grad=True)

    def saved(layer):
        out = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: out.append(t) or t, lambda t: t):
            layer(x)
        return out

    plain = _layer(m, n, dtype=torch.float32).train()
    regularised = _layer(m, n, dtype=torch.float32, dropout=0.1, drop_path=0.1).train()
    extra = saved(regularised)
    big = [t for t in extra if t.numel() >= T * n and t.dtype != torch.uint8]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()  # only x itself (W0 is m×n = 384 < 960)
    nbytes = sum(t.numel() * t.element_size() for t in extra)
    plain_bytes = sum(t.numel() * t.element_size() for t in saved(plain))
    assert nbytes == plain_bytes + T * ref.packed_width(n) + T * 4  # bits + row scales


def test_backward_holds_at_most_two_input_sized_buffers(seed, backend):
    """The Triton backend's backward transient peak (CPU allocator): x ⊙ D rebuilt next to the branch's
    dx, then that dx next to its masked copy (x ⊙ D freed first), never three T×n buffers at once.
    (The torch reference is not lean: its masking makes float temporaries.)"""
    from test_layers import _peak_and_retained_bytes

    backend.set_backend("triton")
    T, n, m = 512, 128, 16  # T×n dominates everything else
    x = torch.randn(T, n, requires_grad=True)
    layer = _layer(m, n, dtype=torch.float32, dropout=0.1, drop_path=0.1).train()
    y = layer(x)
    peak, _ = _peak_and_retained_bytes(lambda: y.backward(torch.randn(T, m)))
    assert peak < 2.5 * T * n * 4, peak / (T * n * 4)


def test_layers_reading_one_input_save_it_once(seed):
    """q, k, v-style layers over one x: x is saved once (shared storage), each layer adds only its bits."""
    T, n = 30, 16
    x = torch.randn(T, n, requires_grad=True)
    layers = [_layer(8, n, dtype=torch.float32, dropout=0.1).train() for _ in range(3)]
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        # outputs kept alive: a dropped output frees its graph, and the next layer's keep bits could
        # reuse the freed bits' address (one dict key for two layers)
        outputs = [layer(x) for layer in layers]
    assert len(outputs) == 3
    big = [nbytes for nbytes, _ in storages.values() if nbytes >= T * n * 4]
    assert big == [T * n * 4]  # x, once; no dropped copy per layer
    bits = [nbytes for nbytes, dtype in storages.values() if dtype == torch.uint8]
    assert bits == [T * ref.packed_width(n)] * 3  # and each layer's own keep bits


def test_activation_checkpointing_replays_the_same_draws(seed):
    """torch.utils.checkpoint restores the generator for its recomputation: the draws come from it."""
    from torch.utils.checkpoint import checkpoint

    layer = _layer(10, 12, dtype=torch.float32, dropout=0.3, drop_path=0.3).train()
    x = torch.randn(4, 5, 12, requires_grad=True)
    results = []
    for wrap in (lambda f, v: f(v), lambda f, v: checkpoint(f, v, use_reentrant=False)):
        torch.manual_seed(seed)
        y = wrap(layer, x)
        results.append((y, *torch.autograd.grad(y.square().sum(), [x, layer.snell_A, layer.snell_B])))
    for plain, ckpt in zip(*results):
        torch.testing.assert_close(ckpt, plain, rtol=0, atol=0)


def test_functional_rejects_bad_rates():
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    A, B = torch.randn(2, 4), torch.randn(5, 2)
    for name in ("dropout", "drop_path"):
        for bad in (-0.1, 1.0, True, "0.1"):
            with pytest.raises(ValueError, match=name):
                pysnell.snell_linear(x, w, None, A, B, sparsity=0.5, training=True, **{name: bad})


def test_opcheck_of_the_keep_mask_ops(seed):
    keep = torch.rand(6, 11) < 0.5
    bits = _library.snell_dropout_pack(keep)
    for op, args in (
        (torch.ops.pysnell.snell_dropout_pack, (keep,)),
        (torch.ops.pysnell.snell_dropout_apply, (torch.randn(6, 11), bits, torch.rand(6))),
        (torch.ops.pysnell.snell_dropout_apply, (torch.randn(6, 11), None, torch.rand(6))),
    ):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_compiled_branch_form_has_no_graph_breaks(seed):
    layer = _layer(m=7, n=9, dtype=torch.float32, dropout=0.2, drop_path=0.2).train()
    x = torch.randn(3, 4, 9, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    assert y.shape == (3, 4, 7) and x.grad.shape == x.shape and layer.snell_A.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_branch_form_backends_agree_on_gpu(seed, backend, dtype):
    """Every backend sees the same draws: the same output and gradients (bf16 at a ViT-B shape)."""
    layer = _layer(m=3072, n=768, r=8, dtype=torch.float32, dropout=0.1, drop_path=0.1).cuda().train()
    layer.sparsity.fill_(0.9)
    x = torch.randn(8, 197, 768, device="cuda", dtype=dtype, requires_grad=True)
    G = torch.randn(8, 197, 3072, device="cuda", dtype=dtype)
    results = {}
    for name in ("torch", "triton", "cuda"):
        backend.set_backend(name)
        torch.manual_seed(seed)
        y = layer(x)
        grads = torch.autograd.grad(y, [x, layer.snell_A, layer.snell_B], G)
        results[name] = (y.float(), *(g.float() for g in grads))
    # relative RMSE bounds of the SNELL benchmark's checks: output, then gradients
    tols = (3e-2, 6e-2) if dtype == torch.bfloat16 else (1e-4, 5e-3)
    for name in ("triton", "cuda"):
        for i, (got, want) in enumerate(zip(results[name], results["torch"])):
            err = rel_rmse(got, want)
            assert err < tols[min(i, 1)], (name, i, err)
