"""Modules given an input on another device than their parameters (DESIGN.md, "Bad input gets
an exception that names the argument and what was expected (ValueError/TypeError) ...
tensors on different devices"): a ValueError that names the input and the module's device,
raised before anything runs (no ActNorm initialised from that batch), on both backends.

The other device is "meta" (no GPU needed): the modules' parameters stay on the CPU."""

import pytest
import torch

import fastflow as ff

OTHER = "meta"


def _expect_device_error(fn, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected a tensor on the module's device cpu.*got meta"):
        fn()


def _layers():
    return {
        "ActNorm": lambda: ff.ActNorm(4),
        "InvConv2dLU": lambda: ff.InvConv2dLU(4),
        "InvConv2d": lambda: ff.InvConv2d(4),
        "AffineCoupling": lambda: ff.AffineCoupling(4, filter_size=8),
        "AffineCoupling-additive": lambda: ff.AffineCoupling(4, filter_size=8, affine=False),
        "FlowStep": lambda: ff.FlowStep(4, filter_size=8),
        "FlowStep-plain": lambda: ff.FlowStep(4, filter_size=8, conv_lu=False),
        "ReversibleSequence": lambda: ff.ReversibleSequence(
            [ff.FlowStep(4, filter_size=8) for _ in range(2)]),
    }


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("make", list(_layers().values()), ids=list(_layers()))
def test_layer_input_on_another_device_is_a_value_error(backend, make, training):
    torch.manual_seed(0)
    m = make().train(training)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 4, 4, 4, device=OTHER)
    _expect_device_error(lambda: m(x), "x")
    _expect_device_error(lambda: m.inverse(x), "y")
    _expect_device_error(lambda: m.reverse(x), "y")
    # nothing was initialised or changed from the refused batch
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_glow_inputs_on_another_device_are_value_errors(backend):
    torch.manual_seed(0)
    g = ff.Glow(3, 2, 2, filter_size=8)
    x = torch.rand(2, 3, 8, 8)
    _expect_device_error(lambda: g(x.to(OTHER)), "x")
    g.eval()
    _, _, zs = g(x)
    _expect_device_error(lambda: g.reverse([z.to(OTHER) for z in zs], reconstruct=True),
                         r"z_list\[0\]")
    _expect_device_error(lambda: g.reverse([zs[0], zs[1].to(OTHER)]), r"z_list\[1\]")


def test_tarflow_inputs_on_another_device_are_value_errors(backend):
    torch.manual_seed(0)
    t = ff.TarFlow(1, 4, 2, 16, 2, 1, num_classes=3, head_dim=8).eval()
    x = torch.randn(2, 1, 4, 4)
    _expect_device_error(lambda: t(x.to(OTHER)), "x")
    _expect_device_error(lambda: t.log_prob(x.to(OTHER)), "x")
    z, _ = t(x)
    _expect_device_error(lambda: t.reverse(z.to(OTHER)), "z")
    _expect_device_error(lambda: t.reverse(x.to(OTHER)), "z")
    _expect_device_error(lambda: t.reverse(z.to(OTHER), method="jacobi"), "z")


def test_vae_input_on_another_device_is_a_value_error(backend):
    from fastflow.vae import ConvVAE

    model = ConvVAE()
    x = torch.rand(2, 1, 8, 8, device=OTHER)
    for call in (model, model.loss, model.elbo, model.reconstruct):
        _expect_device_error(lambda: call(x), "x")


@pytest.mark.parametrize("method", ["forward", "inverse", "reverse"])
def test_coupling_input_of_another_dtype_than_its_network_is_named(method):
    """A float64 network given float32 input (no autocast) failed in the first convolution
    with PyTorch's "Input type (float) and bias type (double)", naming no argument."""
    coupling = ff.AffineCoupling(4, filter_size=8).double()
    x = torch.randn(2, 4, 5, 5)
    name = "x" if method == "forward" else "y"
    with pytest.raises(TypeError, match=rf"^{name}: expected torch.float64, the coupling "
                                        rf"network's dtype \(or autocast\), got torch.float32"):
        getattr(coupling, method)(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves float64 alone
        with pytest.raises(TypeError, match=rf"^{name}: expected torch.float64"):
            getattr(coupling, method)(x)
    coupling = ff.AffineCoupling(4, filter_size=8)  # float32
    with pytest.raises(TypeError, match=rf"^{name}: expected torch.float32, .* got torch.bfloat16"):
        getattr(coupling, method)(x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for the network
        out = getattr(coupling, method)(x.bfloat16())
    out = out if method == "reverse" else out[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
