"""The public functional API: autograd-aware ops, Triton or reference per call."""

from .ops.coupling import additive_coupling, affine_coupling
from .ops.gaussian import reparameterize_kl

__all__ = ["affine_coupling", "additive_coupling", "reparameterize_kl"]
