"""Triton kernels for pysnell, installed as `pysnell.triton_kernels`.

One module per kernel family (topk, monarch, snell). Each module has a `register()` that
registers its host functions with pysnell's backend dispatcher under the op names the
autograd Functions use. pysnell calls `register()` below lazily, on the first op that could
use Triton. Under TRITON_INTERPRET=1 (set before import) the kernels also run on CPU tensors.
"""

import importlib

FAMILIES = ("topk", "monarch", "snell")


def register() -> None:
    import triton  # noqa: F401  (a clear ImportError when Triton is missing)

    for family in FAMILIES:
        try:
            module = importlib.import_module(f"{__name__}.{family}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{family}":
                continue  # family not written yet
            raise
        module.register()
