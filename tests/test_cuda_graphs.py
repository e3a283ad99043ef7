"""CUDA graphs: pysnell's layer steps and top-k capture into a graph and replay what eager runs (GPU).

A small layer step is host-bound (launches and Python); capturing it with `torch.cuda.graph` (or
`torch.compile(mode="reduce-overhead")`) removes that cost, but only if nothing on the path syncs
with the host, copies host data to the device, or allocates outside the caching allocator. Each test
warms up on a side stream, captures one step, changes the inputs and the trainable factors in place
(as data loading and the optimizer do), replays, and compares with an eager step on the same data.
The selection is recomputed on the device each step, so a replay that used a stale threshold fails.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pysnell
from benchmarks.harness import cuda_graph
from pysnell import _backend

pytestmark = pytest.mark.gpu

BACKENDS = ("torch", "triton", "cuda")


def _need(op: str, backend_name: str) -> None:
    if not _backend.available(op, backend_name, torch.device("cuda")):
        pytest.skip(f"no {backend_name} kernel for {op} here")


def _replay_then_eager(graph, out, step, grads_of):
    """(replayed output and grads, eager output and grads) on the data now in the static inputs."""
    graph.replay()
    torch.cuda.synchronize()
    replayed = [out.detach().clone()] + [t.grad.clone() for t in grads_of]
    for t in grads_of:
        t.grad = None
    eager_out = step()
    eager = [eager_out.detach().clone()] + [t.grad.clone() for t in grads_of]
    return replayed, eager


def _assert_same(replayed, eager, what):
    # The same kernels in the same order: equal up to summation-order noise where a backend uses
    # atomics. fp32 (the factor gradients, and everything in the fp32 cases) is held tight: a stale
    # threshold changes the kept set and moves them far more; 16-bit tensors get their own rounding.
    for i, (r, e) in enumerate(zip(replayed, eager)):
        tol = {"rtol": 1e-5, "atol": 1e-6} if r.dtype == torch.float32 else {}
        torch.testing.assert_close(r, e, **tol, msg=lambda m, i=i: f"{what} output {i}: {m}")


def _snell_step(layer, lead, dtype):
    """(x, dy, the tensors whose gradients a step writes, the fwd+bwd step) for an SNELLLinear layer,
    its factors spread so that the kept set is well defined."""
    with torch.no_grad():
        layer.snell_A.normal_(0, 0.3)
        layer.snell_B.normal_(0, 0.3)
    x = torch.randn(*lead, layer.in_features, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(*lead, layer.out_features, device="cuda", dtype=dtype)

    def step():
        y = layer(x)
        y.backward(dy)
        return y

    return x, dy, [x, layer.snell_A, layer.snell_B], step


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_snell_layer_step_replays_in_a_cuda_graph(seed, backend, backend_name, dtype):
    _need("snell.layer_forward", backend_name)
    backend.set_backend(backend_name)
    layer = pysnell.SNELLLinear(nn.Linear(96, 80).to(dtype), r=8, sparsity=0.9).cuda()  # fp32 factors
    x, dy, grads_of, step = _snell_step(layer, (50,), dtype)
    graph, out = cuda_graph(step, grads_of)
    with torch.no_grad():  # the next batch, and an optimizer step on the factors
        x.copy_(torch.randn_like(x))
        dy.copy_(torch.randn_like(dy))
        layer.snell_A.add_(torch.randn_like(layer.snell_A), alpha=0.1)
        layer.snell_B.add_(torch.randn_like(layer.snell_B), alpha=0.1)
    replayed, eager = _replay_then_eager(graph, out, step, grads_of)
    _assert_same(replayed, eager, f"SNELLLinear {backend_name} {dtype}")
    assert _backend.last_backend("snell.layer_forward") == backend_name


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_snell_branch_form_step_replays_in_a_cuda_graph(seed, backend, backend_name):
    """Training with dropout and drop-path: the draws (torch's generator, graph-safe) and the keep-mask
    kernels capture. A replay after torch.manual_seed(s) must repeat itself exactly, its dropout must
    act (it differs from the fused form's output), and its gradients must be finite."""
    _need("snell.layer_forward", backend_name)
    backend.set_backend(backend_name)
    layer = pysnell.SNELLLinear(nn.Linear(96, 80), r=8, sparsity=0.9, dropout=0.2, drop_path=0.2).cuda().train()
    x, dy, grads_of, step = _snell_step(layer, (4, 25), torch.float32)
    graph, out = cuda_graph(step, grads_of)
    replays = []
    for _ in range(2):
        torch.manual_seed(seed)
        graph.replay()
        torch.cuda.synchronize()
        replays.append([out.detach().clone()] + [t.grad.clone() for t in grads_of])
    for a, b in zip(*replays):
        assert torch.equal(a, b)
    assert all(torch.isfinite(t).all() for t in replays[0])
    with torch.no_grad():
        fused = layer.eval()(x)
    assert not torch.allclose(replays[0][0], fused, atol=1e-4)
    assert _backend.last_backend("snell.dropout_apply") == backend_name


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_monarch_layer_step_replays_in_a_cuda_graph(seed, backend, backend_name):
    _need("monarch.forward", backend_name)
    backend.set_backend(backend_name)
    layer = pysnell.MonarchLinear(96, 80, nblocks=4).cuda()
    x = torch.randn(70, 96, device="cuda", requires_grad=True)
    dy = torch.randn(70, 80, device="cuda")
    grads_of = [x, *layer.parameters()]

    def step():
        y = layer(x)
        y.backward(dy)
        return y

    graph, out = cuda_graph(step, grads_of)
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
        dy.copy_(torch.randn_like(dy))
        for p in layer.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)
    replayed, eager = _replay_then_eager(graph, out, step, grads_of)
    _assert_same(replayed, eager, f"MonarchLinear {backend_name}")


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("numel", [300 * 1000, 4096 * 1024])  # full-row rounds; the sampled path
def test_topk_mask_replays_in_a_cuda_graph(seed, backend, backend_name, numel):
    _need("topk.mask_", backend_name)
    backend.set_backend(backend_name)
    src = torch.randn(numel, device="cuda")
    work = torch.empty_like(src)

    def step():
        work.copy_(src)
        _, t = pysnell.topk_mask_(work, sparsity=0.9)
        return torch.cat([work, t.reshape(1)])

    graph, out = cuda_graph(step)
    src.copy_(torch.randn_like(src) * 3)
    graph.replay()
    torch.cuda.synchronize()
    replayed = out.clone()
    eager = step()
    assert torch.equal(replayed, eager)  # exact selection: bit for bit
