"""Nothing silently wrong (issue 9): W never stale whatever mutates the parameters, the
backend chosen in forward is the one backward uses, float32 flow math under autocast,
training after inference mode, plain log-det tensors, higher derivatives, degenerate
ActNorm batches, option guards, hooks and subclasses inside FlowStep; and oracles for the
reference that do not come from the reference itself (issue 8)."""

import inspect
import threading

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import fastflow as ff
from fastflow import reference

from conftest import DEVICE, assert_close

D64 = dict(dtype=torch.float64, device=DEVICE)


def _layer(kind, c=4):
    torch.manual_seed(0)
    layer = (ff.InvConv2dLU if kind == "lu" else ff.InvConv2d)(c).to(DEVICE)
    return layer


def _same_as_fresh(layer, x):
    """The layer's no-grad outputs (both directions, log-dets) equal those of a fresh module
    loaded from its state dict."""
    fresh = type(layer)(layer.in_channel).to(DEVICE)
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        for a, b in ((layer(x), fresh(x)), (layer.inverse(x), fresh.inverse(x))):
            torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
            torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# 1. W / W^-1 never stale
# --------------------------------------------------------------------------------------


def _optimizer_cases():
    """(optimizer name, implementation) for every optimizer in torch.optim and each
    implementation its constructor offers: "for-loop" (foreach=False), "foreach", "fused";
    "default" for those with no choice. (Whether fused runs on CPU is the optimizer's
    business: one that refuses at construction or step is skipped, with its reason.)"""
    cases = []
    for name in sorted(torch.optim.__all__):
        cls = getattr(torch.optim, name)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            continue
        if cls in (torch.optim.Optimizer, torch.optim.SparseAdam):  # SparseAdam: sparse grads only
            continue
        offered = inspect.signature(cls.__init__).parameters
        impls = [i for i, kw in (("for-loop", "foreach"), ("foreach", "foreach"),
                                 ("fused", "fused")) if kw in offered] or ["default"]
        cases += [(name, impl) for impl in impls]
    return cases


def _make_optimizer(name, impl, layer):
    cls = getattr(torch.optim, name)
    params = list(layer.parameters())
    if cls.__name__ == "Muon":  # matrices only
        params = [p for p in params if p.dim() == 2]
        if not params:
            pytest.skip("Muon takes 2-D parameters only; this layer has none")
    kw = {"lr": 0.05, **({"foreach": False} if impl == "for-loop" else
                         {} if impl == "default" else {impl: True})}
    try:
        return cls(params, **kw)
    except (RuntimeError, ValueError) as e:  # the implementation is not offered on this device
        pytest.skip(f"{name}({impl}) not offered here: {e}")


@pytest.mark.parametrize("kind", ["lu", "plain"])
@pytest.mark.parametrize("name,impl", _optimizer_cases())
def test_invconv_not_stale_after_every_optimizer_and_implementation(name, impl, kind):
    layer = _layer(kind)
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    with torch.no_grad():  # a no-grad call before the step: where a cache would be filled
        layer(x), layer.inverse(x)
    opt = _make_optimizer(name, impl, layer)

    def closure():
        opt.zero_grad()
        y, ld = layer(x)
        loss = y.square().sum() - ld.sum()
        loss.backward()
        return loss

    try:
        opt.step(closure)
    except RuntimeError as e:
        if "fused" in str(e).lower() or "foreach" in str(e).lower():
            pytest.skip(f"{name}({impl}) cannot run here: {e}")
        raise
    _same_as_fresh(layer, x)


def test_invconv_not_stale_after_foreach_ops_data_edits_load_and_to(backend):
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    for kind in ("lu", "plain"):
        layer = _layer(kind)
        params = list(layer.parameters())

        def edits():
            with torch.no_grad():
                torch._foreach_add_(params, [0.1 * torch.randn_like(p) for p in params])
            yield
            for p in params:  # .data edits bump no version counter
                p.data.mul_(1.1)
            yield
            other = _layer(kind)
            with torch.no_grad():
                for p in other.parameters():
                    p.add_(0.2)
            layer.load_state_dict(other.state_dict())
            yield
            layer.double()
            with torch.no_grad():
                for p in layer.parameters():
                    p.add_(0.05)
            layer.float()
            yield

        for _ in edits():
            _same_as_fresh(layer, x)
            with torch.no_grad():
                layer(x), layer.inverse(x)


# --------------------------------------------------------------------------------------
# 2. the backend chosen in forward is the one backward uses
# --------------------------------------------------------------------------------------


def _reparam_grads(mode, run_backward):
    torch.manual_seed(3)
    mu = torch.randn(3, 17, device=DEVICE, requires_grad=True)
    lv = (0.5 * torch.randn(3, 17, device=DEVICE)).requires_grad_()
    torch.manual_seed(4)
    with ff.use_backend(mode):
        z, kl = ff.reparameterize_kl(mu, lv)
    run_backward(lambda: (z.square().sum() + kl.sum()).backward())
    return mu.grad, lv.grad


def _in_thread(fn):
    """``fn()`` on a new thread, with the caller's intra-op thread count (OpenMP's count is
    per thread: a fresh thread starts at the machine's default, and a conv backward split
    over another number of threads rounds differently)."""
    errors = []
    threads = torch.get_num_threads()

    def target():
        try:
            torch.set_num_threads(threads)
            fn()
        except BaseException as e:  # noqa: BLE001  (re-raised below)
            errors.append(e)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("mode,other", [("triton", "reference"), ("reference", "triton")])
def test_backward_uses_the_backend_forward_chose(monkeypatch, mode, other):
    inline = _reparam_grads(mode, lambda bw: bw())
    # backward after the use_backend block, with the other backend in force
    monkeypatch.setenv("FASTFLOW_BACKEND", other)
    outside = _reparam_grads(mode, lambda bw: bw())
    # backward on another thread (no thread-local use_backend there), other backend in force
    threaded = _reparam_grads(mode, lambda bw: _in_thread(bw))
    with ff.use_backend(other):
        inside_other = _reparam_grads(mode, lambda bw: bw())
    for got in (outside, threaded, inside_other):
        for a, b in zip(got, inline):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_coupling_and_flowstep_backward_use_the_forward_backend(monkeypatch):
    torch.manual_seed(0)
    step = ff.FlowStep(4, filter_size=8).to(DEVICE)
    with torch.no_grad():
        for p in step.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 4, 3, 3, device=DEVICE)

    def grads(backward_in_thread):
        step.zero_grad()
        with ff.use_backend("triton"):
            y, ld = step(x)
        loss = y.square().sum() - ld.sum()
        if backward_in_thread:
            monkeypatch.setenv("FASTFLOW_BACKEND", "reference")
            _in_thread(loss.backward)
        else:
            loss.backward()
        return [p.grad.clone() for p in step.parameters()]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# 3. float32 flow math under autocast, both backends
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU autocast (bf16); CUDA has its own run")
def test_flow_layers_are_float32_under_autocast(backend):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 3)
    h = 0.5 * torch.randn(2, 6, 5, 3)
    an, lu, plain = ff.ActNorm(6).eval(), ff.InvConv2dLU(6), ff.InvConv2d(6)
    with torch.no_grad():
        for m in (an, lu, plain):
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        got = {"actnorm": an(x), "lu": lu(x), "lu inverse": lu.inverse(x),
               "plain": plain(x), "plain inverse": plain.inverse(x),
               "coupling": ff.affine_coupling(x, h)}
    d = torch.float64
    w_lu = reference.lu_weight(*(t.detach().to(d) for t in (lu.w_p, lu.w_l, lu.w_u, lu.w_s,
                                                            lu.s_sign)))
    w_plain = plain.weight.detach().to(d).reshape(6, 6)
    hw = 15
    want = {
        "actnorm": reference.actnorm(x.double(), an.loc.detach().double(), an.scale.detach().double()),
        "lu": (torch.einsum("oc,nchw->nohw", w_lu, x.double()),
               (hw * torch.linalg.slogdet(w_lu)[1]).expand(2)),
        "lu inverse": (torch.einsum("oc,nchw->nohw", torch.linalg.inv(w_lu), x.double()),
                       (-hw * torch.linalg.slogdet(w_lu)[1]).expand(2)),
        "plain": (torch.einsum("oc,nchw->nohw", w_plain, x.double()),
                  (hw * torch.linalg.slogdet(w_plain)[1]).expand(2)),
        "plain inverse": (torch.einsum("oc,nchw->nohw", torch.linalg.inv(w_plain), x.double()),
                          (-hw * torch.linalg.slogdet(w_plain)[1]).expand(2)),
        "coupling": reference.affine_coupling(x.double(), h.double()),
    }
    for name, (y, ld) in got.items():
        assert y.dtype == torch.float32 and ld.dtype == torch.float32, name
        assert_close(y, want[name][0], torch.float32, msg=name)
        assert_close(ld, want[name][1], torch.float32, msg=name)


# --------------------------------------------------------------------------------------
# 4. training after inference mode
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv_lu", [True, False])
def test_training_works_after_an_inference_mode_call(backend, conv_lu):
    torch.manual_seed(0)
    model = ff.FlowStep(4, filter_size=8, conv_lu=conv_lu).to(DEVICE)
    twin = ff.FlowStep(4, filter_size=8, conv_lu=conv_lu).to(DEVICE)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    with torch.inference_mode():
        model(x)
        model.reverse(x)
    twin(x)  # the same initialisation, outside inference mode
    for m in (model, twin):
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            y, ld = m(x)
            (y.square().sum() - ld.sum()).backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


# --------------------------------------------------------------------------------------
# 5. every log-det is an ordinary (N,) tensor
# --------------------------------------------------------------------------------------


def test_logdets_are_plain_tensors_that_accept_inplace_edits(backend):
    x = torch.randn(3, 4, 2, 5, device=DEVICE)
    an = ff.ActNorm(4).to(DEVICE)
    step = ff.FlowStep(4, filter_size=8).to(DEVICE)
    calls = {
        "ActNorm": lambda: an(x),
        "ActNorm inverse": lambda: an.inverse(x),
        "actnorm_invconv": lambda: ff.actnorm_invconv(x, an.loc, an.scale, torch.eye(4, device=DEVICE),
                                                      torch.zeros((), device=DEVICE)),
        "FlowStep": lambda: step(x),
        "FlowStep inverse": lambda: step.inverse(x),
    }
    for kind in ("lu", "plain"):
        layer = _layer(kind)
        calls[f"InvConv {kind}"] = lambda layer=layer: layer(x)
        calls[f"InvConv {kind} inverse"] = lambda layer=layer: layer.inverse(x)
    for name, call in calls.items():
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                _, ld = call()
            assert ld.shape == (3,) and ld.stride() == (1,), name
            before = ld.detach().clone()
            with torch.no_grad():
                ld += 1  # fails on a stride-0 expanded view
            assert torch.equal(ld.detach(), before + 1), name


# --------------------------------------------------------------------------------------
# 6. higher derivatives: supported on the reference path, refused early on Triton
# --------------------------------------------------------------------------------------


def test_reference_path_supports_double_backward_and_func_grad():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 2, 1, **D64)
    h = 0.5 * torch.randn(1, 4, 2, 1, **D64)
    mu, lv = torch.randn(2, 3, **D64), 0.3 * torch.randn(2, 3, **D64)
    loc, scale, w = torch.randn(4, **D64), torch.rand(4, **D64) + 0.5, torch.randn(4, 4, **D64)
    with ff.use_backend("reference"):
        fns = [
            (lambda a, b: ff.affine_coupling(a, b)[0].sin().sum() + ff.affine_coupling(a, b)[1].sum(), (x, h)),
            (lambda a, b: ff.reparameterize_kl(a, b, torch.ones_like(a))[0].sin().sum()
             + ff.reparameterize_kl(a, b, torch.ones_like(a))[1].sum(), (mu, lv)),
            (lambda a, b: ff.channel_mix(a, b, loc=loc, scale=scale).sin().sum(), (x, w)),
        ]
        for fn, args in fns:
            args = [a.clone().requires_grad_() for a in args]
            assert torch.autograd.gradgradcheck(lambda *a: fn(*a).reshape(1), args)
            g = torch.func.grad(fn, argnums=(0, 1))(*[a.detach() for a in args])
            want = torch.autograd.grad(fn(*args), args)
            for a, b in zip(g, want):
                torch.testing.assert_close(a, b)


def test_triton_path_refuses_double_backward_and_func_grad_at_the_first_call():
    x = torch.randn(2, 4, 3, 3, device=DEVICE, requires_grad=True)
    h = torch.randn(2, 4, 3, 3, device=DEVICE, requires_grad=True)
    with ff.use_backend("triton"):
        y, ld = ff.affine_coupling(x, h)
        with pytest.raises(NotImplementedError, match=r"double backward.*use_backend\('reference'\)"):
            torch.autograd.grad(y.sum() + ld.sum(), (x, h), create_graph=True)
        with pytest.raises(NotImplementedError, match=r"torch.func.*use_backend\('reference'\)"):
            torch.func.grad(lambda a: ff.affine_coupling(a, h.detach())[1].sum())(x.detach())
        with pytest.raises(NotImplementedError, match=r"torch.func"):
            torch.func.grad(lambda a: ff.reparameterize_kl(a, a)[1].sum())(x.detach())
        with pytest.raises(NotImplementedError, match=r"torch.func"):
            torch.func.grad(lambda a: ff.channel_mix(a, torch.eye(4)).sum())(x.detach())
        # the TarFlow head too (it failed with torch's "no autograd formula" at the second
        # backward and "must override setup_context" under torch.func)
        tok = torch.randn(2, 3, 4, device=DEVICE, requires_grad=True)
        th = torch.randn(2, 3, 8, device=DEVICE, requires_grad=True)
        z, tld = ff.tarflow_head(tok, th)
        with pytest.raises(NotImplementedError, match=r"tarflow_head: double backward"):
            torch.autograd.grad(z.sum() + tld.sum(), (tok, th), create_graph=True)
        with pytest.raises(NotImplementedError, match=r"tarflow_head: torch.func"):
            torch.func.grad(lambda a: ff.tarflow_head(a, th.detach())[1].sum())(tok.detach())
        # first derivatives are unaffected
        gx, _ = torch.autograd.grad(y.sum() + ld.sum(), (x, h))
        assert torch.isfinite(gx).all()


# --------------------------------------------------------------------------------------
# 7. ActNorm: an empty first batch neither initialises nor poisons it
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)])
def test_actnorm_empty_first_batch_does_not_initialise(backend, shape):
    # (torch's 3x3 convolutions of the coupling network refuse H = 0 themselves)
    modules = [ff.ActNorm(3)] + ([ff.FlowStep(3, filter_size=8)] if shape[0] == 0 else [])
    for module in modules:
        module = module.to(DEVICE)
        an = module if isinstance(module, ff.ActNorm) else module.actnorm
        y, ld = module(torch.randn(shape, device=DEVICE))
        assert y.shape == shape and ld.shape == (shape[0],)
        assert not an._initialized and an.initialized.item() == 0
        assert torch.isfinite(an.loc).all() and torch.isfinite(an.scale).all()
        x = torch.randn(4, 3, 5, 5, device=DEVICE) * 2 + 1
        y, ld = module(x)
        assert an._initialized and torch.isfinite(y).all() and torch.isfinite(ld).all()
        assert_close(an.loc.detach().reshape(-1), -x.double().mean(dim=(0, 2, 3)), torch.float32)


# --------------------------------------------------------------------------------------
# 8. options: numbers finite and positive, flags bool, in every public op
# --------------------------------------------------------------------------------------


def test_numeric_options_and_flags_are_validated():
    x, h = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    for clamp in (float("inf"), float("nan"), 0.0, -1.0):
        with pytest.raises(ValueError, match="clamp: expected a finite positive number"):
            ff.affine_coupling(x, h, scale="atan", clamp=clamp)
    for clamp in ("2", True, None):
        with pytest.raises(TypeError, match="clamp: expected a finite positive number"):
            ff.affine_coupling(x, h, scale="atan", clamp=clamp)
    loc, scale, w = torch.zeros(4), torch.ones(4), torch.eye(4)
    flagged = {
        "affine_coupling": lambda r: ff.affine_coupling(x, h, reverse=r),
        "additive_coupling": lambda r: ff.additive_coupling(x, h[:, :2], reverse=r),
        "channel_mix": lambda r: ff.channel_mix(x, w, loc=loc, scale=scale, reverse=r),
        "actnorm_invconv": lambda r: ff.actnorm_invconv(x, loc, scale, w, reverse=r),
    }
    for name, call in flagged.items():
        for bad in ("no", 1, 0, None):
            with pytest.raises(TypeError, match="reverse: expected a bool"):
                call(bad)
        call(False), call(True)
    # the coupling caches its checked options: values equal to accepted ones (1 == True,
    # True == 1.0) are refused after the accepted ones went through
    ff.affine_coupling(x, h, scale="atan", clamp=1.0)
    for bad in (1, 0):
        with pytest.raises(TypeError, match="reverse: expected a bool"):
            ff.affine_coupling(x, h, reverse=bad)
    with pytest.raises(TypeError, match="clamp: expected a finite positive number"):
        ff.affine_coupling(x, h, scale="atan", clamp=True)
    with pytest.raises(ValueError, match="scale: expected one of"):
        ff.affine_coupling(x, h, scale=["atan"])  # unhashable: still the named error
    from fastflow.ops.lu_weight import lu_weight_logdet

    args = (torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(4), torch.ones(4), torch.arange(4))
    with pytest.raises(ValueError, match="n: expected a sample count"):
        lu_weight_logdet(*args, n=True)
    with pytest.raises(TypeError, match="ld_mult: expected an int"):
        lu_weight_logdet(*args, ld_mult=2.5)


# --------------------------------------------------------------------------------------
# 10. hooks on step.actnorm / step.invconv fire; a subclass assigned there is used
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv_lu", [True, False])
def test_flowstep_honours_hooks_and_subclasses(backend, conv_lu):
    torch.manual_seed(0)
    step = ff.FlowStep(4, filter_size=8, conv_lu=conv_lu).to(DEVICE)
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    y0, ld0 = step(x)  # initialises ActNorm (fused path)
    seen = []
    handles = [step.actnorm.register_forward_hook(lambda m, i, o: seen.append("actnorm")),
               step.invconv.register_forward_pre_hook(lambda m, i: seen.append("invconv"))]
    y1, ld1 = step(x)
    assert seen == ["actnorm", "invconv"]
    assert_close(y1, y0.double(), torch.float32)
    assert_close(ld1, ld0.double(), torch.float32)
    for hd in handles:
        hd.remove()

    class Doubling(ff.ActNorm):
        def forward(self, v):
            y, ld = super().forward(v)
            return 2 * y, ld

        def inverse(self, v):
            return super().inverse(v / 2)

    twin = Doubling(4).to(DEVICE)
    twin.load_state_dict(step.actnorm.state_dict())
    step.actnorm = twin
    y2, _ = step(x)
    with torch.no_grad():
        a, _ = twin(x)
        b, _ = step.invconv(a)
        want, _ = step.coupling(b)
    assert_close(y2, want.double(), torch.float32)
    with torch.no_grad():
        assert_close(step.reverse(y2), x.double(), torch.float32, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("conv_lu", [True, False])
def test_flowstep_fires_backward_hooks_of_its_actnorm_and_invconv(backend, conv_lu):
    """Full backward hooks (and backward pre-hooks) on ``step.actnorm`` / ``step.invconv``
    fire as when the modules are called one by one: the fused path, which calls neither,
    is not taken while one is registered; the results are the fused path's."""
    torch.manual_seed(0)
    step = ff.FlowStep(4, filter_size=8, conv_lu=conv_lu).to(DEVICE)
    x = torch.randn(2, 4, 3, 3, device=DEVICE, requires_grad=True)
    y0, ld0 = step(x)  # initialises ActNorm (fused path)
    g0 = torch.autograd.grad(y0.sum() + ld0.sum(), x)[0]
    seen = []
    handles = [step.actnorm.register_full_backward_hook(
                   lambda m, gi, go: seen.append("actnorm")),
               step.invconv.register_full_backward_pre_hook(
                   lambda m, go: seen.append("invconv"))]
    y1, ld1 = step(x)
    g1 = torch.autograd.grad(y1.sum() + ld1.sum(), x)[0]
    for hd in handles:
        hd.remove()
    assert sorted(seen) == ["actnorm", "invconv"]
    assert_close(y1, y0.double(), torch.float32)
    assert_close(ld1, ld0.double(), torch.float32)
    assert_close(g1, g0.double(), torch.float32)


# --------------------------------------------------------------------------------------
# Oracles independent of reference.py
# --------------------------------------------------------------------------------------


def test_kl_against_torch_distributions_and_zero_at_the_prior(backend):
    torch.manual_seed(0)
    mu, lv = torch.randn(5, 7, **D64), torch.randn(5, 7, **D64)
    _, kl = ff.reparameterize_kl(mu, lv, torch.zeros_like(mu))
    want = kl_divergence(Normal(mu, torch.exp(lv / 2)), Normal(0.0, 1.0)).sum(dim=1)
    torch.testing.assert_close(kl, want, rtol=1e-12, atol=1e-12)
    for dtype in (torch.float32, torch.float64):
        zero = torch.zeros(4, 9, dtype=dtype, device=DEVICE)
        z, kl = ff.reparameterize_kl(zero, zero, zero)
        assert torch.equal(kl, torch.zeros(4, dtype=kl.dtype, device=DEVICE))
        assert torch.equal(z, zero)


def test_actnorm_init_on_a_constant_channel():
    x = torch.randn(3, 2, 4, 4, **D64)
    x[:, 1] = 0.75  # std 0
    an = ff.ActNorm(2).to(**D64)
    y, ld = an(x)
    assert torch.isfinite(y).all() and torch.isfinite(ld).all()
    std0 = x[:, 0].std()
    torch.testing.assert_close(an.scale.detach().reshape(-1),
                               torch.stack([1 / (std0 + 1e-6), torch.tensor(1e6, **D64)]),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(an.loc.detach().reshape(-1),
                               torch.stack([-x[:, 0].mean(), torch.tensor(-0.75, **D64)]),
                               rtol=1e-12, atol=1e-12)
    assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1]))


def _naive_coupling(x, h, reverse=False):
    """rosinality's formulas, written out: (xb + t) * sigmoid(raw + 2), cat."""
    xa, xb = x.chunk(2, 1)
    raw, t = h.chunk(2, 1)
    s = torch.sigmoid(raw + 2)
    yb = xb / s - t if reverse else (xb + t) * s
    return torch.cat([xa, yb], 1)


def test_reference_coupling_against_jacobian_and_naive_autograd():
    """The reference's log-det is log|det| of the autograd Jacobian of the naive formula,
    and its gradients are autograd's of the naive formula."""
    torch.manual_seed(0)
    x, h = torch.randn(1, 4, 2, 3, **D64), 0.7 * torch.randn(1, 4, 2, 3, **D64)
    for reverse in (False, True):
        y, ld = reference.affine_coupling(x, h, reverse=reverse)
        torch.testing.assert_close(y, _naive_coupling(x, h, reverse))
        jac = torch.autograd.functional.jacobian(lambda v: _naive_coupling(v, h, reverse), x)
        torch.testing.assert_close(ld[0], torch.linalg.slogdet(jac.reshape(24, 24))[1])
    xr, hr = x.clone().requires_grad_(), h.clone().requires_grad_()
    g = torch.randn_like(x)
    y, _ = reference.affine_coupling(xr, hr)
    got = torch.autograd.grad(y, (xr, hr), g)
    xn, hn = x.clone().requires_grad_(), h.clone().requires_grad_()
    want = torch.autograd.grad(_naive_coupling(xn, hn), (xn, hn), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_reference_channel_mix_lu_and_invconv_against_independent_formulas():
    torch.manual_seed(0)
    c = 5
    x = torch.randn(2, c, 3, 2, **D64)
    loc, scale = torch.randn(c, **D64), torch.rand(c, **D64) + 0.5
    w = torch.randn(c, c, **D64)
    naive = torch.stack([torch.stack([w @ (scale * (x[n, :, i, j] + loc)) for j in range(2)], -1)
                         for n in range(2) for i in range(3)]).reshape(2, 3, c, 2).permute(0, 2, 1, 3)
    torch.testing.assert_close(reference.actnorm_mix(x, w, loc, scale), naive)
    back = reference.actnorm_mix(naive, torch.linalg.inv(w), loc, scale, reverse=True)
    torch.testing.assert_close(back, x)
    # LU weight: explicit permutation matrix, log-det against slogdet
    perm = torch.eye(c, **D64)[torch.randperm(c)]
    lower, upper = torch.randn(c, c, **D64), torch.randn(c, c, **D64)
    log_s, sign = torch.randn(c, **D64), torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0], **D64)
    explicit = perm @ (torch.tril(lower, -1) + torch.eye(c, **D64)) @ (
        torch.triu(upper, 1) + torch.diag(sign * torch.exp(log_s)))
    w_lu, ld = reference.lu_weight_logdet(perm.argmax(dim=1), lower, upper, log_s, sign,
                                          scale, n=2, ld_mult=6)
    torch.testing.assert_close(w_lu, explicit)
    want = 6 * (torch.linalg.slogdet(explicit)[1] + torch.log(scale.abs()).sum())
    torch.testing.assert_close(ld, want.expand(2))
    torch.testing.assert_close(reference.lu_inverse_weight(perm, lower, upper, log_s, sign),
                               torch.linalg.inv(explicit))
    # plain invconv: LU log-det against slogdet, inverse against inv
    y, ld = reference.invconv(x, w)
    torch.testing.assert_close(ld, (6 * torch.linalg.slogdet(w)[1]).expand(2))
    torch.testing.assert_close(y, torch.einsum("oc,nchw->nohw", w, x))


@pytest.mark.parametrize("fullgraph_backend", ["reference", "triton"])
def test_torch_compile_fullgraph_flowstep_both_paths(fullgraph_backend):
    """One graph, no break, on both paths (aot_eager: dynamo and autograd tracing, without
    inductor's compile time; the coupling and Gaussian tests compile with inductor)."""
    torch.manual_seed(0)
    step = ff.FlowStep(4, filter_size=8)
    x = torch.randn(2, 4, 3, 3)
    step(x)  # ActNorm initialised outside the graph
    with ff.use_backend(fullgraph_backend):
        y0, ld0 = step(x)
        torch._dynamo.reset()
        y1, ld1 = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
        (y1.sum() + ld1.sum()).backward()
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld1, ld0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("what", ["tarflow_head", "glow", "glow_reversible"])
def test_more_backward_paths_use_the_forward_backend(monkeypatch, what):
    """As above for tarflow_head, Glow's stacked-W path and ReversibleSequence's replay
    (coupling_backward): backward under the other backend's block, or on another thread
    with FASTFLOW_BACKEND set to it, gives the forward backend's gradients bit for bit
    (the two backends' gradients differ in the last bits, checked first)."""
    torch.manual_seed(0)
    if what == "tarflow_head":
        leaves = [torch.randn(2, 5, 3, device=DEVICE), torch.randn(2, 5, 6, device=DEVICE)]

        def run(x, h):
            return ff.tarflow_head(x, h, clamp=2.0)
    else:
        glow = ff.Glow(1, 2, 2, filter_size=8, reversible=what == "glow_reversible").to(DEVICE)
        x = torch.rand(2, 1, 8, 8, device=DEVICE)
        glow(x)  # ActNorm initialised
        with torch.no_grad():
            for p in glow.parameters():
                p.add_(0.05 * torch.randn_like(p))
        leaves = [x, *glow.parameters()]

        def run(x, *params):
            return glow(x)[:2]

    def grads(mode, backward):
        ins = [t if isinstance(t, torch.nn.Parameter) else t.detach().clone().requires_grad_()
               for t in leaves]
        for t in ins:
            t.grad = None
        with ff.use_backend(mode):
            outs = run(*ins)
        loss = sum((o.double() * torch.linspace(0.5, 1.5, o.numel(), dtype=torch.float64,
                                                device=DEVICE).view(o.shape)).sum() for o in outs)
        backward(loss)
        return [t.grad.clone() for t in ins]

    inline = {m: grads(m, lambda loss: loss.backward()) for m in ("triton", "reference")}
    assert any(not torch.equal(a, b) for a, b in zip(inline["triton"], inline["reference"]))
    for mode, other in (("triton", "reference"), ("reference", "triton")):
        def in_block(loss):
            with ff.use_backend(other):
                loss.backward()

        def in_thread(loss):
            monkeypatch.setenv("FASTFLOW_BACKEND", other)
            _in_thread(loss.backward)
            monkeypatch.delenv("FASTFLOW_BACKEND")

        for backward in (in_block, in_thread):
            for a, b in zip(grads(mode, backward), inline[mode]):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
