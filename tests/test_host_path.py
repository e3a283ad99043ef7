"""The Triton backend's hot paths, watched on CPU: no host value crosses into or out of a tensor.

On a GPU, reading a device value on the host (.item(), bool(t), float(t)) waits for the stream, and
building a tensor from host data (torch.tensor(...), t[i] = 3.0) is a host copy or an extra launch:
either one in every layer's forward serialises the CPU and the GPU. The GPU tests check this with
torch.cuda.set_sync_debug_mode; here, without a GPU, a dispatch mode watches the same paths run under
the Triton interpreter for the aten ops behind them. The sparsity is a Python float: a CPU tensor's
value is read on purpose (free on CPU), a GPU one never is.
"""

from __future__ import annotations

import collections
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pysnell

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# a device value read on the host, or a host value made into a tensor
HOST_CROSSINGS = ("aten._local_scalar_dense", "aten.item", "aten.lift_fresh")


class _Crossings(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(HOST_CROSSINGS):
            self.seen[name] += 1
        return func(*args, **(kwargs or {}))


def _crossings_of(step) -> dict:
    step()  # the first call fills the caches (default constants, compiled kernels)
    with _Crossings() as watch:
        step()
    return dict(watch.seen)


@pytest.fixture
def triton_backend(backend):
    backend.set_backend("triton")
    return backend


@pytest.mark.parametrize("kernel", ["piecewise", "snella"])
def test_snell_layer_step_has_no_host_crossing(seed, triton_backend, kernel):
    x = torch.randn(5, 3, 24, device=DEVICE, requires_grad=True)
    w0, b0 = torch.randn(18, 24, device=DEVICE), torch.randn(18, device=DEVICE)
    A = torch.randn(8, 24, device=DEVICE, requires_grad=True)
    B = torch.randn(18, 8, device=DEVICE, requires_grad=True)

    def step():
        y = pysnell.snell_linear(x, w0, b0, A, B, sparsity=0.75, kernel=kernel, out_groups=3)
        y.sum().backward()

    assert _crossings_of(step) == {}
    assert pysnell.last_backend("snell.layer_backward") == "triton"


def test_snell_branch_form_step_has_no_host_crossing(seed, triton_backend):
    """Training with dropout and drop-path: the draws, the bit packing and both GEMMs stay on the device."""
    x = torch.randn(5, 3, 24, device=DEVICE, requires_grad=True)
    w0, b0 = torch.randn(18, 24, device=DEVICE), torch.randn(18, device=DEVICE)
    A = torch.randn(8, 24, device=DEVICE, requires_grad=True)
    B = torch.randn(18, 8, device=DEVICE, requires_grad=True)

    def step():
        y = pysnell.snell_linear(x, w0, b0, A, B, sparsity=0.75, dropout=0.1, drop_path=0.1, training=True)
        y.sum().backward()

    assert _crossings_of(step) == {}
    assert pysnell.last_backend("snell.dropout_apply") == "triton"
    assert pysnell.last_backend("snell.layer_backward") == "triton"


@pytest.mark.parametrize("sizes", [(64, 64, 4), (22, 22, 4)], ids=["even", "uneven"])
def test_monarch_step_has_no_host_crossing(seed, triton_backend, sizes):
    layer = pysnell.MonarchLinear(*sizes, device=DEVICE)
    x = torch.randn(7, sizes[0], device=DEVICE, requires_grad=True)
    assert _crossings_of(lambda: layer(x).sum().backward()) == {}
    assert pysnell.last_backend("monarch.backward") == "triton"


@pytest.mark.parametrize("how", ["sparsity", "k"])
def test_topk_mask_has_no_host_crossing(seed, triton_backend, how):
    x = torch.randn(37, 29, device=DEVICE)
    kwargs = {"sparsity": 0.9} if how == "sparsity" else {"k": 100}
    assert _crossings_of(lambda: pysnell.topk_mask_(x.clone(), **kwargs)) == {}
    assert pysnell.last_backend("topk.mask_") == "triton"


@pytest.mark.parametrize("family", ["topk", "snell", "monarch"])
def test_kernel_constants_compare_cheaply_at_launch(family):
    # Triton compares every global constant a kernel uses before each launch; tl.constexpr's `!=`
    # costs ~1 µs, so the kernel modules' constants are KernelConstants (a plain value comparison)
    import copy
    import importlib

    import triton.language as tl
    from pysnell.triton_kernels._host import KernelConstant

    module = importlib.import_module(f"pysnell.triton_kernels.{family}")
    constants = {name: v for name, v in vars(module).items() if isinstance(v, tl.constexpr)}
    slow = sorted(name for name, v in constants.items() if type(v) is not KernelConstant)
    assert not slow, f"module-level tl.constexpr in {family}: {slow}"
    for value in constants.values():
        twin = copy.deepcopy(value)  # what Triton keeps from compile time
        assert type(twin) is KernelConstant and (twin != value) is False
        assert (KernelConstant(value.value + 1) != value) is True


def test_torch_backend_builds_no_tensor_from_host_data(seed, backend):
    # The torch backend reads a CPU sparsity on purpose (free there), but must never build a device
    # tensor from host data: on a GPU that is a copy the stream waits for, and a CUDA graph cannot
    # capture it (tests/test_cuda_graphs.py).
    backend.set_backend("torch")
    x = torch.randn(5, 24, device=DEVICE, requires_grad=True)
    layer = pysnell.SNELLLinear(torch.nn.Linear(24, 18), r=8, sparsity=0.9).to(DEVICE)
    monarch = pysnell.MonarchLinear(24, 18, 4, device=DEVICE)
    delta = torch.randn(18, 24, device=DEVICE, requires_grad=True)
    steps = {
        "SNELLLinear": lambda: layer(x).sum().backward(),
        "snell_linear, float sparsity": lambda: (
            pysnell.snell_linear(x, layer.base.weight, None, layer.snell_A, layer.snell_B, sparsity=0.75)
            .sum()
            .backward()
        ),
        "MonarchLinear": lambda: monarch(x).sum().backward(),
        "topk_mask_": lambda: pysnell.topk_mask_(x.detach().clone(), sparsity=0.9),
        "topk_mask (packed mask saved)": lambda: pysnell.topk_mask(x, sparsity=0.9)[0].sum().backward(),
        "sparsify": lambda: pysnell.sparsify(delta, 0.8).sum().backward(),
        "snell_linear, dropout and drop-path": lambda: (
            pysnell.snell_linear(
                x,
                layer.base.weight,
                None,
                layer.snell_A,
                layer.snell_B,
                sparsity=0.75,
                dropout=0.1,
                drop_path=0.1,
                training=True,
            )
            .sum()
            .backward()
        ),
    }
    for name, step in steps.items():
        seen = _crossings_of(step)
        assert "aten.lift_fresh.default" not in seen, (name, seen)
    assert pysnell.last_backend("snell.layer_backward") == "torch"
