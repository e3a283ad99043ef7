"""pysnell build: pure Python by default (the CUDA code JIT-builds on first use).

PYSNELL_BUILD_CUDA=1 pip install --no-build-isolation . builds csrc/ ahead of time.
"""

import os

from setuptools import setup

packages = [
    "pysnell",
    "pysnell.nn",
    "pysnell.ops",
    "pysnell.ops.topk",
    "pysnell.ops.snell",
    "pysnell.ops.monarch",
    "pysnell.triton_kernels",
    "pysnell.csrc",
]
package_dir = {"pysnell.triton_kernels": "triton_kernels", "pysnell.csrc": "csrc"}
kwargs = {}
if os.environ.get("PYSNELL_BUILD_CUDA") == "1":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # PEP 517 builds do not add it
    from pysnell_build import cuda_extension  # noqa: E402  (needs torch with CUDA; only then)

    ext, cmdclass = cuda_extension()
    kwargs = {"ext_modules": [ext], "cmdclass": cmdclass}

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"pysnell.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h"]},
    include_package_data=True,
    **kwargs,
)
