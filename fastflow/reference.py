"""Plain PyTorch definitions of every fastflow op: the spec, the CPU path and the test oracle.

Each function computes in float32 (float64 for float64 inputs) when ``upcast=True`` and
returns outputs in the input dtype, log-determinants in the compute dtype. Tests call them
with float64 inputs to get the ground truth. Layout is NCHW throughout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .backend import compute_dtype

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


def coupling_params(h: torch.Tensor, cb: int, layout: str):
    """(raw, t) from the coupling network's output ``h`` (N, 2*Cb, H, W)."""
    if layout == "halves":
        return h[:, :cb], h[:, cb:]
    return h[:, 1::2], h[:, 0::2]


def coupling_log_scale(raw: torch.Tensor, scale: str, clamp: float) -> torch.Tensor:
    """log s for the scale parameterisations of DESIGN.md."""
    if scale == "sigmoid":
        return F.logsigmoid(raw + 2.0)
    if scale == "exp":
        return raw
    return (clamp * ATAN_FACTOR) * torch.atan(raw / clamp)


def affine_coupling(x, h, *, scale="sigmoid", layout="halves", shift="before", clamp=2.0,
                    reverse=False, upcast=True):
    """Affine coupling: returns (y, logdet); ``reverse=True`` maps y back to x."""
    cd = compute_dtype(x.dtype) if upcast else x.dtype
    ca, cb = split_channels(x.shape[1])
    xf, hf = x.to(cd), h.to(cd)
    xa, xb = xf[:, :ca], xf[:, ca:]
    raw, t = coupling_params(hf, cb, layout)
    log_s = coupling_log_scale(raw, scale, clamp)
    if shift == "negated":
        t = -t
    shift_first = shift in ("before", "negated")
    if not reverse:
        s = torch.exp(log_s)
        yb = (xb + t) * s if shift_first else xb * s + t
        logdet = log_s.sum(dim=(1, 2, 3))
    else:  # times exp(-log s) rather than / s: no s**2 in the gradient to underflow
        inv_s = torch.exp(-log_s)
        yb = xb * inv_s - t if shift_first else (xb - t) * inv_s
        logdet = -log_s.sum(dim=(1, 2, 3))
    y = torch.cat([xa, yb], dim=1).to(x.dtype)
    return y, logdet.to(compute_dtype(x.dtype))


def additive_coupling(x, h, *, reverse=False, upcast=True):
    """Additive coupling: yb = xb + h (h has Cb channels); the log-det is zero."""
    cd = compute_dtype(x.dtype) if upcast else x.dtype
    ca, _ = split_channels(x.shape[1])
    xf, hf = x.to(cd), h.to(cd)
    yb = xf[:, ca:] - hf if reverse else xf[:, ca:] + hf
    y = torch.cat([xf[:, :ca], yb], dim=1).to(x.dtype)
    return y, x.new_zeros(x.shape[0], dtype=compute_dtype(x.dtype))


# --------------------------------------------------------------------------------------
# ActNorm and the invertible 1x1 convolution (channel mixing)
# --------------------------------------------------------------------------------------


def actnorm(x, loc, scale, *, reverse=False, upcast=True):
    """ActNorm: y = scale * (x + loc) per channel; loc, scale shaped (1, C, 1, 1) or (C,).

    Returns (y, logdet) with logdet = H*W*sum(log|scale|) (negated for ``reverse``)."""
    cd = compute_dtype(x.dtype) if upcast else x.dtype
    c = x.shape[1]
    loc_, scale_ = loc.to(cd).reshape(1, c, 1, 1), scale.to(cd).reshape(1, c, 1, 1)
    xf = x.to(cd)
    y = xf / scale_ - loc_ if reverse else scale_ * (xf + loc_)
    hw = x.shape[2] * x.shape[3]
    ld = hw * torch.log(torch.abs(scale_)).sum()
    ld = -ld if reverse else ld
    return y.to(x.dtype), ld.expand(x.shape[0]).to(compute_dtype(x.dtype)).clone()


def channel_mix(x, weight, bias=None, *, upcast=True):
    """y[n, :, i, j] = weight @ x[n, :, i, j] + bias: a 1x1 convolution (weight (Co, C))."""
    cd = compute_dtype(x.dtype) if upcast else x.dtype
    y = torch.einsum("oc,nchw->nohw", weight.to(cd), x.to(cd))
    if bias is not None:
        y = y + bias.to(cd).reshape(1, -1, 1, 1)
    return y.to(x.dtype)


def lu_factors(lower, upper, log_s, sign_s):
    """(L + I, U + diag(sign_s * exp(log_s))) from the strictly triangular parts."""
    c = log_s.shape[0]
    eye = torch.eye(c, dtype=lower.dtype, device=lower.device)
    l_full = torch.tril(lower, -1) + eye
    u_full = torch.triu(upper, 1) + torch.diag(sign_s * torch.exp(log_s))
    return l_full, u_full


def lu_weight(perm, lower, upper, log_s, sign_s):
    """W = P @ (L + I) @ (U + diag(sign_s * exp(log_s)))."""
    l_full, u_full = lu_factors(lower, upper, log_s, sign_s)
    return perm @ l_full @ u_full


def lu_inverse_weight(perm, lower, upper, log_s, sign_s):
    """W^-1 = U^-1 L^-1 P^T from triangular solves (no general inverse)."""
    l_full, u_full = lu_factors(lower, upper, log_s, sign_s)
    eye = torch.eye(log_s.shape[0], dtype=lower.dtype, device=lower.device)
    l_inv = torch.linalg.solve_triangular(l_full, eye, upper=False, unitriangular=True)
    u_inv = torch.linalg.solve_triangular(u_full, eye, upper=True)
    return u_inv @ l_inv @ perm.transpose(0, 1)


def lu_logdet(log_s, height, width):
    """log|det| of the 1x1 convolution over an H x W image: H*W*sum(log_s)."""
    return height * width * log_s.sum()


def lu_weight_logdet(rows, lower, upper, log_s, sign_s, scale=None, *, n=1, ld_mult=1):
    """The fused LU op's spec, in float64: (W, logdet) with W = ``lu_weight`` for the
    permutation whose row gather is ``rows`` (W[i] = ((L + I)(U + D))[rows[i]]) and
    logdet (n,) = ld_mult * (sum(log_s) + sum(log|scale|)) (no scale term for None)."""
    d = torch.float64
    l_full, u_full = lu_factors(lower.to(d), upper.to(d), log_s.to(d), sign_s.to(d))
    w = (l_full @ u_full).index_select(0, rows.long())
    ld = log_s.to(d).sum()
    if scale is not None:
        ld = ld + torch.log(torch.abs(scale.to(d))).sum()
    return w, (ld_mult * ld).expand(n)


def invconv(x, weight, *, reverse=False, upcast=True):
    """Plain invertible 1x1 convolution: (y, logdet) with logdet = H*W*log|det W|."""
    cd = compute_dtype(x.dtype) if upcast else x.dtype
    w = weight.to(cd).reshape(weight.shape[0], weight.shape[1])
    if reverse:
        w = torch.linalg.inv(w)
    y = channel_mix(x, w, upcast=upcast)
    ld = x.shape[2] * x.shape[3] * torch.linalg.slogdet(weight.to(cd).reshape(w.shape))[1]
    ld = -ld if reverse else ld
    return y, ld.expand(x.shape[0]).clone()


def actnorm_mix(x, weight=None, loc=None, scale=None, *, reverse=False, upcast=True):
    """ActNorm then a 1x1 convolution, one rounding at the end (the fused op's spec):

    forward ``y = weight @ (scale * (x + loc))``; ``reverse``: ``x = (weight @ y) / scale - loc``
    where ``weight`` is then the inverse matrix. ``weight`` (Co, C) or (Co, C, 1, 1), or None
    (ActNorm alone); ``loc``/``scale`` hold one value per channel, or are both None."""
    cd = compute_dtype(x.dtype) if upcast else x.dtype
    v = x.to(cd)
    w = None if weight is None else weight.to(cd).reshape(weight.shape[0], weight.shape[1])
    if loc is not None:
        loc_, scale_ = loc.to(cd).reshape(1, -1, 1, 1), scale.to(cd).reshape(1, -1, 1, 1)
    if not reverse and loc is not None:
        v = scale_ * (v + loc_)
    if w is not None:
        v = torch.einsum("oc,nchw->nohw", w, v)
    if reverse and loc is not None:
        v = v / scale_ - loc_
    return v.to(x.dtype)


def actnorm_init(x, eps=1e-6):
    """ActNorm's data-dependent initialisation: (loc, scale) = (-mean, 1 / (std + eps)) per
    channel over (N, H, W), std unbiased (rosinality/glow-pytorch), in the compute dtype."""
    v = x.detach().to(compute_dtype(x.dtype)).transpose(0, 1).reshape(x.shape[1], -1)
    mean = v.mean(dim=1)
    std = v.std(dim=1, correction=1 if v.shape[1] > 1 else 0)
    return -mean, 1.0 / (std + eps)


# --------------------------------------------------------------------------------------
# Gaussian reparameterisation + KL to the standard normal
# --------------------------------------------------------------------------------------

REDUCTIONS = ("none", "sum", "mean")


def reparameterize_kl(mu, logvar, eps=None, *, reduction="none", generator=None, upcast=True):
    """z = mu + exp(logvar / 2) * eps, kl = 0.5 * sum(exp(logvar) + mu^2 - 1 - logvar).

    The KL is summed over all but the first dimension; ``reduction`` "none" gives (N,),
    "sum" and "mean" (over the batch) a scalar. ``eps=None`` draws torch's normal noise."""
    cd = compute_dtype(mu.dtype) if upcast else mu.dtype
    if eps is None:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=cd)
    m, lv, e = mu.to(cd), logvar.to(cd), eps.to(cd)
    z = m + torch.exp(0.5 * lv) * e
    per_sample = math.prod(mu.shape[1:])  # also for N = 0 and 1-D inputs
    kl = 0.5 * (torch.exp(lv) + m * m - 1.0 - lv).reshape(mu.shape[0], per_sample).sum(dim=1)
    if reduction == "sum":
        kl = kl.sum()
    elif reduction == "mean":
        kl = kl.mean()
    return z.to(mu.dtype), kl


# --------------------------------------------------------------------------------------
# Densities
# --------------------------------------------------------------------------------------


def gaussian_log_p(x, mean, log_sd):
    """Elementwise log N(x; mean, exp(log_sd)^2)."""
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


def tarflow_params(h, *, clamp=None, guidance=0.0, guided=False, upcast=True):
    """The shifted affine parameters (a, b), each (N, T, D), from the transformer's output
    projection ``h`` (B, T, 2D): token t takes ``h[:, t - 1]`` split into ``a = h[..., :D]``
    (soft-clamped) and ``b = h[..., D:]``; token 0 gets zeros. ``guided``: the batch is
    doubled, rows [0, N) conditional and [N, 2N) unconditional, combined as
    ``p = p_c + guidance * (p_c - p_u)`` for p in (a, b) (classifier-free guidance)."""
    cd = compute_dtype(h.dtype) if upcast else h.dtype
    d = h.shape[-1] // 2
    hc = F.pad(h.to(cd)[:, :-1], (0, 0, 1, 0))
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
    a, b = tarflow_params(h, clamp=clamp, guidance=guidance, guided=guided, upcast=upcast)
    v = x.to(a.dtype)
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
    return out.to(x.dtype), logdet


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
