"""``channel_mix_split``: the channel mix that also hands the first ``split`` output
channels to a following network as a tensor of its own (FlowStep's fused path feeds Glow's
coupling network with it), against the float64 reference, on both backends; and FlowStep's
and the reversible chain's Triton-path train steps without the slice / zeros / add around
the network's input."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastflow as ff
from fastflow import reference
from fastflow.layers.flowstep import FlowStep
from fastflow.ops.channel_mix import channel_mix_split

from conftest import DEVICE, assert_close

SHAPES = [(2, 5, 3, 5), (1, 7, 5, 3), (2, 13, 3, 1)]  # odd and prime C, odd H and W


def _params(c, dtype):
    w = (torch.randn(c, c, dtype=torch.float64, device=DEVICE) / c ** 0.5
         + torch.eye(c, dtype=torch.float64, device=DEVICE)).to(dtype)
    loc = torch.randn(1, c, 1, 1, device=DEVICE).to(dtype)
    scale = (torch.rand(1, c, 1, 1, device=DEVICE) + 0.5).to(dtype)
    return w, loc, scale


def _variant(name, w, loc, scale):
    return {"actnorm+conv": (w, loc, scale), "conv": (w, None, None),
            "actnorm": (None, loc, scale)}[name]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("variant", ["actnorm+conv", "conv", "actnorm"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_outputs_and_gradients_match_reference(backend, dtype, shape, variant, reverse):
    """out, head = out[:, :split], and the gradients of x, W, loc, scale with gradients
    flowing into both outputs, against the float64 reference of ``out`` alone."""
    n, c, h, w_ = shape
    split = c - c // 2
    leaves = [t if t is None else t.requires_grad_()
              for t in (torch.randn(shape, device=DEVICE).to(dtype),
                        *_variant(variant, *_params(c, dtype)))]
    x, a, loc, scale = leaves
    out, head = channel_mix_split(x, a, loc=loc, scale=scale, reverse=reverse, split=split)
    assert out.shape == shape and head.shape == (n, split, h, w_)
    assert out.dtype == head.dtype == dtype
    assert torch.equal(head, out[:, :split])
    if backend == "triton":
        assert head.is_contiguous() and head.data_ptr() != out.data_ptr()
    # the incoming gradients as the op gets them (rounded to dtype), in float64
    gy = torch.randn(shape, device=DEVICE).to(dtype).double()
    gh = torch.randn(n, split, h, w_, device=DEVICE).to(dtype).double()
    used = [t for t in leaves if t is not None]
    got = torch.autograd.grad((out, head), used, (gy.to(dtype), gh.to(dtype)))
    ref = [t.detach().double().requires_grad_() for t in used]
    full = iter(ref)
    r = [next(full) if t is not None else None for t in leaves]
    out_r = reference.actnorm_mix(r[0], r[1], r[2], r[3], reverse=reverse)
    assert_close(out, out_r, dtype)
    g_total = gy.clone()
    g_total[:, :split] += gh
    want = torch.autograd.grad(out_r, ref, g_total)
    for name, g, wv in zip(("x", "weight", "loc", "scale"), got, want):
        assert g.dtype == dtype
        assert_close(g, wv, dtype, msg=f"d {name}")


@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_float64(backend, reverse):
    c = 5
    args = [t.requires_grad_() for t in (torch.randn(1, c, 3, 1, dtype=torch.float64, device=DEVICE),
                                         *_params(c, torch.float64))]
    assert torch.autograd.gradcheck(
        lambda x, w, loc, scale: channel_mix_split(x, w, loc=loc, scale=scale, reverse=reverse,
                                                   split=3), args)


def test_unused_head_or_out_gradient(backend):
    """Only one output reaches the loss: the other's gradient is zeros, as if sliced."""
    c = 5
    x = torch.randn(2, c, 3, 3, device=DEVICE, requires_grad=True)
    w, loc, scale = _params(c, torch.float32)
    out, head = channel_mix_split(x, w, loc=loc, scale=scale, split=2)
    g_head = torch.autograd.grad(head.square().sum(), x, retain_graph=True)[0]
    g_out = torch.autograd.grad(out.sum(), x)[0]
    with ff.use_backend("reference"):
        xr = x.detach().double().requires_grad_()
        o = ff.channel_mix(xr, w.double(), loc=loc.double(), scale=scale.double())
        assert_close(g_head, torch.autograd.grad(o[:, :2].square().sum(), xr, retain_graph=True)[0],
                     torch.float32)
        assert_close(g_out, torch.autograd.grad(o.sum(), xr)[0], torch.float32)


def test_channels_last_head_and_odd_gradient_strides(backend):
    n, c, h, w_ = 2, 7, 3, 5
    x = torch.randn(n, c, h, w_, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w, loc, scale = _params(c, torch.float32)
    leaves = [t.requires_grad_() for t in (x, w, loc, scale)]
    out, head = channel_mix_split(*leaves[:2], loc=leaves[2], scale=leaves[3], split=4)
    assert out.is_contiguous(memory_format=torch.channels_last)
    if backend == "triton":
        assert head.is_contiguous(memory_format=torch.channels_last)
    gh = torch.randn(n, h, w_, 4, device=DEVICE).permute(0, 3, 1, 2)  # channels_last grad
    gy = torch.randn(1, 1, 1, 1, device=DEVICE).expand(n, c, h, w_)  # stride 0
    got = torch.autograd.grad((out, head), leaves, (gy, gh))
    ref = [t.detach().double().requires_grad_() for t in leaves]
    o = reference.actnorm_mix(*ref)
    g = gy.double().clone()
    g[:, :4] += gh.double()
    for a, b in zip(got, torch.autograd.grad(o, ref, g)):
        assert_close(a, b, torch.float32)


def test_bitwise_deterministic(backend):
    x = torch.randn(3, 7, 9, 11, device=DEVICE)
    w, loc, scale = _params(7, torch.float32)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, loc, scale)]
        out, head = channel_mix_split(leaves[0], leaves[1], loc=leaves[2], scale=leaves[3], split=4)
        torch.autograd.backward((out, head), (torch.cos(out.detach()), torch.sin(head.detach())))
        return [out.detach(), head.detach()] + [t.grad for t in leaves]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_bad_split():
    x, (w, loc, scale) = torch.randn(1, 5, 2, 2), _params(5, torch.float32)
    with pytest.raises(ValueError, match=r"split: expected a channel count from 1 to 5 \(the "
                                         r"output's\), got 6"):
        channel_mix_split(x, w, loc=loc, scale=scale, split=6)
    with pytest.raises(ValueError, match="split: expected a channel count from 1 to 5"):
        channel_mix_split(x, w, split=0)
    with pytest.raises(TypeError, match=r"split: expected .* \(an integer\), got 2.0"):
        channel_mix_split(x, w, split=2.0)


# --------------------------------------------------------------------------------------
# FlowStep's fused path
# --------------------------------------------------------------------------------------


def _step(c, dtype, affine=True):
    torch.manual_seed(0)
    step = ff.FlowStep(c, filter_size=8, affine=affine).to(DEVICE)
    with torch.no_grad():  # a non-zero network output and a non-trivial W
        for p in step.parameters():
            p.add_(0.05 * torch.randn_like(p))
    step.actnorm.initialize(torch.randn(2, c, 3, 5, device=DEVICE))
    return step.to(dtype)


@pytest.mark.parametrize("c", [5, 7, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_flowstep_triton_train_step_matches_float64_reference(c, dtype):
    """The Triton-path FlowStep (network fed by the split) against the reference path of a
    float64 copy: y, the log-det and the gradients of x, loc, scale, the LU factors and
    every network parameter."""
    step = _step(c, dtype)
    x = torch.randn(2, c, 3, 5, device=DEVICE).to(dtype)
    ref = _step(c, torch.float64)
    ref.load_state_dict({k: v.double() for k, v in step.state_dict().items()})
    out = {}
    for name, model, inp, backend in (("triton", step, x, "triton"),
                                      ("ref", ref, x.double(), "reference")):
        leaf = inp.clone().requires_grad_()
        with ff.use_backend(backend):
            y, ld = model(leaf)
        g = torch.cos(torch.arange(y.numel(), device=DEVICE, dtype=torch.float64)).reshape(y.shape)
        params = [p for _, p in model.named_parameters()]
        grads = torch.autograd.grad((y.double() * g).sum() + ld.double().sum(), [leaf, *params])
        out[name] = [y, ld, *grads]
    names = ["y", "logdet", "x", *[k for k, _ in step.named_parameters()]]
    assert "coupling.net.0.weight" in names and "invconv.w_l" in names
    for name, got, want in zip(names, out["triton"], out["ref"]):
        # float32: the network's convolutions sum in another order than float64's
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
        assert_close(got, want, dtype, msg=name, **tol)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _train_step_ops(step, x):
    with _Ops() as ops:
        y, ld = step(x.clone().requires_grad_())
        torch.autograd.backward((y, ld), (torch.ones_like(y), torch.ones_like(ld)))
    return ops.names


@pytest.mark.parametrize("affine", [True, False])
def test_flowstep_triton_train_step_has_no_slice_zeros_or_add_for_the_net_input(affine):
    """Forward + backward of a Triton-path FlowStep: the network's input is the mix's second
    output (no slice of it, no slice_backward / zeros for its gradient, no add of that
    gradient to the coupling's); a coupling with a forward hook is called as a module and
    has them (what every step did before)."""
    step = _step(6, torch.float32, affine)
    x = torch.randn(2, 6, 3, 5, device=DEVICE)
    with ff.use_backend("triton"):
        fused = _train_step_ops(step, x)
        handle = step.coupling.register_forward_hook(lambda *a: None)
        try:
            hooked = _train_step_ops(step, x)
        finally:
            handle.remove()
    for name in ("slice", "slice_backward", "zeros", "new_zeros", "channel_mix"):
        assert fused[name] == 0, (name, fused)
    assert fused["channel_mix_split"] == 1
    assert hooked["slice"] == hooked["slice_backward"] == hooked["channel_mix"] == 1
    assert fused["add"] == hooked["add"] - 1  # the others: log-dets
    assert sum(fused.values()) <= sum(hooked.values()) - 3, (fused, hooked)


def _step_grads(step, x):
    leaf = x.clone().requires_grad_()
    y, ld = step(leaf)
    g = torch.cos(torch.arange(y.numel(), device=DEVICE, dtype=y.dtype)).reshape(y.shape)
    return [y, ld, *torch.autograd.grad((y * g).sum() + ld.sum(), [leaf, *step.parameters()])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_flowstep_coupling_hook_or_replaced_forward_still_runs(backend, dtype):
    """A hooked coupling, or one whose forward an instance attribute replaces, is called as a
    module (the hook fires, the replacement runs), with the same result as the fused path,
    bitwise, gradients included (the in-kernel add of the network's input gradient is the
    same float add as autograd's)."""
    step = _step(5, dtype)
    x = torch.randn(2, 5, 3, 5, device=DEVICE, dtype=dtype)
    fused = _step_grads(step, x)
    seen = []
    handle = step.coupling.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    try:
        hooked = _step_grads(step, x)
    finally:
        handle.remove()
    assert seen == [x.shape]
    for a, b in zip(fused, hooked):
        assert torch.equal(a, b)
    ld = fused[1].detach()
    plain = step.coupling.forward
    step.coupling.forward = lambda inp: (lambda r: (r[0], r[1] + 1))(plain(inp))
    try:
        _, ld3 = step(x)
    finally:
        del step.coupling.forward
    assert torch.equal(ld3, ld + 1)


@pytest.mark.parametrize("mode", ["triton", "reference"])
def test_flowstep_train_step_compiles_fullgraph(mode):
    """torch.compile(fullgraph=True) of a FlowStep's forward + backward on both paths (the
    split op's fake and its backward's), equal to eager."""
    step = _step(5, torch.float32)
    x = torch.randn(2, 5, 3, 5, device=DEVICE)

    def loss(inp):
        y, ld = step(inp)
        return (y * y).sum() + ld.sum()

    graphs = []

    def record(gm, inputs):  # the traced graph, then AOT autograd (fakes of the backward too)
        graphs.append(str(gm.graph))
        return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend=record)
    res = {}
    with ff.use_backend(mode):
        for name, fn in (("eager", loss), ("compiled", compiled)):
            step.zero_grad()
            leaf = x.clone().requires_grad_()
            value = fn(leaf)
            value.backward()
            res[name] = [value.detach(), leaf.grad] + [p.grad.clone() for p in step.parameters()]
    assert len(graphs) == 1 and ("channel_mix_split" in graphs[0]) == (mode == "triton")
    for a, b in zip(res["compiled"], res["eager"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# The reversible chain's stages
# --------------------------------------------------------------------------------------


def _chain(n_steps, affine=True, c=6):
    """A ReversibleSequence of initialised FlowSteps with non-zero networks (float32)."""
    torch.manual_seed(1)
    seq = ff.ReversibleSequence([ff.FlowStep(c, filter_size=8, affine=affine)
                                 for _ in range(n_steps)]).to(DEVICE)
    with torch.no_grad():
        for p in seq.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seq(torch.randn(2, c, 3, 5, device=DEVICE))  # ActNorm initialisation (the ordinary way)
    return seq


def _chain_step_ops(seq, x):
    seq.zero_grad(set_to_none=True)  # (no accumulation into an earlier step's .grad)
    with _Ops() as ops:
        y, ld = seq(x.clone().requires_grad_())
        torch.autograd.backward((y, ld), (torch.ones_like(y), torch.ones_like(ld)))
    return ops.names


@pytest.mark.parametrize("n_steps", [2, 4])  # 4: the W stacked per chain (MIN_STACK)
def test_reversible_triton_train_step_feeds_the_net_from_the_mix(n_steps):
    """Forward + backward of a Triton-path reversible chain of FlowSteps: the forward's mix
    and the backward's recomputed mix are ``channel_mix_split`` (the network reads head; the
    recompute's backward adds the network input's gradient inside its launches), so each
    step loses the forward's slice and the backward's slice + add_; no slice_backward
    either way. Against the same chain with the split turned off (the sliced input every
    step took before)."""
    seq = _chain(n_steps)
    x = torch.randn(2, 6, 3, 5, device=DEVICE)
    with ff.use_backend("triton"):
        fed = _chain_step_ops(seq, x)
        with pytest.MonkeyPatch.context() as mp:  # every step as before the split
            mp.setattr(ff.FlowStep, "_coupling_takes_head", lambda self: False)
            sliced = _chain_step_ops(seq, x)
    # forward and recompute each: one mix per step; the rebuild of the input: one more
    assert fed["channel_mix_split"] == 2 * n_steps and fed["channel_mix"] == n_steps
    assert sliced["channel_mix_split"] == 0 and sliced["channel_mix"] == 3 * n_steps
    assert fed["slice_backward"] == sliced["slice_backward"] == 0
    assert fed["slice"] == sliced["slice"] - 3 * n_steps, (fed, sliced)
    assert fed["add_"] == sliced["add_"] - n_steps, (fed, sliced)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("n_steps", [2, 4])
def test_reversible_triton_gradients_match_the_stored_chain(n_steps, affine):
    """The Triton-path reversible chain (network fed by the split, its input gradient added
    in the recomputed mix's launches) gives the stored chain's y, log-det and gradients
    (x, loc, scale, W's factors, every network parameter)."""
    seq = _chain(n_steps, affine)
    x = torch.randn(2, 6, 3, 5, device=DEVICE)
    g = torch.cos(torch.arange(x.numel(), device=DEVICE, dtype=x.dtype)).reshape(x.shape)
    res = {}
    with ff.use_backend("triton"):
        for name, run in (("reversible", seq), ("stored", seq._ordinary)):
            seq.zero_grad(set_to_none=True)
            leaf = x.clone().requires_grad_()
            y, ld = run(leaf)
            ((y * g).sum() + ld.sum()).backward()
            res[name] = [y.detach(), ld.detach(), leaf.grad] + [p.grad for p in seq.parameters()]
    names = ["y", "logdet", "x", *[k for k, _ in seq.named_parameters()]]
    assert "0.coupling.net.0.weight" in names
    for name, got, want in zip(names, res["reversible"], res["stored"]):
        # the rebuilt inputs differ from the stored ones by rounding
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
