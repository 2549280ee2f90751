"""Glow's LU-parameterised 1x1-convolution weight and its log-det, one launch per direction

    W = P (L + I) (U + diag(sign * exp(log_s)))       in float64, P as a row gather
    logdet[n] = LD_MULT * (sum(log_s) + sum(log|scale|))   (ActNorm's term folded in)

``lu_weight_forward`` writes W and the per-sample log-det in one launch (W in float64, or
rounded once into float32 when the activations compute in float32, so that the mix
kernel's programs read 4-byte weights with no cast between the two launches);
``lu_weight_backward`` gives d lower, d upper, d log_s and d scale in one launch. Tile
sizes and num_warps come from ``launch_config``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import Launch, rounded_for


# --------------------------------------------------------------------------------------
# LU-parameterised weight: W = P (L + I) (U + diag(sign * exp(log_s))) and the log-det
# --------------------------------------------------------------------------------------


@triton.jit
def _matrix_tile(pid, N_T, C, rows_ptr, s_rw, BLOCK: tl.constexpr):
    """Program ``pid``'s (BLOCK, BLOCK) tile of a (C, C) matrix: rows i and columns j (each
    with its in-range mask and int64 copy), and the permutation's source rows r = rows[i]."""
    i = (pid // N_T) * BLOCK + tl.arange(0, BLOCK)
    j = (pid % N_T) * BLOCK + tl.arange(0, BLOCK)
    i_in = i < C
    i64 = i.to(tl.int64)
    r = tl.load(rows_ptr + i64 * s_rw, mask=i_in, other=0).to(tl.int64)
    return i, i_in, i64, j, j < C, j.to(tl.int64), r


@triton.jit
def _layer_factors(b, lower_ptr, upper_ptr, logs_ptr, sign_ptr, rows_ptr, scale_ptr,
                   s_lb, s_ub, s_lsb, s_sgb, s_rwb, s_scb):
    """The factor pointers of layer ``b`` (int64) of a stack (strides 0: one layer)."""
    return (lower_ptr + b * s_lb, upper_ptr + b * s_ub, logs_ptr + b * s_lsb,
            sign_ptr + b * s_sgb, rows_ptr + b * s_rwb, scale_ptr + b * s_scb)


@triton.jit
def _lu_weight_kernel(
    lower_ptr,  # (C, C) L below the diagonal (entries on and above it are ignored)
    upper_ptr,  # (C, C) U above the diagonal (entries on and below it are ignored)
    logs_ptr,   # (C,) log|diag U|
    sign_ptr,   # (C,) sign of diag U
    rows_ptr,   # (C,) int64: row i of W is row rows[i] of (L + I)(U + D) (P as a gather)
    scale_ptr,  # (C,) ActNorm scale: sum(log|scale|) joins the log-det (HAS_SCALE)
    w_ptr,      # (C, C) output W, contiguous: float64, or float32 (rounded once on store)
    ld_ptr,     # (N,) output log-det per sample, contiguous
    C, N, LD_MULT, N_T,
    s_l0, s_l1, s_u0, s_u1, s_ls, s_sg, s_rw, s_sc,
    s_lb, s_ub, s_lsb, s_sgb, s_rwb, s_scb,  # strides between layers (program axis 1)
    HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """W[i, j] = sum_k Lf[rows[i], k] Uf[k, j] in float64 by a broadcast multiply-and-sum
    (no fp64 tl.dot), k only up to the tile's last column (Uf is upper triangular).
    Program 0 also writes ld[n] = LD_MULT * (sum(log_s) + sum(log|scale|)) for every n.
    Program axis 1 is the layer of a stack: each reads its own factors and writes its own
    (C, C) W and (N,) log-det (the outputs are contiguous (K, C, C) and (K, N))."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    lower_ptr, upper_ptr, logs_ptr, sign_ptr, rows_ptr, scale_ptr = _layer_factors(
        b, lower_ptr, upper_ptr, logs_ptr, sign_ptr, rows_ptr, scale_ptr,
        s_lb, s_ub, s_lsb, s_sgb, s_rwb, s_scb)
    w_ptr += b * C * C
    ld_ptr += b * N
    jt = pid % N_T
    i, i_in, i64, j, j_in, j64, r = _matrix_tile(pid, N_T, C, rows_ptr, s_rw, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float64)
    for k0 in range(0, (jt + 1) * BLOCK, BLOCK_R):  # Uf[k, j] = 0 for k > j; k >= C masked
        k = k0 + tl.arange(0, BLOCK_R)
        k_in = k < C
        k64 = k.to(tl.int64)
        # Lf[rows[i], k]: L strictly below the diagonal, 1 on it
        below = i_in[:, None] & k_in[None, :] & (k64[None, :] < r[:, None])
        lf = tl.load(lower_ptr + r[:, None] * s_l0 + k64[None, :] * s_l1, mask=below,
                     other=0.0).to(tl.float64)
        lf = tl.where(i_in[:, None] & (k64[None, :] == r[:, None]), 1.0, lf)
        # Uf[k, j]: U strictly above the diagonal, sign * exp(log_s) on it
        above = k_in[:, None] & j_in[None, :] & (j[None, :] > k[:, None])
        uf = tl.load(upper_ptr + k64[:, None] * s_u0 + j64[None, :] * s_u1, mask=above,
                     other=0.0).to(tl.float64)
        ls = tl.load(logs_ptr + k64 * s_ls, mask=k_in, other=0.0).to(tl.float64)
        sg = tl.load(sign_ptr + k64 * s_sg, mask=k_in, other=0.0).to(tl.float64)
        d = sg * tl.exp(ls)
        uf = tl.where(k_in[:, None] & (j[None, :] == k[:, None]), d[:, None], uf)
        acc += tl.sum(lf[:, :, None] * uf[None, :, :], axis=1)
    tl.store(w_ptr + i64[:, None] * C + j64[None, :], rounded_for(acc, w_ptr),
             mask=i_in[:, None] & j_in[None, :])
    if pid == 0:
        tot = tl.zeros((BLOCK_R,), dtype=tl.float64)
        for c0 in range(0, C, BLOCK_R):
            c = c0 + tl.arange(0, BLOCK_R)
            c_in = c < C
            c64 = c.to(tl.int64)
            tot += tl.load(logs_ptr + c64 * s_ls, mask=c_in, other=0.0).to(tl.float64)
            if HAS_SCALE:
                sc = tl.load(scale_ptr + c64 * s_sc, mask=c_in, other=1.0).to(tl.float64)
                tot += tl.log(tl.abs(sc))
        val = tl.sum(tot, axis=0) * LD_MULT
        for n0 in range(0, N, BLOCK_N):
            nn = n0 + tl.arange(0, BLOCK_N)
            tl.store(ld_ptr + nn.to(tl.int64), rounded_for(tl.zeros((BLOCK_N,), dtype=tl.float64) + val,
                                                                ld_ptr), mask=nn < N)


@triton.jit
def _lu_weight_bwd_kernel(
    dw_ptr,     # (C, C) gradient of W, any strides
    dld_ptr,    # (N,) gradient of the per-sample log-det, any stride (0 too)
    lower_ptr,  # (C, C) as in the forward
    upper_ptr,  # (C, C) as in the forward
    logs_ptr,   # (C,) as in the forward
    sign_ptr,   # (C,) as in the forward
    rows_ptr,   # (C,) int64, as in the forward
    scale_ptr,  # (C,) ActNorm scale (HAS_SCALE)
    dlow_ptr,   # (C, C) output d lower, contiguous
    dup_ptr,    # (C, C) output d upper, contiguous
    dlogs_ptr,  # (C,) output d log_s, contiguous
    dsc_ptr,    # (C,) output d scale, contiguous (HAS_SCALE)
    C, N, LD_MULT, N_T, N_T2,
    s_dw0, s_dw1, s_dld, s_l0, s_l1, s_u0, s_u1, s_ls, s_sg, s_rw, s_sc,
    s_dwb, s_dldb, s_lb, s_ub, s_lsb, s_sgb, s_rwb, s_scb,  # between layers (axis 1)
    HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """With dM = P^T dW (row rows[i] of dM is row i of dW), two kinds of programs:

    pid <  N_T^2: d lower[rows[i], k] = (dW Uf^T)[i, k] for k < rows[i] (0 elsewhere),
                  a permuted row store, so no two programs write the same element;
    pid >= N_T^2: D = Lf^T dM = sum_i Lf[rows[i], :]^T dW[i, :];  d upper = triu(D, 1);
                  the diagonal tiles also write d log_s = diag(D) sign exp(log_s) + t and
                  d scale = t / scale, t = LD_MULT * sum_n dld[n] (summed in a fixed order).
    Program axis 1 is the layer of a stack, as in the forward (outputs contiguous)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    dw_ptr += b * s_dwb
    dld_ptr += b * s_dldb
    lower_ptr, upper_ptr, logs_ptr, sign_ptr, rows_ptr, scale_ptr = _layer_factors(
        b, lower_ptr, upper_ptr, logs_ptr, sign_ptr, rows_ptr, scale_ptr,
        s_lb, s_ub, s_lsb, s_sgb, s_rwb, s_scb)
    dlow_ptr += b * C * C
    dup_ptr += b * C * C
    dlogs_ptr += b * C
    dsc_ptr += b * C
    half = N_T2  # N_T * N_T, from the launcher
    if pid < half:
        kt = pid % N_T
        i, i_in, i64, k, k_in, k64, r = _matrix_tile(pid, N_T, C, rows_ptr, s_rw, BLOCK)
        ls = tl.load(logs_ptr + k64 * s_ls, mask=k_in, other=0.0).to(tl.float64)
        sg = tl.load(sign_ptr + k64 * s_sg, mask=k_in, other=0.0).to(tl.float64)
        d = sg * tl.exp(ls)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float64)
        for j0 in range(kt * BLOCK, C, BLOCK_R):  # Uf[k, j] = 0 for j < k
            j = j0 + tl.arange(0, BLOCK_R)
            j_in = j < C
            j64 = j.to(tl.int64)
            g = tl.load(dw_ptr + i64[:, None] * s_dw0 + j64[None, :] * s_dw1,
                        mask=i_in[:, None] & j_in[None, :], other=0.0).to(tl.float64)
            # Uf^T as a (j, k) tile
            above = j_in[:, None] & k_in[None, :] & (j[:, None] > k[None, :])
            ut = tl.load(upper_ptr + k64[None, :] * s_u0 + j64[:, None] * s_u1, mask=above,
                         other=0.0).to(tl.float64)
            ut = tl.where(k_in[None, :] & (j[:, None] == k[None, :]), d[None, :], ut)
            acc += tl.sum(g[:, :, None] * ut[None, :, :], axis=1)
        acc = tl.where(k64[None, :] < r[:, None], acc, 0.0)
        tl.store(dlow_ptr + r[:, None] * C + k64[None, :], rounded_for(acc, dlow_ptr),
                 mask=i_in[:, None] & k_in[None, :])
    else:
        q = pid - half
        kt = q // N_T
        jt = q % N_T
        k = kt * BLOCK + tl.arange(0, BLOCK)
        j = jt * BLOCK + tl.arange(0, BLOCK)
        k_in = k < C
        j_in = j < C
        k64 = k.to(tl.int64)
        j64 = j.to(tl.int64)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float64)
        for i0 in range(0, C, BLOCK_R):
            i = i0 + tl.arange(0, BLOCK_R)
            i_in = i < C
            i64 = i.to(tl.int64)
            r = tl.load(rows_ptr + i64 * s_rw, mask=i_in, other=0).to(tl.int64)
            # Lf[rows[i], k] as a (k, i) tile
            below = k_in[:, None] & i_in[None, :] & (k64[:, None] < r[None, :])
            lt = tl.load(lower_ptr + r[None, :] * s_l0 + k64[:, None] * s_l1, mask=below,
                         other=0.0).to(tl.float64)
            lt = tl.where(i_in[None, :] & (k64[:, None] == r[None, :]), 1.0, lt)
            g = tl.load(dw_ptr + i64[:, None] * s_dw0 + j64[None, :] * s_dw1,
                        mask=i_in[:, None] & j_in[None, :], other=0.0).to(tl.float64)
            acc += tl.sum(lt[:, :, None] * g[None, :, :], axis=1)
        m = k_in[:, None] & j_in[None, :]
        tl.store(dup_ptr + k64[:, None] * C + j64[None, :],
                 rounded_for(tl.where(j[None, :] > k[:, None], acc, 0.0), dup_ptr), mask=m)
        if kt == jt:
            diag = tl.sum(tl.where(k[:, None] == j[None, :], acc, 0.0), axis=1)
            t = tl.zeros((BLOCK_N,), dtype=tl.float64)
            for n0 in range(0, N, BLOCK_N):
                nn = n0 + tl.arange(0, BLOCK_N)
                t += tl.load(dld_ptr + nn.to(tl.int64) * s_dld, mask=nn < N, other=0.0).to(tl.float64)
            t_sum = tl.sum(t, axis=0) * LD_MULT
            ls = tl.load(logs_ptr + k64 * s_ls, mask=k_in, other=0.0).to(tl.float64)
            sg = tl.load(sign_ptr + k64 * s_sg, mask=k_in, other=0.0).to(tl.float64)
            tl.store(dlogs_ptr + k64, rounded_for(diag * sg * tl.exp(ls) + t_sum, dlogs_ptr),
                     mask=k_in)
            if HAS_SCALE:
                sc = tl.load(scale_ptr + k64 * s_sc, mask=k_in, other=1.0).to(tl.float64)
                tl.store(dsc_ptr + k64, rounded_for(t_sum / sc, dsc_ptr), mask=k_in)


def launch_config(c: int, n: int, backward: bool = False, layers: int = 1) -> Launch:
    """The launch of ``_lu_weight_kernel`` (or of ``_lu_weight_bwd_kernel``) for a (C, C)
    weight and N samples: one program per (BLOCK, BLOCK) tile of W (twice as many in the
    backward: d lower, then d upper), times ``layers`` on axis 1 (a stack of K layers, as a
    Glow block's steps: one launch for all). ``extra``: N_T (tiles per side)."""
    # 16 x 16 tiles: the (BLOCK, BLOCK_R, BLOCK) float64 product cube is 2048 doubles,
    # 16 per thread at 4 warps (C <= 96 in Glow: at most 36 tiles; W is tiny next to the
    # activations, so filling the device does not matter here)
    block = min(max(triton.next_power_of_2(c), 2), 16)
    n_t = triton.cdiv(c, block)
    return Launch(grid=((2 if backward else 1) * n_t * n_t, layers),
                  # BLOCK_R 8: the reduction step of the cube; BLOCK_N: log-det values per store
                  blocks={"BLOCK": block, "BLOCK_R": 8,
                          "BLOCK_N": min(max(triton.next_power_of_2(max(n, 1)), 2), 128)},
                  # num_stages 1: the k loop is short (<= C / 8 steps) and register-bound;
                  # num_warps 8 in the backward: at 4, triton 3.6 (the GPU image's) spilled
                  # 8 bytes at C = 70 (72 registers; 80 and no spill at 8 warps)
                  num_warps=(8 if backward else 4) if block >= 16 else 1, num_stages=1,
                  extra={"N_T": n_t})


def launch_configs(c: int, n: int) -> dict[str, Launch]:
    """Every launch of this family for a (C, C) weight and N samples: {kernel name: Launch}."""
    return {"_lu_weight_kernel": launch_config(c, n),
            "_lu_weight_bwd_kernel": launch_config(c, n, backward=True)}


def _layers(log_s: torch.Tensor) -> tuple[int, int]:
    """(K, C): a (C,) log_s is one layer, a (K, C) one a stack of K."""
    return (1, log_s.shape[0]) if log_s.dim() == 1 else tuple(log_s.shape)


def _matrix_strides(name: str, t: torch.Tensor, k: int, c: int) -> tuple[int, int, int]:
    """(between layers, row, column) strides of a (C, C) or (K, C, C) matrix."""
    shape = (c, c) if t.dim() == 2 else (k, c, c)
    assert tuple(t.shape) == shape, f"{name}: expected {shape}, got {tuple(t.shape)}"
    return (0 if t.dim() == 2 else t.stride(0)), t.stride(-2), t.stride(-1)


def _vector(name: str, v: torch.Tensor, k: int, c: int) -> tuple[torch.Tensor, int, int]:
    """(tensor, stride between layers, stride between values) of a per-channel vector:
    (C,) any stride, (K, C) any strides, or any contiguous shape holding K*C values (a stack
    of (1, C, 1, 1) ActNorm scales, say)."""
    if v.dim() == 1 and k == 1:
        assert v.numel() == c, f"{name}: expected {c} values, got {tuple(v.shape)}"
        return v, 0, v.stride(0)
    if v.dim() == 2 and tuple(v.shape) == (k, c):
        return v, v.stride(0), v.stride(1)
    # any other shape (a (C, 1) column too) is read flat through the pointer: no view op
    assert v.is_contiguous() and v.numel() == k * c, (
        f"{name}: expected ({k}, {c}) or {k * c} contiguous values, got {tuple(v.shape)}")
    return v, (c if k > 1 else 0), 1


def _factor_args(lower, upper, log_s, sign_s, rows, scale, k: int, c: int):
    """Both kernels' factor arguments: (the tensors, their strides within a layer, their
    strides between layers), in the kernels' order; without a scale, log_s stands in for
    it (HAS_SCALE off: never read)."""
    s_lb, s_l0, s_l1 = _matrix_strides("lower", lower, k, c)
    s_ub, s_u0, s_u1 = _matrix_strides("upper", upper, k, c)
    log_s, s_lsb, s_ls = _vector("log_s", log_s, k, c)
    sign_s, s_sgb, s_sg = _vector("sign_s", sign_s, k, c)
    rows, s_rwb, s_rw = _vector("rows", rows, k, c)
    sc, s_scb, s_sc = (log_s, s_lsb, s_ls) if scale is None else _vector("scale", scale, k, c)
    return ((lower, upper, log_s, sign_s, rows, sc),
            (s_l0, s_l1, s_u0, s_u1, s_ls, s_sg, s_rw, s_sc),
            (s_lb, s_ub, s_lsb, s_sgb, s_rwb, s_scb))


def lu_weight_forward(lower, upper, log_s, sign_s, rows, scale, w, ld, *, ld_mult: int) -> None:
    """W = P (L + I)(U + diag(sign_s exp(log_s))) into ``w`` (C, C) contiguous, and
    ``ld[:] = ld_mult * (sum(log_s) + sum(log|scale|))`` (scale None: no ActNorm term);
    P is applied as ``W[i] = M[rows[i]]``. Vectors (C,) with any stride (or contiguous of
    any shape, e.g. (1, C, 1, 1)), matrices any strides; one launch. W is computed in
    float64 whatever ``w``'s dtype (float64, or float32: rounded once on store).
    A stack of K layers (log_s (K, C), lower / upper (K, C, C), sign_s / rows / scale
    K*C values) fills ``w`` (K, C, C) and ``ld`` (K, N), still one launch.
    Validation is the caller's job."""
    k, c = _layers(log_s)
    want_w = (c, c) if log_s.dim() == 1 else (k, c, c)
    assert tuple(w.shape) == want_w and w.is_contiguous(), (
        f"w: expected a contiguous {want_w}, got {tuple(w.shape)}")
    assert w.dtype in (torch.float64, torch.float32), f"w: expected float64 or float32, got {w.dtype}"
    want_ld = 1 if log_s.dim() == 1 else 2
    assert ld.dim() == want_ld and ld.is_contiguous() and (want_ld == 1 or ld.shape[0] == k), (
        f"ld: expected a contiguous {'(N,)' if want_ld == 1 else f'({k}, N)'}, got {tuple(ld.shape)}")
    factors, strides, layer_strides = _factor_args(lower, upper, log_s, sign_s, rows, scale, k, c)
    n = ld.shape[-1]
    cfg = launch_config(c, n, layers=k)
    _lu_weight_kernel[cfg.grid](
        *factors, w, ld, c, n, ld_mult, cfg.extra["N_T"], *strides, *layer_strides,
        HAS_SCALE=scale is not None, **cfg.meta)


def lu_weight_backward(d_w, d_ld, lower, upper, log_s, sign_s, rows, scale,
                       d_lower, d_upper, d_log_s, d_scale, *, ld_mult: int) -> None:
    """Gradients of ``lu_weight`` written into ``d_lower``, ``d_upper`` (C, C) and
    ``d_log_s``, ``d_scale`` (C,), all contiguous, in one launch (a stack of K layers as
    in ``lu_weight_forward``: (K, C, C), K*C values, ``d_w`` (K, C, C), ``d_ld`` (K, N))."""
    k, c = _layers(log_s)
    s_dwb, s_dw0, s_dw1 = _matrix_strides("d_w", d_w, k, c)
    for name, t in (("d_lower", d_lower), ("d_upper", d_upper)):
        _matrix_strides(name, t, k, c)
        assert t.is_contiguous(), f"{name}: expected contiguous, got strides {t.stride()}"
    for name, t in (("d_log_s", d_log_s), ("d_scale", d_scale)):
        assert t is None or (t.is_contiguous() and t.numel() == k * c), (
            f"{name}: expected {k * c} contiguous values, got {tuple(t.shape)}")
    assert d_ld.dim() == log_s.dim(), f"d_ld: expected one row per layer, got {tuple(d_ld.shape)}"
    n = d_ld.shape[-1]
    s_dld = d_ld.stride(-1) if n > 0 else 0
    s_dldb = d_ld.stride(0) if d_ld.dim() == 2 else 0
    factors, strides, layer_strides = _factor_args(lower, upper, log_s, sign_s, rows, scale, k, c)
    has_scale = scale is not None
    cfg = launch_config(c, n, backward=True, layers=k)
    _lu_weight_bwd_kernel[cfg.grid](
        d_w, d_ld, *factors, d_lower, d_upper, d_log_s, d_scale if has_scale else d_log_s,
        c, n, ld_mult, cfg.extra["N_T"], cfg.extra["N_T"] ** 2, s_dw0, s_dw1, s_dld, *strides,
        s_dwb, s_dldb, *layer_strides, HAS_SCALE=has_scale, **cfg.meta)
