"""``nn.Module`` drop-ins; constructor arguments follow rosinality/glow-pytorch."""

from .coupling import AffineCoupling, ZeroConv2d
from .gaussian import GaussianReparam

__all__ = ["AffineCoupling", "ZeroConv2d", "GaussianReparam"]
