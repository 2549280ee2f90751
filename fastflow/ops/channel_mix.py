"""ActNorm folded into the invertible 1x1 convolution, as torch.library custom ops.

* ``fastflow::channel_mix(x, weight, loc, scale, reverse) -> out``: one kernel launch.
  Forward: ``out = weight @ (scale * (x + loc))`` per pixel; ``reverse``:
  ``out = (weight @ x) / scale - loc`` (``weight`` is then the inverse matrix). ``weight``
  None is ActNorm alone; ``loc``/``scale`` None is the 1x1 convolution alone.
* ``fastflow::channel_mix_backward(grad, src, weight, loc, scale, reverse, need_params)
  -> (d_src, d_weight, d_loc, d_scale)``: one launch for d_src; for the parameters (skipped
  when none needs a gradient) one deterministic reduction launch and one finishing launch
  that writes the gradients in the parameters' shapes and dtypes; absent gradients come
  back as empty tensors.
* ``fastflow::lu_weight(lower, upper, log_s, sign_s, rows, scale, n, ld_mult, ld_dtype)
  -> (W, logdet)``: Glow's LU-parameterised W = P (L + I)(U + diag(sign_s exp(log_s))) in
  float64 (P as the row gather ``W[i] = M[rows[i]]``) and the per-sample log-det
  ``ld_mult * (sum(log_s) + sum(log|scale|))``, shape (n,), so a FlowStep's whole log-det
  (ActNorm's included, ``ld_mult`` = H*W) comes from one launch;
  ``fastflow::lu_weight_backward`` gives d lower, d upper, d log_s, d scale in one launch.

The mixing kernel itself never sees a log-det: it is read from the parameters
(H*W*sum(log|scale|), H*W*sum(log_s)), see ``lu_weight`` and ``actnorm_invconv``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..backend import (compute_dtype, device_guard, empty_output, memory_format_of, unaliased,
                       use_triton)
from ._checks import check_float_tensor, check_same_device


def _kernels():
    from ..kernels import channel_mix  # imported on first Triton use only

    return channel_mix


def _matrix(weight):
    return weight  # (Co, C) or (Co, C, 1, 1): the kernels read it through strides 0 and 1


def _vec(v):
    if v is None or v.is_contiguous():
        return v  # (C,) or (1, C, 1, 1) contiguous: the kernels read it as a flat vector
    return v.reshape(-1).contiguous()


def _like(g, p):
    """``g`` in the dtype and shape of the parameter ``p`` (no op when it already is)."""
    if g.dtype != p.dtype:
        g = g.to(p.dtype)
    return g if g.shape == p.shape else g.reshape(p.shape)


def _out_channels(x, weight):
    return x.shape[1] if weight is None else weight.shape[0]


@torch.library.custom_op("fastflow::channel_mix", mutates_args=())
def channel_mix_op(x: Tensor, weight: Optional[Tensor], loc: Optional[Tensor],
                   scale: Optional[Tensor], reverse: bool) -> Tensor:
    if use_triton(x):
        a, lv, sv = _matrix(weight), _vec(loc), _vec(scale)
        with device_guard(x):
            if lv is None:
                return _kernels().mix(x, a)
            if reverse:
                return _kernels().mix(x, a, post="actnorm_inverse", post_scale=sv, post_shift=lv)
            return _kernels().mix(x, a, pre="actnorm", pre_scale=sv, pre_shift=lv)
    out = reference.actnorm_mix(x, weight, loc, scale, reverse=reverse)
    return out.contiguous(memory_format=memory_format_of(x))


@channel_mix_op.register_fake
def _(x, weight, loc, scale, reverse):
    n, _, h, w = x.shape
    return empty_output(x, shape=(n, _out_channels(x, weight), h, w))


def _triton_backward(grad, src, weight, loc, scale, reverse, need_params):
    k = _kernels()
    a, lv, sv = _matrix(weight), _vec(loc), _vec(scale)
    has_an = lv is not None
    # d src: the transposed matrix, with ActNorm's scale as an epilogue (forward) or a
    # prologue (reverse)
    if not has_an:
        d_src = k.mix(grad, a, transpose_a=True)
    elif reverse:
        d_src = k.mix(grad, a, transpose_a=True, pre="divide", pre_scale=sv)
    else:
        d_src = k.mix(grad, a, transpose_a=True, post="multiply", post_scale=sv)
    d_w = d_l = d_s = None
    if need_params:
        # written by the kernels in the parameters' own shapes and dtypes: G[o, k] =
        # sum g[o] (src[k] + shift[k]) and gsum[o] = sum g[o] reduced, then turned into
        # d weight, d loc, d scale by one finishing launch
        if weight is not None:
            d_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        if has_an:
            d_l = torch.empty(loc.shape, dtype=loc.dtype, device=loc.device)
            d_s = torch.empty(scale.shape, dtype=scale.dtype, device=scale.device)
        k.mix_param_grads(grad, src, a, sv, lv if (has_an and not reverse) else None,
                          reverse=reverse, d_a=d_w, d_loc=d_l, d_scale=d_s)
    return d_src, d_w, d_l, d_s


def _reference_backward(grad, src, weight, loc, scale, reverse, need_params):
    args = {"weight": weight, "loc": loc, "scale": scale}
    names = [k for k, v in args.items() if v is not None] if need_params else []

    def fn(x, *params):
        kw = dict(args, **dict(zip(names, params)))
        return reference.actnorm_mix(x, kw["weight"], kw["loc"], kw["scale"], reverse=reverse)

    _, vjp = torch.func.vjp(fn, src, *[args[k] for k in names])
    grads = vjp(grad)
    got = dict(zip(names, grads[1:]))
    return grads[0], got.get("weight"), got.get("loc"), got.get("scale")


@torch.library.custom_op("fastflow::channel_mix_backward", mutates_args=())
def channel_mix_backward(grad: Tensor, src: Tensor, weight: Optional[Tensor],
                         loc: Optional[Tensor], scale: Optional[Tensor], reverse: bool,
                         need_params: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    run = _triton_backward if use_triton(src) else _reference_backward
    with device_guard(src):
        d_src, d_w, d_l, d_s = run(grad, src, weight, loc, scale, reverse, need_params)
    fmt = memory_format_of(src)
    if d_src.dtype != src.dtype or not d_src.is_contiguous(memory_format=fmt):
        d_src = d_src.to(src.dtype).contiguous(memory_format=fmt)
    outs = [d_src]
    for g, p in ((d_w, weight), (d_l, loc), (d_s, scale)):
        outs.append(src.new_empty(0) if g is None else _like(g, p))
    # a custom op's outputs may not alias its inputs (the reference vjp can hand back a
    # view of ``grad``, e.g. d_loc = -grad summed over nothing when N = H = W = 1)
    return unaliased(outs, (grad, src, weight, loc, scale))


@channel_mix_backward.register_fake
def _(grad, src, weight, loc, scale, reverse, need_params):
    outs = [empty_output(src)]
    for p in (weight, loc, scale):
        outs.append(src.new_empty(0) if (p is None or not need_params) else torch.empty_like(p))
    return tuple(outs)


def _setup_context(ctx, inputs, output):
    x, weight, loc, scale, reverse = inputs
    ctx.save_for_backward(x, weight, loc, scale)
    ctx.reverse = reverse


def _backward(ctx, grad):
    x, weight, loc, scale = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_params = any(need[1:4])
    d_x, d_w, d_l, d_s = channel_mix_backward(grad, x, weight, loc, scale, ctx.reverse,
                                              need_params)
    keep = lambda g, i: g if (need[i] and g.numel() > 0) else None  # noqa: E731
    return keep(d_x, 0), keep(d_w, 1), keep(d_l, 2), keep(d_s, 3), None


channel_mix_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# Public functions (validation, then the op)
# --------------------------------------------------------------------------------------


def _check(x, weight, loc, scale, reverse):
    check_float_tensor("x", x, ndim=4)
    c = x.shape[1]
    if weight is None and loc is None and scale is None:
        raise ValueError("weight: expected a (Co, C) matrix when loc and scale are None, got None")
    if weight is not None:
        check_float_tensor("weight", weight)
        check_same_device("weight", weight, "x", x)
        if not (weight.dim() == 2 or (weight.dim() == 4 and weight.shape[2:] == (1, 1))):
            raise ValueError(f"weight: expected shape (Co, {c}) or (Co, {c}, 1, 1), got "
                             f"{tuple(weight.shape)}")
        if weight.shape[1] != c:
            raise ValueError(f"weight: expected {c} input channels (x has shape "
                             f"{tuple(x.shape)}), got weight shape {tuple(weight.shape)}")
    if (loc is None) != (scale is None):
        raise ValueError(f"loc, scale: expected both or neither, got loc="
                         f"{'None' if loc is None else 'a tensor'}, scale="
                         f"{'None' if scale is None else 'a tensor'}")
    if loc is not None:
        # the ActNorm acts on x's channels going forward, on the output's in reverse
        want = weight.shape[0] if (reverse and weight is not None) else c
        for name, v in (("loc", loc), ("scale", scale)):
            check_float_tensor(name, v)
            check_same_device(name, v, "x", x)
            if v.numel() != want or (v.dim() == 4 and v.shape[1] != want):
                raise ValueError(f"{name}: expected {want} values, one per channel (shape "
                                 f"({want},) or (1, {want}, 1, 1)), got shape {tuple(v.shape)}")
    if reverse and weight is not None and loc is not None and weight.shape[0] != c:
        raise ValueError(f"weight: expected a square ({c}, {c}) matrix with reverse=True, got "
                         f"{tuple(weight.shape)}")


def channel_mix(x: Tensor, weight: Optional[Tensor] = None, *, loc: Optional[Tensor] = None,
                scale: Optional[Tensor] = None, reverse: bool = False) -> Tensor:
    """ActNorm and a 1x1 convolution in one pass over memory.

    Forward: ``out[:, :, i, j] = weight @ (scale * (x[:, :, i, j] + loc))``.
    ``reverse=True``: ``out = (weight @ x) / scale - loc`` where ``weight`` is the inverse
    matrix (the layers pass their cached W^-1). ``weight`` (Co, C) or (Co, C, 1, 1), or
    None for ActNorm alone; ``loc`` and ``scale`` one value per channel ((C,) or
    (1, C, 1, 1)), or both None for the convolution alone. The output has x's dtype and
    memory format; the matrix may be float64 for any x (it is read in the compute dtype)."""
    _check(x, weight, loc, scale, reverse)
    return channel_mix_op(x, weight, loc, scale, bool(reverse))


def actnorm_invconv(x: Tensor, loc: Tensor, scale: Tensor, weight: Optional[Tensor],
                    weight_logdet: Optional[Tensor] = None, *, reverse: bool = False):
    """Glow's ActNorm followed by the invertible 1x1 convolution: ``(out, logdet)``.

    ``out`` as ``channel_mix`` (with ``reverse=True`` pass W^-1 as ``weight``); logdet, shape
    (N,), is ``H*W*(sum(log|scale|) + weight_logdet)`` for the forward map and its negative
    for ``reverse``; ``weight_logdet`` is log|det W| (a 0-d tensor, e.g. ``sum(log_s)`` of an
    LU-parameterised W), None for ActNorm alone."""
    if weight_logdet is not None:
        check_float_tensor("weight_logdet", weight_logdet)
        if weight_logdet.numel() != 1:
            raise ValueError(f"weight_logdet: expected a single value, got shape "
                             f"{tuple(weight_logdet.shape)}")
    for name, v in (("loc", loc), ("scale", scale)):
        if v is None:
            raise ValueError(f"{name}: expected a tensor with one value per channel, got None")
    out = channel_mix(x, weight, loc=loc, scale=scale, reverse=reverse)
    hw = x.shape[2] * x.shape[3]
    cd = compute_dtype(x.dtype)
    per_pixel = torch.log(torch.abs(scale.to(cd))).sum()
    if weight_logdet is not None:
        per_pixel = per_pixel + weight_logdet.to(cd).reshape(())
    ld = (-hw if reverse else hw) * per_pixel
    return out, ld.expand(x.shape[0])


# --------------------------------------------------------------------------------------
# LU-parameterised weight and the log-det: fastflow::lu_weight
# --------------------------------------------------------------------------------------


def _flat(v):
    """A per-channel vector the kernels can read with one stride: 1-D as it is, else
    contiguous (a (1, C, 1, 1) parameter is)."""
    if v is None or v.dim() == 1 or v.is_contiguous():
        return v
    return v.reshape(-1).contiguous()


@torch.library.custom_op("fastflow::lu_weight", mutates_args=())
def lu_weight_op(lower: Tensor, upper: Tensor, log_s: Tensor, sign_s: Tensor, rows: Tensor,
                 scale: Optional[Tensor], n: int, ld_mult: int,
                 ld_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    if use_triton(log_s):
        c = log_s.shape[0]
        w = torch.empty((c, c), dtype=torch.float64, device=log_s.device)
        ld = torch.empty((n,), dtype=ld_dtype, device=log_s.device)
        with device_guard(log_s):
            _kernels().lu_weight(lower, upper, log_s, sign_s, rows, _flat(scale), w, ld,
                                 ld_mult=ld_mult)
        return w, ld
    w, ld = reference.lu_weight_logdet(rows, lower, upper, log_s, sign_s, scale, n=n,
                                       ld_mult=ld_mult)
    return w, ld.to(ld_dtype).clone()


@lu_weight_op.register_fake
def _(lower, upper, log_s, sign_s, rows, scale, n, ld_mult, ld_dtype):
    c = log_s.shape[0]
    return (log_s.new_empty((c, c), dtype=torch.float64), log_s.new_empty((n,), dtype=ld_dtype))


def _lu_reference_backward(d_w, d_ld, lower, upper, log_s, sign_s, rows, scale, ld_mult):
    prims = [lower, upper, log_s] + ([] if scale is None else [scale])

    def fn(*ps):
        sc = ps[3] if scale is not None else None
        return reference.lu_weight_logdet(rows, ps[0], ps[1], ps[2], sign_s, sc,
                                          n=d_ld.shape[0], ld_mult=ld_mult)

    _, vjp = torch.func.vjp(fn, *prims)
    grads = vjp((d_w.to(torch.float64), d_ld.to(torch.float64)))
    return (*grads[:3], grads[3] if scale is not None else None)


@torch.library.custom_op("fastflow::lu_weight_backward", mutates_args=())
def lu_weight_backward(d_w: Tensor, d_ld: Tensor, lower: Tensor, upper: Tensor, log_s: Tensor,
                       sign_s: Tensor, rows: Tensor, scale: Optional[Tensor],
                       ld_mult: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if use_triton(log_s):
        d_l = torch.empty(lower.shape, dtype=lower.dtype, device=lower.device)
        d_u = torch.empty(upper.shape, dtype=upper.dtype, device=upper.device)
        d_s = torch.empty(log_s.shape, dtype=log_s.dtype, device=log_s.device)
        d_sc = (log_s.new_empty(0) if scale is None else
                torch.empty(scale.shape, dtype=scale.dtype, device=scale.device))
        with device_guard(log_s):
            _kernels().lu_weight_backward(d_w, d_ld, lower, upper, log_s, sign_s, rows,
                                          _flat(scale), d_l, d_u, d_s,
                                          None if scale is None else d_sc, ld_mult=ld_mult)
        return d_l, d_u, d_s, d_sc
    d_l, d_u, d_s, d_sc = _lu_reference_backward(d_w, d_ld, lower, upper, log_s, sign_s, rows,
                                                 scale, ld_mult)
    outs = [d_l, d_u, d_s, log_s.new_empty(0) if d_sc is None else d_sc]
    return unaliased(outs, (d_w, d_ld, lower, upper, log_s, sign_s, rows, scale))


@lu_weight_backward.register_fake
def _(d_w, d_ld, lower, upper, log_s, sign_s, rows, scale, ld_mult):
    return (torch.empty_like(lower), torch.empty_like(upper), torch.empty_like(log_s),
            log_s.new_empty(0) if scale is None else torch.empty_like(scale))


def _lu_setup_context(ctx, inputs, output):
    lower, upper, log_s, sign_s, rows, scale, n, ld_mult, ld_dtype = inputs
    ctx.save_for_backward(lower, upper, log_s, sign_s, rows, scale)
    ctx.ld_mult = ld_mult


def _lu_backward(ctx, d_w, d_ld):
    lower, upper, log_s, sign_s, rows, scale = ctx.saved_tensors
    need = ctx.needs_input_grad
    d_l, d_u, d_s, d_sc = lu_weight_backward(d_w, d_ld, lower, upper, log_s, sign_s, rows,
                                             scale, ctx.ld_mult)
    return (d_l if need[0] else None, d_u if need[1] else None, d_s if need[2] else None,
            None, None, d_sc if (scale is not None and need[5]) else None, None, None, None)


lu_weight_op.register_autograd(_lu_backward, setup_context=_lu_setup_context)


def lu_weight(lower: Tensor, upper: Tensor, log_s: Tensor, sign_s: Tensor, rows: Tensor, *,
              scale: Optional[Tensor] = None, n: int = 1, ld_mult: int = 1,
              ld_dtype: torch.dtype = torch.float64):
    """Glow's LU-parameterised 1x1 convolution weight and the log-det, in one launch:
    ``(W, logdet)``.

    ``W = P @ (L + I) @ (U + diag(sign_s * exp(log_s)))`` as a float64 (C, C) matrix, with
    L / U the strictly lower / upper parts of ``lower`` / ``upper`` (C, C) (the other
    entries are ignored and get zero gradients) and P given by its row gather:
    ``W[i] = ((L + I)(U + D))[rows[i]]``, i.e. ``rows = P.argmax(dim=1)``; ``rows`` must be
    a permutation of 0..C-1 (not checked: that would read the device). ``logdet`` (n,) in
    ``ld_dtype`` is ``ld_mult * (sum(log_s) + sum(log|scale|))`` (``scale``, e.g. the
    ActNorm's, None for none): a FlowStep passes ``ld_mult = H*W`` (``-H*W`` for the
    inverse map). Differentiable in lower, upper, log_s and scale."""
    for name, t in (("lower", lower), ("upper", upper), ("log_s", log_s), ("sign_s", sign_s)):
        check_float_tensor(name, t)
    c = log_s.shape[0] if log_s.dim() == 1 else -1
    if log_s.dim() != 1:
        raise ValueError(f"log_s: expected a 1-D tensor (C,), got shape {tuple(log_s.shape)}")
    for name, t in (("lower", lower), ("upper", upper)):
        if tuple(t.shape) != (c, c):
            raise ValueError(f"{name}: expected shape ({c}, {c}) (log_s has {c} values), got "
                             f"{tuple(t.shape)}")
        check_same_device(name, t, "log_s", log_s)
    if tuple(sign_s.shape) != (c,):
        raise ValueError(f"sign_s: expected shape ({c},), got {tuple(sign_s.shape)}")
    check_same_device("sign_s", sign_s, "log_s", log_s)
    if not isinstance(rows, Tensor) or rows.dtype not in (torch.int64, torch.int32):
        got = rows.dtype if isinstance(rows, Tensor) else type(rows).__name__
        raise TypeError(f"rows: expected an int64 or int32 tensor (the permutation's row "
                        f"gather), got {got}")
    if tuple(rows.shape) != (c,):
        raise ValueError(f"rows: expected shape ({c},), got {tuple(rows.shape)}")
    check_same_device("rows", rows, "log_s", log_s)
    if scale is not None:
        check_float_tensor("scale", scale)
        check_same_device("scale", scale, "log_s", log_s)
        if scale.numel() != c:
            raise ValueError(f"scale: expected {c} values, one per channel, got shape "
                             f"{tuple(scale.shape)}")
    if not isinstance(ld_dtype, torch.dtype) or not ld_dtype.is_floating_point:
        raise TypeError(f"ld_dtype: expected a floating-point torch.dtype, got {ld_dtype!r}")
    if int(n) < 0:
        raise ValueError(f"n: expected a sample count >= 0, got {n}")
    return lu_weight_op(lower, upper, log_s, sign_s, rows, scale, int(n), int(ld_mult), ld_dtype)
