"""The peft bridge: get_peft_model / save_pretrained / from_pretrained / merge_and_unload with SNELL, adapters
moving between peft and pysnell, and the supported peft range (lowest and highest tested here).

The lowest supported peft (and one just below the range) are installed by `make test` into
.venv/peft-<version> (pip --target), and run here in a subprocess with that directory first on the path.
"""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import pysnell
from pysnell import peft_integration as pi

peft = pytest.importorskip("peft")

LOWEST_PEFT = pi.SUPPORTED_PEFT[0]
BELOW_RANGE_PEFT = "0.20.0"
REPO = Path(__file__).resolve().parents[1]


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(10, 16)
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(48, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.embed(x))
        return self.head(torch.tanh(self.proj(torch.relu(self.qkv(h)))) + h)


def _pair():
    a = Toy()
    b = Toy()
    b.load_state_dict(a.state_dict())
    return a, b


def _config(**kw):
    settings = dict(target_modules=["qkv", "proj"], r=4, sparsity=0.6, modules_to_save=["head"])
    settings.update(kw)
    return pysnell.SNELLConfig(**settings)


def _train(model, x, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.fixture(autouse=True)
def registered():
    pi.register()


def test_register_is_idempotent_and_uses_the_mapping_dicts():
    from peft import mapping

    first = pi.register()
    second = pi.register()
    assert first == second
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["SNELL"] is first["config"]
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["SNELL"] is first["tuner"]
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING["SNELL"] == "snell_"
    assert pi.is_registered()
    assert pi.SNELLPeftConfig is first["config"]


def test_version_guard_names_the_supported_range():
    assert pi.check_peft_version("0.21.2") == "0.21.2"
    assert pi.check_peft_version(LOWEST_PEFT) == LOWEST_PEFT
    for bad in ("0.20.0", "0.17.1", "0.22.0", "1.0.0"):
        with pytest.raises(
            RuntimeError, match=r"supports peft>=0\.21\.0,<0\.22\.0, found peft " + bad.replace(".", r"\.")
        ):
            pi.check_peft_version(bad)


def test_get_peft_model_accepts_pysnell_config_and_trains(seed, capsys):
    base, twin = _pair()
    x = torch.randn(6, 10)
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, _config(kernel="rbf"))
    assert isinstance(model.peft_config["default"], pi.SNELLPeftConfig)
    layers = [m for m in model.modules() if isinstance(m, pi.SNELLPeftLinear)]
    assert len(layers) == 2
    assert layers[0].snell_settings["default"]["out_groups"] == 3  # "qkv" gets 3 thresholds, as in pysnell.inject
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".snell_" in n or ".modules_to_save." in n for n in trainable)
    assert any("qkv.snell_alpha" in n for n in trainable)

    # The same seed and config give the same adapter as pysnell.inject: same outputs, same training.
    torch.manual_seed(seed)
    pysnell.inject(twin, _config(kernel="rbf"))
    torch.testing.assert_close(model(x), twin(x), rtol=0, atol=0)
    _train(model, x)
    _train(twin, x)
    torch.testing.assert_close(model(x), twin(x), rtol=1e-6, atol=1e-6)

    model.print_trainable_parameters()
    pysnell.print_trainable_parameters(twin)
    peft_line, pysnell_line = capsys.readouterr().out.strip().splitlines()[-2:]
    assert peft_line.startswith("trainable params:")
    assert peft_line.split("||")[0] == pysnell_line.split("||")[0]  # same trainable count


def test_adapters_move_between_peft_and_pysnell(seed, tmp_path):
    base, pysnell_side = _pair()
    reference = Toy()
    reference.load_state_dict(base.state_dict())
    x = torch.randn(5, 10)
    model = peft.get_peft_model(base, _config(kernel="snella", pieces=2, learnable_coeffs=True))
    _train(model, x)
    y_trained = model(x).detach()

    model.save_pretrained(tmp_path / "peft")
    # peft -> peft
    loaded = peft.PeftModel.from_pretrained(_copy(reference), tmp_path / "peft")
    torch.testing.assert_close(loaded(x), y_trained, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode by default
    # peft -> pysnell
    pysnell.load_adapter(pysnell_side, str(tmp_path / "peft"))
    assert any(isinstance(m, pysnell.SNELLLinear) for m in pysnell_side.modules())
    torch.testing.assert_close(pysnell_side(x), y_trained, rtol=0, atol=0)
    # pysnell -> peft
    pysnell.save_adapter(pysnell_side, str(tmp_path / "pysnell"))
    back = peft.PeftModel.from_pretrained(_copy(reference), tmp_path / "pysnell", is_trainable=True)
    torch.testing.assert_close(back(x), y_trained, rtol=0, atol=0)
    assert any(p.requires_grad for n, p in back.named_parameters() if "snell_A" in n)
    # pysnell -> pysnell
    again = pysnell.load_adapter(_copy(reference), str(tmp_path / "pysnell"))
    torch.testing.assert_close(again(x), y_trained, rtol=0, atol=0)


def _copy(model):
    out = Toy()
    out.load_state_dict(model.state_dict())
    return out


def test_disable_adapter_merge_and_unload(seed, capsys):
    base, plain = _pair()
    x = torch.randn(7, 10)
    y_base = plain(x)
    model = peft.get_peft_model(base, _config(modules_to_save=None))
    _train(model, x)
    y = model(x).detach()
    assert not torch.allclose(y, y_base)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), y_base, rtol=0, atol=0)
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)

    # merge_adapter / unmerge_adapter round trip (fp32: exact up to one rounding)
    weight_before = model.base_model.model.qkv.base_layer.weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model.qkv.base_layer.weight, weight_before, rtol=0, atol=1e-6)

    merged = model.merge_and_unload(progressbar=True)
    assert "Unloading and merging" in capsys.readouterr().err
    assert isinstance(merged.qkv, nn.Linear) and not any("snell" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-6)


def test_bf16_base_keeps_fp32_adapters_and_merges_in_fp32(seed):
    base = Toy().to(torch.bfloat16)
    model = peft.get_peft_model(base, _config(modules_to_save=None, sparsity=0.3))
    layer = model.base_model.model.proj
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.snell_A["default"].dtype == torch.float32 and layer.snell_B["default"].dtype == torch.float32
    model.half()  # a dtype cast must not round the sparsity
    model.to(torch.bfloat16)
    assert layer.sparsity["default"].dtype == torch.float64 and float(layer.sparsity["default"]) == 0.3
    assert layer.snell_A["default"].dtype == torch.bfloat16  # cast on request, like any module

    model = peft.get_peft_model(Toy().to(torch.bfloat16), _config(modules_to_save=None, sparsity=0.3))
    layer = model.base_model.model.proj
    w0 = layer.base_layer.weight.detach().clone()
    delta = layer.delta_weight("default")
    assert delta.dtype == torch.float32
    layer.merge()
    expected = (w0.float() + delta).to(torch.bfloat16)  # one rounding, from fp32
    torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=0)


def test_two_adapters_switch_and_one_runs_at_a_time(seed):
    base, _ = _pair()
    x = torch.randn(3, 10)
    model = peft.get_peft_model(base, _config(modules_to_save=None))
    model.add_adapter("other", _config(modules_to_save=None, kernel="linear", r=2, pieces=1))
    y_default = model(x)
    model.set_adapter("other")
    y_other = model(x)
    assert not torch.allclose(y_default, y_other)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".other" in n for n in trainable)
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(RuntimeError, match="one adapter at a time"):
        model(x)


def test_bad_targets_fail_clearly():
    with pytest.raises(TypeError, match="nn.Linear layers only"):
        peft.get_peft_model(nn.Sequential(nn.Conv1d(2, 2, 1)), pysnell.SNELLConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="r=5 must be divisible by pieces=2"):
        pi.SNELLPeftConfig(target_modules=["qkv"], r=5)


_FLOW = textwrap.dedent(
    """
    import tempfile, torch, peft, pysnell
    from torch import nn
    print("peft", peft.__version__, peft.__file__)
    pysnell.peft_integration.register()  # reachable from the package, without importing the submodule
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    base = make(); ref = make(); ref.load_state_dict(base.state_dict())
    x = torch.randn(4, 6)
    model = peft.get_peft_model(base, pysnell.SNELLConfig(target_modules=["0", "2"], r=2, sparsity=0.5))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad(); model(x).square().sum().backward(); opt.step()
    y = model(x).detach()
    d = tempfile.mkdtemp()
    model.save_pretrained(d)
    fresh = make(); fresh.load_state_dict(ref.state_dict())
    assert torch.equal(peft.PeftModel.from_pretrained(fresh, d)(x), y)
    fresh = make(); fresh.load_state_dict(ref.state_dict())
    assert torch.equal(pysnell.load_adapter(fresh, d)(x), y)
    with model.disable_adapter():
        assert torch.equal(model(x), ref(x))
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x), y)
    print("END TO END OK")
    """
)


def _peft_dir(version: str) -> Path:
    path = Path(os.environ.get("PYSNELL_PEFT_DIR", Path(sys.prefix))) / f"peft-{version}"
    if not (path / "peft").is_dir():
        message = f"peft {version} is not installed in {path} (make test installs it: pip install --target)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _run_with_peft(version: str, script: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(_peft_dir(version)), str(REPO)]))
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=REPO
    )


def test_highest_supported_peft_is_the_installed_one():
    """Every other test in this file runs on the installed peft, the newest supported release line."""
    assert pi.check_peft_version() == peft.__version__


def test_lowest_supported_peft_end_to_end():
    result = _run_with_peft(LOWEST_PEFT, _FLOW)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"peft {LOWEST_PEFT}" in result.stdout and "END TO END OK" in result.stdout


def test_peft_below_the_range_fails_with_a_clear_message():
    result = _run_with_peft(BELOW_RANGE_PEFT, "from pysnell import peft_integration as pi; pi.register()")
    assert result.returncode != 0
    assert f"supports peft>={LOWEST_PEFT}" in result.stderr and f"found peft {BELOW_RANGE_PEFT}" in result.stderr


def test_warnings_are_not_errors_in_normal_use(seed):
    base, _ = _pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = peft.get_peft_model(base, _config())
        model(torch.randn(2, 10)).sum().backward()


def test_peft_snell_model_compiles_without_graph_breaks(seed):
    base, _ = _pair()
    model = peft.get_peft_model(base, _config(kernel="sigmoid"))
    x = torch.randn(4, 10)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    params = [p for p in model.parameters() if p.requires_grad]
    want = torch.autograd.grad(model(x).square().sum(), params)
    got = torch.autograd.grad(compiled(x).square().sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
