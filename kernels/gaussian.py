"""Gaussian reparameterisation fused with the KL divergence to the standard normal.

For mu, logvar (N, ...) walked as (N, D) rows:

    z  = mu + exp(logvar / 2) * eps
    kl = 0.5 * sum_d (exp(logvar) + mu^2 - 1 - logvar)          (per sample, shape (N,))

and, for upstream gradients dz (N, D) and dkl (N,) (or one value for "sum"/"mean"),

    dmu     = dz + dkl * mu
    dlogvar = 0.5 * dz * eps * exp(logvar / 2) + 0.5 * dkl * (exp(logvar) - 1)

Each direction is one pass over memory. The forward writes z and one partial KL sum per
(row, tile); the launcher adds the partials in a fixed order (bitwise reproducible, no
atomics).

Noise (``HAS_EPS=False``): Triton's counter-based Philox, keyed by a 64-bit seed that the
caller draws from torch's RNG and passes as a one-element int64 tensor on the device (read
by the kernel: no host round trip). Row n is padded to D4 = ceil(D / 4) groups of four
elements; group g of row n has the counter ``n * D4 + g`` and one ``tl.randint4x`` call
gives four 32-bit words, turned into the four standard normals of its elements (lane d % 4)
by two Box-Mullers: r = sqrt(-2 log u1), (r cos 2 pi u2, r sin 2 pi u2), with u1 in
(0, 1) on a 2^-23 grid (|z| <= 5.77: the normal's mass beyond is 8e-9) and sin / cos of
2 pi u2 from exact quarter turns and a polynomial on [-pi/4, pi/4] (``_sincos_2pi``, error
below 2e-7), instead of libdevice's precise sin / cos and their never-taken Payne-Hanek
range reduction (``tl.randn4x``). The noise of an element is thus a
pure function of (seed, n, d): the backward kernel regenerates it bit for bit instead of
reading a stored tensor. Counters are 32-bit; when N * D4 does not fit (``WIDE``) the high
32 bits of the counter are mixed into the key instead. The noise is float32 (Box-Muller on
float32 uniforms) for every input dtype; float64 inputs use it converted to float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import TARGET_PROGRAMS, Launch, compute_dtype, compute_type, rounded_for, warps_for

MAX_TILE = 2048  # elements per program at most: 8 per thread at 8 warps
MIN_TILE = 128  # elements per program at least: one Philox call (4 elements) per thread of a warp
TWO_PI = tl.constexpr(6.283185307179586)


@triton.jit
def _load_mu_logvar_eps(mu_ptr, lv_ptr, eps_ptr, seed_ptr, n, g, lane, d, inside, D4,
                        s_mu_n, s_mu_d, s_lv_n, s_lv_d, s_eps_n, s_eps_d,
                        HAS_EPS: tl.constexpr, WIDE: tl.constexpr, COMPUTE: tl.constexpr):
    """mu, logvar and the noise of one block, in the compute dtype: eps read when given,
    else drawn from (seed, element index), the same numbers in forward and backward."""
    m = tl.load(mu_ptr + n * s_mu_n + d * s_mu_d, mask=inside, other=0.0).to(COMPUTE)
    lv = tl.load(lv_ptr + n * s_lv_n + d * s_lv_d, mask=inside, other=0.0).to(COMPUTE)
    if HAS_EPS:
        e = tl.load(eps_ptr + n * s_eps_n + d * s_eps_d, mask=inside, other=0.0).to(COMPUTE)
    else:
        e = _noise(tl.load(seed_ptr), n * D4 + g, lane, WIDE).to(COMPUTE)
    return m, lv, e


@triton.jit
def _tile(pid, N, D, N_DTILES, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """Program ``pid``'s rows and its (BLOCK_N, BLOCK_G, 4) block of elements: row n,
    group g of four, lane; element d = 4 * g + lane."""
    rows = (pid // N_DTILES).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n = rows[:, None, None]
    g = ((pid % N_DTILES).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G))[None, :, None]
    lane = tl.arange(0, 4)[None, None, :]
    d = g * 4 + lane
    return rows, n, g, lane, d, (n < N) & (d < D)


@triton.jit
def _noise(seed, counter, lane, WIDE: tl.constexpr):
    """Standard normals for the elements 4 * counter + lane (counter int64, lane in 0..3)."""
    if WIDE:
        key = seed ^ (counter >> 32)
        ctr = (counter & 0xFFFFFFFF).to(tl.uint32)
    else:
        key = seed
        ctr = counter.to(tl.uint32)
    x0, x1, x2, x3 = tl.randint4x(key, ctr)  # one Philox call: four 32-bit words
    z0, z1 = _box_muller(x0, x1)
    z2, z3 = _box_muller(x2, x3)
    return tl.where(lane == 0, z0, tl.where(lane == 1, z1, tl.where(lane == 2, z2, z3)))


@triton.jit
def _sincos_2pi(u):
    """(sin 2 pi u, cos 2 pi u) in float32 for u in [0, 1) on a 2^-24 grid: the nearest
    quarter turn k is exact (u - k / 4 has no rounding), the rest a Taylor polynomial on
    [-pi/4, pi/4] (truncation error below 3e-9), then a rotation by k quarter turns."""
    k = tl.floor(u * 4.0 + 0.5)
    a = (u - k * 0.25) * TWO_PI
    a2 = a * a
    s = a * (1.0 + a2 * (-1.0 / 6.0 + a2 * (1.0 / 120.0 + a2 * (-1.0 / 5040.0 + a2 * (1.0 / 362880.0)))))
    c = 1.0 + a2 * (-0.5 + a2 * (1.0 / 24.0 + a2 * (-1.0 / 720.0 + a2 * (1.0 / 40320.0
                                                                          - a2 * (1.0 / 3628800.0)))))
    q = k.to(tl.int32) & 3  # k = 4 is a whole turn: q = 0
    sin = tl.where(q == 0, s, tl.where(q == 1, c, tl.where(q == 2, -s, -c)))
    cos = tl.where(q == 0, c, tl.where(q == 1, -s, tl.where(q == 2, -c, s)))
    return sin, cos


@triton.jit
def _box_muller(x1, x2):
    """Two independent standard normals (float32) from two uniform 32-bit words."""
    u1 = (x1 >> 9).to(tl.float32) * 1.1920928955078125e-07 + 5.960464477539063e-08  # (0, 1)
    u2 = (x2 >> 8).to(tl.float32) * 5.960464477539063e-08  # [0, 1)
    r = tl.sqrt(-2.0 * tl.log(u1))
    sin, cos = _sincos_2pi(u2)
    return r * cos, r * sin


@triton.jit
def _reparam_kl_fwd_kernel(
    mu_ptr,    # (N, D) means
    lv_ptr,    # (N, D) log-variances
    eps_ptr,   # (N, D) noise when HAS_EPS (else any pointer, never read)
    z_ptr,     # (N, D) samples (written)
    part_ptr,  # (N, N_DTILES) partial KL sums per tile (divided by N when MEAN), compute dtype
    seed_ptr,  # (1,) int64 Philox key when not HAS_EPS
    N, D, D4, N_DTILES,
    s_mu_n, s_mu_d, s_lv_n, s_lv_d, s_eps_n, s_eps_d, s_z_n, s_z_d,
    HAS_EPS: tl.constexpr, WIDE: tl.constexpr, MEAN: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):
    rows, n, g, lane, d, inside = _tile(tl.program_id(0), N, D, N_DTILES, BLOCK_N, BLOCK_G)
    m, lv, e = _load_mu_logvar_eps(mu_ptr, lv_ptr, eps_ptr, seed_ptr, n, g, lane, d, inside, D4,
                                   s_mu_n, s_mu_d, s_lv_n, s_lv_d, s_eps_n, s_eps_d,
                                   HAS_EPS, WIDE, COMPUTE)
    std = tl.exp(lv * 0.5)
    z = m + std * e
    tl.store(z_ptr + n * s_z_n + d * s_z_d, rounded_for(z, z_ptr), mask=inside)
    kl = tl.where(inside, 0.5 * (std * std + m * m - 1.0 - lv), 0.0)
    partial = tl.sum(tl.sum(kl, axis=2), axis=1)
    if MEAN:
        partial = partial / N
    tl.store(part_ptr + rows * N_DTILES + tl.program_id(0) % N_DTILES, partial, mask=rows < N)


@triton.jit
def _reparam_kl_bwd_kernel(
    dz_ptr,    # (N, D) gradient of z
    dkl_ptr,   # (N,) gradient of the per-sample KL; a single value (stride 0) for sum/mean
    mu_ptr,    # (N, D) means
    lv_ptr,    # (N, D) log-variances
    eps_ptr,   # (N, D) noise when HAS_EPS (else any pointer, never read)
    dmu_ptr,   # (N, D) gradient of mu (written)
    dlv_ptr,   # (N, D) gradient of logvar (written)
    seed_ptr,  # (1,) int64 Philox key when not HAS_EPS
    N, D, D4, N_DTILES, s_dkl,
    s_dz_n, s_dz_d, s_mu_n, s_mu_d, s_lv_n, s_lv_d, s_eps_n, s_eps_d,
    s_dmu_n, s_dmu_d, s_dlv_n, s_dlv_d,
    HAS_EPS: tl.constexpr, WIDE: tl.constexpr, MEAN: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):
    rows, n, g, lane, d, inside = _tile(tl.program_id(0), N, D, N_DTILES, BLOCK_N, BLOCK_G)
    gkl = tl.load(dkl_ptr + rows * s_dkl, mask=rows < N, other=0.0).to(COMPUTE)
    if MEAN:
        gkl = gkl / N
    gkl = gkl[:, None, None]
    gz = tl.load(dz_ptr + n * s_dz_n + d * s_dz_d, mask=inside, other=0.0).to(COMPUTE)
    m, lv, e = _load_mu_logvar_eps(mu_ptr, lv_ptr, eps_ptr, seed_ptr, n, g, lane, d, inside, D4,
                                   s_mu_n, s_mu_d, s_lv_n, s_lv_d, s_eps_n, s_eps_d,
                                   HAS_EPS, WIDE, COMPUTE)
    std = tl.exp(lv * 0.5)
    gmu = gz + gkl * m
    glv = 0.5 * (gz * e * std + gkl * (std * std - 1.0))
    tl.store(dmu_ptr + n * s_dmu_n + d * s_dmu_d, rounded_for(gmu, dmu_ptr), mask=inside)
    tl.store(dlv_ptr + n * s_dlv_n + d * s_dlv_d, rounded_for(glv, dlv_ptr), mask=inside)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _rows(t: torch.Tensor, n: int) -> tuple[torch.Tensor, int, int]:
    """(tensor, stride_n, stride_d) walking ``t`` as N rows of D elements. When the trailing
    dimensions merge into one (contiguous, sliced rows, broadcast stride-0 gradients...) the
    tensor is used as it is, with no view op; otherwise it is copied once."""
    dims = [(size, stride) for size, stride in zip(t.shape[1:], t.stride()[1:]) if size != 1]
    if all(a[1] == b[1] * b[0] for a, b in zip(dims, dims[1:])):
        return t, t.stride(0), dims[-1][1] if dims else 1
    t2 = t.reshape(n, -1)
    return t2, t2.stride(0), t2.stride(1)


def launch_config(n: int, d: int) -> Launch:
    """The launch of both kernels for mu (n, d): one program per (BLOCK_N rows, BLOCK_G groups
    of four elements) tile. ``extra``: D4 (groups per row), N_DTILES (tiles per row)."""
    d4 = triton.cdiv(d, 4)
    # tile elements: about total / TARGET_PROGRAMS so that a launch fills the device when
    # the work allows, a power of two in [MIN_TILE, MAX_TILE]
    per_program = triton.next_power_of_2(max(1, triton.cdiv(n * 4 * d4, TARGET_PROGRAMS)))
    tile = min(MAX_TILE, max(MIN_TILE, per_program))
    block_g = min(triton.next_power_of_2(d4), tile // 4)
    block_n = max(1, min(triton.next_power_of_2(n), tile // (4 * block_g)))
    n_dtiles = triton.cdiv(d4, block_g)
    # num_warps: one Philox call (four elements) per thread; num_stages 1: no loop
    return Launch(grid=(triton.cdiv(n, block_n) * n_dtiles,),
                  blocks={"BLOCK_N": block_n, "BLOCK_G": block_g},
                  num_warps=warps_for(block_n * block_g * 4, per_thread=4), num_stages=1,
                  extra={"D4": d4, "N_DTILES": n_dtiles})


def launch_configs(n: int, d: int) -> dict[str, Launch]:
    """Every launch of this family for mu (n, d): {kernel name: Launch}."""
    cfg = launch_config(n, d)
    return {"_reparam_kl_fwd_kernel": cfg, "_reparam_kl_bwd_kernel": cfg}


def _wide(n: int, d4: int, force: bool) -> bool:
    return force or n * d4 >= 2**32


def _check(name: str, t: torch.Tensor | None, like: torch.Tensor):
    assert t is None or (t.shape == like.shape and t.device == like.device), (
        f"{name}: expected {tuple(like.shape)} on {like.device}, got {tuple(t.shape)} on {t.device}")


def reparam_kl_forward(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None,
                       seed: torch.Tensor | None, reduction: str, *, force_wide: bool = False,
                       z: torch.Tensor | None = None):
    """(z, kl): z shaped like ``mu`` (contiguous unless ``z`` is given: any rows of a larger
    tensor, written in place), kl (N,) or a scalar for "sum"/"mean". ``eps=None`` draws the
    noise from ``seed`` (a one-element int64 tensor on mu's device); shapes are validated by
    the caller."""
    n = mu.shape[0]
    _check("logvar", logvar, mu)
    _check("eps", eps, mu)
    _check("z", z, mu)
    assert eps is not None or (seed is not None and seed.numel() == 1 and seed.dtype == torch.int64), (
        "seed: expected a one-element int64 tensor when eps is None")
    assert reduction in ("none", "sum", "mean"), f"reduction: got {reduction!r}"
    z = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device) if z is None else z
    kl_dtype = compute_dtype(mu.dtype)
    d = mu.numel() // n if n else 0
    if n == 0 or d == 0:
        kl = torch.zeros(n, dtype=kl_dtype, device=mu.device)
        return z, (kl if reduction == "none" else kl.sum() / n if reduction == "mean" else kl.sum())
    cfg = launch_config(n, d)
    d4, n_dtiles = cfg.extra["D4"], cfg.extra["N_DTILES"]
    # one tile per row and no reduction: the partials are the per-sample KL
    partials = torch.empty((n, n_dtiles) if n_dtiles > 1 else (n,), dtype=kl_dtype,
                           device=mu.device)
    mu_, *s_mu = _rows(mu, n)
    lv_, *s_lv = _rows(logvar, n)
    eps_, *s_eps = _rows(eps, n) if eps is not None else (mu_, 0, 0)
    z_w, *s_z = _rows(z, n)
    assert z_w is z, "z: its trailing dimensions must merge into one (no copy of an output)"
    _reparam_kl_fwd_kernel[cfg.grid](
        mu_, lv_, eps_, z, partials, seed if eps is None else mu_, n, d, d4, n_dtiles,
        *s_mu, *s_lv, *s_eps, *s_z,
        HAS_EPS=eps is not None, WIDE=_wide(n, d4, force_wide), MEAN=reduction == "mean",
        COMPUTE=compute_type(mu.dtype), **cfg.meta)
    if reduction != "none":  # "mean": the kernel already divided each partial by N
        return z, partials.sum()
    return z, partials if n_dtiles == 1 else partials.sum(dim=1)


def reparam_kl_backward(dz: torch.Tensor, dkl: torch.Tensor, mu: torch.Tensor,
                        logvar: torch.Tensor, eps: torch.Tensor | None,
                        seed: torch.Tensor | None, reduction: str, *,
                        force_wide: bool = False, dmu: torch.Tensor | None = None,
                        dlogvar: torch.Tensor | None = None):
    """(dmu, dlogvar), contiguous unless given, in mu's and logvar's dtypes. ``dz`` and
    ``dkl`` may have any strides (stride 0 included); ``dkl`` is (N,) for "none", a scalar
    otherwise."""
    n = mu.shape[0]
    for name, t in (("dz", dz), ("logvar", logvar), ("eps", eps), ("dmu", dmu), ("dlogvar", dlogvar)):
        _check(name, t, mu)
    assert dkl.shape == ((n,) if reduction == "none" else ()), f"dkl: got {tuple(dkl.shape)}"
    dmu = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device) if dmu is None else dmu
    dlv = torch.empty(logvar.shape, dtype=logvar.dtype, device=logvar.device) if dlogvar is None else dlogvar
    d = mu.numel() // n if n else 0
    if n == 0 or d == 0:
        return dmu, dlv
    cfg = launch_config(n, d)
    d4, n_dtiles = cfg.extra["D4"], cfg.extra["N_DTILES"]
    dz_, *s_dz = _rows(dz, n)
    mu_, *s_mu = _rows(mu, n)
    lv_, *s_lv = _rows(logvar, n)
    eps_, *s_eps = _rows(eps, n) if eps is not None else (mu_, 0, 0)
    dmu_w, *s_dmu = _rows(dmu, n)
    dlv_w, *s_dlv = _rows(dlv, n)
    assert dmu_w is dmu and dlv_w is dlv, "dmu, dlogvar: trailing dimensions must merge into one"
    s_dkl = dkl.stride(0) if dkl.dim() == 1 else 0
    _reparam_kl_bwd_kernel[cfg.grid](
        dz_, dkl, mu_, lv_, eps_, dmu, dlv, seed if eps is None else mu_, n, d, d4, n_dtiles,
        s_dkl, *s_dz, *s_mu, *s_lv, *s_eps, *s_dmu, *s_dlv,
        HAS_EPS=eps is not None, WIDE=_wide(n, d4, force_wide), MEAN=reduction == "mean",
        COMPUTE=compute_type(mu.dtype), **cfg.meta)
    return dmu, dlv
