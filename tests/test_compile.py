"""torch.compile over SNELL and Monarch layers: one graph, same outputs and gradients as eager.

The backend ops are torch.library custom ops (pysnell/_library.py): opcheck validates their schemas
and fake implementations, and the compiled graphs must contain them as opaque nodes.
"""

import pytest
import torch
from torch import nn

import pysnell
from pysnell import _backend, _library
from pysnell.ops.snell.reference import KernelParams, SnellSpec

HAS_CUDA = torch.cuda.is_available()


class Net(nn.Module):
    """SNELL (piecewise, grouped rbf, snella) and Monarch layers, sizes not multiples of anything."""

    def __init__(self):
        super().__init__()
        self.inp = pysnell.SNELLLinear(nn.Linear(23, 21), r=4, sparsity=0.7)
        self.mon = pysnell.MonarchLinear(21, 18, nblocks=4)
        self.qkv = pysnell.SNELLLinear(nn.Linear(18, 18), r=4, sparsity=0.5, kernel="rbf", out_groups=3)
        self.out = pysnell.SNELLLinear(nn.Linear(18, 5), r=6, pieces=3, sparsity=0.4, kernel="snella")

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.relu(self.mon(h))
        return self.out(self.qkv(h) * h)


class GraphRecorder:
    """A torch.compile backend that keeps every graph it is given and runs it as is."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def call_targets(self):
        # autograd.Function bodies are traced into subgraphs (forward and backward): look inside them too.
        modules = [m for gm in self.graphs for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]
        return [str(n.target) for m in modules for n in m.graph.nodes if n.op == "call_function"]


def _grads(model, x):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None] + [x.grad.clone()]


def _run(model, fn, x):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (y.square().sum() + y.sum()).backward()
    return y.detach(), _grads(model, x)


def _assert_close_all(got, want, **tol):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


def test_ops_pass_opcheck(seed):
    """Schemas, fake implementations and aliasing rules of every custom op (torch.library.opcheck)."""
    A, B = torch.randn(4, 11), torch.randn(9, 4)
    params = (torch.tensor([0.1, -0.1]), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0.0))
    spec = ("piecewise", 2, "reference", 3)
    x2, w = torch.randn(7, 11), torch.randn(9, 11)
    sparsity = torch.tensor(0.6, dtype=torch.float64)
    y2, t = torch.ops.pysnell.snell_layer_forward(x2, w, None, A, B, *params, sparsity, 0.0, *spec)
    samples = [
        (torch.ops.pysnell.snell_merge, (A, B, *params, *spec)),
        (
            torch.ops.pysnell.snell_merge_backward,
            (torch.randn(9, 11), A, B, *params, *spec, [True, False, False, False]),
        ),
        (torch.ops.pysnell.snell_layer_forward, (x2, w, torch.randn(9), A, B, *params, sparsity, 0.0, *spec)),
        (torch.ops.pysnell.snell_layer_forward, (x2, None, None, A, B, *params, None, 0.3, *spec)),
        (
            torch.ops.pysnell.snell_layer_backward,
            (
                torch.randn(7, 9),
                x2,
                w,
                A,
                B,
                *params,
                sparsity,
                0.0,
                t,
                *spec,
                [True, False, True, True, True] + [False] * 4,
            ),
        ),
        (torch.ops.pysnell.monarch_forward, (torch.randn(5, 10), torch.randn(3, 4, 4), torch.randn(3, 4, 4), None, 11)),
        (
            torch.ops.pysnell.monarch_backward,
            (torch.randn(5, 11), torch.randn(5, 10), torch.randn(3, 4, 4), torch.randn(3, 4, 4), [True, True, False]),
        ),
        (torch.ops.pysnell.topk_threshold, (torch.randn(3, 17), None, 0.25)),
        (torch.ops.pysnell.topk_mask_, (torch.randn(5, 7), sparsity, 0.0, None, True)),
        (torch.ops.pysnell.topk_mask_, (torch.randn(13), None, 0.0, 4, False)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_wrappers_match_backend_contract(seed):
    """The wrappers keep the backend signatures: None for gradients not asked for, tensors otherwise."""
    A, B = torch.randn(4, 6), torch.randn(8, 4)
    params = KernelParams(torch.tensor([0.1, -0.1]), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0.0))
    spec = SnellSpec("linear", 2, "mask", 2)
    G = torch.randn(8, 6)
    grads = _library.snell_merge_backward(G, A, B, params, spec, (True, False, False, False))
    torch.testing.assert_close(grads[0], B.t() @ G)
    torch.testing.assert_close(grads[1], G @ A.t())
    assert grads[2] is not None and torch.count_nonzero(grads[2]) == 0  # linear kernel ignores the coefficients
    assert grads[3] is None and grads[4] is None and grads[5] is None
    x = torch.randn(4, 9)
    out, t, packed = _library.topk_mask_(x, 0.5, None, False)
    assert out is x and packed is None and t.shape == () and t.dtype == torch.float32
    # The eager path and the registered op agree exactly.
    x2 = torch.randn(5, 6)
    y_eager, t_eager = _library.snell_layer_forward(x2, None, None, A, B, params, spec, 0.5)
    y_op, t_op = torch.ops.pysnell.snell_layer_forward(x2, None, None, A, B, *params, None, 0.5, *spec)
    torch.testing.assert_close(y_eager, y_op, rtol=0, atol=0)
    torch.testing.assert_close(t_eager, t_op, rtol=0, atol=0)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_model_matches_eager_without_graph_breaks(seed, backend, dynamic, monkeypatch):
    backend.set_backend("torch")
    model = Net()
    x = torch.randn(3, 5, 23)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    want_y, want_grads = _run(model, model, x)
    recorder = GraphRecorder()
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic, backend=recorder)
    # The backend is picked inside the opaque op at run time, never while dynamo traces.
    picks = []
    real_pick = _backend.pick

    def recording_pick(op, device, size=None):
        picks.append((op, torch.compiler.is_compiling()))
        return real_pick(op, device, size)

    monkeypatch.setattr(_backend, "pick", recording_pick)
    got_y, got_grads = _run(model, compiled, x)
    assert picks and not any(tracing for _, tracing in picks), picks
    assert {op for op, _ in picks} >= {"snell.layer_forward", "snell.layer_backward", "monarch.forward"}
    torch.testing.assert_close(got_y, want_y, rtol=1e-5, atol=1e-6)
    _assert_close_all(got_grads, want_grads, rtol=1e-5, atol=1e-6)
    targets = recorder.call_targets()
    assert any("pysnell.snell_layer_forward" in t for t in targets)
    assert any("pysnell.monarch_forward" in t for t in targets)
    assert not any("_backend" in t for t in targets)

    # A second batch size: dynamic shapes reuse the graph, static ones recompile; both stay exact.
    x_other = torch.randn(2, 7, 23)
    want_y, want_grads = _run(model, model, x_other)
    got_y, got_grads = _run(model, compiled, x_other)
    torch.testing.assert_close(got_y, want_y, rtol=1e-5, atol=1e-6)
    _assert_close_all(got_grads, want_grads, rtol=1e-5, atol=1e-6)


def test_compiled_aot_graph_and_training_step(seed, backend):
    """AOTAutograd (forward + backward graphs through the fake implementations) and an optimizer step."""
    backend.set_backend("torch")
    torch.manual_seed(seed)
    model = Net()
    twin = Net()
    twin.load_state_dict(model.state_dict())
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    opt_a = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt_b = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.1)
    for _step in range(3):
        x = torch.randn(4, 23)
        for fn, opt in ((model, opt_a), (compiled, opt_b)):
            opt.zero_grad()
            fn(x).square().mean().backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_compiled_functional_ops(seed, backend):
    """A float sparsity (a constant of the graph) and the in-place top-k op compile without breaks too."""
    backend.set_backend("torch")
    x, w = torch.randn(6, 10), torch.randn(8, 10)
    A, B = torch.randn(4, 10, requires_grad=True), torch.randn(8, 4, requires_grad=True)

    def layer(x, A, B):
        return pysnell.snell_linear(x, w, None, A, B, sparsity=0.6, kernel="sigmoid")

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    want = layer(x, A, B)
    dA, dB = torch.autograd.grad(want.sum(), (A, B))
    got = compiled(x, A, B)
    gA, gB = torch.autograd.grad(got.sum(), (A, B))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gA, dA)
    torch.testing.assert_close(gB, dB)

    def mask(t):
        return pysnell.topk_mask_(t, sparsity=0.5)

    data = torch.randn(7, 9)
    eager_copy, compiled_copy = data.clone(), data.clone()
    _, t_eager = mask(eager_copy)
    _, t_compiled = torch.compile(mask, fullgraph=True, backend="aot_eager")(compiled_copy)
    torch.testing.assert_close(compiled_copy, eager_copy, rtol=0, atol=0)  # mutated in place, like eager
    torch.testing.assert_close(t_compiled, t_eager, rtol=0, atol=0)

    def masked_copy(t):
        return pysnell.topk_mask(t, k=5)[0]

    src = torch.randn(4, 6, requires_grad=True)
    (g_eager,) = torch.autograd.grad(masked_copy(src).sum(), src)
    (g_comp,) = torch.autograd.grad(torch.compile(masked_copy, fullgraph=True, backend="aot_eager")(src).sum(), src)
    torch.testing.assert_close(g_comp, g_eager, rtol=0, atol=0)
    assert int(g_comp.sum()) == 5


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernels", ["auto", "triton"])
def test_compiled_model_on_gpu_with_kernels(seed, backend, kernels):
    """Inductor on CUDA with the kernel backends: one graph, same outputs and gradients as eager."""
    backend.set_backend(kernels)
    model = Net().cuda()
    x = torch.randn(8, 33, 23, device="cuda")
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    want_y, want_grads = _run(model, model, x)
    ran = _backend.last_backend("snell.layer_forward")
    compiled = torch.compile(model, fullgraph=True)
    got_y, got_grads = _run(model, compiled, x)
    assert _backend.last_backend("snell.layer_forward") == ran  # the same kernels run inside the graph
    torch.testing.assert_close(got_y, want_y, rtol=1e-4, atol=1e-5)
    _assert_close_all(got_grads, want_grads, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want_bf16 = model(x)
        got_bf16 = compiled(x)
    torch.testing.assert_close(got_bf16.float(), want_bf16.float(), rtol=2e-2, atol=2e-2)


def test_op_outputs_are_fresh_aligned_and_distinct(seed, backend, monkeypatch):
    """A backend may return views into one buffer (e.g. scalar gradients sliced from a partial-sum vector):
    the op still returns separate tensors that start at offset 0 (inductor checks 16-byte alignment)."""
    from pysnell.ops.snell import reference as ref

    def packed_merge_backward(G, A, B, params, spec, need):
        dA, dB, dcoeffs, *scalars = ref.merge_backward(G, A, B, params, spec, need)
        packed = torch.stack([torch.zeros(()), *scalars])  # slot 0 unused: every view starts mid-storage
        return dA, dB, dcoeffs, packed[1], packed[2], packed[3]

    monkeypatch.setitem(_backend._registry["snell.merge_backward"], "torch", packed_merge_backward)
    backend.set_backend("torch")
    A, B, G = torch.randn(4, 7), torch.randn(5, 4), torch.randn(5, 7)
    params = KernelParams(torch.tensor([0.1, -0.1]), torch.tensor(0.7), torch.tensor(1.3), torch.tensor(0.2))
    spec = SnellSpec("rbf", 2, "reference", 1)
    want = ref.merge_backward(G, A, B, params, spec, (False, True, True, True))
    got = torch.ops.pysnell.snell_merge_backward(G, A, B, *params, *spec, [False, True, True, True])
    scalars = got[3:]
    assert all(t.storage_offset() == 0 for t in scalars)
    assert len({t.untyped_storage().data_ptr() for t in scalars}) == 3
    for g, w in zip(scalars, want[3:]):
        torch.testing.assert_close(g, w.reshape(g.shape))
