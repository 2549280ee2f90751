"""The fused ActNorm + 1x1 convolution op (``ff.channel_mix``, ``ff.actnorm_invconv``)
against the float64 reference, on both backends (Triton interpreted on CPU)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastflow as ff
from fastflow import reference

from conftest import DEVICE, FLOAT_DTYPES, CastCounter, assert_close

# (N, C, H, W): odd and prime sizes, N=1, C=1, C above one channel tile (37) and above two
# (70) with tiny H*W so the interpreter stays quick
SHAPES = [(1, 1, 3, 2), (2, 3, 5, 7), (3, 37, 2, 3), (1, 70, 1, 3), (2, 6, 1, 1)]
VARIANTS = ["actnorm+conv", "conv", "actnorm"]


def _params(c, dtype=torch.float64, co=None):
    co = co or c
    w = torch.randn(co, c, dtype=torch.float64, device=DEVICE) / c ** 0.5 + torch.eye(co, c, dtype=torch.float64, device=DEVICE)
    loc = torch.randn(1, c, 1, 1, dtype=dtype, device=DEVICE)
    scale = (torch.rand(1, c, 1, 1, dtype=dtype, device=DEVICE) + 0.5) * torch.where(
        torch.rand(1, c, 1, 1, device=DEVICE) < 0.3, -1.0, 1.0).to(dtype)
    return w, loc, scale


def _args(variant, w, loc, scale):
    return {"actnorm+conv": (w, loc, scale), "conv": (w, None, None), "actnorm": (None, loc, scale)}[variant]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_forward_and_reverse_match_reference(backend, shape, dtype):
    n, c, h, w_ = shape
    x = torch.randn(shape, dtype=torch.float64, device=DEVICE).to(dtype)
    w, loc, scale = _params(c)
    for variant in VARIANTS:
        a, l, s = _args(variant, w, loc, scale)
        for reverse in (False, True):
            out = ff.channel_mix(x, a, loc=l, scale=s, reverse=reverse)
            assert out.dtype == dtype and out.shape == shape
            expected = reference.actnorm_mix(x.double(), a, l, s, reverse=reverse)
            assert_close(out, expected, dtype, msg=f"{variant} reverse={reverse}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_actnorm_invconv_round_trip_and_logdet(backend, dtype):
    n, c, h, w_ = 2, 5, 3, 7
    x = torch.randn(n, c, h, w_, dtype=dtype, device=DEVICE)
    w, loc, scale = _params(c)
    w_ld = torch.linalg.slogdet(w)[1]
    y, ld = ff.actnorm_invconv(x, loc, scale, w, w_ld)
    x2, ld_inv = ff.actnorm_invconv(y, loc, scale, torch.linalg.inv(w), w_ld, reverse=True)
    assert_close(x2, x.double(), dtype)
    expected = h * w_ * (torch.log(scale.abs()).sum() + w_ld)
    assert ld.shape == (n,) and ld.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(ld, expected.expand(n), dtype)
    assert_close(ld_inv, -expected.expand(n), dtype)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 37, 2, 3), (1, 70, 1, 3), (1, 1, 2, 2)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_backward_matches_reference(backend, shape, dtype):
    c = shape[1]
    w, loc, scale = _params(c)
    g = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    for variant in VARIANTS:
        for reverse in (False, True):
            a, l, s = _args(variant, w, loc, scale)
            x = torch.randn(shape, dtype=dtype, device=DEVICE)
            leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, a, l, s)]
            out = ff.channel_mix(leaves[0], leaves[1], loc=leaves[2], scale=leaves[3], reverse=reverse)
            got = torch.autograd.grad(out, [t for t in leaves if t is not None], g.to(dtype))
            ref = [t.detach().double().requires_grad_() if t is not None else None for t in (x, a, l, s)]
            out_r = reference.actnorm_mix(ref[0], ref[1], ref[2], ref[3], reverse=reverse)
            want = torch.autograd.grad(out_r, [t for t in ref if t is not None], g)
            for gg, ww in zip(got, want):
                assert_close(gg, ww, dtype, msg=f"{variant} reverse={reverse}")


@pytest.mark.parametrize("shape", [(0, 3, 2, 2), (2, 3, 0, 2)], ids=str)
def test_empty_input_backward_gives_empty_gradients(backend, shape):
    """An input with no elements (N = 0 or H*W = 0) still gets its (empty) gradient, and
    the parameters theirs (zeros), as the float64 reference: not "not used in the graph"."""
    c = shape[1]
    w, loc, scale = _params(c)
    g = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    for variant in VARIANTS:
        for reverse in (False, True):
            a, l, s = _args(variant, w, loc, scale)
            x = torch.randn(shape, dtype=torch.float32, device=DEVICE)
            leaves = [t.detach().clone().requires_grad_() for t in (x, a, l, s) if t is not None]
            full = iter(leaves)
            args = [next(full) if t is not None else None for t in (x, a, l, s)]
            out = ff.channel_mix(args[0], args[1], loc=args[2], scale=args[3], reverse=reverse)
            got = torch.autograd.grad(out, leaves, g.float())
            ref = [t.detach().double().requires_grad_() for t in (x, a, l, s) if t is not None]
            full = iter(ref)
            rargs = [next(full) if t is not None else None for t in (x, a, l, s)]
            out_r = reference.actnorm_mix(rargs[0], rargs[1], rargs[2], rargs[3], reverse=reverse)
            want = torch.autograd.grad(out_r, ref, g, allow_unused=True)
            for gg, ww, leaf in zip(got, want, leaves):
                ww = torch.zeros_like(leaf, dtype=torch.float64) if ww is None else ww
                assert gg.shape == leaf.shape and gg.dtype == leaf.dtype
                assert_close(gg, ww, torch.float32, msg=f"{variant} reverse={reverse}")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck_float64(backend, variant, reverse):
    c = 3
    w, loc, scale = _params(c)
    x = torch.randn(1, c, 2, 3, dtype=torch.float64, device=DEVICE)
    args = [t.detach().clone().requires_grad_() for t in (x, *_args(variant, w, loc, scale)) if t is not None]

    def fn(*ts):
        it = iter(ts)
        x_ = next(it)
        full = [next(it) if t is not None else None for t in _args(variant, w, loc, scale)]
        return ff.channel_mix(x_, full[0], loc=full[1], scale=full[2], reverse=reverse)

    assert torch.autograd.gradcheck(fn, args, fast_mode=True)


def test_gradcheck_actnorm_invconv_logdet(backend):
    c = 3
    w, loc, scale = _params(c)
    x = torch.randn(1, c, 2, 2, dtype=torch.float64, device=DEVICE)
    args = [t.detach().clone().requires_grad_() for t in (x, loc, scale, w, torch.linalg.slogdet(w)[1])]
    for reverse in (False, True):
        assert torch.autograd.gradcheck(
            lambda *a: ff.actnorm_invconv(*a, reverse=reverse), args, fast_mode=True)


def test_stride0_grad_and_odd_layouts(backend):
    """channels_last, non-contiguous inputs and the stride-0 gradient of ``.sum()``."""
    n, c, h, w_ = 2, 5, 3, 4
    w, loc, scale = _params(c)
    x0 = torch.randn(n, c, h, w_, device=DEVICE)
    wide = torch.randn(n, c, h, 2 * w_, device=DEVICE)
    wide[..., ::2] = x0
    inputs = {
        "contiguous": x0,
        "channels_last": x0.contiguous(memory_format=torch.channels_last),
        "strided": wide[..., ::2],
        "permuted": x0.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2),
    }
    expected = reference.actnorm_mix(inputs["contiguous"].double(), w, loc, scale)
    grads = None
    for name, x in inputs.items():
        x = x.detach().requires_grad_()
        params = [t.detach().clone().requires_grad_() for t in (w, loc, scale)]
        out = ff.channel_mix(x, params[0], loc=params[1], scale=params[2])
        assert_close(out, expected, torch.float32, msg=name)
        if name == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)
        out.sum().backward()  # an expanded, stride-0 gradient
        now = [x.grad, *(p.grad for p in params)]
        if grads is None:
            ref = [t.detach().double().requires_grad_() for t in (inputs["contiguous"], w, loc, scale)]
            reference.actnorm_mix(*ref).sum().backward()
            for g_, r in zip(now, ref):
                assert_close(g_, r.grad, torch.float32, msg=name)
            grads = now
        else:
            for g_, r in zip(now, grads):
                assert_close(g_, r.double(), torch.float32, rtol=1e-5, atol=1e-5, msg=name)


def test_weight_layouts(backend):
    """A (Co, C, 1, 1) conv weight, a transposed view and a non-square weight."""
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    w = torch.randn(4, 4, device=DEVICE)
    expected = reference.channel_mix(x.double(), w.double())
    assert_close(ff.channel_mix(x, w[:, :, None, None]), expected, torch.float32)
    assert_close(ff.channel_mix(x, w.T.contiguous().T), expected, torch.float32)
    wide = torch.randn(6, 4, device=DEVICE)
    out = ff.channel_mix(x, wide)
    assert out.shape == (2, 6, 3, 3)
    assert_close(out, reference.channel_mix(x.double(), wide.double()), torch.float32)



def test_non_square_weight_keeps_channels_last(backend):
    """A (Co, C) weight with Co != C on a channels_last x: the output is channels_last on
    both backends, as the op's fake (torch.compile's) implementation says it is (the
    Triton launch used to allocate the (N, Co, H, W) output in NCHW)."""
    x = torch.randn(2, 3, 4, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w, loc, scale = _params(3, torch.float32, co=5)
    for args in ((w, None, None), (w, loc, scale)):
        out = ff.channel_mix(x, args[0], loc=args[1], scale=args[2])
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert_close(out, reference.actnorm_mix(x.double(), *args), torch.float32)
    if backend == "triton":
        from fastflow.ops.channel_mix import channel_mix_op
        torch.library.opcheck(channel_mix_op, (x, w, w.float(), None, None, False),
                              test_utils="test_faketensor")


@pytest.mark.parametrize("an", [False, True])
def test_transposed_weight_gradient_matches_the_fake(backend, an):
    """A transposed weight (torch.linalg.inv returns one): its gradient is right, and on the
    Triton path the backward op's output strides are those its fake implementation gives
    torch.compile (it allocated d weight contiguous, the fake like the weight: a compiled
    training step stopped with 'expected ... stride 4==1')."""
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    w0, loc, scale = _params(4, torch.float32)
    wt = w0.float().T.contiguous().T.requires_grad_()  # strides (1, 4)
    args = (loc, scale) if an else (None, None)
    out = ff.channel_mix(x, wt, loc=args[0], scale=args[1])
    g = torch.randn_like(out)
    out.backward(g)
    w64 = wt.detach().double().requires_grad_()
    reference.actnorm_mix(x.double(), w64, *args).backward(g.double())
    assert_close(wt.grad, w64.grad, torch.float32)
    if backend == "triton":
        from fastflow.ops.channel_mix import channel_mix_backward
        torch.library.opcheck(channel_mix_backward, (g, x, wt.detach(), *args, False, True,
                                                     torch.float32), test_utils="test_faketensor")

def test_bitwise_deterministic(backend):
    # enough pixels for several reduction chunks, summed in a fixed order
    x = torch.randn(3, 6, 9, 11, device=DEVICE)
    w, loc, scale = _params(6, torch.float32)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, loc, scale)]
        out = ff.channel_mix(leaves[0], leaves[1], loc=leaves[2], scale=leaves[3])
        out.backward(torch.cos(torch.arange(out.numel(), device=DEVICE, dtype=out.dtype)).reshape(out.shape))
        return [out.detach()] + [t.grad for t in leaves]

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("pdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reverse", [False, True])
def test_float64_activations_half_precision_parameters(backend, pdtype, reverse):
    """float64 x with a bf16/fp16 W, loc and scale: the gradients are computed in float64
    and rounded once into each parameter's dtype (the interpreter's direct float64 ->
    bfloat16 store wrote NaN and denormals)."""
    torch.manual_seed(3)
    c = 5
    x = torch.randn(2, c, 3, 4, dtype=torch.float64, device=DEVICE)
    w0 = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))[0].to(DEVICE)
    base = [w0, torch.randn(c, device=DEVICE), torch.rand(c, device=DEVICE) + 0.5]
    params = [t.to(pdtype).requires_grad_() for t in base]
    g = torch.randn(2, c, 3, 4, dtype=torch.float64, device=DEVICE)
    out = ff.channel_mix(x, params[0], loc=params[1], scale=params[2], reverse=reverse)
    got = torch.autograd.grad(out, params, g)
    ref = [t.detach().double().requires_grad_() for t in params]
    want = torch.autograd.grad(
        reference.actnorm_mix(x, ref[0], ref[1], ref[2], reverse=reverse), ref, g)
    for a, b in zip(got, want):
        assert a.dtype == pdtype and torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=2 * torch.finfo(pdtype).eps, atol=1e-3)


def test_bad_inputs():
    x = torch.randn(2, 3, 4, 4)
    w = torch.randn(3, 3)
    loc, scale = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match=r"^x: expected a 4-D tensor"):
        ff.channel_mix(torch.randn(3, 4, 4), w)
    with pytest.raises(TypeError, match=r"^x: expected a floating-point tensor.*int64"):
        ff.channel_mix(torch.ones(2, 3, 4, 4, dtype=torch.int64), w)
    with pytest.raises(TypeError, match=r"^x: expected a torch.Tensor, got list"):
        ff.channel_mix([1.0], w)
    with pytest.raises(ValueError, match=r"^weight: expected 3 input channels.*\(3, 5\)"):
        ff.channel_mix(x, torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"^weight: expected shape"):
        ff.channel_mix(x, torch.randn(3, 3, 3, 3))
    with pytest.raises(TypeError, match=r"^weight: expected a floating-point"):
        ff.channel_mix(x, torch.ones(3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^weight: expected a \(Co, C\) matrix"):
        ff.channel_mix(x)
    with pytest.raises(ValueError, match=r"^loc, scale: expected both or neither"):
        ff.channel_mix(x, w, loc=loc)
    with pytest.raises(ValueError, match=r"^scale: expected 3 values.*\(4,\)"):
        ff.channel_mix(x, w, loc=loc, scale=torch.ones(4))
    with pytest.raises(ValueError, match=r"^weight: expected a tensor on x's device"):
        ff.channel_mix(x, w.to("meta"))
    with pytest.raises(ValueError, match=r"^weight_logdet: expected a single value"):
        ff.actnorm_invconv(x, loc, scale, w, torch.zeros(2))
    with pytest.raises(ValueError, match=r"^loc: expected a tensor"):
        ff.actnorm_invconv(x, None, scale, w)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 20), h=st.integers(1, 5), w=st.integers(1, 5),
       seed=st.integers(0, 2 ** 16))
def test_property_round_trip_matches_reference(n, c, h, w, seed):
    torch.manual_seed(seed)
    x = torch.randn(n, c, h, w, dtype=torch.float64, device=DEVICE)
    a, loc, scale = _params(c)
    with ff.use_backend("triton"):
        y = ff.channel_mix(x, a, loc=loc, scale=scale)
        back = ff.channel_mix(y, torch.linalg.inv(a), loc=loc, scale=scale, reverse=True)
    assert_close(y, reference.actnorm_mix(x, a, loc, scale), torch.float64)
    assert_close(back, x, torch.float64, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("reverse", [False, True])
def test_single_pixel_single_sample_backward(backend, reverse):
    """N = H = W = 1: gradients of loc / scale have the gradient's own shape (no aliasing)."""
    w, loc, scale = _params(4)
    x = torch.randn(1, 4, 1, 1, dtype=torch.float64, device=DEVICE)
    g = torch.randn(1, 4, 1, 1, dtype=torch.float64, device=DEVICE)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, loc, scale)]
    ff.channel_mix(leaves[0], leaves[1], loc=leaves[2], scale=leaves[3], reverse=reverse).backward(g)
    ref = [t.detach().clone().requires_grad_() for t in (x, w, loc, scale)]
    reference.actnorm_mix(*ref, reverse=reverse).backward(g)
    for a, b in zip(leaves, ref):
        assert_close(a.grad, b.grad, torch.float64)


def _record_matrices(monkeypatch):
    """Wraps the channel-mix launchers: every (launcher, matrix) they are handed."""
    from fastflow.kernels import channel_mix as cm

    seen = []
    for name in ("mix", "mix_param_grads"):
        def wrapped(*args, _orig=getattr(cm, name), _name=name, **kwargs):
            seen.append((_name, args[2] if _name == "mix_param_grads" else args[1]))
            return _orig(*args, **kwargs)

        monkeypatch.setattr(cm, name, wrapped)
    return seen


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("reverse", [False, True])
def test_launches_read_the_matrix_in_the_compute_dtype(monkeypatch, dtype, reverse):
    """A float64 W (an LU layer's) reaches every launch in x's compute dtype, one copy that
    the forward and both backward launches share; W's gradient stays float64."""
    w, loc, scale = _params(5)
    x = torch.randn(2, 5, 3, 4, device=DEVICE).to(dtype)
    seen = _record_matrices(monkeypatch)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, loc, scale)]
    with ff.use_backend("triton"):
        out = ff.channel_mix(leaves[0], leaves[1], loc=leaves[2], scale=leaves[3], reverse=reverse)
    assert [name for name, _ in seen] == ["mix"]
    out.backward(torch.ones_like(out))
    assert [name for name, _ in seen] == ["mix", "mix", "mix_param_grads"]
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    for name, a in seen:
        assert a.dtype == cd and a.shape == w.shape, name
    assert seen[0][1] is seen[1][1] is seen[2][1]  # one cast per call, read by all three launches
    assert leaves[1].grad.dtype == torch.float64 and leaves[1].grad.shape == w.shape
    ref = [t.detach().double().requires_grad_() for t in (x, w, loc, scale)]
    reference.actnorm_mix(*ref, reverse=reverse).backward(torch.ones_like(out, dtype=torch.float64))
    assert_close(leaves[1].grad, ref[1].grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_matrix_cast_once_per_call(dtype):
    """One (C, C) cast of the float64 W per call, in forward, whatever the number of
    programs; none in backward (none at all when x is float64)."""
    w, loc, scale = _params(37)  # C above one channel tile: several programs read W
    x = torch.randn(2, 37, 5, 3, device=DEVICE).to(dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, loc, scale)]
    with ff.use_backend("triton"):
        ff.channel_mix(leaves[0], leaves[1], loc=leaves[2], scale=leaves[3])  # compile first
        fwd, bwd = (CastCounter(lambda t: t.shape == w.shape) for _ in range(2))
        with fwd:
            out = ff.channel_mix(leaves[0], leaves[1], loc=leaves[2], scale=leaves[3])
        g = torch.ones_like(out)
        with bwd:
            out.backward(g)
    want = [] if dtype == torch.float64 else [(torch.float64, torch.float32)]
    assert fwd.casts == want and bwd.casts == []
    assert leaves[1].grad.dtype == torch.float64
