"""FrEIA's affine coupling blocks with the ATAN soft clamp."""

from __future__ import annotations

import math
import numbers
import types

import torch
from torch import nn

from ..ops.coupling import affine_coupling
from ..reference import ATAN_FACTOR
from ._common import _couple, _Plan, _Swap

_FREIA_UNSUPPORTED = {
    "GINCouplingBlock": "volume preserving (the mean of log s is subtracted): no fastflow op",
    "NICECouplingBlock": "two-sided additive coupling: one add per half, nothing to fuse",
    "ConditionalAffineTransform": "affine map of the whole input from the condition only "
                                  "(no pass-through half)",
    "AllInOneBlock": "coupling, global affine and permutation in one module: not supported",
}


def _freia_cond(m, u, c):
    return torch.cat([u, *c], 1) if m.conditional else u


def _freia_h(m, raw, t):
    # FrEIA: log s = clamp * 0.636 * atan(raw); fastflow: clamp * 0.636 * atan(raw' / clamp),
    # so raw' = clamp * raw (exact for a power-of-two clamp, else within one rounding)
    return torch.cat([raw * float(m.clamp), t], 1)


def _freia_couple(m, x, h, rev):
    return _couple(affine_coupling, x, h, scale="atan", layout="halves", shift="after",
                   clamp=float(m.clamp), reverse=rev)


def _freia_x(m, x):
    """``x[0]``, refused as FrEIA's ``torch.split`` refuses it when its channels are not
    the block's split lengths (fastflow's op splits any C at C - C//2)."""
    x0 = x[0]
    l1, l2 = m.split_len1, m.split_len2
    if x0.dim() < 2 or x0.shape[1] != l1 + l2:
        raise ValueError(f"x[0]: expected {l1 + l2} channels (split lengths {l1} + {l2}) in "
                         f"dimension 1, got shape {tuple(x0.shape)}")
    return x0


def _freia_one_sided(m, x, c=(), rev=False, jac=True):
    x0 = _freia_x(m, x)
    a = m.subnet(_freia_cond(m, x0[:, :m.split_len1], c))
    y, j = _freia_couple(m, x0, _freia_h(m, a[:, :m.split_len2], a[:, m.split_len2:]), rev)
    return (y,), j


def _freia_two_sided(m, x, c, rev, net1, net2):
    """FrEIA's two couplings on equal halves: the first transforms x1 from x2 (``net2``),
    the second x2 from y1 (``net1``). fastflow's op keeps the leading half fixed, so the
    halves are swapped (one copy) around the coupling that transforms the leading half."""
    x0 = _freia_x(m, x)
    k = m.split_len1
    x1, x2 = x0[:, :k], x0[:, k:]
    if not rev:
        u, j1 = _freia_couple(m, torch.cat([x2, x1], 1), net2(_freia_cond(m, x2, c)), False)
        y1 = u[:, k:]
        y, j2 = _freia_couple(m, torch.cat([y1, x2], 1), net1(_freia_cond(m, y1, c)), False)
        return (y,), j1 + j2
    u, j2 = _freia_couple(m, x0, net1(_freia_cond(m, x1, c)), True)  # (x1, y2)
    y2 = u[:, k:]
    v, j1 = _freia_couple(m, torch.cat([y2, x1], 1), net2(_freia_cond(m, y2, c)), True)
    return (torch.cat([v[:, k:], y2], 1),), j1 + j2


def _freia_glow(m, x, c=(), rev=False, jac=True):
    k = m.split_len1

    def net1(u):
        a = m.subnet1(u)
        return _freia_h(m, a[:, :k], a[:, k:])

    def net2(u):
        a = m.subnet2(u)
        return _freia_h(m, a[:, :k], a[:, k:])

    return _freia_two_sided(m, x, c, rev, net1, net2)


def _freia_rnvp(m, x, c=(), rev=False, jac=True):
    def net1(u):
        return _freia_h(m, m.subnet_s1(u), m.subnet_t1(u))

    def net2(u):
        return _freia_h(m, m.subnet_s2(u), m.subnet_t2(u))

    return _freia_two_sided(m, x, c, rev, net1, net2)


def _clamp_activation(f) -> str:
    """"ATAN", "TANH", "SIGMOID" or "custom": FrEIA keeps only the function, so its values
    on a few points tell (plain functions only: a module may hold state)."""
    if f is torch.tanh:
        return "TANH"
    if not isinstance(f, types.FunctionType):
        return "custom"
    u = torch.linspace(-30.0, 30.0, 61, dtype=torch.float64)
    try:
        out = f(u)
    except Exception:
        return "custom"
    if not isinstance(out, torch.Tensor) or out.shape != u.shape:
        return "custom"
    if torch.equal(out, ATAN_FACTOR * torch.atan(u)):
        return "ATAN"
    if torch.equal(out, 2.0 * (torch.sigmoid(u) - 0.5)):
        return "SIGMOID"
    return "custom"


_FREIA_SUBNETS = {
    "AffineCouplingOneSided": (("subnet",), _freia_one_sided),
    "GLOWCouplingBlock": (("subnet1", "subnet2"), _freia_glow),
    "RNVPCouplingBlock": (("subnet_s1", "subnet_t1", "subnet_s2", "subnet_t2"), _freia_rnvp),
}


def _plan_freia(m) -> _Plan:
    name = type(m).__name__
    if not hasattr(m, "dims_in") or not hasattr(m, "dims_c"):
        return None
    if name in _FREIA_UNSUPPORTED:
        return _FREIA_UNSUPPORTED[name]
    if name not in _FREIA_SUBNETS:
        return None
    subnets, fn = _FREIA_SUBNETS[name]
    if not (all(isinstance(getattr(m, s, None), nn.Module) for s in subnets)
            and all(hasattr(m, a) for a in ("split_len1", "split_len2", "clamp", "f_clamp",
                                            "conditional"))):
        return None
    act = _clamp_activation(m.f_clamp)
    if act != "ATAN":
        return (f"clamp_activation {act}: fastflow's soft clamp is ATAN only "
                f"(clamp * 0.636 * atan)")
    # any real number FrEIA multiplies by (True, NumPy numbers), passed on as a float
    if not (isinstance(m.clamp, numbers.Real) and math.isfinite(m.clamp) and m.clamp > 0):
        return f"clamp {m.clamp!r}: fastflow needs a finite positive number"
    l1, l2 = m.split_len1, m.split_len2
    c = l1 + l2
    if name == "AffineCouplingOneSided":
        if (l1, l2) != (c - c // 2, c // 2) or l2 < 1:
            return (f"split lengths ({l1}, {l2}) of {c} channels: fastflow keeps the first "
                    f"C - C//2 = {c - c // 2} fixed and transforms the last {c // 2}")
    elif l1 != l2 or l1 < 1:
        return (f"split lengths ({l1}, {l2}): the two-sided block is swapped only for equal "
                f"halves")
    extra = " (halves swapped around the first coupling: two copies)" if name != \
        "AffineCouplingOneSided" else ""
    return _Swap(f"fastflow.affine_coupling(scale='atan', layout='halves', shift='after', "
                 f"clamp={float(m.clamp)}){extra}", {"forward": fn})
