"""The CUDA backend: its loader (CPU tests, failures simulated) and its ops against the reference (GPU).

CPU: every loader failure (no CUDA torch, no nvcc, nvcc/torch version mismatch, compile error, build
lock timeout) raises a message that says how to fix it, the lock logic (waiting, stale torch locks),
the fallback through pysnell._backend, `python -m pysnell.env`.
GPU (marked): every CUDA op and gradient against the reference, the kept sets and thresholds bit for
bit, a JIT build from a clean cache by two processes at once (one builds, the other waits and loads).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from oracles import rel_rmse

import pysnell
from pysnell import _backend, _jit
from pysnell import csrc as csrc_pkg
from pysnell.ops.monarch import function as monarch_fn
from pysnell.ops.monarch import reference as monarch_ref
from pysnell.ops.snell import function as snell_fn
from pysnell.ops.snell import reference as snell_ref
from pysnell.ops.topk import reference as topk_ref

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# CPU: sources, hash, toolchain checks


def test_sources_and_headers_list_every_file_in_csrc():
    on_disk = {p.name for p in csrc_pkg.directory().iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp")}
    assert on_disk == set(csrc_pkg.SOURCES + csrc_pkg.HEADERS)
    for name in csrc_pkg.KERNEL_SOURCES + csrc_pkg.HEADERS:  # the nvcc-only rule
        text = (csrc_pkg.directory() / name).read_text()
        for banned in ("<torch/", "<ATen/", "<c10/", "<pybind11/"):
            assert banned not in text, f"{name} includes {banned}: only csrc/binding.cpp may include torch"


def test_source_hash_names_the_sources(tmp_path, monkeypatch):
    copy = tmp_path / "csrc"
    copy.mkdir()
    for name in csrc_pkg.SOURCES + csrc_pkg.HEADERS:
        (copy / name).write_bytes((csrc_pkg.directory() / name).read_bytes())
    monkeypatch.setattr(csrc_pkg, "directory", lambda: copy)
    before = _jit.source_hash()
    assert before == csrc_pkg.source_hash() and len(before) == 16
    (copy / "topk.cu").write_text((copy / "topk.cu").read_text() + "\n// edited\n")
    assert _jit.source_hash() != before
    assert csrc_pkg.hash_define() == f"-DPYSNELL_SOURCE_HASH_TOKEN={_jit.source_hash()}"


def test_nvcc_version_is_parsed(tmp_path):
    fake = tmp_path / "nvcc"
    fake.write_text(
        "#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
        "echo 'Cuda compilation tools, release 12.8, V12.8.93'\n"
    )
    fake.chmod(0o755)
    assert _jit.nvcc_version(str(fake)) == "12.8"
    assert _jit.nvcc_version(str(tmp_path / "missing")) is None


@pytest.fixture
def fake_cuda_torch(monkeypatch, tmp_path):
    """Pretend torch has CUDA 12.8 and a device (nothing runs on it); private cache dir, no AOT build."""
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("PYSNELL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.delenv("PYSNELL_BUILD_LOCK_TIMEOUT", raising=False)
    monkeypatch.setattr(_jit, "aot_library", lambda: None)
    monkeypatch.setattr(_jit, "_loaded_library", None)
    return tmp_path


@pytest.fixture
def toolchain_ok(monkeypatch):
    monkeypatch.setattr(_jit, "find_nvcc", lambda: "/opt/cuda/bin/nvcc")
    monkeypatch.setattr(_jit, "nvcc_version", lambda nvcc: "12.8")
    monkeypatch.setattr(_jit, "ninja_available", lambda: True)


def _must_not_compile(*args, **kwargs):
    raise AssertionError("the loader compiled although it should not have")


def test_cpu_torch_says_it_has_no_cuda(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(_jit.CudaUnavailable, match="built without CUDA"):
        _jit.ensure_library()


def test_missing_nvcc_says_how_to_fix(fake_cuda_torch, monkeypatch):
    monkeypatch.setattr(_jit, "find_nvcc", lambda: None)
    monkeypatch.setattr(_jit, "_compile", _must_not_compile)
    with pytest.raises(_jit.NvccNotFound) as info:
        _jit.ensure_library()
    msg = str(info.value)
    for needed in ("nvcc was not found", "CUDA_HOME", "CUDA 12.8", "PYSNELL_BUILD_CUDA=1", "Triton or torch"):
        assert needed in msg


def test_version_mismatch_says_how_to_fix(fake_cuda_torch, toolchain_ok, monkeypatch):
    monkeypatch.setattr(_jit, "nvcc_version", lambda nvcc: "11.8")
    monkeypatch.setattr(_jit, "_compile", _must_not_compile)
    with pytest.raises(_jit.CudaVersionMismatch) as info:
        _jit.ensure_library()
    assert "nvcc 11.8" in str(info.value) and "CUDA 12.8" in str(info.value) and "CUDA_HOME" in str(info.value)


def test_missing_ninja_says_pip_install(fake_cuda_torch, toolchain_ok, monkeypatch):
    monkeypatch.setattr(_jit, "ninja_available", lambda: False)
    with pytest.raises(_jit.CudaBuildError, match="pip install ninja"):
        _jit.ensure_library()


def test_compile_error_is_explained_and_leaves_no_build_behind(fake_cuda_torch, toolchain_ok, monkeypatch):
    from filelock import FileLock

    seen = {}

    def broken(name, sources, build_directory, verbose):
        seen["sources"] = sources
        raise RuntimeError(
            "Error building extension 'pysnell_cuda':\n[1/5] nvcc -c snell_forward.cu\n"
            'csrc/snell_forward.cu(12): error: identifier "bogus" is undefined\n'
            "ninja: build stopped: subcommand failed."
        )

    monkeypatch.setattr(_jit, "_compile", broken)
    with pytest.raises(_jit.CudaBuildError) as info:
        _jit.ensure_library()
    msg = str(info.value)
    assert 'identifier "bogus" is undefined' in msg and "PYSNELL_VERBOSE_BUILD=1" in msg and "Triton or torch" in msg
    assert [Path(s).name for s in seen["sources"]] == list(csrc_pkg.SOURCES)
    assert all(Path(s).exists() for s in seen["sources"])
    assert not (_jit.build_dir() / "pysnell_build.json").exists()
    lock = FileLock(str(_jit.lock_path()), timeout=0)
    lock.acquire()  # released by the failed build
    lock.release()
    assert _jit._loaded_library is None


def _hold_lock(lock_file: Path, seconds: float, marker: str | None = None, marker_dir: Path | None = None):
    """A separate process that takes our build lock (as a building pysnell would), optionally writes the
    build marker, and releases it after `seconds`. Returns once the lock is held."""
    script = textwrap.dedent(
        f"""
        import json, os, sys, time
        from pathlib import Path
        from filelock import FileLock
        lock = FileLock({str(lock_file)!r})
        lock.acquire()
        Path({str(lock_file)!r} + ".owner").write_text(f"pid {{os.getpid()}} (test holder)")
        print("held", flush=True)
        time.sleep({seconds})
        marker, where = {marker!r}, {str(marker_dir) if marker_dir else None!r}
        if where:
            Path(where).mkdir(parents=True, exist_ok=True)
            (Path(where) / "pysnell_build.json").write_text(marker)
        lock.release()
        """
    )
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_timeout_says_who_holds_it(fake_cuda_torch, toolchain_ok, monkeypatch):
    monkeypatch.setattr(_jit, "_compile", _must_not_compile)
    monkeypatch.setenv("PYSNELL_BUILD_LOCK_TIMEOUT", "0.3")
    holder = _hold_lock(_jit.lock_path(), seconds=60)
    try:
        start = time.perf_counter()
        with pytest.raises(_jit.BuildLockTimeout) as info:
            _jit.ensure_library()
        assert time.perf_counter() - start < 15
    finally:
        holder.kill()
        holder.wait()
    msg = str(info.value)
    assert str(_jit.lock_path()) in msg and f"pid {holder.pid}" in msg and "PYSNELL_BUILD_LOCK_TIMEOUT" in msg


def test_lock_timeout_must_be_a_number(fake_cuda_torch, monkeypatch):
    monkeypatch.setenv("PYSNELL_BUILD_LOCK_TIMEOUT", "soon")
    with pytest.raises(_jit.CudaBackendError, match="PYSNELL_BUILD_LOCK_TIMEOUT must be a number"):
        _jit.lock_timeout()


def test_second_process_waits_for_the_build_and_loads_it(fake_cuda_torch, toolchain_ok, monkeypatch):
    library = fake_cuda_torch / "built.so"
    library.write_bytes(b"")
    marker = json.dumps({"library": str(library), "build_seconds": 1.0, "key": _jit.build_key()})
    monkeypatch.setattr(_jit, "_compile", _must_not_compile)
    holder = _hold_lock(_jit.lock_path(), seconds=1.0, marker=marker, marker_dir=_jit.build_dir())
    try:
        info = _jit._build_locked(timeout=60)
    finally:
        holder.wait(timeout=60)
    assert info["built"] is False and info["library"] == str(library) and info["waited_s"] >= 0.5


def test_stale_torch_lock_is_removed_and_the_build_recorded(fake_cuda_torch, toolchain_ok, monkeypatch, caplog):
    library = fake_cuda_torch / "fresh.so"
    library.write_bytes(b"")
    build_dir = _jit.build_dir()
    build_dir.mkdir(parents=True)
    (build_dir / "lock").write_text("")  # what a killed torch build leaves behind

    def fake_compile(name, sources, build_directory, verbose):
        assert not (Path(build_directory) / "lock").exists()
        assert name.startswith("pysnell_cuda_") and Path(build_directory) == build_dir
        return str(library)

    monkeypatch.setattr(_jit, "_compile", fake_compile)
    with caplog.at_level(logging.WARNING, logger="pysnell"):
        info = _jit._build_locked(timeout=5)
    assert info["built"] is True and "killed build" in caplog.text
    assert json.loads((build_dir / "pysnell_build.json").read_text())["library"] == str(library)
    monkeypatch.setattr(_jit, "_compile", _must_not_compile)
    assert _jit._build_locked(timeout=5)["built"] is False  # the next load reuses it


def test_cache_key_follows_arch_list_and_cache_dir(fake_cuda_torch, monkeypatch):
    first = _jit.build_dir()
    assert first.parent == fake_cuda_torch / "cache" and "arch9.0" in first.name and _jit.source_hash() in first.name
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    assert _jit.build_dir() != first and "arch8.0_9.0a" in _jit.build_dir().name


def test_aot_build_is_used_only_when_built_from_these_sources(monkeypatch, tmp_path, caplog):
    library = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    library.write_bytes(b"")
    monkeypatch.setattr(_jit, "aot_library", lambda: library)
    _jit.aot_hash_file(library).write_text(_jit.source_hash() + "\n")
    assert _jit._try_aot() == {"library": str(library), "built": False, "aot": True, "hash": _jit.source_hash()}
    _jit.aot_hash_file(library).write_text("0" * 16)
    with caplog.at_level(logging.WARNING, logger="pysnell"):
        assert _jit._try_aot() is None
    assert "built from other sources" in caplog.text


def test_aot_build_compiles_the_jit_sources_with_the_jit_flags(monkeypatch):
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:  # a CPU torch does not look for the toolkit: point it at nvcc's
        nvcc = _jit.shutil.which("nvcc")
        if nvcc is None:
            pytest.skip("no CUDA toolkit: CUDAExtension needs CUDA_HOME")
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(Path(os.path.realpath(nvcc)).parents[1]))
    sys.path.insert(0, str(REPO))
    monkeypatch.setattr(sys, "path", list(sys.path))
    import pysnell_build

    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match="needs a CUDA build of torch"):
        pysnell_build.cuda_extension()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    ext, cmdclass = pysnell_build.cuda_extension()
    assert ext.name == "pysnell._C"
    assert ext.sources == [f"csrc/{name}" for name in csrc_pkg.SOURCES]
    assert ext.extra_compile_args["cxx"] == [*csrc_pkg.CXX_FLAGS, csrc_pkg.hash_define()]
    assert ext.extra_compile_args["nvcc"][: len(csrc_pkg.NVCC_FLAGS) + 1] == [
        *csrc_pkg.NVCC_FLAGS,
        csrc_pkg.hash_define(),
    ]
    assert issubclass(cmdclass["build_ext"], cpp_extension.BuildExtension)


def test_backend_falls_back_once_with_the_reason(fake_cuda_torch, monkeypatch, caplog, backend):
    monkeypatch.setattr(_jit, "find_nvcc", lambda: None)
    monkeypatch.setattr(_backend, "_loaded", set(_backend._loaded) - {"cuda"})
    monkeypatch.setattr(_backend, "_load_errors", {k: v for k, v in _backend._load_errors.items() if k != "cuda"})
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(_backend, "_loaders", dict(_backend._loaders))
    monkeypatch.setattr(_backend, "_registry", {op: dict(impls) for op, impls in _backend._registry.items()})
    assert _backend._loaders["cuda"] is _jit.load_cuda_backend
    backend.set_backend("cuda")
    device = torch.device("cuda")
    with caplog.at_level(logging.WARNING, logger="pysnell"):
        for _ in range(3):
            name, fn = _backend.pick("topk.mask_", device)
            assert name in ("triton", "torch") and callable(fn)
    assert "nvcc was not found" in _backend.load_error("cuda")
    fallbacks = [r for r in caplog.records if "topk.mask_ falls back from cuda" in r.getMessage()]
    assert len(fallbacks) == 1 and "nvcc was not found" in fallbacks[0].getMessage()
    backend.set_backend("auto")
    assert _backend.pick("monarch.forward", device)[0] in ("triton", "torch")


def test_import_builds_nothing():
    code = "import pysnell, pysnell._backend as b, pysnell._jit as j; print(sorted(b._loaded), j._loaded_library)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] None"


def test_env_report(capsys):
    from pysnell import env

    assert env.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["backends"]) == {"torch", "triton", "cuda"}
    cuda = report["backends"]["cuda"]
    assert cuda["source_hash"] == _jit.source_hash() and cuda["ops"] == list(pysnell._cuda_ops.OPS)
    if torch.version.cuda is None:
        assert cuda["usable"] is False and "without CUDA" in cuda["problem"]
    text = env.format_report(report)
    for needed in ("torch", "triton", "cuda", "nvcc", "JIT cache", "auto order on CUDA tensors"):
        assert needed in text
    triton = report["backends"]["triton"]
    if triton.get("kernels_loaded"):  # whether launches skip Triton's launch path after the first
        from pysnell.triton_kernels import _host

        assert triton["relaunch"] == _host.relaunch_state() and "direct launches" in text
        with _host.use_relaunch(False):
            assert _host.relaunch_state().startswith("off")


def test_env_report_lists_every_variable_pysnell_reads():
    # every PYSNELL_* name in the sources is in the report and in the README's table, and back
    from pysnell import env

    sources = [*REPO.glob("pysnell/**/*.py"), *REPO.glob("triton_kernels/*.py"), REPO / "setup.py"]
    read = set()
    for path in sources:
        read |= set(re.findall(r"\b(PYSNELL_[A-Z_]+)\b", path.read_text()))
    listed = {v for v in env.ENV_VARS if v.startswith("PYSNELL_")}
    assert read == listed, f"read but not listed: {read - listed}; listed but never read: {listed - read}"
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("### Environment variables") :]
    for name in env.ENV_VARS:
        assert f"`{name}`" in table, f"{name} is missing from the README's table"


def test_env_module_runs():
    out = subprocess.run([sys.executable, "-m", "pysnell.env"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "cuda   :" in out.stdout and "triton :" in out.stdout and "GPU" in out.stdout


# ------------------------------------------------------------------------------------------------
# CPU: the Python side of the SNELL layer ops, on an emulated library


class _EmulatedLayerOps:
    """csrc/binding.cpp's snell_layer_forward / snell_layer_backward (and snell_colstats), as their schemas
    read, computed with the torch backend: what _cuda_ops passes (argument order, ids, the known-zero
    flag, the need flags) and how it maps the results back are checked without a GPU."""

    def __init__(self):
        from pysnell import _cuda_ops

        self.kernels = {v: k for k, v in _cuda_ops.KERNEL_IDS.items()}
        self.modes = {v: k for k, v in _cuda_ops.MODE_IDS.items()}
        self.calls = []

    def _spec(self, coeffs, alpha, beta, gamma, kernel, pieces, mode, groups):
        spec = snell_ref.SnellSpec(self.kernels[kernel], pieces, self.modes[mode], groups)
        return snell_ref.KernelParams(coeffs, alpha, beta, gamma), spec

    def snell_colstats(self, A, B, coeffs, alpha, beta, gamma, kernel, pieces, groups):
        assert self.kernels[kernel] == "snella"
        return torch.full((groups, A.shape[1], 4), float("nan"))  # opaque here: the emulation recomputes

    def snell_layer_forward(self, x2, weight, bias, A, B, c, a, b, g, colstats, value, tensor, known_zero, *ids):
        params, spec = self._spec(c, a, b, g, *ids)
        assert (colstats is not None) == (spec.kernel == "snella")
        self.calls.append("forward")
        sparsity = 0.0 if known_zero else (tensor if tensor is not None else value)
        return snell_fn._torch_layer_forward(x2, weight, bias, A, B, params, spec, sparsity)

    def snell_layer_backward(self, dy2, x2, weight, A, B, c, a, b, g, colstats, t, value, tensor, *rest):
        kernel, pieces, mode, groups, need_x, need_w, need_b, need_factor = rest
        params, spec = self._spec(c, a, b, g, kernel, pieces, mode, groups)
        self.calls.append("backward")
        sparsity = tensor if tensor is not None else value
        if t is None:  # known zero: S = ΔW
            assert sparsity == 0.0
            t = torch.zeros(groups)
        needs = (need_x, need_w, need_b, need_factor, need_factor) + (need_factor,) * 4
        grads = snell_fn._torch_layer_backward(dy2, x2, weight, A, B, params, spec, sparsity, t, needs)
        empty = torch.empty(0)
        dscalars = torch.zeros(pieces + 3)
        if need_factor:
            if grads[5] is not None:
                dscalars[:pieces] = grads[5]
            for i, d in enumerate(grads[6:9]):
                if d is not None:
                    dscalars[pieces + i] = d
        out = [v if v is not None else empty for v in grads[:5]]
        return (*out, dscalars if need_factor else empty)


@pytest.mark.parametrize("kernel", ["piecewise", "snella", "rbf"])
@pytest.mark.parametrize("sparsity", [0.7, "tensor", 0.0])
@pytest.mark.parametrize("groups", [1, 3])
def test_layer_ops_python_side_on_an_emulated_library(seed, monkeypatch, kernel, sparsity, groups):
    from pysnell import _cuda_ops
    from pysnell.functional import kernel_params

    lib = _EmulatedLayerOps()
    monkeypatch.setattr(_cuda_ops, "_lib", lambda: lib)
    n, m, r, T = 10, 6 * groups, 4, 7
    A, B = torch.randn(r, n) * 0.5, torch.randn(m, r) * 0.5
    params = snell_ref.KernelParams(*kernel_params(A, kernel, 2, 0.1))
    spec = snell_ref.SnellSpec(kernel, 2, "paper", groups)
    s = torch.tensor(0.6, dtype=torch.float64) if sparsity == "tensor" else sparsity
    x2, W, bias, dy2 = torch.randn(T, n), torch.randn(m, n), torch.randn(m), torch.randn(T, m)
    y, t = _cuda_ops.snell_layer_forward(x2, W, bias, A, B, params, spec, s)
    y_ref, t_ref = snell_fn._torch_layer_forward(x2, W, bias, A, B, params, spec, s)
    torch.testing.assert_close((y, t), (y_ref, t_ref), rtol=0, atol=0)
    for needs in [(True, True, True) + (True,) * 6, (True, False, False, True, False, False, True, False, True),
                  (False, True, False) + (False,) * 6, (True, False, False) + (False,) * 6]:  # fmt: skip
        got = _cuda_ops.snell_layer_backward(dy2, x2, W, A, B, params, spec, s, t, needs)
        want = snell_fn._torch_layer_backward(dy2, x2, W, A, B, params, spec, s, t, needs)
        assert len(got) == 9
        for i, (g, w) in enumerate(zip(got, want)):
            if not needs[i]:
                assert g is None or i in (3, 4), i  # dA and dB come together with any factor gradient
                continue
            assert (g is None) == (w is None), i  # e.g. piecewise has no dalpha
            if w is not None:
                torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=f"gradient {i}")
    assert lib.calls[:2] == ["forward", "backward"]


# ------------------------------------------------------------------------------------------------
# GPU: the build, then every op against the reference

DEV = "cuda"
FLOATS = (torch.float32, torch.float16, torch.bfloat16)

_BUILD_SCRIPT = """
import json, time, torch, pysnell
from pysnell import _jit, _cuda_ops
start = time.perf_counter()
info = _jit.ensure_library()
info["wall_s"] = round(time.perf_counter() - start, 2)
_cuda_ops.register()
pysnell.set_backend("cuda")
x = torch.randn(10000, device="cuda")
y, t = pysnell.topk_mask(x, k=77)
torch.cuda.synchronize()
info["op_ok"] = int((y != 0).sum()) == 77 and pysnell.last_backend("topk.mask_") == "cuda"
print("PYSNELL_BUILD " + json.dumps(info), flush=True)
"""


@pytest.fixture(scope="session")
def jit_build_record(tmp_path_factory):
    """Two processes JIT-build from one clean cache at once; this process (and later ones) reuse that build.

    The cache is the real one (PYSNELL_CACHE_DIR or ~/.cache/pysnell) while it holds no build for these
    sources, so a GPU run that starts with these tests builds once in all; else a fresh directory.
    """
    if not torch.cuda.is_available() or os.environ.get("PYSNELL_SKIP_BUILD_TEST") == "1":
        return None
    fresh = _jit._loaded_library is None and not _jit.built_state()["jit_built"] and _jit.aot_library() is None
    cache = _jit.cache_root() if fresh else tmp_path_factory.mktemp("pysnell-clean-cache")
    env = dict(os.environ, PYSNELL_CACHE_DIR=str(cache))
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILD_SCRIPT],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    records = []
    for proc in procs:
        out, err = proc.communicate(timeout=1500)
        lines = [ln for ln in out.splitlines() if ln.startswith("PYSNELL_BUILD ")]
        assert proc.returncode == 0 and lines, f"build process failed:\n{out}\n{err[-4000:]}"
        records.append(json.loads(lines[-1][len("PYSNELL_BUILD ") :]))
    wall = time.perf_counter() - start
    built = [r for r in records if r["built"]]
    print(
        f"\npysnell JIT build from a clean cache: {built[0]['build_seconds'] if built else '?'} s "
        f"(both processes done after {wall:.1f} s): {records}"
    )
    results = os.environ.get("PYSNELL_RESULTS_DIR")
    if results:
        Path(results).mkdir(parents=True, exist_ok=True)
        record = {"gpu": torch.cuda.get_device_name(), "records": records, "wall_s": round(wall, 2)}
        (Path(results) / "cuda_jit_build.json").write_text(json.dumps(record, indent=2))
    if _jit._loaded_library is None:
        os.environ["PYSNELL_CACHE_DIR"] = str(cache)  # this process loads that build instead of building again
    return records


@pytest.fixture
def cuda_ops(jit_build_record, backend):
    error = _backend.load_error("cuda")
    assert error is None, f"the CUDA extension does not load: {error}"
    backend.set_backend("cuda")
    yield torch.ops.pysnell_cuda


def poison_allocator(numel: int, dtype) -> None:
    """Leave a NaN-filled block of this size in the caching allocator, so that an output the kernel
    forgets to write shows up as NaN instead of stale zeros."""
    junk = torch.full((max(int(numel), 1),), float("nan"), dtype=dtype, device=DEV)
    del junk


def assert_sum_close(got, want, scale: float, name: str) -> None:
    """Kernel-scalar gradients are sums over m·n terms of either sign that may nearly cancel: compare them
    with float32 accumulation error in mind, relative to the sum of the terms' magnitudes (`scale`)."""
    err = (got.double() - want.double()).abs().max().item()
    assert err <= 1e-4 * want.double().abs().max().item() + 1e-5 * scale, (name, got, want, scale)


@pytest.mark.gpu
def test_jit_build_from_clean_cache_by_two_processes_builds_once(jit_build_record):
    if jit_build_record is None:
        pytest.skip("PYSNELL_SKIP_BUILD_TEST=1")
    if any(r.get("aot") for r in jit_build_record):
        pytest.skip("an ahead-of-time build is installed: nothing was JIT-built")
    assert [r["built"] for r in jit_build_record].count(True) == 1, jit_build_record
    waiter = next(r for r in jit_build_record if not r["built"])
    builder = next(r for r in jit_build_record if r["built"])
    assert waiter["library"] == builder["library"] and waiter["waited_s"] > 0
    assert all(r["op_ok"] for r in jit_build_record)


# ---- top-k


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1,), (7,), (1000,), (37, 129), (2049, 3), (3, 50001)])
def test_topk_mask_quantile_equals_reference(cuda_ops, seed, dtype, shape):
    x = (torch.randn(shape, device=DEV) * 3).to(dtype)
    for s in (0.0, 0.3, 0.9, 0.999):
        want, t_want = topk_ref.topk_mask_(x.clone(), sparsity=s)
        got = x.clone()
        out, t = pysnell.topk_mask_(got, sparsity=s)
        assert pysnell.last_backend("topk.mask_") == "cuda"
        assert out is got and t.dtype == torch.float32 and t.device.type == "cuda"
        assert torch.equal(t, t_want.float()), (s, t, t_want)
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
def test_topk_mask_k_mode_keeps_ties_in_index_order(cuda_ops, seed, dtype):
    x = torch.randint(-4, 5, (3, 4001), device=DEV).to(dtype)  # few distinct magnitudes: many ties
    n = x.numel()
    for k in (0, 1, 7, n // 3, n // 2 + 1, n - 1, n):
        want, t_want = topk_ref.topk_mask_(x.clone(), k=k)
        got, t = pysnell.topk_mask(x, k=k)
        assert torch.equal(got, want) and torch.equal(t, t_want.float().reshape(())), k
        keep_want, _ = topk_ref.keep_mask(x, k=k)
        _, _, packed = pysnell._cuda_ops.topk_mask_(x.clone(), None, k, True)
        assert torch.equal(packed, topk_ref.pack_mask(keep_want)) and int(keep_want.sum()) == k


@pytest.mark.gpu
def test_topk_ties_across_many_blocks(cuda_ops, seed):
    x = torch.randint(-3, 4, (3_000_001,), device=DEV).float()  # ties spread over hundreds of blocks
    for k in (1, 999_999, 2_000_000):
        keep_want, t_want = topk_ref.keep_mask(x, k=k)
        _, t, packed = pysnell._cuda_ops.topk_mask_(x.clone(), None, k, True)
        assert torch.equal(packed, topk_ref.pack_mask(keep_want)) and float(t) == float(t_want)


@pytest.mark.gpu
def test_topk_nan_and_inf(cuda_ops, seed):
    x = torch.randn(5000, device=DEV)
    x[torch.randperm(5000, device=DEV)[:300]] = float("nan")
    x[:3] = float("inf")
    x[3:5] = -float("inf")
    for kw in ({"sparsity": 0.5}, {"sparsity": 0.99}, {"k": 10}, {"k": 4800}, {"k": 5000}):
        want, t_want = topk_ref.topk_mask_(x.clone(), **kw)
        got, t = pysnell.topk_mask_(x.clone(), **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(t, t_want.float().reshape(()), rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
def test_topk_beyond_2_to_the_24_and_non_contiguous(cuda_ops, seed):
    x = torch.randn(2**24 + 12345, device=DEV)
    want, t_want = topk_ref.topk_mask_(x.clone(), sparsity=0.9)
    got, t = pysnell.topk_mask_(x.clone(), sparsity=0.9)
    assert torch.equal(t, t_want) and torch.equal(got, want)
    base = torch.randn(300, 211, device=DEV, dtype=torch.bfloat16)
    view = base.t()
    want, _ = topk_ref.topk_mask_(view.clone(), sparsity=0.7)
    out, _ = pysnell.topk_mask_(view, sparsity=0.7)
    assert out is view and torch.equal(view, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
def test_topk_threshold_per_group_and_device_sparsity(cuda_ops, seed, dtype):
    from pysnell.ops.topk.function import select_threshold

    x2d = torch.randn(5, 3001, device=DEV).to(dtype)
    for s in (0.0, 0.25, 0.9, torch.tensor(0.8, device=DEV), torch.tensor(0.0, device=DEV, dtype=torch.float64)):
        poison_allocator(5, torch.float32)
        got = select_threshold(x2d, s)
        want = topk_ref.quantile_threshold(topk_ref.magnitude_keys(x2d), s)
        assert pysnell.last_backend("topk.threshold") == "cuda" and torch.equal(got, want), s


@pytest.mark.gpu
@pytest.mark.parametrize("value", [float("nan"), -0.5, 1.5, float("inf")])
def test_unchecked_device_sparsity_follows_the_reference(cuda_ops, seed, value):
    # A GPU sparsity buffer is never read on the host, so nothing validates it: the selection must
    # still be the reference's (position nan_to_num'd, then clamped), in top-k and in the SNELL layer.
    from pysnell.ops.topk.function import select_threshold

    s = torch.tensor(value, device=DEV, dtype=torch.float64)
    x2d = torch.randn(5, 3001, device=DEV)
    want = topk_ref.quantile_threshold(topk_ref.magnitude_keys(x2d), s)
    assert torch.equal(select_threshold(x2d, s), want) and pysnell.last_backend("topk.threshold") == "cuda"
    m, n, r, pieces, groups, T = 150, 97, 8, 2, 3, 33
    A, B, _, kp = _snell_inputs(m, n, r, pieces, "piecewise", groups=groups)
    kp, A, B = _detached(kp), A.detach(), B.detach()
    spec = snell_ref.SnellSpec("piecewise", pieces, "reference", groups)
    delta = _impl("snell.merge", "cuda")(A, B, kp, spec)
    _, t = _impl("snell.layer_forward", "cuda")(torch.randn(T, n, device=DEV), None, None, A, B, kp, spec, s)
    t_want = topk_ref.quantile_threshold(topk_ref.magnitude_keys(delta.reshape(groups, -1)), s)
    assert torch.equal(t, t_want), (t, t_want)


@pytest.mark.gpu
def test_topk_gradient_is_the_mask(cuda_ops, seed):
    x = torch.randn(333, 77, device=DEV, requires_grad=True)
    y, _ = pysnell.topk_mask(x, sparsity=0.8)
    g = torch.randn_like(y)
    y.backward(g)
    keep, _ = topk_ref.keep_mask(x.detach(), sparsity=0.8)
    assert torch.equal(x.grad, g * keep.view(x.shape))


# ---- SNELL

KERNELS = snell_ref.KERNELS
MODES = snell_ref.MODES


def _snell_inputs(m, n, r, pieces, kernel, dtype=torch.float32, groups=1):
    A = (torch.rand(r, n, device=DEV) * 2 - 1).mul_(0.5).to(dtype).requires_grad_()
    B = (torch.rand(m, r, device=DEV) * 2 - 1).mul_(0.5).to(dtype).requires_grad_()
    coeffs = torch.tensor([0.3 * (-1) ** p * (1 + 0.1 * p) for p in range(pieces)], device=DEV, dtype=dtype)
    scalars = {"alpha": 1.3, "beta": 0.7, "gamma": 0.9} if kernel in ("rbf", "sigmoid", "snella") else {}
    params = {"coeffs": coeffs.requires_grad_()}
    params.update({k: torch.tensor(v, device=DEV, dtype=dtype, requires_grad=True) for k, v in scalars.items()})
    spec_params = snell_ref.KernelParams(
        params["coeffs"],
        params.get("alpha", torch.tensor(1.0, device=DEV, dtype=dtype)),
        params.get("beta", torch.tensor(1.0, device=DEV, dtype=dtype)),
        params.get("gamma", torch.tensor(0.0, device=DEV, dtype=dtype)),
    )
    return A, B, params, spec_params


def _impl(op, backend_name):
    return _backend._registry[op][backend_name]


def _detached(params):
    return snell_ref.KernelParams(*(p.detach() for p in params))


def _double(params):
    return snell_ref.KernelParams(*(p.detach().double() for p in params))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("groups", [1, 3])
def test_snell_merge_and_its_gradient(cuda_ops, seed, kernel, groups):
    m, n, r, pieces = 69, 45, 6, 2 if kernel != "piecewise" else 3
    A, B, params, kp = _snell_inputs(m, n, r, pieces, kernel, groups=groups)
    spec = snell_ref.SnellSpec(kernel, pieces, "reference", groups)
    poison_allocator(m * n, torch.float32)
    delta = _impl("snell.merge", "cuda")(A.detach(), B.detach(), _detached(kp), spec)
    want = snell_ref.merge(A.detach().double(), B.detach().double(), _double(kp), spec)
    assert not torch.isnan(delta).any() and rel_rmse(delta, want) < 1e-6
    G = torch.randn(m, n, device=DEV)
    got = _impl("snell.merge_backward", "cuda")(G, A.detach(), B.detach(), _detached(kp), spec, (True,) * 4)
    ref = snell_ref.merge_backward(G.double(), A.detach().double(), B.detach().double(), _double(kp), spec, (True,) * 4)
    scale = float(G.double().abs().sum()) * 4
    for name, a, b in zip(("dA", "dB", "dcoeffs", "dalpha", "dbeta", "dgamma"), got, ref):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape and a.dtype == A.dtype, name
            if name in ("dA", "dB"):
                assert rel_rmse(a, b) < 2e-5, (name, rel_rmse(a, b))
            else:
                assert_sum_close(a, b, scale, name)
    again = _impl("snell.merge_backward", "cuda")(G, A.detach(), B.detach(), _detached(kp), spec, (True,) * 4)
    assert all(a is None or torch.equal(a, b) for a, b in zip(got, again))  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_snell_layer_forward_selects_exactly(cuda_ops, seed, kernel, mode, x_dtype):
    m, n, r, pieces, groups, T = 150, 97, 8, 2, 3, 33
    A, B, params, kp = _snell_inputs(m, n, r, pieces, kernel, groups=groups)
    kp = _detached(kp)
    A, B = A.detach(), B.detach()
    spec = snell_ref.SnellSpec(kernel, pieces, mode, groups)
    x2 = torch.randn(T, n, device=DEV).to(x_dtype)
    weight = torch.randn(m, n, device=DEV).to(x_dtype)
    bias = torch.randn(m, device=DEV).to(x_dtype)
    delta = _impl("snell.merge", "cuda")(A, B, kp, spec)  # the same ΔW every CUDA kernel regenerates
    sparsities = (0.0, 0.5, 0.93, torch.tensor(0.8, device=DEV), torch.tensor(0.0, device=DEV))
    for s in sparsities:
        poison_allocator(T * m, x_dtype)
        y, t = _impl("snell.layer_forward", "cuda")(x2, weight, bias, A, B, kp, spec, s)
        if snell_ref.known_zero_sparsity(s):
            assert torch.equal(t, torch.zeros(groups, device=DEV))
        else:  # the selection is exact on the kernel's own ΔW
            t_want = topk_ref.quantile_threshold(topk_ref.magnitude_keys(delta.reshape(groups, -1)), s)
            assert torch.equal(t, t_want), (s, t, t_want)
        S = snell_ref.sparsify_given_threshold(delta, t, mode, s, groups)
        W_want = snell_fn.effective_weight(weight, S, x_dtype)
        value, tensor = pysnell._cuda_ops._sparsity_args(s)
        known_zero = snell_ref.known_zero_sparsity(s)
        W = cuda_ops.snell_weff(
            A,
            B,
            *kp,
            pysnell._cuda_ops._colstats(A, B, kp, spec),
            weight,
            None if known_zero else t,
            value,
            tensor,
            pysnell._cuda_ops.KERNEL_IDS[kernel],
            pieces,
            pysnell._cuda_ops.MODE_IDS[mode],
            groups,
            x_dtype,
        )
        assert torch.equal(W, W_want), s
        torch.testing.assert_close(y, F.linear(x2, W_want, bias), rtol=0, atol=0)
        S_branch = cuda_ops.snell_weff(
            A,
            B,
            *kp,
            pysnell._cuda_ops._colstats(A, B, kp, spec),
            None,
            None if known_zero else t,
            value,
            tensor,
            pysnell._cuda_ops.KERNEL_IDS[kernel],
            pieces,
            pysnell._cuda_ops.MODE_IDS[mode],
            groups,
            x_dtype,
        )
        assert torch.equal(S_branch, S.to(x_dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", MODES)
def test_snell_layer_gradients(cuda_ops, seed, kernel, mode):
    m, n, r, pieces, groups, T = 130, 71, 8, 2, 2, 29
    A, B, params, kp = _snell_inputs(m, n, r, pieces, kernel, groups=groups)
    x = torch.randn(2, T, n, device=DEV, requires_grad=True)
    weight = torch.randn(m, n, device=DEV, requires_grad=True)
    bias = torch.randn(m, device=DEV, requires_grad=True)
    s = 0.75
    y = pysnell.snell_linear(
        x, weight, bias, A, B, sparsity=s, kernel=kernel, pieces=pieces, mode=mode, out_groups=groups, **params
    )
    assert pysnell.last_backend("snell.layer_forward") == "cuda"
    dy = torch.randn_like(y)
    y.backward(dy)
    assert pysnell.last_backend("snell.layer_backward") == "cuda"
    # Oracle in float64 with the kernel's own ΔW and thresholds, so the kept sets agree exactly.
    spec = snell_ref.SnellSpec(kernel, pieces, mode, groups)
    Ad, Bd, kpd = A.detach(), B.detach(), _detached(kp)
    x2, dy2 = x.detach().reshape(-1, n), dy.reshape(-1, m)
    _, t = _impl("snell.layer_forward", "cuda")(x2, weight.detach(), bias.detach(), Ad, Bd, kpd, spec, s)
    delta = _impl("snell.merge", "cuda")(Ad, Bd, kpd, spec).double()
    S = snell_ref.sparsify_given_threshold(delta, t, mode, s, groups)
    dx_want = dy2.double() @ (weight.detach().double() + S)
    G_S = dy2.double().t() @ x2.double()
    grad_delta = snell_ref.sparsify_backward(G_S, delta, t, mode, s, groups)
    want = snell_ref.merge_backward(grad_delta, Ad.double(), Bd.double(), _double(kp), spec, (True,) * 4)
    assert rel_rmse(x.grad.reshape(-1, n), dx_want) < 1e-5
    assert rel_rmse(weight.grad, G_S) < 1e-5
    assert rel_rmse(bias.grad, dy2.double().sum(0)) < 1e-5
    assert rel_rmse(A.grad, want[0]) < 1e-4 and rel_rmse(B.grad, want[1]) < 1e-4
    named = dict(zip(("coeffs", "alpha", "beta", "gamma"), want[2:]))
    scale = float(grad_delta.abs().sum()) * 4
    for name, tensor in params.items():
        if named[name] is None:
            assert tensor.grad is None or not tensor.grad.any(), name
        else:
            assert_sum_close(tensor.grad, named[name], scale, name)


@pytest.mark.gpu
def test_snell_bf16_factors_close_to_reference(cuda_ops, seed):
    m, n, r, pieces = 96, 80, 8, 2
    A, B, _, kp = _snell_inputs(m, n, r, pieces, "piecewise", dtype=torch.bfloat16)
    spec = snell_ref.SnellSpec("piecewise", pieces, "reference", 1)
    delta = _impl("snell.merge", "cuda")(A.detach(), B.detach(), _detached(kp), spec)
    want = snell_ref.merge(A.detach().double(), B.detach().double(), _double(kp), spec)
    assert delta.dtype == torch.bfloat16 and rel_rmse(delta, want) < 1e-2


@pytest.mark.gpu
def test_snell_large_layer_threshold_exact(cuda_ops, seed):
    m, n, r, pieces = 1100, 700, 8, 2
    A, B, _, kp = _snell_inputs(m, n, r, pieces, "piecewise")
    spec = snell_ref.SnellSpec("piecewise", pieces, "reference", 1)
    x2 = torch.randn(64, n, device=DEV, dtype=torch.bfloat16)
    _, t = _impl("snell.layer_forward", "cuda")(x2, None, None, A.detach(), B.detach(), _detached(kp), spec, 0.9)
    delta = _impl("snell.merge", "cuda")(A.detach(), B.detach(), _detached(kp), spec)
    assert torch.equal(t, topk_ref.quantile_threshold(topk_ref.magnitude_keys(delta.reshape(1, -1)), 0.9))


# ---- Monarch

MONARCH_CASES = [
    # (k, q, p, l, s, r, in_features, out_features, tokens)
    (4, 8, 8, 4, 8, 8, 32, 32, 100),
    (3, 5, 7, 5, 4, 3, 19, 18, 37),  # q % l != 0, padded input, cut output
    (2, 64, 48, 2, 80, 64, 96, 150, 300),
    (4, 16, 16, 4, 16, 16, 64, 64, 5000),  # weight gradients split over tokens
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", MONARCH_CASES)
def test_monarch_forward_backward(cuda_ops, seed, dtype, case):
    k, q, p, l, s, r, n_in, out_f, T = case
    x = torch.randn(T, n_in, device=DEV).to(dtype)
    w1 = (torch.randn(k, q, p, device=DEV) / p**0.5).to(dtype)
    w2 = (torch.randn(l, s, r, device=DEV) / r**0.5).to(dtype)
    bias = torch.randn(out_f, device=DEV).to(dtype)
    dy = torch.randn(T, out_f, device=DEV).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1.5e-2
    poison_allocator(T * out_f, dtype)
    y = _impl("monarch.forward", "cuda")(x, w1, w2, bias, out_f)
    want = monarch_fn._torch_forward(x.double(), w1.double(), w2.double(), bias.double(), out_f)
    assert y.shape == (T, out_f) and y.dtype == dtype and rel_rmse(y, want) < tol
    poison_allocator(T * n_in, dtype)
    grads = _impl("monarch.backward", "cuda")(dy, x, w1, w2, (True, True, True))
    wants = monarch_fn._torch_backward(dy.double(), x.double(), w1.double(), w2.double(), (True, True, True))
    for name, g, w in zip(("dx", "dw1", "dw2"), grads, wants):
        assert g.shape == w.shape and g.dtype == dtype and rel_rmse(g, w) < tol, (name, rel_rmse(g, w))
    only = _impl("monarch.backward", "cuda")(dy, x, w1, w2, (False, False, True))
    assert only[0] is None and only[1] is None and torch.equal(only[2], grads[2])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
def test_snell_dropout_ops_equal_the_reference_bit_for_bit(cuda_ops, seed, dtype):
    from pysnell.ops.snell import reference as snell_ref

    pack, apply = _impl("snell.dropout_pack", "cuda"), _impl("snell.dropout_apply", "cuda")
    for T, n in ((1, 1), (5, 13), (3, 1031), (70001, 9), (0, 4)):  # 70001 rows: more than grid.y holds
        keep = torch.rand(T, n, device=DEV) < 0.6
        poison_allocator(T * n, torch.float32)  # NaN bytes where the packed bits will go
        bits = pack(keep)
        assert torch.equal(bits, snell_ref.dropout_pack(keep)), (T, n)
        v = torch.randn(T, n, device=DEV).to(dtype)
        row_scale = torch.rand(T, device=DEV) * 3
        for b in (bits, None):
            poison_allocator(T * n, dtype)
            assert torch.equal(apply(v, b, row_scale), snell_ref.dropout_apply(v, b, row_scale)), (T, n)
    with pytest.raises(ValueError, match="bits must be uint8 of shape"):
        apply(
            torch.randn(4, 9, device=DEV), torch.zeros(4, 1, dtype=torch.uint8, device=DEV), torch.ones(4, device=DEV)
        )


@pytest.mark.gpu
def test_monarch_layer_autograd_uses_cuda(cuda_ops, seed):
    layer = pysnell.MonarchLinear(100, 70, nblocks=4, device=DEV)
    x = torch.randn(3, 21, 100, device=DEV, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    assert pysnell.last_backend("monarch.forward") == "cuda" and pysnell.last_backend("monarch.backward") == "cuda"
    x2 = x.detach().reshape(-1, 100).double()
    w1, w2 = layer.blkdiag1.detach().double(), layer.blkdiag2.detach().double()
    y_want = monarch_fn._torch_forward(x2, w1, w2, layer.bias.detach().double(), 70)
    assert rel_rmse(y.detach().reshape(-1, 70), y_want) < 1e-5
    grads = monarch_fn._torch_backward(2 * y_want, x2, w1, w2, (True, True, True))
    assert rel_rmse(x.grad.reshape(-1, 100), grads[0]) < 1e-5
    assert rel_rmse(layer.blkdiag1.grad, grads[1]) < 1e-5 and rel_rmse(layer.blkdiag2.grad, grads[2]) < 1e-5
    assert monarch_ref is not None


# ---- torch.compile sees the ops through their fake implementations


@pytest.mark.gpu
def test_ops_trace_under_torch_compile(cuda_ops, seed):
    x = torch.randn(64, 300, device=DEV)

    def thresholds(t):
        return torch.ops.pysnell_cuda.topk_threshold(t, 0.5, None) * 2

    got = torch.compile(thresholds, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(got, thresholds(x))

    def masked(t):
        t = t.clone()
        thr, _ = torch.ops.pysnell_cuda.topk_mask_(t, 0.9, None, -1, False)
        return t, thr

    got_t, got_thr = torch.compile(masked, backend="aot_eager", fullgraph=True)(x)
    want_t, want_thr = masked(x)
    assert torch.equal(got_t, want_t) and torch.equal(got_thr, want_thr)
