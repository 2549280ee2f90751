"""Reparameterisation + KL: the fused op against the float64 reference, its gradients, the
in-kernel noise (statistics, reproducibility, never stored) and bad inputs."""

import math

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.autograd.graph import saved_tensors_hooks

import fastflow as ff
from fastflow import reference
from fastflow.kernels.gaussian import _noise as _kernel_noise
from fastflow.ops.gaussian import draw_seed, reparam_kl

from conftest import DEVICE, FLOAT_DTYPES, assert_close

REDUCTIONS = ["none", "sum", "mean"]
# odd and prime sizes, N=1, D=1, 3-D and 4-D, and a row longer than one tile (2048)
SHAPES = [(1, 7), (3, 13), (4, 1), (5, 3, 7), (2, 3, 5, 5), (2, 4099)]


def _inputs(shape, dtype, scale=0.7):
    mu = torch.randn(shape, device=DEVICE).to(dtype)
    logvar = (scale * torch.randn(shape, device=DEVICE)).to(dtype)
    eps = torch.randn(shape, device=DEVICE).to(dtype)
    return mu, logvar, eps


def _reference64(mu, logvar, eps, reduction):
    return reference.reparameterize_kl(mu.double(), logvar.double(), eps.double(),
                                       reduction=reduction)


def _kl_shape(mu, reduction):
    return (mu.shape[0],) if reduction == "none" else ()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_forward_matches_float64_reference(backend, dtype, shape):
    mu, logvar, eps = _inputs(shape, dtype)
    for reduction in REDUCTIONS:
        z, kl = ff.reparameterize_kl(mu, logvar, eps, reduction=reduction)
        z_ref, kl_ref = _reference64(mu, logvar, eps, reduction)
        assert z.dtype == dtype and z.shape == mu.shape
        kl_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert kl.dtype == kl_dtype and kl.shape == _kl_shape(mu, reduction)
        assert_close(z, z_ref, dtype)
        # kl is computed and stored in float32 (float64) from the same rounded inputs
        assert_close(kl, kl_ref, kl_dtype, msg=f"kl, reduction={reduction}")


@pytest.mark.parametrize("shape", [(1, 7), (3, 13), (5, 3, 7), (2, 3, 5, 5)], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_backward_matches_float64_reference(backend, dtype, shape):
    mu, logvar, eps = _inputs(shape, dtype)
    for reduction in REDUCTIONS:
        gz = torch.randn(shape, device=DEVICE).to(dtype)
        gkl = torch.randn(_kl_shape(mu, reduction), device=DEVICE)
        mu_, lv_ = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        z, kl = ff.reparameterize_kl(mu_, lv_, eps, reduction=reduction)
        dmu, dlv = torch.autograd.grad([z, kl], [mu_, lv_], [gz, gkl.to(kl.dtype)])
        m64, l64 = mu.double().requires_grad_(), logvar.double().requires_grad_()
        z_ref, kl_ref = _reference64(m64, l64, eps, reduction)
        dmu_ref, dlv_ref = torch.autograd.grad([z_ref, kl_ref], [m64, l64],
                                               [gz.double(), gkl.double()])
        assert dmu.dtype == dtype and dlv.dtype == dtype
        assert_close(dmu, dmu_ref, dtype, msg=f"dmu, reduction={reduction}")
        assert_close(dlv, dlv_ref, dtype, msg=f"dlogvar, reduction={reduction}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(backend, reduction):
    mu, logvar, eps = _inputs((2, 5), torch.float64)
    mu.requires_grad_()
    logvar.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda m, lv: ff.reparameterize_kl(m, lv, eps, reduction=reduction), (mu, logvar))
    # internal noise: every call with a generator seeded alike draws the same noise
    assert torch.autograd.gradcheck(
        lambda m, lv: ff.reparameterize_kl(
            m, lv, reduction=reduction,
            generator=torch.Generator(device=DEVICE).manual_seed(7)), (mu, logvar))


def test_gradient_of_eps_when_it_requires_grad(backend):
    mu, logvar, eps = _inputs((3, 11), torch.float64)
    eps.requires_grad_()
    gz = torch.randn_like(mu)
    z, _ = ff.reparameterize_kl(mu, logvar, eps)
    (deps,) = torch.autograd.grad(z, eps, gz)
    assert_close(deps, gz * torch.exp(0.5 * logvar))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(3, 37), (2, 3, 4, 5)], ids=str)
def test_internal_noise_gradient_equals_explicit_noise_gradient(backend, dtype, shape):
    mu, logvar, _ = _inputs(shape, dtype, scale=0.3)
    gz = torch.randn(shape, device=DEVICE).to(dtype)
    gkl = torch.randn(shape[0], device=DEVICE)
    mu_, lv_ = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    z, kl = ff.reparameterize_kl(mu_, lv_)
    grads = torch.autograd.grad([z, kl], [mu_, lv_], [gz, gkl.to(kl.dtype)])
    # the noise the op used, recovered from its output in float64
    eps = ((z.double() - mu.double()) / torch.exp(0.5 * logvar.double())).detach()
    mu_, lv_ = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    z2, kl2 = ff.reparameterize_kl(mu_, lv_, eps)
    grads2 = torch.autograd.grad([z2, kl2], [mu_, lv_], [gz, gkl.to(kl.dtype)])
    assert_close(z2, z.double(), dtype)
    for name, a, b in zip(("dmu", "dlogvar"), grads, grads2):
        assert_close(a, b.double(), dtype, msg=name)


def _saved_tensors(fn):
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return saved, out


def _new_bytes(saved, ptrs):
    fresh = {t.data_ptr(): t.numel() * t.element_size() for t in saved if t.data_ptr() not in ptrs}
    return sum(fresh.values())


def test_reference_path_saves_no_more_than_eager():
    """The reference path is plain autograd (it keeps the noise, as eager PyTorch does) and
    keeps no more memory for backward than the eager composition."""
    mu = torch.randn(8, 33, device=DEVICE, requires_grad=True)
    logvar = torch.randn(8, 33, device=DEVICE, requires_grad=True)
    ptrs = {mu.data_ptr(), logvar.data_ptr()}
    with ff.use_backend("reference"):
        saved, _ = _saved_tensors(lambda: ff.reparameterize_kl(mu, logvar, reduction="sum"))
    saved_eager, _ = _saved_tensors(lambda: (
        mu + torch.exp(0.5 * logvar) * torch.randn_like(mu),
        0.5 * torch.sum(torch.exp(logvar) + mu.pow(2) - 1 - logvar)))
    assert 0 < _new_bytes(saved, ptrs) <= _new_bytes(saved_eager, ptrs)


def test_noise_is_not_saved_for_backward():
    """The Triton path keeps only mu and logvar and regenerates the noise in backward."""
    mu = torch.randn(8, 33, device=DEVICE, requires_grad=True)
    logvar = torch.randn(8, 33, device=DEVICE, requires_grad=True)
    with ff.use_backend("triton"):
        saved, (z, kl) = _saved_tensors(lambda: ff.reparameterize_kl(mu, logvar, reduction="sum"))
    ptrs = {mu.data_ptr(), logvar.data_ptr()}
    assert saved, "expected mu and logvar to be saved"
    assert all(t.data_ptr() in ptrs for t in saved), [tuple(t.shape) for t in saved]
    assert sum(t.numel() for t in saved) == 2 * mu.numel()
    (z.sum() + kl).backward()  # the saved inputs suffice: the noise is regenerated
    # the eager composition keeps a noise-sized tensor alive
    saved_eager, _ = _saved_tensors(
        lambda: mu + torch.exp(0.5 * logvar) * torch.randn_like(mu))
    assert any(t.data_ptr() not in ptrs and t.shape == mu.shape for t in saved_eager)


def _corr(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_internal_noise_statistics(backend):
    n, d = 64, 1023  # rows not a multiple of the 4-element noise groups
    zeros = torch.zeros(n, d, device=DEVICE)
    z, _ = ff.reparameterize_kl(zeros, zeros)  # z = eps
    z2, _ = ff.reparameterize_kl(zeros, zeros)
    e = z.double().flatten()
    k = e.numel()
    bound = 5.0 / math.sqrt(k)  # five standard errors
    assert abs(float(e.mean())) < bound
    assert abs(float(e.var()) - 1.0) < 5.0 * math.sqrt(2.0 / k)
    assert abs(float((e**4).mean()) - 3.0) < 5.0 * math.sqrt(96.0 / k)
    tail = float((e.abs() > 1.959964).double().mean())
    assert abs(tail - 0.05) < 5.0 * math.sqrt(0.05 * 0.95 / k)
    for lag in (1, 2, 3, 4, 5):  # neighbours inside and across the groups of four
        assert abs(_corr(z[:, :-lag], z[:, lag:])) < 5.0 / math.sqrt(n * (d - lag)), lag
    assert abs(_corr(z[:-1], z[1:])) < 5.0 / math.sqrt((n - 1) * d)  # neighbouring rows
    assert abs(_corr(z, z2)) < bound  # two calls
    assert not torch.equal(z, z2)
    # rows differ: independent rows lie sqrt(2 d) ~ 45 apart
    dist = torch.cdist(z.double(), z.double()) + 1e3 * torch.eye(n, dtype=torch.float64,
                                                                device=z.device)
    assert dist.min() > 0.75 * math.sqrt(2 * d)


def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def test_same_seed_same_noise_and_generator_honoured(backend):
    mu, logvar, _ = _inputs((4, 9), torch.float32)
    torch.manual_seed(11)
    z1, kl1 = ff.reparameterize_kl(mu, logvar)
    torch.manual_seed(11)
    z2, kl2 = ff.reparameterize_kl(mu, logvar)
    z3, _ = ff.reparameterize_kl(mu, logvar)
    assert torch.equal(z1, z2) and torch.equal(kl1, kl2)
    assert not torch.equal(z1, z3)
    # an explicit generator decides the noise and leaves the global RNG alone
    torch.manual_seed(3)
    state = torch.get_rng_state()
    g1, _ = ff.reparameterize_kl(mu, logvar, generator=_gen(5))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(4)
    g2, _ = ff.reparameterize_kl(mu, logvar, generator=_gen(5))
    g3, _ = ff.reparameterize_kl(mu, logvar, generator=_gen(6))
    assert torch.equal(g1, g2) and not torch.equal(g1, g3)
    # a generator on another device than the tensors is honoured as well
    g4, _ = ff.reparameterize_kl(mu, logvar, generator=torch.Generator().manual_seed(5))
    assert torch.equal(g4, ff.reparameterize_kl(mu, logvar,
                                                generator=torch.Generator().manual_seed(5))[0])
    # the documented choice: the seed comes from the default generator of mu's device
    torch.manual_seed(5)
    assert torch.equal(ff.reparameterize_kl(mu, logvar)[0], g1)


def test_bitwise_deterministic(backend):
    mu, logvar, _ = _inputs((3, 4500), torch.float32)  # three tiles per row

    def run():
        torch.manual_seed(2)
        mu_, lv_ = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        z, kl = ff.reparameterize_kl(mu_, lv_, reduction="mean")
        (z.square().sum() + kl).backward()
        return z, kl, mu_.grad, lv_.grad

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


# (base shape, view of the base that the op receives)
STRIDED = {
    "transposed": ((14, 9), lambda t: t.t()),
    "sliced": ((9, 14), lambda t: t[:, ::2]),
    "channels_last": ((3, 5, 4, 2), lambda t: t.contiguous(memory_format=torch.channels_last)),
    "broadcast": ((1, 11), lambda t: t.expand(5, 11)),
}


@pytest.mark.parametrize("case", list(STRIDED))
def test_strided_inputs_and_stride0_grads(backend, case):
    shape, view = STRIDED[case]
    bases = [torch.randn(shape, device=DEVICE), 0.5 * torch.randn(shape, device=DEVICE)]
    eps = torch.randn(view(bases[0]).shape, device=DEVICE)
    if eps.dim() == 2:
        eps = eps.t().contiguous().t()  # column-major noise
    for reduction in REDUCTIONS:
        leaves = [b.clone().requires_grad_() for b in bases]
        mu, logvar = (view(t) for t in leaves)
        assert not mu.is_contiguous()
        z, kl = ff.reparameterize_kl(mu, logvar, eps, reduction=reduction)
        (z.sum() + kl.sum()).backward()  # stride-0 gradients reach the op
        dense = [b.clone().requires_grad_() for b in bases]
        z_d, kl_d = ff.reparameterize_kl(*(view(t).contiguous() for t in dense),
                                         eps.contiguous(), reduction=reduction)
        (z_d.sum() + kl_d.sum()).backward()
        assert_close(z, z_d.double())
        assert_close(kl, kl_d.double())
        for a, b in zip(leaves, dense):
            assert_close(a.grad, b.grad.double())
    if case == "channels_last":
        assert z.is_contiguous(memory_format=torch.channels_last)


def test_empty_batch_and_empty_rows(backend):
    for shape in [(0, 5), (3, 0)]:
        mu = torch.zeros(shape, device=DEVICE, requires_grad=True)
        z, kl = ff.reparameterize_kl(mu, torch.zeros(shape, device=DEVICE))
        assert z.shape == shape and kl.shape == (shape[0],)
        assert torch.equal(kl, torch.zeros(shape[0], device=DEVICE))


def test_wide_counter_path_matches():
    """The >2**32-counter code path (high counter bits in the Philox key) gives the same
    noise as the plain path while the high bits are zero."""
    if DEVICE == "cpu" and not ff.backend.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    from fastflow.kernels import gaussian as kernels

    mu, logvar, _ = _inputs((3, 10), torch.float32)
    seed = draw_seed(DEVICE)
    plain = kernels.reparam_kl_forward(mu, logvar, None, seed, "none")
    wide = kernels.reparam_kl_forward(mu, logvar, None, seed, "none", force_wide=True)
    assert torch.equal(plain[0], wide[0]) and torch.equal(plain[1], wide[1])
    gz, gkl = torch.randn_like(mu), torch.randn(3, device=DEVICE)
    a = kernels.reparam_kl_backward(gz, gkl, mu, logvar, None, seed, "none")
    b = kernels.reparam_kl_backward(gz, gkl, mu, logvar, None, seed, "none", force_wide=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@triton.jit
def _noise_probe_kernel(seed_ptr, out_ptr, base, n, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    counter = base + (i // 4).to(tl.int64)
    e = _kernel_noise(tl.load(seed_ptr), counter, i % 4, WIDE)
    tl.store(out_ptr + i, e, mask=i < n)


def test_counters_past_2_32_mix_their_high_bits_into_the_key():
    """The WIDE path itself, on counters that cross 2**32 (tensors of more than 2**34
    elements reach them): below 2**32 it is the plain path; above, counter c draws what key
    seed ^ (c >> 32) draws at c mod 2**32, not what the truncated counter would repeat."""
    if DEVICE == "cpu" and not ff.backend.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")

    def probe(seed, base, wide):
        out = torch.empty(16, device=DEVICE)
        _noise_probe_kernel[(1,)](seed, out, base, 16, WIDE=wide, BLOCK=16)
        return out

    seed = draw_seed(DEVICE)
    wide = probe(seed, 2**32 - 2, True)      # counters 2^32-2, 2^32-1, 2^32, 2^32+1
    plain = probe(seed, 2**32 - 2, False)    # the same counters truncated to 32 bits
    assert torch.equal(wide[:8], plain[:8])
    assert torch.equal(wide[8:], probe(seed ^ 1, 0, False)[:8])
    assert not torch.equal(wide[8:], plain[8:])  # plain repeats counters 0 and 1
    assert torch.equal(plain[8:], probe(seed, 0, False)[:8])
    assert torch.isfinite(wide).all() and wide.std() > 0.2


def test_bad_inputs_name_the_argument():
    mu = torch.randn(4, 6)
    with pytest.raises(ValueError, match="logvar.*shape"):
        ff.reparameterize_kl(mu, torch.randn(4, 5))
    with pytest.raises(TypeError, match="mu.*floating"):
        ff.reparameterize_kl(torch.ones(4, 6, dtype=torch.int64), torch.randn(4, 6))
    with pytest.raises(TypeError, match="logvar.*floating"):
        ff.reparameterize_kl(mu, torch.ones(4, 6, dtype=torch.int32))
    with pytest.raises(ValueError, match="eps.*shape"):
        ff.reparameterize_kl(mu, torch.randn(4, 6), torch.randn(4, 6, 1))
    with pytest.raises(TypeError, match="eps.*floating"):
        ff.reparameterize_kl(mu, torch.randn(4, 6), torch.ones(4, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="reduction.*'avg'"):
        ff.reparameterize_kl(mu, torch.randn(4, 6), reduction="avg")
    with pytest.raises(TypeError, match="mu.*Tensor"):
        ff.reparameterize_kl([1.0, 2.0], torch.randn(2))
    with pytest.raises(ValueError, match="mu.*at least 1"):
        ff.reparameterize_kl(torch.tensor(1.0), torch.tensor(0.0))
    with pytest.raises(ValueError, match="logvar.*device"):
        ff.reparameterize_kl(mu, torch.randn(4, 6, device="meta"))
    with pytest.raises(TypeError, match="generator"):
        ff.reparameterize_kl(mu, torch.randn(4, 6), generator=1234)
    with pytest.raises(ValueError, match="reduction"):
        ff.GaussianReparam(reduction="total")


def test_module_drop_in(backend):
    layer = ff.GaussianReparam()
    mu, logvar, _ = _inputs((5, 8), torch.float32)
    torch.manual_seed(9)
    z, kl = layer(mu, logvar)
    torch.manual_seed(9)
    z_f, kl_f = ff.reparameterize_kl(mu, logvar)
    assert torch.equal(z, z_f) and torch.equal(kl, kl_f)
    mean_layer = ff.GaussianReparam(reduction="mean", sample_in_eval=False).eval()
    z_eval, kl_eval = mean_layer(mu, logvar)
    assert torch.equal(z_eval, mu)
    assert_close(kl_eval, reference.reparameterize_kl(mu.double(), logvar.double(), mu.double(),
                                                      reduction="mean")[1])


def test_opcheck():
    mu, logvar, eps = _inputs((3, 6), torch.float32)
    mu.requires_grad_()
    logvar.requires_grad_()
    for args in [(mu, logvar, eps, None, "none"), (mu, logvar, None, draw_seed(DEVICE), "mean")]:
        torch.library.opcheck(reparam_kl, args)


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 5), dims=st.lists(st.integers(1, 9), min_size=1, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       reduction=st.sampled_from(REDUCTIONS))
def test_property_random_shapes(backend_name, n, dims, dtype, reduction):
    shape = (n, *dims)
    mu, logvar, eps = _inputs(shape, dtype)
    with ff.use_backend(backend_name):
        z, kl = ff.reparameterize_kl(mu, logvar, eps, reduction=reduction)
    z_ref, kl_ref = _reference64(mu, logvar, eps, reduction)
    assert_close(z, z_ref, dtype)
    assert_close(kl, kl_ref, dtype)


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager(backend):
    """The op, its seed draw and its backward compile as one graph; same seed, same numbers.
    (The reference path is plain PyTorch: inductor draws its own random numbers unless
    ``fallback_random`` is set, as for any eager code a user compiles.)"""
    import torch._inductor.config as inductor_config

    # inductor's own patch context: monkeypatch's undo deletes the config entry itself, and
    # every later compile in the session then fails
    with inductor_config.patch(fallback_random=backend == "reference"):
        _compile_matches_eager()


def _compile_matches_eager():
    mu, logvar, _ = _inputs((4, 9), torch.float32)
    mu.requires_grad_(True)
    logvar.requires_grad_(True)

    def f(m, lv):
        return ff.reparameterize_kl(m, lv, reduction="mean")

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    runs = []
    for fn in (f, compiled):
        torch.manual_seed(7)
        z, kl = fn(mu, logvar)
        grads = torch.autograd.grad(z.square().sum() + kl, (mu, logvar))
        runs.append((z, kl, *grads))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_eval_posterior_mean_is_mu_even_where_the_scale_overflows(backend):
    # sample_in_eval=False returned z = mu + exp(logvar / 2) * 0, NaN wherever exp overflows
    # (logvar > ~177 in float32), and a NaN gradient for logvar; the posterior mean is mu
    layer = ff.GaussianReparam(sample_in_eval=False).eval()
    mu = torch.tensor([[1.0, -2.0], [0.5, 3.0]], device=DEVICE, requires_grad=True)
    logvar = torch.tensor([[200.0, 0.0], [-1.0, 1.0]], device=DEVICE, requires_grad=True)
    z, kl = layer(mu, logvar)
    assert torch.equal(z, mu)
    z.sum().backward()
    assert torch.equal(mu.grad, torch.ones_like(mu))
    # z does not depend on logvar (no gradient, or a zero one), never NaN
    assert logvar.grad is None or torch.equal(logvar.grad, torch.zeros_like(logvar))
    (z.sum() + kl.sum()).backward()
    assert torch.isfinite(mu.grad).all()
