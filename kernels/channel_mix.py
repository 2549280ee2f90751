"""ActNorm folded into the invertible 1x1 convolution: one pass per direction, per pixel

    forward:  y = W (scale * (x + loc))          (ActNorm, then the 1x1 convolution)
    inverse:  x = (V y) / scale - loc            (V = W^-1, assembled by the caller)

Both are the same kernel, ``out[o] = post(sum_k A[o, k] * pre(in[k]))``, with the ActNorm
parts as ``tl.constexpr`` prologue/epilogue modes (``PRE``, ``POST``) applied in registers
while a tile is loaded or stored, so the ActNorm never costs a pass over memory:

    PRE   PRE_NONE: in     PRE_ACTNORM: (in + shift) * scale     PRE_DIVIDE: in / scale
    POST  POST_NONE: acc   POST_ACTNORM_INVERSE: acc / scale - shift   POST_MULTIPLY: acc * scale

``STORE_OUT2`` also stores the output's first C2 channels into a second tensor from the
same registers (``channel_mix_split``: Glow's coupling network reads them as a tensor of
their own); ``ADD_IN2`` (the mix) and ``ADD_G2`` (the reduction) add that tensor's
gradient to the incoming gradient's first C2 channels as they load it.

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
(``mix_param_grads``: two launches, one allocation besides the gradients). The finishing
kernel has one version per case: ActNorm alone (``_finish_diag_kernel``), programs over
input channels (forward, or no ActNorm: ``_finish_cols_kernel``) and over output channels
(reverse with ActNorm: ``_finish_rows_kernel``).

Tile sizes, num_warps and num_stages come from ``mix_config``, ``reduce_config`` and
``finish_config``; ``launch_configs`` lists every launch of the family for given shapes.

The LU-parameterised weight W and its log-det live in ``lu_weight.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import (TARGET_PROGRAMS, TARGET_SMS, Launch, compute_dtype, compute_type, fitted_block,
                      nchw, output_like, rounded_for, warps_for)

PRE_NONE = tl.constexpr(0)
PRE_ACTNORM = tl.constexpr(1)
PRE_DIVIDE = tl.constexpr(2)
POST_NONE = tl.constexpr(0)
POST_ACTNORM_INVERSE = tl.constexpr(1)
POST_MULTIPLY = tl.constexpr(2)
PRE_IDS = {None: PRE_NONE.value, "actnorm": PRE_ACTNORM.value, "divide": PRE_DIVIDE.value}
POST_IDS = {None: POST_NONE.value, "actnorm_inverse": POST_ACTNORM_INVERSE.value,
            "multiply": POST_MULTIPLY.value}
PRECISIONS = ("ieee", "tf32x3")  # tl.dot input precisions mix() offers; "ieee" by default


@triton.jit
def _mm(a, b, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """a (M, K) @ b (K, P) in the dtype of the operands (both already in COMPUTE).
    ``PRECISION`` has no default: triton 3.6 hands a jit helper's default to ``tl.dot`` as
    a plain str, which fails to compile ("'str' object has no attribute 'type'")."""
    if USE_DOT:
        r = tl.dot(a, b, input_precision=PRECISION)
    else:
        r = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return r


@triton.jit
def _load_pre(in_row, s_in_c, k64, k_in, p_in, pre_s_ptr, pre_b_ptr, in2_row, s_in2_c, C2,
              PRE: tl.constexpr, ADD_IN2: tl.constexpr, COMPUTE: tl.constexpr):
    """Input rows ``k64`` of one pixel tile with the prologue ``PRE`` applied; ``ADD_IN2``:
    plus the second input's rows ``k64 < C2`` (added in COMPUTE before the prologue)."""
    v = tl.load(in_row + k64[:, None] * s_in_c, mask=k_in[:, None] & p_in[None, :],
                other=0.0).to(COMPUTE)
    if ADD_IN2:
        v += tl.load(in2_row + k64[:, None] * s_in2_c, mask=(k64 < C2)[:, None] & p_in[None, :],
                     other=0.0).to(COMPUTE)
    if PRE == PRE_ACTNORM:
        sk = tl.load(pre_s_ptr + k64, mask=k_in, other=0.0).to(COMPUTE)
        bk = tl.load(pre_b_ptr + k64, mask=k_in, other=0.0).to(COMPUTE)
        v = (v + bk[:, None]) * sk[:, None]
    elif PRE == PRE_DIVIDE:
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
    in2_ptr,    # (N, C2, H, W) added to the input's first C2 channels (ADD_IN2)
    out2_ptr,   # (N, C2, H, W) a second copy of the output's first C2 channels (STORE_OUT2)
    C, CO, HW, N_TILES, N_PTILES, C2,
    s_in_n, s_in_c, s_in_p, s_a_o, s_a_k, s_out_n, s_out_c, s_out_p,
    s_in2_n, s_in2_c, s_in2_p, s_out2_n, s_out2_c, s_out2_p,
    PRE: tl.constexpr, POST: tl.constexpr, DIAG: tl.constexpr, USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr, COMPUTE: tl.constexpr, ADD_IN2: tl.constexpr,
    STORE_OUT2: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
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
    in2_row = in2_ptr + n * s_in2_n + p64[None, :] * s_in2_p
    if DIAG:
        k = o
        k_in = o_in
        k64 = o64
        acc = _load_pre(in_row, s_in_c, k64, k_in, p_in, pre_s_ptr, pre_b_ptr, in2_row,
                        s_in2_c, C2, PRE, ADD_IN2, COMPUTE)
    else:
        acc = tl.zeros((BLOCK_O, BLOCK_P), dtype=COMPUTE)
        for k0 in range(0, C, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_in = k < C
            k64 = k.to(tl.int64)
            a = tl.load(a_ptr + o64[:, None] * s_a_o + k64[None, :] * s_a_k,
                        mask=o_in[:, None] & k_in[None, :], other=0.0).to(COMPUTE)
            v = _load_pre(in_row, s_in_c, k64, k_in, p_in, pre_s_ptr, pre_b_ptr, in2_row,
                          s_in2_c, C2, PRE, ADD_IN2, COMPUTE)
            acc += _mm(a, v, USE_DOT, PRECISION)
    if POST == POST_ACTNORM_INVERSE:
        so = tl.load(post_s_ptr + o64, mask=o_in, other=1.0).to(COMPUTE)
        bo = tl.load(post_b_ptr + o64, mask=o_in, other=0.0).to(COMPUTE)
        acc = acc / so[:, None] - bo[:, None]
    elif POST == POST_MULTIPLY:
        so = tl.load(post_s_ptr + o64, mask=o_in, other=0.0).to(COMPUTE)
        acc = acc * so[:, None]
    tl.store(out_ptr + n * s_out_n + o64[:, None] * s_out_c + p64[None, :] * s_out_p,
             rounded_for(acc, out_ptr), mask=o_in[:, None] & p_in[None, :])
    if STORE_OUT2:  # the same values, from registers (no-op for tiles past C2: all masked)
        tl.store(out2_ptr + n * s_out2_n + o64[:, None] * s_out2_c + p64[None, :] * s_out2_p,
                 rounded_for(acc, out2_ptr), mask=(o < C2)[:, None] & p_in[None, :])


@triton.jit
def _reduce_kernel(
    g_ptr,      # (N, Co, H, W) gradient of the op's output, any strides (stride 0 too)
    in_ptr,     # (N, C, H, W) the op's input
    shift_ptr,  # (C,) added to the input before the product (SHIFT)
    gpart_ptr,  # (N_CHUNKS, Co, C) partial G, or (N_CHUNKS, C) partial diag(G) when DIAG
    spart_ptr,  # (N_CHUNKS, Co) partial gsum, starting SP_OFF elements after spart_ptr
    g2_ptr,     # (N, C2, H, W) added to the gradient's first C2 channels (ADD_G2), any strides
    C, CO, HW, NQ, N_OT, N_KT, N_GT, CHUNK, SP_OFF, C2,
    s_g_n, s_g_c, s_g_p, s_in_n, s_in_c, s_in_p, s_g2_n, s_g2_c, s_g2_p,
    SHIFT: tl.constexpr, DIAG: tl.constexpr, USE_DOT: tl.constexpr, COMPUTE: tl.constexpr,
    INDEX64: tl.constexpr, ADD_G2: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """One program: the partial G and gsum of one (BLOCK_O, BLOCK_K) tile over one chunk of
    CHUNK flat (sample, pixel) indices q. q is int32 unless ``INDEX64`` (N * H * W + CHUNK
    >= 2^31), so splitting q into (sample, pixel) is a 32-bit division, not a call to the
    64-bit division routine in the loop; the offsets built from it are int64."""
    pid = tl.program_id(0)
    chunk = pid // N_GT  # N_GT = N_OT * N_KT tiles of G per chunk
    rest = pid % N_GT
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
    sacc = tl.zeros((BLOCK_O,), dtype=COMPUTE)
    if INDEX64:
        q_start = chunk.to(tl.int64) * CHUNK
    else:
        q_start = chunk * CHUNK
    for q0 in range(0, CHUNK, BLOCK_Q):
        q = q_start + q0 + tl.arange(0, BLOCK_Q)  # flat (sample, pixel) index
        q_in = q < NQ
        n = (q // HW).to(tl.int64)
        p = (q % HW).to(tl.int64)
        g = tl.load(g_ptr + n[None, :] * s_g_n + o64[:, None] * s_g_c + p[None, :] * s_g_p,
                    mask=o_in[:, None] & q_in[None, :], other=0.0).to(COMPUTE)
        if ADD_G2:
            g += tl.load(g2_ptr + n[None, :] * s_g2_n + o64[:, None] * s_g2_c + p[None, :] * s_g2_p,
                         mask=(o < C2)[:, None] & q_in[None, :], other=0.0).to(COMPUTE)
        sacc += tl.sum(g, axis=1)
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
            gacc += _mm(g, v, USE_DOT, "ieee")  # the weight gradient: always exact
    if DIAG:
        tl.store(gpart_ptr + chunk.to(tl.int64) * C + k64, tl.sum(gacc, axis=1), mask=k_in)
    else:
        tl.store(gpart_ptr + chunk.to(tl.int64) * CO * C + o64[:, None] * C + k64[None, :],
                 gacc, mask=o_in[:, None] & k_in[None, :])
    if kt == 0:
        tl.store(spart_ptr + SP_OFF + chunk.to(tl.int64) * CO + o64, sacc, mask=o_in)


def mix(inp: torch.Tensor, a: torch.Tensor | None, *, transpose_a: bool = False,
        pre: str | None = None,
        pre_scale: torch.Tensor | None = None, pre_shift: torch.Tensor | None = None,
        post: str | None = None, post_scale: torch.Tensor | None = None,
        post_shift: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
        input_precision: str = "ieee", inp2: torch.Tensor | None = None,
        out2: torch.Tensor | None = None) -> torch.Tensor:
    """``out[:, o] = post(sum_k a[o, k] pre(inp[:, k]))`` per pixel (``a=None``: out = post(pre(inp))).

    ``inp`` (N, C, H, W) and ``a`` (Co, C) (read as ``a.T`` when ``transpose_a``) may have
    any strides; vectors are contiguous (C,) / (Co,). Validation is the caller's job.
    Optional: ``out`` where to write (pixels walkable as one axis, e.g. a channel slice);
    ``input_precision`` of the float32 ``tl.dot``: "ieee" (exact, the default) or "tf32x3"
    (tensor cores); ``inp2`` (N, C2 <= C, H, W), any strides: added to ``inp[:, :C2]`` as
    it is read (before ``pre``), the backward's second incoming gradient; ``out2`` (N,
    C2 <= Co, H, W), pixels walkable as one axis: also receives ``out[:, :C2]``, stored
    from the same registers (a second output of the same launch)."""
    n, c, hh, ww = inp.shape
    diag = a is None
    co = c if diag else a.shape[1 if transpose_a else 0]
    assert diag or a.shape[0 if transpose_a else 1] == c, (
        f"a: expected {'(C, Co)' if transpose_a else '(Co, C)'} with C = {c}, got {tuple(a.shape)}")
    assert not diag or (pre is not None or post is not None), "a=None: expected an ActNorm pre or post"
    assert input_precision in PRECISIONS, f"input_precision: expected one of {PRECISIONS}, got {input_precision!r}"
    for name, v, size in (("pre_scale", pre_scale, c), ("pre_shift", pre_shift, c),
                          ("post_scale", post_scale, co), ("post_shift", post_shift, co)):
        assert v is None or (v.is_contiguous() and v.numel() == size), (
            f"{name}: expected a contiguous vector of {size}, got {tuple(v.shape)}")
    hw = hh * ww
    if out is None:
        out = output_like(inp, out_dtype, (n, co, hh, ww))
    assert out.shape == (n, co, hh, ww), f"out: expected {(n, co, hh, ww)}, got {tuple(out.shape)}"
    for name, t, most in (("inp2", inp2, c), ("out2", out2, co)):
        assert t is None or (t.dim() == 4 and t.shape[0] == n and t.shape[1] <= most
                             and t.shape[2:] == (hh, ww)), (
            f"{name}: expected (N={n}, at most {most}, {hh}, {ww}), got {tuple(t.shape)}")
    if out.numel() == 0:
        return out
    cfg = mix_config(n, c, co, hw, inp.dtype, diag)
    inp, s_in = nchw(inp)
    out_w, s_out = nchw(out)
    assert out_w is out, "out: its pixels must be walkable as one axis (no copy of an output)"
    c2 = 0
    s_in2 = s_out2 = (0, 0, 0)
    if inp2 is not None:
        inp2, s_in2 = nchw(inp2)
        c2 = inp2.shape[1]
    if out2 is not None:
        out2_w, s_out2 = nchw(out2)
        assert out2_w is out2, "out2: its pixels must be walkable as one axis (no copy of an output)"
        c2 = out2.shape[1]
    assert inp2 is None or out2 is None, "inp2, out2: expected at most one of them"
    a_arg = inp if diag else a
    s_a = (0, 0) if diag else (a.stride(0), a.stride(1))
    if transpose_a:
        s_a = s_a[::-1]
    dummy = inp
    _mix_kernel[cfg.grid](
        inp, a_arg, pre_scale if pre_scale is not None else dummy,
        pre_shift if pre_shift is not None else dummy,
        post_scale if post_scale is not None else dummy,
        post_shift if post_shift is not None else dummy,
        out, dummy if inp2 is None else inp2, out if out2 is None else out2,
        c, co, hw, cfg.extra["N_TILES"], cfg.extra["N_PTILES"], c2, *s_in, *s_a, *s_out,
        *s_in2, *s_out2, PRE=PRE_IDS[pre], POST=POST_IDS[post], DIAG=diag,
        USE_DOT=inp.dtype != torch.float64, PRECISION=input_precision,
        COMPUTE=compute_type(inp.dtype), ADD_IN2=inp2 is not None, STORE_OUT2=out2 is not None,
        **cfg.meta)
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
def _finish_diag_kernel(
    ws_ptr,     # (N_CHUNKS * C + N_CHUNKS * C,) workspace: partial diag(G), then partial gsum
    s_ptr,      # (C,) ActNorm scale
    dl_ptr,     # (C,) d loc, contiguous
    ds_ptr,     # (C,) d scale, contiguous
    C, N_CHUNKS, SP_OFF,
    REVERSE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_CH: tl.constexpr,
):
    """ActNorm alone (G diagonal): forward ds = G, dl = s * gsum; reverse ds = -G / s^2,
    dl = -gsum. One program per BLOCK_V channels."""
    v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    v64 = v.to(tl.int64)
    v_in = v < C
    g = _csum_vec(ws_ptr, v64, v_in, N_CHUNKS, C, COMPUTE, BLOCK_CH, BLOCK_V)
    gs = _csum_vec(ws_ptr + SP_OFF, v64, v_in, N_CHUNKS, C, COMPUTE, BLOCK_CH, BLOCK_V)
    s = tl.load(s_ptr + v64, mask=v_in, other=1.0).to(COMPUTE)
    if REVERSE:
        tl.store(ds_ptr + v64, rounded_for(-g / (s * s), ds_ptr), mask=v_in)
        tl.store(dl_ptr + v64, rounded_for(-gs, dl_ptr), mask=v_in)
    else:
        tl.store(ds_ptr + v64, rounded_for(g, ds_ptr), mask=v_in)
        tl.store(dl_ptr + v64, rounded_for(s * gs, dl_ptr), mask=v_in)


@triton.jit
def _finish_rows_kernel(
    ws_ptr,     # (N_CHUNKS * Co * C + N_CHUNKS * Co,) workspace: partial G, then partial gsum
    a_ptr,      # (Co, C) the mixing matrix, any strides
    s_ptr,      # (Co,) ActNorm scale (reverse: the ActNorm follows the mix)
    dw_ptr,     # (Co, C) d weight, strides s_dw_o / s_dw_k
    dl_ptr,     # (Co,) d loc, contiguous
    ds_ptr,     # (Co,) d scale, contiguous
    C, CO, G_SIZE, N_CHUNKS, SP_OFF, s_a_o, s_a_k, s_dw_o, s_dw_k,
    COMPUTE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_CH: tl.constexpr,
):
    """Reverse with ActNorm, programs over BLOCK_V output channels o:
    dw = G / s[o], ds[o] = -sum_k A[o, k] G[o, k] / s[o]^2, dl[o] = -gsum[o]."""
    o = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    o64 = o.to(tl.int64)
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
                 rounded_for(g / s[:, None], dw_ptr), mask=m)
    gs = _csum_vec(ws_ptr + SP_OFF, o64, o_in, N_CHUNKS, CO, COMPUTE, BLOCK_CH, BLOCK_V)
    tl.store(ds_ptr + o64, rounded_for(-ds / (s * s), ds_ptr), mask=o_in)
    tl.store(dl_ptr + o64, rounded_for(-gs, dl_ptr), mask=o_in)


@triton.jit
def _finish_cols_kernel(
    ws_ptr,     # (N_CHUNKS * Co * C + N_CHUNKS * Co,) workspace: partial G, then partial gsum
    a_ptr,      # (Co, C) the mixing matrix, any strides (HAS_AN)
    s_ptr,      # (C,) ActNorm scale (HAS_AN: the ActNorm precedes the mix)
    dw_ptr,     # (Co, C) d weight, strides s_dw_o / s_dw_k
    dl_ptr,     # (C,) d loc, contiguous (HAS_AN)
    ds_ptr,     # (C,) d scale, contiguous (HAS_AN)
    C, CO, G_SIZE, N_CHUNKS, SP_OFF, s_a_o, s_a_k, s_dw_o, s_dw_k,
    HAS_AN: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_CH: tl.constexpr,
):
    """Forward, or no ActNorm, programs over BLOCK_V input channels k: dw = G * s[k]
    (G without ActNorm), ds[k] = sum_o A[o, k] G[o, k], dl[k] = s[k] sum_o gsum[o] A[o, k]."""
    k = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    k64 = k.to(tl.int64)
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
            gs = _csum_vec(ws_ptr + SP_OFF, o64, o_in, N_CHUNKS, CO, COMPUTE, BLOCK_CH, BLOCK_W)
            a = tl.load(a_ptr + o64[:, None] * s_a_o + k64[None, :] * s_a_k, mask=m,
                        other=0.0).to(COMPUTE)
            ds += tl.sum(a * g, axis=0)
            dl += tl.sum(a * gs[:, None], axis=0)
            g = g * s[None, :]
        tl.store(dw_ptr + o64[:, None] * s_dw_o + k64[None, :] * s_dw_k,
                 rounded_for(g, dw_ptr), mask=m)
    if HAS_AN:
        tl.store(ds_ptr + k64, rounded_for(ds, ds_ptr), mask=k_in)
        tl.store(dl_ptr + k64, rounded_for(s * dl, dl_ptr), mask=k_in)


# --------------------------------------------------------------------------------------
# Launch configurations: one helper per kernel, the reason beside each constant
# --------------------------------------------------------------------------------------


def mix_config(n: int, c: int, co: int, hw: int, dtype: torch.dtype, diag: bool) -> Launch:
    """The launch of ``_mix_kernel``: one program per (sample, BLOCK_O output channels,
    BLOCK_P pixels), a loop over BLOCK_K input channels. ``extra``: N_TILES, N_PTILES."""
    if diag:  # no product: out[c] = post(pre(in[c])), a plain elementwise tile
        block_o = block_k = min(triton.next_power_of_2(co), 64)
        block_p, min_p = 64, 1
        warps, stages = 4, 1  # at most 64 x 64 elements: 32 per thread; no loop
    elif dtype == torch.float64:  # broadcast multiply-and-sum: the (O, K, P) cube lives in registers
        block_o = min(max(triton.next_power_of_2(co), 16), 32)
        block_k, block_p, min_p = 8, 32, 16  # 32 x 8 x 32 doubles: 64 per thread at 4 warps
        warps, stages = 4, 1  # the cube, not the loads, bounds the registers
    else:  # tl.dot: every dimension >= 16; blocks fitted to C to pad the least
        block_o, block_k = fitted_block(co), fitted_block(c)
        block_p, min_p = 64, 16  # a 64 x 64 float32 accumulator: 32 registers per thread at 4 warps
        warps, stages = None, None
    block_p = min(block_p, max(triton.next_power_of_2(hw), min_p))
    programs = lambda bo, bp: n * triton.cdiv(co, bo) * triton.cdiv(hw, bp)  # noqa: E731
    # fill the device once when the work allows (TARGET_SMS programs, not the two per SM of
    # the elementwise families): every program re-reads its rows of W and every
    # output-channel tile the input tile, so each extra program costs bytes (at N=64, C=24
    # 8x8: 512 programs loaded 1,475 KB, 256 programs 1,032 KB). Narrower pixel tiles first
    # (the input tile is then re-read by fewer output-channel tiles), then narrower
    # output-channel tiles.
    while programs(block_o, block_p) < TARGET_SMS and block_p > max(min_p, 16):
        block_p //= 2
    min_o = 4 if diag else (block_o if dtype == torch.float64 else 16)  # tl.dot: >= 16
    while programs(block_o, block_p) < TARGET_SMS and block_o > min_o:
        block_o //= 2
    if diag:
        block_k = block_o
    if warps is None:
        # 16 accumulator elements per thread, 1 to 4 warps
        warps = warps_for(block_o * block_p, per_thread=16, lo=1, hi=4)
        # one trip through the K loop has nothing to pipeline; with more, 2 stages load the
        # next W and input tiles while this one multiplies (3 stages: more shared memory
        # for no gain at these K)
        stages = 1 if c <= block_k else 2
    n_ptiles = triton.cdiv(hw, block_p)
    n_tiles = triton.cdiv(co, block_o) * n_ptiles
    return Launch(grid=(n * n_tiles,), blocks={"BLOCK_O": block_o, "BLOCK_K": block_k,
                                               "BLOCK_P": block_p},
                  num_warps=warps, num_stages=stages,
                  extra={"N_TILES": n_tiles, "N_PTILES": n_ptiles})


def reduce_config(n: int, c: int, co: int, hw: int, dtype: torch.dtype, diag: bool) -> Launch:
    """The launch of ``_reduce_kernel``: one program per (chunk of flat pixels, BLOCK_O x
    BLOCK_K tile of G). ``extra``: N_OT, N_KT, CHUNK, N_CHUNKS, INDEX64."""
    nq = n * hw
    g_size = c if diag else co * c
    # chunks at most: the partials (written here, read back by the finishing launch) stay
    # within a quarter of the activations the reduction reads, so that filling the device
    # never costs more than 1.5x the floor's memory traffic
    max_chunks = max(1, nq * (c + co) // (4 * (g_size + co)))
    fill = lambda tiles, bq: tiles * min(max_chunks, triton.cdiv(nq, bq))  # noqa: E731
    if diag:
        block_o = min(triton.next_power_of_2(co), 32)
        block_q = 64  # (32, 64) product tile: 16 per thread at 4 warps
        # little work: shorter pixel steps (more chunks), then fewer channels per tile
        while fill(triton.cdiv(co, block_o), block_q) < TARGET_PROGRAMS and block_q > 16:
            block_q //= 2
        while fill(triton.cdiv(co, block_o), block_q) < TARGET_PROGRAMS and block_o > 4:
            block_o //= 2
        block_k = block_o
        warps = warps_for(block_o * block_q, per_thread=8, lo=1, hi=4)  # 8 products per thread
    elif dtype == torch.float64:  # broadcast product: the (O, Q, K) cube lives in registers
        block_o = min(max(triton.next_power_of_2(co), 16), 32)
        block_k = min(max(triton.next_power_of_2(c), 16), 32)
        block_q, warps = 8, 4  # 32 x 8 x 32 doubles: 64 per thread at 4 warps
    else:  # tl.dot: blocks fitted to C (>= 16); BLOCK_Q 64 is the dot's reduction axis
        block_o, block_k, block_q = fitted_block(co), fitted_block(c), 64
        # smaller G tiles when the chunks alone leave the device half empty (each operand
        # tile is then read by more programs: from L2, the activations stay 2-3 MB here)
        while (fill(triton.cdiv(co, block_o) * triton.cdiv(c, block_k), block_q) < TARGET_PROGRAMS
               and max(block_o, block_k) > 16):
            if block_o >= block_k:
                block_o //= 2
            else:
                block_k //= 2
        # 16 elements per thread of the largest tile (g, the input, the accumulator); at
        # least 4 warps: at 2, the 16 x 16 x 64 tile that also adds the network input's
        # gradient (ADD_G2) spilled 8 bytes under triton 3.6 (the GPU image's)
        warps = warps_for(max(block_o, block_k) * block_q, per_thread=16, lo=4, hi=8)
    n_ot = triton.cdiv(co, block_o)
    n_kt = 1 if diag else triton.cdiv(c, block_k)
    # chunks: enough programs to fill the device, within the bound above (a function of the
    # shapes only, so the partials, and the order they are added in, are reproducible),
    # each chunk a whole number of BLOCK_Q
    n_chunks = min(max_chunks, max(1, triton.cdiv(nq, block_q)),
                   max(1, triton.cdiv(TARGET_PROGRAMS, n_ot * n_kt)))
    chunk = max(block_q, triton.cdiv(triton.cdiv(max(nq, 1), n_chunks), block_q) * block_q)
    n_chunks = triton.cdiv(nq, chunk)
    # num_stages 1: pipelining the loop's loads spilled the 64 x 64 float32 tiles (5 KB of
    # stack at C >= 48, sm_90); one stage keeps them in registers
    return Launch(grid=(n_chunks * n_ot * n_kt,),
                  blocks={"BLOCK_O": block_o, "BLOCK_K": block_k, "BLOCK_Q": block_q},
                  num_warps=warps, num_stages=1,
                  extra={"N_OT": n_ot, "N_KT": n_kt, "CHUNK": chunk, "N_CHUNKS": n_chunks,
                         "INDEX64": nq + chunk >= 2**31})


def finish_config(c: int, co: int, n_chunks: int, diag: bool, by_row: bool) -> Launch:
    """The launch of the finishing kernel: one program per BLOCK_V channels (input channels,
    or output channels ``by_row``), adding the partials BLOCK_CH chunks at a time."""
    width = c if diag else (co if by_row else c)
    # (BLOCK_CH, BLOCK_W, BLOCK_V) <= 16^3 partials per load: 16 per thread at 8 warps;
    # narrow BLOCK_V so that wide matrices get several programs
    block_v = min(max(triton.next_power_of_2(width), 2), 16)
    block_w = min(max(triton.next_power_of_2(c if by_row else co), 2), 16)
    block_ch = min(max(triton.next_power_of_2(max(n_chunks, 1)), 2), 16)
    warps = warps_for(block_v * block_ch * (1 if diag else block_w), per_thread=16, lo=1, hi=8)
    # num_stages 2: the next BLOCK_CH chunks load while these are added
    return Launch(grid=(triton.cdiv(width, block_v),),
                  blocks={"BLOCK_V": block_v, "BLOCK_CH": block_ch} | ({} if diag else {"BLOCK_W": block_w}),
                  num_warps=warps, num_stages=2)


def launch_configs(n: int, c: int, hw: int, dtype: torch.dtype = torch.float32, *,
                   co: int | None = None, diag: bool = False, reverse: bool = False,
                   actnorm: bool = True) -> dict[str, Launch]:
    """Every launch of this family for an input (n, c, h, w), h * w = ``hw``: the mix (the
    forward; the backward's d-input mix is the same shape) and the backward's reduction and
    finishing launch: {kernel name: Launch}."""
    co = c if co is None else co
    red = reduce_config(n, c, co, hw, dtype, diag)
    fin = "_finish_diag_kernel" if diag else (
        "_finish_rows_kernel" if reverse and actnorm else "_finish_cols_kernel")
    return {"_mix_kernel": mix_config(n, c, co, hw, dtype, diag), "_reduce_kernel": red,
            fin: finish_config(c, co, red.extra["N_CHUNKS"], diag, reverse and actnorm)}


def mix_param_grads(grad: torch.Tensor, inp: torch.Tensor, a: torch.Tensor | None,
                    scale: torch.Tensor | None, shift: torch.Tensor | None, *, reverse: bool,
                    d_a: torch.Tensor | None, d_loc: torch.Tensor | None,
                    d_scale: torch.Tensor | None, grad2: torch.Tensor | None = None) -> None:
    """The parameter gradients of ``mix`` written into ``d_a``, ``d_loc``, ``d_scale``
    (allocated by the caller in the parameters' dtypes; d_a any strides, the vectors
    contiguous): one reduction launch (skipped when there are no pixels) and one finishing
    launch. ``a`` None is ActNorm alone, ``scale`` None the convolution alone; ``shift`` is
    loc for the forward map with ActNorm (None otherwise). ``grad2`` (N, C2 <= Co, H, W),
    any strides: added to ``grad[:, :C2]`` as the reduction reads it (a second incoming
    gradient). Deterministic: one partial per chunk of pixels, added in a fixed order by
    the finishing launch."""
    n, co, hh, ww = grad.shape
    c = inp.shape[1]
    hw = hh * ww
    diag = a is None
    has_an = scale is not None
    assert inp.shape[0] == n and inp.shape[2:] == grad.shape[2:], (
        f"inp: expected ({n}, C, {hh}, {ww}), got {tuple(inp.shape)}")
    assert diag or (tuple(a.shape[:2]) == (co, c) and a.numel() == co * c), (
        f"a: expected ({co}, {c}) (trailing 1s allowed), got {tuple(a.shape)}")
    assert not diag or (c == co and has_an and d_loc is not None and d_scale is not None), (
        "ActNorm alone: expected C == Co, a scale, d_loc and d_scale")
    assert diag or d_a is not None, "d_a: expected a tensor when a is given"
    assert grad2 is None or (grad2.dim() == 4 and grad2.shape[0] == n and grad2.shape[1] <= co
                             and grad2.shape[2:] == grad.shape[2:]), (
        f"grad2: expected (N={n}, at most {co}, {hh}, {ww}), got {tuple(grad2.shape)}")
    assert d_a is None or (tuple(d_a.shape[:2]) == (co, c) and d_a.numel() == co * c), (
        f"d_a: expected ({co}, {c}) (trailing 1s allowed), got {tuple(d_a.shape)}")
    for name, v in (("d_loc", d_loc), ("d_scale", d_scale), ("scale", scale), ("shift", shift)):
        assert v is None or (v.is_contiguous() and v.numel() == (co if reverse and has_an else c)), (
            f"{name}: expected a contiguous vector of {co if reverse and has_an else c}, got "
            f"{tuple(v.shape)} strides {v.stride()}")
    cdt = compute_dtype(inp.dtype)
    red = reduce_config(n, c, co, hw, inp.dtype, diag)
    n_chunks = red.extra["N_CHUNKS"] if n * hw > 0 else 0
    # G's size, an argument (int64 past 2^31) of the finishing kernels: CO * C computed in
    # a kernel is an int32 product of two int32 arguments
    g_size = c if diag else co * c
    sp_off = n_chunks * g_size
    ws = torch.empty(max(1, n_chunks * (g_size + co)), dtype=cdt, device=inp.device)
    if n_chunks > 0:
        grad, s_g = nchw(grad)
        inp, s_in = nchw(inp)
        g2, s_g2 = (grad, (0, 0, 0)) if grad2 is None else nchw(grad2)
        _reduce_kernel[red.grid](
            grad, inp, shift if shift is not None else inp, ws, ws, g2,
            c, co, hw, n * hw, red.extra["N_OT"], red.extra["N_KT"],
            red.extra["N_OT"] * red.extra["N_KT"], red.extra["CHUNK"], sp_off,
            0 if grad2 is None else grad2.shape[1], *s_g, *s_in, *s_g2, SHIFT=shift is not None,
            DIAG=diag, USE_DOT=inp.dtype != torch.float64, COMPUTE=compute_type(inp.dtype),
            INDEX64=red.extra["INDEX64"], ADD_G2=grad2 is not None, **red.meta)
    by_row = reverse and has_an
    fin = finish_config(c, co, n_chunks, diag, by_row)
    dummy = ws
    compute = compute_type(inp.dtype)
    if diag:
        _finish_diag_kernel[fin.grid](ws, scale, d_loc, d_scale, c, n_chunks, sp_off,
                                      REVERSE=bool(reverse), COMPUTE=compute, **fin.meta)
        return
    s_a = (a.stride(0), a.stride(1))
    s_dw = (d_a.stride(0), d_a.stride(1))
    if by_row:
        _finish_rows_kernel[fin.grid](ws, a, scale, d_a, d_loc, d_scale, c, co, g_size, n_chunks,
                                      sp_off, *s_a, *s_dw, COMPUTE=compute, **fin.meta)
    else:
        _finish_cols_kernel[fin.grid](
            ws, a, scale if has_an else dummy, d_a, dummy if d_loc is None else d_loc,
            dummy if d_scale is None else d_scale, c, co, g_size, n_chunks, sp_off, *s_a, *s_dw,
            HAS_AN=has_an, COMPUTE=compute, **fin.meta)
