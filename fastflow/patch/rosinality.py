"""rosinality/glow-pytorch-style modules: ActNorm, InvConv2dLU, InvConv2d, AffineCoupling,
Flow."""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from typing import Optional

import torch
from torch import nn

from ..ops.channel_mix import channel_mix
from ..ops.coupling import additive_coupling, affine_coupling
from ._common import (
    _buffers,
    _flag_set,
    _hooked,
    _inv,
    _lu_matrix,
    _lu_problem,
    _params,
    _Plan,
    _put_in_later,
    _stock,
    _Swap,
)


@functools.lru_cache(maxsize=256)  # once per class: a Glow holds dozens of each layer
def _returns_one_value(fn) -> bool:
    """No ``return`` in ``fn``'s source is a tuple display (``return out``, as ArtFlow's
    copies do); False when the source can't be read."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    returns = [n for n in ast.walk(tree) if isinstance(n, ast.Return)]
    return bool(returns) and not any(isinstance(r.value, ast.Tuple) for r in returns)


def _modified(m, params=(), buffers=(), modules=(), attrs=(), pair=True) -> Optional[str]:
    """Why ``m``, recognised by its name and tensors, may be a modified copy of
    rosinality's class (the forks keep both and change the map): state the original has
    not (a flag its forward reads, a layer inside it), a forward / reverse that takes
    more than the one tensor (a condition), or (``pair``) a forward that returns the
    output alone."""
    cls = type(m)
    extra = ((m._parameters.keys() - set(params)) | (m._buffers.keys() - set(buffers))
             | (m._modules.keys() - set(modules))
             | {k for k in vars(m) if not k.startswith("_") and k != "training"
                and not callable(getattr(cls, k, None))} - set(attrs))
    if extra:
        return (f"{', '.join(sorted(extra))}: not in rosinality's {cls.__name__} (a modified "
                f"copy may compute something else): runs its own code")
    for method in ("forward", "reverse"):
        try:
            args = list(inspect.signature(getattr(cls, method)).parameters.values())[1:]
        except (AttributeError, TypeError, ValueError):  # no such method or no signature
            continue
        named = [a.name for a in args if a.kind not in (a.VAR_POSITIONAL, a.VAR_KEYWORD)]
        if len(named) > 1:  # (a wrapper's (*args, **kwargs) tells nothing)
            return (f"{method} takes ({', '.join(named)}): rosinality's takes one tensor; "
                    f"runs its own code")
    if pair and _returns_one_value(cls.forward):
        return ("forward returns one value, rosinality's (output, logdet): a modified copy; "
                "runs its own code")
    return None


def _ros_actnorm_logdet(an, x):
    return x.shape[2] * x.shape[3] * torch.sum(torch.log(torch.abs(an.scale)))


def _ros_actnorm_forward(m, input):
    if not _flag_set(m, "initialized"):
        return type(m).forward(m, input)  # its own data-dependent initialisation
    out = channel_mix(input, loc=m.loc, scale=m.scale)
    return (out, _ros_actnorm_logdet(m, input)) if m.logdet else out


def _ros_actnorm_reverse(m, output):
    return channel_mix(output, loc=m.loc, scale=m.scale, reverse=True)


def _ros_matrix(ic, inverse: bool):
    """W (or W^-1, float64) of a rosinality InvConv2dLU / InvConv2d."""
    if "w_s" in ic._parameters:
        w = _lu_matrix(ic.w_p, ic.w_l, ic.w_u, ic.w_s, ic.s_sign)
    else:
        c = ic.weight.shape[0]
        w = ic.weight.reshape(c, c).double() if inverse else ic.weight
    return _inv(w) if inverse else w


def _ros_invconv_logdet(ic, x):
    hw = x.shape[2] * x.shape[3]
    if "w_s" in ic._parameters:
        return hw * torch.sum(ic.w_s)
    c = ic.weight.shape[0]
    return hw * torch.slogdet(ic.weight.reshape(c, c).double())[1].float()


def _ros_invconv_forward(m, input):
    return channel_mix(input, _ros_matrix(m, False)), _ros_invconv_logdet(m, input)


def _ros_invconv_reverse(m, output):
    return channel_mix(output, _ros_matrix(m, True))


def _ros_coupling_forward(m, input):
    h = m.net(input[:, :input.shape[1] - input.shape[1] // 2])
    if m.affine:
        return affine_coupling(input, h)
    return additive_coupling(input, h)[0], None


def _ros_coupling_reverse(m, output):
    h = m.net(output[:, :output.shape[1] - output.shape[1] // 2])
    if m.affine:
        return affine_coupling(output, h, reverse=True)[0]
    return additive_coupling(output, h, reverse=True)[0]


def _ros_flow_forward(m, input):
    an, ic = m.actnorm, m.invconv
    if _put_in_later(an, ic) or not an.logdet or _hooked(an) or _hooked(ic) or \
            not _flag_set(an, "initialized"):
        return type(m).forward(m, input)
    out = channel_mix(input, _ros_matrix(ic, False), loc=an.loc, scale=an.scale)
    logdet = _ros_actnorm_logdet(an, input) + _ros_invconv_logdet(ic, input)
    out, det2 = m.coupling(out)
    if det2 is not None:
        logdet = logdet + det2
    return out, logdet


def _ros_flow_reverse(m, output):
    if _put_in_later(m.actnorm, m.invconv):
        return type(m).reverse(m, output)
    x = m.coupling.reverse(output)
    an = m.actnorm
    return channel_mix(x, _ros_matrix(m.invconv, True), loc=an.loc, scale=an.scale,
                       reverse=True)


def _plan_ros_actnorm(m) -> _Plan:
    if not (_params(m, "loc", "scale") and _buffers(m, "initialized")
            and isinstance(getattr(m, "logdet", None), bool)):
        return None
    if m.loc.dim() != 4 or m.loc.shape != m.scale.shape or m.loc.shape[0] != 1 \
            or m.loc.shape[2:] != (1, 1):
        return (f"loc/scale shape {tuple(m.loc.shape)}, {tuple(m.scale.shape)}: expected "
                f"(1, C, 1, 1)")
    why = _modified(m, ("loc", "scale"), ("initialized",), (), ("logdet",), pair=False)
    if why:
        return why
    return _Swap("fastflow.channel_mix (ActNorm)",
                 {"forward": _ros_actnorm_forward, "reverse": _ros_actnorm_reverse})


def _plan_ros_invconv_lu(m) -> _Plan:
    if not (_params(m, "w_l", "w_s", "w_u")
            and _buffers(m, "w_p", "u_mask", "l_mask", "s_sign", "l_eye")):
        return None
    why = _lu_problem(m.w_p, m.w_l, m.w_u, m.w_s, m.s_sign,
                      ("w_p", "w_l", "w_u", "w_s", "s_sign")) or \
        _modified(m, ("w_l", "w_s", "w_u"), ("w_p", "u_mask", "l_mask", "s_sign", "l_eye"))
    if why:
        return why
    c = m.w_s.shape[0]
    u = torch.triu(torch.ones(c, c, device=m.u_mask.device), 1)
    if not (m.u_mask.shape == u.shape and torch.equal(m.u_mask.to(u.dtype), u)
            and m.l_mask.shape == u.shape and torch.equal(m.l_mask.to(u.dtype), u.T)
            and m.l_eye.shape == u.shape
            and torch.equal(m.l_eye.to(u.dtype), torch.eye(c, device=u.device))):
        return "u_mask/l_mask/l_eye are not the strict upper/lower masks and the identity"
    return _Swap("fastflow.lu_weight + channel_mix (InvConv2dLU)",
                 {"forward": _ros_invconv_forward, "reverse": _ros_invconv_reverse})


def _plan_ros_invconv(m) -> _Plan:
    if not _params(m, "weight"):
        return None
    w = m.weight
    if w.dim() != 4 or w.shape[0] != w.shape[1] or w.shape[2:] != (1, 1):
        return f"weight shape {tuple(w.shape)}: expected (C, C, 1, 1)"
    why = _modified(m, ("weight",))
    if why:
        return why
    return _Swap("fastflow.channel_mix (InvConv2d)",
                 {"forward": _ros_invconv_forward, "reverse": _ros_invconv_reverse})


def _plan_ros_coupling(m) -> _Plan:
    if not (isinstance(getattr(m, "net", None), nn.Module)
            and isinstance(getattr(m, "affine", None), bool)):
        return None
    why = _modified(m, modules=("net",), attrs=("affine",))
    if why:
        return why
    to = ("fastflow.affine_coupling(scale='sigmoid', layout='halves', shift='before')"
          if m.affine else "fastflow.additive_coupling")
    return _Swap(to, {"forward": _ros_coupling_forward, "reverse": _ros_coupling_reverse})


def _plan_ros_flow(m) -> _Plan:
    an, ic = getattr(m, "actnorm", None), getattr(m, "invconv", None)
    if not (isinstance(an, nn.Module) and isinstance(ic, nn.Module)
            and isinstance(getattr(m, "coupling", None), nn.Module)):
        return None
    an_plan = _stock(_plan_ros_actnorm(an), an) if type(an).__name__ == "ActNorm" else None
    ic_plan = _stock({"InvConv2dLU": _plan_ros_invconv_lu,
                      "InvConv2d": _plan_ros_invconv}.get(type(ic).__name__,
                                                          lambda _: None)(ic), ic)
    if an_plan is None or ic_plan is None:
        return None
    for child, plan in (("actnorm", an_plan), ("invconv", ic_plan)):
        if isinstance(plan, str):
            return f"{child} left alone ({plan}): nothing to fuse"
    why = _modified(m, modules=("actnorm", "invconv", "coupling"))
    if why:
        return why
    return _Swap("fastflow.channel_mix (actnorm + invconv fused), coupling as its module",
                 {"forward": _ros_flow_forward, "reverse": _ros_flow_reverse})
