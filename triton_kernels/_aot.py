"""Compile pysnell's Triton kernels for an H100 (sm_90) on a machine without a GPU.

Inside `compile_only()` Triton targets sm_90 through a driver that never launches: each kernel
call compiles (Triton's bundled ptxas) and is recorded instead of run, so the host code runs as
on a GPU over CPU tensors that nothing reads. The sm_90 compile checks in tests/ and
benchmarks/launch_cost.py use it. TRITON_INTERPRET must be unset before triton is imported.

Inside `fake_launches()` Triton's whole launch path runs as on a GPU, up to the launcher call,
which records its arguments instead of launching: the tests compare what `_host.launch`
launches directly with what Triton's own path launches.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile

import triton
import triton.runtime.jit as jit
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from . import _host


class CompileOnlyDriver:
    """A Triton driver that targets one CUDA architecture and never launches."""

    def __init__(self, arch: int = 90):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class _FakeUtils:
    def load_binary(self, name, kernel, shared, device):
        # module, function (one per binary: variants of a kernel differ), registers, spills, max threads
        return object(), f"{name}:{hashlib.sha1(kernel).hexdigest()[:12]}", 0, 0, 1024

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132}  # an H100's


class FakeLaunchDriver(CompileOnlyDriver):
    """Compiles for one architecture; each launch appends the launcher's arguments to `launches`."""

    def __init__(self, arch: int = 90):
        super().__init__(arch)
        self.utils = _FakeUtils()
        self.launches = []

    def launcher_cls(self, src, metadata):
        def launch(*args):
            self.launches.append(args)

        return launch


@contextlib.contextmanager
def _active_driver(replacement):
    # the driver in use before (None until Triton first needs one; reset_active would create the
    # default one, which fails without a GPU)
    previous = getattr(driver, "_active", None)
    driver.set_active(replacement)
    try:
        yield replacement
    finally:
        driver._active = previous


@contextlib.contextmanager
def fake_launches(arch: int = 90):
    """Yields the list of recorded launches: (grid x, y, z, stream, function, packed metadata,
    launch metadata, enter hook, exit hook, *every kernel parameter). Compiled kernels keep the fake
    launcher afterwards: use it in a process that never launches for real."""
    with _active_driver(FakeLaunchDriver(arch)) as fake:
        yield fake.launches


@contextlib.contextmanager
def compile_only(arch: int = 90):
    """Yields a list that receives (jit_function, args, grid, kwargs, compiled_kernel) per kernel call."""
    calls = []
    run = jit.JITFunction.run

    def capture(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        calls.append((self, args, grid, kwargs, kernel))
        return kernel

    with _active_driver(CompileOnlyDriver(arch)), _host.use_relaunch(False):  # every launch captured
        jit.JITFunction.run = capture
        try:
            yield calls
        finally:
            jit.JITFunction.run = run


def resource_usage(kernel) -> dict:
    """Registers and stack bytes (spills) per thread of a compiled kernel, from cuobjdump."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if "REG:" in line)
    usage = dict(kv.split(":") for kv in line.split() if ":" in kv)
    return {"regs": int(usage["REG"]), "stack": int(usage["STACK"])}
