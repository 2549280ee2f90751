"""Launcher helpers shared by the kernel families: NCHW tensors walked as (N, C, pixels)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def pixel_view(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``t`` (N, C, H, W) and the stride that walks its H*W pixels as one axis.

    NCHW-contiguous, channels_last and broadcast (stride 0) tensors qualify as they are;
    any other layout is copied once to contiguous memory."""
    _, _, h, w = t.shape
    if w == 1:
        return t, t.stride(2)
    if h == 1 or t.stride(2) == w * t.stride(3):
        return t, t.stride(3)
    t = t.contiguous()
    return t, t.stride(3)


def nchw(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(tensor, (stride_n, stride_c, stride_pixel)) for a 4-D tensor walked by pixel."""
    t, sp = pixel_view(t)
    return t, (t.stride(0), t.stride(1), sp)


def output_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised output shaped like ``t``: channels_last if ``t`` is, else NCHW."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_like(t, dtype=dtype, memory_format=torch.channels_last)
    return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device)


def tile_shape(channels: int, pixels: int, max_elems: int = 2048,
               channels_fast: bool = False) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P): a power-of-two tile of at most ``max_elems`` elements.

    Pixels are the long axis for NCHW tensors; ``channels_fast`` (channels_last memory,
    where neighbouring channels are adjacent) gives the channels up to 64 of the tile so
    that each row of loads is a contiguous run of memory."""
    if channels_fast:
        block_c = min(triton.next_power_of_2(channels), 64)
        return block_c, max(1, min(triton.next_power_of_2(pixels), max_elems // block_c))
    block_p = min(triton.next_power_of_2(pixels), 1024)
    block_c = max(1, min(triton.next_power_of_2(channels), max_elems // block_p))
    return block_c, block_p


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of reductions (log-dets, KL, partial sums): float64 for float64
    inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_type(dtype: torch.dtype):
    """The Triton dtype kernels compute in: float64 for float64, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32
