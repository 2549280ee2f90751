"""Glow's LU-parameterised 1x1-convolution weight and the log-det as torch.library ops.

* ``fastflow::lu_weight(lower, upper, log_s, sign_s, rows, scale, n, ld_mult, ld_dtype,
  w_dtype) -> (W, logdet)``: W = P (L + I)(U + diag(sign_s exp(log_s))) computed in float64
  and stored in ``w_dtype`` (float64, or the activations' compute dtype float32 for a
  consumer that reads it only so: rounded once by the same launch, no separate cast; P as
  the row gather ``W[i] = M[rows[i]]``) and the per-sample log-det
  ``ld_mult * (sum(log_s) + sum(log|scale|))``, shape (n,), so a FlowStep's whole log-det
  (ActNorm's included, ``ld_mult`` = H*W) comes from one launch;
  ``fastflow::lu_weight_backward`` gives d lower, d upper, d log_s, d scale in one launch.

The public ``lu_weight_logdet`` decides the backend once per call: the custom ops above
launch the Triton kernels unconditionally (backward included); the reference path is
``fastflow.reference.lu_weight_logdet`` under plain autograd. Higher derivatives: as the
other ops (reference: supported; Triton: refused with a clear error).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..backend import device_guard, refuse_double_backward, refuse_transforms, use_triton
from ._checks import FLOAT_DTYPES, check_float_tensor, check_same_device


def _kernels():
    from ..kernels import lu_weight  # imported on first Triton use only

    return lu_weight


# --------------------------------------------------------------------------------------
# LU-parameterised weight and the log-det: fastflow::lu_weight
# --------------------------------------------------------------------------------------


def _flat(v, layers: int):
    """A per-channel vector the kernels can read with strides: 1-D (one layer, or a stack
    of one) or (K, C) (a stack; (1, C) for one layer) as it is, else contiguous (a
    (1, C, 1, 1) parameter, or a stack of them, is; a (C, 1) column is made so)."""
    k = max(layers, 1)
    if (v is None or v.is_contiguous() or (v.dim() == 1 and k == 1)
            or (v.dim() == 2 and v.shape[0] == k)):
        return v
    return v.contiguous()


def _stack(log_s) -> int:
    """K for a stack of K layers (log_s (K, C)), 0 for one layer (log_s (C,))."""
    return 0 if log_s.dim() == 1 else log_s.shape[0]


def _shapes(log_s, n):
    """(W's shape, the log-det's shape): (C, C) and (n,), or (K, C, C) and (K, n)."""
    c, k = log_s.shape[-1], _stack(log_s)
    return ((c, c), (n,)) if k == 0 else ((k, c, c), (k, n))


@torch.library.custom_op("fastflow::lu_weight", mutates_args=())
def lu_weight_op(lower: Tensor, upper: Tensor, log_s: Tensor, sign_s: Tensor, rows: Tensor,
                 scale: Optional[Tensor], n: int, ld_mult: int, ld_dtype: torch.dtype,
                 w_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    w_shape, ld_shape = _shapes(log_s, n)
    w = torch.empty(w_shape, dtype=w_dtype, device=log_s.device)
    ld = torch.empty(ld_shape, dtype=ld_dtype, device=log_s.device)
    with device_guard(log_s):
        _kernels().lu_weight_forward(lower, upper, log_s, sign_s, rows,
                                     _flat(scale, _stack(log_s)), w, ld, ld_mult=ld_mult)
    return w, ld


@lu_weight_op.register_fake
def _(lower, upper, log_s, sign_s, rows, scale, n, ld_mult, ld_dtype, w_dtype):
    w_shape, ld_shape = _shapes(log_s, n)
    return (log_s.new_empty(w_shape, dtype=w_dtype), log_s.new_empty(ld_shape, dtype=ld_dtype))


@torch.library.custom_op("fastflow::lu_weight_backward", mutates_args=())
def lu_weight_backward(d_w: Tensor, d_ld: Tensor, lower: Tensor, upper: Tensor, log_s: Tensor,
                       sign_s: Tensor, rows: Tensor, scale: Optional[Tensor],
                       ld_mult: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    d_l = torch.empty(lower.shape, dtype=lower.dtype, device=lower.device)
    d_u = torch.empty(upper.shape, dtype=upper.dtype, device=upper.device)
    d_s = torch.empty(log_s.shape, dtype=log_s.dtype, device=log_s.device)
    d_sc = (log_s.new_empty(0) if scale is None else
            torch.empty(scale.shape, dtype=scale.dtype, device=scale.device))
    with device_guard(log_s):
        _kernels().lu_weight_backward(d_w, d_ld, lower, upper, log_s, sign_s, rows,
                                      _flat(scale, _stack(log_s)), d_l, d_u, d_s,
                                      None if scale is None else d_sc, ld_mult=ld_mult)
    return d_l, d_u, d_s, d_sc


@lu_weight_backward.register_fake
def _(d_w, d_ld, lower, upper, log_s, sign_s, rows, scale, ld_mult):
    # contiguous, as the kernel writes them (empty_like would copy a transposed lower's strides)
    return (lower.new_empty(lower.shape), upper.new_empty(upper.shape),
            log_s.new_empty(log_s.shape), log_s.new_empty(0) if scale is None
            else scale.new_empty(scale.shape))


def _lu_setup_context(ctx, inputs, output):
    lower, upper, log_s, sign_s, rows, scale, n, ld_mult, ld_dtype, w_dtype = inputs
    ctx.save_for_backward(lower, upper, log_s, sign_s, rows, scale)
    ctx.ld_mult = ld_mult


def _lu_backward(ctx, d_w, d_ld):
    refuse_double_backward("lu_weight_logdet")
    lower, upper, log_s, sign_s, rows, scale = ctx.saved_tensors
    need = ctx.needs_input_grad
    d_l, d_u, d_s, d_sc = lu_weight_backward(d_w, d_ld, lower, upper, log_s, sign_s, rows,
                                             scale, ctx.ld_mult)
    return (d_l if need[0] else None, d_u if need[1] else None, d_s if need[2] else None,
            None, None, d_sc if (scale is not None and need[5]) else None, None, None, None,
            None)


lu_weight_op.register_autograd(_lu_backward, setup_context=_lu_setup_context)


def lu_weight_logdet(lower: Tensor, upper: Tensor, log_s: Tensor, sign_s: Tensor, rows: Tensor, *,
              scale: Optional[Tensor] = None, n: int = 1, ld_mult: int = 1,
              ld_dtype: torch.dtype = torch.float64, w_dtype: Optional[torch.dtype] = None):
    """Glow's LU-parameterised 1x1 convolution weight and the log-det, in one launch:
    ``(W, logdet)``.

    ``W = P @ (L + I) @ (U + diag(sign_s * exp(log_s)))`` as a float64 (C, C) matrix, with
    L / U the strictly lower / upper parts of ``lower`` / ``upper`` (C, C) (the other
    entries are ignored and get zero gradients) and P given by its row gather:
    ``W[i] = ((L + I)(U + D))[rows[i]]``, i.e. ``rows = P.argmax(dim=1)``; ``rows`` must be
    a permutation of 0..C-1 (not checked: that would read the device). ``logdet`` (n,) in
    ``ld_dtype`` is ``ld_mult * (sum(log_s) + sum(log|scale|))`` (``scale``, e.g. the
    ActNorm's, None for none): a FlowStep passes ``ld_mult = H*W`` (``-H*W`` for the
    inverse map). Differentiable in lower, upper, log_s and scale.

    ``w_dtype`` (None: float64): torch.float32 asks for W already in a float32 consumer's
    compute dtype (the channel mix of float32 / 16-bit activations casts W to it anyway):
    the Triton path then stores W, computed in float64, rounded to float32 by the same
    launch (no separate cast; its gradient is taken in float32 too); the reference path
    computes it in float64 and rounds it once, the same values.

    A stack of K layers at once (a Glow block's steps; one launch on the Triton path):
    ``lower``, ``upper`` (K, C, C), ``log_s``, ``sign_s``, ``rows`` (K, C), ``scale`` K*C
    values (e.g. K stacked (1, C, 1, 1) parameters) give W (K, C, C) and ``logdet``
    (K, n), layer k's as that layer alone would give them."""
    for name, t in (("lower", lower), ("upper", upper), ("log_s", log_s), ("sign_s", sign_s)):
        check_float_tensor(name, t)
    if log_s.dim() not in (1, 2):
        raise ValueError(f"log_s: expected a 1-D tensor (C,) or a stack (K, C), got shape "
                         f"{tuple(log_s.shape)}")
    vec = tuple(log_s.shape)
    mat = (*vec, vec[-1])
    c, k = vec[-1], (log_s.shape[0] if log_s.dim() == 2 else 1)
    for name, t in (("lower", lower), ("upper", upper)):
        if tuple(t.shape) != mat:
            raise ValueError(f"{name}: expected shape {mat} (log_s has shape {vec}), got "
                             f"{tuple(t.shape)}")
        check_same_device(name, t, "log_s", log_s)
    if tuple(sign_s.shape) != vec:
        raise ValueError(f"sign_s: expected shape {vec}, got {tuple(sign_s.shape)}")
    check_same_device("sign_s", sign_s, "log_s", log_s)
    if not isinstance(rows, Tensor) or rows.dtype not in (torch.int64, torch.int32):
        got = rows.dtype if isinstance(rows, Tensor) else type(rows).__name__
        raise TypeError(f"rows: expected an int64 or int32 tensor (the permutation's row "
                        f"gather), got {got}")
    if tuple(rows.shape) != vec:
        raise ValueError(f"rows: expected shape {vec}, got {tuple(rows.shape)}")
    check_same_device("rows", rows, "log_s", log_s)
    if scale is not None:
        check_float_tensor("scale", scale)
        check_same_device("scale", scale, "log_s", log_s)
        if scale.numel() != c * k or (k > 1 and scale.shape[0] != k):
            raise ValueError(f"scale: expected {c} values per layer, one per channel"
                             f"{f', for {k} layers' if k > 1 or log_s.dim() == 2 else ''}, "
                             f"got shape {tuple(scale.shape)}")
    if not isinstance(ld_dtype, torch.dtype) or ld_dtype not in FLOAT_DTYPES:
        raise TypeError(f"ld_dtype: expected a floating-point torch.dtype (float16, bfloat16, "
                        f"float32 or float64), got {ld_dtype!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected a sample count (an int >= 0), got {n!r}")
    if isinstance(ld_mult, bool) or not isinstance(ld_mult, int):
        raise TypeError(f"ld_mult: expected an int (e.g. H*W), got {ld_mult!r}")
    if w_dtype not in (None, torch.float64, torch.float32):
        raise TypeError(f"w_dtype: expected None, torch.float64 or torch.float32, got {w_dtype!r}")
    if use_triton(log_s):
        refuse_transforms("lu_weight_logdet", lower, upper, log_s, scale)
        return lu_weight_op(lower, upper, log_s, sign_s, rows, scale, n, ld_mult, ld_dtype,
                            w_dtype or torch.float64)
    return reference.lu_weight_logdet(rows, lower, upper, log_s, sign_s, scale, n=n,
                                      ld_mult=ld_mult, ld_dtype=ld_dtype, w_dtype=w_dtype)
