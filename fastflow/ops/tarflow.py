"""The TarFlow affine head as torch.library custom ops (Triton path) and the sampler's
in-place updates.

The backend is chosen once per call, in the public functions:

* Triton: ``fastflow::tarflow_head_forward(x, h, clamp, order) -> (z, logdet)`` and
  ``fastflow::tarflow_head_inverse(z, h, clamp, order) -> (x, logdet)`` (the inverse map's
  log-det), each one kernel launch; their backward ``fastflow::tarflow_head_backward`` is
  one kernel launch too.
* Reference: ``fastflow.reference.tarflow_head`` under plain PyTorch autograd.

``clamp`` 0.0 means no soft clamp. The sampler's updates (``head_step``, ``jacobi_update``)
are not differentiable; they write into preallocated buffers and never read a device value
on the host.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference
from ..backend import (compute_dtype, device_guard, refuse_double_backward, refuse_transforms,
                       use_triton)
from ._checks import check_bool, check_choice, check_float_tensor, check_same_device


def _kernels():
    from ..kernels import tarflow  # imported on first Triton use only

    return tarflow


def _fake(x, h, clamp, order):
    return torch.empty_like(x, memory_format=torch.contiguous_format), \
        x.new_empty(x.shape[0], dtype=compute_dtype(x.dtype))


@torch.library.custom_op("fastflow::tarflow_head_forward", mutates_args=())
def tarflow_head_forward(x: Tensor, h: Tensor, clamp: float, order: str) -> tuple[Tensor, Tensor]:
    with device_guard(x):
        return _kernels().head_forward(x, h, clamp=clamp, order=order, reverse=False)


@torch.library.custom_op("fastflow::tarflow_head_inverse", mutates_args=())
def tarflow_head_inverse(z: Tensor, h: Tensor, clamp: float, order: str) -> tuple[Tensor, Tensor]:
    with device_guard(z):
        return _kernels().head_forward(z, h, clamp=clamp, order=order, reverse=True)


tarflow_head_forward.register_fake(_fake)
tarflow_head_inverse.register_fake(_fake)


@torch.library.custom_op("fastflow::tarflow_head_backward", mutates_args=())
def tarflow_head_backward(grad_out: Tensor, grad_logdet: Tensor, src: Tensor, h: Tensor,
                          clamp: float, order: str, reverse: bool) -> tuple[Tensor, Tensor]:
    with device_guard(src):
        return _kernels().head_backward(grad_out, grad_logdet, src, h, clamp=clamp, order=order,
                                        reverse=reverse)


@tarflow_head_backward.register_fake
def _(grad_out, grad_logdet, src, h, clamp, order, reverse):
    return torch.empty_like(src, memory_format=torch.contiguous_format), \
        torch.empty_like(h, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    src, h, clamp, order = inputs
    ctx.save_for_backward(src, h)
    ctx.params = (clamp, order)


def _make_backward(reverse: bool):
    def backward(ctx, grad_out, grad_logdet):
        refuse_double_backward("tarflow_head")
        src, h = ctx.saved_tensors
        grad_src, grad_h = tarflow_head_backward(grad_out, grad_logdet, src, h, *ctx.params,
                                                 reverse)
        return grad_src, grad_h, None, None

    return backward


tarflow_head_forward.register_autograd(_make_backward(False), setup_context=_setup_context)
tarflow_head_inverse.register_autograd(_make_backward(True), setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# Public functions (validation, then the op)
# --------------------------------------------------------------------------------------


def _check_clamp(clamp):
    """None (no soft clamp: 0.0 for the kernels) or a finite number > 0 (inf would make
    ``inf * tanh(a / inf)`` NaN; a bool is not a number here)."""
    if clamp is None:
        return 0.0
    if isinstance(clamp, bool) or not isinstance(clamp, (int, float)):
        raise TypeError(f"clamp: expected None or a finite positive number, got {clamp!r} "
                        f"({type(clamp).__name__})")
    if not (math.isfinite(clamp) and clamp > 0):
        raise ValueError(f"clamp: expected None or a finite positive number, got {clamp!r}")
    return float(clamp)


def _check_tokens(name, x, h, h_rows):
    check_float_tensor(name, x, ndim=3)
    check_float_tensor("h", h, ndim=3)
    check_same_device("h", h, name, x)
    n, t, d = x.shape
    want = (h_rows * n, t, 2 * d)
    if tuple(h.shape) != want:
        raise ValueError(f"h: expected shape {want} (the transformer's (a, b) output for "
                         f"{name} of shape {tuple(x.shape)}), got {tuple(h.shape)}")


def tarflow_head(x: Tensor, h: Tensor, *, clamp: float | None = None, order: str = "same",
                 reverse: bool = False):
    """TarFlow's affine head fused with its log-determinant: returns ``(out, logdet)``.

    ``x`` (N, T, D) tokens in the block's order; ``h`` (N, T, 2D) the causal transformer's
    output. Token t uses ``h[:, t - 1]`` (token 0: a = b = 0), ``a = h[..., :D]``
    (soft-clamped to ``clamp * tanh(a / clamp)`` when ``clamp`` is given), ``b = h[..., D:]``;
    ``z = (x - b) * exp(-a)`` is written in ``order`` ("same", or "reversed": the next
    block's token reversal, done by the store's indexing) and ``logdet = -sum(a)`` (N,).

    ``reverse=True``: ``x`` holds z laid out in ``order``; returns the block's tokens
    ``z * exp(a) + b`` in block order and the inverse map's logdet ``+sum(a)``. With ``h``
    computed from the true tokens this is the exact inverse; with ``h`` of a guess it is
    one Jacobi update of all tokens.

    logdet is float32 (float64 for float64 input); outputs have ``x``'s dtype."""
    _check_tokens("x", x, h, 1)
    check_choice("order", order, reference.TARFLOW_ORDERS)
    check_bool("reverse", reverse)  # reverse="False" took the inverse
    c = _check_clamp(clamp)
    if use_triton(x):
        refuse_transforms("tarflow_head", x, h)
        op = tarflow_head_inverse if reverse else tarflow_head_forward
        return op(x, h, c, order)
    return reference.tarflow_head(x, h, clamp=clamp, order=order, reverse=reverse)


# --------------------------------------------------------------------------------------
# Sampler updates: in place, static shapes, no host reads of device values
# --------------------------------------------------------------------------------------


class HeadSampler:
    """The head's inverse for one block's sampler, bound to its buffers.

    ``z`` (N, T, D) laid out in ``order``; ``x`` (N, T, D) the block's tokens (written);
    ``inp`` (B, D) the next transformer step's input (B = 2N with guidance); ``pos`` (1,)
    int64 on the device. The backend is chosen once, here."""

    def __init__(self, z, x, inp, pos, *, clamp=None, order="same", guidance=0.0,
                 guided=False):
        check_choice("order", order, reference.TARFLOW_ORDERS)
        self.clamp = _check_clamp(clamp) or None
        self.z, self.x, self.inp, self.pos = z, x, inp, pos
        self.order, self.guidance, self.guided = order, float(guidance), bool(guided)
        self.triton = use_triton(z)
        if self.triton:
            self.coef = _kernels().coefficients(self.clamp, self.guidance, z.dtype, z.device)

    def first(self):
        """Token 0: x_0 = z_0."""
        self._step(None, True)

    def step(self, h_last):
        """Token pos + 1 from the transformer's output ``h_last`` (B, 2D) at token pos."""
        self._step(h_last, False)

    def _step(self, h_last, first):
        if self.triton:
            with device_guard(self.z):
                _kernels().head_step(self.z, h_last, self.pos, self.x, self.inp, self.coef,
                                     first=first, clamp=self.clamp, order=self.order,
                                     guided=self.guided)
            return
        tok = self.pos * 0 if first else self.pos + 1
        hl = None if first else h_last.unsqueeze(1)
        xt = reference.tarflow_token_inverse(self.z, hl, tok, clamp=self.clamp, order=self.order,
                                             guidance=self.guidance, guided=self.guided)
        self.x.index_copy_(1, tok, xt)
        n = self.z.shape[0]
        self.inp.view(-1, n, self.inp.shape[-1]).copy_(xt.view(1, n, -1).expand(
            self.inp.shape[0] // n, n, -1))

    def jacobi(self, h, out):
        """One Jacobi update of all tokens from ``h`` (B, T, 2D), the transformer's output
        for the current iterate held in ``out`` (B, T, D; both halves written when guided):
        ``out`` is overwritten in place; returns the largest change (0-d device tensor; +inf
        where the update is NaN anywhere: a diverged iterate never reads as converged)."""
        if self.triton:
            with device_guard(self.z):
                return _kernels().head_forward(self.z, h, clamp=self.clamp, order=self.order,
                                               reverse=True, guidance=self.guidance,
                                               guided=self.guided, out=out, delta=True,
                                               coef=self.coef)[2]
        new, _ = reference.tarflow_head(self.z, h, clamp=self.clamp, order=self.order,
                                        reverse=True, guidance=self.guidance, guided=self.guided)
        n = self.z.shape[0]
        view = out.view(-1, n, *out.shape[1:])
        # NaN (a diverged iterate) reported as +inf, as the kernel does: never "converged"
        change = (view[0] - new).abs().amax().nan_to_num(nan=math.inf, posinf=math.inf)
        view.copy_(new.unsqueeze(0).expand_as(view))
        return change
