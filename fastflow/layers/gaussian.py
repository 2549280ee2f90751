"""The VAE sampling layer: reparameterisation fused with the KL to the standard normal."""

from __future__ import annotations

from torch import nn

from ..backend import memory_format_of
from ..ops._checks import check_bool
from ..ops.gaussian import reparameterize_kl
from ..reference import REDUCTIONS


class GaussianReparam(nn.Module):
    """``forward(mu, logvar) -> (z, kl)``: z = mu + exp(logvar / 2) * eps with fresh
    standard normal noise (never stored; regenerated in backward) and the per-sample
    KL(N(mu, exp(logvar)) || N(0, I)), shape (N,) for ``reduction="none"``, a scalar for
    "sum" and "mean". In eval mode with ``sample_in_eval=False`` it returns ``z = mu``
    (the posterior mean) and still the KL."""

    def __init__(self, reduction: str = "none", sample_in_eval: bool = True):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.sample_in_eval = check_bool("sample_in_eval", sample_in_eval)

    def forward(self, mu, logvar, generator=None):
        if not self.training and not self.sample_in_eval:
            _, kl = reparameterize_kl(mu, logvar, mu.new_zeros(()).expand(mu.shape),
                                      reduction=self.reduction)
            # mu itself, not the op's mu + exp(logvar / 2) * 0: NaN where exp overflows
            return mu.clone(memory_format=memory_format_of(mu)), kl
        return reparameterize_kl(mu, logvar, reduction=self.reduction, generator=generator)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, sample_in_eval={self.sample_in_eval}"
