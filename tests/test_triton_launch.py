"""_host.launch: a direct launch is exactly the launch Triton's own path makes.

Without a GPU, `_aot.fake_launches()` runs Triton's whole launch path for sm_90 (compiling with its
bundled ptxas) up to the launcher, which records its arguments. In a subprocess (the interpreter
must be off), every launch `_host.launch` makes directly (skipping Triton's path) is followed by the
same call through `kernel[grid]`, and the two recorded launches must be identical: grid, stream,
compiled function (one per binary), packed metadata, launch metadata, hooks and every parameter
value. This runs over every kernel family (top-k, the SNELL layer, Monarch, dropout), each call
twice. Then each way a call can specialise differently must take Triton's path. On a GPU every test
runs with direct launches on; one test compares on and off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    from pysnell.functional import kernel_params
    from pysnell.ops.monarch.function import monarch_shapes
    from pysnell.ops.snell.reference import KernelParams, SnellSpec
    from pysnell.triton_kernels import _aot, _host, monarch, snell, topk as tk

    def same(a, b):
        # launch metadata: a fresh LazyDict per launch (name, function, stream), compared by content
        a, b = ([v.get() if type(v).__name__ == "LazyDict" else v for v in s] for s in (a, b))
        return len(a) == len(b) and all(
            x is y or (type(x) is type(y) and not isinstance(x, torch.Tensor) and x == y) for x, y in zip(a, b)
        )

    out = {"mismatches": [], "checked": 0}

    def observe(kernel, grid, args, kwargs):
        # a direct launch just happened: Triton's own path must launch exactly the same
        mine = launches[-1]
        kernel[grid](*args, **kwargs)
        theirs = launches.pop()
        out["checked"] += 1
        if not same(mine, theirs):
            out["mismatches"].append(repr(kernel))

    torch.manual_seed(0)
    base = torch.randn(4096 * 1024 + 1)
    n = m = 96
    A, B = torch.rand(8, n) * 0.1, torch.rand(3 * m, 8) * 0.1
    x, W, dy = (torch.randn(s, dtype=torch.bfloat16) for s in ((40, n), (3 * m, n), (40, 3 * m)))
    t3 = torch.zeros(3)

    def snell_step(kernel, groups):
        params = KernelParams(*kernel_params(A, kernel, 2, 0.1))
        spec = SnellSpec(kernel, 2, "reference", groups)
        snell.layer_forward(x, W, None, A, B, params, spec, 0.9)
        snell.layer_backward(dy, x, W, A, B, params, spec, 0.9, t3[:groups], (True,) * 9)

    w1s, w2s = monarch_shapes(256, 192, 4)
    w1, w2 = torch.randn(w1s, dtype=torch.bfloat16), torch.randn(w2s, dtype=torch.bfloat16)
    xm, dym = torch.randn(24, 256, dtype=torch.bfloat16), torch.randn(24, 192, dtype=torch.bfloat16)

    def monarch_step():
        monarch.monarch_forward(xm, w1, w2, None, 192)
        monarch.monarch_backward(dym, xm, w1, w2, (True, True, True))

    keep = torch.rand(40, n) > 0.1
    calls = {
        "top-k sample path, fp32": lambda: tk.topk_mask_(base[:-1].clone(), 0.9, None, True),
        "top-k misaligned view": lambda: tk.topk_mask_(base[1:], 0.9, None, False),
        "top-k device sparsity": lambda: tk.topk_mask_(base[:-1].clone(), torch.tensor(0.75), None, True),
        "top-k k-mode, odd bf16 row": lambda: tk.topk_mask_(torch.randn(1001).bfloat16(), None, 123, True),
        "top-k 3 groups": lambda: tk.topk_threshold(torch.randn(3, 5000), 0.5),
        "SNELL piecewise": lambda: snell_step("piecewise", 1),
        "SNELL snella, 3 groups": lambda: snell_step("snella", 3),
        "Monarch 256->192": monarch_step,
        "dropout": lambda: snell.dropout_apply(x, snell.dropout_pack(keep), torch.ones(40)),
    }
    with _aot.fake_launches() as launches:
        _host._observer = observe
        for name, call in calls.items():
            for on in (False, True):
                with _host.use_relaunch(on):
                    _host._SITES.clear()
                    counts = []
                    for _ in range(2):  # a first call, and the same call again
                        n0, c0 = len(launches), out["checked"]
                        call()
                        counts.append([len(launches) - n0, out["checked"] - c0])
                    out[f"{name} {on}"] = counts

        # Each way of specialising differently takes Triton's path (no direct launch).
        record = []
        real_launch = _host.launch

        def first(kernel, grid, *args, **kwargs):
            if kernel is tk._round_kernel and not record:
                record.append((grid, args, kwargs))
            return real_launch(kernel, grid, *args, **kwargs)

        tk.launch = first
        tk.topk_mask_(base[:-1].clone(), 0.9, None, True)
        tk.launch = real_launch
        grid, args, kwargs = record[0]
        kernel = tk._round_kernel
        i_launch, i_n = 6, 10  # positions of `launch` (not specialised) and `n` (specialised)

        def direct(args2, kwargs2=kwargs, grid2=grid):
            _host._SITES.clear()
            _host.launch(kernel, grid, *args, **kwargs)
            before = _host.replays
            _host.launch(kernel, grid2, *args2, **kwargs2)
            return _host.replays - before

        def with_arg(i, value):
            return args[:i] + (value,) + args[i + 1 :]

        x0 = args[0]
        out["variants"] = {
            "same arguments": direct(args),
            "launch number 2": direct(with_arg(i_launch, 2)),
            "new tensor, same layout": direct(with_arg(0, torch.empty_like(x0))),
            "other grid": direct(args, grid2=(grid[0] + 1, grid[1])),
            "launch number 2**31 (i64)": direct(with_arg(i_launch, 2**31)),
            "n not a multiple of 16": direct(with_arg(i_n, args[i_n] + 1)),
            "n equal to 1": direct(with_arg(i_n, 1)),
            "misaligned tensor": direct(with_arg(0, torch.empty(x0.numel() + 1)[1:])),
            "bf16 tensor": direct(with_arg(0, x0.bfloat16())),
            "constexpr changed": direct(args, {**kwargs, "SAMPLE_ROUNDS": kwargs["SAMPLE_ROUNDS"] + 1}),
            "constexpr bool for int": direct(args, {**kwargs, "SAMPLE_ROUNDS": bool(kwargs["SAMPLE_ROUNDS"])}),
            "option changed": direct(args, {**kwargs, "num_warps": kwargs["num_warps"] // 2}),
            "keyword dropped": direct(args, {k: v for k, v in kwargs.items() if k != "enable_fp_fusion"}),
            "callable grid": direct(args, grid2=lambda meta: grid),
        }
        with _host.use_relaunch(False):
            out["variants"]["relaunch off"] = direct(with_arg(i_launch, 2))
        _host._observer = None

    # The compile-only harness sees every launch (the sm_90 checks and launch_cost rely on it).
    with _aot.compile_only() as captured:
        tk.topk_mask_(base[:-1].clone(), 0.9, None, True)
    out["compile_only launches"] = len(captured)
    print(json.dumps(out))
    """
)


def _has_nvidia_tools() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists()


@pytest.mark.slow
@pytest.mark.skipif(HAS_CUDA, reason="fake launches without a GPU (the GPU runs the kernels)")
def test_replayed_launches_equal_tritons_own():
    if not _has_nvidia_tools():
        pytest.skip("this Triton has no NVIDIA backend tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.pop("PYSNELL_TRITON_RELAUNCH", None)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mismatches"] == [], out
    # Per call: [launches, direct launches]. Off: every launch is Triton's. On: the first call
    # launches each repeated specialisation directly after its first launch (top-k's rounds), and
    # the same call again launches everything directly; the launch counts never change.
    first_call_direct = {
        "top-k sample path, fp32": 5,  # 2 sample rounds, compaction, 4 rounds, mask: 6 rounds
        "top-k misaligned view": 5,
        "top-k device sparsity": 5,
        "top-k k-mode, odd bf16 row": 3,  # 4 full-row rounds, tie counts, mask
        "top-k 3 groups": 3,  # 4 rounds
        "SNELL snella, 3 groups": 1,  # the column pass, forward and backward alike
    }
    for name in [k.removesuffix(" True") for k in out if k.endswith(" True")]:
        (n_off, d_off), (n_off2, d_off2) = out[f"{name} False"]
        (n_on, d_on), (n_on2, d_on2) = out[f"{name} True"]
        assert d_off == d_off2 == 0 and n_on == n_off == n_on2 == n_off2 > 0, (name, out)
        assert d_on == first_call_direct.get(name, 0), (name, out)
        assert d_on2 == n_on2, (name, out)  # the second call: every launch direct
    assert len([k for k in out if k.endswith(" True")]) == 9
    direct = {"same arguments", "launch number 2", "new tensor, same layout", "other grid"}
    for variant, n_direct in out["variants"].items():
        assert n_direct == (1 if variant in direct else 0), (variant, out["variants"])
    assert out["compile_only launches"] == 8


def test_relaunch_passes_through_under_the_interpreter():
    pytest.importorskip("triton")
    from pysnell.triton_kernels import _host

    if not _host.INTERPRETED:
        pytest.skip("interpreter runs only")
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append((grid, a, k)) or "compiled"

    # the interpreter has no compiled kernel to launch: every launch is the kernel's own, even when on
    before = _host.replays
    with _host.use_relaunch(True):
        assert _host.relaunch_enabled() is False
        assert "unused under the interpreter" in _host.relaunch_state()
        for i in range(3):
            assert _host.launch(Kernel(), (2, 1), i, BLOCK=4) == "compiled"
    assert _host.replays == before and calls == [((2, 1), (i,), {"BLOCK": 4}) for i in range(3)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_with_and_without_replays_agree_on_gpu(dtype):
    pytest.importorskip("triton")
    from pysnell.triton_kernels import _host
    from pysnell.triton_kernels import topk as tk

    x = torch.randn(4096, 4096, device="cuda").to(dtype)
    results = []
    for on in (False, True):
        with _host.use_relaunch(on):
            results.append(tk.topk_mask_(x.clone().view(-1), 0.9, None, True))
    (y0, t0, p0), (y1, t1, p1) = results
    assert torch.equal(y0, y1) and torch.equal(t0, t1) and torch.equal(p0, p1)


@pytest.mark.gpu
def test_snell_and_monarch_with_and_without_direct_launches_agree_on_gpu():
    pytest.importorskip("triton")
    from pysnell.triton_kernels import _host

    import pysnell

    torch.manual_seed(0)
    snell = pysnell.SNELLLinear(torch.nn.Linear(768, 2304, device="cuda"), r=8, sparsity=0.9, out_groups=3)
    monarch = pysnell.MonarchLinear(768, 3072, 4, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 197, 768, device="cuda")
    results = []
    before, backend = _host.replays, pysnell.get_backend()
    pysnell.set_backend("triton")
    try:
        for on in (False, True, True):  # the second on-run launches every kernel directly
            with _host.use_relaunch(on):
                got = []
                for layer, inp in ((snell, x), (monarch, x.bfloat16())):
                    xi = inp.clone().requires_grad_()
                    layer.zero_grad()
                    y = layer(xi)
                    y.backward(torch.ones_like(y))
                    got += [y, xi.grad] + [p.grad.clone() for p in layer.parameters() if p.grad is not None]
                results.append(got)
    finally:
        pysnell.set_backend(backend)
    assert pysnell.last_backend("snell.layer_backward") == "triton"
    assert pysnell.last_backend("monarch.backward") == "triton"
    assert _host.replays > before
    for other in results[1:]:
        assert len(other) == len(results[0])
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def _fake_param(name, constexpr=False, no_spec=False, no_align=False, default=None, has_default=False):
    from types import SimpleNamespace

    return SimpleNamespace(
        name=name,
        is_constexpr=constexpr,
        do_not_specialize=no_spec,
        do_not_specialize_on_alignment=no_align,
        has_default=has_default,
        default=default,
    )


def test_generated_binder_decides_as_the_general_key():
    """A site's generated `bind` (straight-line guards and key) against `_Site.values`/`key` (the
    per-argument loop): over random calls that vary every argument's value and type, two calls share
    a bind key exactly when they share a general key, and bind returns the same values; a type that
    differs from the site's first call fails a guard (the general key then decides)."""
    pytest.importorskip("triton")
    import random

    from pysnell.triton_kernels import _host

    params = [
        _fake_param("x"),
        _fake_param("y", no_align=True),
        _fake_param("n"),
        _fake_param("m", no_spec=True),
        _fake_param("f"),
        _fake_param("p"),
        _fake_param("BLOCK", constexpr=True),
        _fake_param("MODE", constexpr=True),
        _fake_param("D", constexpr=True, default=4, has_default=True),
        _fake_param("z", default=None, has_default=True),
    ]
    kernel = type("FakeJIT", (), {"params": params, "pre_run_hooks": []})()
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    base = torch.empty(64)
    tensors = [base[:8], base[1:9], base[4:12], base.bfloat16()[:8], base.double()[2:10]]
    ints = [0, 1, 2, 16, 17, -16, -1, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**63 - 1, 2**63, 2**64]
    choices = {
        "x": tensors + [None, 3],
        "y": tensors,
        "n": ints + [1.0, True],
        "m": ints,
        "f": [0.5, 2.0, 1, None],
        "p": [None, base[:4], base[1:5]],
        "BLOCK": [16, 32, True, 1, 16.0],
        "MODE": ["a", "b", None],
        "num_warps": [4, 8, 4.0],
    }

    def draw(first=None):
        # the first call has one fixed type per argument; later calls vary around it
        if first is None:
            return {k: rng.choice(v) for k, v in choices.items()}
        return {k: rng.choice(v) if rng.random() < 0.5 else first[k] for k, v in choices.items()}

    def call(c):
        args = (c["x"], c["y"], c["n"])
        kwargs = {k: c[k] for k in ("m", "f", "p", "BLOCK", "MODE", "num_warps")}
        return args, kwargs

    def general(site, args, kwargs):
        given = args + tuple(kwargs.values())
        values = site.values(given)
        return values, site.key(values, given)

    checked = guarded = 0
    for _ in range(40):
        first = draw()
        args, kwargs = call(first)
        site = _host._Site(kernel, args, kwargs)
        assert site.ok
        calls = [first] + [draw(first) for _ in range(30)]
        results = []
        for c in calls:
            a, k = call(c)
            values, bkey = site.bind(a, k)
            gvalues, gkey = general(site, a, k)
            assert list(values) == gvalues, seed
            same_types = all(
                type(c[name]) is type(first[name])
                or (isinstance(c[name], torch.Tensor) and isinstance(first[name], torch.Tensor))
                for name in choices
            )
            assert (bkey is not None) == same_types, (seed, c)
            guarded += bkey is None
            results.append((bkey, gkey))
        for b1, g1 in results:
            for b2, g2 in results:
                if b1 is not None and b2 is not None:
                    checked += 1
                    assert (b1 == b2) == (g1 == g2), seed
    assert checked > 1000 and guarded > 0, (checked, guarded)
