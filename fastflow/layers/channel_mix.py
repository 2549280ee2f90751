"""Glow's ActNorm and invertible 1x1 convolutions on the fused channel-mixing op.

Parameter and buffer names follow rosinality/glow-pytorch, so its checkpoints load.
Every module: ``forward(x) -> (y, logdet)``, ``reverse(y) -> x``, ``inverse(y) -> (x, logdet)``
(logdet of the inverse map), logdet shaped (N,).

The invertible convolutions hand the fused op their matrix through
``weight_and_logdet(inverse)``: the matrix (W, or W^-1 for ``inverse``), assembled in
float64, and log|det W| per pixel. When no gradient is needed (eval, sampling) both are
cached; the cache key is every parameter's and buffer's (data_ptr, _version, dtype,
device, shape), and the cache holds aliases of the keyed tensors so their memory cannot be
reused behind its back. Optimizer steps, ``load_state_dict``, in-place edits (they bump
``_version``), ``.to()`` and ``deepcopy`` (new memory) all miss it. Edits through
``.data`` bypass version counters and cannot be seen: use ``torch.no_grad()`` and edit the
parameter itself. When a gradient is needed the matrix is assembled afresh so autograd
sees it (``InvConv2dLU``: W and the per-sample log-det, ActNorm's term included in a
FlowStep, from one ``lu_weight`` launch, its backward one more), and accumulation over
several forwards is plain autograd.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import reference
from ..backend import compute_dtype
from ..ops._checks import check_nchw
from ..ops.channel_mix import actnorm_invconv, channel_mix
from ..ops.lu_weight import lu_weight_logdet


def _per_sample(ld_per_pixel, x, sign, scale=None):
    """(N,) log-det ``sign * H*W * (ld_per_pixel + sum(log|scale|))`` in x's compute dtype."""
    hw = x.shape[2] * x.shape[3]
    cd = compute_dtype(x.dtype)
    ld = ld_per_pixel.to(cd)
    if scale is not None:
        ld = torch.log(torch.abs(scale.to(cd))).sum() + ld.reshape(())
    return ((sign * hw) * ld).expand(x.shape[0])


class _CachedMatrices:
    """(W, W^-1, log|det W|) cached for no-grad use, keyed on the source tensors."""

    def __init__(self):
        self.key = None
        self.pins = ()
        self.values = {}

    @staticmethod
    def _key(tensors):
        return tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in tensors)

    def get(self, tensors, name, build):
        if torch.compiler.is_compiling():  # data pointers cannot be traced: build in-graph
            with torch.no_grad():
                return build()
        key = self._key(tensors)
        if key != self.key:
            self.key, self.pins, self.values = key, tuple(t.detach() for t in tensors), {}
        if name not in self.values:
            with torch.no_grad():
                self.values[name] = build()
        return self.values[name]


def _needs_grad(params) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in params)


class ActNorm(nn.Module):
    """``y = scale * (x + loc)`` per channel; log|det| = H*W*sum(log|scale|).

    The first forward in training mode sets loc = -mean and scale = 1 / (std + 1e-6) from
    the batch (per channel). The flag is the ``initialized`` buffer (saved with the state
    dict) mirrored by a Python bool, so later calls never read the device; loading a state
    dict refreshes the mirror."""

    def __init__(self, in_channel: int, logdet: bool = True):
        super().__init__()
        if in_channel < 1:
            raise ValueError(f"in_channel: expected a positive channel count, got {in_channel}")
        self.in_channel = in_channel
        self.loc = nn.Parameter(torch.zeros(1, in_channel, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, in_channel, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self.logdet = logdet
        self._initialized = False
        self.register_load_state_dict_post_hook(ActNorm._sync_flag)

    @staticmethod
    def _sync_flag(module, incompatible_keys):
        module._initialized = bool(module.initialized.item())  # once per load, not per call

    @torch.no_grad()
    def initialize(self, x):
        """Data-dependent initialisation from the batch ``x``."""
        loc, scale = reference.actnorm_init(x)
        self.loc.copy_(loc.reshape(self.loc.shape))
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.initialized.fill_(1)
        self._initialized = True

    def maybe_initialize(self, x):
        if self.training and not self._initialized:
            self.initialize(x)

    def forward(self, x):
        check_nchw("x", x, self.in_channel)
        self.maybe_initialize(x)
        y, ld = actnorm_invconv(x, self.loc, self.scale, None)
        return (y, ld) if self.logdet else y

    def inverse(self, y):
        check_nchw("y", y, self.in_channel)
        return actnorm_invconv(y, self.loc, self.scale, None, reverse=True)

    def reverse(self, y):
        return self.inverse(y)[0]


def _random_rotation(in_channel: int) -> torch.Tensor:
    """A random (C, C) orthogonal matrix in float64: the invertible convolutions' start."""
    if in_channel < 1:
        raise ValueError(f"in_channel: expected a positive channel count, got {in_channel}")
    return torch.linalg.qr(torch.randn(in_channel, in_channel, dtype=torch.float64))[0]


class _InvConvBase(nn.Module):
    in_channel: int

    def weight_and_logdet(self, inverse: bool = False):
        raise NotImplementedError

    def matrix_and_logdet(self, x, scale=None, inverse: bool = False):
        """(W, or W^-1 for ``inverse``; the per-sample log-det (N,) of the map on ``x``):
        ``+-H*W*(log|det W| + sum(log|scale|))`` in x's compute dtype, the ``scale`` term
        for an ActNorm applied with the matrix (a FlowStep), None for none."""
        w, ld = self.weight_and_logdet(inverse)
        return w, _per_sample(ld, x, -1 if inverse else 1, scale)

    def forward(self, x):
        check_nchw("x", x, self.in_channel)
        w, ld = self.matrix_and_logdet(x)
        return channel_mix(x, w), ld

    def inverse(self, y):
        check_nchw("y", y, self.in_channel)
        w_inv, ld = self.matrix_and_logdet(y, inverse=True)
        return channel_mix(y, w_inv), ld

    def reverse(self, y):
        return self.inverse(y)[0]


class InvConv2dLU(_InvConvBase):
    """``W = w_p @ (L + I) @ (U + diag(s_sign * exp(w_s)))`` with L = w_l * l_mask,
    U = w_u * u_mask; log|det W| = sum(w_s) per pixel, read from the parameters.

    W and W^-1 (from triangular solves, not a general inverse) are assembled in float64;
    see the module docstring for the cache."""

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
        self.w_l = nn.Parameter(w_l.float())
        self.w_s = nn.Parameter(torch.log(torch.abs(w_s)).float())
        self.w_u = nn.Parameter(torch.triu(w_u, 1).float())
        self._cache = _CachedMatrices()
        self._fixed_cache = _CachedMatrices()

    def _sources(self):
        return (self.w_p, self.w_l, self.w_s, self.w_u, self.s_sign)

    def _fixed(self):
        """Row order of w_p, s_sign and I in float64: from the buffers, cached on them."""
        def build():
            d = torch.float64
            eye = torch.eye(self.in_channel, dtype=d, device=self.w_p.device)
            return self.w_p.argmax(dim=1), self.s_sign.to(d), eye

        return self._fixed_cache.get((self.w_p, self.s_sign), "fixed", build)

    def _assemble(self, inverse: bool):
        """W = P (L + I) (U + diag(s_sign exp(w_s))) in float64 (the fused ``lu_weight`` op),
        or W^-1 from triangular solves; L, U are the strictly lower / upper parts of w_l,
        w_u (rosinality's masks)."""
        d = torch.float64
        rows, sign, eye = self._fixed()
        if not inverse:
            return lu_weight_logdet(self.w_l, self.w_u, self.w_s, self.s_sign, rows, n=0)[0]
        lower = torch.tril(self.w_l.to(d), -1) + eye
        upper = torch.triu(self.w_u.to(d), 1) + torch.diag(sign * torch.exp(self.w_s.to(d)))
        l_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        u_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
        return (u_inv @ l_inv).index_select(1, rows)  # M @ P^T picks M's columns

    def weight_and_logdet(self, inverse: bool = False):
        """(W or W^-1 as a float64 (C, C) matrix, log|det W| = sum(w_s))."""
        ld = self.w_s.sum()
        if _needs_grad((self.w_l, self.w_s, self.w_u)):
            return self._assemble(inverse), ld
        name = "inverse" if inverse else "weight"
        return self._cache.get(self._sources(), name, lambda: self._assemble(inverse)), ld

    def matrix_and_logdet(self, x, scale=None, inverse: bool = False):
        """As ``_InvConvBase.matrix_and_logdet``. When W needs a gradient (training), W and
        the whole log-det (ActNorm's ``scale`` term included) come from one ``lu_weight``
        launch, and its backward is one more; otherwise the cached matrices."""
        if not inverse and _needs_grad((self.w_l, self.w_s, self.w_u)):
            rows = self._fixed()[0]
            return lu_weight_logdet(self.w_l, self.w_u, self.w_s, self.s_sign, rows, scale=scale,
                             n=x.shape[0], ld_mult=x.shape[2] * x.shape[3],
                             ld_dtype=compute_dtype(x.dtype))
        return super().matrix_and_logdet(x, scale, inverse)

    def calc_weight(self):
        """W as a (C, C, 1, 1) convolution weight in the parameters' dtype (rosinality's API)."""
        w, _ = self.weight_and_logdet(False)
        return w.to(self.w_s.dtype)[:, :, None, None]


class InvConv2d(_InvConvBase):
    """Plain invertible 1x1 convolution with a free (C, C, 1, 1) ``weight`` (a random
    rotation at first). log|det W| comes from an LU factorisation (``lu_factor_ex``: no host
    synchronisation) in float64 and W^-1 from LU solves; both cached while the weight is
    unchanged and no gradient is needed."""

    def __init__(self, in_channel: int):
        super().__init__()
        self.in_channel = in_channel
        q = _random_rotation(in_channel)
        self.weight = nn.Parameter(q.float()[:, :, None, None])
        self._cache = _CachedMatrices()

    def _factor(self):
        w = self.weight.to(torch.float64).reshape(self.in_channel, self.in_channel)
        lu, piv, _ = torch.linalg.lu_factor_ex(w)
        return lu, piv

    def _logdet(self):
        lu, _ = self._factor()
        return torch.log(torch.abs(torch.diagonal(lu))).sum()

    def _inverse(self):
        lu, piv = self._factor()
        eye = torch.eye(self.in_channel, dtype=lu.dtype, device=lu.device)
        return torch.linalg.lu_solve(lu, piv, eye)

    def weight_and_logdet(self, inverse: bool = False):
        """(W, or W^-1 as float64 (C, C), log|det W| in float64)."""
        if _needs_grad((self.weight,)):
            lu, piv = self._factor()
            ld = torch.log(torch.abs(torch.diagonal(lu))).sum()
            if not inverse:
                return self.weight, ld
            eye = torch.eye(self.in_channel, dtype=lu.dtype, device=lu.device)
            return torch.linalg.lu_solve(lu, piv, eye), ld
        src = (self.weight,)
        ld = self._cache.get(src, "logdet", self._logdet)
        if not inverse:
            return self.weight, ld
        return self._cache.get(src, "inverse", self._inverse), ld
