"""fastflow: Triton kernels for the hot layers of normalizing flows (Glow) and VAEs.

Importing fastflow touches no GPU and compiles no kernel; see ``fastflow.backend`` for how
each call chooses between the Triton kernels and the plain PyTorch reference.
"""

from .backend import current_mode, use_backend
from .functional import additive_coupling, affine_coupling
from .functional import actnorm_invconv, channel_mix
from .functional import reparameterize_kl
from .layers import AffineCoupling
from .layers import ActNorm, FlowStep, InvConv2d, InvConv2dLU
from .layers import GaussianReparam
from .glow import Glow, bits_per_dim
from .layers import ReversibleSequence
from .ops.tarflow import tarflow_head
from .tarflow import TarFlow
from .patch import PatchReport, patch

__version__ = "0.1.0"

__all__ = [
    "use_backend", "current_mode",
    "affine_coupling", "additive_coupling",
    "reparameterize_kl", "GaussianReparam",
    "AffineCoupling", "Glow", "bits_per_dim", "ReversibleSequence",
    "channel_mix", "actnorm_invconv", "ActNorm", "InvConv2dLU", "InvConv2d", "FlowStep",
    "patch", "PatchReport",
    "TarFlow", "tarflow_head",
]
