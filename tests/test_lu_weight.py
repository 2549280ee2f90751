"""The fused LU weight op (``fastflow::lu_weight``): W = P (L + I)(U + diag(sign exp(log_s)))
in float64 and the per-sample log-det (ActNorm's sum(log|scale|) folded in), against the
float64 reference and slogdet, float64 gradcheck, both backends, bitwise determinism; and
the mixing backward with no pixels."""

import pytest
import torch

import fastflow as ff
from fastflow import reference
from fastflow.ops.lu_weight import lu_weight_logdet as lu_weight

from conftest import DEVICE, CastCounter, assert_close


def _lu(c, dtype=torch.float64):
    """(lower, upper, log_s, sign_s, rows, perm, scale) of a perturbed InvConv2dLU."""
    layer = ff.InvConv2dLU(c).to(DEVICE)
    d = dtype
    lower = (layer.w_l + 0.1 * torch.randn_like(layer.w_l)).detach().to(d)
    upper = (layer.w_u + 0.1 * torch.randn_like(layer.w_u)).detach().to(d)
    log_s = (layer.w_s + 0.1 * torch.randn_like(layer.w_s)).detach().to(d)
    sign = layer.s_sign.to(d)
    scale = ((torch.rand(1, c, 1, 1, device=DEVICE) + 0.5) * torch.where(
        torch.rand(1, c, 1, 1, device=DEVICE) < 0.3, -1.0, 1.0)).to(d)
    return lower, upper, log_s, sign, layer.w_p.argmax(dim=1), layer.w_p.to(d), scale


@pytest.mark.parametrize("c", [1, 3, 17, 40])
def test_lu_weight_matches_reference_and_slogdet(backend, c):
    lower, upper, log_s, sign, rows, perm, scale = _lu(c)
    w, ld = lu_weight(lower, upper, log_s, sign, rows, scale=scale, n=3, ld_mult=6,
                      ld_dtype=torch.float32)
    want = reference.lu_weight(perm, lower, upper, log_s, sign)
    assert w.dtype == torch.float64 and w.shape == (c, c)
    assert_close(w, want, torch.float64)
    slog = torch.linalg.slogdet(want)[1] + torch.log(scale.abs()).sum()
    assert ld.dtype == torch.float32 and ld.shape == (3,)
    assert_close(ld, (6 * slog).expand(3), torch.float32)
    # float32 parameters, no ActNorm term, the inverse map's sign, no samples
    w32, ld64 = lu_weight(lower.float(), upper.float(), log_s.float(), sign.float(), rows,
                          n=2, ld_mult=-4)
    assert_close(w32, reference.lu_weight(perm, *(t.float().double() for t in (lower, upper, log_s, sign))),
                 torch.float64)
    assert ld64.dtype == torch.float64
    assert_close(ld64, (-4 * log_s.float().double().sum()).expand(2), torch.float64)
    assert lu_weight(lower, upper, log_s, sign, rows, n=0)[1].shape == (0,)


def test_lu_weight_transposed_factors_gradients_match_the_fake(backend):
    """Transposed lower / upper and a strided log_s: right gradients, and on the Triton
    path the backward op's outputs have the strides its fake gives torch.compile (the fake
    copied a transposed lower's strides with empty_like; the kernel writes contiguous)."""
    c = 5
    lower, upper, log_s, sign, rows, _, scale = _lu(c)
    factors = (lower.T.contiguous().T, upper.T.contiguous().T,
               torch.stack([log_s, log_s], 1)[:, 0], scale)
    leaves = [t.detach().requires_grad_() for t in factors]  # keeping their strides
    w, ld = lu_weight(*leaves[:3], sign, rows, scale=leaves[3], n=2, ld_mult=3)
    gw = torch.randn(c, c, dtype=torch.float64, device=DEVICE)
    gld = torch.randn(2, dtype=torch.float64, device=DEVICE)
    got = torch.autograd.grad((w, ld), leaves, (gw, gld))
    ref = [t.detach().requires_grad_() for t in factors]
    wr, ldr = reference.lu_weight_logdet(rows, *ref[:3], sign, ref[3], n=2, ld_mult=3)
    want = torch.autograd.grad((wr, ldr), ref, (gw, gld))
    for a, b in zip(got, want):
        assert_close(a, b, torch.float64)
    if backend == "triton":
        from fastflow.ops.lu_weight import lu_weight_backward
        torch.library.opcheck(lu_weight_backward, (gw, gld, *factors[:3], sign, rows,
                                                   factors[3], 3), test_utils="test_faketensor")

@pytest.mark.parametrize("c", [1, 3, 17])
def test_lu_weight_gradcheck_float64(backend, c):
    lower, upper, log_s, sign, rows, _, scale = _lu(c)
    args = [t.clone().requires_grad_() for t in (lower, upper, log_s, scale)]

    def fn(lo, up, ls, sc):
        return lu_weight(lo, up, ls, sign, rows, scale=sc, n=2, ld_mult=-3)

    assert torch.autograd.gradcheck(fn, args, fast_mode=c > 3)


def test_lu_weight_backward_against_reference_float32_params(backend):
    """float32 parameters, a transposed (non-contiguous) dW, a stride-0 d logdet; the
    entries outside the triangles get zero gradients."""
    c = 21
    lower, upper, log_s, sign, rows, perm, scale = _lu(c, torch.float32)
    g = torch.randn(c, c, dtype=torch.float64, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (lower, upper, log_s, scale)]
    w, ld = lu_weight(leaves[0], leaves[1], leaves[2], sign, rows, scale=leaves[3], n=4,
                      ld_mult=9, ld_dtype=torch.float32)
    got = torch.autograd.grad((w.T * g).sum() + ld.sum(), leaves)
    ref = [t.double().requires_grad_() for t in (lower, upper, log_s, scale)]
    w_r = reference.lu_weight(perm.double(), ref[0], ref[1], ref[2], sign.double())
    ld_r = 9 * (ref[2].sum() + torch.log(ref[3].abs()).sum())
    want = torch.autograd.grad((w_r.T * g).sum() + 4 * ld_r, ref)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert_close(a, b, torch.float32)
    assert torch.count_nonzero(torch.triu(got[0])) == 0
    assert torch.count_nonzero(torch.tril(got[1])) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lu_weight_backward_half_precision_params(backend, dtype):
    """A model cast to bf16/fp16: the float64 gradients are rounded once into the parameters'
    dtype (the interpreter's direct float64 -> bf16 store wrote garbage and NaN)."""
    c = 13
    lower, upper, log_s, sign, rows, perm, scale = _lu(c, torch.float32)
    params = [t.to(dtype) for t in (lower, upper, log_s, scale)]
    g = torch.randn(c, c, dtype=torch.float64, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in params]
    w, ld = lu_weight(leaves[0], leaves[1], leaves[2], sign.to(dtype), rows, scale=leaves[3],
                      n=2, ld_mult=5, ld_dtype=torch.float32)
    got = torch.autograd.grad((w.T * g).sum() + ld.sum(), leaves)
    ref = [t.double().requires_grad_() for t in params]
    w_r = reference.lu_weight(perm.double(), ref[0], ref[1], ref[2], sign.double())
    ld_r = 5 * (ref[2].sum() + torch.log(ref[3].abs()).sum())
    want = torch.autograd.grad((w_r.T * g).sum() + 2 * ld_r, ref)
    for a, b in zip(got, want):
        assert a.dtype == dtype and a.shape == b.shape
        assert torch.isfinite(a).all()
        # one rounding of the float64 gradient into the parameter's dtype
        torch.testing.assert_close(a.double(), b, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)


def test_lu_weight_float32_w_from_the_same_launch():
    """``w_dtype=torch.float32`` on the Triton path: W computed in float64, written rounded
    once (bitwise the float64 W's ``.float()``), no (C, C) cast op; the
    parameters' gradients through a float32 dW equal those through the same dW in float64.
    The reference path keeps float64."""
    c = 21
    lower, upper, log_s, sign, rows, perm, scale = _lu(c, torch.float32)
    g = torch.randn(c, c, device=DEVICE)  # float32: what a float32 mix's backward gives
    grads = {}
    with ff.use_backend("triton"):
        for w_dtype in (None, torch.float32):
            leaves = [t.clone().requires_grad_() for t in (lower, upper, log_s, scale)]
            ops = CastCounter(lambda t: t.dim() == 2)
            with ops:
                w, ld = lu_weight(leaves[0], leaves[1], leaves[2], sign, rows, scale=leaves[3],
                                  n=3, ld_mult=7, ld_dtype=torch.float32, w_dtype=w_dtype)
            grads[w_dtype] = torch.autograd.grad((w * g.to(w.dtype)).sum() + ld.sum(), leaves)
            if w_dtype is None:
                w64, ld64 = w, ld
        assert ops.casts == []  # W in float32 straight from the launch
    assert w64.dtype == torch.float64 and w.dtype == torch.float32 and w.shape == (c, c)
    assert torch.equal(w, w64.float()) and torch.equal(ld, ld64)
    for a, b in zip(grads[torch.float32], grads[None]):
        assert torch.equal(a, b)
    with ff.use_backend("reference"):
        w_ref = lu_weight(lower, upper, log_s, sign, rows, w_dtype=torch.float32)[0]
        w_ref64 = lu_weight(lower, upper, log_s, sign, rows)[0]
    # the reference rounds its float64 W once to float32: the same values as the launch's
    assert w_ref.dtype == torch.float32 and torch.equal(w_ref, w_ref64.float())


def _same(a, b):
    """Bitwise on the Triton path (each layer's programs do exactly a single layer's work);
    within a few ulps on the reference path (a batched matmul may round differently)."""
    if ff.backend.current_mode() == "triton":
        assert torch.equal(a, b)
    else:
        eps = torch.finfo(a.dtype).eps
        torch.testing.assert_close(a, b, rtol=4 * eps, atol=4 * eps)


def _stack_of(k, c, dtype=torch.float64):
    """K perturbed layers' (lower, upper, log_s, sign_s, rows, scale), each stacked on a new
    first dimension (scale as K stacked (1, C, 1, 1) parameters)."""
    layers = [_lu(c, dtype) for _ in range(k)]
    pick = lambda i: torch.stack([layer[i] for layer in layers])  # noqa: E731
    return pick(0), pick(1), pick(2), pick(3), pick(4), pick(6)


@pytest.mark.parametrize("c", [3, 17])
@pytest.mark.parametrize("w_dtype", [None, torch.float32])
def test_lu_weight_stack_gives_each_layers_own_results(backend, c, w_dtype):
    """A stack of K layers in one call (one launch on the Triton path): W (K, C, C) and
    logdet (K, n), and all gradients, those of each layer called alone (bitwise on the
    Triton path); and against
    the float64 oracle (torch.linalg.det of the explicit W)."""
    torch.manual_seed(c)
    k, n = 3, 4
    leaves = [t.clone().requires_grad_() for t in (*_stack_of(k, c)[:3], _stack_of(k, c)[5])]
    lower, upper, log_s, scale = leaves
    _, _, _, sign, rows, _ = _stack_of(k, c)
    w, ld = lu_weight(lower, upper, log_s, sign, rows, scale=scale, n=n, ld_mult=-5,
                      ld_dtype=torch.float32, w_dtype=w_dtype)
    assert w.shape == (k, c, c) and ld.shape == (k, n) and ld.dtype == torch.float32
    gw, gld = torch.randn_like(w), torch.randn_like(ld)
    grads = torch.autograd.grad((w * gw).sum() + (ld * gld).sum(), leaves)
    for i in range(k):
        one = [t[i].detach().clone().requires_grad_() for t in leaves]
        w1, ld1 = lu_weight(one[0], one[1], one[2], sign[i], rows[i], scale=one[3], n=n,
                            ld_mult=-5, ld_dtype=torch.float32, w_dtype=w_dtype)
        _same(w[i], w1)
        _same(ld[i], ld1)
        g1 = torch.autograd.grad((w1 * gw[i]).sum() + (ld1 * gld[i]).sum(), one)
        for g, g_one in zip(grads, g1):
            _same(g[i], g_one)
        dense = reference.lu_weight(torch.eye(c, dtype=torch.float64)[rows[i].argsort()].T,
                                    lower[i], upper[i], log_s[i], sign[i]).detach()
        assert_close(w[i], dense, w_dtype or torch.float64)
        want_ld = -5 * (torch.linalg.slogdet(dense)[1] + scale[i].abs().log().sum())
        torch.testing.assert_close(ld[i].double(), want_ld.expand(n).detach(), rtol=1e-6, atol=1e-5)


def test_lu_weight_stack_gradcheck_and_stride_zero_layers(backend):
    """float64 gradcheck of a stack (K=2, C=3); a stack that is one layer expanded
    (stride 0 between layers) gives that layer twice."""
    torch.manual_seed(2)
    lower, upper, log_s, sign, rows, scale = _stack_of(2, 3)
    leaves = [t.clone().requires_grad_() for t in (lower, upper, log_s, scale)]

    def f(lo, up, ls, sc):
        return lu_weight(lo, up, ls, sign, rows, scale=sc, n=2, ld_mult=3)

    assert torch.autograd.gradcheck(f, leaves)
    w, ld = lu_weight(lower[0].expand(2, 3, 3), upper[0].expand(2, 3, 3), log_s[0].expand(2, 3),
                      sign[0].expand(2, 3), rows[0].expand(2, 3), scale=scale[0].expand(2, 1, 3, 1, 1),
                      n=2, ld_mult=3)
    w1, ld1 = lu_weight(lower[0], upper[0], log_s[0], sign[0], rows[0], scale=scale[0], n=2,
                        ld_mult=3)
    for i in (0, 1):
        _same(w[i], w1)
        _same(ld[i], ld1)


@pytest.mark.parametrize("stacked", [False, True])
def test_lu_weight_scale_in_any_shape_of_c_values(backend, stacked):
    """``scale`` is C values in any shape (the contract the argument checks state): a
    (C, 1) column, contiguous or not, gives what the (1, C, 1, 1) ActNorm parameter gives,
    gradient included, for one layer and for a stack of one (K=1). The Triton launch took
    every 2-D scale for a (K, C) stack and refused (C, 1) with an AssertionError."""
    c = 4
    lower, upper, log_s, sign, rows, _, scale = _lu(c)
    if stacked:
        lower, upper, log_s, sign, rows = (t.unsqueeze(0) for t in (lower, upper, log_s, sign, rows))
    want_leaf = scale.clone().requires_grad_()
    w0, ld0 = lu_weight(lower, upper, log_s, sign, rows, scale=want_leaf, n=3, ld_mult=5)
    (g0,) = torch.autograd.grad(ld0.sum() * 2 + w0.sum(), want_leaf)
    wide = torch.zeros(c, 2, dtype=scale.dtype, device=DEVICE)
    wide[:, 0] = scale.reshape(c)
    for column in (scale.reshape(c, 1), wide[:, :1]):  # contiguous, then stride (2, 1)
        leaf = column.detach().clone() if column.is_contiguous() else column.detach()
        leaf.requires_grad_()
        w, ld = lu_weight(lower, upper, log_s, sign, rows, scale=leaf, n=3, ld_mult=5)
        (g,) = torch.autograd.grad(ld.sum() * 2 + w.sum(), leaf)
        _same(w, w0)
        _same(ld, ld0)
        assert g.shape == (c, 1)
        assert_close(g.reshape(c), g0.reshape(c), torch.float64)


@pytest.mark.parametrize("ld_dtype", [torch.bfloat16, torch.float16])
def test_lu_weight_half_precision_logdet(backend, ld_dtype):
    """A 16-bit ``ld_dtype``: the float64 log-det rounded once into it."""
    lower, upper, log_s, sign, rows, perm, scale = _lu(9, torch.float32)
    _, ld = lu_weight(lower, upper, log_s, sign, rows, scale=scale, n=3, ld_mult=7,
                      ld_dtype=ld_dtype)
    want = 7 * (log_s.double().sum() + torch.log(scale.double().abs()).sum())
    assert ld.dtype == ld_dtype and ld.shape == (3,)
    torch.testing.assert_close(ld.double(), want.expand(3), rtol=torch.finfo(ld_dtype).eps,
                               atol=0)


def test_lu_weight_bitwise_deterministic(backend):
    c = 40
    lower, upper, log_s, sign, rows, _, scale = _lu(c)
    g = torch.cos(torch.arange(c * c, device=DEVICE, dtype=torch.float64)).reshape(c, c)

    def run():
        leaves = [t.clone().requires_grad_() for t in (lower, upper, log_s, scale)]
        w, ld = lu_weight(leaves[0], leaves[1], leaves[2], sign, rows, scale=leaves[3], n=5,
                          ld_mult=7)
        grads = torch.autograd.grad((w * g).sum() + (ld * torch.arange(5.0, device=DEVICE)).sum(), leaves)
        return [w.detach(), ld.detach(), *grads]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_flowstep_training_uses_one_lu_launch_and_matches_parts():
    """In training the FlowStep's W and whole log-det come from lu_weight; same gradients
    on both backends."""
    step = ff.FlowStep(6, filter_size=8).double().to(DEVICE)
    step.actnorm.initialized.fill_(1)
    step.actnorm._initialized = True
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64, device=DEVICE)
    results = []
    for mode in ("triton", "reference"):
        with ff.use_backend(mode):
            xx = x.clone().requires_grad_()
            y, ld = step(xx)
            grads = torch.autograd.grad((y * y).sum() + ld.sum(), [xx, *step.parameters()])
        results.append((y.detach(), ld.detach(), grads))
    (y1, ld1, g1), (y2, ld2, g2) = results
    assert_close(y1, y2, torch.float64)
    assert_close(ld1, ld2, torch.float64)
    for a, b in zip(g1, g2):
        assert_close(a, b, torch.float64, rtol=1e-9, atol=1e-9)


def test_lu_weight_bad_inputs():
    lower, upper, log_s, sign, rows, _, scale = _lu(4)
    with pytest.raises(ValueError, match=r"^upper: expected shape \(4, 4\).*\(4, 3\)"):
        lu_weight(lower, upper[:, :3], log_s, sign, rows)
    with pytest.raises(ValueError, match=r"^log_s: expected a 1-D tensor \(C,\) or a stack "
                                         r"\(K, C\).*\(1, 1, 4\)"):
        lu_weight(lower, upper, log_s[None, None], sign, rows)
    with pytest.raises(ValueError, match=r"^lower: expected shape \(1, 4, 4\).*\(4, 4\)"):
        lu_weight(lower, upper, log_s[None], sign, rows)
    with pytest.raises(ValueError, match=r"^sign_s: expected shape \(2, 4\)"):
        lu_weight(lower.expand(2, 4, 4), upper.expand(2, 4, 4), log_s.expand(2, 4), sign, rows)
    with pytest.raises(ValueError, match=r"^scale: expected 4 values per layer.*2 layers"):
        lu_weight(lower.expand(2, 4, 4), upper.expand(2, 4, 4), log_s.expand(2, 4),
                  sign.expand(2, 4), rows.expand(2, 4), scale=scale)
    with pytest.raises(TypeError, match=r"^rows: expected an int64 or int32 tensor.*float64"):
        lu_weight(lower, upper, log_s, sign, rows.double())
    with pytest.raises(ValueError, match=r"^rows: expected shape \(4,\), got \(3,\)"):
        lu_weight(lower, upper, log_s, sign, rows[:3])
    with pytest.raises(ValueError, match=r"^scale: expected 4 values.*\(5,\)"):
        lu_weight(lower, upper, log_s, sign, rows, scale=torch.ones(5, device=DEVICE))
    with pytest.raises(TypeError, match=r"^lower: expected a floating-point"):
        lu_weight(torch.ones(4, 4, dtype=torch.int64), upper, log_s, sign, rows)
    with pytest.raises(TypeError, match=r"^ld_dtype: expected a floating-point"):
        lu_weight(lower, upper, log_s, sign, rows, ld_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^n: expected a sample count"):
        lu_weight(lower, upper, log_s, sign, rows, n=-1)
    with pytest.raises(TypeError, match=r"^w_dtype: expected None, torch.float64 or torch.float32"):
        lu_weight(lower, upper, log_s, sign, rows, w_dtype=torch.bfloat16)


@pytest.mark.parametrize("reverse", [False, True])
def test_mix_backward_no_pixels(backend, reverse):
    """N = 0: the parameter gradients are zeros (the finishing launch over no partials)."""
    x = torch.randn(0, 3, 2, 2, device=DEVICE, requires_grad=True)
    params = [torch.randn(3, 3, device=DEVICE), torch.randn(3, device=DEVICE), torch.rand(3, device=DEVICE) + 0.5]
    for variant in ((0, 1, 2), (0,), (1, 2)):
        leaves = [p.clone().requires_grad_() if i in variant else None for i, p in enumerate(params)]
        out = ff.channel_mix(x, leaves[0], loc=leaves[1], scale=leaves[2], reverse=reverse)
        grads = torch.autograd.grad(out.sum(), [t for t in leaves if t is not None])
        for g, t in zip(grads, [t for t in leaves if t is not None]):
            assert g.shape == t.shape and torch.count_nonzero(g) == 0


def test_reference_inverse_batched_matches_one_by_one_and_the_explicit_inverse():
    """lu_inverse_from_rows on a stack of K factor sets (Glow's blocks assemble all their
    steps' W^-1 in one call) gives each matrix's own result, and torch.linalg.inv of the
    explicitly built W (an independent oracle); int32 rows are taken as well."""
    torch.manual_seed(5)
    k, c, d64 = 4, 7, dict(dtype=torch.float64)
    rows = torch.stack([torch.randperm(c) for _ in range(k)])
    lower, upper = torch.randn(k, c, c, **d64), torch.randn(k, c, c, **d64)
    log_s, sign = 0.3 * torch.randn(k, c, **d64), torch.randn(k, c).sign()
    got = reference.lu_inverse_from_rows(rows.int(), lower, upper, log_s, sign)
    assert got.shape == (k, c, c) and got.dtype == torch.float64
    for i in range(k):
        one = reference.lu_inverse_from_rows(rows[i], lower[i], upper[i], log_s[i], sign[i])
        torch.testing.assert_close(got[i], one, rtol=1e-13, atol=1e-13)
        m = (torch.tril(lower[i], -1) + torch.eye(c, **d64)) @ (
            torch.triu(upper[i], 1) + torch.diag(sign[i].double() * torch.exp(log_s[i])))
        torch.testing.assert_close(got[i], torch.linalg.inv(m[rows[i]]), rtol=1e-10, atol=1e-12)


def test_reference_inverse_gradients_match_the_explicit_inverse():
    """W^-1 from two triangular solves (reading only the triangles it needs): value and
    gradients in lower, upper and log_s against torch.linalg.inv of the explicitly masked W
    (an independent oracle), with junk in the entries the factors ignore."""
    torch.manual_seed(3)
    c, d64 = 6, dict(dtype=torch.float64)
    rows = torch.randperm(c)
    perm = torch.eye(c, **d64)[rows.argsort()].T.contiguous()  # W[i] = M[rows[i]]
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0], **d64)
    leaves = [torch.randn(c, c, **d64), torch.randn(c, c, **d64), 0.3 * torch.randn(c, **d64)]
    leaves = [t.requires_grad_() for t in leaves]
    probe = torch.randn(c, c, **d64)

    def explicit(lower, upper, log_s):
        m = (torch.tril(lower, -1) + torch.eye(c, **d64)) @ (
            torch.triu(upper, 1) + torch.diag(sign * torch.exp(log_s)))
        return torch.linalg.inv(m[rows])

    want = explicit(*leaves)
    got = reference.lu_inverse_from_rows(rows, *leaves, sign)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(reference.lu_inverse_weight(perm, *leaves, sign), want,
                               rtol=1e-10, atol=1e-12)
    g_want = torch.autograd.grad((want * probe).sum(), leaves)
    g_got = torch.autograd.grad((got * probe).sum(), leaves)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert g_got[0].triu().abs().max() == 0 and g_got[1].tril(-1).abs().max() == 0
