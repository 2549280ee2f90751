"""Gaussian reparameterisation + KL as torch.library custom ops with autograd.

* ``fastflow::reparam_kl(mu, logvar, eps, seed, reduction) -> (z, kl)``
* ``fastflow::reparam_kl_backward(grad_z, grad_kl, mu, logvar, eps, seed, reduction)``
  ``-> (grad_mu, grad_logvar)``

Each is one kernel launch on the Triton backend (plus the fixed-order sum of the KL
partials). With ``eps=None`` the noise is a pure function of ``seed`` and the element's
position, so only mu and logvar are saved for backward and the noise is regenerated there:

* Seed: a 64-bit integer in [2**62, 2**63) drawn per call with one ``torch.randint`` on
  mu's device from the given ``generator``, else from that device's default generator
  (``torch.manual_seed`` seeds them all, so a run is reproduced). It stays on the device as
  a one-element int64 tensor that the kernels read: no host-device synchronisation, and
  CUDA-graph friendly. A ``generator`` on another device than mu (say a CPU generator for
  CUDA tensors) is honoured too; its seed is then copied to mu's device.
* Triton backend: Philox in the kernel (see ``fastflow/kernels/gaussian.py``).
* Reference backend: plain PyTorch autograd through ``fastflow.reference`` (no custom
  op): the noise is ``torch.randn`` from ``generator`` (default: the default generator of
  mu's device) and autograd keeps what eager PyTorch keeps (the noise included). The two
  backends give different (each reproducible) noise for the same generator state.

The public ``reparameterize_kl`` decides the backend once per call; the custom ops above
launch the kernels unconditionally, so backward regenerates the noise with the generator
forward used, on any thread, whatever ``use_backend`` block is active then.
Higher derivatives: reference path supported (plain autograd); Triton path: ``torch.func``
transforms are refused at the call and ``create_graph=True`` at the first backward, with a
``NotImplementedError`` naming ``fastflow.use_backend("reference")``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..reference import REDUCTIONS
from ..backend import (compute_dtype, device_guard, empty_output, memory_format_of,
                       refuse_double_backward, refuse_transforms, use_triton)
from ._checks import FLOAT_DTYPES, check_choice, check_float_tensor, check_same_device

SEED_BITS = 62  # seeds lie in [2**62, 2**63): always a 64-bit kernel argument


def _kernels():
    from ..kernels import gaussian  # imported on first Triton use only

    return gaussian


def draw_seed(device, generator: Optional[torch.Generator] = None) -> Tensor:
    """A fresh 64-bit seed as a one-element int64 tensor on ``device``, drawn from
    ``generator`` (default: the default generator of ``device``)."""
    device = torch.device(device)
    where = generator.device if generator is not None else device
    seed = torch.randint(2**SEED_BITS, 2**63 - 1, (1,), generator=generator, device=where,
                         dtype=torch.int64)
    return seed if seed.device == device else seed.to(device)


def _kl_fake(mu, reduction):
    shape = (mu.shape[0],) if reduction == "none" else ()
    return mu.new_empty(shape, dtype=compute_dtype(mu.dtype))


@torch.library.custom_op("fastflow::reparam_kl", mutates_args=())
def reparam_kl(mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: Optional[Tensor],
               reduction: str) -> tuple[Tensor, Tensor]:
    with device_guard(mu):
        z, kl = _kernels().reparam_kl_forward(mu, logvar, eps, seed, reduction)
    return z.contiguous(memory_format=memory_format_of(mu)), kl


@reparam_kl.register_fake
def _(mu, logvar, eps, seed, reduction):
    return empty_output(mu), _kl_fake(mu, reduction)


@torch.library.custom_op("fastflow::reparam_kl_backward", mutates_args=())
def reparam_kl_backward(grad_z: Tensor, grad_kl: Tensor, mu: Tensor, logvar: Tensor,
                        eps: Optional[Tensor], seed: Optional[Tensor],
                        reduction: str) -> tuple[Tensor, Tensor]:
    with device_guard(mu):
        grad_mu, grad_lv = _kernels().reparam_kl_backward(grad_z, grad_kl, mu, logvar, eps,
                                                          seed, reduction)
    return (grad_mu.contiguous(memory_format=memory_format_of(mu)),
            grad_lv.contiguous(memory_format=memory_format_of(logvar)))


@reparam_kl_backward.register_fake
def _(grad_z, grad_kl, mu, logvar, eps, seed, reduction):
    return empty_output(mu), empty_output(logvar)


def _setup_context(ctx, inputs, output):
    mu, logvar, eps, seed, reduction = inputs
    ctx.save_for_backward(mu, logvar, eps)  # never the noise when eps is None
    ctx.seed = seed  # 8 bytes: the noise is regenerated from it
    ctx.reduction = reduction


def _backward(ctx, grad_z, grad_kl):
    refuse_double_backward("reparameterize_kl")
    mu, logvar, eps = ctx.saved_tensors
    grad_mu, grad_lv = reparam_kl_backward(grad_z, grad_kl, mu, logvar, eps, ctx.seed,
                                           ctx.reduction)
    grad_eps = None
    if eps is not None and ctx.needs_input_grad[2]:
        cd = compute_dtype(mu.dtype)
        grad_eps = (grad_z.to(cd) * torch.exp(0.5 * logvar.to(cd))).to(eps.dtype)
    return grad_mu, grad_lv, grad_eps, None, None


reparam_kl.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# Public function (validation, then the op)
# --------------------------------------------------------------------------------------


def _check(mu, logvar, eps, reduction, generator):
    # the common case first, in as few reads as it takes (a small CPU call's entry is a few
    # microseconds); anything else goes through the checks below, which name what is wrong
    if (eps is None and generator is None and isinstance(mu, Tensor)
            and isinstance(logvar, Tensor) and mu.dtype in FLOAT_DTYPES
            and logvar.dtype in FLOAT_DTYPES and (mu.is_cpu and logvar.is_cpu
                                                  or logvar.device == mu.device)
            and reduction in REDUCTIONS):
        shape = mu.shape
        if shape and logvar.shape == shape:  # at least 1-D, logvar of mu's shape
            return
    check_float_tensor("mu", mu, min_ndim=1)
    check_float_tensor("logvar", logvar)
    check_same_device("logvar", logvar, "mu", mu)
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar: expected the shape of mu {tuple(mu.shape)}, got "
                         f"{tuple(logvar.shape)}")
    if eps is not None:
        check_float_tensor("eps", eps)
        check_same_device("eps", eps, "mu", mu)
        if eps.shape != mu.shape:
            raise ValueError(f"eps: expected the shape of mu {tuple(mu.shape)}, got "
                             f"{tuple(eps.shape)}")
    check_choice("reduction", reduction, reference.REDUCTIONS)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got "
                        f"{type(generator).__name__}")


def reparameterize_kl(mu: Tensor, logvar: Tensor, eps: Optional[Tensor] = None, *,
                      reduction: str = "none", generator: Optional[torch.Generator] = None):
    """Reparameterised sample and KL to N(0, I) in one pass: returns ``(z, kl)``.

    ``z = mu + exp(logvar / 2) * eps`` (mu's shape and dtype) and
    ``kl = 0.5 * sum(exp(logvar) + mu**2 - 1 - logvar)`` over all but the first dimension:
    shape (N,) for ``reduction="none"``, a scalar for "sum" and "mean" (over the batch);
    float32, float64 for float64 input.

    ``eps=None`` draws standard normal noise from a counter-based generator seeded from
    ``generator`` (default: the default generator of mu's device, so ``torch.manual_seed``
    reproduces it); on the Triton path it is regenerated in backward, never stored (the
    reference path is plain autograd and keeps it, as eager PyTorch does). An explicit
    ``eps`` (mu's shape) is used as given."""
    _check(mu, logvar, eps, reduction, generator)
    if use_triton(mu):
        refuse_transforms("reparameterize_kl", mu, logvar, eps)
        seed = draw_seed(mu.device, generator) if eps is None else None
        return reparam_kl(mu, logvar, eps, seed, reduction)
    z, kl = reference.reparameterize_kl(mu, logvar, eps, reduction=reduction, generator=generator)
    if mu.dim() != 4:
        return (z if z.is_contiguous() else z.contiguous()), kl
    fmt = memory_format_of(mu)
    return (z if z.is_contiguous(memory_format=fmt) else z.contiguous(memory_format=fmt)), kl
