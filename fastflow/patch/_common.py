"""The pieces every family of ``fastflow.patch`` shares: the report, the plan type and
small helpers."""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from ..ops.lu_weight import lu_weight_logdet

_MARK = "_fastflow_patched"  # instance attribute naming what a patched module now runs


@dataclass
class PatchReport:
    """What ``patch`` did.

    * ``swapped``: (qualified name, class, what runs now), one row per swapped layer;
    * ``parts``: (qualified name, class, what runs now, the swapped layer it belongs to):
      submodules of a swapped layer that were patched too (so calling them directly also
      runs the fused ops) but are covered by their layer's row and not counted again;
    * ``left_alone``: (qualified name, class, why) for every other module it looked at:
      recognised layers it could not swap, and modules with no fastflow counterpart
      (reshapes such as Squeeze, channel Split/Merge, priors, networks outside a flow
      layer, unknown composites). Not listed: the model itself, pure containers
      (``ModuleList``, ``ModuleDict``, ``Sequential``), fastflow's own layers, and the
      submodules of a recognised layer (its networks run inside it) other than recognised
      layers it could not swap (a swapped GlowBlock's refused coupling block is listed)."""

    swapped: list = field(default_factory=list)
    left_alone: list = field(default_factory=list)
    dry_run: bool = False
    parts: list = field(default_factory=list)

    def __str__(self) -> str:
        parts = f" ({len(self.parts)} submodules patched with them)" if self.parts else ""
        head = (f"fastflow.patch{' (dry run)' if self.dry_run else ''}: "
                f"{len(self.swapped)} swapped{parts}, {len(self.left_alone)} left alone")
        lines = [head]
        swapped = []
        for name, cls, what in self.swapped:
            swapped.append((name, cls, what))
            swapped += [(f"  {n}", c, f"part of it: {w}") for n, c, w, owner in self.parts
                        if owner == name]
        for title, rows, last in (("swapped", swapped, "now runs"),
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


def _not_stock(m: nn.Module) -> Optional[str]:
    """Why ``m`` may not run the code of the class its name was recognised by: a subclass
    named like one of its bases (``class ActNorm(nf.flows.ActNorm)``), or methods replaced
    on the instance (not by ``patch`` itself). Either may change the map, which the fused
    ops would then not reproduce."""
    cls = type(m)
    if any(base.__name__ == cls.__name__ for base in cls.__mro__[1:]):
        return (f"a subclass of another class named {cls.__name__} (its overrides are not "
                f"known to fastflow): runs its own code")
    own = [k for k, v in m.__dict__.items()
           if callable(v) and not isinstance(v, (nn.Module, torch.Tensor))
           and callable(getattr(cls, k, None))
           and not (isinstance(v, functools.partial)
                    and getattr(v.func, "__module__", "").startswith(__package__))]
    if own:
        return f"{', '.join(own)} replaced on the instance: runs its own code"
    return None


def _stock(plan: _Plan, m: nn.Module) -> _Plan:
    """``plan``, or the reason a recognised ``m`` is left alone (see ``_not_stock``)."""
    return (_not_stock(m) or plan) if isinstance(plan, _Swap) else plan


def _tensors(m: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(m, n, None), torch.Tensor) for n in names)


def _params(m: nn.Module, *names: str) -> bool:
    return all(isinstance(m._parameters.get(n), nn.Parameter) for n in names)


def _buffers(m: nn.Module, *names: str) -> bool:
    return all(isinstance(m._buffers.get(n), torch.Tensor) for n in names)


# module -> (flag buffer, version) last read as set; kept outside the module so that its
# copies (deepcopy, pickling: new tensors whose versions restart) read their flag again
_FLAG_SEEN: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _flag_set(m: nn.Module, name: str) -> bool:
    """The init-flag buffer ``name`` is > 0. Read from the device once per buffer object and
    version: ``load_state_dict`` and in-place edits bump the version, ``.to()`` and the
    peers' own initialisation put a new tensor there. An inference tensor (no version
    counter) is read on every call."""
    buf = getattr(m, name)
    if buf.is_inference():  # set under torch.inference_mode: no version to cache it by
        return bool(buf > 0)
    seen = _FLAG_SEEN.get(m)
    if seen is not None and seen[0] is buf and seen[1] == buf._version:
        return True
    if not bool(buf > 0):
        return False
    _FLAG_SEEN[m] = (buf, buf._version)
    return True


def _put_in_later(*children: nn.Module) -> bool:
    """A child of a fused layer that ``patch`` did not look at (put in after it ran): its
    code may not be the map the fused op computes from its tensors."""
    return any(_MARK not in c.__dict__ for c in children)


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
    if any(t.is_meta for t in (p, lower, upper, log_s, sign)):
        return "its tensors are on the meta device (no values to check): patch after loading"
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
    return lu_weight_logdet(lower, upper, log_s, sign, p.argmax(dim=1), n=0)[0]


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
