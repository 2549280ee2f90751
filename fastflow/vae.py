"""A small convolutional VAE for (C, S, S) images in [0, 1] (the Bernoulli likelihood refuses
others on CPU tensors), built on ``GaussianReparam``.

Encoder: conv3x3 -> ReLU -> conv3x3 stride 2 -> ReLU -> linear to (mu, logvar).
Decoder: linear -> ReLU -> transposed conv stride 2 -> ReLU -> conv3x3 to per-pixel logits
(Bernoulli likelihood) or means (Gaussian likelihood with one learned log-scale).

The ELBO per sample is ``-(recon + kl)`` with ``recon = -log p(x | z)`` summed over pixels
and ``kl = KL(q(z | x) || N(0, I))``; the fused op gives z and kl in one pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .backend import compute_dtype
from .layers.gaussian import GaussianReparam
from .ops._checks import assert_on_device, check_float_tensor, check_module_device, first_parameter

LIKELIHOODS = ("bernoulli", "gaussian")


class ConvVAE(nn.Module):
    """``forward(x) -> (out, kl, mu, logvar, z)``; ``loss(x)`` for training, ``elbo(x)``
    per sample, ``sample(n)`` and ``reconstruct(x)`` for pictures."""

    def __init__(self, latent: int = 8, channels: int = 1, size: int = 8, hidden: int = 32,
                 likelihood: str = "bernoulli"):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood: expected one of {LIKELIHOODS}, got {likelihood!r}")
        for name, v in (("latent", latent), ("channels", channels), ("size", size),
                        ("hidden", hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if size < 2 or size % 2:
            raise ValueError(f"size: expected an even image size >= 2, got {size}")
        self.latent, self.channels, self.size, self.likelihood = latent, channels, size, likelihood
        half = size // 2
        flat = 2 * hidden * half * half
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, 2 * hidden, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(flat, 2 * latent))
        self.decoder = nn.Sequential(
            nn.Linear(latent, flat), nn.ReLU(),
            nn.Unflatten(1, (2 * hidden, half, half)),
            nn.ConvTranspose2d(2 * hidden, hidden, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, channels, 3, padding=1))
        self.reparam = GaussianReparam()
        self.log_scale = nn.Parameter(torch.zeros(())) if likelihood == "gaussian" else None

    def _check(self, x):
        want = (self.channels, self.size, self.size)
        check_float_tensor("x", x)  # (uint8 images: scale them to [0, 1] floats first)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x: expected shape (N, {want[0]}, {want[1]}, {want[2]}), got "
                             f"{tuple(x.shape)}")
        check_module_device("x", x, first_parameter(self))

    def encode(self, x):
        self._check(x)
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z):
        """Logits (Bernoulli) or means (Gaussian) of p(x | z), shaped like the images."""
        return self.decoder(z)

    def forward(self, x, generator=None):
        mu, logvar = self.encode(x)
        z, kl = self.reparam(mu, logvar, generator=generator)
        return self.decode(z), kl, mu, logvar, z

    def _check_unit_interval(self, x):
        """The Bernoulli likelihood is defined for pixels in [0, 1]; anything else (say images
        in [0, 255]) gave a negative -log p(x | z) silently. Read on CPU tensors; off the
        CPU reading would wait for the device every step, so it is asserted there."""
        expected = "x: expected pixels in [0, 1] for the Bernoulli likelihood"
        if not x.numel():
            return
        x = x.detach()
        if x.device.type != "cpu":
            assert_on_device(((x >= 0) & (x <= 1)).all(), expected)  # NaN fails too
            return
        lo, hi = torch.aminmax(x)
        lo, hi = float(lo), float(hi)
        if not (lo >= 0.0 and hi <= 1.0):  # NaN fails too
            raise ValueError(f"{expected}, got values from {lo} to {hi}")

    def recon_nll(self, out, x):
        """-log p(x | z) per sample, summed over pixels: float32 (float64 for float64), as
        the KL, whatever the model's dtype (a bfloat16 model summed it in bfloat16)."""
        cd = torch.promote_types(compute_dtype(out.dtype), compute_dtype(x.dtype))
        out, x = out.to(cd), x.to(cd)
        if self.likelihood == "bernoulli":
            self._check_unit_interval(x)
            nll = F.binary_cross_entropy_with_logits(out, x, reduction="none")
        else:
            log_scale = self.log_scale.to(cd)
            var = torch.exp(2 * log_scale)
            nll = 0.5 * (x - out) ** 2 / var + log_scale + 0.5 * math.log(2 * math.pi)
        return nll.flatten(1).sum(dim=1)

    def terms(self, x, generator=None):
        """(recon, kl) per sample: the two terms of -ELBO."""
        out, kl, *_ = self(x, generator=generator)
        recon = self.recon_nll(out, x)
        # recon's dtype, not the decoder's: under autocast (or for a half-precision model) the
        # decoder gives bfloat16/float16 while the likelihood (and so the loss) is float32
        return recon, kl.to(recon.dtype)

    def elbo(self, x, generator=None):
        """The evidence lower bound per sample (N,) (one noise draw)."""
        recon, kl = self.terms(x, generator)
        return -(recon + kl)

    def loss(self, x, generator=None):
        """Training objective: a dict with ``loss`` (mean -ELBO, to minimise) and the batch
        means of ``recon`` and ``kl``."""
        recon, kl = self.terms(x, generator)
        recon, kl = recon.mean(), kl.mean()
        return {"loss": recon + kl, "recon": recon, "kl": kl}

    def mean_image(self, out):
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out.clamp(0.0, 1.0)

    @torch.no_grad()
    def sample(self, n: int, generator=None):
        """``n`` images decoded from z ~ N(0, I) (pixel means in [0, 1]), in the model's
        dtype (under autocast too, where the decoder gives bfloat16/float16)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n: expected a positive integer, got {n!r}")
        p = next(self.parameters())
        z = torch.randn(n, self.latent, generator=generator, device=p.device, dtype=p.dtype)
        return self.mean_image(self.decode(z).to(p.dtype))

    @torch.no_grad()
    def reconstruct(self, x):
        """Pixel means decoded from the posterior means, in x's dtype (under autocast too)."""
        mu, _ = self.encode(x)
        return self.mean_image(self.decode(mu).to(x.dtype))
