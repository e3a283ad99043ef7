"""_host.Relaunch: a replayed launch is exactly the launch Triton's own path makes.

Without a GPU, `_aot.fake_launches()` runs Triton's whole launch path for sm_90 (compiling with its
bundled ptxas) up to the launcher, which records its arguments. In a subprocess (the interpreter
must be off), every launch Relaunch replays is followed by the same call through `kernel[grid]`,
and the two recorded launches must be identical: grid, stream, compiled function (one per binary),
packed metadata, launch metadata, hooks and every parameter value. Then each way a call can specialise differently
must take Triton's path. On a GPU the top-k tests run with replays on; one test compares on and off.
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
    from pysnell.triton_kernels import _aot, _host, topk as tk

    def same(a, b):
        # launch metadata: a fresh LazyDict per launch (name, function, stream), compared by content
        a, b = ([v.get() if type(v).__name__ == "LazyDict" else v for v in s] for s in (a, b))
        return len(a) == len(b) and all(
            x is y or (type(x) is type(y) and not isinstance(x, torch.Tensor) and x == y) for x, y in zip(a, b)
        )

    out = {"mismatches": [], "checked": 0}
    first_calls = []
    launch = _host.Relaunch._launch

    def checked(self, grid, *args, **kwargs):
        if not first_calls:
            first_calls.append((self.kernel, grid, args, kwargs))
        before = self.replays
        result = launch(self, grid, *args, **kwargs)
        if self.replays > before:  # replayed: Triton's own path must launch exactly the same
            mine = launches[-1]
            self.kernel[grid](*args, **kwargs)
            theirs = launches.pop()
            out["checked"] += 1
            if not same(mine, theirs):
                out["mismatches"].append(repr(self.kernel))
        return result

    _host.Relaunch._launch = checked
    torch.manual_seed(0)
    base = torch.randn(4096 * 1024 + 1)
    calls = {
        "sample path, fp32": lambda: tk.topk_mask_(base[:-1].clone(), 0.9, None, True),
        "misaligned view": lambda: tk.topk_mask_(base[1:], 0.9, None, False),
        "device sparsity": lambda: tk.topk_mask_(base[:-1].clone(), torch.tensor(0.75), None, True),
        "k-mode, odd bf16 row": lambda: tk.topk_mask_(torch.randn(1001).bfloat16(), None, 123, True),
        "3 groups": lambda: tk.topk_threshold(torch.randn(3, 5000), 0.5),
    }
    with _aot.fake_launches() as launches:
        for name, call in calls.items():
            for on in (False, True):
                with _host.use_relaunch(on):
                    n0, c0 = len(launches), out["checked"]
                    call()
                    out[f"{name} {on}"] = [len(launches) - n0, out["checked"] - c0]

        # Each way of specialising differently takes Triton's path (no replay).
        kernel, grid, args, kwargs = first_calls[0]
        i_launch, i_n = 6, 10  # positions of `launch` (not specialised) and `n` (specialised)

        def replays(args2, kwargs2=kwargs, grid2=grid):
            r = _host.Relaunch(kernel)
            r[grid](*args, **kwargs)
            r[grid2](*args2, **kwargs2)
            return r.replays

        def with_arg(i, value):
            return args[:i] + (value,) + args[i + 1 :]

        x = args[0]
        out["variants"] = {
            "same arguments": replays(args),
            "launch number 2": replays(with_arg(i_launch, 2)),
            "new tensor, same layout": replays(with_arg(0, torch.empty_like(x))),
            "other grid": replays(args, grid2=(grid[0] + 1, grid[1])),
            "launch number 2**31 (i64)": replays(with_arg(i_launch, 2**31)),
            "n not a multiple of 16": replays(with_arg(i_n, args[i_n] + 1)),
            "misaligned tensor": replays(with_arg(0, torch.empty(x.numel() + 1)[1:])),
            "bf16 tensor": replays(with_arg(0, x.bfloat16())),
            "constexpr changed": replays(args, {**kwargs, "SAMPLE_ROUNDS": kwargs["SAMPLE_ROUNDS"] + 1}),
            "constexpr bool for int": replays(args, {**kwargs, "SAMPLE_ROUNDS": bool(kwargs["SAMPLE_ROUNDS"])}),
            "option changed": replays(args, {**kwargs, "num_warps": kwargs["num_warps"] // 2}),
            "keyword dropped": replays(args, {k: v for k, v in kwargs.items() if k != "enable_fp_fusion"}),
            "callable grid": replays(args, grid2=lambda meta: grid),
        }
        with _host.use_relaunch(False):
            out["variants"]["relaunch off"] = replays(with_arg(i_launch, 2))

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
    # launches per call with replays off and on: same count; replays = round launches - 1
    expected_replays = {
        "sample path, fp32": 5,  # 2 sample rounds, compaction, 4 rounds, mask: 6 rounds
        "misaligned view": 5,
        "device sparsity": 5,
        "k-mode, odd bf16 row": 3,  # 4 full-row rounds, tie counts, mask
        "3 groups": 3,  # 4 rounds
    }
    for name, replays in expected_replays.items():
        launches_off, checked_off = out[f"{name} False"]
        launches_on, checked_on = out[f"{name} True"]
        assert checked_off == 0 and launches_on == launches_off, (name, out)
        assert checked_on == replays, (name, out)
    replayed = {"same arguments", "launch number 2", "new tensor, same layout", "other grid"}
    for variant, replays in out["variants"].items():
        assert replays == (1 if variant in replayed else 0), (variant, out["variants"])
    assert out["checked"] == sum(expected_replays.values()) + len(replayed)  # every replay compared
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

    # the interpreter has no compiled kernel to replay: every launch is the kernel's own, even when on
    with _host.use_relaunch(True):
        assert _host.relaunch_enabled() is False
        assert "unused under the interpreter" in _host.relaunch_state()
        r = _host.Relaunch(Kernel())
        for i in range(3):
            assert r[(2, 1)](i, BLOCK=4) == "compiled"
    assert r.replays == 0 and calls == [((2, 1), (i,), {"BLOCK": 4}) for i in range(3)]


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
