"""ActNorm folded into the invertible 1x1 convolution: one pass per direction, per pixel

    forward:  y = W (scale * (x + loc))          (ActNorm, then the 1x1 convolution)
    inverse:  x = (V y) / scale - loc            (V = W^-1, assembled by the caller)

Both are the same kernel, ``out[o] = post(sum_k A[o, k] * pre(in[k]))``, with the ActNorm
parts as ``tl.constexpr`` prologue/epilogue modes (``PRE``, ``POST``) applied in registers
while a tile is loaded or stored, so the ActNorm never costs a pass over memory:

    PRE  0: in             1: (in + shift) * scale        2: in / scale
    POST 0: acc            1: acc / scale - shift         3: acc * scale

``A`` (Co, C) is read through its strides, so the backward's ``A^T`` is a stride swap.
``DIAG`` drops ``A`` (ActNorm alone: out[c] = post(pre(in[c]))). Channels are tiled
(BLOCK_O output channels per program, a loop over BLOCK_K input channels), so C may be
anything from 1 to thousands. float32/16/bf16 compute in float32 with ``tl.dot`` at
``input_precision="ieee"`` (tf32 would break the inverse's accuracy); float64 computes in
float64 with a broadcast multiply-and-sum instead of ``tl.dot``.

The backward's reductions over all pixels, ``G = sum_{n,p} g[:, p] (in[:, p] + shift)^T``
and ``gsum = sum_{n,p} g[:, p]``, are written as one partial per chunk of pixels and added
by the launcher in a fixed order: bitwise reproducible, no atomics. The parameter
gradients (dA, dloc, dscale) follow from G and gsum in a few (C, C)-sized operations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import compute_type, nchw, output_like


@triton.jit
def _mm(a, b, USE_DOT: tl.constexpr):
    """a (M, K) @ b (K, P) in the dtype of the operands (both already in COMPUTE)."""
    if USE_DOT:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return r


@triton.jit
def _mix_kernel(
    in_ptr,     # (N, C, H, W) the op's input
    a_ptr,      # (Co, C) the mixing matrix, any strides (unused when DIAG)
    pre_s_ptr,  # (C,) prologue scale (PRE 1, 2)
    pre_b_ptr,  # (C,) prologue shift (PRE 1)
    post_s_ptr,  # (Co,) epilogue scale (POST 1, 3)
    post_b_ptr,  # (Co,) epilogue shift (POST 1)
    out_ptr,    # (N, Co, H, W) the op's output
    C, CO, HW, N_TILES, N_PTILES,
    s_in_n, s_in_c, s_in_p, s_a_o, s_a_k, s_out_n, s_out_c, s_out_p,
    PRE: tl.constexpr, POST: tl.constexpr, DIAG: tl.constexpr, USE_DOT: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    n = (pid // N_TILES).to(tl.int64)
    tile = pid % N_TILES
    o = (tile // N_PTILES) * BLOCK_O + tl.arange(0, BLOCK_O)
    p = (tile % N_PTILES) * BLOCK_P + tl.arange(0, BLOCK_P)
    o_in = o < CO
    p_in = p < HW
    o64 = o.to(tl.int64)
    p64 = p.to(tl.int64)
    in_row = in_ptr + n * s_in_n + p64[None, :] * s_in_p
    if DIAG:
        k = o
        k_in = o_in
        k64 = o64
        v = tl.load(in_row + k64[:, None] * s_in_c, mask=k_in[:, None] & p_in[None, :],
                    other=0.0).to(COMPUTE)
        if PRE == 1:
            sk = tl.load(pre_s_ptr + k64, mask=k_in, other=0.0).to(COMPUTE)
            bk = tl.load(pre_b_ptr + k64, mask=k_in, other=0.0).to(COMPUTE)
            v = (v + bk[:, None]) * sk[:, None]
        elif PRE == 2:
            sk = tl.load(pre_s_ptr + k64, mask=k_in, other=1.0).to(COMPUTE)
            v = v / sk[:, None]
        acc = v
    else:
        acc = tl.zeros((BLOCK_O, BLOCK_P), dtype=COMPUTE)
        for k0 in range(0, C, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_in = k < C
            k64 = k.to(tl.int64)
            a = tl.load(a_ptr + o64[:, None] * s_a_o + k64[None, :] * s_a_k,
                        mask=o_in[:, None] & k_in[None, :], other=0.0).to(COMPUTE)
            v = tl.load(in_row + k64[:, None] * s_in_c, mask=k_in[:, None] & p_in[None, :],
                        other=0.0).to(COMPUTE)
            if PRE == 1:
                sk = tl.load(pre_s_ptr + k64, mask=k_in, other=0.0).to(COMPUTE)
                bk = tl.load(pre_b_ptr + k64, mask=k_in, other=0.0).to(COMPUTE)
                v = (v + bk[:, None]) * sk[:, None]
            elif PRE == 2:
                sk = tl.load(pre_s_ptr + k64, mask=k_in, other=1.0).to(COMPUTE)
                v = v / sk[:, None]
            acc += _mm(a, v, USE_DOT)
    if POST == 1:
        so = tl.load(post_s_ptr + o64, mask=o_in, other=1.0).to(COMPUTE)
        bo = tl.load(post_b_ptr + o64, mask=o_in, other=0.0).to(COMPUTE)
        acc = acc / so[:, None] - bo[:, None]
    elif POST == 3:
        so = tl.load(post_s_ptr + o64, mask=o_in, other=0.0).to(COMPUTE)
        acc = acc * so[:, None]
    tl.store(out_ptr + n * s_out_n + o64[:, None] * s_out_c + p64[None, :] * s_out_p,
             acc.to(out_ptr.dtype.element_ty), mask=o_in[:, None] & p_in[None, :])


@triton.jit
def _reduce_kernel(
    g_ptr,      # (N, Co, H, W) gradient of the op's output, any strides (stride 0 too)
    in_ptr,     # (N, C, H, W) the op's input
    shift_ptr,  # (C,) added to the input before the product (SHIFT)
    gpart_ptr,  # (N_CHUNKS, Co, C) partial G, or (N_CHUNKS, C) partial diag(G) when DIAG
    spart_ptr,  # (N_CHUNKS, Co) partial gsum
    C, CO, HW, NQ, N_OT, N_KT, CHUNK,
    s_g_n, s_g_c, s_g_p, s_in_n, s_in_c, s_in_p,
    SHIFT: tl.constexpr, DIAG: tl.constexpr, USE_DOT: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    pid = tl.program_id(0)
    chunk = pid // (N_OT * N_KT)
    rest = pid % (N_OT * N_KT)
    ot = rest // N_KT
    kt = rest % N_KT
    o = ot * BLOCK_O + tl.arange(0, BLOCK_O)
    o_in = o < CO
    o64 = o.to(tl.int64)
    if DIAG:
        k = o
    else:
        k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
    k_in = k < C
    k64 = k.to(tl.int64)
    if SHIFT:
        bk = tl.load(shift_ptr + k64, mask=k_in, other=0.0).to(COMPUTE)
    if DIAG:
        gacc = tl.zeros((BLOCK_O, BLOCK_Q), dtype=COMPUTE)
    else:
        gacc = tl.zeros((BLOCK_O, BLOCK_K), dtype=COMPUTE)
    sacc = tl.zeros((BLOCK_O, BLOCK_Q), dtype=COMPUTE)
    q_start = chunk.to(tl.int64) * CHUNK
    for q0 in range(0, CHUNK, BLOCK_Q):
        q = q_start + q0 + tl.arange(0, BLOCK_Q).to(tl.int64)  # flat (sample, pixel) index
        q_in = q < NQ
        n = q // HW
        p = q % HW
        g = tl.load(g_ptr + n[None, :] * s_g_n + o64[:, None] * s_g_c + p[None, :] * s_g_p,
                    mask=o_in[:, None] & q_in[None, :], other=0.0).to(COMPUTE)
        sacc += g
        if DIAG:
            v = tl.load(in_ptr + n[None, :] * s_in_n + k64[:, None] * s_in_c + p[None, :] * s_in_p,
                        mask=k_in[:, None] & q_in[None, :], other=0.0).to(COMPUTE)
            if SHIFT:
                v = tl.where(q_in[None, :], v + bk[:, None], 0.0)
            gacc += g * v
        else:
            # the input tile read transposed, (BLOCK_Q, BLOCK_K), ready for g @ v
            v = tl.load(in_ptr + n[:, None] * s_in_n + k64[None, :] * s_in_c + p[:, None] * s_in_p,
                        mask=q_in[:, None] & k_in[None, :], other=0.0).to(COMPUTE)
            if SHIFT:
                v = tl.where(q_in[:, None], v + bk[None, :], 0.0)
            gacc += _mm(g, v, USE_DOT)
    if DIAG:
        tl.store(gpart_ptr + chunk.to(tl.int64) * C + k64, tl.sum(gacc, axis=1), mask=k_in)
    else:
        tl.store(gpart_ptr + chunk.to(tl.int64) * CO * C + o64[:, None] * C + k64[None, :],
                 gacc, mask=o_in[:, None] & k_in[None, :])
    if kt == 0:
        tl.store(spart_ptr + chunk.to(tl.int64) * CO + o64, tl.sum(sacc, axis=1), mask=o_in)


PRE_IDS = {None: 0, "actnorm": 1, "divide": 2}
POST_IDS = {None: 0, "actnorm_inverse": 1, "multiply": 3}


def _blocks(co: int, c: int, fp64: bool, diag: bool) -> tuple[int, int, int]:
    """(BLOCK_O, BLOCK_K, BLOCK_P) for the mixing kernel."""
    if diag:
        bo = min(triton.next_power_of_2(co), 64)
        return bo, bo, 64
    if fp64:  # broadcast product: keep the (O, K, P) cube small
        return min(max(triton.next_power_of_2(co), 16), 32), 8, 32
    return min(max(triton.next_power_of_2(co), 16), 64), min(max(triton.next_power_of_2(c), 16), 32), 64


def mix(inp: torch.Tensor, a: torch.Tensor | None, *, transpose_a: bool = False,
        pre: str | None = None,
        pre_scale: torch.Tensor | None = None, pre_shift: torch.Tensor | None = None,
        post: str | None = None, post_scale: torch.Tensor | None = None,
        post_shift: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
        ) -> torch.Tensor:
    """``out[:, o] = post(sum_k a[o, k] pre(inp[:, k]))`` per pixel (``a=None``: out = post(pre(inp))).

    ``inp`` (N, C, H, W) and ``a`` (Co, C) (read as ``a.T`` when ``transpose_a``) may have
    any strides; vectors are contiguous (C,) / (Co,). Validation is the caller's job."""
    n, c, hh, ww = inp.shape
    diag = a is None
    co = c if diag else a.shape[1 if transpose_a else 0]
    hw = hh * ww
    out = output_like(inp, out_dtype) if co == c else torch.empty(
        (n, co, hh, ww), dtype=out_dtype or inp.dtype, device=inp.device)
    if out.numel() == 0:
        return out
    fp64 = inp.dtype == torch.float64
    block_o, block_k, block_p = _blocks(co, c, fp64, diag)
    block_p = min(block_p, max(triton.next_power_of_2(hw), 16 if not diag else 1))
    n_ptiles = triton.cdiv(hw, block_p)
    n_tiles = triton.cdiv(co, block_o) * n_ptiles
    inp, s_in = nchw(inp)
    _, s_out = nchw(out)
    a_arg = inp if diag else a
    s_a = (0, 0) if diag else (a.stride(0), a.stride(1))
    if transpose_a:
        s_a = s_a[::-1]
    dummy = inp
    _mix_kernel[(n * n_tiles,)](
        inp, a_arg, pre_scale if pre_scale is not None else dummy,
        pre_shift if pre_shift is not None else dummy,
        post_scale if post_scale is not None else dummy,
        post_shift if post_shift is not None else dummy,
        out, c, co, hw, n_tiles, n_ptiles, *s_in, *s_a, *s_out,
        PRE=PRE_IDS[pre], POST=POST_IDS[post], DIAG=diag, USE_DOT=not fp64,
        COMPUTE=compute_type(inp.dtype), BLOCK_O=block_o, BLOCK_K=block_k, BLOCK_P=block_p)
    return out


def reduce(grad: torch.Tensor, inp: torch.Tensor, *, diag: bool,
           shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, gsum) over all samples and pixels, in the compute dtype:
    ``G[o, k] = sum g[:, o] (inp[:, k] + shift[k])`` ((C,) diagonal only when ``diag``) and
    ``gsum[o] = sum g[:, o]``. Deterministic: fixed chunks added in a fixed order."""
    n, co, hh, ww = grad.shape
    c = inp.shape[1]
    hw = hh * ww
    nq = n * hw
    cdt = torch.float64 if inp.dtype == torch.float64 else torch.float32
    if nq == 0:
        g_shape = (c,) if diag else (co, c)
        return (torch.zeros(g_shape, dtype=cdt, device=inp.device),
                torch.zeros(co, dtype=cdt, device=inp.device))
    fp64 = inp.dtype == torch.float64
    if diag:
        block_o = min(triton.next_power_of_2(co), 32)
        block_k, block_q = block_o, 64
    elif fp64:
        block_o, block_k, block_q = min(max(triton.next_power_of_2(co), 16), 32), min(
            max(triton.next_power_of_2(c), 16), 32), 8
    else:
        block_o, block_k, block_q = min(max(triton.next_power_of_2(co), 16), 64), min(
            max(triton.next_power_of_2(c), 16), 64), 64
    n_ot = triton.cdiv(co, block_o)
    n_kt = 1 if diag else triton.cdiv(c, block_k)
    # enough chunks to fill a GPU (a function of the shapes only: reproducible)
    target = max(1, 1024 // (n_ot * n_kt))
    chunk = max(block_q, triton.cdiv(triton.cdiv(nq, target), block_q) * block_q)
    chunk = max(chunk, 4 * block_q) if nq > 4 * block_q else chunk
    n_chunks = triton.cdiv(nq, chunk)
    gpart = torch.empty((n_chunks, c) if diag else (n_chunks, co, c), dtype=cdt, device=inp.device)
    spart = torch.empty((n_chunks, co), dtype=cdt, device=inp.device)
    grad, s_g = nchw(grad)
    inp, s_in = nchw(inp)
    _reduce_kernel[(n_chunks * n_ot * n_kt,)](
        grad, inp, shift if shift is not None else inp, gpart, spart,
        c, co, hw, nq, n_ot, n_kt, chunk, *s_g, *s_in,
        SHIFT=shift is not None, DIAG=diag, USE_DOT=not fp64, COMPUTE=compute_type(inp.dtype),
        BLOCK_O=block_o, BLOCK_K=block_k, BLOCK_Q=block_q)
    if n_chunks == 1:
        return gpart[0], spart[0]
    return gpart.sum(dim=0), spart.sum(dim=0)
