"""Triton kernels for pysnell, installed as `pysnell.triton_kernels`.

One module per kernel family. `register()` imports them and registers their host functions
with pysnell's backend dispatcher; pysnell calls it lazily, on the first op that could use it.
Under TRITON_INTERPRET=1 (set before import) the kernels also run on CPU tensors.
"""


def register() -> None:
    import triton  # noqa: F401  (a clear ImportError when Triton is missing)
