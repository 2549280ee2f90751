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
