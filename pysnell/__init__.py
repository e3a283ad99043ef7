"""pysnell: sparse, low-rank and structured fine-tuning kernels for PyTorch.

SNELL / SNELLA (kernelized LoRA with competition-based sparsification), Monarch matrices and
in-place top-k masking, each with a pure-PyTorch reference and Triton / CUDA kernels.
"""

# peft_integration: pysnell.peft_integration.register() makes SNELL a peft method (importing it does not import peft)
from . import _backend, _jit, peft_integration  # noqa: F401
from ._backend import get_backend, last_backend, set_backend
from .adapter import (
    SNELLConfig,
    disable_adapter,
    inject,
    load_adapter,
    merge_and_unload,
    monarchize,
    print_trainable_parameters,
    save_adapter,
)
from .functional import kernel_merge, snell_linear, sparsify
from .nn import MonarchLinear, SNELLLinear
from .ops.monarch.function import monarch_matmul, monarch_project
from .ops.topk.function import topk_mask, topk_mask_
from .snella import SNELLAAllocator
from .train import snella_step

__version__ = "0.1.0"


def _load_triton():
    from .triton_kernels import register

    register()


_backend.register_loader("triton", _load_triton)
_backend.register_loader("cuda", _jit.load_cuda_backend)  # builds csrc/ lazily, on the first CUDA op

__all__ = [
    "SNELLAAllocator",
    "SNELLConfig",
    "MonarchLinear",
    "SNELLLinear",
    "disable_adapter",
    "get_backend",
    "inject",
    "kernel_merge",
    "last_backend",
    "load_adapter",
    "merge_and_unload",
    "monarch_matmul",
    "monarch_project",
    "monarchize",
    "print_trainable_parameters",
    "save_adapter",
    "set_backend",
    "snell_linear",
    "snella_step",
    "sparsify",
    "topk_mask",
    "topk_mask_",
]
