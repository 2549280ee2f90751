"""TarFlow's affine head (the ``tarflow`` kernel family): fastflow's fused kernels against
the head as apple/ml-tarflow writes it in eager PyTorch (shift h by one token, split into
(a, b), ``z = (x - b) * exp(-a)``, ``logdet = -sum(a)``) and torch.compile of it. TarFlow
has no peer in normflows or FrEIA. The sampler's figures (KV cache, host syncs, Jacobi
iterations) are ``benchmarks/suite_tarflow.py``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastflow as ff

from harness import Case, Impl, compiled


def _eager(x, h):
    """ml-tarflow's head: token t takes h[:, t - 1] (token 0 zeros), a = h[..., :D],
    b = h[..., D:]; the next block's permutation flips the tokens (a copy)."""
    d = x.shape[-1]
    hs = F.pad(h[:, :-1], (0, 0, 1, 0))
    a, b = hs[..., :d], hs[..., d:]
    z = (x - b) * torch.exp(-a)
    return z.flip(1), -a.float().sum(dim=(1, 2))


def _fastflow(x, h):  # as a user calls it: harness.measure holds use_backend("auto")
    return ff.tarflow_head(x, h, order="reversed")


def _case(n, t, d, dtype, device, compile_=True):
    def make_inputs():
        x = torch.randn(n, t, d, device=device, dtype=dtype, requires_grad=True)
        h = (0.1 * torch.randn(n, t, 2 * d, device=device)).to(dtype).requires_grad_()
        return x, h

    impls = [Impl("eager", _eager)]
    if compile_:
        impls += [Impl("compile", compiled(_eager)), Impl("fastflow+compile", compiled(_fastflow))]
    impls.append(Impl("fastflow", _fastflow))
    e = torch.finfo(dtype).bits // 8
    tok = n * t
    ld = n * (8 if dtype == torch.float64 else 4)
    # forward: read x (D) and h (2D), write z (D) and the log-det; backward: read dz, x, h
    # and the log-det's gradient, write dx and dh
    return Case("tarflow_head", f"N={n} T={t} D={d}", dtype, make_inputs, impls,
                bytes_fwd=4 * d * tok * e + ld, bytes_bwd=7 * d * tok * e + ld)


def cases(device: str, quick: bool) -> list[Case]:
    if quick or not device.startswith("cuda"):
        return [_case(2, 5, 12, torch.float32, device, compile_=not quick)]
    return [_case(n, t, d, dt, device) for (n, t, d) in [(64, 64, 48), (256, 256, 192)]
            for dt in (torch.float32, torch.bfloat16)]
