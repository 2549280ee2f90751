"""Launcher helpers shared by the kernel families: NCHW tensors walked as (N, C, pixels),
the compute dtype (``compute_dtype``, defined in the Triton-free ``_dtypes`` and shared with
``fastflow.reference``; ``compute_type`` is its Triton type), and ``Launch``: one launch's
grid, block sizes, num_warps, num_stages.

Every family picks its tiles in one ``*_config`` helper from the amount of work, never by
autotuning (a reduction's order is a function of the shapes only: bitwise reproducible)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ._dtypes import compute_dtype  # the one definition (the families import it from here)


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


def output_like(t: torch.Tensor, dtype: torch.dtype | None = None,
                shape: tuple | None = None) -> torch.Tensor:
    """An uninitialised output shaped like ``t`` (or ``shape``, e.g. another channel
    count): channels_last if ``t`` is, else NCHW."""
    shape = t.shape if shape is None else shape
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.empty(shape, dtype=dtype or t.dtype, device=t.device,
                           memory_format=torch.channels_last)
    return torch.empty(shape, dtype=dtype or t.dtype, device=t.device)


# The device the tile sizes aim to fill: an H100 SXM has 132 SMs (an H200 too). A constant,
# not a device query (nothing queries the GPU at import or launch-planning time); on a
# smaller GPU the same tiles still work, with more waves.
TARGET_SMS = 132
# Programs per launch we aim for when the work allows: two per SM, so that one program's
# memory latency overlaps another's on the same SM.
TARGET_PROGRAMS = 2 * TARGET_SMS


@dataclass(frozen=True)
class Launch:
    """One kernel launch: its grid, its ``tl.constexpr`` block sizes and the compiler
    options ``num_warps`` / ``num_stages``; ``extra`` holds launch facts that are not kernel
    arguments (tile counts, chunk sizes) for the launcher and the benchmarks."""

    grid: tuple[int, ...]
    blocks: dict
    num_warps: int
    num_stages: int
    extra: dict = field(default_factory=dict)

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    @property
    def meta(self) -> dict:
        """The keyword arguments to splat into ``kernel[grid](...)``."""
        return {**self.blocks, "num_warps": self.num_warps, "num_stages": self.num_stages}


def warps_for(elems_per_program: int, per_thread: int = 8, lo: int = 1, hi: int = 8) -> int:
    """num_warps giving each thread about ``per_thread`` elements of a program's tile (two
    16-byte float32 vectors: enough independent loads in flight per thread without raising
    register pressure), within [lo, hi] and a power of two."""
    w = max(lo, min(hi, elems_per_program // (32 * per_thread)))
    return 1 << (w.bit_length() - 1)


def fitted_block(n: int, choices=(64, 32, 16)) -> int:
    """The block from ``choices`` (powers of two, largest first) that pads ``n`` least,
    the largest on a tie: e.g. 48 -> 16 (3 blocks, no padding), 24 -> 32, 96 -> 32, 12 -> 16."""
    return min(choices, key=lambda b: (-(-n // b) * b, -b))


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


def compute_type(dtype: torch.dtype):
    """The Triton dtype kernels compute in: ``compute_dtype`` as a Triton type."""
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


@triton.jit
def rounded_for(v, ptr):
    """``v`` (float32 or float64) in the element type of ``ptr``, for a store: a 16-bit
    float through float32 (Triton's interpreter turns a direct float64 -> bfloat16
    conversion into garbage and NaN; the extra rounding is far below the 16-bit one), other
    types directly."""
    ty = ptr.dtype.element_ty
    if ty.primitive_bitwidth == 16:
        return v.to(tl.float32).to(ty)
    else:
        return v.to(ty)
