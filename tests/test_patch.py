"""ff.patch: peers' models patched in place against unpatched copies (float64), on the
Triton kernels (interpreted on CPU) and on the reference path."""

import contextlib
import copy
import io
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastflow as ff

from conftest import DEVICE, assert_close

# normflows' Invertible1x1Conv builds its LU with torch.lu
pytestmark = pytest.mark.filterwarnings("ignore:torch.lu is deprecated")

N, C, H, W = 2, 4, 3, 3
D64 = {"dtype": torch.float64, "device": DEVICE}


# --------------------------------------------------------------------------------------
# rosinality/glow-pytorch style modules, same maps, names and tensors as its model.py
# --------------------------------------------------------------------------------------


class ActNorm(nn.Module):
    def __init__(self, in_channel, logdet=True):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, in_channel, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, in_channel, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self.logdet = logdet

    def forward(self, x):
        if self.initialized.item() == 0:
            with torch.no_grad():
                flat = x.transpose(0, 1).reshape(x.shape[1], -1)
                self.loc.copy_(-flat.mean(1).view(1, -1, 1, 1))
                self.scale.copy_(1 / (flat.std(1).view(1, -1, 1, 1) + 1e-6))
            self.initialized.fill_(1)
        logdet = x.shape[2] * x.shape[3] * torch.sum(torch.log(torch.abs(self.scale)))
        out = self.scale * (x + self.loc)
        return (out, logdet) if self.logdet else out

    def reverse(self, y):
        return y / self.scale - self.loc


class InvConv2d(nn.Module):
    def __init__(self, in_channel):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(in_channel, in_channel))
        self.weight = nn.Parameter(q[:, :, None, None])

    def forward(self, x):
        logdet = x.shape[2] * x.shape[3] * torch.slogdet(self.weight.squeeze().double())[1].float()
        return F.conv2d(x, self.weight), logdet

    def reverse(self, y):
        return F.conv2d(y, self.weight.squeeze().inverse()[:, :, None, None])


class InvConv2dLU(nn.Module):
    def __init__(self, in_channel):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(in_channel, in_channel))
        w_p, w_l, w_u = torch.linalg.lu(q)
        s = torch.diagonal(w_u)
        u_mask = torch.triu(torch.ones(in_channel, in_channel), 1)
        self.register_buffer("w_p", w_p)
        self.register_buffer("u_mask", u_mask)
        self.register_buffer("l_mask", u_mask.T.contiguous())
        self.register_buffer("s_sign", torch.sign(s))
        self.register_buffer("l_eye", torch.eye(in_channel))
        self.w_l = nn.Parameter(w_l)
        self.w_s = nn.Parameter(torch.log(torch.abs(s)))
        self.w_u = nn.Parameter(torch.triu(w_u, 1))

    def calc_weight(self):
        w = self.w_p @ (self.w_l * self.l_mask + self.l_eye) @ (
            self.w_u * self.u_mask + torch.diag(self.s_sign * torch.exp(self.w_s)))
        return w[:, :, None, None]

    def forward(self, x):
        return F.conv2d(x, self.calc_weight()), x.shape[2] * x.shape[3] * sum(self.w_s)

    def reverse(self, y):
        return F.conv2d(y, self.calc_weight().squeeze().inverse()[:, :, None, None])


class ZeroConv2d(nn.Module):
    def __init__(self, in_channel, out_channel):
        super().__init__()
        self.conv = nn.Conv2d(in_channel, out_channel, 3, padding=0)
        self.conv.weight.data.zero_()
        self.conv.bias.data.zero_()
        self.scale = nn.Parameter(torch.zeros(1, out_channel, 1, 1))

    def forward(self, x):
        return self.conv(F.pad(x, [1, 1, 1, 1], value=1)) * torch.exp(self.scale * 3)


class AffineCoupling(nn.Module):
    def __init__(self, in_channel, filter_size=8, affine=True):
        super().__init__()
        self.affine = affine
        self.net = nn.Sequential(
            nn.Conv2d(in_channel // 2, filter_size, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(filter_size, filter_size, 1), nn.ReLU(inplace=True),
            ZeroConv2d(filter_size, in_channel if affine else in_channel // 2))

    def forward(self, x):
        in_a, in_b = x.chunk(2, 1)
        if not self.affine:
            return torch.cat([in_a, in_b + self.net(in_a)], 1), None
        log_s, t = self.net(in_a).chunk(2, 1)
        s = torch.sigmoid(log_s + 2)
        return torch.cat([in_a, (in_b + t) * s], 1), torch.sum(torch.log(s).view(x.shape[0], -1), 1)

    def reverse(self, y):
        out_a, out_b = y.chunk(2, 1)
        if not self.affine:
            return torch.cat([out_a, out_b - self.net(out_a)], 1)
        log_s, t = self.net(out_a).chunk(2, 1)
        return torch.cat([out_a, out_b / torch.sigmoid(log_s + 2) - t], 1)


class Flow(nn.Module):
    def __init__(self, in_channel, affine=True, conv_lu=True):
        super().__init__()
        self.actnorm = ActNorm(in_channel)
        self.invconv = InvConv2dLU(in_channel) if conv_lu else InvConv2d(in_channel)
        self.coupling = AffineCoupling(in_channel, affine=affine)

    def forward(self, x):
        out, logdet = self.actnorm(x)
        out, det1 = self.invconv(out)
        out, det2 = self.coupling(out)
        logdet = logdet + det1
        return out, (logdet if det2 is None else logdet + det2)

    def reverse(self, y):
        return self.actnorm.reverse(self.invconv.reverse(self.coupling.reverse(y)))


class UnfusedFlow(Flow):
    """Same map; a class name patch does not know, so only its children are swapped."""


class Chain(nn.Module):
    """Flows one after the other: forward -> (y, logdet), inverse(y) -> x."""

    def __init__(self, *flows, inverse_name="reverse"):
        super().__init__()
        self.flows = nn.ModuleList(flows)
        self.inverse_name = inverse_name

    def forward(self, x):
        logdet = 0
        for f in self.flows:
            x, ld = f(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y):
        logdet = 0
        for f in reversed(self.flows):
            y = getattr(f, self.inverse_name)(y)
            if isinstance(y, tuple):
                y, ld = y
                logdet = logdet + ld
        return y, logdet


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


class _Record(TorchDispatchMode):
    """Names of the ops dispatched (the fastflow custom ops and host reads among them)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__ if func.namespace != "fastflow"
                        else f"fastflow::{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _randomize(model, scale=0.2):
    """Move every parameter off its (often zero / identity) initial value."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def _run_loss(model, fn, x, record=None):
    x = x.clone().requires_grad_(True)
    with record or contextlib.nullcontext():
        out = fn(model, x)
    outs = _tensors(out)
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=o.device)
                .view(o.shape)).sum() for o in outs)
    loss.backward()
    return outs, x.grad


def _check_patch(model, train, other, x, *, steps=3):
    """Patch ``model`` (a copy stays unpatched) and check, over ``steps`` training steps
    through optimizers created before patching: same outputs, log-dets, input and
    parameter gradients, same parameters after each Adam step; then the other direction
    ``other`` on the trained models. The first step initialises ActNorms (the peers' own
    code), the second reads their flags once. Returns the report, the ops dispatched by the
    last training forward of the patched model, and the unpatched copy."""
    ref = copy.deepcopy(model)
    ids, keys = [id(p) for p in model.parameters()], list(model.state_dict())
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    report = ff.patch(model)
    assert [id(p) for p in model.parameters()] == ids
    assert list(model.state_dict()) == keys
    for _ in range(steps):
        opt_ref.zero_grad()
        opt.zero_grad()
        want, want_gx = _run_loss(ref, train, x)
        rec = _Record()
        got, got_gx = _run_loss(model, train, x, rec)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            assert_close(g, w)
        assert_close(got_gx, want_gx)
        for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
            assert (p.grad is None) == (p_ref.grad is None), name
            if p.grad is not None:
                assert_close(p.grad, p_ref.grad, msg=f"grad of {name}")
        opt_ref.step()
        opt.step()
        for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
            assert_close(p, p_ref, msg=f"{name} after the Adam step")
    with torch.no_grad():
        for g, w in zip(_tensors(other(model, x)), _tensors(other(ref, x))):
            assert_close(g, w)
    if ff.current_mode() != "triton":  # the reference path is plain PyTorch (no custom ops):
        rec = _Record()                # record which fastflow ops the patched model routes to
        with ff.use_backend("triton"):
            _run_loss(model, train, x, rec)
    return report, rec.ops, ref


def _fastflow_ops(ops):
    return {o for o in ops if o.startswith("fastflow::")}


HOST_READS = {"_local_scalar_dense", "item", "is_nonzero"}


# --------------------------------------------------------------------------------------
# rosinality
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused_lu", [True, False])
def test_rosinality_flows(backend, fused_lu):
    # one fused Flow and one whose children are swapped one by one; LU and plain 1x1
    # convolutions, affine and additive couplings, each way round
    model = Chain(Flow(C, affine=fused_lu, conv_lu=fused_lu),
                  UnfusedFlow(C, affine=not fused_lu, conv_lu=not fused_lu)).to(**D64)
    _randomize(model)
    x = torch.randn(N, C, H, W, **D64) * 2 + 0.5
    report, ops, _ = _check_patch(model, lambda m, v: m(v), lambda m, v: m.inverse(v), x)

    lu, plain = "lu_weight + channel_mix (InvConv2dLU)", "channel_mix (InvConv2d)"
    sigmoid = "affine_coupling(scale='sigmoid', layout='halves', shift='before')"
    # each swapped layer counted once: the fused Flow's children are parts of it
    assert {n for n, _, _ in report.swapped} == {"flows.0", "flows.1.actnorm", "flows.1.invconv",
                                                 "flows.1.coupling"}
    assert {(n, owner) for n, _, _, owner in report.parts} == {
        ("flows.0.actnorm", "flows.0"), ("flows.0.invconv", "flows.0"),
        ("flows.0.coupling", "flows.0")}
    swapped = {name: (cls, to) for name, cls, to in report.swapped}
    swapped.update({name: (cls, to) for name, cls, to, _ in report.parts})
    assert swapped["flows.0"][0] == "Flow" and "fused" in swapped["flows.0"][1]
    assert swapped["flows.0.invconv"][1].endswith(lu if fused_lu else plain)
    assert swapped["flows.1.invconv"][1].endswith(plain if fused_lu else lu)
    assert swapped["flows.0.coupling"][1].endswith(sigmoid if fused_lu else "additive_coupling")
    # the unknown composite is listed with its reason; the coupling networks (inside
    # recognised layers) are not
    assert report.left_alone == [("flows.1", "UnfusedFlow", "not a known flow layer: its "
                                  "submodules were looked at one by one")]
    want = {"fastflow::channel_mix", "fastflow::coupling_forward", "fastflow::lu_weight"}
    assert _fastflow_ops(ops) == want
    assert "convolution" in ops  # the coupling networks, and nothing of the 1x1 convs:
    assert ops.count("convolution") == 6 and not HOST_READS & set(ops)


def test_rosinality_float32_and_logdet_shapes(backend):
    model = Chain(Flow(C), UnfusedFlow(C, conv_lu=False)).to(DEVICE)
    _randomize(model)
    x = torch.randn(N, C, H, W, device=DEVICE)
    _check_patch(model, lambda m, v: m(v), lambda m, v: m.inverse(v), x, steps=1)
    an = ActNorm(C, logdet=False).to(DEVICE)
    ref = copy.deepcopy(an)
    ff.patch(an)
    for _ in range(2):  # initialising call, then the fused op
        assert_close(an(x), ref(x))
    # the peer's 0-d ActNorm / InvConv log-dets stay 0-d
    assert model.flows[1].actnorm(x)[1].shape == () == model.flows[1].invconv(x)[1].shape


def test_rosinality_hooks_and_uninitialised_actnorm_run_the_children(backend):
    model = Flow(C).to(**D64)
    _randomize(model)
    ff.patch(model)
    x = torch.randn(N, C, H, W, **D64)
    seen = []
    model.actnorm.register_forward_hook(lambda mod, i, o: seen.append("actnorm"))
    model(x)  # initialises through rosinality's own code, calling the children
    model(x)  # hooked child: not fused away
    assert seen == ["actnorm", "actnorm"]
    # the initialised flag survives a state dict round trip into a fresh patched copy: a
    # new batch does not re-initialise it
    fresh = Flow(C).to(**D64)
    ff.patch(fresh)
    fresh.load_state_dict(model.state_dict())
    x2 = torch.randn(N, C, H, W, **D64) * 3 - 1
    assert_close(fresh(x2)[0], model(x2)[0])
    assert_close(fresh.actnorm.loc, model.actnorm.loc)


# --------------------------------------------------------------------------------------
# normflows
# --------------------------------------------------------------------------------------


def _nf_chain(nf, channels, scale_map, scale, use_lu):
    blocks = [nf.flows.GlowBlock(channels, 8, scale=scale, scale_map=scale_map, use_lu=lu)
              for lu in (use_lu, not use_lu)]
    return Chain(*blocks, inverse_name="inverse").to(**D64)


def _nf_density(model, x):
    """normflows trains in its inverse (density) direction."""
    return model.inverse(x)


def _nf_sample(model, z):
    logdet = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for f in model.flows:
        z, ld = f(z)
        logdet = logdet + ld
    return z, logdet


@pytest.mark.parametrize("scale_map,scale,channels", [
    ("sigmoid", True, 4), ("exp", True, 3), ("sigmoid_inv", True, 4), ("exp", False, 4)])
def test_normflows_glow_blocks(backend, scale_map, scale, channels):
    nf = pytest.importorskip("normflows")
    model = _nf_chain(nf, channels, scale_map, scale, use_lu=scale_map != "exp")
    _randomize(model)
    x = torch.randn(N, channels, H, W, **D64) * 1.5 + 0.3
    report, ops, ref_model = _check_patch(model, _nf_density, _nf_sample, x)

    # one row per GlowBlock; its coupling block, 1x1 convolution and ActNorm are parts
    assert [(n, c) for n, c, _ in report.swapped] == [("flows.0", "GlowBlock"),
                                                      ("flows.1", "GlowBlock")]
    assert {(n, c, owner) for n, c, _, owner in report.parts} == {
        (f"flows.{i}.flows.{j}", cls, f"flows.{i}") for i in (0, 1)
        for j, cls in enumerate(("AffineCouplingBlock", "Invertible1x1Conv", "ActNorm"))}
    assert report.left_alone == []
    swapped = {name: (cls, to) for name, cls, to in report.swapped}
    swapped.update({name: (cls, to) for name, cls, to, _ in report.parts})
    want = {"sigmoid": "scale='sigmoid', layout='interleaved', shift='negated'",
            "exp": "scale='exp', layout='interleaved', shift='after'",
            "sigmoid_inv": "scale='sigmoid', layout='interleaved', shift='after'"}
    assert (want[scale_map] if scale else "additive_coupling") in swapped["flows.0.flows.0"][1]
    # the density direction: fused ActNorm + 1x1 conv, the coupling op, no host reads
    coupling_op = ("fastflow::coupling_forward" if scale_map == "sigmoid"
                   else "fastflow::coupling_inverse")
    assert {"fastflow::channel_mix", "fastflow::lu_weight", coupling_op} == _fastflow_ops(ops)
    assert ops.count("fastflow::channel_mix") == 2 and not HOST_READS & set(ops)

    # and the standalone layers (called directly, not through their GlowBlock)
    block, ref = model.flows[0], ref_model.flows[0]
    z = torch.randn(N, channels, H, W, **D64)
    for name in ("flows.0", "flows.1", "flows.2"):
        for direction in ("forward", "inverse"):
            g = getattr(block.get_submodule(name), direction)(z)
            w = getattr(ref.get_submodule(name), direction)(z)
            for a, b in zip(g, w):
                assert_close(a, b)


def _nf_multiscale(nf, levels=2, k=2, input_shape=(2, 8, 8), hidden=8):
    """normflows' Glow recipe (its README): MultiscaleFlow with per-level GlowBlocks and a
    Squeeze, Merge between levels, a DiagGaussian prior per level."""
    c = input_shape[0]
    q0, merges, flows = [], [], []
    for i in range(levels):
        flows.append([nf.flows.GlowBlock(c * 2 ** (levels + 1 - i), hidden, split_mode="channel",
                                         scale=True) for _ in range(k)] + [nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            shape = (c * 2 ** (levels - i), input_shape[1] // 2 ** (levels - i),
                     input_shape[2] // 2 ** (levels - i))
        else:
            shape = (c * 2 ** (levels + 1), input_shape[1] // 2 ** levels,
                     input_shape[2] // 2 ** levels)
        q0.append(nf.distributions.DiagGaussian(shape))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def test_normflows_multiscale_report_counts_each_layer_once_and_lists_the_rest(backend):
    """Issue 9 item 18: 4 GlowBlocks are 4 swapped rows (not 16), and the Squeeze, Merge
    and prior modules it left alone are listed with the reason."""
    nf = pytest.importorskip("normflows")
    torch.manual_seed(0)
    model = _nf_multiscale(nf).to(**D64)
    x = torch.randn(3, 2, 8, 8, **D64)
    ref = copy.deepcopy(model)
    ref.log_prob(x, None)  # ActNorm data initialisation in both, from the same batch
    model.log_prob(x, None)
    _randomize(model)
    ref.load_state_dict(model.state_dict())
    report = ff.patch(model)
    assert [(n, c) for n, c, _ in report.swapped] == [
        (f"flows.{i}.{j}", "GlowBlock") for i in (0, 1) for j in (0, 1)]
    assert len(report.parts) == 12
    assert {owner for *_, owner in report.parts} == {n for n, _, _ in report.swapped}
    left = {n: (c, why) for n, c, why in report.left_alone}
    assert left == {
        "q0.0": ("DiagGaussian", "a base distribution (prior): not a flow layer, runs as it is"),
        "q0.1": ("DiagGaussian", "a base distribution (prior): not a flow layer, runs as it is"),
        "flows.0.2": ("Squeeze", "a reshape (pixels to channels): no arithmetic to fuse"),
        "flows.1.2": ("Squeeze", "a reshape (pixels to channels): no arithmetic to fuse"),
        "merges.0": ("Merge", "a channel split / concatenation or reshape: no arithmetic to "
                              "fuse")}
    text = str(report)
    assert text.startswith("fastflow.patch: 4 swapped (12 submodules patched with them), "
                           "5 left alone")
    for name in left:
        assert name in text
    # and the patched model computes what the original does
    y = torch.randn(3, 2, 8, 8, **D64)
    assert_close(model.log_prob(y, None), ref.log_prob(y, None))


def test_normflows_2d_coupling_block_and_left_alone(backend):
    nf = pytest.importorskip("normflows")
    mlp = nf.nets.MLP([3, 8, 6], init_zeros=False)
    model = nn.ModuleDict({
        "vector": nf.flows.AffineCouplingBlock(mlp, scale_map="sigmoid"),  # (N, 6) data
        "checker": nf.flows.AffineCouplingBlock(nn.Identity(), split_mode="checkerboard"),
        "bare": nf.flows.AffineCoupling(nn.Identity()),
        "actnorm_2d": nf.flows.ActNorm((6,)),
    }).to(**D64)
    x = torch.randn(5, 6, **D64)
    report, ops, _ = _check_patch(model, lambda m, v: m["vector"].inverse(v),
                               lambda m, v: m["vector"](v), x)
    assert [(n, c) for n, c, _ in report.swapped] == [("vector", "AffineCouplingBlock")]
    left = {n: (c, why) for n, c, why in report.left_alone}
    assert set(left) == {"checker", "bare", "actnorm_2d"}
    assert "split_mode 'checkerboard'" in left["checker"][1]
    assert "list [z1, z2]" in left["bare"][1]
    assert "(1, 6)" in left["actnorm_2d"][1]
    assert _fastflow_ops(ops) == {"fastflow::coupling_forward"}
    for name in left:
        assert "forward" not in model[name].__dict__


def test_normflows_refused_coupling_inside_a_swapped_glow_block_is_listed(backend):
    """A GlowBlock whose coupling block has a split_mode fastflow does not reproduce is
    swapped (its 1x1 convolution and ActNorm fused) while that coupling block runs its own
    code: the report lists it as left alone, with the reason, instead of hiding it."""
    nf = pytest.importorskip("normflows")
    model = Chain(nf.flows.GlowBlock(C, 8, split_mode="channel_inv", init_zeros=False),
                  inverse_name="inverse").to(**D64)
    _randomize(model)
    x = torch.randn(N, C, H, W, **D64)
    report, _, _ = _check_patch(model, _nf_density, _nf_sample, x, steps=2)
    assert [(n, c) for n, c, _ in report.swapped] == [("flows.0", "GlowBlock")]
    assert {n for n, *_ in report.parts} == {"flows.0.flows.1", "flows.0.flows.2"}
    assert [(n, c) for n, c, _ in report.left_alone] == [("flows.0.flows.0",
                                                          "AffineCouplingBlock")]
    assert "split_mode 'channel_inv'" in report.left_alone[0][2]
    assert "1 left alone" in str(report)


@pytest.mark.parametrize("which", ["rosinality Flow", "normflows GlowBlock"])
def test_a_recognised_layer_patched_as_the_model_is_counted_once(which):
    """ff.patch(layer) on the layer itself: one swapped row, its children are parts."""
    if which == "rosinality Flow":
        layer, children = Flow(C), ("actnorm", "invconv", "coupling")
    else:
        nf = pytest.importorskip("normflows")
        layer, children = nf.flows.GlowBlock(C, 8), ("flows.0", "flows.1", "flows.2")
    report = ff.patch(layer)
    assert [(n, c) for n, c, _ in report.swapped] == [("", type(layer).__name__)]
    assert [(n, owner) for n, _, _, owner in report.parts] == [(n, "") for n in children]
    assert report.left_alone == []
    assert str(report).startswith("fastflow.patch: 1 swapped (3 submodules patched with "
                                  "them), 0 left alone")


def test_normflows_initialised_under_inference_mode(backend):
    """normflows' ActNorm initialises by assigning a new flag tensor: under
    torch.inference_mode that is an inference tensor (no version counter to cache)."""
    nf = pytest.importorskip("normflows")
    model = Chain(nf.flows.GlowBlock(C, 8, init_zeros=False),
                  inverse_name="inverse").to(**D64)
    ref = copy.deepcopy(model)
    ff.patch(model)
    x = torch.randn(N, C, H, W, **D64)
    with torch.inference_mode():
        for _ in range(3):  # initialising call, then the fused ops
            for direction in (_nf_density, _nf_sample):
                for g, w in zip(direction(model, x), direction(ref, x)):
                    assert_close(g, w)


def test_normflows_hooks_inside_a_coupling_block_run(backend):
    nf = pytest.importorskip("normflows")
    block = nf.flows.AffineCouplingBlock(nn.Conv2d(C // 2, C, 3, padding=1)).to(**D64)
    ref = copy.deepcopy(block)
    ff.patch(block)
    seen = []
    for m in (block, ref):
        for i, f in enumerate(m.flows):
            f.register_forward_hook(lambda mod, inp, out, i=i: seen.append(i))
    x = torch.randn(N, C, H, W, **D64)
    for g, w in zip(block(x), ref(x)):
        assert_close(g, w)
    assert seen == [0, 1, 2, 0, 1, 2]  # split, coupling, merge: patched, then unpatched


# --------------------------------------------------------------------------------------
# FrEIA
# --------------------------------------------------------------------------------------


def _conv_subnet(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, c_out, 1))


def test_freia_couplings(backend):
    pytest.importorskip("FrEIA")
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    inn = Ff.SequenceINN(C, H, W)
    inn.append(Fm.AffineCouplingOneSided, subnet_constructor=_conv_subnet, clamp=1.5)
    inn.append(Fm.GLOWCouplingBlock, subnet_constructor=_conv_subnet)
    inn.append(Fm.RNVPCouplingBlock, subnet_constructor=_conv_subnet, clamp=3.0)
    inn.append(Fm.GLOWCouplingBlock, subnet_constructor=_conv_subnet, cond=0,
               cond_shape=(2, H, W))
    inn = inn.to(**D64)  # FrEIA's subnets start random: no need to move them
    x = torch.randn(N, C, H, W, **D64)
    cond = torch.randn(N, 2, H, W, **D64)
    report, ops, _ = _check_patch(inn, lambda m, v: m(v, c=[cond]),
                               lambda m, v: m(v, c=[cond], rev=True), x)
    assert [(n, c) for n, c, _ in report.swapped] == [
        ("module_list.0", "AffineCouplingOneSided"), ("module_list.1", "GLOWCouplingBlock"),
        ("module_list.2", "RNVPCouplingBlock"), ("module_list.3", "GLOWCouplingBlock")]
    assert "clamp=1.5" in report.swapped[0][2] and report.left_alone == []
    assert _fastflow_ops(ops) == {"fastflow::coupling_forward"}
    assert ops.count("fastflow::coupling_forward") == 7  # one per coupling


def test_freia_vector_data_and_left_alone(backend):
    pytest.importorskip("FrEIA")
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    def mlp(c_in, c_out):
        return nn.Sequential(nn.Linear(c_in, 8), nn.Tanh(), nn.Linear(8, c_out))

    inn = Ff.SequenceINN(6)
    inn.append(Fm.GLOWCouplingBlock, subnet_constructor=mlp)  # swapped, (N, 6) data
    inn.append(Fm.AffineCouplingOneSided, subnet_constructor=mlp, clamp_activation="TANH")
    inn.append(Fm.RNVPCouplingBlock, subnet_constructor=mlp, clamp_activation="SIGMOID")
    inn.append(Fm.GLOWCouplingBlock, subnet_constructor=mlp,
               clamp_activation=lambda u: 0.5 * torch.atan(u))
    inn.append(Fm.GINCouplingBlock, subnet_constructor=mlp)
    odd = Ff.SequenceINN(5)
    odd.append(Fm.AffineCouplingOneSided, subnet_constructor=mlp)  # split (2, 3)
    odd.append(Fm.GLOWCouplingBlock, subnet_constructor=mlp)
    inn = inn.to(**D64)
    x = torch.randn(N, 6, **D64)
    report, ops, _ = _check_patch(inn, lambda m, v: m(v), lambda m, v: m(v, rev=True), x)
    assert [n for n, _, _ in report.swapped] == ["module_list.0"]
    reasons = [why for _, _, why in report.left_alone]
    assert [n for n, _, _ in report.left_alone] == [f"module_list.{i}" for i in (1, 2, 3, 4)]
    for why, act in zip(reasons, ("TANH", "SIGMOID", "custom")):
        assert f"clamp_activation {act}" in why
    assert "volume preserving" in reasons[3]
    assert _fastflow_ops(ops) == {"fastflow::coupling_forward"}

    report = ff.patch(odd)
    assert report.swapped == []
    assert "split lengths (2, 3) of 5 channels" in report.left_alone[0][2]
    assert "equal halves" in report.left_alone[1][2]


def test_freia_input_with_another_channel_count_is_refused():
    """FrEIA refuses an input whose channels do not add up to the block's split lengths
    (torch.split). A patched one-sided block built for 4 channels took 5 and returned a
    (N, 5) output (its subnet read channels 0-1, the op kept 0-2 and transformed 3-4); the
    two-sided ones failed inside a subnet ('mat1 and mat2 shapes cannot be multiplied')."""
    pytest.importorskip("FrEIA")
    import FrEIA.modules as Fm

    def mlp(c_in, c_out):
        return nn.Sequential(nn.Linear(c_in, 8), nn.Tanh(), nn.Linear(8, c_out))

    for cls in (Fm.AffineCouplingOneSided, Fm.GLOWCouplingBlock):
        block = cls([(4,)], subnet_constructor=mlp).to(**D64)
        ff.patch(block)
        for x in (torch.randn(N, 5, **D64), torch.randn(N, 6, 1, 1, **D64)):
            with pytest.raises(ValueError, match=r"x\[0\]: expected 4 channels \(split "
                                                 r"lengths 2 \+ 2\) in dimension 1, got shape"):
                block([x], rev=cls is Fm.GLOWCouplingBlock)


def test_freia_clamp_of_any_real_number_type():
    """A clamp FrEIA computes with but that is no Python float (clamp=True, a NumPy
    number from a config) was swapped and then refused on the first call ('clamp: expected
    a finite positive number, got True (bool)'), or left alone with 'fastflow needs a
    positive clamp' for np.float32(2.0); an infinite one was swapped and refused likewise."""
    pytest.importorskip("FrEIA")
    import numpy as np
    import FrEIA.modules as Fm

    def mlp(c_in, c_out):
        return nn.Sequential(nn.Linear(c_in, 8), nn.Tanh(), nn.Linear(8, c_out))

    x = torch.randn(N, 4, **D64)
    for clamp in (True, np.float32(1.5), np.int64(3)):
        block = Fm.GLOWCouplingBlock([(4,)], subnet_constructor=mlp, clamp=clamp).to(**D64)
        ref = copy.deepcopy(block)
        assert len(ff.patch(block).swapped) == 1
        with ff.use_backend("reference"):
            for rev in (False, True):
                for g, w in zip(_tensors(block([x], rev=rev)), _tensors(ref([x], rev=rev))):
                    assert_close(g, w)
    block = Fm.GLOWCouplingBlock([(4,)], subnet_constructor=mlp, clamp=float("inf"))
    assert ff.patch(block).left_alone == [
        ("", "GLOWCouplingBlock", "clamp inf: fastflow needs a finite positive number")]


# --------------------------------------------------------------------------------------
# Layers whose code may differ from the class patch recognised them by
# --------------------------------------------------------------------------------------


def _patched_beside_a_copy(model):
    """(an unpatched copy of ``model``, ``ff.patch(model)``'s report, the reason each module
    was left alone, by name)."""
    ref = copy.deepcopy(model)
    report = ff.patch(model)
    return ref, report, {n: why for n, _, why in report.left_alone}


def _times_two(fn):
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        return (2 * out[0], *out[1:]) if isinstance(out, tuple) else 2 * out
    return wrapped


def test_overridden_layers_are_left_alone():
    """A subclass named like its base (``class ActNorm(nf.flows.ActNorm)`` with its own
    forward) or a method replaced on the instance was swapped for the stock map, the
    override silently dropped (here, or through the fused parent that reads the child's
    tensors): each is left alone, with the reason, and the model computes what it did."""
    nf = pytest.importorskip("normflows")
    pytest.importorskip("FrEIA")
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    class ActNorm(nf.flows.ActNorm):  # a user's subclass, named like its base
        forward = _times_two(nf.flows.ActNorm.forward)

    class GLOWCouplingBlock(Fm.GLOWCouplingBlock):
        _coupling1 = _times_two(Fm.GLOWCouplingBlock._coupling1)

    class Invertible(InvConv2dLU):
        pass

    Invertible.__name__ = "InvConv2dLU"
    Invertible.reverse = _times_two(InvConv2dLU.reverse)
    glow = nf.flows.GlowBlock(C, 8, init_zeros=False)
    glow.flows[2] = ActNorm((C, 1, 1))
    bare = nf.flows.GlowBlock(C, 8, init_zeros=False)  # a method replaced on the instance
    bare.flows[1].inverse = _times_two(bare.flows[1].inverse)
    inn = Ff.SequenceINN(C, H, W)
    inn.append(GLOWCouplingBlock, subnet_constructor=_conv_subnet)
    ros = Flow(C)
    ros.invconv = Invertible(C)
    model = nn.ModuleDict({"glow": glow, "bare": bare, "inn": inn, "ros": ros}).to(**D64)
    x = torch.randn(N, C, H, W, **D64)
    for m in (glow, bare, ros):
        m(x)  # ActNorm initialisation
    ref, report, left = _patched_beside_a_copy(model)
    for name in ("glow", "glow.flows.2", "inn.module_list.0", "ros", "ros.invconv"):
        assert "a subclass of another class named" in left[name], name
    assert "inverse replaced on the instance" in left["bare.flows.1"]
    assert "inverse replaced on the instance" in left["bare"]
    assert {n for n, _, _ in report.swapped} == {"glow.flows.0", "glow.flows.1", "bare.flows.0",
                                                 "bare.flows.2", "ros.actnorm", "ros.coupling"}
    with ff.use_backend("reference"):
        for fn in (lambda m, v: m["glow"](v), lambda m, v: m["glow"].inverse(v),
                   lambda m, v: m["bare"].inverse(v), lambda m, v: m["inn"](v),
                   lambda m, v: m["inn"](v, rev=True), lambda m, v: m["ros"](v),
                   lambda m, v: m["ros"].reverse(v)):
            for g, w in zip(_tensors(fn(model, x)), _tensors(fn(ref, x))):
                assert_close(g, w)
    again = ff.patch(model)  # patch's own methods on the instances are not overrides
    assert again.swapped == [] and all(
        why.startswith("already patched") for n, _, why in again.left_alone
        if n in {n for n, _, _ in report.swapped})


def test_modified_copies_of_rosinality_layers_are_left_alone():
    """rosinality's model.py is copied, not imported, and its forks keep the class names
    and tensors while changing the map: a flag its forward reads (a half swap), a layer
    inside the coupling, a condition argument. Each was swapped for the stock map (y off
    by ~10, or 'takes 2 positional arguments but 3 were given' given the condition): a
    layer with state or arguments rosinality's has not is left alone, with the reason."""
    def init(self):
        nn.Module.__init__(self)
        self.affine = True
        self.net = nn.Conv2d(C // 2, C, 3, padding=1)

    def couple(self, x, shift):
        in_a, in_b = x.chunk(2, 1)
        log_s, t = self.net(in_a).chunk(2, 1)
        s = torch.sigmoid(log_s + 2 + shift)
        return torch.cat([in_a, (in_b + t) * s], 1), torch.log(s).flatten(1).sum(1)

    class Flagged(nn.Module):  # copies of rosinality's AffineCoupling, not subclasses
        __init__ = init

        def forward(self, x):
            if getattr(self, "mask_swap", False):
                x = x.flip(1)
            if hasattr(self, "act_norm"):
                x = self.act_norm(x)[0]
            return couple(self, x, 0.0)

    class Conditional(nn.Module):
        __init__ = init

        def forward(self, x, cond=0.0):
            return couple(self, x, cond)

    Flagged.__name__ = Conditional.__name__ = "AffineCoupling"
    swapped, normed = Flagged(), Flagged()
    swapped.mask_swap = True
    normed.act_norm = ActNorm(C)
    model = nn.ModuleDict({"swapped": swapped, "normed": normed, "cond": Conditional()})
    model = model.to(**D64)
    x = torch.randn(N, C, H, W, **D64)
    normed(x)  # ActNorm initialisation
    ref, report, left = _patched_beside_a_copy(model)
    assert left["swapped"].startswith("mask_swap: not in rosinality's AffineCoupling")
    assert left["normed"].startswith("act_norm: not in rosinality's AffineCoupling")
    assert left["cond"].startswith("forward takes (x, cond): rosinality's takes one tensor")
    assert [n for n, _, _ in report.swapped] == ["normed.act_norm"]
    with ff.use_backend("reference"):
        for name, args in (("swapped", ()), ("normed", ()), ("cond", (0.5,))):
            for g, w in zip(model[name](x, *args), ref[name](x, *args)):
                assert_close(g, w)


def test_rosinality_copies_that_return_the_output_alone_are_left_alone():
    """ArtFlow (CVPR 2021) copies rosinality's InvConv2d, InvConv2dLU and AffineCoupling
    with the same names and tensors, their forward returning the output alone: each was
    swapped for one returning (output, logdet), and its Flow failed with "'tuple' object
    has no attribute 'chunk'"."""
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.linalg.qr(torch.randn(C, C))[0][:, :, None, None])

        def forward(self, x):
            out = F.conv2d(x, self.weight)
            return out

    Conv.__name__ = "InvConv2d"
    model = nn.Sequential(Conv(), Conv()).to(**D64)
    ref = copy.deepcopy(model)
    report = ff.patch(model)
    assert report.left_alone == [(n, "InvConv2d", "forward returns one value, rosinality's "
                                  "(output, logdet): a modified copy; runs its own code")
                                 for n in ("0", "1")]
    x = torch.randn(N, C, H, W, **D64)
    assert_close(model(x), ref(x))


def test_modified_copies_of_rosinality_actnorm_lu_conv_and_flow_are_left_alone():
    """As the coupling's: an ActNorm copy taking a condition, an InvConv2dLU copy returning
    the output alone (ArtFlow's), a Flow copy with a flag its forward reads. Each is left
    alone with the reason (and the Flow's stock children are still swapped)."""
    def copy_of(cls, **extra):  # same name and tensors, not a subclass
        def init(self):
            nn.Module.__init__(self)
            src = cls(C)
            for k, v in src._parameters.items():
                self.register_parameter(k, v)
            for k, v in src._buffers.items():
                self.register_buffer(k, v)
            for k, v in vars(src).items():
                if not k.startswith("_") and k != "training":
                    setattr(self, k, v)
        return type(cls.__name__, (nn.Module,), {"__init__": init, **extra})

    def an_forward(self, x, cond):
        return ActNorm.forward(self, x + cond)

    def lu_forward(self, x):
        out = F.conv2d(x, InvConv2dLU.calc_weight(self))
        return out

    def flow_init(self):
        nn.Module.__init__(self)
        self.actnorm, self.invconv, self.coupling = ActNorm(C), InvConv2dLU(C), AffineCoupling(C)
        self.skip_coupling = True

    def flow_forward(self, x):
        out, logdet = self.actnorm(x)
        out, det = self.invconv(out)
        return (out, logdet + det) if self.skip_coupling else Flow.forward(self, x)

    an = copy_of(ActNorm, forward=an_forward, reverse=ActNorm.reverse)()
    lu = copy_of(InvConv2dLU, forward=lu_forward, calc_weight=InvConv2dLU.calc_weight)()
    flow = type("Flow", (nn.Module,), {"__init__": flow_init, "forward": flow_forward,
                                       "reverse": Flow.reverse})()
    model = nn.ModuleDict({"an": an, "lu": lu, "flow": flow}).to(**D64)
    x = torch.randn(N, C, H, W, **D64)
    an(x, 0.5), flow(x)  # ActNorm initialisation
    ref, report, left = _patched_beside_a_copy(model)
    assert left["an"].startswith("forward takes (x, cond): rosinality's takes one tensor")
    assert left["lu"].startswith("forward returns one value, rosinality's (output, logdet)")
    assert left["flow"].startswith("skip_coupling: not in rosinality's Flow")
    assert {"flow.actnorm", "flow.invconv"} <= {n for n, _, _ in report.swapped}
    with ff.use_backend("reference"):
        for g, w in zip(_tensors((model["an"](x, 0.5), model["lu"](x), model["flow"](x))),
                        _tensors((ref["an"](x, 0.5), ref["lu"](x), ref["flow"](x)))):
            assert_close(g, w)


def test_a_child_put_in_after_patching_runs_through_its_parent_s_own_code():
    """A fused GlowBlock / rosinality Flow read the tensors of whatever ActNorm and 1x1
    convolution it held at call time: one put in after patching (a same-name subclass with
    its own forward, which patch would have left alone) had its override silently
    dropped. A child patch did not look at runs through the parent's own code."""
    nf = pytest.importorskip("normflows")

    class ActNorm(nf.flows.ActNorm):
        forward = _times_two(nf.flows.ActNorm.forward)
        inverse = _times_two(nf.flows.ActNorm.inverse)

    class Invertible(InvConv2dLU):
        forward = _times_two(InvConv2dLU.forward)
        reverse = _times_two(InvConv2dLU.reverse)

    Invertible.__name__ = "InvConv2dLU"
    model = nn.ModuleDict({"glow": nf.flows.GlowBlock(C, 8, init_zeros=False),
                           "ros": Flow(C)}).to(**D64)
    x = torch.randn(N, C, H, W, **D64)
    model["glow"](x), model["ros"](x)  # ActNorm initialisation
    ref = copy.deepcopy(model)
    ff.patch(model)
    an, conv = ActNorm((C, 1, 1)).to(**D64), Invertible(C).to(**D64)
    an(x)
    for m in (model, ref):
        m["glow"].flows[2] = copy.deepcopy(an)
        m["ros"].invconv = copy.deepcopy(conv)
    with ff.use_backend("reference"):
        for fn in (lambda m: m["glow"](x), lambda m: m["glow"].inverse(x),
                   lambda m: m["ros"](x), lambda m: m["ros"].reverse(x)):
            for g, w in zip(_tensors(fn(model)), _tensors(fn(ref))):
                assert_close(g, w)


def test_normflows_actnorm_with_one_value_for_all_channels():
    """nf.flows.ActNorm((1, 1, 1)) broadcasts one s, t over every channel (its log-det
    counting C * H * W): patched, it raised 'loc: expected 4 values' (alone and fused in a
    GlowBlock); it runs its own code where its one value meets several channels."""
    nf = pytest.importorskip("normflows")
    glow = nf.flows.GlowBlock(C, 8, init_zeros=False)
    glow.flows[2] = nf.flows.ActNorm((1, 1, 1))
    model = nn.ModuleList([nf.flows.ActNorm((1, 1, 1)), glow]).to(**D64)
    x = torch.randn(N, C, H, W, **D64) * 2 + 1
    for m in model:
        m(x)
    ref = copy.deepcopy(model)
    ff.patch(model)
    with ff.use_backend("reference"):
        for i in (0, 1):
            for direction in ("forward", "inverse"):
                got = getattr(model[i], direction)(x)
                want = getattr(ref[i], direction)(x)
                for g, w in zip(got, want):
                    assert_close(g, w)


def test_a_model_on_the_meta_device_is_reported_not_raised():
    """Checking an LU 1x1 convolution reads its values: on the meta device (a model built
    there to be loaded later) that raised 'Tensor.item() cannot be called on meta tensors'."""
    with torch.device("meta"):
        model = Chain(Flow(C))
    report = ff.patch(model)
    left = dict((n, why) for n, _, why in report.left_alone)
    assert "meta device" in left["flows.0.invconv"] and "meta device" in left["flows.0"]


# --------------------------------------------------------------------------------------
# The report, dry runs, repeated patching, copies, arguments
# --------------------------------------------------------------------------------------


def test_dry_run_changes_nothing_then_patch_reports_the_same():
    model = Chain(Flow(C), UnfusedFlow(C, conv_lu=False))
    bad = InvConv2dLU(C)
    with torch.no_grad():
        bad.w_p.copy_(torch.ones(C, C))
    model.flows.append(bad)
    def state():
        return {name: {k: id(v) for k, v in m.__dict__.items()}
                for name, m in model.named_modules()}

    before = state()
    dry = ff.patch(model, dry_run=True)
    assert state() == before
    assert dry.dry_run and "(dry run)" in str(dry)
    real = ff.patch(model)
    assert real.swapped == dry.swapped and real.left_alone == dry.left_alone
    assert real.parts == dry.parts
    assert len(real.swapped) == 4 and len(real.parts) == 3
    composite = "not a known flow layer: its submodules were looked at one by one"
    assert real.left_alone == [("flows.1", "UnfusedFlow", composite),
                               ("flows.2", "InvConv2dLU", "w_p is not a permutation matrix")]
    text = str(real)
    assert "4 swapped (3 submodules patched with them), 2 left alone" in text
    assert "flows.0.invconv" in text and "w_p is not a permutation matrix" in text

    again = ff.patch(model)
    assert again.swapped == [] and again.parts == []
    assert {n for n, _, _ in again.left_alone} == (
        {n for n, _, _ in real.swapped} | {n for n, *_ in real.parts} | {"flows.1", "flows.2"})
    assert all(why.startswith("already patched") for n, _, why in again.left_alone
               if n not in ("flows.1", "flows.2"))


def test_fastflow_layers_are_not_listed():
    model = nn.Sequential(ff.FlowStep(4, filter_size=8), ff.ActNorm(4))
    report = ff.patch(model)
    assert report.swapped == [] and report.left_alone == []
    assert str(report).startswith("fastflow.patch: 0 swapped, 0 left alone")


def test_copies_keep_the_patch():
    model = Chain(Flow(C)).to(**D64)
    _randomize(model)
    ff.patch(model)
    x = torch.randn(N, C, H, W, **D64)
    want = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        flow = other.flows[0]
        assert flow.forward.func is model.flows[0].forward.func and flow.forward.args == (flow,)
        for name, p in other.named_parameters():
            assert p is not dict(model.named_parameters())[name]
        got = other(x)
        assert_close(got[0], want[0])
        assert_close(got[1], want[1])


def test_copies_of_a_reset_actnorm_initialise_again(backend):
    """The flag read as set is remembered by tensor and version: a copy (deepcopy,
    torch.save/load) of a model whose flag was reset must not inherit that memory (its
    tensors' versions restart, so the copied flag's version could match the one seen)."""
    fresh = Chain(Flow(C)).to(**D64).state_dict()
    model = Chain(Flow(C)).to(**D64)
    ff.patch(model)
    x = torch.randn(N, C, H, W, **D64)
    model(x)
    model(x)  # the flag read as set
    model.load_state_dict(fresh)  # back to an uninitialised ActNorm
    ref = Chain(Flow(C)).to(**D64)
    ref.load_state_dict(fresh)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    x2 = torch.randn(N, C, H, W, **D64) * 3 + 1
    want = ref(x2)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False), model):
        got = other(x2)  # initialises from x2, as the unpatched model does
        assert_close(got[0], want[0])
        assert_close(got[1], want[1])


def test_bad_arguments():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got int"):
        ff.patch(3)
    with pytest.raises(TypeError, match="dry_run: expected a bool, got str"):
        ff.patch(nn.Linear(2, 2), dry_run="yes")


def test_imports_and_patches_without_the_peers_installed():
    code = ("import sys\n"
            "sys.modules['normflows'] = sys.modules['FrEIA'] = None  # import fails\n"
            "import torch, fastflow as ff\n"
            "print(ff.patch(torch.nn.Sequential(torch.nn.Linear(2, 2))))\n"
            "assert 'normflows' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    # the Linear was looked at and is listed as left alone (issue 9 item 18)
    assert "0 swapped, 1 left alone" in out.stdout
    assert "Linear  no fastflow counterpart: runs as it is" in out.stdout


def test_a_layer_named_like_a_known_one_but_built_otherwise_is_said_so():
    """A user's own ActNorm / AffineCoupling (no rosinality `logdet` / `affine` flags) was
    reported as 'no fastflow counterpart' / 'not a known flow layer', which reads as if
    fastflow had no ActNorm."""
    class ActNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = nn.Parameter(torch.zeros(1, 2, 1, 1))
            self.scale = nn.Parameter(torch.ones(1, 2, 1, 1))

        def forward(self, x):
            return self.scale * (x + self.loc)

    report = ff.patch(nn.Sequential(ActNorm()), dry_run=True)
    assert report.left_alone == [("0", "ActNorm", "named like a known library's ActNorm but "
                                  "without its parameters, buffers or flags (listed in "
                                  "help(ff.patch)): left alone, runs as it is")]
    # FrEIA's own ActNorm was said to be built otherwise, as if it were broken
    pytest.importorskip("FrEIA")
    import FrEIA.modules as Fm

    report = ff.patch(nn.Sequential(Fm.ActNorm([(2, 3, 3)])), dry_run=True)
    assert report.left_alone == [("0", "ActNorm", "FrEIA's ActNorm: fastflow swaps only "
                                  "FrEIA's ATAN affine coupling blocks; runs as it is")]
