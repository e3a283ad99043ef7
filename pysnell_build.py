"""Ahead-of-time build of csrc/ for `PYSNELL_BUILD_CUDA=1 pip install --no-build-isolation .`.

setup.py calls `cuda_extension()` only when PYSNELL_BUILD_CUDA=1 (it needs a CUDA build of torch and
nvcc). It compiles the same SOURCES with the same flags as the JIT loader into the library
`pysnell/_C*.so`, and writes the source hash beside it (`_C*.so.srchash`): pysnell/_jit.py loads that
library only while the hash matches the installed sources, so an edited csrc/ falls back to a JIT build
instead of running stale kernels. TORCH_CUDA_ARCH_LIST picks the archs (torch's default: the visible
GPUs), MAX_JOBS the parallel compile jobs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def _csrc():
    """csrc/__init__.py loaded by path: pysnell itself is not importable while setup.py runs."""
    spec = importlib.util.spec_from_file_location("_pysnell_csrc", ROOT / "csrc" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_extension():
    """(CUDAExtension for pysnell._C, cmdclass) building csrc/ ahead of time."""
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if torch.version.cuda is None:
        raise RuntimeError(
            f"PYSNELL_BUILD_CUDA=1 needs a CUDA build of torch, found {torch.__version__}; "
            "install one, or drop PYSNELL_BUILD_CUDA (the CUDA code then JIT-builds on first use)"
        )
    csrc = _csrc()
    source_hash = csrc.source_hash()
    ext = CUDAExtension(
        name="pysnell._C",
        # setuptools wants sources relative to setup.py
        sources=[f"csrc/{name}" for name in csrc.SOURCES],
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={
            "cxx": [*csrc.CXX_FLAGS, csrc.hash_define()],
            "nvcc": [*csrc.NVCC_FLAGS, csrc.hash_define()],
        },
    )

    class BuildAndStamp(BuildExtension):
        """torch's BuildExtension (ninja), then the source hash written next to the library."""

        def build_extension(self, extension):
            super().build_extension(extension)
            library = Path(self.get_ext_fullpath(extension.name))
            library.with_name(library.name + ".srchash").write_text(source_hash + "\n")

    return ext, {"build_ext": BuildAndStamp}
