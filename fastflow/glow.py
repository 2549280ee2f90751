"""Multi-scale Glow (Kingma & Dhariwal, 2018) on fastflow's fused layers.

Structure and parameter names follow rosinality/glow-pytorch, so its users can switch by
changing an import: each block squeezes 2x2 pixels into channels, runs ``n_flow`` steps
(ActNorm + 1x1 conv fused, then affine coupling), and splits off half of the channels,
which are scored by a Gaussian whose mean and log-sd a zero-initialised convolution
predicts from the other half. The last block scores everything under a learned prior.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import FlowStep, ZeroConv2d
from .reference import gaussian_log_p


def squeeze2x2(x):
    n, c, h, w = x.shape
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * 4, h // 2, w // 2)


def unsqueeze2x2(x):
    n, c, h, w = x.shape
    x = x.view(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c // 4, h * 2, w * 2)


class Block(nn.Module):
    """squeeze -> ``n_flow`` FlowSteps -> split (or, for the last block, the top prior)."""

    def __init__(self, in_channel: int, n_flow: int, split: bool = True, affine: bool = True,
                 conv_lu: bool = True, filter_size: int = 512):
        super().__init__()
        squeeze_dim = in_channel * 4
        self.flows = nn.ModuleList([FlowStep(squeeze_dim, filter_size=filter_size, affine=affine,
                                             conv_lu=conv_lu) for _ in range(n_flow)])
        self.split = split
        self.prior = (ZeroConv2d(in_channel * 2, in_channel * 4) if split
                      else ZeroConv2d(in_channel * 4, in_channel * 8))

    def _prior(self, out):
        src = out if self.split else torch.zeros_like(out)
        return self.prior(src).chunk(2, 1)

    def forward(self, x):
        out = squeeze2x2(x)
        logdet = 0
        for flow in self.flows:
            out, det = flow(out)
            logdet = logdet + det
        if self.split:
            out, z_new = out.chunk(2, 1)
            mean, log_sd = self._prior(out)
        else:
            z_new = out
            mean, log_sd = self._prior(out)
        log_p = gaussian_log_p(z_new, mean, log_sd).reshape(x.shape[0], -1).sum(1)
        return out, logdet, log_p, z_new

    def reverse(self, output, eps, reconstruct=False):
        """``reconstruct``: ``eps`` is the block's z itself; else standard-normal noise
        scaled by the prior (sampling)."""
        if reconstruct:
            x = torch.cat([output, eps], 1) if self.split else eps
        else:
            mean, log_sd = self._prior(output)
            z = mean + torch.exp(log_sd) * eps
            x = torch.cat([output, z], 1) if self.split else z
        for flow in self.flows[::-1]:
            x = flow.reverse(x)
        return unsqueeze2x2(x)


class Glow(nn.Module):
    """``forward(x) -> (log_p, logdet, z_list)``; ``reverse(z_list, reconstruct=False) -> x``;
    ``sample(n, temperature=1.0) -> x``. Image sides must be divisible by 2**n_block."""

    def __init__(self, in_channel: int, n_flow: int, n_block: int, affine: bool = True,
                 conv_lu: bool = True, filter_size: int = 512):
        super().__init__()
        if n_block < 1 or n_flow < 1:
            raise ValueError(f"n_flow, n_block: expected at least 1 each, got {n_flow}, {n_block}")
        self.in_channel, self.n_block = in_channel, n_block
        self.blocks = nn.ModuleList()
        c = in_channel
        for _ in range(n_block - 1):
            self.blocks.append(Block(c, n_flow, affine=affine, conv_lu=conv_lu, filter_size=filter_size))
            c *= 2
        self.blocks.append(Block(c, n_flow, split=False, affine=affine, conv_lu=conv_lu,
                                 filter_size=filter_size))
        # the image size of the last forward (host-side shapes: no sync), for sample()
        self.image_size = None

    def _check(self, x):
        side = 2 ** self.n_block
        if x.dim() != 4 or x.shape[1] != self.in_channel or x.shape[2] % side or x.shape[3] % side:
            raise ValueError(f"x: expected shape (N, {self.in_channel}, H, W) with H and W "
                             f"divisible by {side}, got {tuple(x.shape)}")

    def forward(self, x):
        self._check(x)
        self.image_size = (int(x.shape[2]), int(x.shape[3]))
        log_p_sum, logdet, out, z_outs = 0, 0, x, []
        for block in self.blocks:
            out, det, log_p, z_new = block(out)
            z_outs.append(z_new)
            logdet = logdet + det
            log_p_sum = log_p_sum + log_p
        return log_p_sum, logdet, z_outs

    def reverse(self, z_list, reconstruct=False):
        if len(z_list) != self.n_block:
            raise ValueError(f"z_list: expected {self.n_block} tensors, got {len(z_list)}")
        x = None
        for i, block in enumerate(self.blocks[::-1]):
            z = z_list[-(i + 1)]
            x = block.reverse(z if i == 0 else x, z, reconstruct=reconstruct)
        return x

    def z_shapes(self, height: int, width: int):
        """Shapes (C, H, W) of the z of each block for an image of the given size."""
        shapes, c = [], self.in_channel
        for i in range(self.n_block):
            height, width = height // 2, width // 2
            if i < self.n_block - 1:
                c *= 2
                shapes.append((c, height, width))
            else:
                shapes.append((c * 4, height, width))
        return shapes

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, image_size=None, generator=None):
        """``n`` images from the model at the given temperature."""
        size = image_size or self.image_size
        if size is None:
            raise ValueError("image_size: the model has seen no image yet; pass image_size=(H, W)")
        p = next(self.parameters())
        z = [temperature * torch.randn((n, *s), generator=generator, device=p.device, dtype=p.dtype)
             for s in self.z_shapes(*size)]
        return self.reverse(z)


def bits_per_dim(log_p, logdet, n_pixel: int, n_bins: int = 256):
    """Mean negative log-likelihood in bits per dimension, with Glow's dequantisation
    constant ``-log(n_bins) * n_pixel`` (``n_pixel`` = C*H*W)."""
    ll = log_p + logdet - math.log(n_bins) * n_pixel
    return (-ll / (math.log(2) * n_pixel)).mean()
