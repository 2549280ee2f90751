"""Numerical extremes on the Triton path against the float64 reference: infinite raw
scales, where the math of the gradient is still finite (tiny shapes: the interpreter)."""

import torch

import fastflow as ff

from conftest import DEVICE


def _grads(fn, backend, x, h, dtype, **kw):
    """(d x, d h) of sum(out * w) + sum(logdet), w a fixed pattern of -1, 0, 1."""
    x = x.detach().to(dtype).requires_grad_(True)
    h = h.detach().to(dtype).requires_grad_(True)
    with ff.use_backend(backend):
        out, ld = fn(x, h, **kw)
    w = (torch.arange(out.numel(), device=out.device) % 3 - 1).reshape(out.shape).to(out.dtype)
    ((out * w).sum() + ld.sum()).backward()
    return x.grad, h.grad


def _check_grads(fn, x, h, **kw):
    gx, gh = _grads(fn, "triton", x, h, torch.float32, **kw)
    gx64, gh64 = _grads(fn, "reference", x, h, torch.float64, **kw)
    assert torch.isfinite(gh64).all() and torch.isfinite(gx64).all(), "the oracle must be finite"
    torch.testing.assert_close(gx.double(), gx64, rtol=1e-5, atol=1e-5, msg=f"dx {kw}")
    torch.testing.assert_close(gh.double(), gh64, rtol=1e-5, atol=1e-5, msg=f"dh {kw}")


def test_coupling_exp_infinite_raw_gradient_is_finite():
    # exp scale, s = exp(raw): raw = -inf forward (s = 0) and +inf reverse (1/s = 0) leave
    # d logdet / d raw = +-1 and the output's term 0; the kernel's d log s / d raw was
    # raw * 0 + 1 = NaN there
    x = torch.randn(1, 4, 1, 3, device=DEVICE)
    for reverse, v in ((False, -torch.inf), (True, torch.inf)):
        h = torch.randn(1, 4, 1, 3, device=DEVICE)
        h[:, :2] = v
        _check_grads(ff.affine_coupling, x, h, scale="exp", reverse=reverse)


def test_tarflow_head_infinite_a_gradient_is_finite():
    # no clamp: a = +inf forward (exp(-a) = 0) and -inf reverse (exp(a) = 0): d logdet / da
    # = -+1, finite; the kernel's da / draw was raw * 0 + 1 = NaN there
    x = torch.randn(1, 3, 2, device=DEVICE)
    for reverse, v in ((False, torch.inf), (True, -torch.inf)):
        h = torch.randn(1, 3, 4, device=DEVICE)
        h[..., :2] = v
        _check_grads(ff.tarflow_head, x, h, reverse=reverse)
