"""Every launcher writes inside its outputs and nowhere else (the TarFlow head too).

Each output is a view into a larger NaN-filled buffer (a margin of samples, channels or
elements on every side); after the launch the margin must still be all NaN. A mask that
lets a program store one channel too far (``c <= C``) then fails one test cleanly instead
of corrupting memory."""

import pytest
import torch

from fastflow.kernels import channel_mix as cm
from fastflow.kernels import coupling as cp
from fastflow.kernels import gaussian as ga
from fastflow.kernels import lu_weight as lw

# the launchers are called directly: on a GPU machine their tensors must be CUDA ones
pytestmark = pytest.mark.usefixtures("on_device")


class Guarded:
    """A view of ``shape`` inside a NaN buffer padded by ``pad`` on both sides of each dim."""

    def __init__(self, shape, dtype=torch.float32, pad=None):
        pad = pad or (1,) * len(shape)
        self.big = torch.full([s + 2 * p for s, p in zip(shape, pad)], float("nan"), dtype=dtype)
        idx = tuple(slice(p, p + s) for s, p in zip(shape, pad))
        self.view = self.big[idx]
        self.inside = torch.zeros(self.big.shape, dtype=torch.bool)
        self.inside[idx] = True

    def check(self, name):
        margin = self.big[~self.inside]
        assert torch.isnan(margin).all(), f"{name}: {int((~torch.isnan(margin)).sum())} stores outside"
        assert not torch.isnan(self.view).any(), f"{name}: part of the output left unwritten"


def nchw(shape, dtype=torch.float32):
    """An NCHW output view: margins of samples and channels (pixels stay one axis)."""
    return Guarded(shape, dtype, pad=(1, 2, 0, 0))


def flat(shape, dtype=torch.float32, margin=7):
    """A contiguous output view: a margin of elements before and after."""
    n = torch.Size(shape).numel()
    g = Guarded((n,), dtype, pad=(margin,))
    g.view = g.view.view(shape)
    return g


@pytest.mark.parametrize("scale, layout, shift", [("sigmoid", "halves", "before"),
                                                  ("atan", "interleaved", "after"),
                                                  ("exp", "halves", "negated"),
                                                  ("additive", "halves", "before")])
@pytest.mark.parametrize("reverse", [False, True])
def test_coupling(scale, layout, shift, reverse):
    n, c, h, w = 3, 7, 5, 3
    cb = c // 2
    x = torch.randn(n, c, h, w)
    hh = torch.randn(n, cb if scale == "additive" else 2 * cb, h, w)
    kw = dict(scale=scale, layout=layout, shift=shift, clamp=2.0, reverse=reverse)
    out = nchw(x.shape)
    y, _ = cp.coupling_forward(x, hh, out=out.view, **kw)
    assert y is out.view
    out.check("coupling_forward out")
    gin, gh = nchw(x.shape), nchw(hh.shape)
    cp.coupling_backward(torch.randn_like(x), torch.randn(n), x, hh, from_output=False,
                         grad_in=gin.view, grad_h=gh.view, **kw)
    gin.check("coupling_backward grad_in")
    gh.check("coupling_backward grad_h")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["mix", "mix_t_post", "actnorm", "rect"])
def test_mix(kind, dtype):
    n, c, h, w = 2, 19, 3, 5
    x = torch.randn(n, c, h, w, dtype=dtype)
    s, b = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype)
    if kind == "rect":
        a = torch.randn(11, c, dtype=dtype)
        out = nchw((n, 11, h, w), dtype)
        cm.mix(x, a, out=out.view)
    else:
        out = nchw(x.shape, dtype)
        a = None if kind == "actnorm" else torch.randn(c, c, dtype=dtype)
        if kind == "mix_t_post":
            cm.mix(x, a, transpose_a=True, post="multiply", post_scale=s, out=out.view)
        else:
            cm.mix(x, a, pre="actnorm", pre_scale=s, pre_shift=b, out=out.view)
    out.check(f"mix {kind}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c, c2", [(19, 10), (37, 19), (5, 5)])
@pytest.mark.parametrize("kind", ["mix", "actnorm", "reverse"])
def test_mix_second_output(kind, c, c2, dtype):
    """``out2`` (channel_mix_split's head): the first c2 output channels and nothing else,
    c2 ending inside an output-channel tile or on a tile boundary, or past the last tile."""
    n, h, w = 2, 3, 5
    x = torch.randn(n, c, h, w, dtype=dtype)
    s, b = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype)
    a = None if kind == "actnorm" else torch.randn(c, c, dtype=dtype)
    out, head = nchw(x.shape, dtype), nchw((n, c2, h, w), dtype)
    if kind == "reverse":
        cm.mix(x, a, post="actnorm_inverse", post_scale=s, post_shift=b, out=out.view, out2=head.view)
    else:
        cm.mix(x, a, pre="actnorm", pre_scale=s, pre_shift=b, out=out.view, out2=head.view)
    out.check(f"mix {kind} out")
    head.check(f"mix {kind} out2")
    assert torch.equal(head.view, out.view[:, :c2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("has_w, has_an, reverse", [(True, True, False), (True, True, True),
                                                    (True, False, False), (False, True, False),
                                                    (False, True, True)])
def test_mix_param_grads(has_w, has_an, reverse, dtype):
    n, c, h, w = 2, 19, 6, 5
    x, g = torch.randn(n, c, h, w, dtype=dtype), torch.randn(n, c, h, w, dtype=dtype)
    a = torch.randn(c, c, dtype=dtype) if has_w else None
    s, b = (torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype)) if has_an else (None, None)
    d_a = Guarded((c, c), dtype, pad=(1, 2)) if has_w else None
    d_l = flat((c,), dtype) if has_an else None
    d_s = flat((c,), dtype) if has_an else None
    cm.mix_param_grads(g, x, a, s, b if (has_an and not reverse) else None, reverse=reverse,
                       d_a=d_a and d_a.view, d_loc=d_l and d_l.view, d_scale=d_s and d_s.view)
    for name, t in (("d_a", d_a), ("d_loc", d_l), ("d_scale", d_s)):
        if t is not None:
            t.check(name)


def _lu_inputs(c):
    lower, upper = torch.randn(c, c, dtype=torch.float64), torch.randn(c, c, dtype=torch.float64)
    log_s, sign = 0.1 * torch.randn(c, dtype=torch.float64), torch.randn(c).sign().double()
    rows = torch.randperm(c)
    scale = torch.rand(c, dtype=torch.float64) + 0.5
    return lower, upper, log_s, sign, rows, scale


@pytest.mark.parametrize("c", [5, 19])
def test_lu_weight(c):
    n = 3
    lower, upper, log_s, sign, rows, scale = _lu_inputs(c)
    w, wc, ld = flat((c, c), torch.float64), flat((c, c)), flat((n,), torch.float64)
    lw.lu_weight_forward(lower, upper, log_s, sign, rows, scale, w.view, ld.view, ld_mult=4)
    lw.lu_weight_forward(lower, upper, log_s, sign, rows, scale, wc.view, ld.view, ld_mult=4)
    for name, t in (("w", w), ("w float32", wc), ("ld", ld)):
        t.check(name)
    assert torch.equal(wc.view, w.view.float())
    outs = [flat((c, c), torch.float64), flat((c, c), torch.float64), flat((c,), torch.float64),
            flat((c,), torch.float64)]
    lw.lu_weight_backward(torch.randn(c, c, dtype=torch.float64), torch.randn(n, dtype=torch.float64),
                          lower, upper, log_s, sign, rows, scale, *(t.view for t in outs), ld_mult=4)
    for name, t in zip(("d_lower", "d_upper", "d_log_s", "d_scale"), outs):
        t.check(name)


@pytest.mark.parametrize("given", [False, True])
def test_gaussian(given):
    n, d = 5, 37
    mu, lv = torch.randn(n, d), torch.randn(n, d)
    eps = torch.randn(n, d) if given else None
    seed = torch.tensor([2**62 + 12345])
    z = Guarded((n, d), pad=(1, 3))
    ga.reparam_kl_forward(mu, lv, eps, seed, "none", z=z.view)
    z.check("z")
    dmu, dlv = Guarded((n, d), pad=(1, 3)), Guarded((n, d), pad=(1, 3))
    ga.reparam_kl_backward(torch.randn(n, d), torch.randn(n), mu, lv, eps, seed, "none",
                           dmu=dmu.view, dlogvar=dlv.view)
    dmu.check("dmu")
    dlv.check("dlogvar")


@pytest.mark.parametrize("reverse, order, guided, delta", [
    (False, "same", False, False), (True, "reversed", False, False),
    (True, "reversed", True, False), (True, "same", True, True)])
def test_tarflow_head(reverse, order, guided, delta):
    """The all-token head (forward, inverse, guided: both halves, Jacobi: read-modify-write)
    at width 130: BLOCK_D 128, a second round of the D loop with 2 of 128 lanes inside."""
    from fastflow.kernels import tarflow as tk

    n, t, d = 2, 11, 130
    rows = 2 * n if guided else n
    x, h = torch.randn(n, t, d), 0.5 * torch.randn(rows, t, 2 * d)
    out = Guarded((rows, t, d), pad=(1, 2, 3))
    if delta:
        out.view.copy_(torch.randn(rows, t, d))  # the previous iterate
    tk.head_forward(x, h, clamp=2.0, order=order, reverse=reverse, guidance=0.5, guided=guided,
                    out=out.view, delta=delta)
    out.check("out")


@pytest.mark.parametrize("reverse, order, clamp", [(False, "same", 2.0), (True, "reversed", None)])
def test_tarflow_head_backward(reverse, order, clamp):
    """The all-token head's backward writes d input and dh (both halves) inside them, at
    width 130 (a second round of the D loop)."""
    from fastflow.kernels import tarflow as tk

    n, t, d = 2, 11, 130
    src, h = torch.randn(n, t, d), 0.5 * torch.randn(n, t, 2 * d)
    grad_out, grad_ld = torch.randn(n, t, d), torch.randn(n)
    gi, gh = Guarded((n, t, d), pad=(1, 2, 3)), Guarded((n, t, 2 * d), pad=(1, 2, 3))
    tk.head_backward(grad_out, grad_ld, src, h, clamp=clamp, order=order, reverse=reverse,
                     out=(gi.view, gh.view))
    gi.check("grad_in")
    gh.check("grad_h")


def test_tarflow_head_step():
    """The one-token step writes token pos + 1 of x (and nothing around it) and every row of
    the next input, both halves when guided; width 1030: two programs per sample."""
    from fastflow.kernels import tarflow as tk

    n, t, d = 2, 5, 1030
    z, h = torch.randn(n, t, d), torch.randn(2 * n, 2 * d)
    x, inp = Guarded((n, t, d), pad=(1, 1, 3)), Guarded((2 * n, d), pad=(1, 3))
    coef = tk.coefficients(2.0, 0.5, torch.float32, z.device)
    tk.head_step(z, h, torch.tensor([2]), x.view, inp.view, coef, first=False, clamp=2.0,
                 order="reversed", guided=True)
    inp.check("inp")
    written = torch.zeros(x.big.shape, dtype=torch.bool)
    written[1:1 + n, 1 + 3, 3:3 + d] = True  # token pos + 1 = 3 of every sample
    assert not torch.isnan(x.big[written]).any(), "x: token pos + 1 left unwritten"
    assert torch.isnan(x.big[~written]).all(), "x: stores outside token pos + 1"
