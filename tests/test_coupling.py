"""Affine / additive coupling: every variant and dtype against the float64 reference, on the
Triton kernels (interpreted on CPU) and the reference backend."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastflow as ff
from fastflow import reference
from fastflow.ops import coupling as ops

from conftest import DEVICE, FLOAT_DTYPES, assert_close

VARIANTS = list(itertools.product(reference.SCALES, reference.LAYOUTS, reference.SHIFTS))
SHAPES = [(1, 2, 1, 1), (3, 3, 7, 5), (2, 5, 37, 41), (1, 7, 13, 1), (2, 4, 1, 17), (5, 6, 3, 3)]


def make(shape, dtype=torch.float32, additive=False, scale_h=1.0):
    n, c, hh, ww = shape
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    hc = c // 2 if additive else 2 * (c // 2)
    h = (scale_h * torch.randn(n, hc, hh, ww, device=DEVICE)).to(dtype)
    return x, h


def ref64(x, h, reverse=False, **kw):
    """Reference in float64 with gradients: returns (y, logdet, x64, h64)."""
    x64 = x.detach().double().requires_grad_(True)
    h64 = h.detach().double().requires_grad_(True)
    if kw.get("scale") == "additive":
        y, ld = reference.additive_coupling(x64, h64, reverse=reverse)
    else:
        y, ld = reference.affine_coupling(x64, h64, reverse=reverse, **kw)
    return y, ld, x64, h64


def check_against_reference(x, h, reverse, **kw):
    dtype = x.dtype
    x = x.clone().requires_grad_(True)
    h = h.clone().requires_grad_(True)
    if kw.get("scale") == "additive":
        y, ld = ff.additive_coupling(x, h, reverse=reverse)
    else:
        y, ld = ff.affine_coupling(x, h, reverse=reverse, **kw)
    y_r, ld_r, x64, h64 = ref64(x, h, reverse, **kw)
    assert y.dtype == dtype and y.shape == x.shape
    assert ld.shape == (x.shape[0],)
    assert ld.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(y, y_r, dtype, msg=f"output {kw} reverse={reverse}")
    # the log-det sums C/2*H*W terms: its tolerance scales with them
    n_terms = h.shape[1] * h.shape[2] * h.shape[3]
    rtol = 1e-10 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(ld.double(), ld_r, rtol=rtol, atol=rtol * n_terms ** 0.5)
    gy = torch.randn_like(y)
    gld = torch.randn_like(ld)
    outs, grads = (y, ld), (gy, gld)
    outs_r, grads_r = (y_r, ld_r), (gy.double(), gld.double())
    if kw.get("scale") == "additive":
        outs, grads, outs_r, grads_r = (y,), (gy,), (y_r,), (gy.double(),)
    gx, gh = torch.autograd.grad(outs, (x, h), grads)
    gx_r, gh_r = torch.autograd.grad(outs_r, (x64, h64), grads_r)
    assert gx.dtype == dtype and gh.dtype == h.dtype
    assert_close(gx, gx_r, dtype, msg="grad x")
    assert_close(gh, gh_r, dtype, msg="grad h")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("scale,layout,shift", VARIANTS)
def test_every_variant_and_dtype_matches_reference(backend, dtype, scale, layout, shift):
    x, h = make((3, 5, 7, 5), dtype)
    for reverse in (False, True):
        check_against_reference(x, h, reverse, scale=scale, layout=layout, shift=shift)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_additive_matches_reference(backend, dtype):
    x, h = make((2, 5, 7, 3), dtype, additive=True)
    for reverse in (False, True):
        check_against_reference(x, h, reverse, scale="additive")
        _, ld = ff.additive_coupling(x, h, reverse=reverse)
        assert torch.equal(ld, torch.zeros_like(ld))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes_match_reference(backend, shape):
    x, h = make(shape)
    for reverse in (False, True):
        check_against_reference(x, h, reverse, scale="sigmoid", layout="halves", shift="before")


def test_large_raw_values_are_stable(backend):
    """Saturated sigmoid and atan scales: no NaN, still equal to the reference."""
    x, h = make((2, 4, 5, 7), scale_h=30.0)
    for scale in ("sigmoid", "atan"):
        for reverse in (False, True):
            check_against_reference(x, h, reverse, scale=scale, layout="halves", shift="before")


@pytest.mark.parametrize("scale,layout,shift", VARIANTS + [("additive", "halves", "before")])
def test_backward_from_output_equals_backward_from_input(backend, scale, layout, shift):
    x, h = make((2, 5, 6, 7), torch.float64, additive=scale == "additive")
    for reverse in (False, True):
        op = ops.coupling_inverse if reverse else ops.coupling_forward
        y, ld = op(x, h, scale, layout, shift, 2.0)
        gy, gld = torch.randn_like(y), torch.randn_like(ld)
        from_in = ops.coupling_backward(gy, gld, x, h, scale, layout, shift, 2.0, reverse, False)
        from_out = ops.coupling_backward(gy, gld, y, h, scale, layout, shift, 2.0, reverse, True)
        for a, b in zip(from_in, from_out):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale,layout,shift", VARIANTS)
def test_inverse_of_forward_recovers_x(backend, scale, layout, shift):
    x, h = make((3, 7, 9, 11))
    y, ld = ff.affine_coupling(x, h, scale=scale, layout=layout, shift=shift)
    x2, ld_inv = ff.affine_coupling(y, h, scale=scale, layout=layout, shift=shift, reverse=True)
    rel = ((x2 - x).abs() / x.abs().clamp_min(1.0)).max().item()
    assert rel < 1e-5
    torch.testing.assert_close(ld_inv, -ld, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("scale,shift", [("sigmoid", "before"), ("exp", "after"),
                                         ("atan", "negated"), ("atan", "after")])
@pytest.mark.parametrize("layout", reference.LAYOUTS)
def test_gradcheck_float64(backend, scale, layout, shift):
    x, h = make((2, 3, 1, 2), torch.float64)
    x.requires_grad_(True)
    h.requires_grad_(True)
    for reverse in (False, True):
        f = lambda a, b: ff.affine_coupling(a, b, scale=scale, layout=layout,  # noqa: E731
                                            shift=shift, reverse=reverse)
        assert torch.autograd.gradcheck(f, (x, h))


def test_gradcheck_additive_float64(backend):
    x, h = make((2, 5, 1, 2), torch.float64, additive=True)
    x.requires_grad_(True)
    h.requires_grad_(True)
    for reverse in (False, True):
        assert torch.autograd.gradcheck(lambda a, b: ff.additive_coupling(a, b, reverse=reverse)[0], (x, h))


def test_two_runs_are_bitwise_equal(backend):
    """Several tiles per sample: the log-det partials are added in a fixed order."""
    x, h = make((2, 48, 32, 32))
    runs = []
    for _ in range(2):
        xg, hg = x.clone().requires_grad_(True), h.clone().requires_grad_(True)
        y, ld = ff.affine_coupling(xg, hg)
        (y.square().sum() + ld.sum()).backward()
        runs.append((y, ld, xg.grad, hg.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _layouts(t):
    """The same values as ``t`` in other memory layouts."""
    yield "channels_last", t.contiguous(memory_format=torch.channels_last)
    wide = torch.randn(t.shape[0], t.shape[1] + 3, t.shape[2], t.shape[3] * 2, dtype=t.dtype, device=t.device)
    view = wide[:, 1:1 + t.shape[1], :, ::2]
    view.copy_(t)
    yield "strided", view
    yield "transposed", t.transpose(2, 3).contiguous().transpose(2, 3)


@pytest.mark.parametrize("scale,layout,shift", [("sigmoid", "halves", "before"),
                                                ("exp", "interleaved", "negated")])
def test_noncontiguous_and_channels_last_inputs(backend, scale, layout, shift):
    x, h = make((2, 5, 6, 7))
    kw = dict(scale=scale, layout=layout, shift=shift)
    y0, ld0 = ff.affine_coupling(x, h, **kw)
    for (name_x, xv), (name_h, hv) in zip(_layouts(x), _layouts(h)):
        y, ld = ff.affine_coupling(xv, hv, **kw)
        torch.testing.assert_close(y, y0, rtol=1e-6, atol=1e-6, msg=f"{name_x}")
        torch.testing.assert_close(ld, ld0, rtol=1e-6, atol=1e-5)
        if name_x == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
        xg, hg = xv.detach().requires_grad_(True), hv.detach().requires_grad_(True)
        (ff.affine_coupling(xg, hg, **kw)[0] * 1.5).sum().backward()
        xr, hr = x.clone().requires_grad_(True), h.clone().requires_grad_(True)
        (ff.affine_coupling(xr, hr, **kw)[0] * 1.5).sum().backward()
        torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(hg.grad, hr.grad, rtol=1e-6, atol=1e-6)


def test_stride_zero_gradients(backend):
    """``.sum()`` sends back expanded (stride-0) gradients: they must not be read as dense."""
    x, h = make((3, 5, 4, 6))
    x.requires_grad_(True)
    h.requires_grad_(True)
    y, ld = ff.affine_coupling(x, h)
    gx, gh = torch.autograd.grad(y.sum() + ld.sum(), (x, h))
    y_r, ld_r, x64, h64 = ref64(x, h)
    gx_r, gh_r = torch.autograd.grad(y_r.sum() + ld_r.sum(), (x64, h64))
    assert_close(gx, gx_r)
    assert_close(gh, gh_r)


@pytest.mark.parametrize("reverse", [False, True])
def test_dense_gradient_at_batch_one_is_not_an_alias(backend, reverse):
    """Additive coupling at N=1: the reference vjp of h is a slice of the upstream gradient,
    which a custom op may not return as it is."""
    x, h = make((1, 2, 1, 1), additive=True)
    h.requires_grad_(True)
    y, _ = ff.additive_coupling(x, h, reverse=reverse)
    g = torch.randn_like(y)
    (gh,) = torch.autograd.grad(y, h, g)
    torch.testing.assert_close(gh, (-g if reverse else g)[:, 1:])


@pytest.mark.parametrize("scale", ["sigmoid", "additive"])
def test_opcheck(scale):
    """torch.library's own checks on the Triton path's custom ops: schema, fake (meta)
    implementation, autograd registration (the reference path is plain autograd, no op)."""
    x, h = make((2, 5, 3, 4), additive=scale == "additive")
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    h.requires_grad_(True)
    for op in (ops.coupling_forward, ops.coupling_inverse):
        torch.library.opcheck(op, (x, h, scale, "halves", "before", 2.0))
    y, ld = ops.coupling_forward(x, h, scale, "halves", "before", 2.0)
    args = (torch.randn_like(y), torch.randn_like(ld), x.detach(), h.detach(), scale, "halves",
            "before", 2.0, False, False)
    torch.library.opcheck(ops.coupling_backward_op, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_mixed_dtypes_h_bfloat16(backend):
    x, h = make((2, 4, 3, 5))
    h = h.to(torch.bfloat16)
    y, ld = ff.affine_coupling(x, h)
    y_r, ld_r, _, _ = ref64(x, h.float())
    assert y.dtype == torch.float32
    assert_close(y, y_r, torch.float32)


def test_empty_batch(backend):
    x, h = make((0, 4, 3, 3))
    y, ld = ff.affine_coupling(x, h)
    assert y.shape == x.shape and ld.shape == (0,)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(2, 9), hh=st.integers(1, 9), ww=st.integers(1, 9),
       variant=st.sampled_from(VARIANTS + [("additive", "halves", "before")]),
       dtype=st.sampled_from(FLOAT_DTYPES), reverse=st.booleans(),
       mode=st.sampled_from(["triton", "reference"]))
def test_property_random_shapes_variants_dtypes(n, c, hh, ww, variant, dtype, reverse, mode):
    scale, layout, shift = variant
    x, h = make((n, c, hh, ww), dtype, additive=scale == "additive")
    with ff.use_backend(mode):
        if scale == "additive":
            check_against_reference(x, h, reverse, scale="additive")
        else:
            check_against_reference(x, h, reverse, scale=scale, layout=layout, shift=shift)


# -- bad inputs ------------------------------------------------------------------------


@pytest.mark.parametrize("x_shape,h_shape,match", [
    ((2, 1, 4, 4), (2, 0, 4, 4), "x: expected at least 2 channels"),
    ((2, 4, 4, 4), (2, 3, 4, 4), r"h: expected shape \(2, 4, 4, 4\)"),
    ((2, 4, 4, 4), (3, 4, 4, 4), r"h: expected shape"),
    ((2, 4, 4, 4), (2, 4, 4, 5), r"h: expected shape"),
    ((2, 4, 4), (2, 4, 4), "x: expected a 4-D tensor"),
    ((2, 4, 4, 4), (2, 4, 16), "h: expected a 4-D tensor"),
])
def test_bad_shapes_raise(x_shape, h_shape, match):
    with pytest.raises(ValueError, match=match):
        ff.affine_coupling(torch.randn(x_shape), torch.randn(h_shape))


@pytest.mark.parametrize("scale,layout,shift", [("sigmoid", "halves", "before"),
                                                 ("atan", "interleaved", "after"),
                                                 ("exp", "halves", "negated"),
                                                 ("additive", "halves", "before")])
@pytest.mark.parametrize("reverse", [False, True])
def test_logdet_false_gives_the_same_y_and_gradients_and_no_logdet(backend, scale, layout,
                                                                    shift, reverse):
    """``logdet=False`` (sampling): y and its gradients as with the log-det, None for it."""
    additive = scale == "additive"
    x, h = make((3, 5, 7, 3), torch.float64, additive=additive)
    kw = {} if additive else dict(scale=scale, layout=layout, shift=shift)
    fn = ff.additive_coupling if additive else ff.affine_coupling
    outs = []
    for logdet in (True, False):
        xg, hg = x.clone().requires_grad_(True), h.clone().requires_grad_(True)
        y, ld = fn(xg, hg, reverse=reverse, logdet=logdet, **kw)
        assert (ld is None) != logdet
        gy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
        outs.append((y, *torch.autograd.grad(y, (xg, hg), gy, allow_unused=True)))
    y_r = ref64(x, h, reverse, **({"scale": "additive"} if additive else kw))[0]
    torch.testing.assert_close(outs[1][0], y_r, rtol=1e-12, atol=1e-12)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sampling_computes_no_logdet_on_the_reference_path():
    """The reference path with ``logdet=False`` runs no log and no sum (the layer's
    ``reverse`` asks for that): sampling drops the log-det, so nothing computes it."""
    from conftest import OpsCounter
    layer = ff.AffineCoupling(6, filter_size=8)
    with torch.no_grad():
        for p in layer.net[4].parameters():
            p.normal_(0, 0.1)
    y = torch.randn(2, 6, 4, 4)
    with ff.use_backend("reference"), torch.no_grad():
        with OpsCounter() as inv:
            x_inv, _ = layer.inverse(y)
        with OpsCounter() as rev:
            x_rev = layer.reverse(y)
    assert torch.equal(x_inv, x_rev)
    assert inv.count("log") == 1 and inv.count("sum") == 1
    assert rev.count("log") == 0 and rev.count("sum") == 0


def test_layer_reverse_runs_a_subclass_inverse():
    class Traced(ff.AffineCoupling):
        calls = 0

        def inverse(self, y):
            Traced.calls += 1
            return super().inverse(y)

    layer = Traced(4, filter_size=8)
    y = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(layer.reverse(y), layer.inverse(y)[0], rtol=0, atol=0)
    assert Traced.calls == 2


def test_layer_reverse_runs_an_instance_inverse():
    """An ``inverse`` set on the instance (a wrapper, as ``ff.patch`` sets on other
    libraries' modules) runs in ``reverse`` as a subclass's does."""
    layer = ff.AffineCoupling(4, filter_size=8)
    calls = []
    own = layer.inverse

    def traced(y):
        calls.append(y)
        x, ld = own(y)
        return 2 * x, ld

    layer.inverse = traced
    y = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(layer.reverse(y), 2 * own(y)[0], rtol=0, atol=0)
    assert len(calls) == 1


def test_bad_dtypes_devices_and_names_raise():
    x, h = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        ff.affine_coupling(x.to(torch.int32), h)
    with pytest.raises(TypeError, match="h: expected a floating-point tensor"):
        ff.affine_coupling(x, h.to(torch.int64))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        ff.affine_coupling(x.numpy(), h)
    with pytest.raises(ValueError, match="h: expected a tensor on x's device"):
        ff.affine_coupling(x, h.to("meta"))
    with pytest.raises(ValueError, match="scale: expected one of"):
        ff.affine_coupling(x, h, scale="tanh")
    with pytest.raises(ValueError, match="layout: expected one of"):
        ff.affine_coupling(x, h, layout="checkerboard")
    with pytest.raises(ValueError, match="shift: expected one of"):
        ff.affine_coupling(x, h, shift="sideways")
    with pytest.raises(ValueError, match="clamp: expected a finite positive number"):
        ff.affine_coupling(x, h, scale="atan", clamp=0.0)
    with pytest.raises(ValueError, match=r"h: expected shape \(2, 2, 3, 3\)"):
        ff.additive_coupling(x, h)
    for bad in (1, None, "no"):
        with pytest.raises(TypeError, match="logdet: expected a bool"):
            ff.affine_coupling(x, h, logdet=bad)
        with pytest.raises(TypeError, match="logdet: expected a bool"):
            ff.additive_coupling(x, h[:, :2], logdet=bad)


# -- the layer -------------------------------------------------------------------------


def rosinality_coupling(layer, x):
    """rosinality/glow-pytorch's AffineCoupling.forward, written out in plain PyTorch."""
    in_a, in_b = x.chunk(2, 1)
    if layer.affine:
        log_s, t = layer.net(in_a).chunk(2, 1)
        s = torch.sigmoid(log_s + 2)
        out_b = (in_b + t) * s
        logdet = torch.sum(torch.log(s).view(x.shape[0], -1), 1)
    else:
        out_b = in_b + layer.net(in_a)
        logdet = torch.zeros(x.shape[0])
    return torch.cat([in_a, out_b], 1), logdet


@pytest.mark.parametrize("affine", [True, False])
def test_layer_matches_rosinality_formulation(backend, affine):
    layer = ff.AffineCoupling(4, filter_size=16, affine=affine).double()
    with torch.no_grad():  # move the zero-initialised output layer away from zero
        for p in layer.net[4].parameters():
            p.normal_(0, 0.1)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    y, ld = layer(x)
    y_r, ld_r = rosinality_coupling(layer, x)
    torch.testing.assert_close(y, y_r)
    torch.testing.assert_close(ld, ld_r.double())
    x_back, ld_inv = layer.inverse(y)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(ld_inv, -ld)
    torch.testing.assert_close(layer.reverse(y), x)
    names = {k for k in layer.state_dict()}
    assert {"net.0.weight", "net.2.weight", "net.4.conv.weight", "net.4.scale"} <= names


def test_layer_odd_channels_and_bad_input(backend):
    layer = ff.AffineCoupling(5, filter_size=8)
    x = torch.randn(2, 5, 3, 3)
    y, ld = layer(x)
    assert y.shape == x.shape and torch.equal(y[:, :3], x[:, :3])
    with pytest.raises(ValueError, match=r"x: expected 5 channels, shape \(N, 5, H, W\)"):
        layer(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="in_channel: expected at least 2"):
        ff.AffineCoupling(1)
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        layer(torch.randint(0, 5, (2, 5, 3, 3)))
    with pytest.raises(TypeError, match="y: expected a floating-point tensor"):
        layer.inverse(torch.randint(0, 5, (2, 5, 3, 3)))


def test_layer_trains_through_the_fused_op(backend):
    layer = ff.AffineCoupling(4, filter_size=8)
    x = torch.randn(3, 4, 4, 4)
    y, ld = layer(x)
    (y.square().mean() - ld.mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert layer.net[4].conv.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_torch_compile_fullgraph_has_no_graph_break():
    """A model that calls the op compiles as one graph; results equal eager."""
    layer = ff.AffineCoupling(4, filter_size=8)
    with torch.no_grad():
        for p in layer.net[4].parameters():
            p.normal_(0, 0.1)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    with ff.use_backend("triton"):
        y0, ld0 = layer(x)
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True)
        y1, ld1 = compiled(x)
        (y1.sum() + ld1.sum()).backward()
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(ld1, ld0)
    assert x.grad is not None


def _free_gpu_bytes():
    return torch.cuda.mem_get_info()[0] if DEVICE == "cuda" else 0


@pytest.mark.skipif(_free_gpu_bytes() < 16 * 2**30, reason="needs a GPU with 16 GB free")
def test_more_than_2_31_elements_cuda():
    """64-bit offsets: one sample of more than 2^31 elements (float16, 4.3 GB per tensor)."""
    n, c, hh, ww = 1, 2, 32768, 32770
    x = torch.randn(n, c, hh, ww, device="cuda", dtype=torch.float16)
    assert x.numel() > 2**31
    h = torch.randn(n, 2, hh, ww, device="cuda", dtype=torch.float16)
    y, ld = ff.affine_coupling(x, h)
    for idx in [(0, 1, hh - 1, ww - 1), (0, 1, 0, 3), (0, 1, hh // 2, 7)]:
        s = torch.sigmoid(h[idx[0], 0, idx[2], idx[3]].float() + 2)
        want = (x[idx].float() + h[idx[0], 1, idx[2], idx[3]].float()) * s
        torch.testing.assert_close(y[idx].float(), want, rtol=2e-3, atol=2e-3)
    assert torch.equal(y[:, :1], x[:, :1])
    ld_r = sum(torch.nn.functional.logsigmoid(h[0, 0, r:r + 4096].double() + 2).sum()
               for r in range(0, hh, 4096))
    torch.testing.assert_close(ld[0].double(), ld_r, rtol=1e-5, atol=1.0)
