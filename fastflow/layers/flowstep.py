"""One Glow step: ActNorm and the invertible 1x1 convolution in one fused kernel, then the
affine coupling."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

from ..backend import compute_dtype
from ..reference import flow_stack
from ..ops.channel_mix import channel_mix, channel_mix_split
from ..ops.lu_weight import lu_weight_logdet
from ..ops._checks import FLOAT_DTYPES, check_bool, check_count, check_module_device, check_nchw
from .channel_mix import ActNorm, InvConv2d, InvConv2dLU
from .coupling import AffineCoupling, replaced_on_instance


# Fewest steps whose W a block assembles as one stack: stacking the factors and unbinding
# the results costs about a dozen ATen ops per block, forward and backward, against two
# launches and a few allocations per step on the Triton path, and about 30 ops per step on
# the reference path. Counted per Glow train step (L=2): K=2 stacked is a loss on the
# Triton path (391 ATen + 28 launches against 367 + 32); K=8 a gain on both (Triton 1087
# ATen + 100 launches against 1087 + 128; reference 1739 ATen against 2255).
MIN_STACK = 4


def _hooked(m: nn.Module) -> bool:
    """Any module hook (forward or backward, the module's own or a global one) that calling
    ``m`` would run and a fused pass, which does not call it, would skip."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks or _module._global_backward_hooks
                or _module._global_backward_pre_hooks)


class FlowStep(nn.Module):
    """``forward(x) -> (y, logdet)``, ``reverse(y) -> x``, ``inverse(y) -> (x, logdet)``.

    Submodule names (``actnorm``, ``invconv``, ``coupling``) follow rosinality/glow-pytorch.
    Applying the three modules one after the other gives the same result; the step runs
    the first two as one pass over memory, and the whole ActNorm + 1x1 conv log-det comes
    with the matrix (``invconv.matrix_and_logdet``: with the LU layer, W and the log-det
    are one launch).

    The fused pass reads ``actnorm``'s and ``invconv``'s tensors directly. It is taken only
    when they are exactly the stock ``ActNorm`` and ``InvConv2dLU``/``InvConv2d`` classes and
    no forward or backward hook is registered on them (or globally); otherwise the step calls
    ``self.actnorm``, ``self.invconv`` (their ``forward``, or ``inverse`` in reverse) and
    ``self.coupling`` one after the other, so hooks fire and a subclass assigned there is
    used. ``reverse`` (sampling) calls their ``reverse``, which computes no log-det. On the
    fused pass a stock, unhooked ``AffineCoupling`` gets its network's input from the mix's
    launch (``channel_mix_split``, ``coupling.forward_with_head``); any other coupling is
    called as a module."""

    def __init__(self, in_channel: int, filter_size: int = 512, affine: bool = True,
                 conv_lu: bool = True):
        super().__init__()
        check_bool("conv_lu", conv_lu)  # (affine: checked by AffineCoupling)
        in_channel = check_count("in_channel", in_channel)
        self.in_channel = in_channel
        self.actnorm = ActNorm(in_channel)
        self.invconv = InvConv2dLU(in_channel) if conv_lu else InvConv2d(in_channel)
        self.coupling = AffineCoupling(in_channel, filter_size=filter_size, affine=affine)

    def _fusable(self, hooks: bool) -> bool:
        an, inv = self.actnorm, self.invconv
        if type(an) is not ActNorm or type(inv) not in (InvConv2dLU, InvConv2d):
            return False
        return not (hooks and (_hooked(an) or _hooked(inv)))

    def _coupling_takes_head(self) -> bool:
        """The coupling is the stock ``AffineCoupling``, its ``forward`` neither overridden
        on the instance nor hooked: the fused pass may hand its network the mix's second
        output (``forward_with_head``) instead of calling the module."""
        cp = self.coupling
        if type(cp) is not AffineCoupling or _hooked(cp):
            return False
        return not replaced_on_instance(cp, ("forward", "_couple", "forward_with_head"))

    @staticmethod
    def forward_matrices(steps, x):
        """(W, log-det, H*W) of each step in ``steps`` for the input ``x`` (N, C, H, W),
        from one stacked ``lu_weight_logdet`` call (one launch forward and one backward on
        the Triton path; on the CPU a dozen batched ops instead of a dozen per step): a list
        to pass to each step's forward as ``w_ld``, each exactly what the step computes for
        itself (H*W: the pixel count the log-det was made for, which a step compares with
        its own input's). None (each step then makes its own) unless every step takes the
        fused path with an ``InvConv2dLU``, none has a forward pre-hook of its own (run
        before the step, it may change the step's parameters or input), all share C, no
        ActNorm still waits for its data-dependent initialisation (which changes its scale
        during that step's forward), and there are at least ``MIN_STACK`` steps."""
        steps = list(steps)
        if len(steps) < MIN_STACK or not all(
                type(s) is FlowStep and type(s.invconv) is InvConv2dLU and s._fusable(hooks=True)
                and not s._forward_pre_hooks  # it runs before the step: may change its tensors
                for s in steps):
            return None
        c = steps[0].in_channel
        if any(s.in_channel != c or (s.actnorm.training and not s.actnorm.is_initialized())
               for s in steps):
            return None
        check_nchw("x", x, c)
        cd = compute_dtype(x.dtype)
        hw = x.shape[2] * x.shape[3]
        w, ld = lu_weight_logdet(*InvConv2dLU.stacked_factors([s.invconv for s in steps]),
                                 scale=flow_stack([s.actnorm.scale for s in steps]),
                                 n=x.shape[0], ld_mult=hw, ld_dtype=cd, w_dtype=cd)
        return [(w_k, ld_k, hw) for w_k, ld_k in zip(w.unbind(0), ld.unbind(0))]

    def forward(self, x, *, w_ld=None):
        """``(y, logdet)``. ``w_ld``: this step's (W, log-det, H*W) from
        ``forward_matrices`` (used on the fused path only, and only for an input of that
        dtype, batch size and H*W)."""
        check_nchw("x", x, self.in_channel)
        if not self._fusable(hooks=True):  # each submodule checks x itself
            out, logdet = self.actnorm(x)
            out, ld = self.invconv(out)
            out, ld_coupling = self.coupling(out)
            return out, logdet + ld + ld_coupling
        an = self.actnorm
        check_module_device("x", x, an.loc)  # before the ActNorm initialises from x
        an.maybe_initialize(x)
        # with the LU layer on the Triton path, W comes in x's compute dtype from the one
        # lu_weight launch: the mix casts nothing
        if w_ld is not None and (w_ld[0].dtype != compute_dtype(x.dtype)
                                 or w_ld[1].shape != (x.shape[0],)
                                 or w_ld[2] != x.shape[2] * x.shape[3]):
            w_ld = None  # made for another input (a pre-hook changed x): not this one's
        if w_ld is None:
            w, logdet = self.invconv.matrix_and_logdet(x, an.scale, for_mix=True)
        else:  # assembled with the other steps of the block
            w, logdet = w_ld[:2]
        if self._coupling_takes_head():
            # the network's input comes from the mix's launch as a tensor of its own: no
            # slice copy for its first convolution, and its gradient is added inside the
            # mix's backward launches (no zeros + slice backward + add)
            out, head = channel_mix_split(x, w, loc=an.loc, scale=an.scale,
                                          split=self.coupling.split)
            out, ld_coupling = self.coupling.forward_with_head(out, head)
        else:  # a hooked or replaced coupling is called as a module
            out = channel_mix(x, w, loc=an.loc, scale=an.scale)
            out, ld_coupling = self.coupling(out)
        return out, logdet + ld_coupling

    @staticmethod
    def inverse_matrices(steps, dtype: torch.dtype):
        """W^-1 of each step in ``steps``, in ``dtype``, from one batched assembly (float64
        triangular solves, as each step's own, then one cast): a list to pass to ``reverse``
        as ``w_inv``, or None when the steps do not all take the fused path with an
        ``InvConv2dLU`` of one channel count (each then assembles its own). Sampling a
        Glow block costs one assembly instead of one per step (on a GPU, a dozen launches
        per block rather than per step)."""
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected float16, bfloat16, float32 or float64 for W^-1, "
                            f"got {dtype!r}")
        steps = list(steps)
        if not steps or not all(type(s) is FlowStep and type(s.invconv) is InvConv2dLU
                                and s._fusable(hooks=False) for s in steps):
            return None
        if len({s.in_channel for s in steps}) != 1:
            return None
        return InvConv2dLU.stacked_inverses([s.invconv for s in steps], dtype)

    def _inverse(self, y, logdet: bool, w_inv=None):
        check_nchw("y", y, self.in_channel)
        if logdet:
            x, ld_coupling = self.coupling.inverse(y)
        else:  # sampling: no log-det anywhere (the coupling op computes none)
            x, ld_coupling = self.coupling.reverse(y), None
        if not self._fusable(hooks=False):
            if not logdet:
                return self.actnorm.reverse(self.invconv.reverse(x)), None
            x, ld = self.invconv.inverse(x)
            x, ld_an = self.actnorm.inverse(x)
            return x, ld + ld_an + ld_coupling
        an = self.actnorm
        if logdet:
            w_inv, ld = self.invconv.matrix_and_logdet(x, an.scale, inverse=True)
        elif w_inv is None:  # sampling: the matrix only
            w_inv, ld = self.invconv.matrix(inverse=True), None
        else:  # sampling with the matrix assembled for the whole block
            ld = None
        x = channel_mix(x, w_inv, loc=an.loc, scale=an.scale, reverse=True)
        return x, (ld + ld_coupling if logdet else None)

    def inverse(self, y):
        return self._inverse(y, True)

    def reverse(self, y, *, w_inv=None):
        """x alone (no log-det is computed). ``w_inv``: this step's W^-1 from
        ``FlowStep.inverse_matrices`` (used on the fused path only)."""
        return self._inverse(y, False, w_inv)[0]
