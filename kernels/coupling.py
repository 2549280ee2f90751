"""Affine and additive coupling: forward, inverse and backward, each one pass over memory.

Notation (DESIGN.md): x (N, C, H, W) splits into the pass-through part xa = x[:, :Ca] and the
transformed part xb = x[:, Ca:], Ca = C - C // 2, Cb = C // 2. The coupling network's output
h holds raw and t for each transformed channel; s = scale(raw) and

    shift "before":  yb = (xb + t) * s      shift "after": yb = xb * s + t
    shift "negated": yb = (xb - t) * s      additive:      yb = xb + h

logdet = sum(log s) per sample. The forward kernel writes y and one partial log-det sum per
tile; the launcher adds the partials per sample in a fixed order (bitwise reproducible, no
atomics). The backward kernel is elementwise: it takes either the op's input or its output
(``from_output``), rebuilds the other half of the (xb, yb) pair in registers, and writes
d(input) and dh in the same pass.

Every variant is a ``tl.constexpr`` specialisation of the same two kernels, named by the
mode constants below; the atan clamp is a runtime argument (one kernel for every clamp).
Tile sizes and num_warps come from ``launch_config``.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from ._layout import (TARGET_PROGRAMS, Launch, compute_dtype, compute_type, nchw, rounded_for,
                      output_like, tile_shape, warps_for)

# scale modes: s = sigmoid(raw + 2), exp(raw), the atan soft clamp; additive: no scale
SIGMOID = tl.constexpr(0)
EXP = tl.constexpr(1)
ATAN = tl.constexpr(2)
ADDITIVE = tl.constexpr(3)
# layouts of h: raw = h[:, :Cb], t = h[:, Cb:]; or t, raw interleaved
HALVES = tl.constexpr(0)
INTERLEAVED = tl.constexpr(1)
# where the shift goes: (x + t) * s; x * s + t; (x - t) * s
BEFORE = tl.constexpr(0)
AFTER = tl.constexpr(1)
NEGATED = tl.constexpr(2)
ATAN_FACTOR = tl.constexpr(0.636)  # FrEIA's soft clamp: log s = clamp * 0.636 * atan(raw / clamp)

SCALE_IDS = {"sigmoid": SIGMOID.value, "exp": EXP.value, "atan": ATAN.value,
             "additive": ADDITIVE.value}
LAYOUT_IDS = {"halves": HALVES.value, "interleaved": INTERLEAVED.value}
SHIFT_IDS = {"before": BEFORE.value, "after": AFTER.value, "negated": NEGATED.value}


@triton.jit
def _atan(u):
    """arctan in the dtype of ``u``: reduce to [0, 1], halve the angle twice, then a series."""
    a = tl.abs(u)
    big = a > 1.0
    a = tl.where(big, 1.0 / tl.maximum(a, 1.0), a)
    for _ in tl.static_range(2):
        a = a / (1.0 + tl.sqrt(1.0 + a * a))  # atan(a) = 2 atan(a / (1 + sqrt(1 + a^2)))
    a2 = a * a  # a <= tan(pi / 16): the series below is exact to float64 rounding
    p = a2 * 0.0 + 1.0 / 23.0
    for k in tl.static_range(10, -1, -1):
        p = 1.0 / (2 * k + 1) - a2 * p
    r = 4.0 * a * p
    r = tl.where(big, 1.5707963267948966 - r, r)
    return tl.where(u < 0.0, -r, r)


@triton.jit
def _clamp(clamp_hi, clamp_lo, COMPUTE: tl.constexpr):
    """The atan clamp in the compute dtype: a runtime float argument is float32, so the
    launcher passes it as a float32 pair hi + lo (exact to ~2^-48 in float64)."""
    return tl.cast(clamp_hi, COMPUTE) + tl.cast(clamp_lo, COMPUTE)


@triton.jit
def _log_scale(raw, clamp, SCALE: tl.constexpr):
    """log s for raw coupling parameters (sigmoid(raw + 2), exp(raw) or the atan clamp)."""
    if SCALE == SIGMOID:
        r = raw + 2.0
        log_s = tl.minimum(r, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(r)))
    elif SCALE == EXP:
        log_s = raw
    else:
        log_s = (clamp * ATAN_FACTOR) * _atan(raw / clamp)
    return log_s


@triton.jit
def _dlog_scale(raw, clamp, SCALE: tl.constexpr):
    """d(log s) / d(raw)."""
    if SCALE == SIGMOID:
        r = raw + 2.0
        g = tl.exp(tl.minimum(-r, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(r))))  # 1 - s, no cancellation
    elif SCALE == EXP:
        g = tl.zeros_like(raw) + 1.0  # not raw * 0 + 1: NaN at raw = +-inf
    else:
        u = raw / clamp
        g = ATAN_FACTOR / (1.0 + u * u)
    return g


@triton.jit
def _param_channels(cb, CB, SCALE: tl.constexpr, LAYOUT: tl.constexpr):
    """Channels of h holding raw and t for transformed channel ``cb``."""
    if SCALE == ADDITIVE:
        raw_ch = cb
        t_ch = cb
    elif LAYOUT == HALVES:
        raw_ch = cb
        t_ch = cb + CB
    else:
        raw_ch = 2 * cb + 1
        t_ch = 2 * cb
    return raw_ch, t_ch


@triton.jit
def _tile(pid, C, HW, N_TILES, N_PTILES, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program ``pid``'s sample n and its (BLOCK_C, BLOCK_P) tile of channels x pixels."""
    n = (pid // N_TILES).to(tl.int64)
    tile = pid % N_TILES
    c = (tile // N_PTILES) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]
    p64 = (tile % N_PTILES).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)[None, :]
    return n, c, c.to(tl.int64), p64, (c < C) & (p64 < HW)


@triton.jit
def _coupling_fwd_kernel(
    in_ptr,    # (N, C, H, W) the op's input: x, or y when REVERSE
    h_ptr,     # (N, 2*Cb, H, W) coupling-network output; (N, Cb, H, W) when additive
    out_ptr,   # (N, C, H, W) the op's output
    part_ptr,  # (N, N_TILES) partial sums of +-log s per tile, compute dtype
    C, CA, CB, HW, N_TILES, N_PTILES, clamp_hi, clamp_lo,
    s_in_n, s_in_c, s_in_p, s_h_n, s_h_c, s_h_p, s_out_n, s_out_c, s_out_p,
    SCALE: tl.constexpr, LAYOUT: tl.constexpr, SHIFT: tl.constexpr, REVERSE: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    n, c, c64, p64, inside = _tile(pid, C, HW, N_TILES, N_PTILES, BLOCK_C, BLOCK_P)
    v = tl.load(in_ptr + n * s_in_n + c64 * s_in_c + p64 * s_in_p, mask=inside, other=0.0).to(COMPUTE)

    moved = inside & (c >= CA)
    raw_ch, t_ch = _param_channels(c64 - CA, CB, SCALE, LAYOUT)
    h_row = h_ptr + n * s_h_n + p64 * s_h_p
    t = tl.load(h_row + t_ch * s_h_c, mask=moved, other=0.0).to(COMPUTE)
    if SCALE == ADDITIVE:
        if REVERSE:
            out = v - t
        else:
            out = v + t
    else:
        raw = tl.load(h_row + raw_ch * s_h_c, mask=moved, other=0.0).to(COMPUTE)
        log_s = _log_scale(raw, _clamp(clamp_hi, clamp_lo, COMPUTE), SCALE)
        if SHIFT == NEGATED:
            t = -t
        if REVERSE:
            inv_s = tl.exp(-log_s)
            if SHIFT == AFTER:
                out = (v - t) * inv_s
            else:
                out = v * inv_s - t
            log_s = -log_s
        else:
            s = tl.exp(log_s)
            if SHIFT == AFTER:
                out = v * s + t
            else:
                out = (v + t) * s
        partial = tl.sum(tl.sum(tl.where(moved, log_s, 0.0), axis=1), axis=0)
        tl.store(part_ptr + pid, partial)
    out = tl.where(c >= CA, out, v)
    tl.store(out_ptr + n * s_out_n + c64 * s_out_c + p64 * s_out_p,
             rounded_for(out, out_ptr), mask=inside)


@triton.jit
def _coupling_bwd_kernel(
    g_ptr,     # (N, C, H, W) gradient of the op's output
    gld_ptr,   # (N,) gradient of the op's log-det
    src_ptr,   # (N, C, H, W) the op's input, or its output when FROM_OUTPUT
    h_ptr,     # (N, 2*Cb, H, W) coupling-network output; (N, Cb, H, W) when additive
    gin_ptr,   # (N, C, H, W) gradient of the op's input (written)
    gh_ptr,    # shaped like h: gradient of h (written)
    C, CA, CB, HW, N_TILES, N_PTILES, s_gld, clamp_hi, clamp_lo,
    s_g_n, s_g_c, s_g_p, s_src_n, s_src_c, s_src_p, s_h_n, s_h_c, s_h_p,
    s_gin_n, s_gin_c, s_gin_p, s_gh_n, s_gh_c, s_gh_p,
    SCALE: tl.constexpr, LAYOUT: tl.constexpr, SHIFT: tl.constexpr, REVERSE: tl.constexpr,
    FROM_OUTPUT: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    n, c, c64, p64, inside = _tile(pid, C, HW, N_TILES, N_PTILES, BLOCK_C, BLOCK_P)
    go = tl.load(g_ptr + n * s_g_n + c64 * s_g_c + p64 * s_g_p, mask=inside, other=0.0).to(COMPUTE)

    moved = inside & (c >= CA)
    raw_ch, t_ch = _param_channels(c64 - CA, CB, SCALE, LAYOUT)
    h_row = h_ptr + n * s_h_n + p64 * s_h_p
    gh_row = gh_ptr + n * s_gh_n + p64 * s_gh_p
    if SCALE == ADDITIVE:
        gin = go
        if REVERSE:
            gt = -go
        else:
            gt = go
    else:
        gld = tl.load(gld_ptr + n * s_gld).to(COMPUTE)
        src = tl.load(src_ptr + n * s_src_n + c64 * s_src_c + p64 * s_src_p,
                      mask=moved, other=0.0).to(COMPUTE)
        raw = tl.load(h_row + raw_ch * s_h_c, mask=moved, other=0.0).to(COMPUTE)
        t = tl.load(h_row + t_ch * s_h_c, mask=moved, other=0.0).to(COMPUTE)
        clamp = _clamp(clamp_hi, clamp_lo, COMPUTE)
        log_s = _log_scale(raw, clamp, SCALE)
        g = _dlog_scale(raw, clamp, SCALE)
        s = tl.exp(log_s)
        inv_s = tl.exp(-log_s)
        if SHIFT == NEGATED:
            t = -t
        # the forward-direction pair (xb, yb): src is one of them, rebuild the other
        if REVERSE == FROM_OUTPUT:
            xb = src
            if SHIFT == AFTER:
                yb = xb * s + t
            else:
                yb = (xb + t) * s
        else:
            yb = src
            if SHIFT == AFTER:
                xb = (yb - t) * inv_s
            else:
                xb = yb * inv_s - t
        if REVERSE:  # op: x = F^-1(y), logdet = -sum(log s); go = dL/dxb
            gin = go * inv_s
            if SHIFT == AFTER:
                gt = -go * inv_s
                graw = -(go * xb + gld) * g
            else:
                gt = -go
                graw = -(go * yb * inv_s + gld) * g
        else:  # op: y = F(x), logdet = sum(log s); go = dL/dyb
            gin = go * s
            if SHIFT == AFTER:
                gt = go
                graw = (go * xb * s + gld) * g
            else:
                gt = go * s
                graw = (go * yb + gld) * g
        if SHIFT == NEGATED:
            gt = -gt
        tl.store(gh_row + raw_ch * s_gh_c, rounded_for(graw, gh_ptr), mask=moved)
    tl.store(gh_row + t_ch * s_gh_c, rounded_for(gt, gh_ptr), mask=moved)
    gin = tl.where(c >= CA, gin, go)
    tl.store(gin_ptr + n * s_gin_n + c64 * s_gin_c + p64 * s_gin_p,
             rounded_for(gin, gin_ptr), mask=inside)


def launch_config(n: int, c: int, hw: int, *, channels_fast: bool = False) -> Launch:
    """The launch of both coupling kernels for x (n, c, h, w) with h * w = ``hw``.

    One program per (sample, BLOCK_C x BLOCK_P tile); ``extra`` holds N_TILES (tiles per
    sample) and N_PTILES (pixel tiles per channel block)."""
    # tile elements: about total / TARGET_PROGRAMS so that the launch fills the device when
    # the work allows, a power of two between 256 (below that a program is all overhead)
    # and 2048 (above that the backward's ~10 live values per element need > 64 registers)
    per_program = triton.next_power_of_2(max(1, triton.cdiv(n * c * hw, TARGET_PROGRAMS)))
    block_c, block_p = tile_shape(c, hw, max_elems=min(2048, max(256, per_program)),
                                  channels_fast=channels_fast)
    n_ptiles = triton.cdiv(hw, block_p)
    n_tiles = triton.cdiv(c, block_c) * n_ptiles
    # num_warps: one 16-byte float32 vector per thread and tensor (4 elements)
    # num_stages 1: the kernels have no loop to software-pipeline
    return Launch(grid=(n * n_tiles,), blocks={"BLOCK_C": block_c, "BLOCK_P": block_p},
                  num_warps=warps_for(block_c * block_p, per_thread=4), num_stages=1,
                  extra={"N_TILES": n_tiles, "N_PTILES": n_ptiles})


def launch_configs(n: int, c: int, hw: int, *, channels_fast: bool = False) -> dict[str, Launch]:
    """Every launch of this family for x (n, c, h, w): {kernel name: Launch}."""
    cfg = launch_config(n, c, hw, channels_fast=channels_fast)
    return {"_coupling_fwd_kernel": cfg, "_coupling_bwd_kernel": cfg}


def _clamp_pair(clamp: float) -> tuple[float, float]:
    """``clamp`` as float32 hi + lo (a runtime float argument is float32)."""
    hi = struct.unpack("f", struct.pack("f", clamp))[0]
    return hi, struct.unpack("f", struct.pack("f", clamp - hi))[0]


def _channels_fast(t: torch.Tensor) -> bool:
    """True for channels_last memory: neighbouring channels are adjacent."""
    return t.shape[1] > 1 and t.stride(1) == 1 and t.shape[2] * t.shape[3] > 1


def _check_out(out: torch.Tensor, like: torch.Tensor, name: str):
    assert out.shape == like.shape and out.dtype == like.dtype and out.device == like.device, (
        f"{name}: expected {tuple(like.shape)} {like.dtype} on {like.device}, got "
        f"{tuple(out.shape)} {out.dtype} on {out.device}")


def coupling_forward(inp: torch.Tensor, h: torch.Tensor, *, scale: str, layout: str,
                     shift: str, clamp: float, reverse: bool, out: torch.Tensor | None = None):
    """(out, logdet) of the coupling (or of its inverse when ``reverse``). Shapes are
    validated by the caller; any strides are accepted. ``out`` (optional): where to write
    the output, shaped like ``inp`` with pixels walkable as one axis (e.g. a channel or
    sample slice of a larger tensor)."""
    n, c, hh, ww = inp.shape
    ca, cb, hw = c - c // 2, c // 2, hh * ww
    additive = scale == "additive"
    assert h.dim() == 4 and h.shape[0] == n and h.shape[2:] == inp.shape[2:] and h.shape[1] == (
        cb if additive else 2 * cb), f"h: expected (N, {'' if additive else '2*'}Cb, H, W), got {tuple(h.shape)}"
    if out is None:
        out = output_like(inp)
    _check_out(out, inp, "out")
    ld_dtype = compute_dtype(inp.dtype)
    if additive or out.numel() == 0:
        logdet = torch.zeros(n, dtype=ld_dtype, device=inp.device)
        if out.numel() == 0:
            return out, logdet
    cfg = launch_config(n, c, hw, channels_fast=_channels_fast(inp))
    n_tiles = cfg.extra["N_TILES"]
    if additive:
        partials = logdet  # unused by the additive kernel
    else:  # with one tile per sample the kernel writes the log-det itself
        partials = torch.empty((n,) if n_tiles == 1 else (n, n_tiles), dtype=ld_dtype, device=inp.device)
    inp, s_in = nchw(inp)
    h, s_h = nchw(h)
    out_w, s_out = nchw(out)
    assert out_w is out, "out: its pixels must be walkable as one axis (no copy of an output)"
    _coupling_fwd_kernel[cfg.grid](
        inp, h, out, partials, c, ca, cb, hw, n_tiles, cfg.extra["N_PTILES"], *_clamp_pair(clamp),
        *s_in, *s_h, *s_out,
        SCALE=SCALE_IDS[scale], LAYOUT=LAYOUT_IDS[layout], SHIFT=SHIFT_IDS[shift],
        REVERSE=bool(reverse), COMPUTE=compute_type(inp.dtype), **cfg.meta)
    if not additive:
        logdet = partials if n_tiles == 1 else partials.sum(dim=1)
    return out, logdet


def coupling_backward(grad_out: torch.Tensor, grad_logdet: torch.Tensor, src: torch.Tensor,
                      h: torch.Tensor, *, scale: str, layout: str, shift: str, clamp: float,
                      reverse: bool, from_output: bool, grad_in: torch.Tensor | None = None,
                      grad_h: torch.Tensor | None = None):
    """(d input, dh) of the coupling op; ``src`` is the op's input, or its output when
    ``from_output``. Gradients may have any strides, including the stride-0 ones of
    ``.sum().backward()``. ``grad_in`` / ``grad_h`` (optional): where to write them."""
    n, c, hh, ww = src.shape
    ca, cb, hw = c - c // 2, c // 2, hh * ww
    assert grad_out.shape == src.shape, f"grad_out: expected {tuple(src.shape)}, got {tuple(grad_out.shape)}"
    assert grad_logdet.shape == (n,), f"grad_logdet: expected ({n},), got {tuple(grad_logdet.shape)}"
    grad_in = output_like(src) if grad_in is None else grad_in
    grad_h = output_like(h) if grad_h is None else grad_h
    _check_out(grad_in, src, "grad_in")
    _check_out(grad_h, h, "grad_h")
    if grad_in.numel() == 0:
        return grad_in, grad_h.zero_()
    cfg = launch_config(n, c, hw, channels_fast=_channels_fast(src))
    grad_out, s_g = nchw(grad_out)
    src, s_src = nchw(src)
    h, s_h = nchw(h)
    gin_w, s_gin = nchw(grad_in)
    gh_w, s_gh = nchw(grad_h)
    assert gin_w is grad_in and gh_w is grad_h, "grad_in, grad_h: pixels must be walkable as one axis"
    _coupling_bwd_kernel[cfg.grid](
        grad_out, grad_logdet, src, h, grad_in, grad_h, c, ca, cb, hw, cfg.extra["N_TILES"],
        cfg.extra["N_PTILES"], grad_logdet.stride(0), *_clamp_pair(clamp),
        *s_g, *s_src, *s_h, *s_gin, *s_gh,
        SCALE=SCALE_IDS[scale], LAYOUT=LAYOUT_IDS[layout], SHIFT=SHIFT_IDS[shift],
        REVERSE=bool(reverse), FROM_OUTPUT=bool(from_output),
        COMPUTE=compute_type(src.dtype), **cfg.meta)
    return grad_in, grad_h
