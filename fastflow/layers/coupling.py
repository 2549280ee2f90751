"""Glow's affine coupling layer with the fused coupling op after its network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._checks import check_bool, check_count, check_module_device, check_nchw, first_parameter
from ..ops.coupling import additive_coupling, affine_coupling


def replaced_on_instance(m: nn.Module, names) -> bool:
    """Any of ``names`` (methods of ``m``'s class) replaced on the instance (``m.forward =
    ...``): then only calling that method runs the replacement, so a fused path that
    computes the class's maths without calling it must not be taken. Membership tests on
    the instance ``__dict__`` only: torch 2.11's dynamo cannot trace ``__dict__.keys()``."""
    own = m.__dict__
    for name in names:
        if name in own:
            return True
    return False


class ZeroConv2d(nn.Module):
    """Glow's zero-initialised 3x3 convolution (padding with ones) times exp(3 * scale)."""

    def __init__(self, in_channel: int, out_channel: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channel, out_channel, 3, padding=0)
        self.conv.weight.data.zero_()
        self.conv.bias.data.zero_()
        self.scale = nn.Parameter(torch.zeros(1, out_channel, 1, 1))

    def forward(self, x):
        out = self.conv(F.pad(x, [1, 1, 1, 1], value=1.0))
        return out * torch.exp(self.scale * 3)


class AffineCoupling(nn.Module):
    """``forward(x) -> (y, logdet)``, ``reverse(y) -> x``, ``inverse(y) -> (x, logdet)``.

    The network (conv3x3 -> ReLU -> conv1x1 -> ReLU -> ZeroConv2d) sees the pass-through
    channels ``x[:, :C - C//2]``; its output drives the fused coupling op. ``affine=False``
    gives additive coupling (logdet zeros). Parameter names match rosinality/glow-pytorch,
    so its checkpoints load."""

    def __init__(self, in_channel: int, filter_size: int = 512, affine: bool = True):
        super().__init__()
        in_channel = check_count("in_channel", in_channel, 2, "at least 2 channels")
        filter_size = check_count("filter_size", filter_size, 1, "a positive network width")
        self.in_channel = in_channel
        self.affine = check_bool("affine", affine)
        ca, cb = in_channel - in_channel // 2, in_channel // 2
        self.net = nn.Sequential(
            nn.Conv2d(ca, filter_size, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(filter_size, filter_size, 1),
            nn.ReLU(inplace=True),
            ZeroConv2d(filter_size, 2 * cb if affine else cb),
        )
        self.net[0].weight.data.normal_(0, 0.05)
        self.net[0].bias.data.zero_()
        self.net[2].weight.data.normal_(0, 0.05)
        self.net[2].bias.data.zero_()

    @property
    def split(self) -> int:
        """The channels the network reads: ``x[:, :split]``, split = C - C // 2."""
        return self.in_channel - self.in_channel // 2

    def _couple(self, x, reverse, logdet=True, head=None):
        h = self.net(x[:, :self.split] if head is None else head)
        if self.affine:
            return affine_coupling(x, h, reverse=reverse, logdet=logdet)
        return additive_coupling(x, h, reverse=reverse, logdet=logdet)

    def _check(self, name, x):
        check_nchw(name, x, self.in_channel)
        p = first_parameter(self.net)
        check_module_device(name, x, p)
        # the stock network's first convolution refuses another dtype with PyTorch's "Input
        # type (float) and bias type (double)" unless autocast casts both (it leaves float64
        # alone): say which argument
        if (p is not None and p.dtype != x.dtype and isinstance(self.net, nn.Sequential)
                and type(self.net[0]) is nn.Conv2d
                and (torch.float64 in (p.dtype, x.dtype)
                     or not torch.is_autocast_enabled(x.device.type))):
            raise TypeError(f"{name}: expected {p.dtype}, the coupling network's dtype (or "
                            f"autocast), got {x.dtype}")

    def forward(self, x):
        self._check("x", x)
        return self._couple(x, False)

    def forward_with_head(self, x, head):
        """``forward(x)`` given ``head``, the values of ``x[:, :split]`` as a tensor of their
        own (``channel_mix_split``'s second output): the network reads it instead of a
        slice of x. ``FlowStep`` calls this on its fused path when the coupling is a stock
        ``AffineCoupling`` without hooks."""
        self._check("x", x)
        return self._couple(x, False, head=head)

    def inverse(self, y):
        self._check("y", y)
        return self._couple(y, True)

    def reverse(self, y):
        """x alone: the op computes no log-det (sampling drops it), unless a subclass or
        the instance itself overrides ``inverse`` (or ``_couple``), which is then what runs."""
        cls = type(self)
        if (cls.inverse is not AffineCoupling.inverse or cls._couple is not AffineCoupling._couple
                or replaced_on_instance(self, ("inverse", "_couple"))):
            return self.inverse(y)[0]
        self._check("y", y)
        return self._couple(y, True, logdet=False)[0]

    def extra_repr(self) -> str:
        return f"in_channel={self.in_channel}, affine={self.affine}"
