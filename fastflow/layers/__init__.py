"""``nn.Module`` drop-ins; constructor arguments follow rosinality/glow-pytorch."""

from .channel_mix import ActNorm, InvConv2d, InvConv2dLU
from .coupling import AffineCoupling, ZeroConv2d
from .flowstep import FlowStep
from .gaussian import GaussianReparam
from .reversible import ReversibleSequence

__all__ = ["ActNorm", "InvConv2dLU", "InvConv2d", "FlowStep", "AffineCoupling", "ZeroConv2d", "GaussianReparam",
           "ReversibleSequence"]
