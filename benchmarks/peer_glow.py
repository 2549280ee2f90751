"""The benchmark's peer: Glow in plain PyTorch with the structure and formulas of
rosinality/glow-pytorch (Kingma & Dhariwal 2018 as that implementation writes it), written
here from the published architecture, not copied.

Parameter and buffer names are rosinality's, which are also fastflow's, so
``peer.load_state_dict(fastflow_glow.state_dict())`` gives the same model. Formulas:
ActNorm ``scale * (x + loc)``, log-det ``H*W*sum(log|scale|)``; LU 1x1 convolution
``W = P (L*l_mask + I) (U*u_mask + diag(sign * exp(w_s)))`` applied with ``conv2d``, log-det
``H*W*sum(w_s)``, reverse with ``W.inverse()``; affine coupling
``log_s, t = net(x_a).chunk(2)``, ``s = sigmoid(log_s + 2)``, ``y_b = (x_b + t) * s``;
squeeze 2x2, split with a zero-initialised convolutional prior, a learned top prior.

One deliberate difference: rosinality's ActNorm reads its ``initialized`` buffer with
``.item()`` on every call (a host sync per step on a GPU); here a Python flag mirrors it,
so the peer is timed without that sync. As there, the first forward initialises, in
training or eval mode (fastflow's ActNorm waits for one in training mode).

``FloorGlow`` is the same model with every flow layer replaced by identity: only the
coupling networks and the priors run (the benchmark's floor).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_log_p(x, mean, log_sd):
    return -0.5 * math.log(2 * math.pi) - log_sd - 0.5 * (x - mean) ** 2 / torch.exp(2 * log_sd)


def gaussian_sample(eps, mean, log_sd):
    return mean + torch.exp(log_sd) * eps


def squeeze(x):
    n, c, h, w = x.shape
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).contiguous()
    return x.view(n, c * 4, h // 2, w // 2)


def unsqueeze(x):
    n, c, h, w = x.shape
    x = x.view(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).contiguous()
    return x.view(n, c // 4, h * 2, w * 2)


class ActNorm(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self._init = False
        self.register_load_state_dict_post_hook(
            lambda m, _: setattr(m, "_init", bool(m.initialized.item())))

    @torch.no_grad()
    def _initialize(self, x):
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        self.loc.copy_(-flat.mean(1).view_as(self.loc))
        self.scale.copy_((1 / (flat.std(1) + 1e-6)).view_as(self.scale))
        self.initialized.fill_(1)
        self._init = True

    def forward(self, x):
        if not self._init:  # rosinality: the first forward, in training or eval mode
            self._initialize(x)
        logdet = x.shape[2] * x.shape[3] * torch.sum(torch.log(torch.abs(self.scale)))
        return self.scale * (x + self.loc), logdet

    def reverse(self, y):
        return y / self.scale - self.loc


class InvConv2dLU(nn.Module):
    def __init__(self, channels):
        super().__init__()
        q = torch.linalg.qr(torch.randn(channels, channels))[0]
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        u_mask = torch.triu(torch.ones(channels, channels), 1)
        self.register_buffer("w_p", p)
        self.register_buffer("u_mask", u_mask)
        self.register_buffer("l_mask", u_mask.T.contiguous())
        self.register_buffer("s_sign", torch.sign(s))
        self.register_buffer("l_eye", torch.eye(channels))
        self.w_l = nn.Parameter(lower)
        self.w_s = nn.Parameter(torch.log(torch.abs(s)))
        self.w_u = nn.Parameter(torch.triu(upper, 1))

    def calc_weight(self):
        w = self.w_p @ (self.w_l * self.l_mask + self.l_eye) @ (
            self.w_u * self.u_mask + torch.diag(self.s_sign * torch.exp(self.w_s)))
        return w.unsqueeze(2).unsqueeze(3)

    def forward(self, x):
        out = F.conv2d(x, self.calc_weight())
        return out, x.shape[2] * x.shape[3] * torch.sum(self.w_s)

    def reverse(self, y):
        w = self.calc_weight()
        return F.conv2d(y, w.squeeze().inverse().unsqueeze(2).unsqueeze(3))


class ZeroConv2d(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=0)
        self.conv.weight.data.zero_()
        self.conv.bias.data.zero_()
        self.scale = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x):
        return self.conv(F.pad(x, [1, 1, 1, 1], value=1)) * torch.exp(self.scale * 3)


class AffineCoupling(nn.Module):
    def __init__(self, channels, filter_size=512):
        super().__init__()
        ca, cb = channels - channels // 2, channels // 2
        self.net = nn.Sequential(
            nn.Conv2d(ca, filter_size, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(filter_size, filter_size, 1), nn.ReLU(inplace=True),
            ZeroConv2d(filter_size, 2 * cb))
        for i in (0, 2):
            self.net[i].weight.data.normal_(0, 0.05)
            self.net[i].bias.data.zero_()

    def forward(self, x):
        x_a, x_b = x.chunk(2, 1)
        log_s, t = self.net(x_a).chunk(2, 1)
        s = torch.sigmoid(log_s + 2)
        y_b = (x_b + t) * s
        return torch.cat([x_a, y_b], 1), torch.sum(torch.log(s).view(x.shape[0], -1), 1)

    def reverse(self, y):
        y_a, y_b = y.chunk(2, 1)
        log_s, t = self.net(y_a).chunk(2, 1)
        s = torch.sigmoid(log_s + 2)
        return torch.cat([y_a, y_b / s - t], 1)


class Flow(nn.Module):
    def __init__(self, channels, filter_size=512):
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv2dLU(channels)
        self.coupling = AffineCoupling(channels, filter_size)

    def forward(self, x):
        out, logdet = self.actnorm(x)
        out, det1 = self.invconv(out)
        out, det2 = self.coupling(out)
        return out, logdet + det1 + det2

    def reverse(self, y):
        return self.actnorm.reverse(self.invconv.reverse(self.coupling.reverse(y)))


class Block(nn.Module):
    def __init__(self, in_channel, n_flow, split=True, filter_size=512):
        super().__init__()
        c = in_channel * 4
        self.flows = nn.ModuleList([Flow(c, filter_size) for _ in range(n_flow)])
        self.split = split
        self.prior = ZeroConv2d(in_channel * 2, in_channel * 4) if split else ZeroConv2d(c, c * 2)

    def forward(self, x):
        out = squeeze(x)
        logdet = 0
        for flow in self.flows:
            out, det = flow(out)
            logdet = logdet + det
        if self.split:
            out, z_new = out.chunk(2, 1)
            mean, log_sd = self.prior(out).chunk(2, 1)
        else:
            z_new = out
            mean, log_sd = self.prior(torch.zeros_like(out)).chunk(2, 1)
        log_p = gaussian_log_p(z_new, mean, log_sd).view(x.shape[0], -1).sum(1)
        return out, logdet, log_p, z_new

    def reverse(self, output, eps, reconstruct=False):
        if reconstruct:
            x = torch.cat([output, eps], 1) if self.split else eps
        elif self.split:
            mean, log_sd = self.prior(output).chunk(2, 1)
            x = torch.cat([output, gaussian_sample(eps, mean, log_sd)], 1)
        else:
            mean, log_sd = self.prior(torch.zeros_like(output)).chunk(2, 1)
            x = gaussian_sample(eps, mean, log_sd)
        for flow in self.flows[::-1]:
            x = flow.reverse(x)
        return unsqueeze(x)


class Glow(nn.Module):
    """``forward(x) -> (log_p, logdet, z_list)``; ``reverse(z_list, reconstruct=False)``."""

    def __init__(self, in_channel, n_flow, n_block, filter_size=512):
        super().__init__()
        self.blocks = nn.ModuleList()
        c = in_channel
        for _ in range(n_block - 1):
            self.blocks.append(Block(c, n_flow, split=True, filter_size=filter_size))
            c *= 2
        self.blocks.append(Block(c, n_flow, split=False, filter_size=filter_size))

    def forward(self, x):
        log_p_sum, logdet, out, z_outs = 0, 0, x, []
        for block in self.blocks:
            out, det, log_p, z_new = block(out)
            z_outs.append(z_new)
            logdet = logdet + det
            log_p_sum = log_p_sum + log_p
        return log_p_sum, logdet, z_outs

    def reverse(self, z_list, reconstruct=False):
        x = None
        for i, block in enumerate(self.blocks[::-1]):
            z = z_list[-(i + 1)]
            x = block.reverse(z if i == 0 else x, z, reconstruct=reconstruct)
        return x


class FloorGlow(nn.Module):
    """The floor of a Glow training step: ``glow``'s coupling networks and priors on the
    same shapes, every flow layer (ActNorm, 1x1 convolution, the coupling's affine map)
    replaced by identity. Each network's output enters the objective through a sum, and the
    input is marked as needing a gradient, so every network runs forward and backward,
    input gradient included, as in the real step. Shares ``glow``'s parameters."""

    def __init__(self, glow: Glow):
        super().__init__()
        self.glow = glow

    def forward(self, x):
        x = x.detach().requires_grad_()
        log_p_sum, logdet, out, z_outs = 0, 0, x, []
        for block in self.glow.blocks:
            out = squeeze(out)
            for flow in block.flows:
                ca = out.shape[1] - out.shape[1] // 2
                h = flow.coupling.net(out[:, :ca])
                logdet = logdet + h.flatten(1).sum(1)
            if block.split:
                out, z_new = out.chunk(2, 1)
                mean, log_sd = block.prior(out).chunk(2, 1)
            else:
                z_new = out
                mean, log_sd = block.prior(torch.zeros_like(out)).chunk(2, 1)
            log_p_sum = log_p_sum + gaussian_log_p(z_new, mean, log_sd).flatten(1).sum(1)
            z_outs.append(z_new)
        return log_p_sum, logdet, z_outs

    def reverse(self, z_list, reconstruct=False):
        """Sampling's floor: the priors and the networks, no flow layer."""
        x = None
        for i, block in enumerate(self.glow.blocks[::-1]):
            z = z_list[-(i + 1)]
            out = z if i == 0 else x
            if block.split:
                mean, log_sd = block.prior(out).chunk(2, 1)
                x = torch.cat([out, gaussian_sample(z, mean, log_sd)], 1)
            else:
                mean, log_sd = block.prior(torch.zeros_like(out)).chunk(2, 1)
                x = gaussian_sample(z, mean, log_sd)
            for flow in block.flows[::-1]:
                ca = x.shape[1] - x.shape[1] // 2
                x = x + 0 * flow.coupling.net(x[:, :ca]).sum()
            x = unsqueeze(x)
        return x
