"""Tests found by mutation testing: each catches a realistic one-line kernel bug that the
rest of the suite let through (named in its docstring), against the float64 reference, at
small shapes that still span several tiles, chunks or blocks. The launchers are called
directly, as in the other kernel-level tests."""

import pytest
import torch

from conftest import assert_close
from fastflow import reference
from fastflow.kernels import channel_mix as cm
from fastflow.kernels import lu_weight as lw
from fastflow.kernels import tarflow as tk

# the launchers are called directly: on a GPU machine their tensors must be CUDA ones
pytestmark = pytest.mark.usefixtures("on_device")


# --------------------------------------------------------------------------------------
# Channel mix: the backward's reduction
# --------------------------------------------------------------------------------------


def test_split_param_grads_non_square_several_chunks_and_tiles():
    """The parameter gradients of a non-square (Co=24, C=20) forward mix with ActNorm and a
    second incoming gradient on 18 channels (channel_mix_split's head), over 2 x 2 tiles of
    G and several chunks of pixels. Caught: the partial gsum stored at ``chunk * C``
    instead of ``chunk * CO`` (the chunks' partials overlap when C != Co), and the head's
    gradient loaded by the input-channel index ``k`` instead of ``o`` (the same tile only
    when o and k tiles coincide, as in every square single-tile test)."""
    n, c, co, h, w_, c2 = 2, 20, 24, 8, 8, 18
    red = cm.reduce_config(n, c, co, h * w_, torch.float32, diag=False)
    assert red.extra["N_CHUNKS"] >= 2 and red.extra["N_OT"] >= 2 and red.extra["N_KT"] >= 2, red
    x = torch.randn(n, c, h, w_) + 0.25
    g, g2 = torch.randn(n, co, h, w_), torch.randn(n, c2, h, w_)
    a = torch.randn(co, c) / c ** 0.5
    loc, scale = 0.3 * torch.randn(c), torch.rand(c) + 0.5
    d_a, d_l, d_s = torch.empty(co, c), torch.empty(c), torch.empty(c)
    cm.mix_param_grads(g, x, a, scale, loc, reverse=False, d_a=d_a, d_loc=d_l, d_scale=d_s,
                       grad2=g2)
    leaves = [t.double().requires_grad_() for t in (a, loc, scale)]
    g_total = g.double().clone()
    g_total[:, :c2] += g2.double()
    want = torch.autograd.grad(reference.actnorm_mix(x.double(), *leaves), leaves, g_total)
    for name, got, ref in zip(("d_weight", "d_loc", "d_scale"), (d_a, d_l, d_s), want):
        assert_close(got, ref, torch.float32, rtol=1e-5, atol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduce_tl_dot_tiles_get_at_least_4_warps(dtype):
    """The tl.dot reduction runs at 4 warps or more (``reduce_config``'s ``lo=4``): at 2,
    the 16 x 16 x 64 specialisation adding the head's gradient spilled under triton 3.6,
    which only the GPU image's compiler shows. Caught: ``lo=2`` (16 x 16 tiles got 2)."""
    for c, hw in ((3, 64), (12, 256), (16, 1024), (20, 63), (48, 4096)):
        red = cm.reduce_config(4, c, c, hw, dtype, diag=False)
        assert red.num_warps >= 4, (c, hw, red)


# --------------------------------------------------------------------------------------
# LU weight
# --------------------------------------------------------------------------------------


def _lu_inputs(c, k=None):
    shape = (c,) if k is None else (k, c)
    lower = torch.randn(*shape[:-1], c, c, dtype=torch.float64)
    upper = torch.randn(*shape[:-1], c, c, dtype=torch.float64)
    log_s = 0.1 * torch.randn(shape, dtype=torch.float64)
    sign = torch.randn(shape).sign().double()
    rows = torch.stack([torch.randperm(c) for _ in range(k or 1)])
    rows = rows[0] if k is None else rows
    return lower, upper, log_s, sign, rows


def test_lu_logdet_past_one_block_of_samples_and_a_strided_scale():
    """N = 200 samples (two BLOCK_N = 128 blocks of log-det values) and a scale read with
    stride 2 next to a contiguous log_s: the log-det of every sample and d log_s, d scale
    from a per-sample d logdet, against the float64 reference. Caught: the log-det stored
    for the first 128 samples only; d logdet summed over the first 128 only; the scale
    read with log_s's stride."""
    c, n, mult = 5, 200, 3
    lower, upper, log_s, sign, rows = _lu_inputs(c)
    scale = torch.stack([torch.rand(c, dtype=torch.float64) + 0.5,
                         torch.full((c,), 7.0, dtype=torch.float64)], 1)[:, 0]
    assert scale.stride() == (2,) and log_s.stride() == (1,)
    w = torch.empty(c, c, dtype=torch.float64)
    ld = torch.full((n,), float("nan"), dtype=torch.float64)  # every sample must be written
    lw.lu_weight_forward(lower, upper, log_s, sign, rows, scale, w, ld, ld_mult=mult)
    leaves = [t.clone().requires_grad_() for t in (log_s, scale)]
    w_r, ld_r = reference.lu_weight_logdet(rows, lower, upper, leaves[0], sign, leaves[1], n=n,
                                           ld_mult=mult)
    assert_close(ld, ld_r, torch.float64)
    gw, gld = torch.randn(c, c, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    outs = [torch.empty(c, c, dtype=torch.float64), torch.empty(c, c, dtype=torch.float64),
            torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)]
    lw.lu_weight_backward(gw, gld, lower, upper, log_s, sign, rows, scale, *outs, ld_mult=mult)
    want = torch.autograd.grad((w_r * gw).sum() + (ld_r * gld).sum(), leaves)
    assert_close(outs[2], want[0], torch.float64, msg="d log_s")
    assert_close(outs[3], want[1], torch.float64, msg="d scale")


def test_lu_backward_stack_with_a_permuted_dw():
    """A stack of K=3 layers whose d W is a permuted view (layers C values apart, not
    C * C): each layer's gradients, those of the float64 reference. Caught: d W's layer
    offset taken as ``b * C * C`` (a contiguous stack's) instead of its stride."""
    k, c, n, mult = 3, 4, 2, -2
    lower, upper, log_s, sign, rows = _lu_inputs(c, k)
    scale = torch.rand(k, c, dtype=torch.float64) + 0.5
    gw = torch.randn(c, k, c, dtype=torch.float64).permute(1, 0, 2)
    assert gw.stride(0) == c
    gld = torch.randn(k, n, dtype=torch.float64)
    outs = [torch.empty(k, c, c, dtype=torch.float64), torch.empty(k, c, c, dtype=torch.float64),
            torch.empty(k, c, dtype=torch.float64), torch.empty(k, c, dtype=torch.float64)]
    lw.lu_weight_backward(gw, gld, lower, upper, log_s, sign, rows, scale, *outs, ld_mult=mult)
    leaves = [t.clone().requires_grad_() for t in (lower, upper, log_s, scale)]
    w_r, ld_r = reference.lu_weight_logdet(rows, leaves[0], leaves[1], leaves[2], sign,
                                           leaves[3], n=n, ld_mult=mult)
    want = torch.autograd.grad((w_r * gw).sum() + (ld_r * gld).sum(), leaves)
    for name, got, ref in zip(("d lower", "d upper", "d log_s", "d scale"), outs, want):
        assert_close(got, ref, torch.float64, msg=name)


# --------------------------------------------------------------------------------------
# TarFlow head
# --------------------------------------------------------------------------------------


def test_tarflow_partials_of_several_samples_and_token_tiles():
    """3 samples of 300 tokens of width 3 (two token tiles each): the log-det of every
    sample, and the Jacobi update's largest change wherever it lies, against the float64
    reference. Caught: the per-(sample, tile) partials of the log-det or of the change
    stored at ``n + tile`` instead of ``n * N_TTILES + tile`` (samples overwrite each
    other's tiles)."""
    n, t_count, d = 3, 300, 3
    cfg = tk.all_token_launch(n, t_count, d, torch.float64)
    assert cfg.extra["N_TTILES"] >= 2, cfg
    z = torch.randn(n, t_count, d, dtype=torch.float64)
    h = torch.randn(n, t_count, 2 * d, dtype=torch.float64)
    _, ld = tk.head_forward(z, h, clamp=2.0, order="reversed", reverse=False)
    _, ld_r = reference.tarflow_head(z, h, clamp=2.0, order="reversed")
    assert_close(ld, ld_r, torch.float64)
    want, _ = reference.tarflow_head(z, h, clamp=2.0, order="reversed", reverse=True)
    block_t = cfg.blocks["BLOCK_T"]
    for i in range(n):  # the largest change in each sample's first and last tile in turn
        for tok in (0, t_count - 1):
            old = want.clone()
            old[i, tok, 1] += 1.0 + i + tok / block_t
            _, _, change = tk.head_forward(z, h, clamp=2.0, order="reversed", reverse=True,
                                           out=old, delta=True)
            assert_close(change, torch.tensor(1.0 + i + tok / block_t, dtype=torch.float64),
                         torch.float64, msg=f"sample {i}, token {tok}")


def test_tarflow_guided_forward_from_a_strided_input():
    """A guided all-token launch (h of 2N rows, both halves of the output written) whose
    input is a permuted view (samples D values apart, the output's T * D): both halves of
    the output against the float64 reference. Caught: the unconditional half stored
    ``N`` rows on by the input's sample stride instead of the output's."""
    n, t_count, d = 2, 5, 3
    z = torch.randn(t_count, n, d, dtype=torch.float64).permute(1, 0, 2)
    h = torch.randn(2 * n, t_count, 2 * d, dtype=torch.float64)
    assert z.stride(0) == d
    out, ld = tk.head_forward(z, h, clamp=1.5, order="reversed", reverse=True, guidance=0.7,
                              guided=True)
    want, ld_r = reference.tarflow_head(z, h, clamp=1.5, order="reversed", reverse=True,
                                        guidance=0.7, guided=True)
    assert_close(out[:n], want, torch.float64, msg="conditional half")
    assert_close(out[n:], want, torch.float64, msg="unconditional half")
    assert_close(ld, ld_r, torch.float64)
