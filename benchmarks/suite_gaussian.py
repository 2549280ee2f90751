"""Gaussian reparameterisation + KL: fastflow's fused kernels (noise made in the kernel and
regenerated in backward) against the eager composition a VAE writes (``torch.randn_like`` +
elementwise ops + sum) and torch.compile of it.

CPU figures: bytes saved for backward and ATen operators + Triton launches of one
forward+backward, fastflow (Triton backend, interpreted on CPU: the same count as on a GPU)
vs eager.
"""

from __future__ import annotations


import torch

import fastflow as ff

from harness import Case, Impl, compiled, count_ops, saved_bytes


def _eager(mu, logvar):
    """What a VAE writes: the noise is a tensor, autograd keeps what it needs."""
    eps = torch.randn_like(mu)
    z = mu + torch.exp(0.5 * logvar) * eps
    kl = 0.5 * (torch.exp(logvar) + mu * mu - 1.0 - logvar).flatten(1).sum(dim=1)
    return z, kl


def _fastflow(mu, logvar):  # as a user calls it: harness.measure holds use_backend("auto")
    return ff.reparameterize_kl(mu, logvar)


def _case(n, d, dtype, device, compile_=True):
    def make_inputs():
        mu = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
        logvar = (0.5 * torch.randn(n, d, device=device)).to(dtype).requires_grad_()
        return mu, logvar

    impls = [Impl("eager", _eager)]
    if compile_:
        impls += [Impl("compile", compiled(_eager)), Impl("fastflow+compile", compiled(_fastflow))]
    impls.append(Impl("fastflow", _fastflow))
    e = torch.finfo(dtype).bits // 8
    kl_bytes = n * (8 if dtype == torch.float64 else 4)
    # forward: read mu, logvar, write z and kl; backward: read dz, dkl, mu, logvar, write
    # dmu, dlogvar (the noise is regenerated, not read)
    return Case("gaussian", f"N={n} D={d}", dtype, make_inputs, impls,
                bytes_fwd=3 * n * d * e + kl_bytes, bytes_bwd=5 * n * d * e + kl_bytes,
                compare=lambda outs, grads: [outs[1], grads[0]],
                compare_note="kl and d mu; z and d logvar use each one's own noise")


def cases(device: str, quick: bool) -> list[Case]:
    if quick or not device.startswith("cuda"):
        return [_case(16, 37, torch.float32, device, compile_=not quick)]
    return [_case(n, d, dt, device) for (n, d) in [(256, 512), (8192, 8192)]
            for dt in (torch.float32, torch.bfloat16)]


def _saved_beyond_inputs(fn, *inputs) -> int:
    """Bytes of the storages autograd saves for backward other than the inputs' own."""
    own = {t.untyped_storage().data_ptr() for t in inputs}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    del out
    return sum(seen.values())


def cpu_figures() -> list[dict]:
    """Bytes saved for backward and ATen ops + Triton launches per forward+backward."""
    rows = []
    for n, d in [(256, 512), (4, 37)]:
        def make():
            mu = torch.randn(n, d, requires_grad=True)
            return mu, (0.5 * torch.randn(n, d)).requires_grad_()

        with ff.use_backend("triton"):
            fused_saved = saved_bytes(ff.reparameterize_kl, *make())
            fused_extra = _saved_beyond_inputs(ff.reparameterize_kl, *make())
            fused = count_ops(ff.reparameterize_kl, *make())
            fused_mean = count_ops(lambda m, lv: ff.reparameterize_kl(m, lv, reduction="mean"),
                                   *make())
        eager = count_ops(_eager, *make())
        eager_mean = count_ops(lambda m, lv: (lambda z, kl: (z, kl.mean()))(*_eager(m, lv)),
                               *make())
        shape = f"N={n} D={d}, fp32"
        rows.append({"figure": f"gaussian: bytes saved for backward, all ({shape})",
                     "eager": saved_bytes(_eager, *make()), "fastflow": fused_saved,
                     "detail": "fastflow saves mu and logvar (the inputs); the 8-byte seed rides on ctx"})
        rows.append({"figure": f"gaussian: bytes saved for backward beyond the inputs ({shape})",
                     "eager": _saved_beyond_inputs(_eager, *make()), "fastflow": fused_extra,
                     "detail": "eager keeps eps and exp(logvar/2); fastflow regenerates the noise"})
        for label, a, b in [("kl per sample", eager, fused), ("kl mean", eager_mean, fused_mean)]:
            rows.append({"figure": f"gaussian fwd+bwd, {label} ({shape}): ATen ops + Triton launches",
                         "eager": a["total"], "fastflow": b["total"],
                         "ratio": a["total"] / b["total"],
                         "detail": f"eager {a['aten_ops']} ATen; fastflow {b['aten_ops']} ATen "
                                   f"({', '.join(b['ops'])}) + {b['triton_launches']} launches"})
    return rows
