"""A small training helper for SNELLA (spec/SNELL.md §5): one optimizer step plus the allocator."""

from __future__ import annotations

import torch

from .snella import SNELLAAllocator


def snella_step(
    model: torch.nn.Module,
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    allocator: SNELLAAllocator,
    step: int,
) -> torch.Tensor:
    """backward → optimizer.step → allocator.update_importance → allocator.step(step) → zero_grad.

    `step` is the number of optimizer steps taken including this one (1 on the first call).
    The new per-layer sparsities take effect at the next forward. Returns the detached loss.
    With a GradScaler (fp16) write the loop by hand and skip update_importance on steps the
    scaler skipped: their gradients are inf/NaN.
    """
    if allocator.model is not model:
        raise ValueError("allocator was built for a different model than the one being trained")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss must be a scalar tensor, got {loss!r}")
    loss.backward()
    optimizer.step()
    allocator.update_importance()
    allocator.step(step)
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
