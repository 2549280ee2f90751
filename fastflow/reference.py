"""Plain PyTorch definitions of every fastflow op: the spec, the CPU path and the test oracle.

Each function computes in float32 (float64 for float64 inputs) when ``upcast=True`` and
returns outputs in the input dtype, log-determinants in the compute dtype, as ordinary
(N,) tensors. Tests call them with float64 inputs to get the ground truth. Layout is NCHW
throughout; outputs keep the input's memory format (channels_last stays channels_last).

This is also the path fastflow runs on CPU tensors: plain autograd, written to do no more
work than the eager PyTorch a user would write (no dtype round trips when the input is
already in the compute dtype, the ActNorm folded into the 1x1 convolution's matrix, no
``cat`` when no gradient is recorded, log|det| from LU factors rather than ``slogdet``).
Nothing here imports anything else from fastflow but ``compute_dtype`` from the kernels'
Triton-free ``_dtypes`` module (floor 0, shared so the two paths cannot disagree).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .kernels._dtypes import compute_dtype  # the one definition, shared with the kernels


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without an op when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def _shaped(t: torch.Tensor, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    """``t`` in ``dtype`` and ``shape``, without an op (or an autograd node) for what it
    already is."""
    t = _as(t, dtype)
    return t if tuple(t.shape) == shape else t.reshape(shape)


def _channels_last(t: torch.Tensor) -> bool:
    """A 4-D channels_last (and not NCHW-contiguous) tensor; never one inside
    ``torch.func.vmap``, which refuses the query for a per-sample view that is not
    contiguous (``in_dims=1``) and keeps its layout itself."""
    return (not t.is_contiguous() and t.dim() == 4 and not torch._C._functorch.is_batchedtensor(t)
            and t.is_contiguous(memory_format=torch.channels_last))


# Whether any autocast is on, asked without reading a tensor (torch >= 2.4 has it)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def autocast_on(t: torch.Tensor) -> bool:
    """Whether ``torch.autocast`` is on for ``t``'s device type. Most calls have none on:
    said without reading ``t`` (in a small CPU op's forward+backward each tensor attribute
    read costs about 0.2 us; its device about 0.4)."""
    return _any_autocast() and torch.is_autocast_enabled(t.device.type)


def _outside_autocast(op, tensors, dim):
    """``op(tensors, dim)`` (``torch.cat`` or ``torch.stack``) with autocast off, for when it
    is on: autocast's "promote" policy for cat and stack refuses a 16-bit tensor of the
    other kind than its own dtype (float16 under CPU bfloat16 autocast, bfloat16 under CUDA
    float16 autocast: "Unexpected floating ScalarType in at::autocast::prioritize"), and flow
    tensors never follow autocast anyway. Mixed dtypes promote as without autocast."""
    with torch.autocast(tensors[0].device.type, enabled=False):
        return op(tensors, dim)


def flow_cat(tensors, dim: int = 0) -> torch.Tensor:
    """``torch.cat`` of flow tensors, whatever autocast is on (see ``_outside_autocast``)."""
    if autocast_on(tensors[0]):
        return _outside_autocast(torch.cat, tensors, dim)
    return torch.cat(tensors, dim)


def flow_stack(tensors, dim: int = 0) -> torch.Tensor:
    """``torch.stack`` of flow tensors, whatever autocast is on (see ``_outside_autocast``)."""
    if autocast_on(tensors[0]):
        return _outside_autocast(torch.stack, tensors, dim)
    return torch.stack(tensors, dim)


def flow_halves(x: torch.Tensor):
    """``x.chunk(2, 1)``: (C - C//2, C//2) channels. Under autocast, two narrowed views
    instead: chunk's backward is a ``cat``, which autocast refuses for a 16-bit gradient of
    the other kind than its own dtype when backward runs inside the autocast block (see
    ``_outside_autocast``); a narrow's backward is no cat."""
    if autocast_on(x):
        ca = x.shape[1] - x.shape[1] // 2
        return x.narrow(1, 0, ca), x.narrow(1, ca, x.shape[1] - ca)
    return x.chunk(2, 1)


def _with_halves(x: torch.Tensor, xa: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """``cat([xa, yb], 1)`` in x's dtype and memory format (one ``cat``: on CPU it beats
    writing both halves into a preallocated output), whatever autocast is on."""
    y = flow_cat([xa, _as(yb, x.dtype)], 1)
    if _channels_last(x) and not y.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous(memory_format=torch.channels_last)
    return y


# --------------------------------------------------------------------------------------
# Affine / additive coupling
# --------------------------------------------------------------------------------------

SCALES = ("sigmoid", "exp", "atan")
LAYOUTS = ("halves", "interleaved")
# "before":  yb = (xb + t) * s   (Glow, rosinality/glow-pytorch)
# "after":   yb = xb * s + t     (RealNVP, FrEIA, nflows)
# "negated": yb = (xb - t) * s   (normflows' AffineCoupling in its density direction)
SHIFTS = ("before", "after", "negated")
ATAN_FACTOR = 0.636  # FrEIA's soft clamp: log s = clamp * 0.636 * atan(raw / clamp)


def split_channels(c: int) -> tuple[int, int]:
    """(Ca, Cb): pass-through and transformed channel counts, as ``torch.chunk(2, 1)``."""
    cb = c // 2
    return c - cb, cb


def coupling_params(h: torch.Tensor, layout: str):
    """(raw, t) from the coupling network's output ``h`` (N, 2*Cb, H, W)."""
    if layout == "halves":
        return h.chunk(2, 1)  # one node in autograd's graph, not two slices
    return h[:, 1::2], h[:, 0::2]


def coupling_log_scale(raw: torch.Tensor, scale: str, clamp: float, log: bool = True):
    """(log s, s) for the scale parameterisations of DESIGN.md. ``log=False``: the
    sigmoid's log s, ``torch.log(s)``, is not computed (None), for a caller that takes it
    later or not at all.

    The sigmoid's is ``log(sigmoid(raw + 2))``, as eager Glow code writes it: on CPU
    ``F.logsigmoid`` (and softplus) are not vectorised, 4x the time of sigmoid + log. In
    the compute dtype this is exact but where s rounds to 1 (raw + 2 > 17 in float32: an
    absolute error below 6e-8 per element) or underflows to 0 (raw + 2 below about -88.7 in
    float32, where CPU's torch.sigmoid flushes to 0; -103 at the most), where s = 0 makes the
    map singular, log s is -inf and the gradient of raw NaN (the kernels report the finite
    limit ``raw + 2`` there and d/d raw = 1, but their y loses xb just the same). The
    inverse's log(1/s) is +inf there likewise (``exp(-(raw + 2))`` overflows)."""
    if scale == "sigmoid":
        s = torch.sigmoid(raw + 2.0)
        return (torch.log(s) if log else None), s
    log_s = raw if scale == "exp" else (clamp * ATAN_FACTOR) * torch.atan(raw / clamp)
    return log_s, torch.exp(log_s)


def coupling_inverse_scale(raw: torch.Tensor, scale: str, clamp: float, log: bool = True):
    """(log(1/s), 1/s) for the inverse map. The sigmoid's 1/s is ``1 + exp(-(raw + 2))``
    (no log-sigmoid, no division); the others are ``exp(-log s)``: times 1/s rather than
    divided by s, so the gradient has no s**2 to underflow. ``log=False``: the sigmoid's
    log(1/s), ``torch.log(1/s)``, is not computed (None), as ``coupling_log_scale``'s."""
    if scale == "sigmoid":
        inv_s = torch.exp(-2.0 - raw) + 1.0
        return (torch.log(inv_s) if log else None), inv_s
    log_s = coupling_log_scale(raw, scale, clamp)[0]
    return -log_s, torch.exp(-log_s)


def affine_coupling(x, h, *, scale="sigmoid", layout="halves", shift="before", clamp=2.0,
                    reverse=False, upcast=True, logdet=True):
    """Affine coupling: returns (y, logdet); ``reverse=True`` maps y back to x.
    ``logdet=False`` (sampling) computes no log-det and returns (y, None).

    The sigmoid's log-scale is taken after y: the same ops, but on CPU, forward+backward
    (``backward()``) at N=64 C=12 16x16 took 3-7 % longer with the log before y's product
    and ``cat``."""
    ld_dtype = compute_dtype(x.dtype)
    cd = ld_dtype if upcast else x.dtype
    xa, xb = flow_halves(x)  # (C - C//2, C//2) channels, as ``split_channels``
    xb = _as(xb, cd)
    raw, t = coupling_params(_as(h, cd), layout)
    if not reverse:
        log_s, s = coupling_log_scale(raw, scale, clamp, log=False)
        if shift == "before":
            yb = (xb + t) * s
        elif shift == "negated":
            yb = (xb - t) * s
        else:
            yb = torch.addcmul(t, xb, s)
    else:  # the inverse map's log-scale and scale: log(1/s) and 1/s
        log_s, s = coupling_inverse_scale(raw, scale, clamp, log=False)
        if shift == "before":
            yb = xb * s - t
        elif shift == "negated":
            yb = torch.addcmul(t, xb, s)
        else:
            yb = (xb - t) * s
    y = _with_halves(x, xa, yb)
    if not logdet:
        return y, None
    if log_s is None:  # the sigmoid's, taken now
        log_s = torch.log(s)
    return y, _as(log_s.sum(dim=(1, 2, 3)), ld_dtype)


def additive_coupling(x, h, *, reverse=False, upcast=True, logdet=True):
    """Additive coupling: yb = xb + h (h has Cb channels); the log-det is zero (None for
    ``logdet=False``)."""
    ld_dtype = compute_dtype(x.dtype)
    cd = ld_dtype if upcast else x.dtype
    xa, xb = flow_halves(x)
    xb, hf = _as(xb, cd), _as(h, cd)
    yb = xb - hf if reverse else xb + hf
    return (_with_halves(x, xa, yb),
            x.new_zeros(x.shape[0], dtype=ld_dtype) if logdet else None)


# --------------------------------------------------------------------------------------
# ActNorm and the invertible 1x1 convolution (channel mixing)
# --------------------------------------------------------------------------------------


def actnorm_logdet(scale, n: int, hw: int, dtype, *, extra=None, reverse=False):
    """The per-sample log-det (n,) of ActNorm (and of a 1x1 convolution applied with it):
    ``+-H*W * (sum(log|scale|) + extra)`` in ``dtype``, an ordinary tensor (not a view of
    one value); ``extra`` is log|det W| (0-d) or None. The one place it is written."""
    per_pixel = torch.log(torch.abs(_as(scale, dtype))).sum()
    if extra is not None:
        per_pixel = per_pixel + _as(extra, dtype).reshape(())
    return per_sample(per_pixel, n, -hw if reverse else hw)


def per_sample(value, n: int, mult) -> torch.Tensor:
    """``mult * value`` (0-d) as an ordinary (n,) tensor: one in-place add on fresh zeros,
    one cheap autograd node (``repeat`` costs twice as much on CPU, forward and backward).
    A (K,) value (one per layer of a stack) gives (K, n)."""
    if value.dim() == 0:
        return value.new_zeros(n).add_(value, alpha=mult)
    return value.new_zeros((*value.shape, n)).add_(value.unsqueeze(-1), alpha=mult)


def actnorm(x, loc, scale, *, reverse=False, upcast=True):
    """ActNorm: y = scale * (x + loc) per channel; loc, scale shaped (1, C, 1, 1) or (C,).

    Returns (y, logdet) with logdet = H*W*sum(log|scale|) (negated for ``reverse``)."""
    y = actnorm_mix(x, None, loc, scale, reverse=reverse, upcast=upcast)
    return y, actnorm_logdet(scale, x.shape[0], x.shape[2] * x.shape[3],
                             compute_dtype(x.dtype), reverse=reverse)


def _mix(v, w, bias=None, beta=1):
    """out[:, o] = sum_c w[o, c] v[:, c] (+ beta * bias[o]) per pixel, as one matrix product
    in v's memory format (no copy of a contiguous or channels_last v), in v's dtype even
    under ``torch.autocast`` (flow-layer math never follows autocast)."""
    if autocast_on(v) and v.dtype != torch.float64 and torch.is_grad_enabled():
        # in float64, rounded back once: the product's backward runs under the autocast of
        # backward's caller (a backward inside the block would take its bmm / addmm to 16
        # bits), and autocast leaves float64 alone (twice the CPU time of float32, paid
        # only where a graph may be recorded)
        d = torch.float64
        with torch.autocast(v.device.type, enabled=False):
            out = _mix(_as(v, d), _as(w, d), None if bias is None else _as(bias, d), beta)
        return _as(out, v.dtype)
    if autocast_on(v):
        with torch.autocast(v.device.type, enabled=False):
            return _mix(v, w, bias, beta)
    n, c, height, width = v.shape
    co = w.shape[0]
    if _channels_last(v):  # NHWC in memory: a product with W^T on the last dimension
        rows = v.permute(0, 2, 3, 1)
        out = torch.matmul(rows, w.t()) if bias is None else torch.addmm(
            bias.reshape(co), rows.reshape(-1, c), w.t(), beta=beta).view(n, height, width, co)
        return out.permute(0, 3, 1, 2)
    flat = v.reshape(n, c, height * width)
    # a batched product with W broadcast (a view): unlike matmul(W, flat), which folds the
    # batch by transposing, it copies neither the input nor the output
    if bias is None:
        out = torch.bmm(w.expand(n, co, c), flat)
    else:
        out = torch.baddbmm(_shaped(bias, bias.dtype, (1, co, 1)), w.expand(n, co, c), flat,
                            beta=beta)
    return out.view(n, co, height, width)


def channel_mix(x, weight, bias=None, *, upcast=True):
    """y[n, :, i, j] = weight @ x[n, :, i, j] + bias: a 1x1 convolution (weight (Co, C))."""
    cd = compute_dtype(x.dtype) if upcast else x.dtype
    w = _as(weight, cd).reshape(weight.shape[0], weight.shape[1])
    return _as(_mix(_as(x, cd), w, None if bias is None else _as(bias, cd)), x.dtype)


def lu_factors(lower, upper, log_s, sign_s, eye=None):
    """(L + I, U + diag(sign_s * exp(log_s))) from the strictly triangular parts (stacks of
    them alike: (..., C, C) and (..., C))."""
    c = log_s.shape[-1]
    if eye is None:
        eye = torch.eye(c, dtype=lower.dtype, device=lower.device)
    l_full = torch.tril(lower, -1) + eye
    u_full = torch.triu(upper, 1) + torch.diag_embed(sign_s * torch.exp(log_s))
    return l_full, u_full


def lu_weight(perm, lower, upper, log_s, sign_s):
    """W = P @ (L + I) @ (U + diag(sign_s * exp(log_s)))."""
    l_full, u_full = lu_factors(lower, upper, log_s, sign_s)
    return perm @ l_full @ u_full


def lu_inverse_weight(perm, lower, upper, log_s, sign_s):
    """W^-1 = U^-1 L^-1 P^T from triangular solves (no general inverse)."""
    return lu_inverse_from_rows(perm.argmax(dim=1), lower, upper, log_s, sign_s)


def lu_inverse_from_rows(rows, lower, upper, log_s, sign_s):
    """W^-1 = U^-1 L^-1 P^T for the permutation whose row gather is ``rows``
    (``W[i] = ((L + I)(U + D))[rows[i]]``), in the dtype of ``lower`` (pass float64): two
    triangular solves against P^T. The solvers read only the triangles they need (the unit
    diagonal of L is implied), so neither L + I nor the strictly triangular parts are formed.
    Batched alike: ``rows``, ``log_s``, ``sign_s`` (..., C) and ``lower``, ``upper``
    (..., C, C) give (..., C, C), one solve per matrix (Glow's blocks assemble all their
    steps' inverses at once)."""
    d = lower.dtype
    index = rows if rows.dtype == torch.int64 else rows.long()
    # P^T: column j is e_rows[j]
    p_t = torch.zeros(lower.shape, dtype=d, device=lower.device).scatter_(
        -2, index.unsqueeze(-2), 1.0)
    # sign_s (+-1, any float dtype) meets exp(log_s) in a product that promotes exactly
    u_full = torch.diagonal_scatter(upper, _as(sign_s * torch.exp(_as(log_s, d)), d),
                                    dim1=-2, dim2=-1)
    x = torch.linalg.solve_triangular(lower, p_t, upper=False, unitriangular=True)
    return torch.linalg.solve_triangular(u_full, x, upper=True)


def lu_weight_logdet(rows, lower, upper, log_s, sign_s, scale=None, *, n=1, ld_mult=1,
                     ld_dtype=torch.float64, w_dtype=None):
    """The fused LU op's spec: (W, logdet) with W = ``lu_weight`` in float64 for the
    permutation whose row gather is ``rows`` (W[i] = ((L + I)(U + D))[rows[i]]), rounded
    once to ``w_dtype`` when given, and logdet (n,) = ld_mult * (sum(log_s) +
    sum(log|scale|)) (no scale term for None), in ``ld_dtype`` (computed in float32 for a
    16-bit one, float64 for float64). A stack of K layers (rows, log_s, sign_s (K, C);
    lower, upper (K, C, C); scale K*C values) gives W (K, C, C) and logdet (K, n)."""
    d = torch.float64
    stacked = log_s.dim() == 2
    eye = torch.eye(log_s.shape[-1], dtype=d, device=log_s.device)
    # float32 lower / upper / sign_s meet the float64 identity and exp(log_s) in adds and
    # products that promote exactly: no separate conversions
    l_full, u_full = lu_factors(lower, upper, _as(log_s, d), sign_s, eye)
    index = rows if rows.dtype == torch.int64 else rows.long()
    m = l_full @ u_full
    w = m.gather(-2, index.unsqueeze(-1).expand(m.shape)) if stacked else m.index_select(0, index)
    if w_dtype is not None:
        w = _as(w, w_dtype)
    cd = compute_dtype(ld_dtype)  # a 16-bit ld_dtype: summed in float32, rounded once
    ld = _as(log_s, cd).sum(-1) if stacked else _as(log_s, cd).sum()  # (a 0-d sum's
    # backward is one expand; a dim sum's an unsqueeze as well)
    if scale is not None:
        log_sc = torch.log(torch.abs(_as(scale, cd)))
        ld = ld + (log_sc.reshape(log_s.shape).sum(-1) if stacked else log_sc.sum())
    return w, _as(per_sample(ld, n, ld_mult), ld_dtype)


def lu_factor_logdet(weight):
    """(log|det W|, W^-1) of a square matrix from one LU factorisation (``lu_factor_ex``:
    no host synchronisation, unlike ``slogdet``'s error check), in weight's dtype."""
    lu, piv, _ = torch.linalg.lu_factor_ex(weight)
    logdet = torch.log(torch.abs(torch.diagonal(lu))).sum()
    return logdet, (lu, piv)


def lu_factor_inverse(factors):
    lu, piv = factors
    eye = torch.eye(lu.shape[0], dtype=lu.dtype, device=lu.device)
    return torch.linalg.lu_solve(lu, piv, eye)


def invconv(x, weight, *, reverse=False, upcast=True):
    """Plain invertible 1x1 convolution: (y, logdet) with logdet = H*W*log|det W|."""
    cd = compute_dtype(x.dtype) if upcast else x.dtype
    w = _as(weight, cd).reshape(weight.shape[0], weight.shape[1])
    logdet, factors = lu_factor_logdet(w)
    if reverse:
        w = lu_factor_inverse(factors)
    y = channel_mix(x, w, upcast=upcast)
    hw = x.shape[2] * x.shape[3]
    return y, per_sample(logdet, x.shape[0], -hw if reverse else hw)


def actnorm_mix(x, weight=None, loc=None, scale=None, *, reverse=False, upcast=True):
    """ActNorm then a 1x1 convolution, one rounding at the end (the fused op's spec):

    forward ``y = weight @ (scale * (x + loc))``; ``reverse``: ``x = (weight @ y) / scale - loc``
    where ``weight`` is then the inverse matrix. ``weight`` (Co, C) or (Co, C, 1, 1), or None
    (ActNorm alone); ``loc``/``scale`` hold one value per channel, or are both None.

    Computed as ``(weight * scale) @ (x + loc)`` going forward and
    ``(weight / scale[:, None]) @ y - loc`` in reverse: ActNorm's scale is folded into the
    (Co, C) matrix, so the activation is read once by the product (and once by the add)."""
    cd = compute_dtype(x.dtype) if upcast else x.dtype
    v = _as(x, cd)
    c = x.shape[1]
    w = None if weight is None else _shaped(weight, cd, (weight.shape[0], weight.shape[1]))
    if loc is None:
        return _as(_mix(v, w), x.dtype)
    co = c if (w is None or not reverse) else w.shape[0]  # the channels ActNorm acts on
    per_channel = (1, co, 1, 1)
    if w is None:
        if reverse:
            out = torch.addcmul(-_shaped(loc, cd, per_channel), v,
                                _shaped(scale, cd, per_channel).reciprocal())
        else:
            out = (v + _shaped(loc, cd, per_channel)) * _shaped(scale, cd, per_channel)
    elif reverse:
        out = _mix(v, w / _shaped(scale, cd, (co, 1)), _shaped(loc, cd, (1, co, 1)), beta=-1)
    else:
        out = _mix(v + _shaped(loc, cd, per_channel), w * _shaped(scale, cd, (1, c)))
    return _as(out, x.dtype)


def actnorm_init(x, eps=1e-6):
    """ActNorm's data-dependent initialisation: (loc, scale) = (-mean, 1 / (std + eps)) per
    channel over (N, H, W), std unbiased (rosinality/glow-pytorch), in the compute dtype."""
    v = _as(x.detach(), compute_dtype(x.dtype)).transpose(0, 1).reshape(x.shape[1], -1)
    mean = v.mean(dim=1)
    std = v.std(dim=1, correction=1 if v.shape[1] > 1 else 0)
    return -mean, 1.0 / (std + eps)


# --------------------------------------------------------------------------------------
# Gaussian reparameterisation + KL to the standard normal
# --------------------------------------------------------------------------------------

REDUCTIONS = ("none", "sum", "mean")


def standard_normal(like, generator=None, dtype=None):
    """Standard normal noise of ``like``'s shape in ``dtype`` (default: the compute dtype),
    drawn from ``generator`` (default: the default generator of like's device)."""
    dtype = dtype or compute_dtype(like.dtype)
    if generator is None:
        if like.dtype == dtype and like.is_contiguous():  # the same draws, without the
            return torch.randn_like(like)  # keyword arguments' parsing (0.3 us)
        return torch.randn_like(like, dtype=dtype, memory_format=torch.contiguous_format)
    where = generator.device
    eps = torch.randn(like.shape, generator=generator, device=where, dtype=dtype)
    return eps if eps.device == like.device else eps.to(like.device)


def reparameterize_kl(mu, logvar, eps=None, *, reduction="none", generator=None, upcast=True):
    """z = mu + exp(logvar / 2) * eps, kl = 0.5 * sum(exp(logvar) + mu^2 - 1 - logvar).

    The KL is summed over all but the first dimension; ``reduction`` "none" gives (N,),
    "sum" and "mean" (over the batch) a scalar. ``eps=None`` draws torch's normal noise.

    Written for the CPU path's speed with eager PyTorch's accuracy (the kernel's formula):
    ``exp(logvar) - (logvar + 1)``, not ``expm1``, which ATen does not vectorise on CPU (7x
    the time of ``exp`` at 256x512) and whose backward is two passes; ``a + b * c``, not
    ``addcmul``, whose backward multiplies by its ``value`` once more. In float32 the KL of a
    term near logvar = 0 is then accurate to float32's epsilon in absolute terms, as eager's
    and the kernel's; the float64 oracle (``upcast`` of float64 input) is exact either way."""
    dtype = mu.dtype
    cd = compute_dtype(dtype) if upcast else dtype
    m, lv = _as(mu, cd), _as(logvar, cd)
    e = standard_normal(mu, generator, cd) if eps is None else _as(eps, cd)
    z = m + torch.exp(0.5 * lv) * e
    terms = (torch.exp(lv) - (lv + 1.0)) + m * m
    nd = terms.dim()
    if nd > 1:  # summed per sample
        terms = terms.sum(1 if nd == 2 else tuple(range(1, nd)))
    kl = terms.mul(0.5)
    if reduction == "sum":
        kl = kl.sum()
    elif reduction == "mean":
        kl = kl.mean()
    return _as(z, dtype), kl


# --------------------------------------------------------------------------------------
# Densities
# --------------------------------------------------------------------------------------


def gaussian_log_p(x, mean, log_sd):
    """Elementwise log N(x; mean, exp(log_sd)^2), in the compute dtype of the three (float32,
    float64 if any is float64), whatever their dtypes: a 16-bit model's, or the bfloat16
    mean and log-sd of a prior network under autocast, would otherwise round every term
    (and the caller's per-sample sum) to 16 bits."""
    cd = compute_dtype(torch.promote_types(torch.promote_types(x.dtype, mean.dtype),
                                           log_sd.dtype))
    x, mean, log_sd = _as(x, cd), _as(mean, cd), _as(log_sd, cd)
    return -0.5 * math.log(2 * math.pi) - log_sd - 0.5 * (x - mean) ** 2 / torch.exp(2 * log_sd)


# --------------------------------------------------------------------------------------
# TarFlow affine head
# --------------------------------------------------------------------------------------

# The token order a TarFlow head writes its output in (forward) or reads its input in
# (inverse): "same" keeps the block's order, "reversed" flips the tokens (the next block's
# permutation, applied as an index on the store instead of a copy).
TARFLOW_ORDERS = ("same", "reversed")


def tarflow_clamp(a, clamp=None):
    """The optional soft clamp of the log-scale: ``clamp * tanh(a / clamp)``.

    Written with e = exp(-2|u|) so that autograd's derivative, 4e / (1 + e)^2, keeps its
    precision where tanh saturates (torch.tanh's backward, 1 - tanh^2, cancels there in
    float32); ``where`` instead of ``abs`` keeps the derivative 1 at u = 0."""
    if not clamp:
        return a
    u = a / clamp
    neg = u < 0
    e = torch.exp(-2.0 * torch.where(neg, -u, u))
    th = (1.0 - e) / (1.0 + e)
    return clamp * torch.where(neg, -th, th)


def tarflow_params(h, *, clamp=None, guidance=0.0, guided=False, upcast=True, dtype=None):
    """The shifted affine parameters (a, b), each (N, T, D), from the transformer's output
    projection ``h`` (B, T, 2D): token t takes ``h[:, t - 1]`` split into ``a = h[..., :D]``
    (soft-clamped) and ``b = h[..., D:]``; token 0 gets zeros. ``guided``: the batch is
    doubled, rows [0, N) conditional and [N, 2N) unconditional, combined as
    ``p = p_c + guidance * (p_c - p_u)`` for p in (a, b) (classifier-free guidance).
    ``dtype``: the compute dtype (the head passes its input's; default: h's)."""
    cd = dtype or (compute_dtype(h.dtype) if upcast else h.dtype)
    d = h.shape[-1] // 2
    hc = F.pad(_as(h, cd)[:, :-1], (0, 0, 1, 0))
    a, b = tarflow_clamp(hc[..., :d], clamp), hc[..., d:]
    if guided:
        n = h.shape[0] // 2
        a = a[:n] + guidance * (a[:n] - a[n:])
        b = b[:n] + guidance * (b[:n] - b[n:])
    return a, b


def tarflow_head(x, h, *, clamp=None, order="same", reverse=False, guidance=0.0,
                 guided=False, upcast=True):
    """The TarFlow affine head: ``(out, logdet)``.

    Forward: ``x`` (N, T, D) in the block's token order, ``h`` (N, T, 2D) the causal
    transformer's output for ``x``; ``z = (x - b) * exp(-a)`` with (a, b) from
    ``tarflow_params``, written in ``order``; ``logdet = -sum(a)`` per sample.
    ``reverse=True``: ``x`` holds z in ``order``; ``out = z * exp(a) + b`` in the block's
    order and ``logdet = +sum(a)`` (the inverse map's). Given h of the true x, the inverse is
    exact; with h of a guess it is one Jacobi update."""
    # computed in x's compute dtype, whatever h's (the log-det's dtype follows the input)
    cd = compute_dtype(x.dtype) if upcast else x.dtype
    a, b = tarflow_params(h, clamp=clamp, guidance=guidance, guided=guided, upcast=upcast,
                          dtype=cd)
    v = _as(x, a.dtype)
    if reverse:
        if order == "reversed":
            v = v.flip(1)
        out = v * torch.exp(a) + b
        logdet = a.sum(dim=(1, 2))
    else:
        out = (v - b) * torch.exp(-a)
        logdet = -a.sum(dim=(1, 2))
        if order == "reversed":
            out = out.flip(1)
    return _as(out, x.dtype), logdet


def tarflow_token_inverse(z, h_last, tok, *, clamp=None, order="same", guidance=0.0,
                          guided=False, upcast=True):
    """One token of the inverse: ``x_t = z_t * exp(a_t) + b_t`` (N, 1, D) for the block-order
    token index ``tok`` (a (1,) int64 tensor, so no host sync), where ``z`` (N, T, D) is laid
    out in ``order`` and ``h_last`` (B, 1, 2D) is the transformer's output at token t - 1
    (ignored when ``h_last`` is None: token 0, a = b = 0)."""
    t_count = z.shape[1]
    stored = tok if order == "same" else (t_count - 1) - tok
    zt = z.index_select(1, stored)
    cd = compute_dtype(z.dtype) if upcast else z.dtype
    if h_last is None:
        return zt.to(cd).to(z.dtype)
    d = h_last.shape[-1] // 2
    hc = h_last.to(cd)
    a, b = tarflow_clamp(hc[..., :d], clamp), hc[..., d:]
    if guided:
        n = h_last.shape[0] // 2
        a = a[:n] + guidance * (a[:n] - a[n:])
        b = b[:n] + guidance * (b[:n] - b[n:])
    return (zt.to(cd) * torch.exp(a) + b).to(z.dtype)
