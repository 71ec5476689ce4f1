"""Small tensor helpers of the loop's components."""

from __future__ import annotations

import torch


def to_device(batch: dict, device: torch.device) -> dict:
    """``batch`` with every tensor moved to ``device`` (non-blocking); other values unchanged."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def scalar(v) -> float:
    """A Python float from a 0-d tensor or a number."""
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)
