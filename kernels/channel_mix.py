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
and ``gsum = sum_{n,p} g[:, p]``, are written as one partial per chunk of pixels into one
workspace; a finishing launch adds them in a fixed order (bitwise reproducible, no atomics)
and turns G and gsum into dA, dloc, dscale in the parameters' dtypes
(``mix_param_grads``: two launches, one allocation besides the gradients).

The LU-parameterised weight W and its log-det live in ``lu_weight.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import accumulator_dtype, compute_type, nchw, output_like


@triton.jit
def _mm(a, b, USE_DOT: tl.constexpr):
    """a (M, K) @ b (K, P) in the dtype of the operands (both already in COMPUTE)."""
    if USE_DOT:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return r


@triton.jit
def _load_pre(in_row, s_in_c, k64, k_in, p_in, pre_s_ptr, pre_b_ptr, PRE: tl.constexpr,
              COMPUTE: tl.constexpr):
    """Input rows ``k64`` of one pixel tile with the prologue applied: as they are (PRE 0),
    ActNorm (x + shift) * scale (PRE 1) or divided by the scale (PRE 2)."""
    v = tl.load(in_row + k64[:, None] * s_in_c, mask=k_in[:, None] & p_in[None, :],
                other=0.0).to(COMPUTE)
    if PRE == 1:
        sk = tl.load(pre_s_ptr + k64, mask=k_in, other=0.0).to(COMPUTE)
        bk = tl.load(pre_b_ptr + k64, mask=k_in, other=0.0).to(COMPUTE)
        v = (v + bk[:, None]) * sk[:, None]
    elif PRE == 2:
        sk = tl.load(pre_s_ptr + k64, mask=k_in, other=1.0).to(COMPUTE)
        v = v / sk[:, None]
    return v


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
        acc = _load_pre(in_row, s_in_c, k64, k_in, p_in, pre_s_ptr, pre_b_ptr, PRE, COMPUTE)
    else:
        acc = tl.zeros((BLOCK_O, BLOCK_P), dtype=COMPUTE)
        for k0 in range(0, C, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_in = k < C
            k64 = k.to(tl.int64)
            a = tl.load(a_ptr + o64[:, None] * s_a_o + k64[None, :] * s_a_k,
                        mask=o_in[:, None] & k_in[None, :], other=0.0).to(COMPUTE)
            v = _load_pre(in_row, s_in_c, k64, k_in, p_in, pre_s_ptr, pre_b_ptr, PRE, COMPUTE)
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
    spart_ptr,  # (N_CHUNKS, Co) partial gsum, starting SP_OFF elements after spart_ptr
    C, CO, HW, NQ, N_OT, N_KT, CHUNK, SP_OFF,
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
        tl.store(spart_ptr + SP_OFF + chunk.to(tl.int64) * CO + o64, tl.sum(sacc, axis=1), mask=o_in)


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


# --------------------------------------------------------------------------------------
# Mix backward: the parameter gradients from the reduction's partials, in one launch
# --------------------------------------------------------------------------------------


@triton.jit
def _csum_vec(ptr, off, m, N_CHUNKS, STRIDE, COMPUTE: tl.constexpr, BLOCK_CH: tl.constexpr,
              BLOCK: tl.constexpr):
    """sum over chunks ch of ptr[ch * STRIDE + off] for a (BLOCK,) ``off``: BLOCK_CH chunks
    per load, added by a fixed-order tree, the blocks in order (deterministic)."""
    acc = tl.zeros((BLOCK,), dtype=COMPUTE)
    chs = tl.arange(0, BLOCK_CH)
    for ch0 in range(0, N_CHUNKS, BLOCK_CH):
        ch = ch0 + chs
        v = tl.load(ptr + ch.to(tl.int64)[:, None] * STRIDE + off[None, :],
                    mask=(ch < N_CHUNKS)[:, None] & m[None, :], other=0.0)
        acc += tl.sum(v.to(COMPUTE), axis=0)
    return acc


@triton.jit
def _csum_mat(ptr, off, m, N_CHUNKS, STRIDE, COMPUTE: tl.constexpr, BLOCK_CH: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """As ``_csum_vec`` for a (BLOCK_R, BLOCK_C) ``off``."""
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=COMPUTE)
    chs = tl.arange(0, BLOCK_CH)
    for ch0 in range(0, N_CHUNKS, BLOCK_CH):
        ch = ch0 + chs
        v = tl.load(ptr + ch.to(tl.int64)[:, None, None] * STRIDE + off[None, :, :],
                    mask=(ch < N_CHUNKS)[:, None, None] & m[None, :, :], other=0.0)
        acc += tl.sum(v.to(COMPUTE), axis=0)
    return acc


@triton.jit
def _finish_kernel(
    ws_ptr,     # (N_CHUNKS * G_SIZE + N_CHUNKS * Co,) workspace: partial G, then partial gsum
    a_ptr,      # (Co, C) the mixing matrix, any strides (unused when DIAG)
    s_ptr,      # (C,) ActNorm scale, forward; (Co,) in reverse (HAS_AN)
    dw_ptr,     # (Co, C) d weight, strides s_dw_o / s_dw_k (unused when DIAG)
    dl_ptr,     # (C,) or (Co,) d loc, contiguous (HAS_AN)
    ds_ptr,     # (C,) or (Co,) d scale, contiguous (HAS_AN)
    C, CO, N_CHUNKS, G_SIZE, SP_OFF,
    s_a_o, s_a_k, s_dw_o, s_dw_k,
    HAS_AN: tl.constexpr, DIAG: tl.constexpr, BY_ROW: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_CH: tl.constexpr,
):
    """G = sum over chunks of the partials (``_csum_*``: fixed order), then per mode:

    DIAG (ActNorm alone, G = diag):  forward ds = G, dl = s * gsum; BY_ROW (reverse)
                                     ds = -G / s^2, dl = -gsum
    not BY_ROW (forward, or no ActNorm): programs over input channels k,
        dw = G * s[k] (G without ActNorm), ds[k] = sum_o A[o, k] G[o, k],
        dl[k] = s[k] sum_o gsum[o] A[o, k]
    BY_ROW (reverse with ActNorm): programs over output channels o,
        dw = G / s[o], ds[o] = -sum_k A[o, k] G[o, k] / s[o]^2, dl[o] = -gsum[o]"""
    pid = tl.program_id(0)
    v = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    v64 = v.to(tl.int64)
    if DIAG:
        v_in = v < C
        g = _csum_vec(ws_ptr, v64, v_in, N_CHUNKS, G_SIZE, COMPUTE, BLOCK_CH, BLOCK_V)
        gs = _csum_vec(ws_ptr + SP_OFF, v64, v_in, N_CHUNKS, CO, COMPUTE, BLOCK_CH, BLOCK_V)
        s = tl.load(s_ptr + v64, mask=v_in, other=1.0).to(COMPUTE)
        if BY_ROW:
            tl.store(ds_ptr + v64, (-g / (s * s)).to(ds_ptr.dtype.element_ty), mask=v_in)
            tl.store(dl_ptr + v64, (-gs).to(dl_ptr.dtype.element_ty), mask=v_in)
        else:
            tl.store(ds_ptr + v64, g.to(ds_ptr.dtype.element_ty), mask=v_in)
            tl.store(dl_ptr + v64, (s * gs).to(dl_ptr.dtype.element_ty), mask=v_in)
    elif BY_ROW:
        o = v
        o64 = v64
        o_in = o < CO
        s = tl.load(s_ptr + o64, mask=o_in, other=1.0).to(COMPUTE)
        ds = tl.zeros((BLOCK_V,), dtype=COMPUTE)
        for k0 in range(0, C, BLOCK_W):
            k = k0 + tl.arange(0, BLOCK_W)
            k64 = k.to(tl.int64)
            m = o_in[:, None] & (k < C)[None, :]
            g = _csum_mat(ws_ptr, o64[:, None] * C + k64[None, :], m, N_CHUNKS, G_SIZE,
                          COMPUTE, BLOCK_CH, BLOCK_V, BLOCK_W)
            a = tl.load(a_ptr + o64[:, None] * s_a_o + k64[None, :] * s_a_k, mask=m, other=0.0).to(COMPUTE)
            ds += tl.sum(a * g, axis=1)
            tl.store(dw_ptr + o64[:, None] * s_dw_o + k64[None, :] * s_dw_k,
                     (g / s[:, None]).to(dw_ptr.dtype.element_ty), mask=m)
        gs = _csum_vec(ws_ptr + SP_OFF, o64, o_in, N_CHUNKS, CO, COMPUTE, BLOCK_CH, BLOCK_V)
        tl.store(ds_ptr + o64, (-ds / (s * s)).to(ds_ptr.dtype.element_ty), mask=o_in)
        tl.store(dl_ptr + o64, (-gs).to(dl_ptr.dtype.element_ty), mask=o_in)
    else:
        k = v
        k64 = v64
        k_in = k < C
        if HAS_AN:
            s = tl.load(s_ptr + k64, mask=k_in, other=1.0).to(COMPUTE)
        ds = tl.zeros((BLOCK_V,), dtype=COMPUTE)
        dl = tl.zeros((BLOCK_V,), dtype=COMPUTE)
        for o0 in range(0, CO, BLOCK_W):
            o = o0 + tl.arange(0, BLOCK_W)
            o64 = o.to(tl.int64)
            o_in = o < CO
            m = o_in[:, None] & k_in[None, :]
            g = _csum_mat(ws_ptr, o64[:, None] * C + k64[None, :], m, N_CHUNKS, G_SIZE,
                          COMPUTE, BLOCK_CH, BLOCK_W, BLOCK_V)
            if HAS_AN:
                gs = _csum_vec(ws_ptr + SP_OFF, o64, o_in, N_CHUNKS, CO, COMPUTE, BLOCK_CH,
                               BLOCK_W)
                a = tl.load(a_ptr + o64[:, None] * s_a_o + k64[None, :] * s_a_k, mask=m,
                            other=0.0).to(COMPUTE)
                ds += tl.sum(a * g, axis=0)
                dl += tl.sum(a * gs[:, None], axis=0)
                g = g * s[None, :]
            tl.store(dw_ptr + o64[:, None] * s_dw_o + k64[None, :] * s_dw_k,
                     g.to(dw_ptr.dtype.element_ty), mask=m)
        if HAS_AN:
            tl.store(ds_ptr + k64, ds.to(ds_ptr.dtype.element_ty), mask=k_in)
            tl.store(dl_ptr + k64, (s * dl).to(dl_ptr.dtype.element_ty), mask=k_in)


def mix_param_grads(grad: torch.Tensor, inp: torch.Tensor, a: torch.Tensor | None,
                    scale: torch.Tensor | None, shift: torch.Tensor | None, *, reverse: bool,
                    d_a: torch.Tensor | None, d_loc: torch.Tensor | None,
                    d_scale: torch.Tensor | None) -> None:
    """The parameter gradients of ``mix`` written into ``d_a``, ``d_loc``, ``d_scale``
    (allocated by the caller in the parameters' dtypes; d_a any strides, the vectors
    contiguous): one reduction launch (skipped when there are no pixels) and one finishing
    launch. ``a`` None is ActNorm alone, ``scale`` None the convolution alone; ``shift`` is
    loc for the forward map with ActNorm (None otherwise). Deterministic: one partial per
    chunk of pixels, added in a fixed order by the finishing launch."""
    n, co, hh, ww = grad.shape
    c = inp.shape[1]
    hw = hh * ww
    nq = n * hw
    diag = a is None
    fp64 = inp.dtype == torch.float64
    cdt = accumulator_dtype(inp.dtype)
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
    if nq > 0:
        # enough chunks to fill a GPU (a function of the shapes only: reproducible)
        target = max(1, 1024 // (n_ot * n_kt))
        chunk = max(block_q, triton.cdiv(triton.cdiv(nq, target), block_q) * block_q)
        chunk = max(chunk, 4 * block_q) if nq > 4 * block_q else chunk
        n_chunks = triton.cdiv(nq, chunk)
    else:
        chunk, n_chunks = block_q, 0
    g_size = c if diag else co * c
    sp_off = n_chunks * g_size
    ws = torch.empty(max(1, n_chunks * (g_size + co)), dtype=cdt, device=inp.device)
    if n_chunks > 0:
        grad, s_g = nchw(grad)
        inp, s_in = nchw(inp)
        _reduce_kernel[(n_chunks * n_ot * n_kt,)](
            grad, inp, shift if shift is not None else inp, ws, ws,
            c, co, hw, nq, n_ot, n_kt, chunk, sp_off, *s_g, *s_in,
            SHIFT=shift is not None, DIAG=diag, USE_DOT=not fp64,
            COMPUTE=compute_type(inp.dtype),
            BLOCK_O=block_o, BLOCK_K=block_k, BLOCK_Q=block_q)
    has_an = scale is not None
    by_row = reverse and has_an
    width = c if diag else (co if by_row else c)
    # small tiles, many chunks per load: the partials are summed 16 chunks at a time
    block_v = min(max(triton.next_power_of_2(width), 2), 16)
    block_w = min(max(triton.next_power_of_2(c if by_row else co), 2), 16)
    block_ch = min(max(triton.next_power_of_2(max(n_chunks, 1)), 2), 16)
    dummy = ws
    s_a = (0, 0) if diag else (a.stride(0), a.stride(1))
    s_dw = (0, 0) if d_a is None else (d_a.stride(0), d_a.stride(1))
    _finish_kernel[(triton.cdiv(width, block_v),)](
        ws, dummy if diag else a, scale if has_an else dummy,
        dummy if d_a is None else d_a, dummy if d_loc is None else d_loc,
        dummy if d_scale is None else d_scale,
        c, co, n_chunks, g_size, sp_off, *s_a, *s_dw,
        HAS_AN=has_an, DIAG=diag, BY_ROW=by_row, COMPUTE=compute_type(inp.dtype),
        BLOCK_V=block_v, BLOCK_W=block_w, BLOCK_CH=block_ch)
