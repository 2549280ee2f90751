"""The public functional API: autograd-aware ops, Triton or reference per call."""

from .ops.channel_mix import actnorm_invconv, channel_mix
from .ops.coupling import additive_coupling, affine_coupling
from .ops.gaussian import reparameterize_kl

__all__ = ["channel_mix", "actnorm_invconv", "affine_coupling", "additive_coupling", "reparameterize_kl"]
