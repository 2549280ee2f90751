"""Reversible (memory-free) training: ReversibleSequence and Glow(reversible=True) give the
stored-activation gradients, keep memory flat in depth, and fall back to a stored input for
an ill-conditioned step."""

import copy
import importlib.util
import os
import pathlib
import warnings

import pytest
import torch

import fastflow as ff
from fastflow.layers.reversible import ReversibleSequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = {torch.float64: 1e-8, torch.float32: 1e-4}


def _suite():
    spec = importlib.util.spec_from_file_location("suite_reversible",
                                                  ROOT / "benchmarks" / "suite_reversible.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _perturb(model, std=0.05):
    """Move the zero-initialised layers (ZeroConv2d, priors) off zero so every path matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "net.4" in name or "prior" in name:
                p.normal_(0, std)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check_grads(got, want, tol, what=""):
    assert got.keys() == want.keys()
    for name in want:
        err = _rel(got[name], want[name])
        assert err < tol, f"{what} {name}: relative gradient difference {err:.3g} > {tol:g}"


def _seq_grads(seq, x, reversible, wy, wl):
    """Gradients of sum(wy * y) + sum(wl * logdet) wrt every parameter and x."""
    seq.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    y, ld = seq(xi) if reversible else seq._ordinary(xi)
    ((wy * y).sum() + (wl * ld).sum()).backward()
    grads = {n: p.grad.clone() for n, p in seq.named_parameters()}
    grads["x"] = xi.grad.clone()
    return y.detach(), ld.detach(), grads


def _layer(kind, c, dtype):
    if kind == "flowstep_lu":
        m = ff.FlowStep(c, filter_size=8)
    elif kind == "flowstep_plain_additive":
        m = ff.FlowStep(c, filter_size=8, affine=False, conv_lu=False)
    elif kind == "actnorm":
        m = ff.ActNorm(c)
    elif kind == "invconv":
        m = ff.InvConv2d(c)
    elif kind == "invconv_lu":
        m = ff.InvConv2dLU(c)
    elif kind == "coupling":
        m = ff.AffineCoupling(c, filter_size=8)
    else:
        m = ff.AffineCoupling(c, filter_size=8, affine=False)
    return m.to(dtype)


KINDS = ["flowstep_lu", "flowstep_plain_additive", "actnorm", "invconv", "invconv_lu",
         "coupling", "additive"]


def _compare_seq(steps, dtype, shape=(3, 5, 3, 4)):
    seq = ReversibleSequence(steps)
    _perturb(seq)
    x = torch.randn(*shape, dtype=dtype)
    seq(x)  # ActNorm initialisation (runs the ordinary way)
    wy, wl = torch.randn_like(x), torch.randn(shape[0], dtype=dtype)
    y0, ld0, want = _seq_grads(seq, x, False, wy, wl)
    y1, ld1, got = _seq_grads(seq, x, True, wy, wl)
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(ld1, ld0, rtol=1e-12, atol=1e-12)
    _check_grads(got, want, TOL[dtype])
    return seq


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_each_layer_type_gives_the_stored_gradients(kind, dtype):
    torch.manual_seed(0)
    seq = _compare_seq([_layer(kind, 5, dtype)], dtype)
    assert int(seq.fallback_count) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chains_give_the_stored_gradients(dtype):
    torch.manual_seed(1)
    steps = [_layer(k, 5, dtype) for k in ("actnorm", "invconv_lu", "coupling", "flowstep_lu",
                                           "invconv", "additive", "flowstep_plain_additive",
                                           "flowstep_lu")]
    _compare_seq(steps, dtype)


class _ExpCoupling(ff.AffineCoupling):
    """A coupling with exp scales: a subclass that overrides the coupling's maths."""

    def _couple(self, x, reverse, logdet=True):
        h = self.net(x[:, :self.in_channel - self.in_channel // 2])
        return ff.affine_coupling(x, h, scale="exp", reverse=reverse, logdet=logdet)


class _DoublingActNorm(ff.ActNorm):
    def forward(self, x):
        y, ld = super().forward(x)
        return 2 * y, ld + x[0].numel() * torch.log(torch.tensor(2.0, dtype=ld.dtype))


def _flowstep_with_exp_coupling(c):
    step = ff.FlowStep(c, filter_size=8).double()
    step.coupling = _ExpCoupling(c, filter_size=8).double()
    return step


def _shifted_forward(m):
    """``m`` with its ``forward`` replaced on the instance: y + 0.5, the same log-det."""
    own = m.forward
    m.forward = lambda x: (lambda out: (out[0] + 0.5, out[1]))(own(x))
    return m


def _flowstep_with_own_coupling_forward(c):
    step = ff.FlowStep(c, filter_size=8).double()
    _shifted_forward(step.coupling)
    return step


@pytest.mark.parametrize("make", [lambda c: _ExpCoupling(c, filter_size=8).double(),
                                  _flowstep_with_exp_coupling,
                                  lambda c: _DoublingActNorm(c).double(),
                                  lambda c: _shifted_forward(ff.AffineCoupling(c, 8).double()),
                                  _flowstep_with_own_coupling_forward],
                         ids=["coupling", "flowstep_coupling", "actnorm",
                              "coupling_own_forward", "flowstep_coupling_own_forward"])
def test_subclassed_steps_compute_what_they_define(make):
    """A subclass of a step type (or in a FlowStep's actnorm / invconv / coupling) that
    overrides its maths, or a ``forward`` replaced on the instance (which the chain ignored
    before, y off by the shift): the chain computes what the modules called one by one compute,
    with their gradients (the reversible stages recompute the stock classes' maths, and
    gave another y and log-det while the chain's input or parameters required grad)."""
    torch.manual_seed(0)
    seq = ReversibleSequence([make(4)])
    with torch.no_grad():
        for p in seq.parameters():
            p.add_(0.3 * torch.randn_like(p))
    for m in seq.modules():
        if isinstance(m, ff.ActNorm):
            m.initialized.fill_(1)
            m._initialized = True
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        want_y, want_ld = x, 0
        for step in seq:
            want_y, ld = step(want_y)
            want_ld = want_ld + ld
    wy, wl = torch.randn_like(x), torch.randn(2, dtype=torch.float64)
    y0, ld0, want = _seq_grads(seq, x, False, wy, wl)
    y1, ld1, got = _seq_grads(seq, x, True, wy, wl)
    torch.testing.assert_close(y1, want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld1, want_ld, rtol=1e-12, atol=1e-12)
    _check_grads(got, want, TOL[torch.float64])


def test_empty_batch_gives_the_stored_results():
    """An empty batch (every layer takes one): the ordinary results, zero parameter
    gradients (the reversible forward's condition check took amin() of no elements)."""
    torch.manual_seed(0)
    steps = [_layer(k, 5, torch.float64) for k in ("flowstep_lu", "coupling", "actnorm")]
    seq = ReversibleSequence(steps)
    _perturb(seq)
    seq(torch.randn(3, 5, 3, 4, dtype=torch.float64))  # ActNorm initialisation
    shape = (0, 5, 3, 4)
    x = torch.randn(*shape, dtype=torch.float64)
    wy, wl = torch.randn_like(x), torch.randn(shape[0], dtype=torch.float64)
    y0, ld0, want = _seq_grads(seq, x, False, wy, wl)
    y1, ld1, got = _seq_grads(seq, x, True, wy, wl)
    assert y1.shape == shape and ld1.shape == (shape[0],)
    torch.testing.assert_close(ld1, ld0, rtol=0, atol=0)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_triton_backend_gives_the_stored_gradients():
    """The fused inverse and the from-output coupling backward on the (interpreted)
    kernels."""
    torch.manual_seed(2)
    with ff.use_backend("triton"):
        _compare_seq([_layer("flowstep_lu", 4, torch.float32),
                      _layer("flowstep_plain_additive", 4, torch.float32)], torch.float32,
                     shape=(2, 4, 3, 3))


def _glow_pair(dtype, affine, conv_lu, n_flow=2, n_block=2, c=1, side=8, n=4, seed=0):
    torch.manual_seed(seed)
    kw = dict(affine=affine, conv_lu=conv_lu, filter_size=8)
    stored = ff.Glow(c, n_flow, n_block, **kw).to(dtype)
    rev = ff.Glow(c, n_flow, n_block, reversible=True, **kw).to(dtype)
    _perturb(stored)
    x = torch.rand(n, c, side, side, dtype=dtype) - 0.5
    stored(x)
    rev.load_state_dict(stored.state_dict())
    return stored, rev, x


def _glow_grads(model, x, backward=True):
    model.zero_grad(set_to_none=True)
    log_p, logdet, z = model(x)
    loss = ff.bits_per_dim(log_p, logdet, x[0].numel())
    if backward:
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("affine,conv_lu", [(True, True), (True, False), (False, True),
                                            (False, False)])
def test_multiscale_glow_gives_the_stored_gradients(affine, conv_lu, dtype):
    stored, rev, x = _glow_pair(dtype, affine, conv_lu, n_flow=3, n_block=3, c=2)
    assert stored.state_dict().keys() == rev.state_dict().keys()
    loss0, want = _glow_grads(stored, x)
    loss1, got = _glow_grads(rev, x)
    torch.testing.assert_close(loss1, loss0, rtol=1e-12, atol=1e-12)
    _check_grads(got, want, TOL[dtype])
    assert int(rev.fallback_count) == 0 and int(rev.fallback_overflow) == 0


def test_actnorm_initialising_call_runs_the_ordinary_way_then_reversible():
    torch.manual_seed(0)
    a = ff.Glow(1, 2, 2, filter_size=8)
    b = ff.Glow(1, 2, 2, filter_size=8, reversible=True)
    b.load_state_dict(a.state_dict())
    x = torch.rand(4, 1, 8, 8) - 0.5
    la, lb = a(x)[1], b(x)[1]  # both initialise from the same batch
    assert "ReversibleChain" not in type(lb.grad_fn).__name__
    torch.testing.assert_close(lb, la, rtol=0, atol=0)
    for na, pa in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[na], pa, rtol=0, atol=0)
    seq = b.blocks[0].flows
    ld = seq(torch.rand(4, 4, 4, 4))[1]
    assert type(ld.grad_fn).__name__ == "_ReversibleChainBackward"
    # eval mode and no_grad run the ordinary way (nothing to rebuild)
    with torch.no_grad():
        assert seq(torch.rand(4, 4, 4, 4))[1].grad_fn is None


def test_a_step_in_training_mode_in_a_chain_in_eval_initialises_its_actnorm():
    # the ActNorm's own flag decides, as in a stored FlowStep: a chain in eval mode holding
    # a step in training mode went reversible and skipped the initialisation (so it
    # happened only under no_grad)
    torch.manual_seed(0)
    steps = [ff.FlowStep(4, filter_size=8) for _ in range(2)]
    plain = copy.deepcopy(steps)
    seq = ReversibleSequence(steps).eval()
    steps[0].train()
    plain[1].eval()
    x = torch.randn(3, 4, 2, 2)
    y, ld = seq(x)
    h, ld_a = plain[0](x)
    y0, ld_b = plain[1](h)
    assert steps[0].actnorm.is_initialized() and plain[0].actnorm.is_initialized()
    torch.testing.assert_close(y, y0, rtol=0, atol=0)
    torch.testing.assert_close(ld, ld_a + ld_b, rtol=0, atol=0)


def test_gradient_accumulation_and_state_untouched_by_the_recompute():
    stored, rev, x = _glow_pair(torch.float64, True, True)
    x2 = torch.rand_like(x) - 0.5
    state = {k: v.clone() for k, v in rev.state_dict().items()}
    for m in (stored, rev):
        m.zero_grad(set_to_none=True)
        for batch in (x, x2):
            log_p, logdet, _ = m(batch)
            ff.bits_per_dim(log_p, logdet, x[0].numel()).backward()
    want = {n: p.grad for n, p in stored.named_parameters()}
    got = {n: p.grad for n, p in rev.named_parameters()}
    _check_grads(got, want, 1e-8)
    for k, v in rev.state_dict().items():  # forward + recompute changed no parameter/buffer
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


@pytest.mark.parametrize("n_flow", [2, ff.layers.flowstep.MIN_STACK], ids=["per_step", "stacked"])
@pytest.mark.parametrize("derived", [False, True], ids=["leaves", "derived"])
def test_functional_call_gives_the_swapped_parameters_their_gradients(derived, n_flow):
    """``torch.func.functional_call`` swaps tensors in for the call only, and the chain's
    backward runs after it: the recompute must use the swapped tensors (not the module's
    own, which got the gradients before), and tensors derived from others (``derived``)
    must pass the gradient on to where they came from. ``stacked``: the blocks' W from one
    stacked assembly, whose one backward must reach the swapped tensors too."""
    stored, rev, x = _glow_pair(torch.float64, True, True, n_flow=n_flow)
    base = {n: (p.detach() + 0.01 * torch.randn_like(p)).requires_grad_(True)
            for n, p in stored.named_parameters()}
    grads = []
    for model in (stored, rev):
        for p in base.values():
            p.grad = None
        params = {n: 1.5 * p for n, p in base.items()} if derived else base
        log_p, logdet, _ = torch.func.functional_call(model, params, (x,))
        ff.bits_per_dim(log_p, logdet, x[0].numel()).backward()
        grads.append({n: p.grad for n, p in base.items()})
        assert all(p.grad is None for p in model.parameters())
    assert all(g is not None for g in grads[1].values())
    _check_grads(grads[1], grads[0], 1e-8)


def test_a_coupling_network_with_dropout_draws_the_same_in_the_recompute():
    """The recompute runs the coupling networks again: one that draws random numbers
    (dropout) must draw the forward's (it drew fresh ones: gradients of another network),
    and the backward must leave the caller's random stream where the forward left it."""
    torch.manual_seed(0)
    steps = [_layer("flowstep_lu", 4, torch.float64), _layer("coupling", 4, torch.float64)]
    for s in steps:
        c = s.coupling if isinstance(s, ff.FlowStep) else s
        c.net = torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Dropout(0.5), torch.nn.Conv2d(8, 4, 1)).double()
    seq = ReversibleSequence(steps)
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    seq(x)  # ActNorm initialisation
    wy, wl = torch.randn_like(x), torch.randn(3, dtype=torch.float64)
    results = []
    for reversible in (False, True):
        torch.manual_seed(5)
        y, ld, grads = _seq_grads(seq, x, reversible, wy, wl)
        results.append((y, ld, grads, torch.rand(4)))
    (y0, ld0, want, next0), (y1, ld1, got, next1) = results
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    _check_grads(got, want, 1e-8)
    torch.testing.assert_close(next1, next0, rtol=0, atol=0)


def _net_with(kind):
    """A coupling network (2 -> 4 channels) with modules whose forward updates buffers."""
    nn = torch.nn
    if kind == "batchnorm":  # running statistics (no bias before it: its gradient is ~0)
        layers = [nn.Conv2d(2, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)]
    else:  # spectral norm: the weight comes from power-iteration vectors updated first
        layers = [nn.utils.parametrizations.spectral_norm(nn.Conv2d(2, 8, 3, padding=1))]
    return nn.Sequential(*layers, nn.ReLU(), nn.Conv2d(8, 4, 1)).double()


@pytest.mark.parametrize("kind", ["batchnorm", "spectral_norm"])
def test_coupling_networks_that_update_buffers(kind):
    """The recompute runs the coupling networks again in training mode: a BatchNorm updated
    its running statistics a second time (and counted a second batch), so the model's
    state drifted from the stored path's; spectral norm's weight came from one more power
    iteration than the forward's, so the gradients were another weight's (1e-3 off)."""
    torch.manual_seed(0)
    steps = [_layer("flowstep_lu", 4, torch.float64), _layer("coupling", 4, torch.float64)]
    for s in steps:
        (s.coupling if isinstance(s, ff.FlowStep) else s).net = _net_with(kind)
    seq = ReversibleSequence(steps)
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    seq(x)  # ActNorm initialisation
    before = copy.deepcopy(seq.state_dict())
    wy, wl = torch.randn_like(x), torch.randn(3, dtype=torch.float64)
    states, grads = [], []
    for reversible in (False, True):
        seq.load_state_dict(before)
        grads.append(_seq_grads(seq, x, reversible, wy, wl)[2])
        states.append(copy.deepcopy(seq.state_dict()))
    _check_grads(grads[1], grads[0], 1e-8)
    for name, value in states[0].items():
        torch.testing.assert_close(states[1][name], value, rtol=0, atol=0, msg=name)


def test_a_batchnorm_switched_to_eval_before_backward_keeps_its_forward_update():
    """The recompute sets the networks' buffers to their values before the forward, and
    sets back afterwards those of the modules in training mode then: a network switched to
    eval mode between forward and backward (an evaluation batch in between) lost its
    forward's BatchNorm update (running statistics and batch count back to their values
    before the step), where the stored-activation path keeps it."""
    torch.manual_seed(0)
    steps = [_layer("flowstep_lu", 4, torch.float64), _layer("coupling", 4, torch.float64)]
    for s in steps:
        (s.coupling if isinstance(s, ff.FlowStep) else s).net = _net_with("batchnorm")
    seq = ReversibleSequence(steps)
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    seq(x)  # ActNorm initialisation
    before = copy.deepcopy(seq.state_dict())
    states = []
    for reversible in (False, True):
        seq.load_state_dict(before)
        seq.train()
        y, ld = seq(x) if reversible else seq._ordinary(x)
        assert (type(y.grad_fn).__name__ == "_ReversibleChainBackward") == reversible
        seq.eval()
        (y.sum() + ld.sum()).backward()
        states.append(copy.deepcopy(seq.state_dict()))
    assert any(not torch.equal(states[0][k], before[k]) for k in before)  # it was updated
    for name, value in states[0].items():
        torch.testing.assert_close(states[1][name], value, rtol=0, atol=0, msg=name)


def test_two_forwards_then_one_backward_keep_the_last_forwards_buffers():
    """Two batches through the chain and one backward of the summed loss: the second
    chain's backward runs first, then the first's, whose recompute starts from the
    buffers before the first forward. Afterwards the BatchNorm buffers must hold the
    second forward's values again (the recompute's are set back), as on the stored path."""
    torch.manual_seed(0)
    steps = [_layer("flowstep_lu", 4, torch.float64), _layer("coupling", 4, torch.float64)]
    for s in steps:
        (s.coupling if isinstance(s, ff.FlowStep) else s).net = _net_with("batchnorm")
    seq = ReversibleSequence(steps)
    x1 = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    x2 = torch.randn(3, 4, 4, 4, dtype=torch.float64) * 2 + 1
    seq(x1)  # ActNorm initialisation
    before = copy.deepcopy(seq.state_dict())
    states, grads = [], []
    for reversible in (False, True):
        seq.load_state_dict(before)
        seq.zero_grad(set_to_none=True)
        loss = 0
        for x in (x1, x2):
            y, ld = seq(x) if reversible else seq._ordinary(x)
            assert (type(y.grad_fn).__name__ == "_ReversibleChainBackward") == reversible
            loss = loss + (y * y).sum() + ld.sum()
        loss.backward()
        states.append(copy.deepcopy(seq.state_dict()))
        grads.append({n: p.grad.clone() for n, p in seq.named_parameters()})
    _check_grads(grads[1], grads[0], 1e-8)
    for name, value in states[0].items():
        torch.testing.assert_close(states[1][name], value, rtol=0, atol=0, msg=name)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_double_backward_is_refused_clearly():
    _, rev, x = _glow_pair(torch.float64, True, True)
    log_p, logdet, _ = rev(x)
    with pytest.raises(RuntimeError, match="double backward"):
        (log_p + logdet).sum().backward(create_graph=True)


@pytest.fixture
def triton_backend():
    with ff.use_backend("triton"):
        yield


def test_bf16_autocast_replays_the_forward_autocast_state(triton_backend):
    """Under CPU bf16 autocast the coupling networks run in bf16; the recompute must run them
    the same way, or the rebuilt inputs (and gradients) are off by bf16 rounding.

    On the Triton path, where the flow-layer math stays float32 under autocast as DESIGN.md
    requires. (The reference path's 1x1 convolution followed autocast to bf16 in a backward
    inside the block -- issue 9 item 3, owned by the op layer, fixed since in
    ``reference._mix`` -- and its inverse then could not rebuild to float32 accuracy: 0.14
    relative gradient difference measured before that fix.)"""
    stored, rev, x = _glow_pair(torch.float32, True, True, n_flow=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, want = _glow_grads(stored, x)
        _, got = _glow_grads(rev, x)
    errs = [_rel(got[n], want[n]) for n in want]
    assert max(errs) < 1e-4, max(errs)
    # the replay matters: recomputing in float32 instead gives visibly different gradients
    from fastflow.layers import reversible as R
    original = R._autocast_state
    R._autocast_state = lambda device_type: (device_type, False, None, True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, wrong = _glow_grads(rev, x)
    finally:
        R._autocast_state = original
    assert max(_rel(wrong[n], want[n]) for n in want) > 10 * max(errs)


def test_backward_outside_autocast_keeps_the_flow_gradients_in_float32():
    """Forward under bf16 autocast, backward after the block (PyTorch's recommended use):
    the stored graph's backward ops run without autocast, so the flow layers' gradients
    stay float32. The recompute replayed the forward's autocast around its backward ops as
    well, and the reference path's 1x1-convolution backward then ran in bf16 (0.6 %
    relative gradient difference at K=1, 4 % at K=4, measured before the fix)."""
    stored, rev, x = _glow_pair(torch.float32, True, True, n_flow=1)
    grads = []
    for model in (stored, rev):
        model.zero_grad(set_to_none=True)
        with ff.use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):
            log_p, logdet, _ = model(x)
            loss = ff.bits_per_dim(log_p, logdet, x[0].numel())
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    _check_grads(grads[1], grads[0], 1e-4)


@pytest.mark.parametrize("find_unused", [False, True], ids=["default", "find_unused"])
@pytest.mark.parametrize("n_flow", [2, ff.layers.flowstep.MIN_STACK], ids=["per_step", "stacked"])
def test_ddp_hooks_fire_once_per_parameter(tmp_path, n_flow, find_unused):
    """One-process gloo DDP: every parameter's gradient arrives (DDP's reducer marks each
    ready exactly once, else it raises) and equals the stored model's. ``stacked``: the
    blocks' W assembled as one stack, ActNorm's scale reaching both the mix and the stacked
    log-det (one accumulation). ``find_unused_parameters=True`` walks the graph from the
    outputs at forward: the chain's parameters must be found there (they were not inputs
    of its node: marked unused, then ready a second time in backward, which DDP refuses)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("no gloo backend")
    stored, rev, x = _glow_pair(torch.float64, True, True, n_flow=n_flow)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(rev,
                                                        find_unused_parameters=find_unused)
        ready = []
        for p in rev.parameters():
            p.register_post_accumulate_grad_hook(lambda p: ready.append(id(p)))
        for _ in range(2):  # the second iteration checks the reducer's per-iteration state
            ready.clear()
            ddp.zero_grad(set_to_none=True)
            log_p, logdet, _ = ddp(x)
            ff.bits_per_dim(log_p, logdet, x[0].numel()).backward()
            assert sorted(ready) == sorted(id(p) for p in rev.parameters())
    finally:
        dist.destroy_process_group()
    _, want = _glow_grads(stored, x)
    _check_grads({n: p.grad for n, p in rev.named_parameters()}, want, 1e-8)


def _ill_conditioned_chain(dtype=torch.float32, **kw):
    """Three FlowSteps; the middle coupling's scale for one channel is about sigmoid(-16),
    1e-7: the next step's rebuild error (absolute, at the scale of the other channels) is
    amplified 1e7 times when this step's input is rebuilt."""
    torch.manual_seed(3)
    steps = [ff.FlowStep(4, filter_size=8).to(dtype) for _ in range(3)]
    seq = ReversibleSequence(steps, **kw)
    _perturb(seq)
    x = torch.randn(3, 4, 4, 4, dtype=dtype)
    seq(x)  # initialise the ActNorms
    with torch.no_grad():
        steps[1].coupling.net[4].conv.bias[0] = -18.0  # raw of channel 0: s = sigmoid(raw + 2)
    return seq, x


def test_fallback_keeps_the_input_of_an_ill_conditioned_step():
    seq, x = _ill_conditioned_chain()
    wy, wl = torch.randn_like(x), torch.randn(x.shape[0])
    _, _, want = _seq_grads(seq, x, False, wy, wl)
    _, _, got = _seq_grads(seq, x, True, wy, wl)
    _check_grads(got, want, 1e-4, "with fallback")
    assert int(seq.fallback_count) == 1 and int(seq.fallback_overflow) == 0

    # the same chain without the fallback returns a wrong gradient: the test can fail
    bare = ReversibleSequence(list(seq), fallback_cond=float("inf"))
    _, _, bad = _seq_grads(bare, x, True, wy, wl)
    assert max(_rel(bad[n], want[n]) for n in want) > 1e-2
    assert int(bare.fallback_count) == 0

    # no reserve: the step is flagged, counted as an overflow and rebuilt
    none = ReversibleSequence(list(seq), fallback_slots=0)
    _seq_grads(none, x, True, wy, wl)
    assert int(none.fallback_count) == 0 and int(none.fallback_overflow) == 1


def test_fallback_on_the_triton_backend():
    with ff.use_backend("triton"):
        seq, x = _ill_conditioned_chain()
        wy, wl = torch.randn_like(x), torch.randn(x.shape[0])
        _, _, want = _seq_grads(seq, x, False, wy, wl)
        _, _, got = _seq_grads(seq, x, True, wy, wl)
    _check_grads(got, want, 1e-4, "triton with fallback")
    assert int(seq.fallback_count) == 1


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"steps\[1\]: expected a fastflow flow step"):
        ReversibleSequence([ff.ActNorm(2), torch.nn.Conv2d(2, 2, 1)])
    with pytest.raises(ValueError, match="fallback_slots"):
        ReversibleSequence([ff.ActNorm(2)], fallback_slots=-1)
    with pytest.raises(ValueError, match="fallback_cond"):
        ReversibleSequence([ff.ActNorm(2)], fallback_cond=0.5)
    with pytest.raises(TypeError, match="reversible: expected a bool"):
        ff.Glow(1, 1, 1, reversible="yes")
    # steps of other channel counts: the reversible path failed inside (a stack of W's of
    # two sizes, a reshape, h's shape), the ordinary one only at the mismatched step
    for steps in ([ff.FlowStep(4, filter_size=8), ff.FlowStep(6, filter_size=8)],
                  [ff.ActNorm(4), ff.AffineCoupling(6, filter_size=8)],
                  [ff.InvConv2dLU(4), ff.InvConv2d(3)]):
        with pytest.raises(ValueError, match=r"^steps\[1\]: expected a step of 4 channels"):
            ReversibleSequence(steps)


def test_steps_added_after_construction_are_checked_at_the_call():
    """The chain is a ModuleList: ``append`` / ``insert`` / ``seq[i] = ...`` bypass the
    constructor's checks. An appended ``nn.Identity`` returned x, which the ordinary path
    unpacked as (y, logdet): y the first sample and a log-det broadcast to (C, H, 2), no
    error; a step of other channels failed inside (a stack of W's of two sizes)."""
    x = torch.randn(2, 4, 3, 2)
    seq = ReversibleSequence([ff.ActNorm(4)]).eval()
    seq.append(torch.nn.Identity())
    for call in (seq, seq.inverse):
        with pytest.raises(TypeError, match=r"^steps\[1\]: expected a fastflow flow step"):
            call(x)
    seq[1] = ff.FlowStep(6, filter_size=8)
    with pytest.raises(ValueError, match=r"^steps\[1\]: expected a step of 4 channels"):
        seq(x.requires_grad_(True))


@pytest.mark.parametrize("steps", [lambda: [ff.FlowStep(4, filter_size=8)],
                                   lambda: [ff.ActNorm(4), ff.InvConv2d(4)],
                                   lambda: [ff.AffineCoupling(4, filter_size=8)]],
                         ids=["flowstep", "actnorm_invconv", "coupling"])
def test_bad_input_on_the_reversible_path_names_x(steps):
    """With grad on, bad input gets the ordinary path's error naming x (it was a reshape
    RuntimeError or an IndexError from inside the chain)."""
    seq = ReversibleSequence(steps())
    seq(torch.randn(2, 4, 3, 3))  # ActNorm initialisation
    with pytest.raises(ValueError, match=r"x: expected 4 channels"):
        seq(torch.randn(2, 6, 3, 3, requires_grad=True))
    with pytest.raises(ValueError, match=r"x: expected a 4-D tensor"):
        seq(torch.randn(4, 3, 3, requires_grad=True))


def test_input_of_another_dtype_than_the_coupling_network_names_x():
    """As the stored step's coupling says it; the reversible path called the network
    itself: "Input type (float) and bias type (double) should be the same"."""
    model = ff.Glow(1, 1, 1, filter_size=8, reversible=True).double()
    model(torch.rand(2, 1, 2, 2, dtype=torch.float64))  # ActNorm initialisation
    with pytest.raises(TypeError, match=r"^x: expected torch.float64, the coupling network's "
                                        r"dtype \(or autocast\), got torch.float32"):
        model(torch.rand(2, 1, 2, 2))


def test_memory_flat_in_n_flow_both_ways():
    """Bytes autograd's saved_tensors_hooks see kept after forward, and bytes of every
    storage forward created that is still alive (graph, ctx, anything reachable): flat in
    n_flow for the reversible Glow, growing for the stored one."""
    suite = _suite()
    got = {}
    for n_flow in (4, 16):
        torch.manual_seed(0)
        stored, rev = suite.make_pair(n_flow, n_block=2, in_channel=1, filter_size=16)
        x = torch.rand(4, 1, 8, 8) - 0.5
        suite._init_pair(stored, rev, x)
        for name, m in (("stored", stored), ("reversible", rev)):
            got[name, "saved", n_flow] = suite.saved_bytes(m, x)[0]
            got[name, "alive", n_flow] = suite.alive_bytes(m, x)[0]
    one_step_net = suite.one_step_net_bytes(stored, x)
    for how in ("saved", "alive"):
        assert got["reversible", how, 16] == got["reversible", how, 4], got
        assert got["stored", how, 16] > 3 * got["stored", how, 4], got
        assert got["stored", how, 16] > 8 * got["reversible", how, 16], got
    # what the reversible model keeps beyond its outputs (fallback reserve, the priors'
    # inputs) is below one step's coupling-network activations
    assert got["reversible", "alive", 16] < one_step_net, (got, one_step_net)


def test_reversible_glow_reverses_and_samples_like_the_stored_one():
    stored, rev, x = _glow_pair(torch.float64, True, True)
    with torch.no_grad():
        z = rev(x)[2]
        torch.testing.assert_close(rev.reverse(z, reconstruct=True), x, rtol=1e-9, atol=1e-9)
        g = torch.Generator().manual_seed(0)
        a = rev.sample(2, image_size=(8, 8), generator=g)
        g = torch.Generator().manual_seed(0)
        b = stored.sample(2, image_size=(8, 8), generator=g)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    inv_x, inv_ld = rev.blocks[0].flows.inverse(rev.blocks[0].flows(x.reshape(4, 4, 4, 4))[0])
    torch.testing.assert_close(inv_x, x.reshape(4, 4, 4, 4), rtol=1e-9, atol=1e-9)


def test_gradient_drift_along_a_digits_training_run_is_bounded():
    """Reversible vs stored gradients per parameter group on a fixed batch, at the start and
    after 30 Adam steps of the embedded-digits training run (float32)."""
    pytest.importorskip("sklearn")
    res, fallbacks = _suite().drift(checkpoints=(0, 30), n_flow=3, filter_size=16, batch=32)
    assert set(res) == {0, 30}
    for step, groups in res.items():
        assert set(groups) >= {"actnorm", "invconv", "coupling", "prior"}
        for group, err in groups.items():
            assert err < 1e-4, (step, group, err)
    assert fallbacks == 0


@pytest.mark.slow
def test_torch_compile_runs_the_chain_eagerly_with_the_same_gradients():
    stored, rev, x = _glow_pair(torch.float32, True, True, n_flow=1)
    torch._dynamo.reset()
    compiled = torch.compile(rev)
    _, want = _glow_grads(stored, x)
    _, got = _glow_grads(compiled, x)
    _check_grads({n.removeprefix("_orig_mod."): g for n, g in got.items()}, want, 1e-4)


def test_an_actnorm_without_its_logdet_is_refused():
    ActNorm, FlowStep = ff.ActNorm, ff.FlowStep
    """ActNorm(logdet=False) returns y alone: the chain's ordinary path unpacked it as
    (y, logdet), so a batch of two became a one-sample "y" and a "log-det" that was the
    second sample, silently; the reversible path ignored the flag. Refused by name, when
    the chain is built and when the flag is changed afterwards."""
    with pytest.raises(ValueError, match=r"^steps\[1\]: expected an ActNorm that returns its "
                                         r"log-det \(logdet=True\)"):
        ReversibleSequence([ActNorm(4), ActNorm(4, logdet=False)])
    seq = ReversibleSequence([FlowStep(4, filter_size=8), ActNorm(4)])
    seq[0].actnorm.logdet = False
    with pytest.raises(ValueError, match=r"^steps\[0\]\.actnorm: expected an ActNorm"):
        seq(torch.randn(2, 4, 3, 3))
    seq[0].actnorm.logdet = True
    y, ld = seq(torch.randn(2, 4, 3, 3))
    assert y.shape == (2, 4, 3, 3) and ld.shape == (2,)


def test_an_empty_chain_is_the_identity_with_a_zero_logdet(backend):
    """ReversibleSequence() (its steps default to none) returned a None log-det, where every
    flow module gives (N,) in the compute dtype; and took an integer tensor."""
    chain = ReversibleSequence()
    for dtype, ld_dtype in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                            (torch.float64, torch.float64)]:
        x = torch.randn(3, 2, 4, 4).to(dtype)
        for y, ld in (chain(x), chain.inverse(x)):
            assert torch.equal(y, x)
            assert ld.dtype == ld_dtype and torch.equal(ld, torch.zeros(3, dtype=ld_dtype))
        assert torch.equal(chain.reverse(x), x)
    with pytest.raises(TypeError, match="^x: expected a floating-point tensor"):
        chain(torch.ones(3, 2, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="^y: expected a 4-D tensor"):
        chain.inverse(torch.randn(3, 2))


def _with_dropout(model, p=0.3):
    """Every coupling network with a dropout after its first ReLU (a user's network that
    draws random numbers)."""
    for block in model.blocks:
        for step in block.flows:
            net = step.coupling.net
            step.coupling.net = torch.nn.Sequential(net[0], net[1], torch.nn.Dropout(p),
                                                    *list(net)[2:])
    return model


def test_random_numbers_in_the_coupling_network_are_replayed(backend):
    """A coupling network with dropout: the recompute draws the forward's masks (the
    generators' state before each network is replayed), so the gradients are the stored
    ones, and backward leaves the generators as it found them. Without the replay the
    recompute drew new masks: the rebuilt inputs and gradients were off by 1.4 (relative)."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    stored, rev, x = _glow_pair(dtype, True, True)
    _with_dropout(stored), _with_dropout(rev)
    states = {}
    for name, m in (("stored", stored), ("reversible", rev)):
        torch.manual_seed(5)
        m.zero_grad(set_to_none=True)
        log_p, logdet, _ = m(x)
        loss = ff.bits_per_dim(log_p, logdet, x[0].numel())
        after_forward = torch.get_rng_state()
        loss.backward()
        assert torch.equal(torch.get_rng_state(), after_forward), name
        states[name] = after_forward
    assert torch.equal(states["stored"], states["reversible"])
    want = {n: p.grad for n, p in stored.named_parameters()}
    _check_grads({n: p.grad for n, p in rev.named_parameters()}, want, TOL[dtype], backend)


def test_the_stock_network_keeps_no_generator_state(monkeypatch):
    """The stock coupling network draws no random numbers: nothing to replay (no state kept
    per step, nothing set in backward); one with dropout has its state kept once per
    network and forward, and set for its recompute."""
    from fastflow.layers import reversible as R
    _, rev, x = _glow_pair(torch.float64, True, True)
    assert not any(R._CouplingStage(s.coupling).replays_rng() for b in rev.blocks for s in b.flows)
    calls = []
    for name in ("_net_state", "_as_at_forward"):
        original = getattr(R, name)
        monkeypatch.setattr(R, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    _glow_grads(rev, x)
    assert calls == []
    _with_dropout(rev)
    assert all(R._CouplingStage(s.coupling).replays_rng() for b in rev.blocks for s in b.flows)
    _glow_grads(rev, x)
    n_nets = sum(len(b.flows) for b in rev.blocks)
    assert sorted(calls) == ["_as_at_forward"] * n_nets + ["_net_state"] * n_nets, calls


def test_the_generator_of_any_accelerator_is_replayed(monkeypatch):
    """A coupling network on an accelerator other than CUDA (MPS, XPU: the device module
    ``torch.get_device_module`` gives) draws from that device's generator: its state before
    the network ran is set for the recompute, and the backward leaves it as it found it.
    Only CUDA's was kept, so dropout on MPS recomputed with fresh masks (another network's
    gradients). Simulated here with a stand-in for torch.mps's generator functions."""
    from fastflow.layers import reversible as R
    mps = torch.get_device_module("mps")
    gen = {"state": torch.tensor([1], dtype=torch.uint8)}

    def set_rng_state(new_state, device="mps"):
        gen["state"] = new_state.clone()

    monkeypatch.setattr(mps, "get_rng_state", lambda device="mps": gen["state"].clone())
    monkeypatch.setattr(mps, "set_rng_state", set_rng_state)
    net = torch.nn.Sequential(torch.nn.Dropout(0.5))
    recorded = R._net_state(net, torch.device("mps", 0))  # before the forward's draws
    gen["state"] = torch.tensor([2], dtype=torch.uint8)  # the forward drew
    with R._as_at_forward(net, recorded):
        assert gen["state"].tolist() == [1]  # the recompute draws what the forward drew
        gen["state"] = torch.tensor([3], dtype=torch.uint8)
    assert gen["state"].tolist() == [2]  # the caller's stream where the forward left it


def _fresh_bpd(model, x):
    """(x as a fresh leaf, the Glow's bits/dim of it), every .grad of ``model`` cleared."""
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    log_p, logdet, _ = model(xi)
    return xi, ff.bits_per_dim(log_p, logdet, x[0].numel())


@pytest.mark.parametrize("n_flow", [2, ff.layers.flowstep.MIN_STACK], ids=["per_step", "stacked"])
@pytest.mark.parametrize("how", ["grad", "backward_inputs"])
def test_gradients_wrt_the_input_alone_leave_parameter_grads_alone(how, n_flow):
    """torch.autograd.grad(loss, x) and loss.backward(inputs=[x]): the input's gradient is
    the stored one, no parameter's .grad is touched (the chain accumulated every
    parameter's gradient into .grad as if backward() had been called: 48 of 48 here) and
    nothing is warned."""
    stored, rev, x = _glow_pair(torch.float64, True, True, n_flow=n_flow)
    got = {}
    for name, m in (("stored", stored), ("reversible", rev)):
        xi, loss = _fresh_bpd(m, x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            if how == "grad":
                got[name] = torch.autograd.grad(loss, xi)[0]
            else:
                loss.backward(inputs=[xi])
                got[name] = xi.grad
        touched = [n for n, p in m.named_parameters() if p.grad is not None]
        assert touched == [], (name, touched)
    assert _rel(got["reversible"], got["stored"]) < 1e-10
    # a plain backward afterwards still gives the parameters the stored gradients
    _, want = _glow_grads(stored, x)
    _, after = _glow_grads(rev, x)
    _check_grads(after, want, 1e-8)


def _counting_lu_weight(monkeypatch):
    """Calls of ``lu_weight_logdet`` (one per W assembly: a step's own, or a stacked one)."""
    from fastflow.layers import channel_mix as layer_mix, flowstep
    calls = []
    original = flowstep.lu_weight_logdet

    def counted(lower, *args, **kwargs):
        calls.append(tuple(lower.shape[:-2]))
        return original(lower, *args, **kwargs)

    monkeypatch.setattr(flowstep, "lu_weight_logdet", counted)
    monkeypatch.setattr(layer_mix, "lu_weight_logdet", counted)
    return calls


def test_reversible_blocks_assemble_w_as_one_stack(backend, monkeypatch):
    """With MIN_STACK or more LU FlowSteps a reversible block assembles every step's W and
    log-det as one stack, as the stored block does: once in forward and once in backward
    (and back-propagates through it once), where it made one assembly per step in each;
    the gradients are the stored model's and the loss is bitwise the same."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    k = ff.layers.flowstep.MIN_STACK
    stored, rev, x = _glow_pair(dtype, True, True, n_flow=k)
    loss0, want = _glow_grads(stored, x)
    calls = _counting_lu_weight(monkeypatch)
    loss1, got = _glow_grads(rev, x)
    assert calls == [(k,)] * 4, calls  # 2 blocks x (forward, backward)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    _check_grads(got, want, TOL[dtype], backend)
    assert int(rev.fallback_count) == 0


@pytest.mark.parametrize("frozen", ["actnorm.scale", "actnorm.loc", "invconv.w_s", "invconv"])
def test_stacked_reversible_blocks_with_frozen_parameters(frozen):
    """Parameters left out of training (requires_grad=False) in a stacked block: they get
    no gradient, the others the stored ones."""
    stored, rev, x = _glow_pair(torch.float64, True, True, n_flow=ff.layers.flowstep.MIN_STACK)
    for m in (stored, rev):
        for name, p in m.named_parameters():
            if frozen in name:
                p.requires_grad_(False)
    grads = []
    for m in (stored, rev):
        m.zero_grad(set_to_none=True)
        log_p, logdet, _ = m(x)
        ff.bits_per_dim(log_p, logdet, x[0].numel()).backward()
        assert all(p.grad is None for p in m.parameters() if not p.requires_grad)
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    _check_grads(grads[1], grads[0], 1e-8, frozen)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_chain_stacks_its_lu_flowsteps_wherever_they_sit(dtype, monkeypatch):
    """LU FlowSteps interleaved with other step types (and a FlowStep with a plain 1x1
    convolution, which assembles its own W) are stacked together, on the reversible path
    and the ordinary one alike: the same outputs bitwise and the stored gradients."""
    torch.manual_seed(4)
    kinds = ["flowstep_lu", "actnorm", "flowstep_lu", "coupling", "flowstep_plain_additive",
             "flowstep_lu", "invconv_lu", "flowstep_lu"]
    calls = _counting_lu_weight(monkeypatch)
    seq = _compare_seq([_layer(k, 5, dtype) for k in kinds], dtype)
    calls.clear()
    x = torch.randn(3, 5, 3, 4, dtype=dtype, requires_grad=True)
    seq(x)[1].sum().backward()
    # the four LU FlowSteps as one stack (forward, backward); the lone InvConv2dLU its own
    assert sorted(calls) == sorted([(4,), (), (4,), ()]), calls
    calls.clear()
    seq._ordinary(x)  # the ordinary path likewise: one stack, the lone layer its own
    assert sorted(calls) == sorted([(4,), ()]), calls


_HOOK_REGISTRATIONS = {"forward": "register_forward_hook",
                       "forward_pre": "register_forward_pre_hook",
                       "backward": "register_full_backward_hook",
                       "backward_pre": "register_full_backward_pre_hook"}


@pytest.mark.parametrize("where", ["step", "actnorm", "invconv", "coupling"])
@pytest.mark.parametrize("kind", list(_HOOK_REGISTRATIONS))
def test_a_hooked_step_runs_the_ordinary_way_so_its_hooks_run(where, kind):
    """A hook on a step or on its ActNorm / 1x1 convolution / coupling fires only if the
    module is called, and the reversible stages never call those modules, so the hook was
    skipped silently (a forward hook that scales the output gave another loss: 9.27 stored,
    8.40 reversible). The chain now runs the ordinary way: the hook fires as often as on
    the stored model and the results are the stored model's; without the hook it is
    reversible again. Forward (pre-)hooks scale what they see; full backward (pre-)hooks
    only count their calls."""
    stored, rev, x = _glow_pair(torch.float64, True, True)
    calls = []

    def scaling_hook(module, args, out=None):
        calls.append(module)
        if out is None:
            return (args[0] * 1.5,)
        return (out[0] * 1.5, out[1]) if isinstance(out, tuple) else out * 1.5

    def counting_hook(module, *grads):
        calls.append(module)

    hook = scaling_hook if kind.startswith("forward") else counting_hook
    handles = []
    for m in (stored, rev):
        step = m.blocks[0].flows[1]
        target = step if where == "step" else getattr(step, where)
        handles.append(getattr(target, _HOOK_REGISTRATIONS[kind])(hook))
    loss0, want = _glow_grads(stored, x)
    n_stored = len(calls)
    loss1, got = _glow_grads(rev, x)
    assert n_stored >= 1 and len(calls) == 2 * n_stored
    torch.testing.assert_close(loss1, loss0, rtol=1e-12, atol=1e-12)
    _check_grads(got, want, 1e-8, where)
    for h in handles:
        h.remove()
    y = rev.blocks[0].flows(torch.rand(4, 4, 4, 4, dtype=torch.float64))[1]
    assert type(y.grad_fn).__name__ == "_ReversibleChainBackward"


def _seq_with_nets(make_net, kinds=("flowstep_lu", "coupling")):
    """A chain whose coupling networks are ``make_net()`` (2 -> 4 channels), its ActNorms
    initialised; (seq, x, its state before any training call)."""
    torch.manual_seed(0)
    steps = [_layer(k, 4, torch.float64) for k in kinds]
    for s in steps:
        (s.coupling if isinstance(s, ff.FlowStep) else s).net = make_net()
    seq = ReversibleSequence(steps)
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    seq(x)  # ActNorm initialisation
    return seq, x, copy.deepcopy(seq.state_dict())


def _bn_dropout_net():
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(8, 4, 1)).double()


@pytest.mark.parametrize("switched", ["chain", "networks", "one_batchnorm"])
def test_eval_mode_set_between_forward_and_backward_recomputes_in_the_forwards_modes(switched):
    """``model.eval()`` (or on some submodules) between forward and backward: the stored
    graph holds the forward's dropout masks and BatchNorm batch statistics, so the
    recompute must run in the modes the forward ran in (it ran in eval mode: no dropout,
    running statistics, gradients 0.5 off relative); the gradients, the buffers and the
    random stream afterwards are the stored model's, and the user's modes are kept."""
    seq, x, before = _seq_with_nets(_bn_dropout_net)
    wy, wl = torch.randn_like(x), torch.randn(3, dtype=torch.float64)
    results = []
    for reversible in (False, True):
        seq.load_state_dict(before)
        seq.train()
        seq.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        xi = x.clone().requires_grad_(True)
        y, ld = seq(xi) if reversible else seq._ordinary(xi)
        assert (type(y.grad_fn).__name__ == "_ReversibleChainBackward") == reversible
        if switched == "chain":
            seq.eval()
        elif switched == "networks":
            for s in seq:
                (s.coupling if isinstance(s, ff.FlowStep) else s).net.eval()
        else:
            seq[1].net[1].eval()
        modes = [m.training for m in seq.modules()]
        ((wy * y).sum() + (wl * ld).sum()).backward()
        assert [m.training for m in seq.modules()] == modes  # the user's modes kept
        grads = {n: p.grad.clone() for n, p in seq.named_parameters()}
        grads["x"] = xi.grad
        results.append((grads, copy.deepcopy(seq.state_dict()), torch.rand(4)))
    (want, state0, next0), (got, state1, next1) = results
    _check_grads(got, want, 1e-8, switched)
    for name, value in state0.items():
        torch.testing.assert_close(state1[name], value, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(next1, next0, rtol=0, atol=0)


class _FailsOnSecondCall(torch.nn.Module):
    """Raises on its second call: the reversible recompute."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("recompute failed")
        return x


def test_the_users_modes_are_restored_when_the_backward_raises():
    seq, x, _ = _seq_with_nets(
        lambda: torch.nn.Sequential(torch.nn.Conv2d(2, 4, 1), torch.nn.Dropout(0.5),
                                    _FailsOnSecondCall()).double(), kinds=("coupling",))
    seq[0].net[2].calls = 0  # (the initialising call ran it)
    seq.train()
    y, ld = seq(x.clone().requires_grad_(True))
    seq.eval()
    with pytest.raises(RuntimeError, match="recompute failed"):
        (y.sum() + ld.sum()).backward()
    assert not any(m.training for m in seq.modules())


_GLOBAL_HOOKS = {"forward": "register_module_forward_hook",
                 "forward_pre": "register_module_forward_pre_hook",
                 "backward": "register_module_full_backward_hook",
                 "backward_pre": "register_module_full_backward_pre_hook"}


@pytest.mark.parametrize("kind", list(_GLOBAL_HOOKS))
def test_a_global_module_hook_runs_the_chain_the_ordinary_way(kind):
    """A global module hook (``torch.nn.modules.module.register_module_*``) fires on every
    module called, and the reversible stages call no step, so it was skipped for the steps
    (and fired twice for the coupling networks, called again in the recompute). The chain
    now runs the ordinary way while one is registered: the hook sees the modules the stored
    model calls (the chain itself, called where the stored Glow iterates a list, aside),
    and the results are the stored model's. Forward (pre-)hooks scale a FlowStep's input or
    output; backward ones count."""
    stored, rev, x = _glow_pair(torch.float64, True, True)
    for m in (*stored.modules(), *rev.modules()):
        if isinstance(m, torch.nn.ReLU):  # (full backward hooks refuse in-place outputs)
            m.inplace = False
    calls = []

    def hook(module, *args):
        calls.append(module)
        if isinstance(module, ff.FlowStep) and kind == "forward_pre":
            return (args[0][0] * 1.5,)
        if isinstance(module, ff.FlowStep) and kind == "forward":
            return (args[1][0] * 1.5, args[1][1])
        return None

    results = []
    handle = getattr(torch.nn.modules.module, _GLOBAL_HOOKS[kind])(hook)
    try:
        for m in (stored, rev):
            calls.clear()
            loss, grads = _glow_grads(m, x)
            names = {id(mod): n for n, mod in m.named_modules()}
            seen = [names[id(mod)] for mod in calls if not isinstance(mod, ReversibleSequence)]
            results.append((loss, grads, seen))
    finally:
        handle.remove()
    (loss0, want, seen0), (loss1, got, seen1) = results
    assert any(".flows.1.actnorm" in n for n in seen0)
    assert seen1 == seen0
    torch.testing.assert_close(loss1, loss0, rtol=1e-12, atol=1e-12)
    _check_grads(got, want, 1e-8, kind)
    y = rev.blocks[0].flows(torch.rand(4, 4, 4, 4, dtype=torch.float64))[1]
    assert type(y.grad_fn).__name__ == "_ReversibleChainBackward"


def _requested(model):
    """Some of the chains' parameters (an LU factor, a coupling network's weight, an
    ActNorm scale; the stacked assembly's included) and a prior's."""
    wanted = ("blocks.0.flows.1.invconv.w_l", "blocks.0.flows.0.coupling.net.0.weight",
              "blocks.1.flows.0.actnorm.scale", "blocks.1.flows.1.actnorm.loc",
              "blocks.0.prior.conv.weight")
    params = dict(model.named_parameters())
    return [params[n] for n in wanted]


@pytest.mark.parametrize("n_flow", [2, ff.layers.flowstep.MIN_STACK], ids=["per_step", "stacked"])
@pytest.mark.parametrize("how", ["grad", "backward_inputs"])
def test_gradients_of_some_parameters_and_the_input_are_the_stored_ones(how, n_flow):
    """torch.autograd.grad(loss, [params..., x]) and loss.backward(inputs=[params..., x])
    on a mix of the chains' parameters, a prior's and the input: exactly those gradients,
    the stored model's, and no other parameter's .grad written. The chain's parameters
    were not inputs of its autograd node: grad() raised (unused tensors) and backward left
    them without gradients, with a warning."""
    stored, rev, x = _glow_pair(torch.float64, True, True, n_flow=n_flow)
    got = {}
    for name, m in (("stored", stored), ("reversible", rev)):
        xi, loss = _fresh_bpd(m, x)
        inputs = _requested(m) + [xi]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            if how == "grad":
                got[name] = torch.autograd.grad(loss, inputs)
            else:
                loss.backward(inputs=inputs)
                got[name] = [t.grad for t in inputs]
        asked = {id(t) for t in inputs}
        touched = [n for n, p in m.named_parameters() if p.grad is not None
                   and id(p) not in asked]
        assert touched == [], (name, touched)
    for a, b in zip(got["reversible"], got["stored"]):
        assert a is not None and _rel(a, b) < 1e-10


def test_a_step_used_twice_gets_one_gradient_through_its_hooks():
    """A step that appears twice in the chain: its parameters' gradient is the sum over
    both uses, reaching tensor hooks (and DDP's, once) as one gradient, as on the stored
    model. The chain accumulated each use's gradient by a separate backward: a hook ran
    once per use, and a clipping hook clipped each part instead of the sum."""
    torch.manual_seed(0)
    step, other = _layer("flowstep_lu", 4, torch.float64), _layer("coupling", 4, torch.float64)
    seq = ReversibleSequence([step, other, step])
    _perturb(seq)
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    seq(x)  # ActNorm initialisation
    calls = []
    for p in seq.parameters():
        p.register_hook(lambda g: calls.append(1) or g.clamp(-1e-2, 1e-2))
    wy, wl = torch.randn_like(x), torch.randn(3, dtype=torch.float64)
    _, _, want = _seq_grads(seq, x, False, wy, wl)
    n_stored = len(calls)
    _, _, got = _seq_grads(seq, x, True, wy, wl)
    assert n_stored == len(list(seq.parameters())) and len(calls) == 2 * n_stored
    _check_grads(got, want, 1e-8)


@pytest.mark.parametrize("name", ["0.invconv.w_s", "0.actnorm.scale", "1.net.0.weight",
                                  "0.coupling.net.4.scale"])
def test_a_parameter_changed_in_place_before_backward_is_refused(name):
    """A parameter of the chain modified in place between forward and backward (an
    optimizer step in between): the recompute would read the new value, the stored graph
    holds the forward's (it refuses the change for what it saved: a convolution's weight;
    an LU factor's it computed W from and kept W). The reversible backward silently gave
    other gradients (0.57 off relative for ``invconv.w_s``); it now raises autograd's
    in-place error."""
    torch.manual_seed(0)
    seq = ReversibleSequence([_layer("flowstep_lu", 4, torch.float64),
                              _layer("coupling", 4, torch.float64)])
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    seq(x)  # ActNorm initialisation
    y, ld = seq(x)
    with torch.no_grad():
        dict(seq.named_parameters())[name].add_(0.5)
    with pytest.raises(RuntimeError, match=f"modified by an inplace operation: parameter "
                                           f"{name} is at version"):
        (y.sum() + ld.sum()).backward()


def test_saved_tensor_hooks_see_no_parameter():
    """What the chain keeps for backward is its output (and the fallback reserve), not its
    parameters: a ``saved_tensors_hooks`` pair (``save_on_cpu``, a memory count) must not
    be handed them (they were, when saved to check their versions: 1.50 MB counted where
    0.18 MB is kept, Glow K=8 filter 64)."""
    _, rev, x = _glow_pair(torch.float64, True, True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y, ld = rev.blocks[0].flows(torch.rand(4, 4, 4, 4, dtype=torch.float64))
    assert type(y.grad_fn).__name__ == "_ReversibleChainBackward"
    params = {id(p) for p in rev.parameters()}
    assert packed and not any(id(t) in params for t in packed)


@pytest.mark.parametrize("toggle", ["unfrozen", "frozen"])
def test_requires_grad_changed_between_forward_and_backward(toggle):
    """A parameter's requires_grad switched between forward and backward: the stored graph
    was built at forward, so one frozen then (``unfrozen`` after) gets no gradient and one
    unfrozen then (``frozen`` after) none either (autograd skips a leaf that no longer
    requires grad). The reversible recompute read the unfrozen parameter's flag at backward
    and wrote its .grad."""
    stored, rev, x = _glow_pair(torch.float64, True, True)
    grads = []
    for m in (stored, rev):
        m.zero_grad(set_to_none=True)
        p = m.blocks[0].flows[1].invconv.w_s
        p.requires_grad_(toggle == "frozen")
        log_p, logdet, _ = m(x)
        p.requires_grad_(toggle != "frozen")
        ff.bits_per_dim(log_p, logdet, x[0].numel()).backward()
        grads.append({n: q.grad for n, q in m.named_parameters()})
    assert grads[0]["blocks.0.flows.1.invconv.w_s"] is None
    assert grads[1]["blocks.0.flows.1.invconv.w_s"] is None
    _check_grads({n: g for n, g in grads[1].items() if g is not None},
                 {n: g for n, g in grads[0].items() if g is not None}, 1e-8, toggle)
