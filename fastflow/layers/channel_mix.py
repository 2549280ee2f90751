"""Glow's ActNorm and invertible 1x1 convolutions on the fused channel-mixing op.

Parameter and buffer names follow rosinality/glow-pytorch, so its checkpoints load.
Every module: ``forward(x) -> (y, logdet)``, ``reverse(y) -> x``, ``inverse(y) -> (x, logdet)``
(logdet of the inverse map), logdet an ordinary (N,) tensor.

The invertible convolutions hand the fused op their matrix through
``weight_and_logdet(inverse)``: the matrix (W, or W^-1 for ``inverse``), assembled in
float64, and log|det W| per pixel. Nothing is cached: W (and W^-1, from the triangular
factors) is assembled afresh on every call, from the parameters as they are then. A cache
could go stale without anyone noticing: fused and foreach optimizer kernels,
``torch._foreach_*`` ops and ``.data`` edits change parameters without bumping their version
counters, and no exact check is cheap (comparing values reads the device). The cost is a
few operations on a C x C float64 matrix per call (see the sampling rows of
benchmarks/suite_glow.py and the op counts of benchmarks/run.py). The only derived state
kept is ``InvConv2dLU``'s row order of the fixed permutation ``w_p`` (a non-persistent
buffer refreshed by ``load_state_dict`` and after an in-place write to ``w_p`` (its version
counter: copying another layer's state dict tensor by tensor), used only while ``w_p`` is
the tensor it was made from: ``torch.func.functional_call`` with another layer's state dict
swaps in another permutation). An edit through ``.data`` bumps no version counter and is
not seen: edit ``w_p`` under ``torch.no_grad()`` instead.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import reference
from ..backend import compute_dtype
from ..ops._checks import check_bool, check_count, check_module_device, check_nchw
from ..ops.channel_mix import actnorm_invconv, channel_mix
from ..ops.lu_weight import lu_weight_logdet


def _version_of(t: torch.Tensor):
    """``t``'s version counter (bumped by every in-place write but one through ``.data``),
    or None where none is read: an inference tensor has none, and torch.compile would
    trace it as data."""
    if torch.compiler.is_compiling() or t.is_inference():
        return None
    return t._version


def _written_since(t: torch.Tensor, version) -> bool:
    """``t`` was written in place after ``version`` (where its version is read)."""
    now = _version_of(t)
    return now is not None and now != version


def _described(t: torch.Tensor, of, version) -> bool:
    """A host-side mirror made from the tensor ``of`` at ``version`` still describes ``t``:
    the same tensor, not written in place since (where its version is read)."""
    return t is of and not _written_since(t, version)


_STALE = -1  # a version no tensor has: the mirror is made again at the next call
_COPIED = -2  # in a copy's state: the mirror described its tensor; record the copy's version


def _copy_state(state, mirror, of, version_key):
    """``state`` for a copy (deepcopy, pickling): the copy's tensors have versions of their
    own, so the mirror's recorded version is replaced by ``_COPIED`` (record the copy's in
    ``__setstate__``) where it describes its tensor, ``_STALE`` (made again) where not."""
    described = _described(mirror, state.get(of), state.get(version_key))
    return {**state, version_key: _COPIED if described else _STALE}


def _copied_version(module, tensor_name, version_key):
    if module.__dict__.get(version_key) == _COPIED:
        module.__dict__[version_key] = _version_of(getattr(module, tensor_name))


def _needs_grad(params) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in params)


def _per_sample(ld_per_pixel, x, inverse, scale=None):
    """(N,) log-det ``+-H*W * (ld_per_pixel + sum(log|scale|))`` in x's compute dtype."""
    n, hw, cd = x.shape[0], x.shape[2] * x.shape[3], compute_dtype(x.dtype)
    if scale is not None:
        return reference.actnorm_logdet(scale, n, hw, cd, extra=ld_per_pixel, reverse=inverse)
    ld = ld_per_pixel.to(cd) if ld_per_pixel.dtype != cd else ld_per_pixel
    return reference.per_sample(ld.reshape(()), n, -hw if inverse else hw)


class ActNorm(nn.Module):
    """``y = scale * (x + loc)`` per channel; log|det| = H*W*sum(log|scale|).

    The first forward in training mode on a non-empty batch sets loc = -mean and
    scale = 1 / (std + 1e-6) from it (per channel; at most the parameters' dtype's largest
    finite value, 65504 for float16, where a constant channel's 1e6 is inf); a batch with no
    elements (N = 0 or H*W = 0) neither initialises nor changes it; a parametrized loc or scale
    (``torch.nn.utils.parametrize``) gets its value through ``right_inverse``. The flag is
    the ``initialized`` buffer (saved with the state dict) mirrored by a Python bool, so
    later calls never read the device; loading a state dict refreshes the mirror, and so
    does the first call after an in-place write to the buffer (its version counter: a
    hand-set ``initialized.fill_(1)``, ``AveragedModel`` copying it; one read of the device
    per write; a write through ``.data`` is not seen, and a model compiled with
    torch.compile reads no version: it keeps the mirror until an eager call or a load
    refreshes it). The mirror describes the buffer tensor it was made for: where another one is swapped in
    (``torch.func.functional_call`` with a state dict, ``torch.func.stack_module_state``),
    the tensors are the caller's state and are never initialised here. Hooks on this module
    fire when it is called itself; inside a stock ``FlowStep`` they fire too (the step then
    calls the submodules one by one instead of its fused path)."""

    def __init__(self, in_channel: int, logdet: bool = True):
        super().__init__()
        in_channel = check_count("in_channel", in_channel)
        self.in_channel = in_channel
        self.loc = nn.Parameter(torch.zeros(1, in_channel, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, in_channel, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self.logdet = check_bool("logdet", logdet)
        self._initialized = False
        self._flag_of = self.initialized  # the buffer tensor that _initialized describes
        self._flag_version = _version_of(self.initialized)  # ... at this version
        self.register_load_state_dict_post_hook(ActNorm._sync_flag)

    @staticmethod
    def _sync_flag(module, incompatible_keys):
        module._initialized = bool(module.initialized.item())  # once per load, not per call
        module._flag_of = module.initialized  # (load_state_dict(assign=True): a new tensor)
        module._flag_version = _version_of(module.initialized)

    def _apply(self, fn, recurse=True):
        described = _described(self.initialized, getattr(self, "_flag_of", None),
                               getattr(self, "_flag_version", None))
        super()._apply(fn, recurse)
        self._flag_of = self.initialized  # moved with its value (.to, .cuda): still described
        # (unless it was written in place before the move: then read at the next call)
        self._flag_version = _version_of(self.initialized) if described else _STALE
        return self

    def __getstate__(self):
        return _copy_state(super().__getstate__(), self.initialized, "_flag_of", "_flag_version")

    def __setstate__(self, state):
        super().__setstate__(state)
        _copied_version(self, "initialized", "_flag_version")

    def is_initialized(self) -> bool:
        """Whether the data-dependent initialisation has run (no device read): the host-side
        mirror; True where ``initialized`` is not the tensor the mirror describes (another
        one swapped in by ``torch.func.functional_call``: the caller's state, not this
        layer's to initialise; reading it would wait for the device, or fail under vmap).
        The buffer is read once after an in-place write to it (its version counter moved)."""
        flag = self.initialized
        if flag is not getattr(self, "_flag_of", None):
            return True
        if _written_since(flag, getattr(self, "_flag_version", None)):
            ActNorm._sync_flag(self, None)  # written in place since (fill_, copy_): read it
        return self._initialized

    @torch.no_grad()
    def initialize(self, x):
        """Data-dependent initialisation from the batch ``x`` (ignored when it is empty)."""
        if x.numel() == 0:
            return
        if x.shape[0] * x.shape[2] * x.shape[3] == 1:  # said from the shape: no device read
            warnings.warn(
                f"ActNorm: data-dependent initialisation from one value per channel (x of "
                f"shape {tuple(x.shape)}): each channel's std is 0, so its scale becomes "
                "1 / (0 + 1e-6) = 1e6 and later batches come out about 1e6 times too large; "
                "initialise with a batch of two or more images (a Glow's last level is 1x1 "
                "for images 2**n_block pixels wide)", stacklevel=3)
        for name, value in zip(("loc", "scale"), reference.actnorm_init(x)):
            now = getattr(self, name)
            # at most the dtype's largest finite value: 1 / (std + 1e-6) of a channel with
            # std below 1.5e-5 (a constant one: 1e6) is inf in float16, and a layer with an
            # inf scale gives NaN outputs and an inf log-det from then on. Clamped in the
            # layer's dtype (its bound does not fit a lower-precision value: float64
            # parameters, float32 input)
            big = torch.finfo(now.dtype).max
            value = value.reshape(now.shape).to(now.dtype).clamp(-big, big)
            if parametrize.is_parametrized(self, name):
                # ``now`` is the parametrization's output, computed for this read: the value
                # goes to the stored tensor through its ``right_inverse`` instead
                setattr(self, name, value)
            else:
                now.copy_(value)
        self.initialized.fill_(1)
        self._initialized = True
        if self.initialized is self._flag_of:
            self._flag_version = _version_of(self.initialized)

    def maybe_initialize(self, x):
        if self.training and not self.is_initialized():
            self.initialize(x)

    def forward(self, x):
        check_nchw("x", x, self.in_channel)
        check_module_device("x", x, self.loc)
        self.maybe_initialize(x)
        y, ld = actnorm_invconv(x, self.loc, self.scale, None)
        return (y, ld) if self.logdet else y

    def inverse(self, y):
        check_nchw("y", y, self.in_channel)
        check_module_device("y", y, self.loc)
        return actnorm_invconv(y, self.loc, self.scale, None, reverse=True)

    def reverse(self, y):
        return self.inverse(y)[0]

    def extra_repr(self) -> str:
        return f"in_channel={self.in_channel}" + ("" if self.logdet else ", logdet=False")


def _random_rotation(in_channel: int) -> torch.Tensor:
    """A random (C, C) orthogonal matrix in float64: the invertible convolutions' start."""
    in_channel = check_count("in_channel", in_channel)
    return torch.linalg.qr(torch.randn(in_channel, in_channel, dtype=torch.float64))[0]


class _InvConvBase(nn.Module):
    in_channel: int

    def device_parameter(self) -> torch.Tensor:
        """A parameter whose device is the layer's (inputs must be on it)."""
        raise NotImplementedError

    def weight_and_logdet(self, inverse: bool = False):
        raise NotImplementedError

    def matrix(self, inverse: bool = False):
        """W (or W^-1) alone, as ``weight_and_logdet`` gives it (sampling needs no log-det)."""
        return self.weight_and_logdet(inverse)[0]

    def matrix_and_logdet(self, x, scale=None, inverse: bool = False, *, for_mix: bool = False):
        """(W, or W^-1 for ``inverse``; the per-sample log-det (N,) of the map on ``x``):
        ``+-H*W*(log|det W| + sum(log|scale|))`` in x's compute dtype, the ``scale`` term
        for an ActNorm applied with the matrix (a FlowStep), None for none. ``for_mix``:
        the matrix is only for ``channel_mix`` on ``x``, which reads it in x's compute
        dtype, so it may come back in that dtype where the layer writes it so at no cost
        (``InvConv2dLU`` going forward, see there); otherwise as ``weight_and_logdet``."""
        w, ld = self.weight_and_logdet(inverse)
        return w, _per_sample(ld, x, inverse, scale)

    def forward(self, x):
        check_nchw("x", x, self.in_channel)
        check_module_device("x", x, self.device_parameter())
        w, ld = self.matrix_and_logdet(x)
        return channel_mix(x, w), ld

    def inverse(self, y):
        check_nchw("y", y, self.in_channel)
        check_module_device("y", y, self.device_parameter())
        w_inv, ld = self.matrix_and_logdet(y, inverse=True)
        return channel_mix(y, w_inv), ld

    def reverse(self, y):
        return self.inverse(y)[0]

    def extra_repr(self) -> str:
        return f"in_channel={self.in_channel}"


class InvConv2dLU(_InvConvBase):
    """``W = w_p @ (L + I) @ (U + diag(s_sign * exp(w_s)))`` with L = w_l * l_mask,
    U = w_u * u_mask; log|det W| = sum(w_s) per pixel, read from the parameters.

    W and W^-1 (from triangular solves, not a general inverse) are assembled in float64
    on every call (no cache; see the module docstring). Hooks on this module fire when it is
    called itself, and inside a stock ``FlowStep`` (which then calls it on its own)."""

    def __init__(self, in_channel: int):
        super().__init__()
        self.in_channel = in_channel
        q = _random_rotation(in_channel)
        w_p, w_l, w_u = torch.linalg.lu(q)
        w_s = torch.diagonal(w_u)
        u_mask = torch.triu(torch.ones(in_channel, in_channel), 1)
        self.register_buffer("w_p", w_p.float())
        self.register_buffer("u_mask", u_mask)
        self.register_buffer("l_mask", u_mask.T.contiguous())
        self.register_buffer("s_sign", torch.sign(w_s).float())
        self.register_buffer("l_eye", torch.eye(in_channel))
        # the row gather of the fixed permutation w_p, refreshed whenever a state dict loads
        self.register_buffer("w_rows", w_p.argmax(dim=1), persistent=False)
        self._rows_of = self.w_p  # the w_p tensor that w_rows was made from
        self._rows_version = _version_of(self.w_p)  # ... at this version
        self.w_l = nn.Parameter(w_l.float())
        self.w_s = nn.Parameter(torch.log(torch.abs(w_s)).float())
        self.w_u = nn.Parameter(torch.triu(w_u, 1).float())
        self.register_load_state_dict_post_hook(InvConv2dLU._sync_rows)

    def device_parameter(self):
        return self.w_s

    @staticmethod
    def _sync_rows(module, incompatible_keys):
        rows = module.w_p.argmax(dim=1)
        if module.w_rows.device == rows.device:
            with torch.no_grad():
                module.w_rows.copy_(rows)  # in place: a captured CUDA graph reads this one
        else:  # load_state_dict(assign=True) into a layer made on the meta device
            module.w_rows = rows
        module._rows_of = module.w_p  # (assign=True put a new tensor there)
        module._rows_version = _version_of(module.w_p)

    def _apply(self, fn, recurse=True):
        described = _described(self.w_p, getattr(self, "_rows_of", None),
                                getattr(self, "_rows_version", None))
        super()._apply(fn, recurse)
        if described:  # moved or cast with w_rows (.to, .half, to_empty): its rows
            self._rows_of, self._rows_version = self.w_p, _version_of(self.w_p)
        else:  # w_p written in place (or replaced) before the move: its rows made again
            InvConv2dLU._sync_rows(self, None)
        return self

    def __getstate__(self):
        return _copy_state(super().__getstate__(), self.w_p, "_rows_of", "_rows_version")

    def __setstate__(self, state):
        super().__setstate__(state)
        _copied_version(self, "w_p", "_rows_version")

    def rows(self):
        """The row gather of the permutation ``w_p`` (``w_p.argmax(dim=1)``): the ``w_rows``
        buffer, or, where ``w_p`` is not the tensor it was made from (another one swapped in
        by ``torch.func.functional_call``, e.g. another layer's state dict), made from
        ``w_p`` for this call. After an in-place write to ``w_p`` (its version counter
        moved: another layer's state dict copied in tensor by tensor) ``w_rows`` is made
        again first."""
        w_p = self.w_p
        if w_p is not self._rows_of:
            return w_p.argmax(dim=1)
        if _written_since(w_p, getattr(self, "_rows_version", None)):
            InvConv2dLU._sync_rows(self, None)  # w_p written in place since: its rows again
        return self.w_rows

    def _assemble(self, inverse: bool):
        """W = P (L + I) (U + diag(s_sign exp(w_s))) in float64 (the ``lu_weight`` op), or
        W^-1 from triangular solves (``reference.lu_inverse_from_rows``); L, U are the
        strictly lower / upper parts of w_l, w_u (rosinality's masks)."""
        if not inverse:
            return lu_weight_logdet(self.w_l, self.w_u, self.w_s, self.s_sign, self.rows(),
                                    n=0)[0]
        d = torch.float64
        return reference.lu_inverse_from_rows(self.rows(), self.w_l.to(d), self.w_u.to(d),
                                              self.w_s.to(d), self.s_sign)

    def weight_and_logdet(self, inverse: bool = False):
        """(W or W^-1 as a float64 (C, C) matrix, log|det W| = sum(w_s) in float64, as the
        matrix: summed in the parameters' dtype it was rounded to 8 bits for a bfloat16
        layer)."""
        return self._assemble(inverse), self.w_s.sum(dtype=torch.float64)

    def matrix(self, inverse: bool = False):
        return self._assemble(inverse)

    def matrix_and_logdet(self, x, scale=None, inverse: bool = False, *, for_mix: bool = False):
        """As ``_InvConvBase.matrix_and_logdet``. Going forward, W and the whole log-det
        (ActNorm's ``scale`` term included) come from one ``lu_weight`` launch (its backward
        is one more); with ``for_mix`` and float32 (or 16-bit) ``x``, the Triton path's
        launch writes W (computed in float64) in float32, so the mix needs no cast."""
        cd = compute_dtype(x.dtype)
        if not inverse:
            return lu_weight_logdet(self.w_l, self.w_u, self.w_s, self.s_sign, self.rows(),
                                    scale=scale, n=x.shape[0],
                                    ld_mult=x.shape[2] * x.shape[3], ld_dtype=cd,
                                    w_dtype=cd if for_mix else None)
        # sum(w_s) in x's compute dtype, as going forward (not in the parameters' dtype:
        # a bfloat16 layer's sum was rounded to 8 bits, then multiplied by H*W)
        return self._assemble(True), _per_sample(self.w_s.sum(dtype=cd), x, True, scale)

    @staticmethod
    def stacked_factors(convs) -> tuple:
        """(w_l, w_u, w_s, s_sign, rows()) of every layer in ``convs`` (``InvConv2dLU``s of
        one channel count), each stacked on a new first dimension: ``lu_weight_logdet``'s
        (lower, upper, log_s, sign_s, rows) for the whole stack."""
        return tuple(reference.flow_stack([m.rows() if name == "rows" else getattr(m, name)
                                           for m in convs])
                     for name in ("w_l", "w_u", "w_s", "s_sign", "rows"))

    @staticmethod
    def stacked_inverses(convs, dtype: torch.dtype) -> list:
        """W^-1 of every layer in ``convs`` (``InvConv2dLU``s of one channel count), each
        exactly as ``matrix(inverse=True)`` assembles it (float64 triangular solves), from
        one batched assembly, then cast once to ``dtype``: a list of (C, C) views."""
        d = torch.float64
        lower, upper, log_s, sign_s, rows = InvConv2dLU.stacked_factors(convs)
        inv = reference.lu_inverse_from_rows(rows, lower.to(d), upper.to(d), log_s.to(d), sign_s)
        return list((inv if dtype == d else inv.to(dtype)).unbind(0))

    def calc_weight(self):
        """W as a (C, C, 1, 1) convolution weight in the parameters' dtype (rosinality's API)."""
        w, _ = self.weight_and_logdet(False)
        return w.to(self.w_s.dtype)[:, :, None, None]


class InvConv2d(_InvConvBase):
    """Plain invertible 1x1 convolution with a free (C, C, 1, 1) ``weight`` (a random
    rotation at first). log|det W| comes from an LU factorisation (``lu_factor_ex``: no host
    synchronisation) in float64 and W^-1 from LU solves, on every call (no cache; see the
    module docstring). Hooks fire as for ``InvConv2dLU``."""

    def __init__(self, in_channel: int):
        super().__init__()
        self.in_channel = in_channel
        q = _random_rotation(in_channel)
        self.weight = nn.Parameter(q.float()[:, :, None, None].contiguous())  # QR gives column-major

    def device_parameter(self):
        return self.weight

    def weight_and_logdet(self, inverse: bool = False):
        """(W, or W^-1 as float64 (C, C); log|det W| in float64)."""
        w64 = self.weight.to(torch.float64).reshape(self.in_channel, self.in_channel)
        logdet, factors = reference.lu_factor_logdet(w64)
        if not inverse:
            return self.weight, logdet
        return reference.lu_factor_inverse(factors), logdet
