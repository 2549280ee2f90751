"""Multi-scale Glow built from the fused layers."""

import copy
import math

import pytest
import torch

import fastflow as ff

from conftest import DEVICE

# models and tensors made without a device go to DEVICE: on a GPU machine the Triton half
# of every backend test runs the compiled kernels on the whole Glow
pytestmark = pytest.mark.usefixtures("on_device")


def tiny_glow(dtype=torch.float64, affine=True, conv_lu=True, n_flow=2):
    torch.manual_seed(0)
    model = ff.Glow(1, n_flow=n_flow, n_block=2, affine=affine, conv_lu=conv_lu,
                    filter_size=8).to(dtype)
    with torch.no_grad():  # move the zero-initialised layers off zero so every path matters
        for name, p in model.named_parameters():
            if "net.4" in name or "prior" in name:
                p.normal_(0, 0.05)
    x = torch.rand(6, 1, 4, 4, dtype=dtype) - 0.5
    model(x)  # data-dependent ActNorm initialisation
    return model.eval(), x


@pytest.mark.parametrize("affine,conv_lu", [(True, True), (False, False)])
def test_reconstruct_round_trip(backend, affine, conv_lu):
    model, x = tiny_glow(affine=affine, conv_lu=conv_lu)
    x = x + 0.1 * torch.randn_like(x)
    with torch.no_grad():
        log_p, logdet, z = model(x)
        x_back = model.reverse(z, reconstruct=True)
    assert [t.shape for t in z] == [(6, 2, 2, 2), (6, 8, 1, 1)]
    torch.testing.assert_close(x_back, x, rtol=1e-9, atol=1e-9)


def _reverse_step_by_step(model, z_list):
    """Glow.reverse with every step assembling its own W^-1 (the path before blocks
    batched them)."""
    from fastflow.glow import unsqueeze2x2

    x = None
    for i, block in enumerate(model.blocks[::-1]):
        z = z_list[-(i + 1)]
        src = z if i == 0 else x
        if block.split:
            mean, log_sd = block._prior(src)
            x = torch.cat([src, mean + torch.exp(log_sd) * z], 1)
        else:
            mean, log_sd = block._prior(src)
            x = mean + torch.exp(log_sd) * z
        for flow in block.flows[::-1]:
            x = flow.reverse(x)
        x = unsqueeze2x2(x)
    return x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reverse_with_batched_inverses_matches_step_by_step(backend, dtype):
    """Block.reverse assembles all its steps' W^-1 in one batch (in the compute dtype its
    mixes read): the samples are those of each step assembling its own."""
    model, x = tiny_glow(dtype, n_flow=3)
    with torch.no_grad():
        z = [0.7 * torch.randn(6, *s, dtype=dtype) for s in model.z_shapes(4, 4)]
        got = model.reverse(z)
        want = _reverse_step_by_step(model, z)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_inverse_matrices_batch_only_stock_fused_lu_steps():
    steps = [ff.FlowStep(4, filter_size=8) for _ in range(3)]
    mats = ff.FlowStep.inverse_matrices(steps, torch.float32)
    assert len(mats) == 3 and all(m.dtype == torch.float32 and m.shape == (4, 4) for m in mats)
    for m, s in zip(mats, steps):
        torch.testing.assert_close(m, s.invconv.matrix(inverse=True).float(), rtol=0, atol=0)
    assert ff.FlowStep.inverse_matrices([], torch.float32) is None
    assert ff.FlowStep.inverse_matrices([ff.FlowStep(4, 8, conv_lu=False)], torch.float32) is None
    assert ff.FlowStep.inverse_matrices(steps[:1] + [ff.FlowStep(6, 8)], torch.float32) is None
    class MyActNorm(ff.ActNorm):  # a step that reverses through its modules one by one
        pass

    odd = ff.FlowStep(4, filter_size=8)
    odd.actnorm = MyActNorm(4)
    assert ff.FlowStep.inverse_matrices(steps + [odd], torch.float32) is None


def _forward_step_by_step(model, x):
    """Glow.forward with every step assembling its own W and log-det."""
    from fastflow.glow import squeeze2x2
    from fastflow.reference import gaussian_log_p

    log_p_sum, logdet, z_outs, out = 0, 0, [], x
    for block in model.blocks:
        out, block_logdet = squeeze2x2(out), 0
        for flow in block.flows:
            out, det = flow(out)
            block_logdet = block_logdet + det
        logdet = logdet + block_logdet
        if block.split:
            out, z_new = out.chunk(2, 1)
        else:
            z_new = out
        mean, log_sd = block._prior(out)
        log_p_sum = log_p_sum + gaussian_log_p(z_new, mean, log_sd).reshape(x.shape[0], -1).sum(1)
        z_outs.append(z_new)
    return log_p_sum, logdet, z_outs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_with_stacked_matrices_matches_step_by_step(backend, dtype):
    """Block.forward assembles all its steps' W and log-dets in one stacked call: the
    outputs, log-dets and every parameter gradient are those of each step assembling its
    own (bitwise on the Triton path; the reference's batched matmul may round the float64
    W differently in its last bit)."""
    from fastflow.glow import squeeze2x2

    model, x = tiny_glow(dtype, n_flow=ff.layers.flowstep.MIN_STACK)
    model.train()
    assert ff.FlowStep.forward_matrices(model.blocks[0].flows, squeeze2x2(x)) is not None
    results = []
    for fn in (model, lambda v: _forward_step_by_step(model, v)):
        log_p, logdet, z = fn(x)
        loss = (log_p + logdet).sum() + sum((t * t).sum() for t in z)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append([log_p, logdet, *z, *grads])
    tol = (dict(rtol=0, atol=0) if backend == "triton" else
           dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)


def test_forward_matrices_only_for_ready_stock_lu_steps():
    k = ff.layers.flowstep.MIN_STACK
    steps = [ff.FlowStep(4, filter_size=8) for _ in range(k)]
    x = torch.randn(2, 4, 3, 3)
    assert ff.FlowStep.forward_matrices(steps, x) is None  # ActNorms not initialised yet
    for s in steps:
        s(x)
    mats = ff.FlowStep.forward_matrices(steps, x)
    assert len(mats) == k
    assert ff.FlowStep.forward_matrices(steps[1:], x) is None  # too few to pay for a stack
    for (w, ld, hw), s in zip(mats, steps):
        w1, ld1 = s.invconv.matrix_and_logdet(x, s.actnorm.scale, for_mix=True)
        assert w.dtype == torch.float32 and ld.shape == (2,) and hw == 9
        torch.testing.assert_close(w, w1.float(), rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(ld, ld1, rtol=1e-6, atol=1e-6)
    assert ff.FlowStep.forward_matrices([ff.FlowStep(4, 8, conv_lu=False)], x) is None
    assert ff.FlowStep.forward_matrices(steps + [ff.FlowStep(6, 8).eval()], x) is None
    hooked = ff.FlowStep(4, filter_size=8).eval()
    hooked.invconv.register_forward_hook(lambda *a: None)  # the step must call the module
    assert ff.FlowStep.forward_matrices(steps + [hooked], x) is None
    # a step handed (W, log-det) made for another input makes its own
    x3 = torch.randn(3, 4, 3, 3)
    y, ld = steps[0](x3, w_ld=mats[0])
    y_ref, ld_ref = steps[0](x3)
    assert ld.shape == (3,) and torch.equal(y, y_ref) and torch.equal(ld, ld_ref)


def test_stacked_matrices_not_used_for_an_input_of_another_size():
    """A step handed (W, log-det) made for an input of another H, W (the batch size and
    dtype the same) makes its own: the stacked log-dets are H*W*(...) of the input they
    were made for (they were taken silently; only N and the dtype were compared)."""
    torch.manual_seed(0)
    steps = [ff.FlowStep(4, filter_size=8) for _ in range(ff.layers.flowstep.MIN_STACK)]
    x = torch.randn(2, 4, 3, 3)
    for s in steps:
        s(x)  # ActNorm initialisation
    mats = ff.FlowStep.forward_matrices(steps, x)
    x5 = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        y, ld = steps[0](x5, w_ld=mats[0])
        y_ref, ld_ref = steps[0](x5)
    assert torch.equal(y, y_ref) and torch.equal(ld, ld_ref)


def test_stacked_matrices_wait_for_a_steps_pre_hook():
    """A step's forward pre-hook runs before the step, and may change its parameters (a
    constraint clamped in place, say): the block then leaves each step its own W and
    log-det, made after the hook, as calling the steps one by one does. The stack was
    assembled before any step's hook ran, from the parameters as they were."""
    from fastflow.glow import Block

    torch.manual_seed(0)
    block = Block(1, ff.layers.flowstep.MIN_STACK, split=False, filter_size=8)
    x = torch.randn(2, 1, 6, 6)
    block(x)  # ActNorm initialisation

    def constrain(step, args):
        with torch.no_grad():
            step.invconv.w_s.clamp_(min=0.0)
            step.actnorm.scale.clamp_(min=1.0)

    for flow in block.flows:
        flow.register_forward_pre_hook(constrain)
    step_by_step = copy.deepcopy(block)
    out, logdet, _, _ = block(x)
    want_out, want = ff.glow.squeeze2x2(x), 0
    for flow in step_by_step.flows:
        want_out, det = flow(want_out)
        want = want + det
    torch.testing.assert_close(logdet, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-5)


def test_logdet_equals_log_abs_det_of_the_jacobian(backend):
    """The model's logdet against slogdet of its full Jacobian x -> (z_1, z_2)."""
    model, x = tiny_glow()
    x0 = x[:1] + 0.05 * torch.randn_like(x[:1])

    def flat_z(v):
        _, _, zs = model(v.view(1, 1, 4, 4))
        return torch.cat([z.reshape(-1) for z in zs])

    jac = torch.autograd.functional.jacobian(flat_z, x0.reshape(-1))
    assert jac.shape == (16, 16)
    with torch.no_grad():
        _, logdet, _ = model(x0)
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac)[1], rtol=1e-9, atol=1e-9)


def test_backends_agree_float32():
    model, x = tiny_glow(torch.float32)
    out = {}
    for mode in ("triton", "reference"):
        with ff.use_backend(mode), torch.no_grad():
            out[mode] = model(x)
    for a, b in zip(out["triton"][:2], out["reference"][:2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_sample_shapes_and_temperature(backend):
    model, _ = tiny_glow()
    assert model.image_size == (4, 4)
    g = torch.Generator(device=DEVICE).manual_seed(3)
    s = model.sample(5, temperature=0.7, generator=g)
    assert s.shape == (5, 1, 4, 4) and torch.isfinite(s).all()
    cold = model.sample(2, temperature=0.0)
    torch.testing.assert_close(cold[0], cold[1])
    fresh = ff.Glow(1, 2, 2, filter_size=8)
    with pytest.raises(ValueError, match="image_size"):
        fresh.sample(2)
    assert fresh.sample(2, image_size=(8, 8)).shape == (2, 1, 8, 8)


def test_bits_per_dim_formula():
    log_p = torch.tensor([-100.0, -80.0])
    logdet = torch.tensor([10.0, 5.0])
    n_pixel = 3 * 8 * 8
    want = ((-(log_p + logdet - math.log(256) * n_pixel)) / (math.log(2) * n_pixel)).mean()
    torch.testing.assert_close(ff.bits_per_dim(log_p, logdet, n_pixel), want)


def test_training_step_reduces_the_loss():
    torch.manual_seed(1)
    model = ff.Glow(1, n_flow=2, n_block=2, filter_size=16)
    x = (torch.rand(32, 1, 8, 8) * 0.5 - 0.25).round(decimals=1)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(25):
        xin = x + torch.rand_like(x) / 16
        log_p, logdet, _ = model(xin)
        loss = ff.bits_per_dim(log_p, logdet, 64, n_bins=16)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05


def test_bad_input_and_z_list():
    model = ff.Glow(1, 2, 2, filter_size=8)
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 1, H, W\) with H and W divisible by 4"):
        model(torch.randn(2, 1, 6, 6))
    with pytest.raises(ValueError, match="z_list: expected 2 tensors"):
        model.reverse([torch.randn(1, 8, 1, 1)])


@pytest.mark.slow
def test_torch_compile_fullgraph_training_step_matches_eager():
    """The whole model (fused ops, LU-weight op, cached buffers) compiles as one graph."""
    torch.manual_seed(0)
    model = ff.Glow(1, n_flow=1, n_block=2, filter_size=8)
    x = torch.rand(4, 1, 4, 4) - 0.5
    model(x)  # ActNorm's initialisation, outside the compiled region
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = {}
    for name, fn in (("eager", model), ("compiled", compiled)):
        model.zero_grad()
        log_p, logdet, _ = fn(x)
        ff.bits_per_dim(log_p, logdet, 16).backward()
        out[name] = (log_p, logdet, [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(out["compiled"][0], out["eager"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["compiled"][1], out["eager"][1], rtol=1e-5, atol=1e-5)
    for a, b in zip(out["compiled"][2], out["eager"][2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_empty_batch_is_refused_naming_x():
    model = ff.Glow(1, 2, 2, filter_size=8)
    with pytest.raises(ValueError, match=r"x: expected at least one sample, shape \(N >= 1, 1, H, W\), "
                                         r"got \(0, 1, 8, 8\)"):
        model(torch.randn(0, 1, 8, 8))
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 1, H, W\) with H and W divisible by 4"):
        model(torch.randn(2, 1, 0, 8))
    assert not model.blocks[0].flows[0].actnorm._initialized  # nothing was initialised


def test_sample_with_an_image_size_the_blocks_cannot_halve():
    model = ff.Glow(1, 2, 2, filter_size=8)
    with pytest.raises(ValueError, match=r"image_size: expected H and W positive multiples of 4 "
                                         r"\(2\*\*n_block for n_block=2\), got \(6, 6\)"):
        model.sample(2, image_size=(6, 6))
    with pytest.raises(ValueError, match=r"image_size: expected \(H, W\), two integers"):
        model.sample(2, image_size=8)
    with pytest.raises(ValueError, match="n: expected a positive number of samples"):
        model.sample(0, image_size=(8, 8))
    assert model.sample(2, image_size=(8, 12)).shape == (2, 1, 8, 12)


def test_reverse_with_wrong_z_shapes_names_the_tensor_and_the_shape():
    model = ff.Glow(1, 2, 2, filter_size=8)
    good = [torch.randn(3, 2, 4, 4), torch.randn(3, 8, 2, 2)]  # an 8x8 image
    assert model.reverse(good).shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match=r"z_list\[0\]: expected shape \(3, 2, 4, 4\) .*got \(3, 2, 3, 3\)"):
        model.reverse([torch.randn(3, 2, 3, 3), good[1]])
    with pytest.raises(ValueError, match=r"z_list\[0\]: expected shape \(3, 2, 4, 4\) .*got \(2, 2, 4, 4\)"):
        model.reverse([torch.randn(2, 2, 4, 4), good[1]])
    with pytest.raises(ValueError, match=r"z_list\[1\]: expected shape \(3, 8, 2, 2\) .*got \(3, 4, 2, 2\)"):
        model.reverse([good[0], torch.randn(3, 4, 2, 2)], reconstruct=True)
    with pytest.raises(ValueError, match=r"z_list\[1\]: expected a 4-D tensor \(N, C, H, W\), got \(3, 8\)"):
        model.reverse([good[0], torch.randn(3, 8)])
    with pytest.raises(ValueError, match="z_list: expected 2 tensors, got 3"):
        model.reverse(good + good[:1])


def test_reverse_with_latents_of_another_dtype_and_sample_with_a_bad_temperature():
    """Sampling with float32 latents in a float64 model failed in the prior's convolution
    ("Input type (float) and bias type (double)"), reconstructing named ``y``; a string
    temperature failed inside ``torch.randn``'s product."""
    model = ff.Glow(1, 2, 2, filter_size=8).double()
    z = [torch.randn(3, 2, 4, 4), torch.randn(3, 8, 2, 2)]
    for reconstruct in (False, True):
        with pytest.raises(TypeError, match=r"^z_list\[0\]: expected torch.float64, the model's "
                                            r"dtype \(or autocast\), got torch.float32"):
            model.reverse(z, reconstruct=reconstruct)
    with pytest.raises(TypeError, match=r"^temperature: expected a number, got '0.7'"):
        model.sample(2, "0.7", image_size=(8, 8))
    with pytest.raises(TypeError, match=r"^temperature: expected a number, got True"):
        model.sample(2, True, image_size=(8, 8))
    # a temperature where the flag goes reconstructed x from the latents, no error
    with pytest.raises(TypeError, match=r"^reconstruct: expected a bool \(True or False\), got 0.7"):
        model.reverse([t.double() for t in z], 0.7)


def test_reverse_under_autocast_takes_latents_of_the_autocast_dtype_not_float64():
    """Under autocast the latents may have another 16/32-bit dtype than the model (bf16
    latents of a float32 model sample in bf16); float64 is no autocast dtype: float32
    latents of a float64 model are refused by name, as outside autocast."""
    model = ff.Glow(1, 2, 2, filter_size=8)
    z = [torch.randn(2, 2, 4, 4), torch.randn(2, 8, 2, 2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.reverse([t.bfloat16() for t in z]).shape == (2, 1, 8, 8)
        with pytest.raises(TypeError, match=r"^z_list\[0\]: expected torch.float64"):
            model.double().reverse(z)


@pytest.mark.parametrize("kwargs,name", [
    (dict(in_channel=3, n_flow=2, n_block=1.0), "n_block"),
    (dict(in_channel=3, n_flow=2.0, n_block=1), "n_flow"),
    (dict(in_channel=3.0, n_flow=2, n_block=1), "in_channel"),
    (dict(in_channel=3, n_flow=2, n_block=True), "n_block"),
    (dict(in_channel=3, n_flow=2, n_block=1, filter_size=0), "filter_size"),
    (dict(in_channel=3, n_flow=0, n_block=1), "n_flow"),
])
def test_glow_sizes_must_be_positive_integers_named(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=rf"^{name}: expected a positive integer"):
        ff.Glow(**kwargs)


@pytest.mark.parametrize("kwargs,name", [(dict(n_pixel=0), "n_pixel"), (dict(n_pixel=-12), "n_pixel"),
                                         (dict(n_pixel=12, n_bins=0), "n_bins")])
def test_bits_per_dim_refuses_a_non_positive_count(kwargs, name):
    # n_pixel=0 gave nan, n_pixel=-12 a plausible 8.0 bits/dim, n_bins=0 "math domain error"
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        ff.bits_per_dim(torch.zeros(2), torch.zeros(2), **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_log_p_of_a_half_precision_model_is_summed_in_float32(backend, dtype):
    """log p, like the log-det, is a per-sample float32 sum for a 16-bit model (it was
    summed in the model's dtype: in bfloat16, 256 terms of about -1 rounded it to a few
    bits). Fresh priors are zero (mean 0, log sd 0), so log p is the standard normal
    log-density of the returned z, computed here in float64."""
    torch.manual_seed(0)
    model = ff.Glow(1, n_flow=1, n_block=2, filter_size=8).to(dtype)
    x = (torch.rand(3, 1, 16, 16) - 0.5).to(dtype)
    log_p, logdet, z_list = model(x)
    assert log_p.dtype == logdet.dtype == torch.float32 and log_p.shape == (3,)
    want = sum((-0.5 * math.log(2 * math.pi) - 0.5 * z.double() ** 2).flatten(1).sum(1)
               for z in z_list)
    torch.testing.assert_close(log_p.double(), want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("reversible", [False, True], ids=["stored", "reversible"])
def test_made_on_the_meta_device_then_loaded_with_assign(reversible):
    """The meta-device recipe (build under ``torch.device("meta")``, then
    ``load_state_dict(sd, assign=True)``): buffers that no state dict holds (the LU layers'
    row gather, the reversible chains' counters) stayed on the meta device, and the first
    forward failed naming ``rows``."""
    torch.manual_seed(0)
    trained = ff.Glow(2, 2, 2, filter_size=8, reversible=reversible)
    x = torch.randn(2, 2, 8, 8)
    trained(x)
    with torch.device("meta"):
        model = ff.Glow(2, 2, 2, filter_size=8, reversible=reversible)
    model.load_state_dict(trained.state_dict(), assign=True)
    assert [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta] == []
    for mode in ("eval", "train"):
        for m in (model, trained):
            getattr(m, mode)()
        got, want = model(x), trained(x)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    (got[0] + got[1]).sum().backward()
    if reversible:
        assert int(model.fallback_count) == 0
    z = [0.5 * t for t in want[2]]
    with torch.no_grad():
        assert torch.equal(model.reverse(z), trained.reverse(z))
