"""``ff.patch(model)``: run the flow layers of an existing model on fastflow's fused ops.

Recognised (by class name and attributes; no peer library is imported):

* rosinality/glow-pytorch style: ``ActNorm`` (loc, scale, initialized), ``InvConv2dLU``,
  ``InvConv2d``, ``AffineCoupling`` (net, affine) and ``Flow`` (actnorm, invconv, coupling:
  ActNorm and the 1x1 convolution fused into one pass).
* normflows: ``ActNorm``, ``Invertible1x1Conv``, ``AffineCouplingBlock`` (split_mode
  "channel") and ``GlowBlock`` (its 1x1 convolution and ActNorm fused into one pass).
* FrEIA: ``AffineCouplingOneSided``, ``GLOWCouplingBlock``, ``RNVPCouplingBlock`` with the
  ATAN soft clamp.

Mechanism: the module stays where it is, of its class, with its parameters, buffers and
children; only its ``forward`` (and ``inverse``/``reverse``) become instance attributes,
``functools.partial(fastflow_function, module)``, that compute the same map with the fused
ops and read the module's own tensors on every call. So ``model.parameters()`` yields the
same Parameter objects, the state dict is unchanged, an existing optimizer keeps training
the model, and ``deepcopy``/pickling keep the patch. Data-dependent ActNorm initialisation
and anything else not covered runs the module's own class code.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from .ops.channel_mix import channel_mix, lu_weight
from .ops.coupling import additive_coupling, affine_coupling
from .reference import ATAN_FACTOR

_MARK = "_fastflow_patched"  # instance attribute naming what a patched module now runs


@dataclass
class PatchReport:
    """What ``patch`` did: ``swapped`` (qualified name, class, what runs now) and
    ``left_alone`` (qualified name, class, why); modules of no known family are not listed."""

    swapped: list = field(default_factory=list)
    left_alone: list = field(default_factory=list)
    dry_run: bool = False

    def __str__(self) -> str:
        head = (f"fastflow.patch{' (dry run)' if self.dry_run else ''}: "
                f"{len(self.swapped)} swapped, {len(self.left_alone)} left alone")
        lines = [head]
        for title, rows, last in (("swapped", self.swapped, "now runs"),
                                  ("left alone", self.left_alone, "reason")):
            if not rows:
                continue
            rows = [(name or "(model)", cls, what) for name, cls, what in rows]
            w0 = max(len("module"), *(len(r[0]) for r in rows))
            w1 = max(len("class"), *(len(r[1]) for r in rows))
            lines += ["", f"{title}:", f"  {'module':<{w0}}  {'class':<{w1}}  {last}"]
            lines += [f"  {a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
        return "\n".join(lines)


@dataclass
class _Swap:
    to_what: str
    methods: dict  # method name -> function(module, *args, **kwargs)


_Plan = Union[_Swap, str, None]  # swap, reason for leaving it alone, or not recognised


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------


def _tensors(m: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(m, n, None), torch.Tensor) for n in names)


def _params(m: nn.Module, *names: str) -> bool:
    return all(isinstance(m._parameters.get(n), nn.Parameter) for n in names)


def _buffers(m: nn.Module, *names: str) -> bool:
    return all(isinstance(m._buffers.get(n), torch.Tensor) for n in names)


def _flag_set(m: nn.Module, name: str) -> bool:
    """The init-flag buffer ``name`` is > 0. Read from the device once per buffer object and
    version: ``load_state_dict`` and in-place edits bump the version, ``.to()`` and the
    peers' own initialisation put a new tensor there."""
    buf = getattr(m, name)
    seen = m.__dict__.get("_fastflow_flag_seen")
    if seen is not None and seen[0] is buf and seen[1] == buf._version:
        return True
    if not bool(buf > 0):
        return False
    m.__dict__["_fastflow_flag_seen"] = (buf, buf._version)
    return True


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks")


def _hooked(m: nn.Module) -> bool:
    """Module or global forward/backward hooks that calling ``m`` would run (a fused path
    that skips calling ``m`` must not skip them)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks
                or any(getattr(_torch_module, n, None) for n in _GLOBAL_HOOKS))


def _lu_problem(p, lower, upper, log_s, sign, names) -> Optional[str]:
    """Why W = P (L + I)(U + diag(sign exp(log_s))) can't be assembled by ``lu_weight``."""
    n_p, n_l, n_u, n_s, n_sign = names
    if log_s.dim() != 1:
        return f"{n_s} has shape {tuple(log_s.shape)}, expected (C,)"
    c = log_s.shape[0]
    for n, t in ((n_p, p), (n_l, lower), (n_u, upper)):
        if tuple(t.shape) != (c, c):
            return f"{n} has shape {tuple(t.shape)}, expected ({c}, {c})"
    if tuple(sign.shape) != (c,) or not bool(((sign == 1) | (sign == -1)).all()):
        return f"{n_sign} is not a ({c},) vector of +-1"
    if not (bool(((p == 0) | (p == 1)).all()) and bool((p.sum(0) == 1).all())
            and bool((p.sum(1) == 1).all())):
        return f"{n_p} is not a permutation matrix"
    return None


def _lu_matrix(p, lower, upper, log_s, sign):
    """W = P (L + I)(U + diag(sign exp(log_s))) in float64 (L, U strictly lower/upper parts)."""
    return lu_weight(lower, upper, log_s, sign, p.argmax(dim=1), n=0)[0]


def _inv(w):
    """W^-1 without the host sync of ``torch.linalg.inv``'s error check (W is invertible
    by construction: triangular factors with an exp diagonal, or a trained free matrix)."""
    return torch.linalg.inv_ex(w)[0]


def _couple(op, x, h, **kw):
    """The coupling op on any (N, C, ...) tensor: other ranks as (N, C, prod(rest), 1)."""
    if x.dim() == 4:
        return op(x, h, **kw)
    n = x.shape[0]
    y, ld = op(x.reshape(n, x.shape[1], -1, 1), h.reshape(n, h.shape[1], -1, 1), **kw)
    return y.reshape(x.shape), ld


# --------------------------------------------------------------------------------------
# rosinality/glow-pytorch style modules
# --------------------------------------------------------------------------------------


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
    if not an.logdet or _hooked(an) or _hooked(ic) or not _flag_set(an, "initialized"):
        return type(m).forward(m, input)
    out = channel_mix(input, _ros_matrix(ic, False), loc=an.loc, scale=an.scale)
    logdet = _ros_actnorm_logdet(an, input) + _ros_invconv_logdet(ic, input)
    out, det2 = m.coupling(out)
    if det2 is not None:
        logdet = logdet + det2
    return out, logdet


def _ros_flow_reverse(m, output):
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
    return _Swap("fastflow.channel_mix (ActNorm)",
                 {"forward": _ros_actnorm_forward, "reverse": _ros_actnorm_reverse})


def _plan_ros_invconv_lu(m) -> _Plan:
    if not (_params(m, "w_l", "w_s", "w_u")
            and _buffers(m, "w_p", "u_mask", "l_mask", "s_sign", "l_eye")):
        return None
    why = _lu_problem(m.w_p, m.w_l, m.w_u, m.w_s, m.s_sign,
                      ("w_p", "w_l", "w_u", "w_s", "s_sign"))
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
    return _Swap("fastflow.channel_mix (InvConv2d)",
                 {"forward": _ros_invconv_forward, "reverse": _ros_invconv_reverse})


def _plan_ros_coupling(m) -> _Plan:
    if not (isinstance(getattr(m, "net", None), nn.Module)
            and isinstance(getattr(m, "affine", None), bool)):
        return None
    to = ("fastflow.affine_coupling(scale='sigmoid', layout='halves', shift='before')"
          if m.affine else "fastflow.additive_coupling")
    return _Swap(to, {"forward": _ros_coupling_forward, "reverse": _ros_coupling_reverse})


def _plan_ros_flow(m) -> _Plan:
    an, ic = getattr(m, "actnorm", None), getattr(m, "invconv", None)
    if not (isinstance(an, nn.Module) and isinstance(ic, nn.Module)
            and isinstance(getattr(m, "coupling", None), nn.Module)):
        return None
    an_plan = _plan_ros_actnorm(an) if type(an).__name__ == "ActNorm" else None
    ic_plan = {"InvConv2dLU": _plan_ros_invconv_lu,
               "InvConv2d": _plan_ros_invconv}.get(type(ic).__name__, lambda _: None)(ic)
    if an_plan is None or ic_plan is None:
        return None
    for child, plan in (("actnorm", an_plan), ("invconv", ic_plan)):
        if isinstance(plan, str):
            return f"{child} left alone ({plan}): nothing to fuse"
    return _Swap("fastflow.channel_mix (actnorm + invconv fused), coupling as its module",
                 {"forward": _ros_flow_forward, "reverse": _ros_flow_reverse})


# --------------------------------------------------------------------------------------
# normflows (forward = sampling direction, inverse = density direction)
# --------------------------------------------------------------------------------------

# scale_map -> (fastflow scale, shift, whether normflows' forward is fastflow's reverse)
_NF_MAPS = {
    "exp": ("exp", "after", False),            # forward z2 * exp(a) + t
    "sigmoid": ("sigmoid", "negated", True),   # forward z2 / sigmoid(a + 2) + t
    "sigmoid_inv": ("sigmoid", "after", False),  # forward z2 * sigmoid(a + 2) + t
}


def _nf_coupling_block(m, z, inverse: bool):
    coupling = m.flows[1]
    param = coupling.param_map(z[:, :z.shape[1] - z.shape[1] // 2])  # z.chunk(2, 1)[0]
    if coupling.scale:
        scale, shift, flip = _NF_MAPS[coupling.scale_map]
        y, ld = _couple(affine_coupling, z, param, scale=scale, layout="interleaved",
                        shift=shift, reverse=inverse != flip)
    else:
        y, ld = _couple(additive_coupling, z, param, reverse=inverse)
    log_det_tot = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    log_det_tot += ld
    return y, log_det_tot


def _nf_coupling_block_forward(m, z):
    return _nf_coupling_block(m, z, False)


def _nf_coupling_block_inverse(m, z):
    return _nf_coupling_block(m, z, True)


def _nf_matrix(conv, inverted: bool):
    """W (or W^-1, float64) of a normflows Invertible1x1Conv."""
    if conv.use_lu:
        w = _lu_matrix(conv.P, conv.L, conv.U, conv.log_S, conv.sign_S)
    else:
        w = conv.W.double() if inverted else conv.W
    return _inv(w) if inverted else w


def _nf_conv_logdet(conv, z, inverted: bool):
    ld = torch.sum(conv.log_S) if conv.use_lu else torch.slogdet(conv.W)[1]
    return (-ld if inverted else ld) * z.size(2) * z.size(3)


def _nf_conv_forward(m, z):
    return channel_mix(z, _nf_matrix(m, True)), _nf_conv_logdet(m, z, True)


def _nf_conv_inverse(m, z):
    return channel_mix(z, _nf_matrix(m, False)), _nf_conv_logdet(m, z, False)


def _nf_actnorm_logdet(an, z, sign: int):
    return sign * (z.shape[2] * z.shape[3]) * torch.sum(an.s)


def _nf_actnorm_forward(m, z):
    if not _flag_set(m, "data_dep_init_done"):
        return type(m).forward(m, z)  # its own data-dependent initialisation
    # z * exp(s) + t as ActNorm's inverse form z / exp(-s) - (-t)
    y = channel_mix(z, loc=-m.t, scale=torch.exp(-m.s), reverse=True)
    return y, _nf_actnorm_logdet(m, z, 1)


def _nf_actnorm_inverse(m, z):
    if not _flag_set(m, "data_dep_init_done"):
        return type(m).inverse(m, z)
    y = channel_mix(z, loc=-m.t, scale=torch.exp(-m.s))  # (z - t) * exp(-s)
    return y, _nf_actnorm_logdet(m, z, -1)


def _nf_glow_forward(m, z):
    coupling, conv, an = m.flows
    if _hooked(conv) or _hooked(an) or not _flag_set(an, "data_dep_init_done"):
        return type(m).forward(m, z)
    log_det_tot = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    z, ld = coupling(z)
    log_det_tot += ld
    y = channel_mix(z, _nf_matrix(conv, True), loc=-an.t, scale=torch.exp(-an.s), reverse=True)
    log_det_tot += _nf_conv_logdet(conv, z, True)
    log_det_tot += _nf_actnorm_logdet(an, z, 1)
    return y, log_det_tot


def _nf_glow_inverse(m, z):
    coupling, conv, an = m.flows
    if not _flag_set(an, "data_dep_init_done"):
        return type(m).inverse(m, z)
    log_det_tot = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    y = channel_mix(z, _nf_matrix(conv, False), loc=-an.t, scale=torch.exp(-an.s))
    log_det_tot += _nf_actnorm_logdet(an, z, -1)
    log_det_tot += _nf_conv_logdet(conv, z, False)
    y, ld = coupling.inverse(y)
    log_det_tot += ld
    return y, log_det_tot


def _plan_nf_actnorm(m) -> _Plan:
    if not (_tensors(m, "s", "t") and _buffers(m, "data_dep_init_done")):
        return None
    s, t = m.s, m.t
    if s.dim() != 4 or s.shape != t.shape or s.shape[0] != 1 or s.shape[2:] != (1, 1):
        return f"s/t shape {tuple(s.shape)}, {tuple(t.shape)}: only per-channel (1, C, 1, 1)"
    return _Swap("fastflow.channel_mix (ActNorm)",
                 {"forward": _nf_actnorm_forward, "inverse": _nf_actnorm_inverse})


def _plan_nf_conv(m) -> _Plan:
    if not isinstance(getattr(m, "use_lu", None), bool):
        return None
    if m.use_lu:
        if not (_params(m, "L", "U", "log_S") and _buffers(m, "P", "sign_S", "eye")):
            return None
        why = _lu_problem(m.P, m.L, m.U, m.log_S, m.sign_S, ("P", "L", "U", "log_S", "sign_S"))
        if why:
            return why
        c = m.log_S.shape[0]
        if m.eye.shape != (c, c) or not torch.equal(m.eye, torch.eye(c, dtype=m.eye.dtype,
                                                                    device=m.eye.device)):
            return "eye buffer is not the identity"
        return _Swap("fastflow.lu_weight + channel_mix (Invertible1x1Conv)",
                     {"forward": _nf_conv_forward, "inverse": _nf_conv_inverse})
    if not _params(m, "W"):
        return None
    if m.W.dim() != 2 or m.W.shape[0] != m.W.shape[1]:
        return f"W shape {tuple(m.W.shape)}: expected (C, C)"
    return _Swap("fastflow.channel_mix (Invertible1x1Conv)",
                 {"forward": _nf_conv_forward, "inverse": _nf_conv_inverse})


def _plan_nf_coupling_block(m) -> _Plan:
    flows = getattr(m, "flows", None)
    if not (isinstance(flows, nn.ModuleList) and len(flows) == 3
            and [type(f).__name__ for f in flows] == ["Split", "AffineCoupling", "Merge"]):
        return None
    split, coupling, merge = flows
    if split.mode != "channel" or merge.mode != "channel":
        return (f"split_mode {split.mode!r}: fastflow's op keeps the first C - C//2 channels "
                f"fixed (split_mode 'channel' only)")
    if coupling.scale and coupling.scale_map not in _NF_MAPS:
        return f"scale_map {coupling.scale_map!r}: expected one of {tuple(_NF_MAPS)}"
    if not coupling.scale:
        to = "fastflow.additive_coupling"
    else:
        scale, shift, flip = _NF_MAPS[coupling.scale_map]
        to = (f"fastflow.affine_coupling(scale={scale!r}, layout='interleaved', "
              f"shift={shift!r}){', reverse=True as its forward' if flip else ''}")
    return _Swap(to, {"forward": _nf_coupling_block_forward,
                      "inverse": _nf_coupling_block_inverse})


def _plan_nf_glow(m) -> _Plan:
    flows = getattr(m, "flows", None)
    if not isinstance(flows, nn.ModuleList):
        return None
    names = [type(f).__name__ for f in flows]
    if names != ["AffineCouplingBlock", "Invertible1x1Conv", "ActNorm"]:
        return (f"flows {names}: expected [AffineCouplingBlock, Invertible1x1Conv, ActNorm] "
                f"(nothing to fuse)")
    for child, plan in (("Invertible1x1Conv", _plan_nf_conv(flows[1])),
                        ("ActNorm", _plan_nf_actnorm(flows[2]))):
        if not isinstance(plan, _Swap):
            return f"its {child} is left alone ({plan or 'not recognised'}): nothing to fuse"
    return _Swap("fastflow.channel_mix (Invertible1x1Conv + ActNorm fused), coupling as its "
                 "module", {"forward": _nf_glow_forward, "inverse": _nf_glow_inverse})


# --------------------------------------------------------------------------------------
# FrEIA (forward(x, c=[], rev=False, jac=True) -> ((y,), log_jac_det))
# --------------------------------------------------------------------------------------

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
    return torch.cat([raw * m.clamp, t], 1)


def _freia_couple(m, x, h, rev):
    return _couple(affine_coupling, x, h, scale="atan", layout="halves", shift="after",
                   clamp=m.clamp, reverse=rev)


def _freia_one_sided(m, x, c=(), rev=False, jac=True):
    x0 = x[0]
    a = m.subnet(_freia_cond(m, x0[:, :m.split_len1], c))
    y, j = _freia_couple(m, x0, _freia_h(m, a[:, :m.split_len2], a[:, m.split_len2:]), rev)
    return (y,), j


def _freia_two_sided(m, x, c, rev, net1, net2):
    """FrEIA's two couplings on equal halves: the first transforms x1 from x2 (``net2``),
    the second x2 from y1 (``net1``). fastflow's op keeps the leading half fixed, so the
    halves are swapped (one copy) around the coupling that transforms the leading half."""
    x0 = x[0]
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
    if not (isinstance(m.clamp, (int, float)) and m.clamp > 0):
        return f"clamp {m.clamp!r}: fastflow needs a positive clamp"
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
                 f"clamp={m.clamp}){extra}", {"forward": fn})


# --------------------------------------------------------------------------------------
# The public entry point
# --------------------------------------------------------------------------------------

_BY_CLASS_NAME: dict[str, tuple[Callable[[nn.Module], _Plan], ...]] = {
    "ActNorm": (_plan_ros_actnorm, _plan_nf_actnorm),
    "InvConv2dLU": (_plan_ros_invconv_lu,),
    "InvConv2d": (_plan_ros_invconv,),
    "AffineCoupling": (_plan_ros_coupling,),
    "Flow": (_plan_ros_flow,),
    "Invertible1x1Conv": (_plan_nf_conv,),
    "AffineCouplingBlock": (_plan_nf_coupling_block,),
    "GlowBlock": (_plan_nf_glow,),
}


def _plan(m: nn.Module, owner: Optional[nn.Module]) -> _Plan:
    """``owner``: the nearest enclosing module that is not a ModuleList/Sequential/Dict."""
    name = type(m).__name__
    if name == "AffineCoupling" and isinstance(getattr(m, "param_map", None), nn.Module):
        # normflows' coupling on a list [z1, z2]: swapped as part of its AffineCouplingBlock
        if owner is not None and type(owner).__name__ == "AffineCouplingBlock":
            return None  # reported with its block
        return ("normflows coupling on a list [z1, z2] outside an AffineCouplingBlock: the "
                "fused op needs the whole tensor")
    for plan_fn in _BY_CLASS_NAME.get(name, ()):
        plan = plan_fn(m)
        if plan is not None:
            return plan
    return _plan_freia(m)


def patch(model: nn.Module, *, dry_run: bool = False) -> PatchReport:
    """Swap the recognised flow layers of ``model`` (normflows, FrEIA, rosinality-style) for
    fastflow's fused ops, in place; see the module docstring. Returns a ``PatchReport``;
    ``dry_run=True`` only reports."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(dry_run, bool):
        raise TypeError(f"dry_run: expected a bool, got {type(dry_run).__name__}")
    report = PatchReport(dry_run=dry_run)
    parents = {id(child): mod for mod in model.modules() for child in mod.children()}

    def owner(m):
        m = parents.get(id(m))
        while isinstance(m, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            m = parents.get(id(m))
        return m

    for qualname, m in model.named_modules():
        if type(m).__module__.split(".")[0] == "fastflow":
            continue  # fastflow's own layers (same names as rosinality's) already are fused
        plan = _plan(m, owner(m))
        if plan is None:
            continue
        cls = type(m).__name__
        if _MARK in m.__dict__:
            report.left_alone.append((qualname, cls, f"already patched: {m.__dict__[_MARK]}"))
        elif isinstance(plan, str):
            report.left_alone.append((qualname, cls, plan))
        else:
            report.swapped.append((qualname, cls, plan.to_what))
            if not dry_run:
                for method, fn in plan.methods.items():
                    setattr(m, method, functools.partial(fn, m))
                setattr(m, _MARK, plan.to_what)
    return report
