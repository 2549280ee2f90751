"""Multi-scale Glow (Kingma & Dhariwal, 2018) on fastflow's fused layers.

Structure and parameter names follow rosinality/glow-pytorch, so its users can switch by
changing an import: each block squeezes 2x2 pixels into channels, runs ``n_flow`` steps
(ActNorm + 1x1 conv fused, then affine coupling), and splits off half of the channels,
which are scored by a Gaussian whose mean and log-sd a zero-initialised convolution
predicts from the other half. The last block scores everything under a learned prior.
With ``reversible=True`` each block's steps are a ``fastflow.ReversibleSequence``: training
keeps no per-step activations (see ``fastflow.layers.reversible``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .backend import compute_dtype
from .layers import FlowStep, ReversibleSequence, ZeroConv2d
from .ops._checks import check_bool, check_module_device, first_parameter
from .reference import flow_cat, flow_halves, gaussian_log_p


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
                 conv_lu: bool = True, filter_size: int = 512, reversible: bool = False):
        super().__init__()
        squeeze_dim = in_channel * 4
        steps = [FlowStep(squeeze_dim, filter_size=filter_size, affine=affine, conv_lu=conv_lu)
                 for _ in range(n_flow)]
        # the same parameter names either way (flows.0.actnorm.loc, ...)
        self.flows = ReversibleSequence(steps) if reversible else nn.ModuleList(steps)
        self.split = split
        self.prior = (ZeroConv2d(in_channel * 2, in_channel * 4) if split
                      else ZeroConv2d(in_channel * 4, in_channel * 8))

    def _prior(self, out):
        src = out if self.split else torch.zeros_like(out)
        return self.prior(src).chunk(2, 1)

    def forward(self, x):
        out = squeeze2x2(x)
        if isinstance(self.flows, ReversibleSequence):
            out, logdet = self.flows(out)
        else:
            logdet = 0
            # every step's W and log-det from one stacked assembly (None: each its own)
            mats = FlowStep.forward_matrices(self.flows, out)
            for i, flow in enumerate(self.flows):
                out, det = flow(out) if mats is None else flow(out, w_ld=mats[i])
                logdet = logdet + det
        if self.split:
            out, z_new = flow_halves(out)  # chunk(2, 1) (no cat in backward under autocast)
            mean, log_sd = self._prior(out)
        else:
            z_new = out
            mean, log_sd = self._prior(out)
        # in the compute dtype (float32 for a half-precision model, as the log-det): a
        # bfloat16 sum over C*H*W terms rounds log p to a few bits
        cd = compute_dtype(z_new.dtype)
        log_p = gaussian_log_p(z_new.to(cd), mean.to(cd), log_sd.to(cd)).reshape(
            x.shape[0], -1).sum(1)
        return out, logdet, log_p, z_new

    def reverse(self, output, eps, reconstruct=False):
        """``reconstruct``: ``eps`` is the block's z itself; else standard-normal noise
        scaled by the prior (sampling)."""
        if reconstruct:
            x = flow_cat([output, eps], 1) if self.split else eps
        else:
            mean, log_sd = self._prior(output)
            # in the latents' dtype: the prior's mean and log-sd follow autocast (or a 16-bit
            # model of the other kind), which would otherwise promote z and the sample
            z = (mean + torch.exp(log_sd) * eps).to(eps.dtype)
            x = flow_cat([output, z], 1) if self.split else z
        flows = self.flows[::-1]
        # every step's W^-1 from one batched assembly, in the compute dtype its mix reads
        mats = FlowStep.inverse_matrices(flows, compute_dtype(x.dtype))
        for i, flow in enumerate(flows):
            x = flow.reverse(x) if mats is None else flow.reverse(x, w_inv=mats[i])
        return unsqueeze2x2(x)


class Glow(nn.Module):
    """``forward(x) -> (log_p, logdet, z_list)``; ``reverse(z_list, reconstruct=False) -> x``;
    ``sample(n, temperature=1.0) -> x``. Image sides must be divisible by 2**n_block.

    ``reversible=True``: each block's steps form a ``ReversibleSequence``, whose backward
    rebuilds every step's input from its output instead of keeping activations (the same
    gradients to rounding; activation memory flat in ``n_flow``; see
    ``fastflow.layers.reversible``). Parameter names and the state dict are the same either way.
    ``fallback_count`` / ``fallback_overflow`` sum the blocks' counters.

    One difference from rosinality/glow-pytorch's constructor: ``conv_lu=False`` gives plain
    1x1 convolutions in every block, where rosinality's last block ignores the argument and
    keeps the LU layer. A rosinality checkpoint trained with ``conv_lu=False`` therefore does
    not load into ``Glow(..., conv_lu=False)`` (a strict ``load_state_dict`` names the last
    block's keys); the default ``conv_lu=True`` models are the same in both."""

    def __init__(self, in_channel: int, n_flow: int, n_block: int, affine: bool = True,
                 conv_lu: bool = True, filter_size: int = 512, reversible: bool = False):
        super().__init__()
        for name, v in (("in_channel", in_channel), ("n_flow", n_flow), ("n_block", n_block),
                        ("filter_size", filter_size)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}: expected a positive integer, got {v!r}")
            if v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if not isinstance(reversible, bool):
            raise TypeError(f"reversible: expected a bool, got {type(reversible).__name__}")
        self.in_channel, self.n_block, self.reversible = in_channel, n_block, reversible
        self.blocks = nn.ModuleList()
        c = in_channel
        kw = dict(affine=affine, conv_lu=conv_lu, filter_size=filter_size, reversible=reversible)
        for _ in range(n_block - 1):
            self.blocks.append(Block(c, n_flow, **kw))
            c *= 2
        self.blocks.append(Block(c, n_flow, split=False, **kw))
        # the image size of the last forward (host-side shapes: no sync), for sample()
        self.image_size = None

    def _counter(self, name):
        seqs = [b.flows for b in self.blocks if isinstance(b.flows, ReversibleSequence)]
        return sum(getattr(s, name) for s in seqs) if seqs else None

    @property
    def fallback_count(self):
        """Step inputs kept by the reversible fallback so far (a device tensor; None for a
        stored-activation model)."""
        return self._counter("fallback_count")

    @property
    def fallback_overflow(self):
        """Ill-conditioned steps that found the fallback reserve full (rebuilt anyway)."""
        return self._counter("fallback_overflow")

    def _check_size(self, name, height, width, got):
        side = 2 ** self.n_block
        if height < side or width < side or height % side or width % side:
            raise ValueError(f"{name}: expected H and W positive multiples of {side} "
                             f"(2**n_block for n_block={self.n_block}), got {got}")

    def _check(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a tensor (N, {self.in_channel}, H, W), got "
                            f"{type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channel:
            raise ValueError(f"x: expected shape (N, {self.in_channel}, H, W) with H and W "
                             f"divisible by {2 ** self.n_block}, got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"x: expected at least one sample, shape (N >= 1, "
                             f"{self.in_channel}, H, W), got {tuple(x.shape)}")
        side = 2 ** self.n_block
        if x.shape[2] % side or x.shape[3] % side or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"x: expected shape (N, {self.in_channel}, H, W) with H and W "
                             f"divisible by {side}, got {tuple(x.shape)}")
        check_module_device("x", x, first_parameter(self))

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

    def _check_z(self, z_list):
        if not isinstance(z_list, (list, tuple)) or len(z_list) != self.n_block:
            got = len(z_list) if isinstance(z_list, (list, tuple)) else type(z_list).__name__
            raise ValueError(f"z_list: expected {self.n_block} tensors, got {got}")
        for i, z in enumerate(z_list):
            if not isinstance(z, torch.Tensor) or z.dim() != 4:
                got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                raise ValueError(f"z_list[{i}]: expected a 4-D tensor (N, C, H, W), got {got}")
        param = first_parameter(self)
        for i, z in enumerate(z_list):
            check_module_device(f"z_list[{i}]", z, param)
            # the layers' dtype, as their own checks want (another 16/32-bit one under
            # autocast): sampling failed in the prior's convolution, naming no argument
            if param is not None and z.dtype != param.dtype and (
                    torch.float64 in (z.dtype, param.dtype)
                    or not torch.is_autocast_enabled(z.device.type)):
                raise TypeError(f"z_list[{i}]: expected {param.dtype}, the model's dtype (or "
                                f"autocast), got {z.dtype}")
        top = z_list[-1]
        scale = 2 ** self.n_block
        height, width = top.shape[2] * scale, top.shape[3] * scale
        n = top.shape[0]
        for i, (z, shape) in enumerate(zip(z_list, self.z_shapes(height, width))):
            if tuple(z.shape) != (n, *shape):
                want = ", ".join(str(v) for v in (n, *shape))
                raise ValueError(f"z_list[{i}]: expected shape ({want}) (block {i} of a "
                                 f"{height}x{width} image, as z_shapes gives), got "
                                 f"{tuple(z.shape)}")

    def reverse(self, z_list, reconstruct=False):
        # (``reverse(z, 0.7)``, a temperature where the flag goes, reconstructed silently)
        check_bool("reconstruct", reconstruct)
        self._check_z(z_list)
        x = None
        for i, block in enumerate(self.blocks[::-1]):
            z = z_list[-(i + 1)]
            x = block.reverse(z if i == 0 else x, z, reconstruct=reconstruct)
        return x

    def z_shapes(self, height: int, width: int):
        """Shapes (C, H, W) of the z of each block for an image of the given size."""
        self._check_size("image_size", height, width, (height, width))
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
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
            raise ValueError(f"image_size: expected (H, W), two integers, got {size!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n: expected a positive number of samples, got {n!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float, torch.Tensor)):
            raise TypeError(f"temperature: expected a number, got {temperature!r}")
        self._check_size("image_size", size[0], size[1], tuple(size))
        p = next(self.parameters())
        z = [temperature * torch.randn((n, *s), generator=generator, device=p.device, dtype=p.dtype)
             for s in self.z_shapes(*size)]
        return self.reverse(z)


def bits_per_dim(log_p, logdet, n_pixel: int, n_bins: int = 256):
    """Mean negative log-likelihood in bits per dimension, with Glow's dequantisation
    constant ``-log(n_bins) * n_pixel`` (``n_pixel`` = C*H*W)."""
    if not n_pixel > 0:
        raise ValueError(f"n_pixel: expected the positive count C*H*W of one image, got {n_pixel!r}")
    if not n_bins >= 1:
        raise ValueError(f"n_bins: expected a positive number of quantisation bins, got {n_bins!r}")
    ll = log_p + logdet - math.log(n_bins) * n_pixel
    return (-ll / (math.log(2) * n_pixel)).mean()
