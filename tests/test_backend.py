"""Backend selection API: set/get/last, PYSNELL_BACKEND, forced backends falling back on CPU."""

import logging
import os
import subprocess
import sys

import pytest
import torch

import pysnell
from pysnell import _backend


def test_set_and_get_backend(backend):
    for name in ("torch", "triton", "cuda", "auto"):
        pysnell.set_backend(name)
        assert pysnell.get_backend() == name
    pysnell.set_backend("TORCH")
    assert pysnell.get_backend() == "torch"


@pytest.mark.parametrize("bad", ["tpu", "", "cpu", None, 3])
def test_unknown_backend_name_errors(backend, bad):
    before = pysnell.get_backend()
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'cuda', 'triton', 'torch'\)"):
        pysnell.set_backend(bad)
    assert pysnell.get_backend() == before


def test_last_backend_reports_the_backend_that_ran(backend, seed):
    pysnell.set_backend("torch")
    pysnell.sparsify(torch.randn(5, 6), 0.5)
    assert pysnell.last_backend("topk.threshold") == "torch"
    layer = pysnell.SNELLLinear(torch.nn.Linear(6, 4), r=2)
    layer(torch.randn(3, 6)).sum().backward()
    assert pysnell.last_backend("snell.layer_forward") == "torch"
    assert pysnell.last_backend("snell.layer_backward") == "torch"
    everything = pysnell.last_backend()
    assert isinstance(everything, dict) and everything["snell.layer_forward"] == "torch"
    assert pysnell.last_backend("no.such.op") is None


def test_environment_variable_is_validated(monkeypatch):
    for value, expected in (("torch", "torch"), (" Triton ", "triton"), ("", "auto"), ("AUTO", "auto")):
        monkeypatch.setenv("PYSNELL_BACKEND", value)
        assert _backend._env_backend() == expected
    monkeypatch.delenv("PYSNELL_BACKEND")
    assert _backend._env_backend() == "auto"
    monkeypatch.setenv("PYSNELL_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"PYSNELL_BACKEND must be one of .*'gpu'"):
        _backend._env_backend()


def test_environment_variable_at_import():
    # an invalid value stops the import with a clear message (valid values: the test above, in process)
    env = dict(os.environ, PYSNELL_BACKEND="bogus")
    done = subprocess.run(
        [sys.executable, "-c", "import pysnell"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0 and "PYSNELL_BACKEND must be one of" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("forced", ["triton", "cuda"])
def test_forced_backend_without_kernels_falls_back_with_one_warning(backend, monkeypatch, caplog, seed, forced):
    # CPU tensors without the Triton interpreter: neither triton nor cuda can run them.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_backend, "_warned", set())
    pysnell.set_backend(forced)
    delta = torch.randn(7, 9)
    expected = torch.where(delta.abs() > torch.quantile(delta.abs().reshape(-1), 0.5), delta * delta.abs(), 0.0)
    with caplog.at_level(logging.WARNING, logger="pysnell"):
        for _ in range(3):
            out = pysnell.sparsify(delta, 0.5)
            torch.testing.assert_close(out, expected)
            assert pysnell.last_backend("topk.threshold") == "torch"
    records = [r for r in caplog.records if "topk.threshold" in r.getMessage()]
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    message = records[0].getMessage()
    assert f"from {forced} to torch" in message
    assert pysnell.get_backend() == forced  # the request stays; only this call fell back


def test_pick_without_any_implementation_errors(backend):
    with pytest.raises(RuntimeError, match="no implementation of no.such.op"):
        _backend.pick("no.such.op", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown backend"):
        _backend.register("snell.merge", "numpy", lambda *a: None)


def test_a_triton_family_that_fails_to_load_leaves_the_others_and_is_reported(monkeypatch, caplog):
    kernels = pytest.importorskip("pysnell.triton_kernels")
    import pysnell.triton_kernels.monarch as triton_monarch

    from pysnell import env

    def broken():
        raise RuntimeError("simulated")

    monkeypatch.setattr(triton_monarch, "register", broken)
    monkeypatch.setattr(kernels, "FAMILY_ERRORS", {})
    with caplog.at_level(logging.WARNING, logger="pysnell"):
        kernels.register()  # topk and snell register again (idempotent), monarch fails
    assert kernels.FAMILY_ERRORS == {"monarch": "RuntimeError: simulated"}
    assert "Triton monarch kernels failed to load" in caplog.text
    assert "triton" in _backend._registry["snell.layer_forward"] and "triton" in _backend._registry["topk.mask_"]
    report = env.report()
    assert report["backends"]["triton"]["family_errors"] == {"monarch": "RuntimeError: simulated"}
    assert "monarch kernels failed to load: RuntimeError: simulated" in env.format_report(report)


@pytest.fixture
def fake_op(monkeypatch):
    """An op with every backend "available" on a CUDA device (no GPU needed), and its tiers restored."""
    op = "test.sized_op"
    for name in ("cuda", "triton", "torch"):
        _backend.register(op, name, lambda name=name: name)
    monkeypatch.setattr(_backend, "available", lambda op_, name, device: name in _backend._registry.get(op_, {}))
    monkeypatch.setattr(_backend, "_auto_preference", dict(_backend._auto_preference))
    yield op
    _backend._registry.pop(op, None)


def test_auto_order_follows_size_tiers(backend, fake_op):
    cuda = torch.device("cuda")
    assert _backend.pick(fake_op, cuda)[0] == "cuda"  # the default order
    _backend.set_auto_preference(fake_op, ((100, ("cuda", "torch")), (1000, ("torch",)), (None, ("triton", "torch"))))
    assert [_backend.pick(fake_op, cuda, size=s)[0] for s in (1, 100, 101, 1000, 1001)] == [
        "cuda", "cuda", "torch", "torch", "triton"
    ]  # fmt: skip
    assert _backend.pick(fake_op, cuda)[0] == "triton"  # no size: the largest tier
    assert _backend.pick(fake_op, torch.device("cpu"), size=1)[0] == "torch"  # tiers are for CUDA tensors
    _backend.set_auto_preference(fake_op, ("triton", "cuda"))  # a plain order: every size
    assert _backend.pick(fake_op, cuda, size=1)[0] == "triton"


BAD_ORDERS = [
    (),  # nothing
    ((100, ("cuda",)),),  # no last tier without a limit
    ((None, ("cuda",)), (100, ("torch",))),  # a tier after the unlimited one
    ((200, ("cuda",)), (100, ("torch",)), (None, ("torch",))),  # limits not rising
    ((100, ("cuda", "gpu")), (None, ("torch",))),  # unknown backend
    ((100, ()), (None, ("torch",))),  # an empty order
    ("auto",),  # "auto" is not a backend
]


@pytest.mark.parametrize("order", BAD_ORDERS)
def test_bad_auto_order_is_refused(fake_op, order):
    with pytest.raises(ValueError, match="test.sized_op"):
        _backend.set_auto_preference(fake_op, order)


def test_shipped_auto_order_picks_the_measured_winners(backend, monkeypatch):
    """The H200 measurements in pysnell/_cuda_ops.py: the SNELL layer runs CUDA up to 4096×4096 weights and
    Triton above; Monarch runs CUDA up to 512 tokens and never above."""
    from pysnell import _cuda_ops

    monkeypatch.setattr(_backend, "_auto_preference", {})
    _cuda_ops.apply_auto_preference()
    order = _backend._auto_order
    assert order("snell.layer_forward", 768 * 3072)[0] == order("snell.layer_backward", 4096 * 4096)[0] == "cuda"
    assert order("snell.layer_forward", 4096 * 11008)[0] == order("snell.layer_backward", 11008 * 4096)[0] == "triton"
    assert order("monarch.forward", 16)[0] == order("monarch.backward", 512)[0] == "cuda"
    assert "cuda" not in order("monarch.forward", 513) and "cuda" not in order("monarch.backward", 8192)
    assert order("topk.mask_", None)[0] == "cuda"


@pytest.mark.parametrize("op_family", ["snell", "monarch"])
def test_ops_pass_their_size_to_the_dispatcher(backend, monkeypatch, op_family):
    """snell.layer_* pass the weight's entries (out × in), monarch.* the token count."""
    seen = {}
    real_pick = _backend.pick

    def recording_pick(op, device, size=None):
        seen[op] = size
        return real_pick(op, device, size)

    monkeypatch.setattr(_backend, "pick", recording_pick)
    x = torch.randn(2, 7, 40, requires_grad=True)
    if op_family == "snell":
        layer = pysnell.SNELLLinear(torch.nn.Linear(40, 24), r=4)
        layer(x).sum().backward()
        assert (seen["snell.layer_forward"], seen["snell.layer_backward"]) == (24 * 40, 24 * 40)
    else:
        layer = pysnell.MonarchLinear(40, 24, nblocks=4)
        layer(x).sum().backward()
        assert (seen["monarch.forward"], seen["monarch.backward"]) == (14, 14)
