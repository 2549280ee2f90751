"""The channel-mix kernels through their launchers: the backward's reductions at sizes that
give many chunks (real Glow batches give 64 and more), for every finishing mode, against the
float64 reference; the 1x1 convolution's inverse round trip at today's tolerance."""

import pytest
import torch

from conftest import assert_close
from fastflow import reference
from fastflow.kernels import channel_mix as cm

# the launchers are called directly: on a GPU machine their tensors must be CUDA ones
pytestmark = pytest.mark.usefixtures("on_device")


def _reference_grads(x, w, loc, scale, g, reverse):
    """d weight, d loc, d scale of sum(g * actnorm_mix(...)) by float64 autograd."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (w, loc, scale)]
    y = reference.actnorm_mix(x.double(), *leaves, reverse=reverse)
    params = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, params, g.double()))
    return [None if t is None else next(grads) for t in leaves]


def _bound(x, w, loc, scale, g, reverse):
    """The same gradients of the absolute values: sum |terms|, the scale of a summation's
    rounding error whatever the order of the sum."""
    ab = [None if t is None else t.abs() for t in (w, loc, scale)]
    return [None if b is None else b.abs() for b in _reference_grads(x.abs(), *ab, g.abs(), reverse)]


CASES = [  # (shape, dtype, weight, actnorm, reverse)
    ((2, 4, 64, 64), torch.float32, True, True, False),
    ((2, 4, 64, 64), torch.float32, True, True, True),
    ((2, 4, 64, 64), torch.float32, True, False, False),
    ((2, 4, 64, 64), torch.float32, False, True, False),
    ((2, 4, 64, 64), torch.float32, False, True, True),
    ((1, 3, 24, 24), torch.float64, True, True, False),
    ((1, 3, 24, 24), torch.float64, True, True, True),
    ((1, 3, 24, 24), torch.float64, False, True, False),
    ((3, 20, 9, 7), torch.float32, True, True, False),  # C not a block multiple, 2 x 2 tiles
]


@pytest.mark.parametrize("shape, dtype, has_w, has_an, reverse", CASES)
def test_param_grads_many_chunks_match_reference(shape, dtype, has_w, has_an, reverse):
    n, c, h, w_ = shape
    x = torch.randn(shape, dtype=dtype) + 0.25
    g = torch.randn(shape, dtype=dtype)
    w = torch.randn(c, c, dtype=dtype) if has_w else None
    loc = 0.3 * torch.randn(c, dtype=dtype) if has_an else None
    scale = torch.rand(c, dtype=dtype) + 0.5 if has_an else None
    red = cm.reduce_config(n, c, c, h * w_, dtype, diag=not has_w)
    # many chunks: as many as there are BLOCK_Q steps of pixels, up to 64 and more
    assert red.extra["N_CHUNKS"] >= min(64, -(-n * h * w_ // red.blocks["BLOCK_Q"])), red
    d_w = torch.empty(c, c, dtype=dtype) if has_w else None
    d_l = torch.empty(c, dtype=dtype) if has_an else None
    d_s = torch.empty(c, dtype=dtype) if has_an else None
    cm.mix_param_grads(g, x, w, scale, loc if (has_an and not reverse) else None,
                       reverse=reverse, d_a=d_w, d_loc=d_l, d_scale=d_s)
    want = _reference_grads(x, w, loc, scale, g, reverse)
    bound = _bound(x, w, loc, scale, g, reverse)
    eps = 1e-12 if dtype == torch.float64 else 1e-5
    for name, got, ref, b in zip(("d_weight", "d_loc", "d_scale"), (d_w, d_l, d_s), want, bound):
        if ref is None:
            continue
        err = (got.double() - ref).abs()
        assert (err <= eps * b + eps).all(), (name, err.max().item(), (err / (b + 1)).max().item())


def test_param_grads_are_bitwise_reproducible():
    x, g = torch.randn(2, 4, 32, 32), torch.randn(2, 4, 32, 32)
    w, loc, scale = torch.randn(4, 4), torch.randn(4), torch.rand(4) + 0.5
    outs = []
    for _ in range(2):
        d = [torch.empty(4, 4), torch.empty(4), torch.empty(4)]
        cm.mix_param_grads(g, x, w, scale, loc, reverse=False, d_a=d[0], d_loc=d[1], d_scale=d[2])
        outs.append(d)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def _tf32(a, rounding):
    """float32 ``a`` with a 10-bit mantissa: "nearest" (ties away, as ``cvt.rna.tf32.f32``)
    or "truncate" (what a tf32 tensor-core operand keeps of a float32 register)."""
    bits = a.contiguous().view(torch.int32)
    if rounding == "nearest":
        bits = bits + 0x1000
    return (bits & ~0x1FFF).view(torch.float32)


def _emulated_dot(w, v, precision):
    """(Co, C) @ (C, P) in float32 the way Triton lowers ``tl.dot``'s ``input_precision``:
    "ieee" exact float32 products; "tf32" one tensor-core pass on tf32 operands; "tf32x3"
    big = tf32(a), small = a - big for both operands, then
    dot(small_w, big_v) + dot(big_w, small_v), then + dot(big_w, big_v) (Triton's F32DotTC
    pass; each tf32 x tf32 product is exact in float32, sums in float32)."""
    if precision == "ieee":
        return w @ v
    wb, vb = _tf32(w, "nearest"), _tf32(v, "nearest")
    if precision == "tf32":
        return wb @ vb
    ws, vs = _tf32(w - wb, "truncate"), _tf32(v - vb, "truncate")
    return (ws @ vb + wb @ vs) + wb @ vb


@pytest.mark.parametrize("c", [12, 48, 96, 384])
def test_tf32x3_arithmetic_keeps_the_inverse_round_trip(c):
    """Why "tf32x3" is offered and plain "tf32" is not: emulated in float32 on the CPU (the
    interpreter's tl.dot is always exact), the 3xTF32 split keeps ActNorm + W then W^-1 +
    ActNorm^-1 within the round-trip test's 1e-4 and within 2x the exact float32 error,
    while one tf32 pass misses 1e-4. The kernel's own tf32x3 round trip is the test above,
    on a GPU."""
    torch.manual_seed(c)
    p, cpu = 2048, dict(dtype=torch.float64, device="cpu")  # CPU arithmetic, on any machine
    x = torch.randn(c, p, **cpu)
    wq = torch.linalg.qr(torch.randn(c, c, **cpu))[0]
    w = wq @ torch.diag(torch.rand(c, **cpu) + 0.5)
    v = torch.linalg.inv(w)
    loc = 0.1 * torch.randn(c, 1, **cpu)
    scale = torch.rand(c, 1, **cpu) + 0.5
    err = {}
    for precision in ("ieee", "tf32x3", "tf32"):
        y = _emulated_dot(w.float(), (scale * (x + loc)).float(), precision)
        back = _emulated_dot(v.float(), y, precision).double() / scale - loc
        err[precision] = (back - x).abs().max().item()
    assert err["tf32x3"] < 1e-4 and err["tf32x3"] <= 2 * err["ieee"] + 1e-6, err
    assert err["tf32"] > 1e-4, err


@pytest.mark.parametrize("precision", cm.PRECISIONS)
def test_inverse_round_trip_at_todays_tolerance(precision):
    """mix(mix(x, W), W^-1) == x at the float32 tolerance of today's round-trip test (1e-4),
    for every offered tl.dot precision (under the interpreter every precision is exact
    float32: this measures tf32x3 only on a GPU)."""
    torch.manual_seed(0)
    n, c, h, w_ = 3, 48, 4, 4
    x = torch.randn(n, c, h, w_)
    wq = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))[0]
    w = wq @ torch.diag(torch.rand(c, dtype=torch.float64) + 0.5)
    v = torch.linalg.inv(w)
    loc, scale = 0.1 * torch.randn(c), torch.rand(c) + 0.5
    y = cm.mix(x, w, pre="actnorm", pre_scale=scale, pre_shift=loc, input_precision=precision)
    x2 = cm.mix(y, v, post="actnorm_inverse", post_scale=scale, post_shift=loc,
                input_precision=precision)
    assert_close(x2, x.double(), torch.float32, rtol=1e-4, atol=1e-4)



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("has_w", [True, False])
def test_param_grads_with_int64_pixel_indices_are_the_same(monkeypatch, dtype, has_w):
    """The reduction's INDEX64 specialisation (flat pixel indices past 2^31: N*H*W + CHUNK
    >= 2^31, reached only with tens of GB of activations) forced at a small shape: bitwise
    the gradients of the int32 one (it was never run before, interpreted or compiled)."""
    x, g = torch.randn(3, 5, 7, 9, dtype=dtype), torch.randn(3, 5, 7, 9, dtype=dtype)
    w = torch.randn(5, 5, dtype=dtype) if has_w else None
    loc, scale = torch.randn(5, dtype=dtype), torch.rand(5, dtype=dtype) + 0.5
    outs = []
    for index64 in (False, True):
        if index64:
            plain = cm.reduce_config

            def forced(*args, **kwargs):
                cfg = plain(*args, **kwargs)
                assert cfg.extra["INDEX64"] is False
                cfg.extra["INDEX64"] = True
                return cfg

            monkeypatch.setattr(cm, "reduce_config", forced)
        d = [torch.empty(5, 5, dtype=dtype) if has_w else None, torch.empty(5, dtype=dtype),
             torch.empty(5, dtype=dtype)]
        cm.mix_param_grads(g, x, w, scale, loc, reverse=False, d_a=d[0], d_loc=d[1], d_scale=d[2])
        outs.append([t for t in d if t is not None])
    assert all(torch.equal(a, b) for a, b in zip(*outs))
