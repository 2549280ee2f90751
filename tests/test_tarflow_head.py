"""The TarFlow affine head: forward, inverse, backward and the sampler's one-token and
Jacobi updates against the float64 reference, on the Triton kernels (interpreted on CPU)
and the reference backend."""

import pytest
import torch

import fastflow as ff
from fastflow import reference
from fastflow.ops import tarflow as ops

from conftest import DEVICE, FLOAT_DTYPES, assert_close

# (N, T, D): N = 1, odd and prime sizes, D over one 128-wide tile, T over one token tile
SHAPES = [(1, 1, 1), (3, 7, 5), (2, 13, 17), (1, 2, 131), (2, 37, 3)]
CLAMPS = [None, 1.5]


def make(shape, dtype=torch.float32, h_rows=1, scale_h=1.0):
    n, t, d = shape
    x = torch.randn(shape, device=DEVICE).to(dtype)
    h = (scale_h * torch.randn(h_rows * n, t, 2 * d, device=DEVICE)).to(dtype)
    return x, h


def check_against_reference(x, h, **kw):
    dtype = x.dtype
    x = x.clone().requires_grad_(True)
    h = h.clone().requires_grad_(True)
    out, ld = ff.tarflow_head(x, h, **kw)
    x64 = x.detach().double().requires_grad_(True)
    h64 = h.detach().double().requires_grad_(True)
    out_r, ld_r = reference.tarflow_head(x64, h64, **kw)
    assert out.dtype == dtype and out.shape == x.shape
    assert ld.shape == (x.shape[0],)
    assert ld.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, out_r, dtype, msg=f"output {kw}")
    n_terms = x.shape[1] * x.shape[2]
    rtol = 1e-10 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(ld.double(), ld_r, rtol=rtol, atol=rtol * n_terms ** 0.5)
    g, gld = torch.randn_like(out), torch.randn_like(ld)
    gx, gh = torch.autograd.grad((out, ld), (x, h), (g, gld))
    gx_r, gh_r = torch.autograd.grad((out_r, ld_r), (x64, h64), (g.double(), gld.double()))
    assert gx.dtype == dtype and gh.dtype == dtype
    assert_close(gx, gx_r, dtype, msg="grad x")
    assert_close(gh, gh_r, dtype, msg="grad h")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("clamp", CLAMPS)
@pytest.mark.parametrize("order", reference.TARFLOW_ORDERS)
def test_every_variant_and_dtype_matches_reference(backend, dtype, clamp, order):
    x, h = make((3, 7, 5), dtype)
    for reverse in (False, True):
        check_against_reference(x, h, clamp=clamp, order=order, reverse=reverse)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes_match_reference(backend, shape):
    x, h = make(shape, torch.float64)
    for reverse in (False, True):
        check_against_reference(x, h, clamp=2.0, order="reversed", reverse=reverse)


def test_large_parameters_are_stable(backend):
    """A saturated clamp and large shifts: no NaN, still equal to the reference."""
    x, h = make((2, 5, 7), scale_h=30.0)
    for reverse in (False, True):
        check_against_reference(x, h, clamp=3.0, order="same", reverse=reverse)


@pytest.mark.parametrize("order", reference.TARFLOW_ORDERS)
def test_inverse_of_forward_recovers_x(backend, order):
    x, h = make((3, 11, 6), torch.float64)
    z, ld = ff.tarflow_head(x, h, clamp=2.0, order=order)
    x2, ld_inv = ff.tarflow_head(z, h, clamp=2.0, order=order, reverse=True)
    torch.testing.assert_close(x2, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld_inv, -ld, rtol=1e-12, atol=1e-12)
    if order == "reversed":  # the next block's permutation is in the store
        z_same, _ = ff.tarflow_head(x, h, clamp=2.0)
        assert torch.equal(z, z_same.flip(1))


def test_token_zero_and_last_row_of_h(backend):
    """Token 0 passes through (a = b = 0); h's last row predicts nothing: zero gradient."""
    x, h = make((2, 5, 3), torch.float64)
    h = h.requires_grad_(True)
    z, _ = ff.tarflow_head(x, h)
    assert torch.equal(z[:, 0], x[:, 0])
    (z.sum() + z.square().sum()).backward()
    assert torch.equal(h.grad[:, -1], torch.zeros_like(h.grad[:, -1]))


@pytest.mark.parametrize("clamp,order", [(None, "same"), (1.5, "reversed")])
def test_gradcheck_float64(backend, clamp, order):
    x, h = make((2, 3, 2), torch.float64)
    x.requires_grad_(True)
    h.requires_grad_(True)
    for reverse in (False, True):
        f = lambda a, b: ff.tarflow_head(a, b, clamp=clamp, order=order, reverse=reverse)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, h))


@pytest.mark.parametrize("x_dtype,h_dtype", [(torch.float64, torch.float32),
                                             (torch.float32, torch.float64),
                                             (torch.bfloat16, torch.float64)], ids=str)
@pytest.mark.parametrize("reverse", [False, True])
def test_mixed_dtypes_compute_in_the_dtype_of_x(backend, x_dtype, h_dtype, reverse):
    """h in another dtype than x: the head computes in x's compute dtype (float64 for
    float64 x, float32 otherwise), as the contract says: the log-det's dtype follows x,
    and a float64 x is not rounded through a float32 h's precision."""
    x, h = make((2, 5, 3), x_dtype)
    h = (torch.randn(h.shape, device=DEVICE) * 0.7).to(h_dtype)
    out, ld = ff.tarflow_head(x, h, clamp=2.0, order="reversed", reverse=reverse)
    out_r, ld_r = reference.tarflow_head(x.double(), h.double(), clamp=2.0, order="reversed",
                                         reverse=reverse)
    cd = torch.float64 if x_dtype == torch.float64 else torch.float32
    assert out.dtype == x_dtype and ld.dtype == cd and ld.shape == (2,)
    assert_close(out, out_r, x_dtype)
    assert_close(ld, ld_r, cd)


def test_noncontiguous_inputs_and_expanded_gradients(backend):
    x, h = make((2, 6, 5))
    y0, ld0 = ff.tarflow_head(x, h, clamp=2.0, order="reversed")
    wide_x = torch.randn(2, 12, 9, device=DEVICE)[:, ::2, 2:7]
    wide_x.copy_(x)
    wide_h = torch.randn(2, 6, 10, device=DEVICE).transpose(1, 2).contiguous().transpose(1, 2)
    wide_h.copy_(h)
    assert not wide_x.is_contiguous() and not wide_h.is_contiguous()
    xg, hg = wide_x.detach().requires_grad_(True), wide_h.detach().requires_grad_(True)
    y, ld = ff.tarflow_head(xg, hg, clamp=2.0, order="reversed")
    torch.testing.assert_close(y, y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ld, ld0, rtol=1e-6, atol=1e-5)
    (y.sum() + ld.sum()).backward()  # stride-0 gradients
    xr, hr = x.clone().requires_grad_(True), h.clone().requires_grad_(True)
    y_r, ld_r = ff.tarflow_head(xr, hr, clamp=2.0, order="reversed")
    (y_r.sum() + ld_r.sum()).backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hg.grad, hr.grad, rtol=1e-6, atol=1e-6)


def test_two_runs_are_bitwise_equal(backend):
    """Several token tiles per sample: the log-det partials are added in a fixed order."""
    x, h = make((2, 300, 24))
    runs = []
    for _ in range(2):
        xg, hg = x.clone().requires_grad_(True), h.clone().requires_grad_(True)
        z, ld = ff.tarflow_head(xg, hg, clamp=2.0)
        (z.square().sum() + ld.sum()).backward()
        runs.append((z, ld, xg.grad, hg.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("order", reference.TARFLOW_ORDERS)
def test_token_tiles_on_the_grid_x_axis_give_the_same_results(monkeypatch, order):
    """Past 65535 token tiles (CUDA's limit on a grid's axis 1) the all-token kernels run
    on a (tiles, N) grid: the same values, bitwise, forward, backward and the Jacobi update
    (here forced with a limit of 1 on a few tiles: 2 x 37 tokens of width 130, 8 per tile)."""
    from fastflow.kernels import tarflow as tk

    if DEVICE == "cpu" and not ff.backend.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    x, h = make((2, 37, 130))
    gz, old = torch.randn_like(x), torch.randn_like(x)
    runs = []
    for limit in (tk.MAX_GRID_YZ, 1):
        monkeypatch.setattr(tk, "MAX_GRID_YZ", limit)
        cfg = tk.all_token_launch(2, 37, 130, torch.float32)
        assert cfg.blocks["TILES_ON_X"] == (limit == 1) and cfg.extra["N_TTILES"] == 5
        assert cfg.grid == ((5, 2) if limit == 1 else (2, 5))
        with ff.use_backend("triton"):
            xg, hg = x.clone().requires_grad_(True), h.clone().requires_grad_(True)
            z, ld = ff.tarflow_head(xg, hg, clamp=2.0, order=order)
            (z * gz).sum().add(ld.sum()).backward()
            buf = old.clone()
            head = ops.HeadSampler(z.detach(), None, None, None, clamp=2.0, order=order)
            change = head.jacobi(h, buf)
        runs.append((z, ld, xg.grad, hg.grad, buf, change))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    torch.testing.assert_close(runs[1][4], x, rtol=1e-4, atol=1e-4)  # the inverse of z


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("guidance", [0.0, 0.7])
@pytest.mark.parametrize("order", reference.TARFLOW_ORDERS)
def test_one_token_step_matches_reference(backend, dtype, guidance, order):
    """The sampler's per-token update, position on the device, against the reference."""
    n, t_count, d = 3, 5, 7
    guided = guidance != 0.0
    rows = 2 * n if guided else n
    z = torch.randn(n, t_count, d, device=DEVICE).to(dtype)
    x = torch.full_like(z, float("nan"))
    inp = torch.zeros(rows, d, dtype=dtype, device=DEVICE)
    pos = torch.zeros(1, dtype=torch.long, device=DEVICE)
    head = ops.HeadSampler(z, x, inp, pos, clamp=1.5, order=order, guidance=guidance,
                           guided=guided)
    head.first()
    z64 = z.double()
    stored = 0 if order == "same" else t_count - 1
    assert_close(x[:, 0], z64[:, stored], dtype)
    for r in range(rows // n):
        assert_close(inp[r * n:(r + 1) * n], z64[:, stored], dtype)
    for p in range(t_count - 1):
        h_last = torch.randn(rows, 2 * d, device=DEVICE).to(dtype)
        head.step(h_last)
        tok = torch.tensor([p + 1], device=DEVICE)
        want = reference.tarflow_token_inverse(z64, h_last.double().unsqueeze(1), tok, clamp=1.5,
                                               order=order, guidance=guidance, guided=guided)
        assert_close(x[:, p + 1], want[:, 0], dtype, msg=f"token {p + 1}")
        for r in range(rows // n):
            assert_close(inp[r * n:(r + 1) * n], want[:, 0], dtype)
        pos.add_(1)
    assert not torch.isnan(x).any()


@pytest.mark.parametrize("guidance", [0.0, 0.7])
def test_jacobi_update_matches_reference(backend, guidance):
    n, t_count, d = 2, 6, 5
    guided = guidance != 0.0
    rows = 2 * n if guided else n
    z = torch.randn(n, t_count, d, dtype=torch.float64, device=DEVICE)
    h = torch.randn(rows, t_count, 2 * d, dtype=torch.float64, device=DEVICE)
    old = torch.randn(n, t_count, d, dtype=torch.float64, device=DEVICE)
    buf = old.repeat(rows // n, 1, 1)
    head = ops.HeadSampler(z, None, None, None, clamp=2.0, order="reversed", guidance=guidance,
                           guided=guided)
    change = head.jacobi(h, buf)
    want, _ = reference.tarflow_head(z, h, clamp=2.0, order="reversed", reverse=True,
                                     guidance=guidance, guided=guided)
    for r in range(rows // n):
        torch.testing.assert_close(buf[r * n:(r + 1) * n], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(change, (want - old).abs().amax(), rtol=1e-12, atol=1e-12)


def test_jacobi_change_of_a_nan_iterate_is_inf(backend):
    """A NaN in the update (a diverged iterate) is reported as an infinite change on both
    paths. The compiled kernel's max drops NaN operands (the interpreter's numpy keeps
    them), so on a GPU a NaN iterate read as a change of 0: converged, sampling stopped."""
    n, t_count, d = 2, 5, 3
    z = torch.randn(n, t_count, d, device=DEVICE)
    h = torch.randn(n, t_count, 2 * d, device=DEVICE)
    h[1, 2, d + 1] = float("nan")  # one token's shift
    buf = torch.randn(n, t_count, d, device=DEVICE)
    head = ops.HeadSampler(z, None, None, None, clamp=2.0, guidance=0.0, guided=False)
    change = head.jacobi(h, buf)
    assert torch.isposinf(change), change
    assert torch.isnan(buf).any()  # the iterate itself keeps the NaN
    finite = torch.randn(n, t_count, 2 * d, device=DEVICE)
    assert torch.isfinite(head.jacobi(finite, torch.randn_like(buf)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("guidance", [0.0, 0.7])
def test_jacobi_change_at_a_16_bit_fixed_point_is_zero(backend, dtype, guidance):
    """The change is that of the stored iterate: a second update from the same h rewrites
    the same 16-bit values, a change of 0 on both paths. The kernel measured the float32
    update before its rounding against the stored value (up to half a 16-bit ulp, 0.03 in
    bfloat16 here), so a 16-bit Jacobi sampler never saw its fixed point and never stopped
    early for any tol under that."""
    n, t_count, d = 2, 5, 6
    guided = guidance != 0.0
    rows = 2 * n if guided else n
    z = torch.randn(n, t_count, d, device=DEVICE).to(dtype)
    h = torch.randn(rows, t_count, 2 * d, device=DEVICE).to(dtype)
    buf = torch.zeros(rows, t_count, d, dtype=dtype, device=DEVICE)
    head = ops.HeadSampler(z, None, None, None, clamp=2.0, guidance=guidance, guided=guided)
    first = head.jacobi(h, buf)
    assert first > 0
    again = buf.clone()
    assert head.jacobi(h, buf) == 0
    assert torch.equal(buf, again)


def test_guided_rows_past_2_31_elements():
    """Guidance reads the unconditional half of h, N rows on: N * stride(0) of h past 2^31
    was an int32 product in the kernels (it wrapped to a negative offset). h here is a view
    whose rows lie 2^30 elements apart in a 6 GiB float16 storage that is never written
    (only the rows read are touched); Triton path only (the reference would copy it)."""
    if DEVICE == "cpu" and not ff.backend.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    if DEVICE == "cuda" and torch.cuda.mem_get_info()[0] < 8 * 2**30:
        pytest.skip("needs 8 GB free on the GPU")
    n, t_count, d, stride = 2, 3, 4, 2**30
    z = torch.randn(n, t_count, d, device=DEVICE)
    small = torch.randn(2 * n, t_count, 2 * d, device=DEVICE).half()
    base = torch.empty(3 * stride + small[0].numel(), dtype=torch.float16, device=DEVICE)
    h = base.as_strided(small.shape, (stride, 2 * d, 1))
    for r in range(2 * n):
        h[r].copy_(small[r])
    want, _ = reference.tarflow_head(z, small.float(), clamp=2.0, reverse=True, guidance=0.7,
                                     guided=True)
    out = torch.zeros(2 * n, t_count, d, device=DEVICE)
    with ff.use_backend("triton"):
        head = ops.HeadSampler(z, None, None, None, clamp=2.0, guidance=0.7, guided=True)
        head.jacobi(h, out)
    torch.testing.assert_close(out[:n], want, rtol=1e-5, atol=1e-5)
    del base, h


def test_bad_inputs_name_the_argument():
    x, h = make((2, 3, 4))
    with pytest.raises(ValueError, match="h: expected shape"):
        ff.tarflow_head(x, h[:, :, :7])
    with pytest.raises(ValueError, match="x: expected a 3-D"):
        ff.tarflow_head(x[0], h)
    with pytest.raises(TypeError, match="x: expected a floating"):
        ff.tarflow_head(x.long(), h)
    with pytest.raises(ValueError, match="order"):
        ff.tarflow_head(x, h, order="flip")
    with pytest.raises(ValueError, match="clamp"):
        ff.tarflow_head(x, h, clamp=-1.0)
    for bad in (float("inf"), float("nan")):  # inf gave NaN: inf * tanh(a / inf)
        with pytest.raises(ValueError, match="clamp: expected None or a finite positive"):
            ff.tarflow_head(x, h, clamp=bad)
    with pytest.raises(TypeError, match="clamp: expected None or a finite positive"):
        ff.tarflow_head(x, h, clamp=True)  # was taken as 1
    with pytest.raises(TypeError, match="reverse: expected a bool"):
        ff.tarflow_head(x, h, reverse="False")  # was taken as true: the inverse
    with pytest.raises(ValueError, match="h: expected a tensor on x's device"):
        ff.tarflow_head(x, h.to("meta"))
