"""ActNorm folded into the invertible 1x1 convolution: the Triton path as torch.library
custom ops, the reference path as plain PyTorch autograd through ``fastflow.reference``
(the public functions decide once per call; the custom ops launch kernels unconditionally).

* ``fastflow::channel_mix(x, weight, matrix, loc, scale, reverse) -> out``: one kernel
  launch. Forward: ``out = weight @ (scale * (x + loc))`` per pixel; ``reverse``:
  ``out = (weight @ x) / scale - loc`` (``weight`` is then the inverse matrix). ``weight``
  None is ActNorm alone; ``loc``/``scale`` None is the 1x1 convolution alone. ``matrix`` is
  ``weight`` cast once per call to x's compute dtype by the public function (``weight``
  itself when it already is): the launches, forward and backward, read it, never a
  float64 W; ``weight`` is an input for autograd only.
* ``fastflow::channel_mix_split(x, weight, matrix, loc, scale, reverse, split) -> (out,
  head)``: the same launch, which also writes ``out[:, :split]`` as a tensor of its own,
  ``head`` (Glow's coupling network reads it: no channel-slice copy for the network, and
  the gradients of both outputs meet inside the backward's launches, with no zeros, no
  slice backward and no add).
* ``fastflow::channel_mix_backward(grad, src, matrix, loc, scale, reverse, need_params,
  weight_dtype, grad_head=None) -> (d_src, d_weight, d_loc, d_scale)``: one launch for
  d_src; for the parameters (skipped when none needs a gradient) one deterministic
  reduction launch and one finishing launch that writes the gradients in the parameters'
  shapes and dtypes (d_weight in ``weight_dtype``); absent gradients come back as empty
  tensors. ``grad_head`` (head's gradient) is added to ``grad[:, :split]`` as the d_src
  and reduction launches read it.
The mixing kernel itself never sees a log-det: it is read from the parameters
(H*W*sum(log|scale|), H*W*sum(log_s)), see ``fastflow.ops.lu_weight`` and ``actnorm_invconv``.

Higher derivatives: supported on the reference path (plain autograd); on the Triton path
``torch.func.grad``/``jvp`` are refused at the call and ``create_graph=True`` at the first
backward, with a ``NotImplementedError`` naming ``fastflow.use_backend("reference")``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..backend import (compute_dtype, device_guard, empty_output, memory_format_of,
                       refuse_double_backward, refuse_transforms, use_triton)
from ._checks import check_bool, check_count, check_float_tensor, check_same_device


def _kernels():
    from ..kernels import channel_mix  # imported on first Triton use only

    return channel_mix


def _matrix(weight, x):
    """``weight`` (Co, C) or (Co, C, 1, 1), read by the kernels through strides 0 and 1, in
    x's compute dtype: one cast per call, outside autograd's graph (a (Co, C) copy, e.g.
    the float64 W of an LU layer for float32 activations), which the forward launch and
    both backward launches read, instead of every program converting its slice."""
    cd = compute_dtype(x.dtype)
    if weight is None or weight.dtype == cd:
        return weight
    with torch.no_grad():
        return weight.to(cd)


def _vec(v):
    if v is None or v.is_contiguous():
        return v  # (C,) or (1, C, 1, 1) contiguous: the kernels read it as a flat vector
    return v.reshape(-1).contiguous()


def _like(g, p, dtype=None):
    """``g`` in the shape of the parameter ``p`` and its dtype (``dtype`` when given; no op
    when it already is)."""
    dtype = dtype or p.dtype
    if g.dtype != dtype:
        g = g.to(dtype)
    return g if g.shape == p.shape else g.reshape(p.shape)


def _out_channels(x, weight):
    return x.shape[1] if weight is None else weight.shape[0]


def _triton_mix(x, a, loc, scale, reverse, head=None):
    lv, sv = _vec(loc), _vec(scale)
    with device_guard(x):
        if lv is None:
            return _kernels().mix(x, a, out2=head)
        if reverse:
            return _kernels().mix(x, a, post="actnorm_inverse", post_scale=sv, post_shift=lv,
                                  out2=head)
        return _kernels().mix(x, a, pre="actnorm", pre_scale=sv, pre_shift=lv, out2=head)


@torch.library.custom_op("fastflow::channel_mix", mutates_args=())
def channel_mix_op(x: Tensor, weight: Optional[Tensor], matrix: Optional[Tensor],
                   loc: Optional[Tensor], scale: Optional[Tensor], reverse: bool) -> Tensor:
    """``matrix`` is ``weight`` in x's compute dtype (``_matrix``): the launches read it;
    ``weight`` is there for autograd (its gradient, in its own dtype)."""
    return _triton_mix(x, matrix, loc, scale, reverse)


def _head_like(x, split):
    n, _, h, w = x.shape
    return empty_output(x, shape=(n, split, h, w))


@torch.library.custom_op("fastflow::channel_mix_split", mutates_args=())
def channel_mix_split_op(x: Tensor, weight: Optional[Tensor], matrix: Optional[Tensor],
                         loc: Optional[Tensor], scale: Optional[Tensor], reverse: bool,
                         split: int) -> tuple[Tensor, Tensor]:
    """``channel_mix_op`` whose launch also writes ``out[:, :split]`` into ``head`` (x's
    memory format), from the same registers."""
    head = _head_like(x, split)
    return _triton_mix(x, matrix, loc, scale, reverse, head), head


@channel_mix_op.register_fake
def _(x, weight, matrix, loc, scale, reverse):
    n, _, h, w = x.shape
    return empty_output(x, shape=(n, _out_channels(x, weight), h, w))


@channel_mix_split_op.register_fake
def _(x, weight, matrix, loc, scale, reverse, split):
    n, _, h, w = x.shape
    return empty_output(x, shape=(n, _out_channels(x, weight), h, w)), _head_like(x, split)


def _triton_backward(grad, src, a, loc, scale, reverse, need_params, weight_dtype,
                     grad_head=None):
    k = _kernels()
    lv, sv = _vec(loc), _vec(scale)
    has_an = lv is not None
    # d src: the transposed matrix, with ActNorm's scale as an epilogue (forward) or a
    # prologue (reverse); grad_head added to grad's first channels as they are read
    if not has_an:
        d_src = k.mix(grad, a, transpose_a=True, inp2=grad_head)
    elif reverse:
        d_src = k.mix(grad, a, transpose_a=True, pre="divide", pre_scale=sv, inp2=grad_head)
    else:
        d_src = k.mix(grad, a, transpose_a=True, post="multiply", post_scale=sv,
                      inp2=grad_head)
    d_w = d_l = d_s = None
    if need_params:
        # written by the kernels in the parameters' own shapes and dtypes: G[o, k] =
        # sum g[o] (src[k] + shift[k]) and gsum[o] = sum g[o] reduced, then turned into
        # d weight, d loc, d scale by one finishing launch
        if a is not None:  # in the weight's dtype, whatever the matrix's; with its strides
            # where it is dense (a transposed weight), as the fake says: any strides will do
            d_w = torch.empty_like(a, dtype=weight_dtype)
        if has_an:
            d_l = torch.empty(loc.shape, dtype=loc.dtype, device=loc.device)
            d_s = torch.empty(scale.shape, dtype=scale.dtype, device=scale.device)
        k.mix_param_grads(grad, src, a, sv, lv if (has_an and not reverse) else None,
                          reverse=reverse, d_a=d_w, d_loc=d_l, d_scale=d_s, grad2=grad_head)
    return d_src, d_w, d_l, d_s


@torch.library.custom_op("fastflow::channel_mix_backward", mutates_args=())
def channel_mix_backward(grad: Tensor, src: Tensor, matrix: Optional[Tensor],
                         loc: Optional[Tensor], scale: Optional[Tensor], reverse: bool,
                         need_params: bool, weight_dtype: torch.dtype,
                         grad_head: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with device_guard(src):
        d_src, d_w, d_l, d_s = _triton_backward(grad, src, matrix, loc, scale, reverse,
                                                need_params, weight_dtype, grad_head)
    fmt = memory_format_of(src)
    if d_src.dtype != src.dtype or not d_src.is_contiguous(memory_format=fmt):
        d_src = d_src.to(src.dtype).contiguous(memory_format=fmt)
    outs = [d_src]
    for g, p, dt in ((d_w, matrix, weight_dtype), (d_l, loc, None), (d_s, scale, None)):
        outs.append(src.new_empty(0) if g is None else _like(g, p, dt))
    return tuple(outs)


@channel_mix_backward.register_fake
def _(grad, src, matrix, loc, scale, reverse, need_params, weight_dtype, grad_head=None):
    outs = [empty_output(src)]
    for p, dt in ((matrix, weight_dtype), (loc, None), (scale, None)):
        outs.append(src.new_empty(0) if (p is None or not need_params)
                    else torch.empty_like(p, dtype=dt) if p is matrix
                    else p.new_empty(p.shape))  # the kernels write loc's, scale's contiguous
    return tuple(outs)


def _setup_context(ctx, inputs, output):
    x, weight, matrix, loc, scale, reverse = inputs
    ctx.save_for_backward(x, matrix, loc, scale)  # the forward's cast, not weight
    ctx.reverse = reverse
    ctx.weight_dtype = x.dtype if weight is None else weight.dtype


def _backward(ctx, grad, grad_head=None):
    refuse_double_backward("channel_mix")
    x, matrix, loc, scale = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_params = need[1] or any(need[3:5])
    d_x, d_w, d_l, d_s = channel_mix_backward(grad, x, matrix, loc, scale, ctx.reverse,
                                              need_params, ctx.weight_dtype, grad_head)
    # needed inputs always get theirs: d_x of an empty x is empty, not absent, and a needed
    # parameter's gradient was computed (need_params); the empty placeholders of absent
    # ones are never needed
    keep = lambda g, i: g if need[i] else None  # noqa: E731
    return keep(d_x, 0), keep(d_w, 1), None, keep(d_l, 3), keep(d_s, 4), None


def _split_setup_context(ctx, inputs, output):
    _setup_context(ctx, inputs[:6], output)


def _split_backward(ctx, grad, grad_head):
    """Both outputs' gradients (autograd gives zeros for an unused one) into the same
    launches as ``channel_mix``'s: ``grad_head`` is added inside them."""
    return *_backward(ctx, grad, grad_head), None


channel_mix_op.register_autograd(_backward, setup_context=_setup_context)
channel_mix_split_op.register_autograd(_split_backward, setup_context=_split_setup_context)


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
    matrix (the layers pass W^-1). ``weight`` (Co, C) or (Co, C, 1, 1), or
    None for ActNorm alone; ``loc`` and ``scale`` one value per channel ((C,) or
    (1, C, 1, 1)), or both None for the convolution alone. The output has x's dtype and
    memory format; the matrix may be float64 for any x: on the Triton path it is cast once
    per call to x's compute dtype (forward and backward read that copy), and its gradient
    comes back in its own dtype."""
    check_bool("reverse", reverse)
    _check(x, weight, loc, scale, reverse)
    if use_triton(x):
        refuse_transforms("channel_mix", x, weight, loc, scale)
        return channel_mix_op(x, weight, _matrix(weight, x), loc, scale, reverse)
    return _reference_mix(x, weight, loc, scale, reverse)


def _reference_mix(x, weight, loc, scale, reverse):
    out = reference.actnorm_mix(x, weight, loc, scale, reverse=reverse)
    fmt = memory_format_of(x)
    return out if out.is_contiguous(memory_format=fmt) else out.contiguous(memory_format=fmt)


def channel_mix_split(x: Tensor, weight: Optional[Tensor] = None, *,
                      loc: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                      reverse: bool = False, split: int) -> tuple[Tensor, Tensor]:
    """``(out, head)``: ``out`` as ``channel_mix`` and ``head = out[:, :split]``, the part
    a following network reads (Glow's coupling network: ``split = C - C // 2``).

    On the Triton path ``head`` is a tensor of its own in x's memory format, written by the
    same launch as ``out`` (the network's first convolution gets dense input, no copy),
    and its gradient is added to ``out``'s inside the backward's launches (no zeros, no
    slice backward, no add). On the reference path it is the view ``out[:, :split]``, as
    slicing ``channel_mix``'s output would give."""
    check_bool("reverse", reverse)
    _check(x, weight, loc, scale, reverse)
    co = _out_channels(x, weight)
    split = check_count("split", split, 1, f"a channel count from 1 to {co} (the output's)")
    if split > co:
        raise ValueError(f"split: expected a channel count from 1 to {co} (the output's), "
                         f"got {split}")
    if use_triton(x):
        refuse_transforms("channel_mix", x, weight, loc, scale)
        return channel_mix_split_op(x, weight, _matrix(weight, x), loc, scale, reverse, split)
    out = _reference_mix(x, weight, loc, scale, reverse)
    return out, out[:, :split]


def actnorm_invconv(x: Tensor, loc: Tensor, scale: Tensor, weight: Optional[Tensor],
                    weight_logdet: Optional[Tensor] = None, *, reverse: bool = False):
    """Glow's ActNorm followed by the invertible 1x1 convolution: ``(out, logdet)``.

    ``out`` as ``channel_mix`` (with ``reverse=True`` pass W^-1 as ``weight``); logdet, shape
    (N,), an ordinary tensor, is ``H*W*(sum(log|scale|) + weight_logdet)`` for the forward map and its negative
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
    ld = reference.actnorm_logdet(scale, x.shape[0], x.shape[2] * x.shape[3],
                                  compute_dtype(x.dtype), extra=weight_logdet, reverse=reverse)
    return out, ld
