"""ActNorm, InvConv2dLU, InvConv2d and FlowStep: reference results, log-dets against
slogdet, gradcheck of every parameter, W / W^-1 never stale (they are not cached),
FlowStep equal to its parts applied one by one."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastflow as ff
from fastflow import reference

from conftest import DEVICE, CastCounter, assert_close


def _lu_matrices(layer):
    """W and W^-1 of an InvConv2dLU assembled from its parameters in float64, uncached."""
    d = torch.float64
    args = [t.detach().to(d) for t in (layer.w_p, layer.w_l, layer.w_u, layer.w_s, layer.s_sign)]
    return reference.lu_weight(*args), reference.lu_inverse_weight(*args)


def _perturb(layer, scale=0.1):
    """Move every parameter away from its initial value (in place, version bumped)."""
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn_like(p))
    return layer


# --------------------------------------------------------------------------------------
# ActNorm
# --------------------------------------------------------------------------------------


class _CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("_local_scalar_dense", "item", "is_nonzero"):
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def test_actnorm_data_dependent_init_then_no_sync(backend):
    layer = ff.ActNorm(4).to(DEVICE)
    x = torch.randn(3, 4, 5, 6, device=DEVICE) * torch.tensor([1.0, 2.0, 0.5, 3.0], device=DEVICE).view(1, 4, 1, 1) + 2.0
    y, logdet = layer(x)
    flat = y.transpose(0, 1).reshape(4, -1).double()
    assert_close(flat.mean(dim=1), torch.zeros(4, dtype=torch.float64), torch.float32, atol=1e-5)
    assert_close(flat.std(dim=1), torch.ones(4, dtype=torch.float64), torch.float32, atol=1e-5)
    assert layer.initialized.item() == 1
    loc0 = layer.loc.detach().clone()
    with _CountSyncs() as counter:
        layer(torch.randn(2, 4, 3, 3, device=DEVICE))
    assert counter.syncs == 0
    assert torch.equal(layer.loc.detach(), loc0)  # initialised once only
    ref_y, ref_ld = reference.actnorm(x.double(), layer.loc.detach(), layer.scale.detach())
    assert_close(y, ref_y, torch.float32)
    assert_close(logdet, ref_ld, torch.float32)


def test_actnorm_no_init_in_eval_and_flag_survives_state_dict():
    layer = ff.ActNorm(3).eval()
    layer(torch.randn(2, 3, 2, 2))
    assert not layer._initialized and layer.initialized.item() == 0
    trained = ff.ActNorm(3)
    trained(torch.randn(4, 3, 5, 5) * 3 + 1)
    fresh = ff.ActNorm(3)
    fresh.load_state_dict(trained.state_dict())
    assert fresh._initialized
    loc = fresh.loc.detach().clone()
    fresh(torch.randn(2, 3, 4, 4))  # must not re-initialise
    assert torch.equal(fresh.loc.detach(), loc)
    # and back: loading an uninitialised state clears the flag
    fresh.load_state_dict(ff.ActNorm(3).state_dict())
    assert not fresh._initialized


def test_actnorm_under_functional_call_leaves_the_swapped_state_alone(backend):
    """``torch.func.functional_call(fresh, trained.state_dict(), x)`` in training mode: the
    host-side mirror describes the layer's own flag (not set), so the layer initialised
    from x, writing into the swapped tensors (the trained model's own parameters, which a
    state dict shares) and setting its own mirror while its own loc / scale stayed 0 / 1."""
    torch.manual_seed(0)
    trained = ff.ActNorm(3).to(DEVICE)
    trained(torch.randn(4, 3, 5, 5, device=DEVICE) * 3 + 1)
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    fresh = ff.ActNorm(3).to(DEVICE)
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    want = trained(x)
    got = torch.func.functional_call(fresh, trained.state_dict(), (x,))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for k, v in trained.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not fresh._initialized and fresh.initialized.item() == 0
    x2 = torch.randn(4, 3, 5, 5, device=DEVICE) - 2
    fresh(x2)  # its own initialisation, from its own first batch
    loc, scale = reference.actnorm_init(x2)
    assert_close(fresh.loc.detach().flatten(), loc, torch.float32)
    assert_close(fresh.scale.detach().flatten(), scale, torch.float32)


@pytest.mark.parametrize("base_kind", ["copy", "fresh"])
def test_flowstep_ensemble_under_vmap_in_training_mode(base_kind):
    """``torch.func.stack_module_state`` + ``vmap(functional_call)``, the ensembling recipe,
    in training mode: the swapped flags are batched tensors (reading one fails under
    vmap); each member gives what it gives alone. ``fresh``: the base module was never
    initialised itself (its own mirror says so), and still must not read the swapped
    flag."""
    torch.manual_seed(0)
    models = [ff.FlowStep(4, filter_size=8) for _ in range(2)]
    x = torch.randn(2, 4, 4, 4)
    for m in models:
        m(x)  # initialised
    params, buffers = torch.func.stack_module_state(models)
    base = (copy.deepcopy(models[0]) if base_kind == "copy" else ff.FlowStep(4, filter_size=8))
    base = base.to("meta")
    assert base.actnorm._initialized == (base_kind == "copy")
    y, ld = torch.vmap(lambda p, b: torch.func.functional_call(base, (p, b), (x,)))(
        params, buffers)
    for k, m in enumerate(models):
        want = m(x)
        assert_close(y[k], want[0], torch.float32)
        assert_close(ld[k], want[1], torch.float32)


class _Exp(torch.nn.Module):
    """A positive ActNorm scale, stored as its log."""

    def forward(self, v):
        return v.exp()

    def right_inverse(self, v):
        return v.log()


class _Half(torch.nn.Module):
    def forward(self, v):
        return v / 2

    def right_inverse(self, v):
        return 2 * v


def test_actnorm_initialises_parametrized_loc_and_scale(backend):
    """With ``torch.nn.utils.parametrize`` on loc / scale, reading them gives the
    parametrization's output, computed for that read: the data-dependent initialisation
    must go through ``right_inverse`` to the stored tensors (copying into the read value
    left the layer at loc = 0, scale = 1 with its flag set)."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, device=DEVICE) * 3 + 1
    plain = ff.ActNorm(3).to(DEVICE)
    layer = ff.ActNorm(3).to(DEVICE)
    parametrize.register_parametrization(layer, "scale", _Exp())
    parametrize.register_parametrization(layer, "loc", _Half())
    stored = list(layer.parameters())
    want, want_ld = plain(x)
    got, got_ld = layer(x)
    assert layer._initialized and layer.initialized.item() == 1
    assert_close(layer.scale.detach(), plain.scale.detach(), torch.float32)
    assert_close(layer.loc.detach(), plain.loc.detach(), torch.float32)
    assert_close(got, want, torch.float32)
    assert_close(got_ld, want_ld, torch.float32)
    assert all(p is q for p, q in zip(layer.parameters(), stored))  # an optimizer keeps them


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_actnorm_round_trip_all_dtypes(backend, dtype):
    layer = ff.ActNorm(5).to(DEVICE)
    _perturb(layer, 0.5)
    layer.initialized.fill_(1)
    layer._initialized = True
    x = torch.randn(2, 5, 3, 3, device=DEVICE).to(dtype)
    y, ld = layer(x)
    x2, ld_inv = layer.inverse(y)
    ref_y, ref_ld = reference.actnorm(x.double(), layer.loc.detach(), layer.scale.detach())
    assert y.dtype == dtype
    assert_close(y, ref_y, dtype)
    assert_close(x2, x.double(), dtype, rtol=2e-2 if dtype == torch.bfloat16 else None)
    assert ld.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(ld, ref_ld, torch.float32)
    assert torch.equal(ld_inv, -ld)


# --------------------------------------------------------------------------------------
# InvConv2dLU / InvConv2d: reference, log-det vs slogdet, round trips, gradcheck
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("c,h,w", [(1, 2, 3), (7, 3, 5), (48, 2, 2)])
def test_invconv_lu_logdet_against_slogdet(backend, c, h, w):
    layer = _perturb(ff.InvConv2dLU(c).double().to(DEVICE))
    x = torch.randn(2, c, h, w, dtype=torch.float64, device=DEVICE)
    y, logdet = layer(x)
    weight, weight_inv = _lu_matrices(layer)
    assert_close(y, reference.channel_mix(x, weight), torch.float64)
    slogdet = torch.linalg.slogdet(weight)[1] * h * w
    assert_close(logdet, slogdet.expand(2), torch.float64, rtol=1e-9, atol=1e-9)
    assert_close(weight_inv, torch.linalg.inv(weight), torch.float64, rtol=1e-9, atol=1e-9)
    x2, ld_inv = layer.inverse(y)
    assert_close(x2, x, torch.float64, rtol=1e-9, atol=1e-9)
    assert_close(ld_inv, -slogdet.expand(2), torch.float64, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("param_dtype,dtype", [(torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float16),
                                               (torch.bfloat16, torch.float32),
                                               (torch.float32, torch.float64)], ids=str)
def test_invconv_lu_inverse_logdet_in_the_compute_dtype(backend, param_dtype, dtype):
    """The inverse map's log-det is -H*W*sum(w_s) summed in x's compute dtype, as the
    forward one, whatever the parameters' dtype (it was summed in theirs: a bfloat16
    layer's inverse log-det was 2 nats off, a FlowStep's 7; float32 parameters with float64
    input gave a float32 sum)."""
    layer = ff.InvConv2dLU(48).to(DEVICE, param_dtype)
    with torch.no_grad():
        layer.w_s.copy_(torch.rand(48) * 0.5)
    x = torch.randn(2, 48, 8, 8, device=DEVICE).to(dtype)  # a 16-bit sum is ~1 nat off
    exact = (64 * layer.w_s.detach().double().sum()).expand(2)
    tol = torch.float64 if dtype == torch.float64 else torch.float32
    y, ld = layer(x)
    assert_close(ld, exact, tol)
    assert_close(layer.inverse(y)[1], -exact, tol)
    if param_dtype == dtype:  # a whole half-precision FlowStep: its inverse undoes its log-det
        step = ff.FlowStep(48, filter_size=8).to(DEVICE, param_dtype)
        step.invconv.load_state_dict(layer.state_dict())
        _perturb(step.actnorm)
        step.actnorm.initialized.fill_(1)
        step.actnorm._initialized = True
        y, ld = step(x)
        assert_close(step.inverse(y)[1], -ld.double(), tol, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_invconv_lu_low_precision_inputs(backend, dtype):
    layer = _perturb(ff.InvConv2dLU(6).to(DEVICE))
    x = torch.randn(3, 6, 3, 5, device=DEVICE).to(dtype)
    y, ld = layer(x)
    weight, _ = _lu_matrices(layer)
    assert y.dtype == dtype and ld.dtype == torch.float32
    assert_close(y, reference.channel_mix(x.double(), weight), dtype)
    assert_close(ld, (15 * torch.linalg.slogdet(weight)[1]).expand(3), torch.float32, rtol=1e-4, atol=1e-4)
    assert_close(layer.reverse(y), x.double(), dtype, rtol=1e-4 if dtype == torch.float32 else None,
                 atol=1e-4 if dtype == torch.float32 else None)


def test_invconv_plain_logdet_against_slogdet(backend):
    layer = _perturb(ff.InvConv2d(5).double().to(DEVICE))
    x = torch.randn(2, 5, 3, 2, dtype=torch.float64, device=DEVICE)
    y, logdet = layer(x)
    w = layer.weight.detach().reshape(5, 5)
    assert_close(y, reference.channel_mix(x, w), torch.float64)
    assert_close(logdet, (6 * torch.linalg.slogdet(w)[1]).expand(2), torch.float64)
    ref_y, ref_ld = reference.invconv(x, layer.weight.detach())
    assert_close(logdet, ref_ld, torch.float64)
    x2, ld_inv = layer.inverse(y)
    assert_close(x2, x, torch.float64, rtol=1e-9, atol=1e-9)
    assert_close(ld_inv, -logdet, torch.float64)


def _call(layer, state, method, x):
    """``layer.<method>(x)`` with the parameters replaced by the tensors in ``state``."""
    class _Method(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, v):
            return getattr(self.inner, method)(v)

    return torch.func.functional_call(_Method(layer), {f"inner.{k}": v for k, v in state.items()}, (x,))


def _gradcheck_layer(layer, x, inverse):
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def fn(x_, *ps):
        return _call(layer, dict(zip(names, ps)), "inverse" if inverse else "forward", x_)

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), *params), fast_mode=True)


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("kind", ["ActNorm", "InvConv2dLU", "InvConv2d"])
def test_gradcheck_layers_every_parameter(backend, kind, inverse):
    layer = _perturb(getattr(ff, kind)(3).double().to(DEVICE))
    if kind == "ActNorm":
        layer.initialized.fill_(1)
        layer._initialized = True
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64, device=DEVICE)
    _gradcheck_layer(layer, x, inverse)


# --------------------------------------------------------------------------------------
# The cache is never stale: each case against an uncached computation
# --------------------------------------------------------------------------------------


def _check_fresh(layer, x):
    """The layer's no-grad forward and inverse equal the uncached float64 assembly."""
    weight, weight_inv = _lu_matrices(layer)
    with torch.no_grad():
        y, ld = layer(x)
        back = layer.reverse(x)
    assert_close(y, reference.channel_mix(x.double(), weight), x.dtype)
    assert_close(back, reference.channel_mix(x.double(), weight_inv), x.dtype)
    assert_close(ld, (x.shape[2] * x.shape[3] * layer.w_s.detach().double().sum()).expand(x.shape[0]), x.dtype)


def _cached(layer, x):
    """A no-grad call each way (where a cache, if there were one, would be filled)."""
    with torch.no_grad():
        layer(x)
        layer.reverse(x)


def test_cache_optimizer_step(backend):
    layer = ff.InvConv2dLU(4).to(DEVICE)
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    _cached(layer, x)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    y, ld = layer(x)
    (y.square().sum() - ld.sum()).backward()
    opt.step()
    _check_fresh(layer, x)


def test_cache_gradient_accumulation_over_two_forwards(backend):
    layer = ff.InvConv2dLU(4).to(DEVICE)
    twin = copy.deepcopy(layer)
    x1, x2 = torch.randn(2, 4, 3, 3, device=DEVICE), torch.randn(2, 4, 3, 3, device=DEVICE)
    _cached(layer, x1)
    for x in (x1, x2):  # accumulate, with a cached no-grad call in between
        y, ld = layer(x)
        (y.square().sum() - ld.sum()).backward()
        _cached(layer, x)
    # uncached twin: the plain float64 assembly and the reference 1x1 convolution
    for x in (x1, x2):
        d = torch.float64
        w = reference.lu_weight(twin.w_p.to(d), twin.w_l.to(d), twin.w_u.to(d), twin.w_s.to(d), twin.s_sign.to(d))
        y = reference.channel_mix(x, w)
        (y.square().sum() - 9 * twin.w_s.sum() * 2).backward()
    for p, q in zip(layer.parameters(), twin.parameters()):
        assert_close(p.grad, q.grad.double(), torch.float32, rtol=1e-4, atol=1e-4)
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    _check_fresh(layer, x1)


def test_cache_load_state_dict(backend):
    layer = ff.InvConv2dLU(4).to(DEVICE)
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    _cached(layer, x)
    other = _perturb(ff.InvConv2dLU(4).to(DEVICE))
    layer.load_state_dict(other.state_dict())
    _check_fresh(layer, x)


def test_cache_to_dtype(backend):
    layer = ff.InvConv2dLU(4).to(DEVICE)
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    _cached(layer, x)
    layer.double()
    _check_fresh(layer, x.double())
    with torch.no_grad():
        layer.w_s.add_(0.25)
    layer.float()
    _check_fresh(layer, x)


def test_cache_to_device():
    """A move to another device misses the cache (to "meta" where no GPU is present)."""
    layer = ff.InvConv2dLU(4)
    x = torch.randn(2, 4, 3, 3)
    _cached(layer, x)
    target = "cuda" if torch.cuda.is_available() else "meta"
    layer.to(target)
    with torch.no_grad():
        w, _ = layer.weight_and_logdet(False)
        w_inv, _ = layer.weight_and_logdet(True)
    assert w.device.type == target and w_inv.device.type == target
    if target == "cuda":
        _check_fresh(layer, x.to(target))


class _Method(torch.nn.Module):
    """Calls ``m.<method>``: ``torch.func.functional_call`` runs a module's forward only."""

    def __init__(self, m, method):
        super().__init__()
        self.m, self.method = m, method

    def forward(self, *args):
        return getattr(self.m, self.method)(*args)


def _call_with(module, method, state, *args):
    """``module.<method>(*args)`` with ``state`` swapped in by ``torch.func.functional_call``."""
    return torch.func.functional_call(_Method(module, method),
                                      {f"m.{k}": v for k, v in state.items()}, args)


def test_functional_call_with_another_layers_state_dict(backend):
    """``w_rows`` (the row gather of ``w_p``) is not in the state dict: with another
    layer's state dict swapped in by ``torch.func.functional_call`` the layer used its own
    permutation's rows with the other's ``w_p`` and factors, a wrong W."""
    torch.manual_seed(0)
    layer, other = ff.InvConv2dLU(6).to(DEVICE), _perturb(ff.InvConv2dLU(6).to(DEVICE))
    assert not torch.equal(layer.w_p, other.w_p)
    x = torch.randn(2, 6, 3, 3, device=DEVICE)
    for method in ("forward", "inverse"):
        want = getattr(other, method)(x)
        got = _call_with(layer, method, other.state_dict(), x)
        assert_close(got[0], want[0], torch.float32)
        assert_close(got[1], want[1], torch.float32)
    w, w_inv = _lu_matrices(layer)  # the layer itself still uses its own
    assert_close(layer(x)[0], reference.channel_mix(x.double(), w), torch.float32)
    assert_close(layer.reverse(x), reference.channel_mix(x.double(), w_inv), torch.float32)
    # copies, moves and loads keep using the buffer (no argmax per call)
    loaded = ff.InvConv2dLU(6).to(DEVICE)
    loaded.load_state_dict(other.state_dict(), assign=True)
    for twin in (copy.deepcopy(layer), layer.double(), loaded):
        assert twin.rows() is twin.w_rows
    assert torch.equal(loaded.w_rows, other.w_rows)


def test_glow_functional_call_with_another_models_state_dict():
    """The same through a Glow: the stacked assembly of a block's steps (forward) and the
    batched inverses (sampling) read each layer's rows too."""
    torch.manual_seed(0)
    mine, other = ff.Glow(2, 4, 2, filter_size=8), ff.Glow(2, 4, 2, filter_size=8)
    x = torch.randn(3, 2, 8, 8)
    mine(x)
    other(x)
    _perturb(other, 0.02)
    mine.eval()
    other.eval()
    want = other(x)
    got = torch.func.functional_call(mine, other.state_dict(), (x,))
    assert_close(got[0], want[0], torch.float32)
    assert_close(got[1], want[1], torch.float32)
    z = [0.5 * t for t in want[2]]
    assert_close(_call_with(mine, "reverse", other.state_dict(), z), other.reverse(z),
                 torch.float32)


def test_cache_deepcopy(backend):
    layer = ff.InvConv2dLU(4).to(DEVICE)
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    _cached(layer, x)
    twin = _perturb(copy.deepcopy(layer))
    _check_fresh(twin, x)
    _check_fresh(layer, x)


def test_cache_inplace_edit_under_no_grad(backend):
    layer = ff.InvConv2dLU(4).to(DEVICE)
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    for name in ("w_l", "w_s", "w_u"):
        _cached(layer, x)
        with torch.no_grad():
            getattr(layer, name).mul_(1.5)
        _check_fresh(layer, x)


def test_sampling_assembles_the_inverse_on_every_call(backend, monkeypatch):
    """No cache: every reverse call assembles W^-1 from the parameters as they are."""
    layer = ff.InvConv2dLU(4).to(DEVICE).eval()
    calls = {"inverse": 0}
    original = layer._assemble

    def counting(inverse):
        calls["inverse"] += int(inverse)
        return original(inverse)

    monkeypatch.setattr(layer, "_assemble", counting)
    z = torch.randn(2, 4, 3, 3, device=DEVICE)
    with torch.no_grad():
        first = layer.reverse(z)
        second = layer.reverse(z)
    assert calls["inverse"] == 2
    assert torch.equal(first, second)


def test_cache_plain_invconv_logdet(backend):
    layer = ff.InvConv2d(4).to(DEVICE)
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    with torch.no_grad():
        ld1 = layer.weight_and_logdet(False)[1]
        layer.weight.mul_(2.0)  # log|det| grows by 4 log 2
        y, ld = layer(x)
        back = layer.reverse(y)
    assert_close(ld, (9 * (ld1 + 4 * torch.log(torch.tensor(2.0, dtype=torch.float64)))).expand(2), torch.float32)
    assert_close(ld, 9 * torch.linalg.slogdet(layer.weight.detach().double().reshape(4, 4))[1].expand(2),
                 torch.float32)
    assert_close(back, x.double(), torch.float32, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# FlowStep
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv_lu", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_flowstep_equals_parts_one_by_one(backend, conv_lu, affine):
    step = ff.FlowStep(5, filter_size=8, affine=affine, conv_lu=conv_lu).double().to(DEVICE)
    _perturb(step, 0.05)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y, logdet = step(x)  # first call: ActNorm initialises from x
    assert step.actnorm._initialized
    x_ = x.detach().clone().requires_grad_()
    a, ld1 = step.actnorm(x_)
    b, ld2 = step.invconv(a)
    c, ld3 = step.coupling(b)
    assert_close(y, c, torch.float64)
    assert_close(logdet, ld1 + ld2 + ld3, torch.float64)
    g = torch.randn_like(y)
    params = list(step.parameters())
    got = torch.autograd.grad((y * g).sum() + logdet.sum(), [x, *params], allow_unused=True)
    want = torch.autograd.grad((c * g).sum() + (ld1 + ld2 + ld3).sum(), [x_, *params], allow_unused=True)
    for p, q in zip(got, want):
        if q is None:
            assert p is None or torch.count_nonzero(p) == 0
        else:
            assert_close(p, q, torch.float64, rtol=1e-8, atol=1e-8)
    with torch.no_grad():
        back, ld_inv = step.inverse(y)
        parts = step.actnorm.reverse(step.invconv.reverse(step.coupling.reverse(y)))
    assert_close(back, x.detach(), torch.float64, rtol=1e-8, atol=1e-8)
    assert_close(parts, back, torch.float64, rtol=1e-10, atol=1e-10)
    assert_close(ld_inv, -logdet.detach(), torch.float64, rtol=1e-10, atol=1e-10)
    assert torch.equal(step.reverse(y.detach()), back)


def test_flowstep_float32_channels_last(backend):
    step = ff.FlowStep(4, filter_size=8).to(DEVICE)
    x = torch.randn(2, 4, 4, 4, device=DEVICE).contiguous(memory_format=torch.channels_last)
    y, logdet = step(x)
    assert y.shape == x.shape and logdet.shape == (2,)
    assert_close(step.reverse(y.detach()), x.double(), torch.float32, rtol=1e-4, atol=1e-4)


def test_flowstep_launches_read_float32_matrices(monkeypatch):
    """Training and sampling a float32 FlowStep (W and W^-1 assembled in float64): every
    channel-mix launch reads its matrix in float32, W.float() / W^-1.float(); the training
    step (forward and backward) casts no (C, C) matrix on the Triton path (the one
    lu_weight launch writes W in float32); the LU parameters' gradients match the
    reference path's."""
    from fastflow.kernels import channel_mix as cm

    mats = []
    for name, pos in (("mix", 1), ("mix_param_grads", 2)):
        def wrapped(*args, _orig=getattr(cm, name), _pos=pos, **kwargs):
            if args[_pos] is not None:
                mats.append(args[_pos].detach().clone())
            return _orig(*args, **kwargs)

        monkeypatch.setattr(cm, name, wrapped)
    c = 6
    step = _perturb(ff.FlowStep(c, filter_size=8).to(DEVICE), 0.05)
    step.actnorm.initialize(torch.randn(2, c, 3, 4, device=DEVICE))
    x = torch.randn(2, c, 3, 4, device=DEVICE)
    w, w_inv = _lu_matrices(step.invconv)
    grads, casts = {}, {}
    for backend in ("triton", "reference"):
        step.zero_grad()
        count = CastCounter(lambda t: t.shape == (c, c))
        with ff.use_backend(backend):
            with count:
                y, logdet = step(x)
                ((y * y).sum() + logdet.sum()).backward()
            with torch.no_grad():
                step.reverse(y.detach())
        casts[backend] = count.casts
        inv = step.invconv
        grads[backend] = [p.grad.clone() for p in (inv.w_l, inv.w_u, inv.w_s)]
    assert casts["triton"] == []
    # forward mix, backward mix + parameter gradients, the inverse mix of sampling
    assert [m.dtype for m in mats] == [torch.float32] * 4
    for m in mats[:3]:
        assert torch.equal(m.reshape(c, c), w.float())
    assert torch.equal(mats[3].reshape(c, c), w_inv.float())
    for got, want in zip(grads["triton"], grads["reference"]):
        assert got.dtype == torch.float32
        assert_close(got, want.double(), torch.float32, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_flowstep_lu_weight_written_in_the_compute_dtype(dtype):
    """The training forward's lu_weight launch writes W in x's compute dtype (float64 for
    float64 x), equal to the float64 W rounded once; without ``for_mix`` it stays float64."""
    layer = _perturb(ff.InvConv2dLU(5).to(DEVICE), 0.05)
    x = torch.randn(2, 5, 3, 4, device=DEVICE).to(dtype)
    w = _lu_matrices(layer)[0]
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    with ff.use_backend("triton"):
        got, ld = layer.matrix_and_logdet(x, for_mix=True)
        plain, ld_plain = layer.matrix_and_logdet(x)
    assert got.dtype == cd and plain.dtype == torch.float64
    # bitwise against the launch's own float64 W; against the reference's matmul only within
    # float64 rounding (the kernel's sum order is not cuBLAS's or the CPU BLAS's FMAs)
    assert torch.equal(got, plain.to(cd)) and torch.equal(ld, ld_plain)
    assert_close(plain, w, torch.float64)


def test_flowstep_train_step_ops_and_launches():
    """ATen ops + Triton launches of a float32 FlowStep's forward + backward on the Triton
    path (benchmarks/suite_channel_mix.py's figure): 56 (48 ATen ops + 8 launches), no
    (C, C) cast among them."""
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench)
    try:
        import harness
        import suite_channel_mix
    finally:
        sys.path.remove(bench)
    torch.manual_seed(0)
    n, c, s = 2, 12, 8
    step = ff.FlowStep(c, filter_size=32)
    step.actnorm.initialize(torch.randn(n, c, s, s))
    x = torch.randn(n, c, s, s, requires_grad=True)
    with ff.use_backend("triton"):
        got = harness.count_ops(suite_channel_mix._fused_flowstep(step), x,
                                *[p.detach().clone().requires_grad_() for p in step.parameters()])
    assert "_to_copy" not in got["ops"], got["ops"]
    assert got["triton_launches"] == 8 and got["total"] <= 56, got


@pytest.mark.parametrize("kind", ["ActNorm", "InvConv2dLU", "InvConv2d", "FlowStep"])
def test_layer_bad_inputs(kind):
    layer = getattr(ff, kind)(4)
    with pytest.raises(ValueError, match=r"^x: expected 4 channels.*\(2, 3, 5, 5\)"):
        layer(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"^x: expected a 4-D tensor.*\(2, 4, 5\)"):
        layer(torch.randn(2, 4, 5))
    with pytest.raises(TypeError, match=r"^x: expected a floating-point tensor.*int64"):
        layer(torch.ones(2, 4, 5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^y: expected 4 channels"):
        layer.reverse(torch.randn(2, 5, 5, 5))
    with pytest.raises(ValueError, match=r"^in_channel: expected a positive"):
        getattr(ff, kind)(0)


@pytest.mark.parametrize("make, name", [
    (lambda v: ff.ActNorm(4, logdet=v), "logdet"),
    (lambda v: ff.AffineCoupling(4, filter_size=8, affine=v), "affine"),
    (lambda v: ff.FlowStep(4, filter_size=8, affine=v), "affine"),
    (lambda v: ff.FlowStep(4, filter_size=8, conv_lu=v), "conv_lu"),
    (lambda v: ff.GaussianReparam(sample_in_eval=v), "sample_in_eval"),
    (lambda v: ff.Glow(1, 1, 1, filter_size=8, conv_lu=v), "conv_lu"),
], ids=["actnorm", "coupling", "flowstep-affine", "flowstep-conv_lu", "gaussian", "glow"])
def test_layer_flags_must_be_bools(make, name):
    """A flag passed as the string "False" (a config file, a command line) used to be taken
    as true: affine=\"False\" built an affine coupling, logdet=\"False\" kept the log-det.
    Refused by name, as the ops' flags are."""
    with pytest.raises(TypeError, match=rf"^{name}: expected a bool \(True or False\), got 'False'"):
        make("False")
    make(False)  # the real flag is accepted


def test_inverse_matrices_refuses_a_non_floating_dtype():
    """torch.int64 used to give all-zero integer "inverses" (the float64 W^-1 truncated)."""
    steps = [ff.FlowStep(4, filter_size=8) for _ in range(2)]
    with pytest.raises(TypeError, match=r"^dtype: expected float16, bfloat16, float32 or float64"):
        ff.FlowStep.inverse_matrices(steps, torch.int64)
    with pytest.raises(TypeError, match="dtype: expected float16, bfloat16, float32 or float64"):
        ff.FlowStep.inverse_matrices(steps, torch.float8_e4m3fn)  # not one of DESIGN.md's four
    (w_inv, _) = ff.FlowStep.inverse_matrices(steps, torch.float64)
    torch.testing.assert_close(w_inv @ steps[0].invconv.matrix().double(),
                               torch.eye(4, dtype=torch.float64))


def test_weight_and_logdet_sums_in_float64_like_the_matrix():
    """InvConv2dLU.weight_and_logdet() gives W in float64; its log|det W| came in the
    parameters' dtype (a bfloat16 layer's sum rounded to 8 bits), unlike InvConv2d's."""
    layer = ff.InvConv2dLU(48).to(torch.bfloat16)
    with torch.no_grad():
        layer.w_s.normal_()
    w, ld = layer.weight_and_logdet()
    assert w.dtype == ld.dtype == torch.float64
    assert ld.item() == layer.w_s.double().sum().item()
    torch.testing.assert_close(ld, torch.linalg.slogdet(w)[1], rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("make, name", [
    (lambda v: ff.ActNorm(v), "in_channel"),
    (lambda v: ff.InvConv2dLU(v), "in_channel"),
    (lambda v: ff.InvConv2d(v), "in_channel"),
    (lambda v: ff.AffineCoupling(v, filter_size=8), "in_channel"),
    (lambda v: ff.AffineCoupling(4, filter_size=v), "filter_size"),
    (lambda v: ff.FlowStep(v, filter_size=8), "in_channel"),
    (lambda v: ff.FlowStep(4, filter_size=v), "filter_size"),
], ids=["actnorm", "lu", "invconv", "coupling", "coupling-width", "flowstep", "flowstep-width"])
def test_layer_sizes_are_checked_by_name(make, name):
    """A size given as True, 4.0 or "4" failed inside torch (``randn() received an invalid
    combination of arguments``, ``'<' not supported between 'str' and 'int'``) or, for
    ActNorm(True), built a 1-channel layer; filter_size=0 built a network of width 0. Each
    is now refused naming the argument; numpy integers are sizes like ints."""
    import numpy as np

    for bad in (True, 4.0, "4"):
        with pytest.raises(TypeError, match=rf"^{name}: expected .*\(an integer\), got {bad!r}"):
            make(bad)
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        make(0)
    make(np.int64(4))


@pytest.mark.parametrize("how", ["to_empty", "assign"])
def test_an_actnorm_with_a_new_flag_tensor_still_initialises(how):
    """The host-side mirror records which ``initialized`` tensor it describes, and a new
    tensor put there by the layer's own ``_apply`` (``to_empty`` after building on the meta
    device) or ``load_state_dict(assign=True)`` is still its own: an uninitialised layer
    must initialise from its first training batch (a stale record reads as a swapped-in
    flag, the caller's state, and the layer never initialises)."""
    torch.manual_seed(0)
    if how == "to_empty":
        with torch.device("meta"):
            an = ff.ActNorm(4)
        an = an.to_empty(device="cpu")
        with torch.no_grad():  # (to_empty leaves the memory as it was)
            an.initialized.zero_()
            an.loc.zero_()
            an.scale.fill_(1.0)
    else:
        an = ff.ActNorm(4)
        an.load_state_dict(ff.ActNorm(4).state_dict(), assign=True)
    assert not an.is_initialized()
    x = 3 * torch.randn(8, 4, 5, 5) + 2
    y, _ = an(x)
    assert an.is_initialized() and bool(an.initialized)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3)), torch.ones(4), atol=1e-2, rtol=0)


def test_invconv_lu_load_state_dict_updates_w_rows_in_place():
    """On the same device the load hook copies the new permutation's rows into the
    existing ``w_rows`` buffer (a captured CUDA graph reads that tensor), not a new one."""
    torch.manual_seed(0)
    layer, other = ff.InvConv2dLU(6), ff.InvConv2dLU(6)
    rows = layer.w_rows
    assert not torch.equal(rows, other.w_rows)
    layer.load_state_dict(other.state_dict())
    assert layer.w_rows is rows
    torch.testing.assert_close(layer.w_rows, other.w_rows, rtol=0, atol=0)


def test_actnorm_initialised_from_one_value_per_channel_warns():
    """Batch 1 at 1x1 (a Glow's last level for images 2**n_block wide): each channel's std
    is 0 and the scale 1e6, without a word; the next batch's bits/dim read 1e24."""
    import warnings

    an = ff.ActNorm(3)
    with pytest.warns(UserWarning, match=r"one value per channel \(x of shape \(1, 3, 1, 1\)\)"):
        an(torch.randn(1, 3, 1, 1))
    assert an.is_initialized()
    for shape in ((2, 3, 1, 1), (1, 3, 2, 1)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ff.ActNorm(3)(torch.randn(*shape))


def test_layers_show_their_arguments_when_printed():
    """``print(model)`` showed ``ActNorm()``, ``InvConv2dLU()`` and ``AffineCoupling(...)``
    with no channel count or coupling kind (GaussianReparam shows its arguments)."""
    assert repr(ff.ActNorm(3)) == "ActNorm(in_channel=3)"
    assert repr(ff.ActNorm(3, logdet=False)) == "ActNorm(in_channel=3, logdet=False)"
    assert repr(ff.InvConv2dLU(3)) == "InvConv2dLU(in_channel=3)"
    assert repr(ff.InvConv2d(3)) == "InvConv2d(in_channel=3)"
    text = repr(ff.FlowStep(5, filter_size=4, affine=False))
    assert "AffineCoupling(\n    in_channel=5, affine=False\n" in text
