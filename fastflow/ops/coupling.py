"""Affine and additive coupling: the Triton path as torch.library custom ops with autograd,
the reference path as plain PyTorch autograd through ``fastflow.reference``.

The public functions (``affine_coupling``, ``additive_coupling``, ``coupling_backward``)
decide the backend once per call (``backend.use_triton``). Three custom ops, each one
kernel launch, launch the Triton kernels unconditionally (their backward too, so it uses
what forward decided, on any thread):

* ``fastflow::coupling_forward(x, h, ...) -> (y, logdet)``
* ``fastflow::coupling_inverse(y, h, ...) -> (x, logdet)``  (logdet of the inverse map)
* ``fastflow::coupling_backward(grad_out, grad_logdet, src, h, ..., reverse, from_output)``
  ``-> (grad_in, grad_h)``, where ``src`` is the op's input, or its output when
  ``from_output`` (the backward then rebuilds the input in registers: nothing but the output
  has to be kept for training).

``scale`` is "sigmoid", "exp", "atan" or, for additive coupling, "additive".

Higher derivatives: on the reference path everything is plain autograd, so double backward
(``create_graph=True``) and ``torch.func.grad`` / ``jvp`` work. On the Triton path the fused
backward is not itself differentiable: ``torch.func.grad``/``jvp`` are refused at the call
and ``create_graph=True`` at the first backward, each with a ``NotImplementedError`` that
says to use ``fastflow.use_backend("reference")``.
"""

from __future__ import annotations

from math import inf

import torch
from torch import Tensor

from .. import reference
from ..reference import LAYOUTS, SCALES, SHIFTS
from ..backend import (compute_dtype, device_guard, empty_output, memory_format_of,
                       refuse_double_backward, refuse_transforms, use_triton)
from ._checks import (FLOAT_DTYPES, check_bool, check_choice, check_float_tensor, check_positive,
                      check_same_device)


def _kernels():
    from ..kernels import coupling  # imported on first Triton use only

    return coupling


def _reference(x, h, scale, layout, shift, clamp, reverse, logdet=True):
    """The reference path: plain autograd (its output keeps x's memory format)."""
    if scale == "additive":
        return reference.additive_coupling(x, h, reverse=reverse, logdet=logdet)
    return reference.affine_coupling(x, h, scale=scale, layout=layout, shift=shift,
                                     clamp=clamp, reverse=reverse, logdet=logdet)


def _launch(x, h, scale, layout, shift, clamp, reverse):
    with device_guard(x):
        return _kernels().coupling_forward(x, h, scale=scale, layout=layout, shift=shift,
                                           clamp=clamp, reverse=reverse)


def _fake(x, h, scale, layout, shift, clamp):
    return empty_output(x), x.new_empty(x.shape[0], dtype=compute_dtype(x.dtype))


@torch.library.custom_op("fastflow::coupling_forward", mutates_args=())
def coupling_forward(x: Tensor, h: Tensor, scale: str, layout: str, shift: str,
                     clamp: float) -> tuple[Tensor, Tensor]:
    return _launch(x, h, scale, layout, shift, clamp, False)


@torch.library.custom_op("fastflow::coupling_inverse", mutates_args=())
def coupling_inverse(y: Tensor, h: Tensor, scale: str, layout: str, shift: str,
                     clamp: float) -> tuple[Tensor, Tensor]:
    return _launch(y, h, scale, layout, shift, clamp, True)


coupling_forward.register_fake(_fake)
coupling_inverse.register_fake(_fake)


@torch.library.custom_op("fastflow::coupling_backward", mutates_args=())
def coupling_backward_op(grad_out: Tensor, grad_logdet: Tensor, src: Tensor, h: Tensor,
                         scale: str, layout: str, shift: str, clamp: float, reverse: bool,
                         from_output: bool) -> tuple[Tensor, Tensor]:
    with device_guard(src):
        return _kernels().coupling_backward(grad_out, grad_logdet, src, h, scale=scale,
                                            layout=layout, shift=shift, clamp=clamp,
                                            reverse=reverse, from_output=from_output)


@coupling_backward_op.register_fake
def _(grad_out, grad_logdet, src, h, scale, layout, shift, clamp, reverse, from_output):
    return empty_output(src), empty_output(h)


def _setup_context(ctx, inputs, output):
    x, h, scale, layout, shift, clamp = inputs
    ctx.save_for_backward(x, h)
    ctx.params = (scale, layout, shift, clamp)


def _make_backward(reverse: bool):
    def backward(ctx, grad_out, grad_logdet):
        refuse_double_backward("affine_coupling")
        x, h = ctx.saved_tensors
        grad_x, grad_h = coupling_backward_op(grad_out, grad_logdet, x, h, *ctx.params,
                                              reverse, False)
        return grad_x, grad_h, None, None, None, None

    return backward


coupling_forward.register_autograd(_make_backward(False), setup_context=_setup_context)
coupling_inverse.register_autograd(_make_backward(True), setup_context=_setup_context)


def coupling_backward(grad_out: Tensor, grad_logdet: Tensor, src: Tensor, h: Tensor,
                      scale: str, layout: str, shift: str, clamp: float, reverse: bool,
                      from_output: bool):
    """The coupling's vector-Jacobian product, for code that drives backward itself
    (reversible training): ``(grad_in, grad_h)`` of the map ``reverse`` applied to the input,
    where ``src`` is that input, or the map's output when ``from_output`` (the input is then
    rebuilt from it). The backend is decided here, per call: the Triton path is one kernel
    launch; the reference path rebuilds the input if needed and differentiates the
    reference with ``torch.autograd.grad``."""
    if use_triton(src):
        return coupling_backward_op(grad_out, grad_logdet, src, h, scale, layout, shift,
                                    float(clamp), bool(reverse), bool(from_output))
    with torch.no_grad():
        inp = _reference(src, h, scale, layout, shift, clamp, not reverse)[0] if from_output else src
    with torch.enable_grad():
        a = inp.detach().requires_grad_(True)
        b = h.detach().requires_grad_(True)
        outs = [(o, g) for o, g in zip(_reference(a, b, scale, layout, shift, clamp, reverse),
                                       (grad_out, grad_logdet)) if o.requires_grad]
        grad_in, grad_h = torch.autograd.grad([o for o, _ in outs], (a, b),
                                              [g for _, g in outs], allow_unused=True)
    grad_in = torch.zeros_like(a) if grad_in is None else grad_in
    grad_h = torch.zeros_like(b) if grad_h is None else grad_h
    return (grad_in.contiguous(memory_format=memory_format_of(src)),
            grad_h.contiguous(memory_format=memory_format_of(h)))


# --------------------------------------------------------------------------------------
# Public functions (validation, then the op)
# --------------------------------------------------------------------------------------


def _check(x, h, h_channels_per_cb: int, what: str):
    # the common case first, in as few reads as it takes (a small CPU call's entry is a few
    # microseconds); anything else goes through the checks below, which name what is wrong
    if (isinstance(x, Tensor) and isinstance(h, Tensor) and x.dtype in FLOAT_DTYPES
            and h.dtype in FLOAT_DTYPES and (x.is_cpu and h.is_cpu or h.device == x.device)):
        shape = x.shape
        if len(shape) == 4 and shape[1] >= 2 and h.shape == (
                shape[0], h_channels_per_cb * (shape[1] // 2), shape[2], shape[3]):
            return
    check_float_tensor("x", x, ndim=4)
    check_float_tensor("h", h, ndim=4)
    check_same_device("h", h, "x", x)
    n, c, height, width = x.shape
    if c < 2:
        raise ValueError(f"x: expected at least 2 channels to split into two halves, got "
                         f"shape {tuple(x.shape)}")
    want = (n, h_channels_per_cb * (c // 2), height, width)
    if tuple(h.shape) != want:
        raise ValueError(f"h: expected shape {want} ({what} for C={c}), got {tuple(h.shape)}")


def _check_options(scale, layout, shift, clamp, reverse, logdet) -> float:
    check_choice("scale", scale, reference.SCALES)
    check_choice("layout", layout, reference.LAYOUTS)
    check_choice("shift", shift, reference.SHIFTS)
    check_bool("reverse", reverse)
    check_bool("logdet", logdet)
    return check_positive("clamp", clamp)


def _options(scale, layout, shift, clamp, reverse, logdet) -> float:
    """clamp as a float, after checking all six options (each error names its argument).
    The common case in one expression of module names (no call, no hashing, no attribute
    lookup: each costs about a percent of a small CPU call's forward+backward); anything
    else through the checks."""
    if (scale in SCALES and layout in LAYOUTS and shift in SHIFTS and type(reverse) is bool
            and type(logdet) is bool and type(clamp) is float and 0.0 < clamp < inf):
        return clamp
    return _check_options(scale, layout, shift, clamp, reverse, logdet)


def affine_coupling(x: Tensor, h: Tensor, *, scale: str = "sigmoid", layout: str = "halves",
                    shift: str = "before", clamp: float = 2.0, reverse: bool = False,
                    logdet: bool = True):
    """Affine coupling fused with its log-determinant: returns ``(y, logdet)``.

    ``x`` (N, C, H, W) passes ``x[:, :C - C//2]`` through and transforms the other C//2
    channels with ``h`` (N, 2*(C//2), H, W), the coupling network's output.

    * ``scale``: "sigmoid" (s = sigmoid(raw + 2), Glow), "exp" (s = exp(raw)) or "atan"
      (s = exp(clamp * 0.636 * atan(raw / clamp)), FrEIA's soft clamp).
    * ``layout``: "halves" (raw, t = h[:, :Cb], h[:, Cb:]) or "interleaved"
      (t, raw = h[:, 0::2], h[:, 1::2]).
    * ``shift``: "before" (yb = (xb + t) * s, Glow), "after" (yb = xb * s + t; RealNVP,
      FrEIA, nflows) or "negated" (yb = (xb - t) * s, normflows).
    * ``reverse=True`` maps y back to x and returns the inverse map's logdet, -sum(log s).
    * ``logdet=False`` returns ``(y, None)``: for sampling, which drops the log-det; the
      reference path then computes none (the Triton kernel's costs nothing extra).

    logdet has shape (N,), float32 (float64 for float64 input). ``clamp`` must be a finite
    positive number and ``reverse`` a bool. See the module docstring for double backward
    and ``torch.func`` (reference path: supported; Triton path: refused with a clear error)."""
    _check(x, h, 2, "2 * (C // 2) coupling parameters")
    clamp = _options(scale, layout, shift, clamp, reverse, logdet)
    if use_triton(x):
        refuse_transforms("affine_coupling", x, h)
        op = coupling_inverse if reverse else coupling_forward
        y, ld = op(x, h, scale, layout, shift, clamp)
        return y, (ld if logdet else None)
    return reference.affine_coupling(x, h, scale=scale, layout=layout, shift=shift, clamp=clamp,
                                     reverse=reverse, logdet=logdet)


def additive_coupling(x: Tensor, h: Tensor, *, reverse: bool = False, logdet: bool = True):
    """Additive coupling ``yb = xb + h`` (h has C//2 channels); logdet is zeros (N,)
    (``logdet=False``: None, as ``affine_coupling``)."""
    _check(x, h, 1, "C // 2 shifts")
    check_bool("reverse", reverse)
    check_bool("logdet", logdet)
    if use_triton(x):
        refuse_transforms("additive_coupling", x, h)
        op = coupling_inverse if reverse else coupling_forward
        y, ld = op(x, h, "additive", "halves", "before", 2.0)
        return y, (ld if logdet else None)
    return reference.additive_coupling(x, h, reverse=reverse, logdet=logdet)
