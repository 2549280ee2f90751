"""Corner cases of the public ops and layers found by probing them as a user would: each
compared with the float64 reference or an independent computation."""

import pytest
import torch

import fastflow as ff
from fastflow import reference


@pytest.mark.parametrize("shape", [(4, 3, 2, 2), (1, 3, 1, 1)], ids=["constant", "one_value"])
def test_float16_actnorm_init_on_a_zero_std_channel_stays_finite(shape):
    """A float16 ActNorm initialised from a channel with std 0 (a constant channel, or a
    batch of one 1x1 image) gets 1 / (0 + 1e-6) = 1e6, which is inf in float16: the layer
    then gave NaN outputs and an inf log-det. The scale saturates at float16's largest
    finite value instead; the other channels get their usual 1 / (std + 1e-6)."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    x[:, 1] = 0.75
    an = ff.ActNorm(3).half()
    y, ld = an(x.half())
    big = torch.finfo(torch.float16).max
    assert torch.isfinite(an.scale).all() and an.scale[0, 1].item() == big
    assert torch.isfinite(y).all() and torch.isfinite(ld).all()
    assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1]))
    loc, scale = reference.actnorm_init(x.half().double())
    want = scale.clamp(max=big).to(torch.float16)
    torch.testing.assert_close(an.scale.detach().reshape(-1), want, rtol=0, atol=0)
    torch.testing.assert_close(an.loc.detach().reshape(-1), loc.half(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
def test_float64_actnorm_initialised_from_a_lower_precision_batch(x_dtype):
    """The float16 saturation clamped the (float32) initial values to float64's largest
    value, which float32 cannot hold: a float64 ActNorm's first call on a float32 or
    float16 batch raised 'value cannot be converted to type float without overflow'."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 2).to(x_dtype)
    an = ff.ActNorm(3).double()
    with ff.use_backend("reference"):
        an(x)
    loc, scale = reference.actnorm_init(x.double())
    torch.testing.assert_close(an.scale.detach().reshape(-1), scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(an.loc.detach().reshape(-1), loc, rtol=1e-6, atol=1e-7)


def test_vmap_over_a_non_leading_dimension_on_the_reference_path():
    """``torch.func.vmap(f, in_dims=1)`` hands each call a per-sample view that is not
    contiguous; asking it whether it is channels_last raised PyTorch's "NYI: querying
    is_contiguous inside of vmap". Each op now gives what a loop over the samples gives."""
    torch.manual_seed(0)
    d = dict(dtype=torch.float64)
    xs = torch.randn(2, 3, 4, 2, 3, **d)  # vmapped over dim 1: 3 calls on (2, 4, 2, 3)
    w, loc, scale = torch.randn(4, 4, **d), torch.randn(4, **d), torch.rand(4, **d) + 0.5
    cases = [
        (lambda a: ff.channel_mix(a, w, loc=loc, scale=scale),
         lambda a: reference.actnorm_mix(a, w, loc, scale)),
        (lambda a: ff.channel_mix(a, w, loc=loc, scale=scale, reverse=True),
         lambda a: reference.actnorm_mix(a, w, loc, scale, reverse=True)),
        (lambda a: ff.affine_coupling(a, 0.3 * a), lambda a: reference.affine_coupling(a, 0.3 * a)),
        (lambda a: ff.additive_coupling(a, a[:, :2]),
         lambda a: reference.additive_coupling(a, a[:, :2])),
        (lambda a: ff.reparameterize_kl(a, 0.5 * a, a),
         lambda a: reference.reparameterize_kl(a, 0.5 * a, a)),
    ]
    with ff.use_backend("reference"):
        for op, ref in cases:
            got = torch.func.vmap(op, in_dims=1)(xs)
            got = got if isinstance(got, tuple) else (got,)
            refs = [ref(xs[:, i]) for i in range(3)]
            refs = [r if isinstance(r, tuple) else (r,) for r in refs]
            want = [torch.stack(outs) for outs in zip(*refs)]
            assert len(got) == len(want)
            for g, wt in zip(got, want):
                torch.testing.assert_close(g, wt, rtol=1e-12, atol=1e-12)


def _forward_ad_cases():
    """(name, op, inputs) for each public op, on small float64 inputs."""
    d = dict(dtype=torch.float64)
    x, h = torch.randn(2, 4, 2, 2, **d), torch.randn(2, 4, 2, 2, **d)
    w, loc, scale = torch.randn(4, 4, **d), torch.randn(4, **d), torch.rand(4, **d) + 0.5
    c = 3
    lower, upper, log_s = torch.randn(c, c, **d), torch.randn(c, c, **d), torch.randn(c, **d)
    sign, rows = torch.tensor([1.0, -1.0, 1.0], **d), torch.tensor([2, 0, 1])
    tokens, tok_h = torch.randn(2, 3, 2, **d), torch.randn(2, 3, 4, **d)
    from fastflow.ops.lu_weight import lu_weight_logdet
    return [
        ("affine_coupling", lambda a, b: ff.affine_coupling(a, b), (x, h)),
        ("additive_coupling", lambda a, b: ff.additive_coupling(a, b)[0], (x, h[:, :2])),
        ("channel_mix", lambda a, b: ff.channel_mix(a, b, loc=loc, scale=scale), (x, w)),
        ("reparameterize_kl", lambda a, b: ff.reparameterize_kl(a, b, a), (x, h)),
        ("lu_weight_logdet", lambda a, b: lu_weight_logdet(a, upper, b, sign, rows, n=2),
         (lower, log_s)),
        ("tarflow_head", lambda a, b: ff.tarflow_head(a, b), (tokens, tok_h)),
    ]


def test_forward_mode_ad_is_refused_on_the_triton_path_and_exact_on_the_reference():
    """Dual tensors of ``torch.autograd.forward_ad`` through a Triton op whose inputs need
    no grad came out plain: the tangent was dropped without a word (read as zero). The
    Triton path now refuses them at the call, naming the reference backend, which gives the
    tangent ``torch.func.jvp`` of the same maths gives."""
    import torch.autograd.forward_ad as fwad

    torch.manual_seed(0)
    for name, op, inputs in _forward_ad_cases():
        tangents = tuple(torch.randn_like(t) for t in inputs)
        with ff.use_backend("reference"):
            want = torch.func.jvp(op, inputs, tangents)[1]
            with fwad.dual_level():
                out = op(*(fwad.make_dual(t, v) for t, v in zip(inputs, tangents)))
                out = out if isinstance(out, tuple) else (out,)
                got = tuple(fwad.unpack_dual(o).tangent for o in out)
        want = want if isinstance(want, tuple) else (want,)
        for g, wt in zip(got, want):
            torch.testing.assert_close(g, wt, rtol=1e-12, atol=1e-12, msg=name)
        with ff.use_backend("triton"), fwad.dual_level():
            with pytest.raises(NotImplementedError, match="forward-mode AD.*use_backend"):
                op(inputs[0], fwad.make_dual(inputs[1], tangents[1]))


def test_torch_func_jvp_on_the_triton_path_is_named_as_such():
    """The forward-mode AD refusal ran before the torch.func one, and torch.func.jvp's
    inputs are dual tensors: jvp and jacfwd were told about torch.autograd.forward_ad,
    which their users never called."""
    x, h = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    with ff.use_backend("triton"):
        for transform in (lambda f: torch.func.jvp(f, (x,), (torch.ones_like(x),)),
                          lambda f: torch.func.jacfwd(f)(x)):
            with pytest.raises(NotImplementedError, match=r"^affine_coupling: torch\.func "):
                transform(lambda a: ff.affine_coupling(a, h)[1])
