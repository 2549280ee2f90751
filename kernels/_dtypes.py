"""The dtype fastflow computes in, for the kernels and the reference alike: no Triton import
here, so ``fastflow.reference`` (and ``import fastflow``) can share it."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of the math and of reductions (log-dets, KL, partial sums): float64
    for float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32
