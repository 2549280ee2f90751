"""One Glow step: ActNorm and the invertible 1x1 convolution in one fused kernel, then the
affine coupling."""

from __future__ import annotations

from torch import nn

from ..ops.channel_mix import channel_mix
from ..ops._checks import check_nchw
from .channel_mix import ActNorm, InvConv2d, InvConv2dLU
from .coupling import AffineCoupling


class FlowStep(nn.Module):
    """``forward(x) -> (y, logdet)``, ``reverse(y) -> x``, ``inverse(y) -> (x, logdet)``.

    Submodule names (``actnorm``, ``invconv``, ``coupling``) follow rosinality/glow-pytorch.
    Applying the three modules one after the other gives the same result; the step just
    runs the first two as one pass over memory, and the whole ActNorm + 1x1 conv log-det
    comes with the matrix (``invconv.matrix_and_logdet``: in training with the LU layer,
    W and the log-det are one launch)."""

    def __init__(self, in_channel: int, filter_size: int = 512, affine: bool = True,
                 conv_lu: bool = True):
        super().__init__()
        self.in_channel = in_channel
        self.actnorm = ActNorm(in_channel)
        self.invconv = InvConv2dLU(in_channel) if conv_lu else InvConv2d(in_channel)
        self.coupling = AffineCoupling(in_channel, filter_size=filter_size, affine=affine)

    def forward(self, x):
        check_nchw("x", x, self.in_channel)
        self.actnorm.maybe_initialize(x)
        an = self.actnorm
        w, logdet = self.invconv.matrix_and_logdet(x, an.scale)
        out = channel_mix(x, w, loc=an.loc, scale=an.scale)
        out, ld_coupling = self.coupling(out)
        return out, logdet + ld_coupling

    def inverse(self, y):
        check_nchw("y", y, self.in_channel)
        x, ld_coupling = self.coupling.inverse(y)
        an = self.actnorm
        w_inv, logdet = self.invconv.matrix_and_logdet(x, an.scale, inverse=True)
        x = channel_mix(x, w_inv, loc=an.loc, scale=an.scale, reverse=True)
        return x, logdet + ld_coupling

    def reverse(self, y):
        return self.inverse(y)[0]
