"""pysnell's CUDA C++ sources (shipped as package data), and what names one build of them.

The JIT loader (pysnell/_jit.py) and the ahead-of-time build (pysnell_build.py) both compile exactly
SOURCES with exactly these flags, and both stamp the build with `source_hash()`, so a build made
from other sources is never loaded. This module imports nothing beyond the standard library: the
AOT build loads it by file path before pysnell is importable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# Translation units: kernel files that include only CUDA headers (plain nvcc compiles them),
# and the one binding file that includes torch.
KERNEL_SOURCES = ("topk.cu", "snell_forward.cu", "snell_backward.cu", "monarch.cu")
BINDING_SOURCE = "binding.cpp"
SOURCES = (BINDING_SOURCE,) + KERNEL_SOURCES
HEADERS = ("pysnell_cuda.h", "common.cuh", "radix_select.cuh", "snell_common.cuh")

# No --use_fast_math: the kernels rely on IEEE division, square root and expf to reproduce the reference.
CXX_FLAGS = ("-O3",)
NVCC_FLAGS = ("-O3", "-lineinfo")


def directory() -> Path:
    return Path(__file__).resolve().parent


def source_hash() -> str:
    """A short hash of every source, header and flag: it names the build and its cache directory."""
    digest = hashlib.sha256()
    root = directory()
    for name in sorted(SOURCES + HEADERS):
        digest.update(name.encode())
        digest.update((root / name).read_bytes())
    digest.update(repr((CXX_FLAGS, NVCC_FLAGS)).encode())
    return digest.hexdigest()[:16]


def hash_define() -> str:
    """The -D flag that compiles the hash into the library (torch.ops.pysnell_cuda.build_info())."""
    return f"-DPYSNELL_SOURCE_HASH_TOKEN={source_hash()}"
