"""Triton kernels for pysnell, installed as `pysnell.triton_kernels`.

One module per kernel family (topk, monarch, snell). Each module has a `register()` that
registers its host functions with pysnell's backend dispatcher under the op names the
autograd Functions use. pysnell calls `register()` below lazily, on the first op that could
use Triton. Under TRITON_INTERPRET=1 (set before import) the kernels also run on CPU tensors.
"""

import importlib

from pysnell import _backend

FAMILIES = ("topk", "monarch", "snell")
# Families whose kernels failed to load, with the reason (their ops use another backend; `python -m
# pysnell.env` lists them).
FAMILY_ERRORS: dict[str, str] = {}


def register() -> None:
    import triton  # noqa: F401  (a clear ImportError when Triton is missing)

    for family in FAMILIES:
        try:
            importlib.import_module(f"{__name__}.{family}").register()
        except Exception as exc:  # noqa: BLE001 - one broken family must not disable the others
            FAMILY_ERRORS[family] = f"{type(exc).__name__}: {exc}"
            _backend.log.warning(
                "pysnell: the Triton %s kernels failed to load (%s); their ops use another backend",
                family,
                FAMILY_ERRORS[family],
            )
