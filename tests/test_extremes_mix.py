"""Numerical extremes of the channel mix (ActNorm + 1x1 convolution) and the LU weight op:
the Triton path (interpreted on CPU) against the reference path and float64 truth on
tiny shapes. What is pinned: huge / tiny / negative ActNorm scales, 16-bit activations
near their max mixed in float32 and rounded once, inf / NaN propagating to the same
places, large |log_s| in the LU weight, C = 1."""

import pytest
import torch

import fastflow as ff
from fastflow.ops.channel_mix import channel_mix_split
from fastflow.ops.lu_weight import lu_weight_logdet

from conftest import DEVICE


def _both(fn):
    """``fn()`` on the reference path, then on the Triton path."""
    out = []
    for name in ("reference", "triton"):
        with ff.use_backend(name):
            out.append(fn())
    return out


def _truth(x, w, loc, scale, reverse):
    x, w, loc, scale = (v.double() for v in (x, w, loc, scale))
    mix = lambda v: torch.einsum("oc,nchw->nohw", w, v)  # noqa: E731
    if reverse:
        return mix(x) / scale.view(1, -1, 1, 1) - loc.view(1, -1, 1, 1)
    return mix((x + loc.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1))


@pytest.mark.parametrize("s", [1e-20, -1e20], ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_extreme_actnorm_scales_match_float64(s, reverse):
    """Scales far from 1 (either sign): both paths finite, within float32 rounding of the
    float64 truth, and the same log-det (sign included)."""
    g = torch.Generator().manual_seed(0)
    c = 4
    x = torch.randn(2, c, 3, 3, generator=g).to(DEVICE)
    w = torch.linalg.qr(torch.randn(c, c, generator=g))[0].to(DEVICE)
    loc = torch.randn(c, generator=g).to(DEVICE)
    scale = torch.full((c,), s, device=DEVICE)
    want = _truth(x, w, loc, scale, reverse)
    want_ld = (-9 if reverse else 9) * c * torch.log(torch.tensor(abs(s), dtype=torch.float64))
    for out, ld in _both(lambda: ff.actnorm_invconv(x, loc, scale, w, reverse=reverse)):
        assert torch.isfinite(out).all()
        atol = want.abs().max().item() * 1e-6
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=atol)
        torch.testing.assert_close(ld.double(), want_ld.expand(2).to(DEVICE), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_near_max_mixes_in_float32(dtype):
    """x + x - x - x with x near the dtype's max: float32 accumulation gives 0 (a 16-bit one
    would overflow to inf, then NaN); x/2 + x/2 rounds once to x."""
    big = torch.finfo(dtype).max * 0.9 if dtype == torch.float16 else 1e38
    x = torch.full((1, 4, 2, 3), big, device=DEVICE).to(dtype)
    w = torch.tensor([[1.0, 1, -1, -1], [0.5, 0.5, 0, 0], [1, -1, 1, -1]], device=DEVICE)
    for out in _both(lambda: ff.channel_mix(x, w)):
        assert out.dtype == dtype
        assert (out[:, 0] == 0).all() and (out[:, 2] == 0).all()
        assert (out[:, 1] == x[:, 0]).all()


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_nonfinite_inputs_propagate_alike(bad, reverse):
    """One inf / NaN pixel: the same outputs non-finite (and NaN) on both paths, the other
    pixels and samples finite; the gradient through the clean sample stays finite for x."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 2, 2, generator=g).to(DEVICE)
    x[0, 1, 1, 0] = bad
    w = torch.linalg.qr(torch.randn(3, 3, generator=g))[0].to(DEVICE)
    loc, scale = torch.randn(3, generator=g).to(DEVICE), torch.rand(3, generator=g).to(DEVICE) + 0.5

    def run():
        xx = x.clone().requires_grad_()
        out, head = channel_mix_split(xx, w, loc=loc, scale=scale, reverse=reverse, split=2)
        out[1].sum().backward()
        return out.detach(), head.detach(), xx.grad

    (r, rh, rg), (t, th, tg) = _both(run)
    for a, b in ((r, t), (rh, th)):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
        assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.isfinite(r[1]).all() and torch.isfinite(r[0, :, 0]).all()
    assert torch.isfinite(rg).all() and torch.isfinite(tg).all()
    torch.testing.assert_close(tg, rg)


@pytest.mark.parametrize("ls", [50.0, -50.0], ids=str)
def test_lu_weight_large_log_s_agrees(ls):
    """|log_s| = 50 (exp 5e21 / 2e-22: fine in float64, W rounded to float32 once): W,
    log-det and gradients equal on both paths, and the log-det is exactly H*W*sum(log_s)
    + sum(log|scale|) with a negative scale."""
    g = torch.Generator().manual_seed(2)
    c = 3
    lower, upper = (torch.randn(c, c, generator=g).to(DEVICE) * 0.3 for _ in range(2))
    log_s = torch.tensor([ls, -ls / 2, 1.0], device=DEVICE)
    sign = torch.tensor([1.0, -1.0, 1.0], device=DEVICE)
    rows = torch.tensor([2, 0, 1], device=DEVICE)
    scale = torch.tensor([0.5, -2.0, 1e-20], device=DEVICE)

    def run():
        ps = [p.clone().requires_grad_() for p in (lower, upper, log_s, scale)]
        w, ld = lu_weight_logdet(ps[0], ps[1], ps[2], sign, rows, scale=ps[3], n=2,
                                    ld_mult=6, ld_dtype=torch.float32, w_dtype=torch.float32)
        (w.sum() + ld.sum()).backward()
        return [w, ld] + [p.grad for p in ps]

    r, t = _both(run)
    for a, b in zip(r, t):
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0)
    want = 6 * (log_s.double().sum() + scale.double().abs().log().sum())
    torch.testing.assert_close(r[1].double(), want.expand(2), rtol=1e-6, atol=0)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_one_channel(reverse):
    x = torch.randn(2, 1, 3, 2, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    w, loc, scale = (torch.tensor(v, device=DEVICE) for v in ([[-2.0]], [0.5], [-3.0]))
    want = _truth(x, w, loc, scale, reverse)
    want_ld = (-6 if reverse else 6) * (torch.log(torch.tensor(3.0)) + torch.log(torch.tensor(2.0)))
    for out, ld in _both(lambda: ff.actnorm_invconv(x, loc, scale, w, torch.log(torch.tensor(2.0)),
                                                     reverse=reverse)):
        torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ld.double(), want_ld.double().expand(2).to(DEVICE))
