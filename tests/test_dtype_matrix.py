"""The dtype contract (DESIGN.md, "Conventions every op follows") where the rest of the suite
does not reach it: inputs in the 16-bit dtype that autocast does not use (float16 under CPU
bfloat16 autocast, bfloat16 under CUDA float16 autocast), the Gaussian log-density of the
models, and what the models' samplers return under autocast."""

import math

import pytest
import torch

import fastflow as ff
from fastflow import reference
from fastflow.vae import ConvVAE

from conftest import DEVICE, assert_close

DEV = torch.device(DEVICE).type
# autocast's own low-precision dtype on this device, and the other 16-bit dtype
AUTOCAST = torch.bfloat16 if DEV == "cpu" else torch.float16
OTHER = torch.float16 if DEV == "cpu" else torch.bfloat16


def _autocast():
    return torch.autocast(DEV, dtype=AUTOCAST)


# --------------------------------------------------------------------------------------
# The other 16-bit dtype under autocast: same results as without autocast
# --------------------------------------------------------------------------------------


def _coupling_call(kind, x, h, reverse):
    if kind == "affine":
        return ff.affine_coupling(x, h, reverse=reverse)
    return ff.additive_coupling(x, h[:, : x.shape[1] // 2], reverse=reverse)


@pytest.mark.parametrize("kind", ["affine", "additive"])
@pytest.mark.parametrize("reverse", [False, True])
def test_coupling_of_the_other_16_bit_dtype_under_autocast(backend, kind, reverse):
    """autocast's cat refused these inputs on the reference path ("Unexpected floating
    ScalarType in at::autocast::prioritize"), forward (the output's cat) and backward run
    inside the block (chunk's backward is a cat); the Triton path always ran them. The flow
    math never follows autocast: bitwise the results and gradients of the same call
    without it."""
    torch.manual_seed(0)
    x0 = torch.randn(2, 5, 3, 4, device=DEVICE).to(OTHER)
    h0 = (0.5 * torch.randn(2, 4, 3, 4, device=DEVICE)).to(OTHER)

    def run(autocast):
        x, h = x0.clone().requires_grad_(True), h0.clone().requires_grad_(True)
        with torch.autocast(DEV, dtype=AUTOCAST, enabled=autocast):
            y, ld = _coupling_call(kind, x, h, reverse)
            (y.float().square().sum() + ld.sum()).backward()
        return y, ld, x.grad, h.grad

    y, ld, gx, gh = run(True)
    assert y.dtype == OTHER and gx.dtype == OTHER and gh.dtype == OTHER, (
        y.dtype, gx.dtype, gh.dtype)
    assert ld.dtype == torch.float32 and ld.shape == (2,), (ld.dtype, ld.shape)
    for name, got, want in zip(("y", "logdet", "x.grad", "h.grad"), (y, ld, gx, gh), run(False)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    want_y, want_ld = _coupling_call(kind, x0.double(), h0.double(), reverse)
    assert_close(y, want_y, msg="y")
    assert_close(ld, want_ld, torch.float32, msg="logdet")


@pytest.mark.parametrize("reverse", [False, True])
def test_channel_mix_gradients_stay_float32_with_backward_inside_autocast(backend, reverse):
    """Forward and backward inside the autocast block: the reference path's matrix product
    ran its forward outside autocast, but its backward (bmm / addmm) under the caller's
    autocast, in 16 bits (gradients off by up to 0.5 at these sizes, before the fix); the
    Triton path was exact. Both must give float32 gradients, as without autocast."""
    torch.manual_seed(0)
    c = 5
    x0 = torch.randn(2, c, 3, 2, device=DEVICE)
    w0 = torch.randn(c, c, device=DEVICE)
    loc0, scale0 = torch.randn(c, device=DEVICE), torch.rand(c, device=DEVICE) + 0.5

    def run(x, w, loc, scale, autocast):
        x, w, loc, scale = (t.clone().requires_grad_(True) for t in (x, w, loc, scale))
        with torch.autocast(DEV, dtype=AUTOCAST, enabled=autocast):
            out = ff.channel_mix(x, w, loc=loc, scale=scale, reverse=reverse)
            grads = torch.autograd.grad(out.square().sum(), (x, w, loc, scale))
        return (out, *grads)

    got = run(x0, w0, loc0, scale0, True)
    want = run(*(t.double() for t in (x0, w0, loc0, scale0)), False)
    for name, g, r in zip(("out", "x.grad", "weight.grad", "loc.grad", "scale.grad"), got, want):
        assert g.dtype == torch.float32, (name, g.dtype)
        assert_close(g, r, msg=name)


@pytest.mark.parametrize("conv_lu", [True, False], ids=["lu", "plain"])
@pytest.mark.parametrize("reversible", [False, True])
def test_glow_of_the_other_16_bit_dtype_runs_under_autocast(backend, reversible, conv_lu):
    """A Glow of the other 16-bit dtype (``.half()`` on a CPU) under autocast, forward and
    backward inside the block, reverse and sample: autocast's cat and stack refused its
    tensors (the block's stacked W assembly, the reversible chain's condition estimate,
    the split's backward, the reverse's cat), and the prior's autocast-dtype mean turned
    the sampled latents (so the samples) into float32. ``plain`` (``conv_lu=False``): W is
    the 16-bit weight itself, which the reversible chain's condition estimate and backward
    W^-1 stacked under autocast (its stack of the matrices, once cast to float64 each,
    was made to promote them instead)."""
    torch.manual_seed(0)
    model = ff.Glow(1, 4, 2, filter_size=8, reversible=reversible,
                    conv_lu=conv_lu).to(DEVICE, OTHER)
    x = torch.rand(2, 1, 8, 8, device=DEVICE).to(OTHER)
    with torch.no_grad():
        model(x)  # ActNorm's initialisation
    x = x.requires_grad_(True)
    with _autocast():
        log_p, logdet, zs = model(x)
        (-(log_p + logdet).mean()).backward()
        back = model.reverse([z.detach() for z in zs], reconstruct=True)
        sample = model.sample(2)
    for name, t in (("log_p", log_p), ("logdet", logdet)):
        assert t.dtype == torch.float32 and t.shape == (2,), (name, t.dtype, t.shape)
        assert torch.isfinite(t).all(), name
    for name, t in (("z", zs[0]), ("reverse", back), ("sample", sample), ("x.grad", x.grad)):
        assert t.dtype == OTHER, (name, t.dtype)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype, name


# --------------------------------------------------------------------------------------
# Gaussian log-density: computed in float32 whatever the model's dtype or autocast
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_gaussian_log_p_computes_in_the_compute_dtype(dtype):
    torch.manual_seed(0)
    x, mean, log_sd = (torch.randn(3, 4, 5, 5, device=DEVICE).to(dtype) for _ in range(3))
    got = reference.gaussian_log_p(x, mean, log_sd)
    want = reference.gaussian_log_p(x.double(), mean.double(), log_sd.double())
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == cd, got.dtype
    assert_close(got, want, cd)
    # the prior's bfloat16 mean and log-sd (autocast) with float32 latents
    got = reference.gaussian_log_p(x.float(), mean.to(AUTOCAST), log_sd.to(AUTOCAST))
    want = reference.gaussian_log_p(x.float().double(), mean.to(AUTOCAST).double(),
                                    log_sd.to(AUTOCAST).double())
    assert got.dtype == torch.float32
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("autocast", [False, True])
def test_glow_log_p_is_float32_and_exact_for_its_prior(dtype, autocast):
    """log_p of a bfloat16 Glow was bfloat16 (each term and the per-sample sum rounded to
    8 bits); under autocast the -log_sd and 1/exp(2 log_sd) terms were computed in bfloat16.
    It is now the float32 log-density of the latents under the prior's (mean, log_sd) as
    the prior network gives them."""
    torch.manual_seed(0)
    model = ff.Glow(1, 2, 2, filter_size=8).to(DEVICE, dtype)
    with torch.no_grad():
        for block in model.blocks:  # a prior that is not the standard normal
            block.prior.conv.weight.normal_(0, 0.3)
            block.prior.conv.bias.normal_(0, 0.3)
        x = torch.rand(3, 1, 8, 8, device=DEVICE).to(dtype)
        model(x)  # ActNorm's initialisation
        priors = []
        hooks = [b.prior.register_forward_hook(lambda m, i, o: priors.append(o))
                 for b in model.blocks]
        with torch.autocast(DEV, dtype=AUTOCAST, enabled=autocast):
            log_p, logdet, zs = model(x)
        for h in hooks:
            h.remove()
    assert log_p.dtype == torch.float32 and log_p.shape == (3,), (log_p.dtype, log_p.shape)
    want = 0
    for z, out in zip(zs, priors):
        mean, log_sd = out.double().chunk(2, 1)
        terms = (-0.5 * math.log(2 * math.pi) - log_sd
                 - 0.5 * (z.double() - mean) ** 2 / torch.exp(2 * log_sd))
        want = want + terms.flatten(1).sum(1)
    assert_close(log_p, want, torch.float32, rtol=1e-5, atol=1e-3)


# --------------------------------------------------------------------------------------
# Samplers under autocast return the model's dtype
# --------------------------------------------------------------------------------------


def test_vae_sample_and_reconstruct_keep_the_model_dtype_under_autocast():
    """The decoder follows autocast; the pictures it gave were bfloat16 for a float32 model
    (Glow's and TarFlow's samplers return the model's dtype)."""
    torch.manual_seed(0)
    model = ConvVAE(latent=4, channels=1, size=8, hidden=8).to(DEVICE)
    x = torch.rand(2, 1, 8, 8, device=DEVICE)
    want_s = model.sample(2, generator=torch.Generator(DEVICE).manual_seed(0))
    with _autocast():
        s = model.sample(2, generator=torch.Generator(DEVICE).manual_seed(0))
        r = model.reconstruct(x)
    assert s.dtype == torch.float32 and r.dtype == torch.float32, (s.dtype, r.dtype)
    torch.testing.assert_close(s, want_s, rtol=0, atol=0.05)


# --------------------------------------------------------------------------------------
# Mixed dtypes between arguments: the main input decides (docs/DESIGN.md), both backends
# --------------------------------------------------------------------------------------

_MIXED = [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
          (torch.float16, torch.float64), (torch.float64, torch.float16)]


def _mixed_calls():
    """name -> (make the (main, other) inputs in given dtypes, the call)."""
    def coupling(main, other):
        return (torch.randn(2, 5, 3, 4, device=DEVICE).to(main),
                (0.5 * torch.randn(2, 4, 3, 4, device=DEVICE)).to(other))

    def reparam(main, other):
        return torch.randn(3, 6, device=DEVICE).to(main), torch.randn(3, 6, device=DEVICE).to(other)

    def head(main, other):
        return (torch.randn(2, 5, 3, device=DEVICE).to(main),
                (0.5 * torch.randn(2, 5, 6, device=DEVICE)).to(other))

    def mix(main, other):
        return torch.randn(2, 4, 3, 3, device=DEVICE).to(main), torch.randn(4, 4, device=DEVICE).to(other)

    eps = torch.randn(3, 6, device=DEVICE).to(torch.bfloat16)  # a third dtype, fixed
    return {
        "affine_coupling": (coupling, lambda a, b: ff.affine_coupling(a, b)),
        "additive_coupling": (coupling, lambda a, b: ff.additive_coupling(a, b[:, :2])),
        "reparameterize_kl": (reparam, lambda a, b: ff.reparameterize_kl(a, b, eps)),
        "tarflow_head": (head, lambda a, b: ff.tarflow_head(a, b, clamp=2.0)),
        "channel_mix": (mix, lambda a, b: (ff.channel_mix(a, b), None)),
    }


@pytest.mark.parametrize("name", list(_mixed_calls()))
@pytest.mark.parametrize("main,other", _MIXED)
def test_mixed_argument_dtypes_follow_the_main_input(backend, name, main, other):
    """The result is bitwise the call with the other argument cast to the main input's
    compute dtype first; outputs in the main input's dtype, log-dets / KL in its compute
    dtype, each gradient in its own argument's dtype."""
    torch.manual_seed(0)
    make, call = _mixed_calls()[name]
    cd = torch.float64 if main == torch.float64 else torch.float32
    a0, b0 = make(main, other)

    def run(b_dtype):
        a = a0.clone().requires_grad_(True)
        b = b0.to(b_dtype).requires_grad_(True)
        out, ld = call(a, b)
        loss = out.float().square().sum() + (0 if ld is None else ld.sum())
        return out, ld, *torch.autograd.grad(loss, (a, b))

    out, ld, ga, gb = run(other)
    assert out.dtype == main and ga.dtype == main and gb.dtype == other, (
        out.dtype, ga.dtype, gb.dtype)
    if ld is not None:
        assert ld.dtype == cd, ld.dtype
    w_out, w_ld, w_ga, w_gb = run(cd)
    torch.testing.assert_close(out, w_out, rtol=0, atol=0, msg="output")
    if ld is not None:
        torch.testing.assert_close(ld, w_ld, rtol=0, atol=0, msg="log-det / KL")
    torch.testing.assert_close(ga, w_ga, rtol=0, atol=0, msg="main input's gradient")
    if backend == "triton" and DEV == "cpu" and other == torch.bfloat16:
        # the interpreter truncates float32 -> bfloat16 (a compiled kernel rounds): one ulp
        torch.testing.assert_close(gb.float(), w_gb.float(), rtol=torch.finfo(other).eps,
                                   atol=0, msg="other's gradient")
    else:
        torch.testing.assert_close(gb, w_gb.to(other), rtol=0, atol=0, msg="other's gradient")
