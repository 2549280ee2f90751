"""The TarFlow affine head: forward, inverse (all tokens, or one token per launch) and
backward, each one pass over memory.

Notation (``fastflow.reference.tarflow_head``): tokens x (N, T, D) in the block's order; the
causal transformer's output projection h (N, T, 2D). Token t takes its parameters from
h[:, t - 1] (the shift by one; token 0 gets a = b = 0): a = clamp(h[..., :D]) with the
optional soft clamp ``c * tanh(a / c)``, b = h[..., D:]. Forward: z = (x - b) * exp(-a),
logdet = -sum(a); inverse: x = z * exp(a) + b, logdet = +sum(a). The permutation of the
next block (identity or token reversal) is index arithmetic on z's token index: the
forward stores z_t at ``perm(t)``, the inverse loads it from there. No copy is made.

Guided (classifier-free guidance) launches read a doubled batch of h: rows [0, N) are the
conditional pass, rows [N, 2N) the unconditional one, combined as p_c + w * (p_c - p_u);
the result is written to both halves of the output so that the next transformer pass sees
the same tokens in both.

The clamp value and the guidance weight travel as a (2,) tensor in the compute dtype, not
as kernel arguments: Triton passes Python floats as float32, which would cost float64
inputs their precision. The per-token kernel reads the token position from a device
tensor, so the same launch is valid for every token (and capturable in a CUDA graph).

Log-det partial sums are written per (sample, token tile) and added by the launcher in a
fixed order: results are bitwise reproducible, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import Launch, compute_dtype, compute_type, rounded_for

CLAMP_IDS = {"none": 0, "tanh": 1}
ORDER_IDS = {"same": 0, "reversed": 1}


@triton.jit
def _clamp_a(raw, c, CLAMP: tl.constexpr):
    """(a, da/draw) of the soft clamp ``c * tanh(raw / c)`` (identity when CLAMP == 0).

    With e = exp(-2|u|) <= 1 (never overflows): tanh|u| = (1 - e) / (1 + e) and
    1 - tanh^2 = 4e / (1 + e)^2, which keeps its relative precision where tanh saturates."""
    if CLAMP == 1:
        u = raw / c
        e = tl.exp(-2.0 * tl.abs(u))
        th = (1.0 - e) / (1.0 + e)
        a = c * tl.where(u < 0.0, -th, th)
        g = 4.0 * e / ((1.0 + e) * (1.0 + e))
    else:
        a = raw
        g = tl.zeros_like(raw) + 1.0  # not raw * 0 + 1: NaN at raw = +-inf
    return a, g


@triton.jit
def _stored_token(t, T, ORDER: tl.constexpr):
    """Where token ``t`` of the block's order sits in a tensor laid out in ``ORDER``."""
    if ORDER == 1:
        return (T - 1) - t
    else:
        return t


@triton.jit
def _sample_and_tile(TILES_ON_X: tl.constexpr):
    """(sample n as int64, token tile) of this program of the all-token kernels: grid
    (N, tiles), or (tiles, N) when ``TILES_ON_X`` (more token tiles than CUDA's 65535 on
    the grid's axis 1: over 524,280 tokens of width >= 128)."""
    if TILES_ON_X:
        n = tl.program_id(1).to(tl.int64)
        pid_t = tl.program_id(0)
    else:
        n = tl.program_id(0).to(tl.int64)
        pid_t = tl.program_id(1)
    return n, pid_t


@triton.jit
def _head_kernel(
    in_ptr,    # (N, T, D) forward: x in block order; inverse: z in ORDER
    h_ptr,     # (B, T, 2D) transformer output, B = 2N when GUIDED
    out_ptr,   # (B', T, D) forward: z in ORDER; inverse: x in block order (B' = 2N if GUIDED)
    part_ptr,  # (N, N_TTILES) partial sums of -+a, compute dtype
    delta_ptr,  # (N, N_TTILES) partial max |new - old| of the output (DELTA only)
    coef_ptr,  # (2,) compute dtype: clamp, guidance weight
    N, T, D, N_TTILES,
    s_in_n, s_in_t, s_in_d, s_h_n, s_h_t, s_h_d, s_out_n, s_out_t, s_out_d,
    REVERSE: tl.constexpr, ORDER: tl.constexpr, CLAMP: tl.constexpr, GUIDED: tl.constexpr,
    DELTA: tl.constexpr, TILES_ON_X: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n, pid_t = _sample_and_tile(TILES_ON_X)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
    t64 = t.to(tl.int64)
    st64 = _stored_token(t, T, ORDER).to(tl.int64)
    c = tl.load(coef_ptr).to(COMPUTE)
    w = tl.load(coef_ptr + 1).to(COMPUTE)
    h_row = h_ptr + n * s_h_n + (t64 - 1) * s_h_t
    n_half = n * 0 + N  # the unconditional half is N rows on: int64 (N * stride passes 2^31)
    if REVERSE:
        in_row = in_ptr + n * s_in_n + st64 * s_in_t
        out_row = out_ptr + n * s_out_n + t64 * s_out_t
    else:
        in_row = in_ptr + n * s_in_n + t64 * s_in_t
        out_row = out_ptr + n * s_out_n + st64 * s_out_t
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=COMPUTE)
    dmax = tl.zeros((BLOCK_T, BLOCK_D), dtype=COMPUTE)
    for d0 in range(0, D, BLOCK_D):
        d64 = (d0 + tl.arange(0, BLOCK_D)[None, :]).to(tl.int64)
        inside = (t < T) & (d64 < D)
        shifted = inside & (t > 0)  # token 0 has no predecessor: a = b = 0
        raw = tl.load(h_row + d64 * s_h_d, mask=shifted, other=0.0).to(COMPUTE)
        b = tl.load(h_row + (d64 + D) * s_h_d, mask=shifted, other=0.0).to(COMPUTE)
        a, _ = _clamp_a(raw, c, CLAMP)
        if GUIDED:
            hu_row = h_row + n_half * s_h_n
            raw_u = tl.load(hu_row + d64 * s_h_d, mask=shifted, other=0.0).to(COMPUTE)
            b_u = tl.load(hu_row + (d64 + D) * s_h_d, mask=shifted, other=0.0).to(COMPUTE)
            a_u, _ = _clamp_a(raw_u, c, CLAMP)
            a = a + w * (a - a_u)
            b = b + w * (b - b_u)
        v = tl.load(in_row + d64 * s_in_d, mask=inside, other=0.0).to(COMPUTE)
        if REVERSE:
            out = v * tl.exp(a) + b
        else:
            out = (v - b) * tl.exp(-a)
        acc += tl.where(inside, a, 0.0)
        if DELTA:  # Jacobi: the output buffer holds the previous iterate
            old = tl.load(out_row + d64 * s_out_d, mask=inside, other=0.0)
            # no change where the stored value is the same (a 16-bit iterate at its fixed
            # point: 0, as on the reference path, not the float32 value's rounding error)
            change = tl.where(out.to(old.dtype) == old, 0.0, tl.abs(out - old.to(COMPUTE)))
            # a NaN change (a diverged iterate) counts as +inf: compiled max drops NaN
            # operands (the interpreter's numpy keeps them), which would read as converged
            change = tl.where(change == change, change, float("inf"))
            dmax = tl.maximum(dmax, tl.where(inside, change, 0.0))
        tl.store(out_row + d64 * s_out_d, rounded_for(out, out_ptr), mask=inside)
        if GUIDED:  # the unconditional half of the next pass sees the same tokens
            tl.store(out_row + n_half * s_out_n + d64 * s_out_d, rounded_for(out, out_ptr),
                     mask=inside)
    total = tl.sum(tl.sum(acc, axis=1), axis=0)
    if REVERSE:
        tl.store(part_ptr + n * N_TTILES + pid_t, total)
    else:
        tl.store(part_ptr + n * N_TTILES + pid_t, -total)
    if DELTA:
        tl.store(delta_ptr + n * N_TTILES + pid_t, tl.max(tl.max(dmax, axis=1), axis=0))


@triton.jit
def _head_bwd_kernel(
    g_ptr,     # (N, T, D) gradient of the op's output (z in ORDER; x in block order if REVERSE)
    gld_ptr,   # (N,) gradient of the op's log-det
    src_ptr,   # (N, T, D) the op's input (x in block order; z in ORDER if REVERSE)
    h_ptr,     # (N, T, 2D)
    gin_ptr,   # (N, T, D) gradient of the op's input (written, laid out like src)
    gh_ptr,    # (N, T, 2D) gradient of h (written; row T - 1 gets zeros)
    coef_ptr,  # (2,) compute dtype: clamp, (unused) guidance weight
    T, D, s_gld,
    s_g_n, s_g_t, s_g_d, s_src_n, s_src_t, s_src_d, s_h_n, s_h_t, s_h_d,
    s_gin_n, s_gin_t, s_gin_d, s_gh_n, s_gh_t, s_gh_d,
    REVERSE: tl.constexpr, ORDER: tl.constexpr, CLAMP: tl.constexpr, TILES_ON_X: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n, pid_t = _sample_and_tile(TILES_ON_X)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
    t64 = t.to(tl.int64)
    st64 = _stored_token(t, T, ORDER).to(tl.int64)
    c = tl.load(coef_ptr).to(COMPUTE)
    gld = tl.load(gld_ptr + n * s_gld).to(COMPUTE)
    h_row = h_ptr + n * s_h_n + (t64 - 1) * s_h_t
    # the gradient of h row t - 1 belongs to token t; token 0 zeroes the unused row T - 1
    gh_row = gh_ptr + n * s_gh_n + tl.where(t > 0, t64 - 1, T - 1) * s_gh_t
    if REVERSE:
        src_row = src_ptr + n * s_src_n + st64 * s_src_t
        gin_row = gin_ptr + n * s_gin_n + st64 * s_gin_t
        g_row = g_ptr + n * s_g_n + t64 * s_g_t
    else:
        src_row = src_ptr + n * s_src_n + t64 * s_src_t
        gin_row = gin_ptr + n * s_gin_n + t64 * s_gin_t
        g_row = g_ptr + n * s_g_n + st64 * s_g_t
    for d0 in range(0, D, BLOCK_D):
        d64 = (d0 + tl.arange(0, BLOCK_D)[None, :]).to(tl.int64)
        inside = (t < T) & (d64 < D)
        shifted = inside & (t > 0)
        raw = tl.load(h_row + d64 * s_h_d, mask=shifted, other=0.0).to(COMPUTE)
        b = tl.load(h_row + (d64 + D) * s_h_d, mask=shifted, other=0.0).to(COMPUTE)
        a, g = _clamp_a(raw, c, CLAMP)
        go = tl.load(g_row + d64 * s_g_d, mask=inside, other=0.0).to(COMPUTE)
        src = tl.load(src_row + d64 * s_src_d, mask=inside, other=0.0).to(COMPUTE)
        if REVERSE:  # op: x = z * exp(a) + b, logdet = +sum(a); go = dL/dx
            e = tl.exp(a)
            gin = go * e
            gb = go
            ga = gin * src + gld
        else:  # op: z = (x - b) * exp(-a), logdet = -sum(a); go = dL/dz
            e = tl.exp(-a)
            gin = go * e
            gb = -gin
            ga = -(gin * (src - b)) - gld
        tl.store(gin_row + d64 * s_gin_d, rounded_for(gin, gin_ptr), mask=inside)
        graw = tl.where(t > 0, ga * g, 0.0)
        gb = tl.where(t > 0, gb, 0.0)
        tl.store(gh_row + d64 * s_gh_d, rounded_for(graw, gh_ptr), mask=inside)
        tl.store(gh_row + (d64 + D) * s_gh_d, rounded_for(gb, gh_ptr), mask=inside)


@triton.jit
def _head_step_kernel(
    z_ptr,     # (N, T, D) the block's z, laid out in ORDER
    h_ptr,     # (B, 2D) transformer output at token pos (B = 2N when GUIDED); unused if FIRST
    pos_ptr,   # (1,) int64: the position the transformer just processed
    x_ptr,     # (N, T, D) the block's x in block order: token pos + 1 (0 if FIRST) written
    inp_ptr,   # (B, D) the next transformer step's input: the new token (both halves)
    coef_ptr,  # (2,) compute dtype: clamp, guidance weight
    N, T, D,
    s_z_n, s_z_t, s_z_d, s_h_n, s_h_d, s_x_n, s_x_t, s_x_d, s_inp_n, s_inp_d,
    FIRST: tl.constexpr, ORDER: tl.constexpr, CLAMP: tl.constexpr, GUIDED: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    d64 = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    inside = d64 < D
    if FIRST:
        tok = tl.load(pos_ptr) * 0
    else:
        tok = tl.load(pos_ptr) + 1
    tok = tok.to(tl.int64)
    zt = tl.load(z_ptr + n * s_z_n + _stored_token(tok, T, ORDER) * s_z_t + d64 * s_z_d,
                 mask=inside, other=0.0).to(COMPUTE)
    if FIRST:
        x = zt
    else:
        c = tl.load(coef_ptr).to(COMPUTE)
        w = tl.load(coef_ptr + 1).to(COMPUTE)
        h_row = h_ptr + n * s_h_n
        hu_row = h_row + (n * 0 + N) * s_h_n  # int64, as in _head_kernel
        a, _ = _clamp_a(tl.load(h_row + d64 * s_h_d, mask=inside, other=0.0).to(COMPUTE), c, CLAMP)
        b = tl.load(h_row + (d64 + D) * s_h_d, mask=inside, other=0.0).to(COMPUTE)
        if GUIDED:
            a_u, _ = _clamp_a(tl.load(hu_row + d64 * s_h_d, mask=inside,
                                      other=0.0).to(COMPUTE), c, CLAMP)
            b_u = tl.load(hu_row + (d64 + D) * s_h_d, mask=inside, other=0.0).to(COMPUTE)
            a = a + w * (a - a_u)
            b = b + w * (b - b_u)
        x = zt * tl.exp(a) + b
    tl.store(x_ptr + n * s_x_n + tok * s_x_t + d64 * s_x_d, rounded_for(x, x_ptr), mask=inside)
    tl.store(inp_ptr + n * s_inp_n + d64 * s_inp_d, rounded_for(x, inp_ptr), mask=inside)
    if GUIDED:
        tl.store(inp_ptr + (n + N) * s_inp_n + d64 * s_inp_d, rounded_for(x, inp_ptr),
                 mask=inside)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def launch_config(tokens: int, width: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) of the all-token kernels.

    BLOCK_D: the whole token width up to 128 values (the D loop then runs once for the
    usual patch sizes: 2x2x3 = 12 ... 8x8x3 = 192 takes two rounds), so each row of loads is
    one contiguous run. BLOCK_T: tokens per program so that a tile holds about 1024 values
    (512 in float64) -- enough independent loads per program to hide latency -- capped by
    the token count so that small images launch no empty rows. num_warps: 4 warps hold a
    full tile at 8 (float64: 4) values per thread: 110-190 registers on sm_90 for the
    16/32-bit specialisations, and float64, whose exp is a long routine, stays under 255
    without spilling (1024-value float64 tiles, or 2048-value tiles in any dtype, reached
    the 255 limit). A full float64 tile gets 8 warps, 2 values per thread: at 4 warps the
    clamped backward of float64 tokens with a bfloat16 h spilled 8 bytes under triton 3.9's
    ptxas (128 registers). Small tiles get 2 warps, so that none idles."""
    block_d = min(triton.next_power_of_2(max(width, 1)), 128)
    max_elems = 512 if dtype == torch.float64 else 1024
    block_t = max(1, min(triton.next_power_of_2(max(tokens, 1)), max_elems // block_d))
    full = block_t * block_d >= 512
    num_warps = (8 if dtype == torch.float64 else 4) if full else 2
    return block_t, block_d, num_warps


DEFAULT_STAGES = 3  # Triton's default on NVIDIA GPUs; no loop here is software-pipelined
MAX_GRID_YZ = 65535  # CUDA's limit on a grid's axes 1 and 2 (axis 0: 2^31 - 1)


def all_token_launch(n: int, tokens: int, width: int, dtype: torch.dtype) -> Launch:
    """The launch of ``_head_kernel`` and ``_head_bwd_kernel`` for x (n, tokens, width):
    one program per (sample, BLOCK_T tokens), on a (N, N_TTILES) grid, or (N_TTILES, N)
    when the token tiles would pass CUDA's limit on axis 1 (``blocks``: TILES_ON_X;
    ``extra``: N_TTILES)."""
    block_t, block_d, warps = launch_config(tokens, width, dtype)
    n_ttiles = triton.cdiv(tokens, block_t)
    on_x = n_ttiles > MAX_GRID_YZ
    return Launch((n_ttiles, n) if on_x else (n, n_ttiles),
                  {"TILES_ON_X": on_x, "BLOCK_T": block_t, "BLOCK_D": block_d}, warps,
                  DEFAULT_STAGES, extra={"N_TTILES": n_ttiles})


def launch_configs(n: int, tokens: int, width: int, dtype: torch.dtype = torch.float32,
                   rows: int | None = None) -> dict[str, Launch]:
    """Every launch of this family for x (n, tokens, width): {kernel name: Launch}; ``rows``
    is the sampler's batch (2n with guidance, default n). The launchers pass no
    ``num_stages``: Triton's default (3 on NVIDIA GPUs) applies, and is reported here."""
    all_tokens = all_token_launch(n, tokens, width, dtype)
    step_d, step_warps = step_block(width)
    step = Launch((rows or n, triton.cdiv(width, step_d)), {"BLOCK_D": step_d}, step_warps, DEFAULT_STAGES)
    return {"_head_kernel": all_tokens, "_head_bwd_kernel": all_tokens, "_head_step_kernel": step}


def step_block(width: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) of the one-token kernel: one program per sample covers up to
    1024 values of its token (a 16x16x3 patch is 768), more programs along D beyond that;
    one warp per 256 values (a 2x2x3 patch needs one warp, not four idle ones)."""
    block_d = min(triton.next_power_of_2(max(width, 1)), 1024)
    return block_d, max(1, min(4, block_d // 256))


def coefficients(clamp: float | None, guidance: float, dtype: torch.dtype, device) -> torch.Tensor:
    """The (2,) tensor [clamp, guidance] the kernels read, in the compute dtype of ``dtype``."""
    return torch.tensor([float(clamp or 0.0), float(guidance)], dtype=compute_dtype(dtype),
                        device=device)


def _strides3(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def head_forward(inp: torch.Tensor, h: torch.Tensor, *, clamp: float | None, order: str,
                 reverse: bool, guidance: float = 0.0, guided: bool = False,
                 out: torch.Tensor | None = None, delta: bool = False, coef=None):
    """(out, logdet[, max change]) of the head over all tokens (``reference.tarflow_head``).

    ``guided``: h has 2N rows and ``out`` (allocated here when None) 2N rows, both halves
    written. ``delta`` (Jacobi): ``out`` holds the previous iterate, updated in place; the
    largest absolute change comes back as a 0-d device tensor. Any strides are accepted."""
    n, t_count, d = inp.shape
    rows = 2 * n if guided else n
    if out is None:
        out = torch.empty((rows, t_count, d), dtype=inp.dtype, device=inp.device)
    ld_dtype = compute_dtype(inp.dtype)
    cfg = all_token_launch(n, t_count, d, inp.dtype)
    n_ttiles = cfg.extra["N_TTILES"]
    if out.numel() == 0:
        logdet = torch.zeros(n, dtype=ld_dtype, device=inp.device)
        return (out, logdet, logdet.new_zeros(())) if delta else (out, logdet)
    partials = torch.empty((n, n_ttiles), dtype=ld_dtype, device=inp.device)
    deltas = torch.empty((n, n_ttiles), dtype=ld_dtype, device=inp.device) if delta else partials
    if coef is None:
        coef = coefficients(clamp, guidance, inp.dtype, inp.device)
    _head_kernel[cfg.grid](
        inp, h, out, partials, deltas, coef, n, t_count, d, n_ttiles,
        *_strides3(inp), *_strides3(h), *_strides3(out),
        REVERSE=bool(reverse), ORDER=ORDER_IDS[order], CLAMP=CLAMP_IDS["tanh" if clamp else "none"],
        GUIDED=bool(guided), DELTA=bool(delta), COMPUTE=compute_type(inp.dtype),
        **cfg.blocks, num_warps=cfg.num_warps)
    logdet = partials[:, 0] if n_ttiles == 1 else partials.sum(dim=1)
    if delta:
        return out, logdet, deltas.amax()
    return out, logdet


def head_backward(grad_out: torch.Tensor, grad_logdet: torch.Tensor, src: torch.Tensor,
                  h: torch.Tensor, *, clamp: float | None, order: str, reverse: bool,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """(d input, dh) of the all-token head; ``src`` is the op's input. Gradients may have
    any strides, including the stride-0 ones of ``.sum().backward()``; ``out``: the two
    tensors to write them into (any strides; new ones by default)."""
    n, t_count, d = src.shape
    if out is None:
        out = (torch.empty(src.shape, dtype=src.dtype, device=src.device),
               torch.empty(h.shape, dtype=h.dtype, device=h.device))
    grad_in, grad_h = out
    if grad_in.numel() == 0:
        return grad_in, grad_h.zero_()
    cfg = all_token_launch(n, t_count, d, src.dtype)
    coef = coefficients(clamp, 0.0, src.dtype, src.device)
    _head_bwd_kernel[cfg.grid](
        grad_out, grad_logdet, src, h, grad_in, grad_h, coef, t_count, d, grad_logdet.stride(0),
        *_strides3(grad_out), *_strides3(src), *_strides3(h), *_strides3(grad_in),
        *_strides3(grad_h),
        REVERSE=bool(reverse), ORDER=ORDER_IDS[order], CLAMP=CLAMP_IDS["tanh" if clamp else "none"],
        COMPUTE=compute_type(src.dtype), **cfg.blocks, num_warps=cfg.num_warps)
    return grad_in, grad_h


def head_step(z: torch.Tensor, h_last: torch.Tensor | None, pos: torch.Tensor, x: torch.Tensor,
              inp: torch.Tensor, coef: torch.Tensor, *, first: bool, clamp: float | None,
              order: str, guided: bool) -> None:
    """One token of the inverse, in place: token ``pos + 1`` (token 0 when ``first``) of the
    block's x from z and the transformer output ``h_last`` (B, 2D) at token ``pos``, written
    into ``x`` (N, T, D) and into every row of the next step's input ``inp`` (B, D). ``pos``
    is a device tensor: nothing here reads it on the host."""
    n, t_count, d = z.shape
    if z.numel() == 0:
        return
    block_d, num_warps = step_block(d)
    h = inp if h_last is None else h_last  # not read when first
    _head_step_kernel[(n, triton.cdiv(d, block_d))](
        z, h, pos, x, inp, coef, n, t_count, d, *_strides3(z), h.stride(0), h.stride(-1),
        *_strides3(x), inp.stride(0), inp.stride(-1),
        FIRST=bool(first), ORDER=ORDER_IDS[order], CLAMP=CLAMP_IDS["tanh" if clamp else "none"],
        GUIDED=bool(guided), COMPUTE=compute_type(z.dtype), BLOCK_D=block_d, num_warps=num_warps)
