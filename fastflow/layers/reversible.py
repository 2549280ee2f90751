"""Memory-free training of flow chains: a backward that rebuilds each step's input from its
output instead of keeping activations.

``ReversibleSequence(steps)`` runs a chain of fastflow flow steps (``FlowStep``, ``ActNorm``,
``InvConv2d``, ``InvConv2dLU``, ``AffineCoupling``) like ``nn.Sequential`` would, returning
``(y, logdet)``. In training its forward keeps only the chain's output and per-sample
log-det (plus a small fixed fallback reserve, below); the backward walks the chain from the
end, one stage at a time (a ``FlowStep`` is two stages: ActNorm + 1x1 convolution fused, then
the coupling):

* coupling stage: its pass-through half is the output's (``ya = xa`` bitwise), so the
  coupling network runs once, with gradients on, on ``ya``; that ``h`` drives the fused
  inverse (rebuilding the stage input) and the op's from-output backward
  (``coupling_backward(..., from_output=True)``), and ``h``'s gradient goes back through
  the network by an ordinary ``torch.autograd.backward``; the network input's gradient
  goes to the mix stage before it, where that is a FlowStep's whose stored forward feeds
  the network from the mix (``FlowStep._coupling_takes_head``: a stock, unhooked
  coupling);
* channel-mix stage: the matrix W (and its log-det) is assembled with gradients on, the
  input is rebuilt with W^-1 (``torch.linalg.inv_ex``: no host sync), and the one
  channel-mix op is re-run on the rebuilt input to back-propagate into W, loc and scale.
  As in the stored FlowStep, that op is ``channel_mix_split`` on the Triton path for a
  FlowStep feeding its coupling network, in forward (the network reads its head: no
  slice) and in the recompute (its backward adds the network input's gradient inside
  its launches: no slice + add per step); on the reference path the stage adds that
  gradient to the coupling's, as before. Per Glow train step (2 blocks, N=4 3x16x16,
  filter 32), K=4 / 8 / 16: Triton path 1426 / 2602 / 4954 -> 1402 / 2554 / 4858 ATen
  ops counted on the CPU (per step: a slice and an add_ fewer in backward, a slice and the
  first convolution's input copy fewer in forward, two more inside the split ops, forward
  and recompute), launches the same (78 / 150 / 294); reference path unchanged (2170 /
  3930 / 7450).
  With ``MIN_STACK`` or more ``FlowStep``s with an ``InvConv2dLU`` in the chain, their W
  and log-dets are assembled as one stack (``FlowStep.forward_matrices``, as a stored
  Glow block does), in forward and again in backward; each stage then back-propagates
  into its W and scale as far as detached copies, and one backward through the stack
  at the end delivers the LU factors' and scales' gradients (each parameter's once).
  Per Glow train step (2 blocks, K=8, with the batched casts of the condition estimate
  and W^-1): reference path 3548 ATen ops instead of 4320; Triton path 150 launches
  instead of 192 and 2220 ATen ops instead of 2272 (K=4: 78 launches instead of 96, 1236
  ATen ops instead of 1232). The parameters' detached leaves (below) add two ``detach``
  ops per chain parameter (K=4 / 8 / 16: +190 / +382 / +766 ATen ops; no launch).

Activation memory of the chain is therefore flat in its length: at any time at most one
stage's recomputed activations exist.

What else it meets:

* ActNorm's data-dependent initialisation: a call while any ActNorm of the chain is in
  training mode (its own flag, whatever the chain's) and not initialised runs the chain
  the ordinary way (stored activations).
* Autocast: the forward's autocast state (enabled, dtype, cache) for the input's device is
  recorded and replayed around every recompute, while the backward's own ops (autograd
  through the recomputed stages, the coupling's vector-Jacobian product) run under the
  caller's, as the stored graph's do; the backend mode in force at forward
  (``fastflow.use_backend``) is replayed too, since autograd may run backward on another
  thread.
* Parameter gradients: the chain's parameters that require grad are inputs of its
  autograd node, which returns their gradients. The recompute reads detached leaves of
  them (swapped into the modules for the backward), each collecting its gradient over
  every stage that uses it (a step that appears twice in the chain included), and the
  node returns the sums: autograd then does what it does for any input, so ``.grad`` is
  accumulated into once per parameter and backward (gradient accumulation, tensor hooks
  and DDP's per-parameter hooks as on the stored model), ``torch.autograd.grad(loss,
  params)`` and ``backward(inputs=[...])`` get exactly the gradients asked for and
  leave every other ``.grad`` alone. DDP's bucketed all-reduces of a chain's parameters
  start when its node's backward ends (the next chain's backward overlaps them);
  ``find_unused_parameters`` may be either. The parameters' version counters are
  recorded at forward: one changed in place between forward and backward (an optimizer
  step in between) makes the backward raise autograd's in-place error, since the
  recompute would read the new value where the stored graph holds the forward's. A write
  that moves no version counter (through ``.data``; a fused optimizer step,
  ``torch.optim.Adam(fused=True)``, in torch 2.13) is not seen, as autograd's own check
  does not see it for a stored graph's saved tensors: the recompute then reads the new
  values.
* ``torch.func.functional_call``: its tensors are swapped in for the call only, and the
  backward runs after it, so the forward records every module's parameters and buffers
  and the backward recomputes with those (gradients go to the swapped tensors, not to
  the module's own: the node's inputs are the swapped tensors). A parameter computed from
  others (one with a ``grad_fn``) makes the call run the ordinary way: the stages'
  backward stops at the chain's parameters.
* Random numbers and buffers: a coupling network that draws random numbers (dropout) or
  reads buffers that its forward updates (spectral norm's power iteration) computes in
  the recompute what it computed in forward: the generators' states (the CPU's, and the
  input's accelerator's, not while a CUDA graph is being captured) and the buffers of its
  training-mode modules are recorded before each network runs in forward and set for its
  recompute, as ``torch.utils.checkpoint`` does for the generators; afterwards the
  caller's random stream and the buffers are as the forward left them.
* Training flags: every module's ``training`` flag is recorded at forward and set for the
  recompute, so a model (or a submodule) switched to eval mode between forward and
  backward recomputes the training-mode forward it took (dropout's masks, BatchNorm's
  batch statistics), as the stored graph holds it; the flags are set back afterwards,
  also when the backward raises.
* No state is updated by the recompute: it never calls a step's ``forward`` (so no ActNorm
  initialisation, no hooks of the step modules), builds W afresh (the layers cache nothing)
  and sets the coupling networks' buffers back to their values before it (a network's
  BatchNorm updates its running statistics once per forward, as without the chain). A
  stock coupling network (convolutions, ReLU, ``ZeroConv2d``) draws no random numbers and
  holds no buffers: nothing is recorded for it.
* Module hooks (forward, forward pre-, backward) registered on the steps (or their
  ActNorm / 1x1 convolution / coupling submodules) would not run on the reversible path,
  whose stages never call those modules: a chain holding such a hook runs the ordinary
  way (stored activations), as a ``FlowStep`` with a hooked submodule leaves its fused
  path, so the hooks run and whatever they change is computed. A global module hook
  (``torch.nn.modules.module.register_module_forward_hook``, ``..._forward_pre_hook``,
  ``register_module_full_backward_hook``, ``..._full_backward_pre_hook``) makes every
  chain run the ordinary way likewise while it is registered. The coupling networks are
  called: their own hooks run in forward and again in the recompute.
* Activations stored in bfloat16 / float16 (a half-precision model, not autocast) rebuild
  only to that precision: gradients then differ from the stored ones at that level.
* ``torch.compile``: the reversible chain runs eagerly (``torch.compiler.disable``), so a
  compiled model graph-breaks around each chain; ``fullgraph=True`` cannot include it.
* Double backward (``create_graph=True``) is not supported and raises. A coupling network
  with reentrant checkpointing (``use_reentrant=True``) inside fails in backward (it refuses
  the ``inputs=`` the recompute passes): use ``use_reentrant=False``.

Numerical drift and the fallback: the rebuilt input differs from the true one by rounding,
amplified by the inverse of each stage. Each stage's amplification is estimated on the
device during forward (coupling: ``max(1, s_max) / s_min`` over the scales; channel mix:
the infinity-norm condition number of W times ``max|scale| / min|scale|``). A stage whose
estimate exceeds ``fallback_cond`` has its input written to a preallocated reserve of
``fallback_slots`` input-sized buffers with ``torch.where`` (no host sync, no
data-dependent allocation); backward takes the stored input instead of the rebuilt one for
such a stage, which also stops the error from propagating further up the chain.
``fallback_count`` (a device tensor buffer, cumulative; from zero again when a state dict
of the chain is loaded) counts stage inputs kept this way,
``fallback_overflow`` the flagged stages that found the reserve full (those are rebuilt,
possibly inexactly: raise ``fallback_slots``). Reading them is the only sync, at the
caller's choice.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch
from torch import nn

from .. import reference
from ..backend import compute_dtype, current_mode, use_backend, use_triton
from ..ops._checks import check_float_tensor, check_module_device, check_nchw, first_parameter
from ..ops.channel_mix import actnorm_invconv, channel_mix, channel_mix_split
from ..ops.coupling import additive_coupling, affine_coupling, coupling_backward
from .channel_mix import ActNorm, InvConv2d, InvConv2dLU
from .coupling import AffineCoupling, ZeroConv2d, replaced_on_instance
from .flowstep import FlowStep, _hooked as _module_hooked

__all__ = ["ReversibleSequence"]

_STEP_TYPES = (FlowStep, ActNorm, InvConv2d, InvConv2dLU, AffineCoupling)


def _requiring(params):
    return [p for p in params if p.requires_grad]


def _backprop(outputs, grads, inputs, caller):
    """``torch.autograd.backward`` over the (output, grad) pairs that carry a graph and a
    gradient, accumulating into ``inputs`` (leaves that require grad) only, under the
    autocast state ``caller`` (the backward caller's, as the stored graph's backward ops
    run: not the forward's, which the recompute replays)."""
    pairs = [(o, g) for o, g in zip(outputs, grads)
             if o is not None and o.requires_grad and g is not None]
    inputs = [t for t in inputs if t.requires_grad]
    if pairs and inputs:
        with _autocast(caller):
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs],
                                    inputs=inputs)


# --------------------------------------------------------------------------------------
# Stages: a forward under no_grad that also estimates how ill-conditioned its inverse is,
# and a backward from the output that rebuilds the input
# --------------------------------------------------------------------------------------


def _flowstep_matrices(seq, x):
    """{step index: (W, log-det, H*W)} of the chain's ``FlowStep``s with an
    ``InvConv2dLU``, assembled as one stack by ``FlowStep.forward_matrices`` (what
    stored-activation Glow does for a block; gradients recorded if enabled), wherever they
    sit in the chain (the matrices do not depend on the input's values); {} when they do
    not stack (fewer than ``MIN_STACK``, a hook, ...: each step then assembles its own)."""
    found = [i for i, step in enumerate(seq)
             if type(step) is FlowStep and type(step.invconv) is InvConv2dLU]
    mats = FlowStep.forward_matrices([seq[i] for i in found], x) if found else None
    return {} if mats is None else dict(zip(found, mats))


def _stacked_matrices(seq, steps, x):
    """``_flowstep_matrices`` by stage index, (W, log-det) each. ``steps``: the stages of
    each step."""
    mats = _flowstep_matrices(seq, x)
    if not mats:
        return {}
    offsets = [0]
    for stages in steps:
        offsets.append(offsets[-1] + len(stages))
    return {offsets[i]: m[:2] for i, m in mats.items()}


def _mix_conds(stages, x, check=True, stacked=None):
    """The inverse condition estimates of all channel-mix stages, in one batch: the
    infinity-norm condition number of W times max|scale| / min|scale| (float64, on the
    device). Every mix stage's (W, log-det) is assembled here, once, without gradients
    (the layers cache nothing), or taken from ``stacked`` ({stage index: (W, log-det)}).
    Returns ([(w, ld) or None per stage], conds)."""
    mats, spreads, prepared = [], [], []
    for index, st in enumerate(stages):
        if not isinstance(st, _MixStage):
            prepared.append(None)
            continue
        w, ld = stacked[index] if stacked and index in stacked else st.prepare(x)
        prepared.append((w, ld))
        if not check:
            continue
        c = x.shape[1]
        mats.append(torch.eye(c, dtype=torch.float64, device=x.device) if w is None
                    else w if w.dim() == 2 else w.reshape(c, c))
        spreads.append(None if st.an is None else st.an.scale)  # (no grad: forward's)
    if not mats:
        return prepared, None
    # one cast for all, the stack promoting (outside autocast: a 16-bit W of the other
    # kind, InvConv2d's own weight, is refused by autocast's promote policy)
    w = reference.flow_stack(mats).to(torch.float64)
    w_inv = torch.linalg.inv_ex(w)[0]
    cond = w.abs().sum(2).amax(1) * w_inv.abs().sum(2).amax(1)
    if any(sp is not None for sp in spreads):
        ones = torch.ones_like(next(sp for sp in spreads if sp is not None))
        a = reference.flow_stack([ones if sp is None else sp for sp in spreads])
        a = a.reshape(len(spreads), -1).abs().to(torch.float64)
        cond = cond * (a.amax(1) / a.amin(1))
    return prepared, cond


class _MixStage:
    """ActNorm and/or an invertible 1x1 convolution, as FlowStep (fused) or the layers
    alone compute them. ``split``: a FlowStep's whose coupling takes its network's input
    from the mix (``FlowStep._coupling_takes_head``), the channels that input has; None
    otherwise."""

    def __init__(self, actnorm, invconv, split=None):
        self.an, self.inv, self.split = actnorm, invconv, split

    def params(self):
        mods = [m for m in (self.an, self.inv) if m is not None]
        return _requiring([p for m in mods for p in m.parameters()])

    def _matrix(self, x):
        """(W, log-det of the whole stage) with gradients on (no cache involved). W is for
        the mix (``for_mix``: with the LU layer on the Triton path, already in x's compute
        dtype, no cast); the condition estimate and W^-1 are taken of that same matrix."""
        scale = self.an.scale if self.an is not None else None
        return self.inv.matrix_and_logdet(x, scale, for_mix=True)

    def _takes_head(self, x) -> bool:
        """The mix's launch writes the coupling network's input as a second output, as in
        the stored FlowStep: a ``split`` stage on the Triton path (on the reference path
        ``channel_mix_split``'s head is a slice of out, which the coupling stage takes)."""
        return self.split is not None and use_triton(x)

    def _apply(self, x, w, scale=None):
        """(out, head): ``head`` the coupling network's input from the same launch
        (``channel_mix_split``) where ``_takes_head``, else None. ``scale``: ActNorm's
        scale, or a detached copy of it."""
        an = self.an
        if an is None:
            return channel_mix(x, w), None
        scale = an.scale if scale is None else scale
        if not self._takes_head(x):
            return channel_mix(x, w, loc=an.loc, scale=scale), None
        return channel_mix_split(x, w, loc=an.loc, scale=scale, split=self.split)

    def prepare(self, x):
        """(W detached, or None for ActNorm alone; the stage's log-det detached, or None)."""
        if self.inv is None:
            return None, None
        with torch.no_grad():  # the layers keep no no-grad cache: this is the same W
            return self._matrix(x)

    def forward(self, x, w, ld):
        """(y, log-det, head): head, the coupling network's input, as ``_apply``."""
        if self.inv is None:
            return (*actnorm_invconv(x, self.an.loc, self.an.scale, None), None)
        y, head = self._apply(x, w)
        return y, ld, head

    def backward(self, y, gy, gld, stored, mats, caller, deferred=None, ghead=None):
        """``mats``: (W with its graph, the stage's log-det with its graph, W^-1 float64)
        from ``_matrix``, None for ActNorm alone. ``deferred``: a list, for a W taken
        from the chain's stacked assembly: this stage back-propagates into W and ActNorm's
        scale only as far as detached copies of them and appends the (tensor with its graph,
        gradient) pairs for the one backward through the stack, so that each parameter's
        gradient is accumulated once (DDP's hooks). ``ghead``: the gradient of the coupling
        network's input (a ``split`` stage's), which the recomputed mix takes as its
        head's (added inside its backward launches) where ``_takes_head``, and which is
        added to ``gy``'s first channels otherwise. Returns (x, its gradient, None)."""
        an = self.an
        if ghead is not None and not self._takes_head(y):
            gy[:, :self.split] += ghead  # (gy: the coupling stage's own gradient tensor)
            ghead = None
        if self.inv is None:
            w = ld = None
            with torch.no_grad():
                x = actnorm_invconv(y, an.loc, an.scale, None, reverse=True)[0]
        else:
            w, ld, w_inv = mats
            with torch.no_grad():
                if an is None:
                    x = channel_mix(y, w_inv)
                else:
                    x = channel_mix(y, w_inv, loc=an.loc, scale=an.scale, reverse=True)
        x = stored(x)
        x_leaf = x.detach().requires_grad_(True)
        if self.inv is None:
            (y2, ld), head = actnorm_invconv(x_leaf, an.loc, an.scale, None), None
        elif deferred is not None:
            w_leaf = w.detach().requires_grad_(w.requires_grad)
            scale = an.scale.detach().requires_grad_(an.scale.requires_grad)
            y2, head = self._apply(x_leaf, w_leaf, scale)
            _backprop((y2, head), (gy, ghead), [x_leaf, w_leaf, an.loc, scale], caller)
            deferred += [(w, w_leaf.grad), (ld, gld.to(ld.dtype)), (an.scale, scale.grad)]
            gx = x_leaf.grad if x_leaf.grad is not None else torch.zeros_like(x)
            return x, gx, None
        else:
            y2, head = self._apply(x_leaf, w)
        _backprop((y2, head, ld), (gy, ghead, gld.to(ld.dtype)), [x_leaf] + self.params(),
                  caller)
        gx = x_leaf.grad if x_leaf.grad is not None else torch.zeros_like(x)
        return x, gx, None


def _coupling_options(c: AffineCoupling):
    """(scale, layout, shift, clamp) of the fused op ``AffineCoupling`` runs (its
    ``_couple``: Glow's sigmoid scale, halves layout, shift before; additive without
    ``affine``)."""
    if not c.affine:
        return "additive", "halves", "before", 2.0
    return "sigmoid", "halves", "before", 2.0


_DETERMINISTIC_NET = (nn.Sequential, nn.Conv2d, nn.ReLU, ZeroConv2d)


class _CouplingStage:
    """``fed``: a FlowStep's coupling whose network takes its input from the mix stage
    before it (``_MixStage.split``): the forward gets it as ``head`` (None on the
    reference path), and the backward hands its gradient to that stage."""

    def __init__(self, coupling: AffineCoupling, fed: bool = False):
        self.c, self.fed = coupling, fed
        self.ca = coupling.in_channel - coupling.in_channel // 2
        self.opts = _coupling_options(coupling)

    def replays_rng(self) -> bool:
        """The network may draw random numbers (dropout, a noise layer: anything but the
        stock conv / ReLU / ZeroConv2d modules, or a hook on one): the recompute must see
        the draws of the forward, so the generators' state before the network ran (and its
        training-mode buffers: BatchNorm, spectral norm) is kept and replayed
        (``_net_state``; as ``torch.utils.checkpoint`` does for the generators)."""
        return not all(type(m) in _DETERMINISTIC_NET and not (m._forward_hooks
                                                               or m._forward_pre_hooks)
                       for m in self.c.net.modules())

    def params(self):
        return _requiring(self.c.parameters())

    def _op(self, x, h, reverse):
        scale, layout, shift, clamp = self.opts
        if scale == "additive":
            return additive_coupling(x, h, reverse=reverse)
        return affine_coupling(x, h, scale=scale, layout=layout, shift=shift, clamp=clamp,
                               reverse=reverse)

    def forward(self, x, limit, head=None):
        """(y, logdet, flag): flag (0-d bool on the device, None when it cannot be set) says
        the inverse's condition estimate ``max(1, s_max) / s_min`` exceeds ``limit``.
        ``head``: the network's input from the mix's launch, or None (a slice of x)."""
        self.c._check("x", x)  # (as the module's forward: names a dtype its network refuses)
        h = self.c.net(x[:, :self.ca] if head is None else head)
        y, ld = self._op(x, h, False)
        scale, layout, _, clamp = self.opts
        if scale == "additive" or limit == math.inf:
            return y, ld, None
        cb = self.c.in_channel // 2
        raw = h[:, :cb] if layout == "halves" else h[:, 1::2]
        if scale == "sigmoid":  # s <= 1 and increasing in raw: cond = 1 / s(min raw)
            return y, ld, raw.amin() < math.log(1.0 / (limit - 1.0)) - 2.0
        lo, hi = torch.aminmax(raw.detach().float())
        log_lo = reference.coupling_log_scale(lo, scale, clamp)[0]
        log_hi = reference.coupling_log_scale(hi, scale, clamp)[0]
        return y, ld, torch.clamp(log_hi, min=0.0) - log_lo > math.log(limit)

    def backward(self, y, gy, gld, stored, mats, caller, net_state=None, ghead=None):
        """``net_state``: what the network's forward read besides its input and parameters
        (``_net_state``; None for a stock network): the recompute runs under it, so it
        computes what the forward did. Returns (x, its gradient, the network input's
        gradient for the mix stage before it when ``fed``, else None: added to x's)."""
        ya = y[:, :self.ca].detach().requires_grad_(True)
        with (contextlib.nullcontext() if net_state is None
              else _as_at_forward(self.c.net, net_state)):
            h = self.c.net(ya)
            hd = h.detach()
            with torch.no_grad():
                x = self._op(y, hd, True)[0]
            with _autocast(caller):
                gx, gh = coupling_backward(gy.contiguous(), gld.contiguous(), y, hd,
                                           *self.opts, False, True)
            _backprop((h,), (gh,), [ya] + self.params(), caller)
        if self.fed:
            return stored(x), gx, ya.grad
        if ya.grad is not None:
            gx[:, :self.ca] += ya.grad
        return stored(x), gx, None


def _stages(step):
    """A step as its stages, in forward order."""
    if isinstance(step, FlowStep):
        # the network's input from the mix's launch where the stored FlowStep takes it
        split = step.coupling.split if step._coupling_takes_head() else None
        return [_MixStage(step.actnorm, step.invconv, split),
                _CouplingStage(step.coupling, fed=split is not None)]
    if isinstance(step, ActNorm):
        return [_MixStage(step, None)]
    if isinstance(step, (InvConv2d, InvConv2dLU)):
        return [_MixStage(None, step)]
    if isinstance(step, AffineCoupling):
        return [_CouplingStage(step)]
    raise TypeError(f"steps: expected fastflow flow steps ({', '.join(t.__name__ for t in _STEP_TYPES)}), "
                    f"got {type(step).__name__}")


def _check_steps(steps) -> None:
    """The chain's steps are fastflow flow steps of one channel count, each ActNorm
    returning its log-det (see ``_check_logdet_flags``). Checked when the chain is built and
    at every call: it is a ``ModuleList`` (``append``, ``insert``, ``seq[i] = ...`` change
    it)."""
    for i, s in enumerate(steps):
        if not isinstance(s, _STEP_TYPES):
            raise TypeError(f"steps[{i}]: expected a fastflow flow step "
                            f"({', '.join(t.__name__ for t in _STEP_TYPES)}), got "
                            f"{type(s).__name__}")
        if s.in_channel != steps[0].in_channel:  # each step keeps its input's shape
            raise ValueError(f"steps[{i}]: expected a step of {steps[0].in_channel} channels "
                             f"(as steps[0]), got a {type(s).__name__} of {s.in_channel}")
    _check_logdet_flags(steps)


def _check_logdet_flags(steps) -> None:
    """Every ActNorm of the chain (a step, or a FlowStep's) returns its log-det: one built
    with ``logdet=False`` returns y alone, which the chain would unpack as (y, logdet) (a
    batch of two split into two samples) on the ordinary path and ignore on the reversible
    one."""
    for i, s in enumerate(steps):
        an = s.actnorm if isinstance(s, FlowStep) else s
        if isinstance(an, ActNorm) and not an.logdet:
            where = f"steps[{i}]" + (".actnorm" if an is not s else "")
            raise ValueError(f"{where}: expected an ActNorm that returns its log-det "
                             f"(logdet=True), got one with logdet=False (it returns y alone; "
                             f"the chain sums its steps' log-dets)")


# the methods whose maths the stages compute without calling them
_STAGE_METHODS = ("forward", "inverse", "reverse", "_couple", "forward_with_head",
                  "matrix_and_logdet", "matrix", "weight_and_logdet")


def _own_method(m) -> bool:
    """One of those methods replaced on the instance (``m.forward = ...``): only calling
    the module runs it. (Named, not every attribute looked up: a 96-step chain checked
    every instance attribute in 2.3 ms per forward.)"""
    return replaced_on_instance(m, _STAGE_METHODS)


def _stock(step) -> bool:
    """The step (and a FlowStep's actnorm, invconv and coupling) is exactly fastflow's
    class, with no method replaced on the instance: the stages recompute those classes'
    maths, which a subclass or an instance's own method may change."""
    if type(step) is FlowStep:
        mods = (step, step.actnorm, step.invconv, step.coupling)
        return (type(step.actnorm) is ActNorm and type(step.invconv) in (InvConv2d, InvConv2dLU)
                and type(step.coupling) is AffineCoupling
                and not any(_own_method(m) for m in mods))
    return type(step) in _STEP_TYPES and not _own_method(step)


def _hooked(step) -> bool:
    """A hook of the step's own or of its ActNorm / 1x1 convolution / coupling (the
    modules the stages compute without calling), or a global module hook (which would also
    run a second time for the coupling networks, called again by the recompute)."""
    mods = [step] + ([step.actnorm, step.invconv, step.coupling] if isinstance(step, FlowStep)
                     else [])
    return any(_module_hooked(m) for m in mods)


def _initialising_actnorm(step) -> bool:
    """An ActNorm of the step that a call would initialise: in training mode (its own flag,
    as ``ActNorm.maybe_initialize`` reads it, whatever the chain's) and not initialised
    (is_initialized: the host-side mirror; one device read after an in-place write to the
    flag)."""
    return any(isinstance(m, ActNorm) and m.training and not m.is_initialized()
               for m in step.modules())


# --------------------------------------------------------------------------------------
# The autograd node
# --------------------------------------------------------------------------------------


def _autocast_state(device_type):
    if not torch.is_autocast_enabled(device_type):
        return (device_type, False, None, True)
    return (device_type, True, torch.get_autocast_dtype(device_type),
            torch.is_autocast_cache_enabled())


def _autocast(state):
    device_type, enabled, dtype, cache = state
    if not enabled:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype, enabled=True, cache_enabled=cache)


class _ReversibleChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, seq, x, *params):
        steps = [_stages(s) for s in seq]
        flat = [st for stages in steps for st in stages]
        limit = float(seq.fallback_cond)
        slots = seq.fallback_slots
        check = limit < math.inf  # fallback_cond=inf: no checks at all
        with torch.no_grad():  # every FlowStep's W from one stacked assembly, if they stack
            stacked = _stacked_matrices(seq, steps, x)
        prepared, mix_cond = _mix_conds(flat, x, check, stacked)
        mix_flags = None if mix_cond is None else (mix_cond > limit).unbind()
        reserve = x.new_empty((slots, *x.shape)) if (slots and check) else None
        # which stage each reserve slot holds (-1: none) and how many stages were flagged
        owner = torch.full((slots,), -1, dtype=torch.int64, device=x.device)
        flagged = torch.zeros((), dtype=torch.int64, device=x.device)
        slot_ids = torch.arange(slots, device=x.device)
        out, logdet, index, k_mix, head = x, None, 0, 0, None
        net_states = {}  # coupling stage index -> _net_state before its network ran
        for stages in steps:
            step_ld = None
            for stage in stages:
                if isinstance(stage, _MixStage):
                    y, ld, head = stage.forward(out, *prepared[index])
                    flag = mix_flags[k_mix] if mix_flags is not None else None
                    k_mix += 1
                else:
                    if stage.replays_rng():
                        net_states[index] = _net_state(stage.c.net, out.device)
                    y, ld, flag = stage.forward(out, limit, head if stage.fed else None)
                    head = None
                if flag is not None:
                    if reserve is not None:
                        # no host sync: the input goes to slot ``flagged`` if the flag is set
                        take = flag & (flagged == slot_ids)
                        torch.where(take.view(-1, *([1] * out.dim())), out.unsqueeze(0),
                                    reserve, out=reserve)
                        owner.masked_fill_(take, index)
                    flagged += flag
                step_ld = ld if step_ld is None else step_ld + ld
                out, index = y, index + 1
            logdet = step_ld if logdet is None else logdet + step_ld
        kept = torch.clamp(flagged, max=slots)
        seq.fallback_count.add_(kept.to(seq.fallback_count.dtype))
        seq.fallback_overflow.add_((flagged - kept).to(seq.fallback_overflow.dtype))
        every = list(seq.parameters())
        ctx.seq, ctx.n_stages, ctx.params = seq, index, params
        ctx.frozen = [p for p in every if not p.requires_grad]
        ctx.versions = [(p, p._version) for p in every]
        ctx.tensors, ctx.net_states = _module_tensors(seq), net_states
        ctx.autocast = _autocast_state(x.device.type)
        ctx.mode = current_mode()
        ctx.save_for_backward(out, owner, *(() if reserve is None else (reserve,)))
        return out, logdet

    @staticmethod
    def backward(ctx, gy, gld):
        if torch.is_grad_enabled():
            raise RuntimeError("ReversibleSequence / Glow(reversible=True): double backward "
                               "(create_graph=True) is not supported; use reversible=False")
        y, owner, *rest = ctx.saved_tensors
        reserve = rest[0] if rest else None
        _check_versions(ctx.seq, ctx.versions)
        steps = [_stages(s) for s in ctx.seq]
        stages = [st for stages in steps for st in stages]
        # the recompute reads detached leaves of the parameters, which collect every use's
        # gradient; the node returns their sums, which autograd passes on as for any input
        leaves = {id(p): p.detach().requires_grad_(True) for p in ctx.params}
        # one frozen at forward and unfrozen since gets no gradient, as on the stored graph
        leaves.update((id(p), p.detach()) for p in ctx.frozen if p.requires_grad)
        # the recompute runs under the forward's autocast state, the backward's own ops under
        # the caller's (as the stored graph's: a backward outside autocast, the usual one,
        # keeps the flow layers' gradients in float32)
        caller = _autocast_state(ctx.autocast[0])
        with use_backend(ctx.mode), torch.enable_grad(), _autocast(ctx.autocast), \
                _modules_as_at_forward(ctx.tensors, leaves):
            # every mix stage's W (with its graph) and W^-1 up front: one batched inverse;
            # the FlowSteps' W from one stacked assembly if they stack, as in forward
            stacked = _stacked_matrices(ctx.seq, steps, y)
            mats = [stacked[i] if i in stacked else st._matrix(y)
                    if isinstance(st, _MixStage) and st.inv is not None
                    else None for i, st in enumerate(stages)]
            found = [wl[0] for wl in mats if wl is not None]
            if found:
                c = y.shape[1]
                found = reference.flow_stack([w if w.dim() == 2 else w.reshape(c, c)
                                              for w in found])  # (outside autocast)
                inv = iter(torch.linalg.inv_ex(found.detach().to(torch.float64))[0].unbind())
                mats = [None if wl is None else (wl[0], wl[1], next(inv)) for wl in mats]
            deferred = []  # (tensor of the stacked assembly's graph, its gradient) pairs
            ghead = None  # a fed coupling network's input gradient, for the mix before it
            for index in range(ctx.n_stages - 1, -1, -1):
                def stored(x, index=index):
                    if reserve is None:
                        return x
                    for r in range(reserve.shape[0]):
                        x = torch.where(owner[r] == index, reserve[r], x)
                    return x

                extra = dict(deferred=deferred) if index in stacked else {}
                if index in ctx.net_states:
                    extra["net_state"] = ctx.net_states[index]
                y, gy, ghead = stages[index].backward(y.detach(), gy, gld, stored, mats[index],
                                                      caller, ghead=ghead, **extra)
                mats[index] = None
                y = y.detach()
            if deferred:  # one backward through the stacked assembly
                pairs = [(t, g) for t, g in deferred if g is not None]
                _backprop([t for t, _ in pairs], [g for _, g in pairs],
                          [p for i in stacked for p in stages[i].params()
                           if p is not stages[i].an.loc], caller)  # (loc: in the mix alone)
        return (None, gy, *(leaves[id(p)].grad for p in ctx.params))


def _check_versions(seq, versions):
    """Refuses a backward after a parameter of the chain was changed in place since the
    forward (an optimizer step in between), as autograd refuses one for a tensor it saved:
    the recompute would read the new value where the stored graph holds the forward's. The
    version counters are compared rather than the parameters saved for backward, which
    would hand them to every ``saved_tensors_hooks`` (``save_on_cpu`` would copy them out
    and back each step)."""
    for p, version in versions:
        if p._version != version:
            names = {id(t): f"{prefix}{'.' if prefix else ''}{name}"
                     for prefix, m in seq.named_modules() for name, t in m._parameters.items()}
            name = names.get(id(p), f"of shape {tuple(p.shape)}")
            raise RuntimeError(
                f"ReversibleSequence / Glow(reversible=True): one of the variables needed for "
                f"gradient computation has been modified by an inplace operation: parameter "
                f"{name} is at version {p._version}; expected version {version} instead (it "
                f"was changed in place between forward and backward)")


def _training_buffers(net):
    """(module, name, buffer, a copy of its value) for the buffers of ``net``'s modules in
    training mode: those its forward may update (BatchNorm's running statistics, spectral
    norm's power-iteration vectors). Modules in eval mode update none (and an autograd
    graph may hold theirs: never written here)."""
    return [(m, name, b, b.clone()) for m in net.modules() if m.training
            for name, b in m._buffers.items() if b is not None]


def _net_state(net, device):
    """What a coupling network's forward reads besides its input and parameters, recorded
    before it runs: the random number generators' states (dropout; the CPU's and, for an
    input on an accelerator (CUDA, MPS, XPU, ...), its device's, not while a CUDA graph is
    being captured: a capture cannot set it back) and its training-mode buffers."""
    dev = None
    if device.type not in ("cpu", "meta") and not (
            device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        dev = torch.get_device_module(device.type).get_rng_state(device)
    return (torch.get_rng_state(), dev, device), _training_buffers(net)


@contextlib.contextmanager
def _as_at_forward(net, state):
    """``net``'s generators and training-mode buffers as ``_net_state`` recorded them, for
    the recompute only. Afterwards the buffers hold their values from before the block
    again (the forward updated them once already): by value, whatever their version
    counters say (BatchNorm's kernel moves none); and the caller's random stream is where
    it was."""
    (cpu, dev, device), then = state
    # what the block writes: the buffers set to their forward values below, and those the
    # recompute may update (its training-mode modules' now: the net may have been switched
    # to eval mode since, and its forward's update must survive the recompute even so)
    now = _training_buffers(net)
    seen = {(id(m), name) for m, name, _, _ in now}
    now += [(m, name, m._buffers[name], m._buffers[name].clone()) for m, name, _, _ in then
            if (id(m), name) not in seen and m._buffers.get(name) is not None]
    # the caller's random stream, put back afterwards (by hand: ``torch.random.fork_rng``'s
    # ``device_type`` argument differs between torch versions)
    mod = None if dev is None else torch.get_device_module(device.type)
    caller = torch.get_rng_state(), (None if mod is None else mod.get_rng_state(device))
    torch.set_rng_state(cpu)
    if mod is not None:
        mod.set_rng_state(dev, device)
    try:
        with torch.no_grad():
            for m, name, _, value in then:
                m._buffers[name].copy_(value)
        yield
    finally:
        with torch.no_grad():
            for m, name, b, value in now:
                m._buffers[name] = b
                b.copy_(value)
        torch.set_rng_state(caller[0])
        if mod is not None:
            mod.set_rng_state(caller[1], device)


def _module_tensors(seq):
    """Every module of the chain with its training flag, parameters and buffers as they are
    now (the tensor objects, not copies): what the backward's recompute must read."""
    return [(m, m.training, dict(m._parameters), dict(m._buffers)) for m in seq.modules()]


@contextlib.contextmanager
def _modules_as_at_forward(saved, leaves):
    """The chain's modules hold the tensors and training flags they held at forward while
    the backward recomputes (the stages read them from the modules), each parameter
    replaced by its detached leaf in ``leaves`` ({id(parameter): leaf}).
    ``torch.func.functional_call`` swaps tensors in only for the call, so without this the
    backward would rebuild the inputs with the module's own parameters; and a model
    switched to eval mode between forward and backward must recompute the training-mode
    forward it took (dropout, BatchNorm's batch statistics). Everything is set back
    afterwards, also when the recompute raises."""
    swapped, modes = [], []
    try:
        for m, training, params, buffers in saved:
            if m.training != training:
                modes.append((m, m.training))
                m.training = training
            for table, then in ((m._parameters, params), (m._buffers, buffers)):
                for name, t in then.items():
                    t = leaves.get(id(t), t)
                    now = table.get(name)
                    if now is not t:
                        swapped.append((table, name, now))
                        table[name] = t
        yield
    finally:
        for table, name, now in reversed(swapped):
            table[name] = now
        for m, training in modes:
            m.training = training


def _run_chain(seq, x):
    return _ReversibleChain.apply(seq, x, *_requiring(seq.parameters()))


_disabled_chain = None


def _run_reversible(seq, x):
    """``_run_chain`` outside any compiled graph (a Python backward that calls autograd
    itself is not traceable). ``torch.compiler.disable`` imports dynamo (and with it
    triton), so it is applied on first use, not when fastflow is imported."""
    global _disabled_chain
    if _disabled_chain is None:
        _disabled_chain = torch.compiler.disable(_run_chain)
    return _disabled_chain(seq, x)


class ReversibleSequence(nn.ModuleList):
    """A chain of fastflow flow steps trained without stored activations.

    ``forward(x) -> (y, logdet)`` (logdet per sample, the steps' log-dets summed);
    ``inverse(y) -> (x, logdet)``; ``reverse(y) -> x``. It is a ``ModuleList`` of the steps,
    so parameter names (``0.actnorm.loc``, ...) are those of a plain list of the same steps
    and checkpoints move between the two. See the module docstring for the backward, the
    fallback reserve (``fallback_slots`` input-sized buffers, used by stages whose inverse
    condition estimate exceeds ``fallback_cond``) and how it meets autocast and DDP.

    The reversible path runs when gradients are being recorded and some parameter or the
    input requires grad; otherwise (inference, no grad, an empty batch), for a call that
    initialises an ActNorm, for a chain holding a subclass of a step type (a FlowStep's
    actnorm, invconv or coupling included: the reversible stages would bypass its
    overrides), for one with a module hook on a step (or on those submodules: the
    stages do not call them) or a global module hook registered, and for parameters
    computed from others (``torch.func.functional_call`` with derived tensors), the steps
    run one after the other the ordinary way."""

    def __init__(self, steps: Iterable[nn.Module] = (), *, fallback_slots: int = 2,
                 fallback_cond: float = 1e3):
        steps = list(steps)
        _check_steps(steps)
        if isinstance(fallback_slots, bool) or not isinstance(fallback_slots, int) \
                or fallback_slots < 0:
            raise ValueError(f"fallback_slots: expected an integer >= 0, got {fallback_slots!r}")
        if not isinstance(fallback_cond, (int, float)) or isinstance(fallback_cond, bool) \
                or math.isnan(fallback_cond) or fallback_cond <= 1:
            raise ValueError(f"fallback_cond: expected a number > 1 (inf disables the "
                             f"fallback), got {fallback_cond!r}")
        super().__init__(steps)
        self.fallback_slots = fallback_slots
        self.fallback_cond = float(fallback_cond)
        # cumulative counts over training calls; persistent=False keeps the state dict equal
        # to a plain list of the same steps
        self.register_buffer("fallback_count", torch.zeros((), dtype=torch.int64),
                             persistent=False)
        self.register_buffer("fallback_overflow", torch.zeros((), dtype=torch.int64),
                             persistent=False)
        self.register_load_state_dict_pre_hook(ReversibleSequence._counters_from_zero)
        self.register_load_state_dict_post_hook(ReversibleSequence._counters_off_meta)

    @staticmethod
    def _counters_from_zero(module, state_dict, prefix, *args):
        """A state dict that holds the chain's tensors replaces its state, and the counters
        (of the training calls with the state they replace; in no state dict) count from
        zero again: as in a chain built afresh and loaded, and not whatever the memory
        held after ``to_empty`` (the meta-device recipe: build on meta, ``to_empty``,
        load). In place: a captured CUDA graph adds to these tensors."""
        if not any(k.startswith(prefix) for k in state_dict):
            return  # (a partial load of other modules leaves the chain's counts alone)
        for name in ("fallback_count", "fallback_overflow"):
            t = getattr(module, name)
            if t.is_inference() and not torch.is_inference_mode_enabled():
                setattr(module, name, torch.zeros_like(t))  # (no in-place write outside it)
            else:
                t.zero_()

    @staticmethod
    def _counters_off_meta(module, incompatible_keys):
        """``load_state_dict(assign=True)`` into a chain made on the meta device puts its
        steps' tensors on a real device, not the counters (not in a state dict): they
        follow the parameters, from zero."""
        p = next(module.parameters(), None)
        if p is not None and not p.is_meta:
            for name in ("fallback_count", "fallback_overflow"):
                if getattr(module, name).is_meta:
                    setattr(module, name, torch.zeros((), dtype=torch.int64, device=p.device))

    def __getitem__(self, idx):
        if isinstance(idx, slice):  # a plain list of the steps (ModuleList would rebuild us)
            return nn.ModuleList(list(self._modules.values())[idx])
        return super().__getitem__(idx)

    @staticmethod
    def _identity(name, x):
        """An empty chain is the identity: x itself and a zero log-det (N,) in x's compute
        dtype (not None), for a floating (N, C, H, W) x."""
        check_float_tensor(name, x, ndim=4)
        return x, x.new_zeros(x.shape[0], dtype=compute_dtype(x.dtype))

    def _ordinary(self, x):
        if len(self) == 0:
            return self._identity("x", x)
        logdet = None
        # the FlowSteps' W from one stacked assembly when they stack, as on the reversible
        # path and in a stored-activation Glow block: the same matrices, bitwise
        mats = _flowstep_matrices(self, x)
        for i, step in enumerate(self):
            x, ld = step(x) if i not in mats else step(x, w_ld=mats[i])
            logdet = ld if logdet is None else logdet + ld
        return x, logdet

    def _use_reversible(self, x) -> bool:
        if len(self) == 0 or x.numel() == 0 or not torch.is_grad_enabled():
            return False  # (an empty batch: nothing to rebuild)
        if not all(_stock(s) for s in self):
            return False  # a subclass's own maths: only its forward computes them
        if any(_hooked(s) for s in self):
            return False  # the hooks run only if the modules are called (and may change them)
        if any(_initialising_actnorm(s) for s in self):
            return False  # the initialising call runs the ordinary way
        params = [p for p in self.parameters() if p.requires_grad]
        if any(p.grad_fn is not None for p in params):
            # a parameter computed from others (torch.func.functional_call with derived
            # tensors): the stages' backward stops at the chain's parameters, so only the
            # stored-activation graph carries the gradient on to where they came from
            return False
        return x.requires_grad or bool(params)

    def forward(self, x):
        _check_steps(self)  # (the list or a flag may have been changed since it was built)
        if len(self):  # the reversible path's stages would fail inside on bad input
            check_nchw("x", x, self[0].in_channel)
            check_module_device("x", x, first_parameter(self))
        if not self._use_reversible(x):
            return self._ordinary(x)
        return _run_reversible(self, x)

    def inverse(self, y):
        _check_steps(self)
        if len(self) == 0:
            return self._identity("y", y)
        logdet = None
        for step in reversed(list(self)):
            y, ld = step.inverse(y)
            logdet = ld if logdet is None else logdet + ld
        return y, logdet

    def reverse(self, y):
        return self.inverse(y)[0]

    def extra_repr(self) -> str:
        return f"fallback_slots={self.fallback_slots}, fallback_cond={self.fallback_cond:g}"
