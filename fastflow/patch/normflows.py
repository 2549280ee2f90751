"""normflows' ActNorm, Invertible1x1Conv, AffineCouplingBlock and GlowBlock."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.channel_mix import channel_mix
from ..ops.coupling import additive_coupling, affine_coupling
from ._common import (
    _buffers,
    _couple,
    _flag_set,
    _hooked,
    _inv,
    _lu_matrix,
    _lu_problem,
    _not_stock,
    _params,
    _Plan,
    _put_in_later,
    _stock,
    _Swap,
    _tensors,
)

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
    if any(_hooked(f) for f in m.flows):  # calling its Split/AffineCoupling/Merge runs them
        return type(m).forward(m, z)
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
    # its own data-dependent initialisation, or s of shape (1, 1, 1, 1) broadcast over
    # C > 1 channels (its log-det then counts C)
    if m.s.shape[1] != z.shape[1] or not _flag_set(m, "data_dep_init_done"):
        return type(m).forward(m, z)
    # z * exp(s) + t as ActNorm's inverse form z / exp(-s) - (-t)
    y = channel_mix(z, loc=-m.t, scale=torch.exp(-m.s), reverse=True)
    return y, _nf_actnorm_logdet(m, z, 1)


def _nf_actnorm_inverse(m, z):
    if m.s.shape[1] != z.shape[1] or not _flag_set(m, "data_dep_init_done"):
        return type(m).inverse(m, z)
    y = channel_mix(z, loc=-m.t, scale=torch.exp(-m.s))  # (z - t) * exp(-s)
    return y, _nf_actnorm_logdet(m, z, -1)


def _nf_glow_forward(m, z):
    coupling, conv, an = m.flows
    if _put_in_later(conv, an) or _hooked(conv) or _hooked(an) or \
            an.s.shape[1] != z.shape[1] or not _flag_set(an, "data_dep_init_done"):
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
    if _put_in_later(conv, an) or an.s.shape[1] != z.shape[1] or \
            not _flag_set(an, "data_dep_init_done"):
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
    for f in flows:  # the fused op runs in place of their code
        why = _not_stock(f)
        if why:
            return f"its {type(f).__name__} is {why}"
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
    for child, plan in (("Invertible1x1Conv", _stock(_plan_nf_conv(flows[1]), flows[1])),
                        ("ActNorm", _stock(_plan_nf_actnorm(flows[2]), flows[2]))):
        if not isinstance(plan, _Swap):
            return f"its {child} is left alone ({plan or 'not recognised'}): nothing to fuse"
    return _Swap("fastflow.channel_mix (Invertible1x1Conv + ActNorm fused), coupling as its "
                 "module", {"forward": _nf_glow_forward, "inverse": _nf_glow_inverse})
