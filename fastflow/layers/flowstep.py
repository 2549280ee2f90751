"""One Glow step: ActNorm and the invertible 1x1 convolution in one fused kernel, then the
affine coupling."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

from ..ops.channel_mix import channel_mix
from ..ops._checks import check_nchw
from .channel_mix import ActNorm, InvConv2d, InvConv2dLU
from .coupling import AffineCoupling


def _hooked(m: nn.Module) -> bool:
    """Any module hook (forward or backward, the module's own or a global one) that calling
    ``m`` would run and a fused pass, which does not call it, would skip."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks or _module._global_backward_hooks
                or _module._global_backward_pre_hooks)


class FlowStep(nn.Module):
    """``forward(x) -> (y, logdet)``, ``reverse(y) -> x``, ``inverse(y) -> (x, logdet)``.

    Submodule names (``actnorm``, ``invconv``, ``coupling``) follow rosinality/glow-pytorch.
    Applying the three modules one after the other gives the same result; the step runs
    the first two as one pass over memory, and the whole ActNorm + 1x1 conv log-det comes
    with the matrix (``invconv.matrix_and_logdet``: with the LU layer, W and the log-det
    are one launch).

    The fused pass reads ``actnorm``'s and ``invconv``'s tensors directly. It is taken only
    when they are exactly the stock ``ActNorm`` and ``InvConv2dLU``/``InvConv2d`` classes and
    no forward or backward hook is registered on them (or globally); otherwise the step calls
    ``self.actnorm``, ``self.invconv`` (their ``forward``, or ``inverse`` in reverse) and
    ``self.coupling`` one after the other, so hooks fire and a subclass assigned there is
    used. ``reverse`` (sampling) calls their ``reverse``, which computes no log-det."""

    def __init__(self, in_channel: int, filter_size: int = 512, affine: bool = True,
                 conv_lu: bool = True):
        super().__init__()
        self.in_channel = in_channel
        self.actnorm = ActNorm(in_channel)
        self.invconv = InvConv2dLU(in_channel) if conv_lu else InvConv2d(in_channel)
        self.coupling = AffineCoupling(in_channel, filter_size=filter_size, affine=affine)

    def _fusable(self, hooks: bool) -> bool:
        an, inv = self.actnorm, self.invconv
        if type(an) is not ActNorm or type(inv) not in (InvConv2dLU, InvConv2d):
            return False
        return not (hooks and (_hooked(an) or _hooked(inv)))

    def forward(self, x):
        check_nchw("x", x, self.in_channel)
        if not self._fusable(hooks=True):
            out, logdet = self.actnorm(x)
            out, ld = self.invconv(out)
            out, ld_coupling = self.coupling(out)
            return out, logdet + ld + ld_coupling
        self.actnorm.maybe_initialize(x)
        an = self.actnorm
        # with the LU layer on the Triton path, W comes in x's compute dtype from the one
        # lu_weight launch: the mix casts nothing
        w, logdet = self.invconv.matrix_and_logdet(x, an.scale, for_mix=True)
        out = channel_mix(x, w, loc=an.loc, scale=an.scale)
        out, ld_coupling = self.coupling(out)
        return out, logdet + ld_coupling

    @staticmethod
    def inverse_matrices(steps, dtype: torch.dtype):
        """W^-1 of each step in ``steps``, in ``dtype``, from one batched assembly (float64
        triangular solves, as each step's own, then one cast): a list to pass to ``reverse``
        as ``w_inv``, or None when the steps do not all take the fused path with an
        ``InvConv2dLU`` of one channel count (each then assembles its own). Sampling a
        Glow block costs one assembly instead of one per step (on a GPU, a dozen launches
        per block rather than per step)."""
        steps = list(steps)
        if not steps or not all(type(s) is FlowStep and type(s.invconv) is InvConv2dLU
                                and s._fusable(hooks=False) for s in steps):
            return None
        if len({s.in_channel for s in steps}) != 1:
            return None
        return InvConv2dLU.stacked_inverses([s.invconv for s in steps], dtype)

    def _inverse(self, y, logdet: bool, w_inv=None):
        check_nchw("y", y, self.in_channel)
        if logdet:
            x, ld_coupling = self.coupling.inverse(y)
        else:  # sampling: no log-det anywhere (the coupling op computes none)
            x, ld_coupling = self.coupling.reverse(y), None
        if not self._fusable(hooks=False):
            if not logdet:
                return self.actnorm.reverse(self.invconv.reverse(x)), None
            x, ld = self.invconv.inverse(x)
            x, ld_an = self.actnorm.inverse(x)
            return x, ld + ld_an + ld_coupling
        an = self.actnorm
        if logdet:
            w_inv, ld = self.invconv.matrix_and_logdet(x, an.scale, inverse=True)
        elif w_inv is None:  # sampling: the matrix only
            w_inv, ld = self.invconv.matrix(inverse=True), None
        else:  # sampling with the matrix assembled for the whole block
            ld = None
        x = channel_mix(x, w_inv, loc=an.loc, scale=an.scale, reverse=True)
        return x, (ld + ld_coupling if logdet else None)

    def inverse(self, y):
        return self._inverse(y, True)

    def reverse(self, y, *, w_inv=None):
        """x alone (no log-det is computed). ``w_inv``: this step's W^-1 from
        ``FlowStep.inverse_matrices`` (used on the fused path only)."""
        return self._inverse(y, False, w_inv)[0]
