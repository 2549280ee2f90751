"""``ff.patch(model)``: run the flow layers of an existing model on fastflow's fused ops.

Recognised (by class name and attributes; no peer library is imported):

* rosinality/glow-pytorch style: ``ActNorm`` (loc, scale, initialized, logdet), ``InvConv2dLU``,
  ``InvConv2d``, ``AffineCoupling`` (net, affine) and ``Flow`` (actnorm, invconv, coupling:
  ActNorm and the 1x1 convolution fused into one pass).
* normflows: ``ActNorm``, ``Invertible1x1Conv``, ``AffineCouplingBlock`` (split_mode
  "channel") and ``GlowBlock`` (its 1x1 convolution and ActNorm fused into one pass).
* FrEIA: ``AffineCouplingOneSided``, ``GLOWCouplingBlock``, ``RNVPCouplingBlock`` with the
  ATAN soft clamp.

A subclass named like its base, or a layer with a method replaced on the instance, may
compute something else: it is left alone (and so is a layer that would fuse it). So is a
rosinality-style layer with state or arguments rosinality's has not, or a forward that
returns the output alone (a modified copy: a flag, a layer inside it, a condition,
ArtFlow's layers); one that changes only the formula can't be told.

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
from typing import Callable, Optional

from torch import nn

from ._common import _MARK, PatchReport, _Plan, _stock
from .freia import _plan_freia
from .normflows import _plan_nf_actnorm, _plan_nf_conv, _plan_nf_coupling_block, _plan_nf_glow
from .rosinality import (
    _plan_ros_actnorm,
    _plan_ros_coupling,
    _plan_ros_flow,
    _plan_ros_invconv,
    _plan_ros_invconv_lu,
)

__all__ = ["patch", "PatchReport"]


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
            return _stock(plan, m)
    return _stock(_plan_freia(m), m)


_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def _why_unrecognised(m: nn.Module) -> str:
    """The reason a module of no known flow family is left alone."""
    name = type(m).__name__
    if name == "Squeeze" or "squeeze" in name.lower():
        return "a reshape (pixels to channels): no arithmetic to fuse"
    if name in ("Merge", "Split") or "downsampl" in name.lower() or "upsampl" in name.lower():
        return "a channel split / concatenation or reshape: no arithmetic to fuse"
    if callable(getattr(m, "log_prob", None)) and callable(getattr(m, "sample", None)):
        return "a base distribution (prior): not a flow layer, runs as it is"
    if hasattr(m, "dims_in") and hasattr(m, "dims_c") and next(m.children(), None) is None:
        return (f"FrEIA's {name}: fastflow swaps only FrEIA's ATAN affine coupling blocks; "
                "runs as it is")
    if name in _BY_CLASS_NAME:  # named like one, built otherwise (a user's own ActNorm)
        return (f"named like a known library's {name} but without its parameters, buffers "
                "or flags (listed in help(ff.patch)): left alone, runs as it is"
                + ("; its submodules were looked at one by one"
                   if next(m.children(), None) is not None else ""))
    if next(m.children(), None) is not None:
        return "not a known flow layer: its submodules were looked at one by one"
    return "no fastflow counterpart: runs as it is"


def patch(model: nn.Module, *, dry_run: bool = False) -> PatchReport:
    """Swap the recognised flow layers of ``model`` (normflows, FrEIA, rosinality-style) for
    fastflow's fused ops, in place; see the module docstring. Returns a ``PatchReport``
    (each swapped layer counted once; every module looked at and left alone listed with
    the reason); ``dry_run=True`` only reports."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(dry_run, bool):
        raise TypeError(f"dry_run: expected a bool, got {type(dry_run).__name__}")
    report = PatchReport(dry_run=dry_run)
    parents = {id(child): mod for mod in model.modules() for child in mod.children()}

    def owner(m):
        m = parents.get(id(m))
        while isinstance(m, _CONTAINERS):
            m = parents.get(id(m))
        return m

    swapped_units = []  # qualified names of swapped layers that count
    inside = []  # prefixes of recognised layers and fastflow modules: their insides

    def enclosing(qualname, names):
        # "" is the model itself, which encloses every other module
        return next((n for n in names if qualname != n and
                     (n == "" or qualname.startswith(n + "."))), None)

    for qualname, m in model.named_modules():
        if enclosing(qualname, [n for n, _ in inside if _ == "fastflow"]) is not None:
            continue
        if type(m).__module__.split(".")[0] == "fastflow":
            inside.append((qualname, "fastflow"))
            continue  # fastflow's own layers (same names as rosinality's) already are fused
        plan = _plan(m, owner(m))
        unit = enclosing(qualname, swapped_units)
        cls = type(m).__name__
        if plan is None:
            # not recognised: covered by an enclosing recognised layer, or left alone
            if qualname and not isinstance(m, _CONTAINERS) and \
                    enclosing(qualname, [n for n, _ in inside]) is None:
                report.left_alone.append((qualname, cls, _why_unrecognised(m)))
            continue
        if _MARK in m.__dict__:
            report.left_alone.append((qualname, cls, f"already patched: {m.__dict__[_MARK]}"))
            inside.append((qualname, "recognised"))
        elif isinstance(plan, str):
            # listed even inside a swapped layer (a GlowBlock's refused coupling block
            # runs its own code)
            report.left_alone.append((qualname, cls, plan))
            inside.append((qualname, "recognised"))
        else:
            if unit is None:
                report.swapped.append((qualname, cls, plan.to_what))
                swapped_units.append(qualname)
            else:
                report.parts.append((qualname, cls, plan.to_what, unit))
            inside.append((qualname, "recognised"))
            if not dry_run:
                for method, fn in plan.methods.items():
                    setattr(m, method, functools.partial(fn, m))
                setattr(m, _MARK, plan.to_what)
    return report
