"""The Gaussian kernel's in-kernel noise: Philox words through a Box-Muller with a fast
sin/cos. Its statistics (mean, variance, neighbour correlations, tails, the distribution as a
whole), its reproducibility (same seed, forward and backward, any slice of rows), and the
accuracy of the sin/cos it uses."""

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from fastflow.kernels import gaussian as ga

# the launchers are called directly: on a GPU machine their tensors must be CUDA ones
pytestmark = pytest.mark.usefixtures("on_device")

N, D = 64, 1024  # 65536 draws: 5 sigma of a mean is 0.02


def _noise(seed, n=N, d=D):
    """The kernel's noise: z = mu + exp(0) * eps with mu = 0 is eps itself."""
    mu = torch.zeros(n, d)
    z, _ = ga.reparam_kl_forward(mu, torch.zeros(n, d), None, torch.tensor([seed]), "none")
    return z


@pytest.fixture(scope="module")
def z():
    return _noise(2**62 + 987654321).double()


def test_mean_and_variance(z):
    m = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(m)
    assert abs(z.var().item() - 1.0) < 5 * math.sqrt(2 / m)
    assert abs((z ** 4).mean().item() - 3.0) < 5 * math.sqrt(96 / m)  # kurtosis: Var(z^4) = 96


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 5])
def test_neighbours_are_uncorrelated(z, lag):
    """Lags 1-3 pair the lanes of one Philox call (1: the two normals of a Box-Muller),
    4 and 5 neighbouring calls; also their squares (a Box-Muller pair shares its radius)."""
    a, b = z[:, :-lag].flatten(), z[:, lag:].flatten()
    lim = 5 / math.sqrt(a.numel())
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < lim
    assert abs(torch.corrcoef(torch.stack([a * a, b * b]))[0, 1].item()) < lim


def test_rows_are_uncorrelated(z):
    a, b = z[:-1].flatten(), z[1:].flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / math.sqrt(a.numel())


@pytest.mark.parametrize("t", [1.0, 2.0, 3.0, 4.0])
def test_tails(z, t):
    m = z.numel()
    p = math.erfc(t / math.sqrt(2))  # P(|z| > t)
    frac = (z.abs() > t).double().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / m) + 2 / m, (t, frac, p)


def test_distribution_and_range(z):
    """Kolmogorov-Smirnov distance to the normal CDF below its 0.1% critical value, and no
    value beyond the generator's bound sqrt(-2 log 2^-24) = 5.77."""
    x = np.sort(z.flatten().cpu().numpy())
    m = x.size
    cdf = 0.5 * (1 + torch.erf(torch.from_numpy(x) / math.sqrt(2))).numpy()
    ks = max((np.arange(1, m + 1) / m - cdf).max(), (cdf - np.arange(m) / m).max())
    assert ks < 1.95 / math.sqrt(m), ks
    assert z.abs().max().item() <= math.sqrt(-2 * math.log(2.0**-24)) + 1e-4


def test_reproducible_and_a_function_of_position():
    seed = 2**62 + 5
    a = _noise(seed, 9, 37)
    assert torch.equal(a, _noise(seed, 9, 37))
    assert torch.equal(a[:4], _noise(seed, 4, 37))  # row n's noise depends on (seed, n, d) only
    assert not torch.equal(a, _noise(seed + 1, 9, 37))


def test_backward_regenerates_the_forward_noise():
    n, d, seed = 6, 41, torch.tensor([2**62 + 77])
    mu, lv = torch.zeros(n, d), torch.zeros(n, d)
    z, _ = ga.reparam_kl_forward(mu, lv, None, seed, "none")  # z = eps
    _, dlv = ga.reparam_kl_backward(torch.ones(n, d), torch.zeros(n), mu, lv, None, seed, "none")
    assert torch.equal(2 * dlv, z)  # dlogvar = 0.5 * dz * eps * exp(0)


def test_wide_counters_give_the_same_noise():
    z = _noise(2**62 + 3, 8, 256)
    zw, _ = ga.reparam_kl_forward(torch.zeros(8, 256), torch.zeros(8, 256), None,
                                  torch.tensor([2**62 + 3]), "none", force_wide=True)
    assert torch.equal(z, zw)  # counters below 2^32: the high word mixes in nothing


@triton.jit
def _sincos_kernel(u_ptr, s_ptr, c_ptr, M, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    u = tl.load(u_ptr + i, mask=i < M, other=0.0)
    s, c = ga._sincos_2pi(u)
    tl.store(s_ptr + i, s, mask=i < M)
    tl.store(c_ptr + i, c, mask=i < M)


def test_sincos_2pi_accuracy():
    """Every quarter turn, its edges and a dense grid of u on the generator's 2^-24 grid."""
    k = torch.arange(0, 2**24, 97, dtype=torch.float64)
    edges = torch.tensor([0, 1, 2**21 - 1, 2**21, 2**21 + 1, 2**22 - 1, 2**22, 2**22 + 1,
                          3 * 2**22, 3 * 2**22 + 1, 7 * 2**21 + 1, 2**24 - 1], dtype=torch.float64)
    u = torch.cat([k, edges]) / 2**24
    u32 = u.float()
    s, c = torch.empty_like(u32), torch.empty_like(u32)
    _sincos_kernel[(triton.cdiv(u.numel(), 1024),)](u32, s, c, u.numel(), BLOCK=1024)
    ang = 2 * math.pi * u32.double()
    assert (s.double() - torch.sin(ang)).abs().max().item() < 3e-7
    assert (c.double() - torch.cos(ang)).abs().max().item() < 3e-7
