"""Affine coupling: fastflow's fused kernels against the eager reference, torch.compile of
it, the coupling as rosinality/glow-pytorch writes it (the eager code Glow users run), and
the coupling math of normflows and FrEIA (their networks replaced by a module that returns
the same precomputed h, so only the coupling itself is compared)."""

from __future__ import annotations


import torch

import fastflow as ff
from fastflow import reference

from harness import Case, Impl, compiled


class _Given(torch.nn.Module):
    """A stand-in coupling network that returns the h it was given."""

    h = None

    def forward(self, _):
        return self.h


def _eager(x, h):
    return reference.affine_coupling(x, h, upcast=False)


def _rosinality(x, h):
    """Glow's coupling in eager PyTorch as rosinality/glow-pytorch writes it (given h)."""
    xa, xb = x.chunk(2, 1)
    raw, t = h.chunk(2, 1)
    s = torch.sigmoid(raw + 2)
    return torch.cat([xa, (xb + t) * s], 1), torch.sum(torch.log(s).view(x.shape[0], -1), 1)


def _fastflow(x, h):  # as a user calls it: harness.measure holds use_backend("auto")
    return ff.affine_coupling(x, h)


def _not_installed(name: str, package: str) -> Impl:
    """A peer that cannot run here: its row says so instead of vanishing from the table."""
    def run(*_):
        raise ModuleNotFoundError(f"No module named {package!r}")

    return Impl(name, run, skip=f"{package} not installed (pip install {package})")


def _normflows():
    try:
        import normflows as nf
    except ImportError:
        return _not_installed("normflows", "normflows")
    layer = nf.flows.AffineCoupling(_Given(), scale=True, scale_map="sigmoid")

    def run(x, h):  # normflows' density direction: (xb - t) * sigmoid(raw + 2), interleaved h
        layer.param_map.h = h
        ca = x.shape[1] - x.shape[1] // 2
        (za, zb), logdet = layer.inverse([x[:, :ca], x[:, ca:]])
        return torch.cat([za, zb], 1), logdet

    return Impl("normflows", run, differs="normflows' formula, (xb - t) * sigmoid(raw + 2)")


def _freia(c, hh, ww):
    try:
        import FrEIA.modules as fm
    except ImportError:
        return _not_installed("FrEIA", "FrEIA")
    block = fm.AffineCouplingOneSided([(c, hh, ww)], subnet_constructor=lambda i, o: _Given())

    def run(x, h):  # FrEIA: xb * exp(2 * 0.636 * atan(raw)) + t
        block.subnet.h = h
        (y,), logdet = block((x,))
        return y, logdet

    return Impl("FrEIA", run, differs="FrEIA's formula, xb * exp(1.272 * atan(raw)) + t")


def _case(n, c, hh, ww, dtype, device, peers=True, compile_=True):
    cb = c // 2

    def make_inputs():
        x = torch.randn(n, c, hh, ww, device=device, dtype=dtype, requires_grad=True)
        h = torch.randn(n, 2 * cb, hh, ww, device=device, dtype=dtype, requires_grad=True)
        return x, h

    impls = [Impl("eager", _eager)]
    if compile_:
        impls += [Impl("compile", compiled(_eager)), Impl("fastflow+compile", compiled(_fastflow))]
    impls.append(Impl("fastflow", _fastflow))
    impls.append(Impl("rosinality", _rosinality))
    if peers:
        impls += [_normflows(), _freia(c, hh, ww)]
    e = torch.finfo(dtype).bits // 8
    px = n * hh * ww
    return Case("coupling", f"N={n} C={c} {hh}x{ww}", dtype, make_inputs, impls,
                bytes_fwd=(2 * c + 2 * cb) * px * e + n * 4,
                bytes_bwd=(2 * c + 5 * cb) * px * e + n * 4)


def cases(device: str, quick: bool) -> list[Case]:
    if quick or not device.startswith("cuda"):
        return [_case(4, 6, 8, 8, torch.float32, device, compile_=not quick)]
    return [_case(n, c, s, s, dt, device)
            for (n, c, s) in [(64, 48, 32), (256, 96, 64)]
            for dt in (torch.float32, torch.bfloat16)]


def cpu_figures() -> list[dict]:
    """ATen operators + Triton launches for one coupling forward+backward (Triton backend,
    interpreted on CPU: the count is the same as on a GPU) and bytes saved for backward."""
    from harness import count_ops, saved_bytes

    rows = []
    for n, c, s in [(2, 6, 4), (2, 48, 32)]:
        def make():
            x = torch.randn(n, c, s, s, requires_grad=True)
            h = torch.randn(n, 2 * (c // 2), s, s, requires_grad=True)
            return x, h

        eager = count_ops(_eager, *make())
        with ff.use_backend("triton"):
            fused = count_ops(ff.affine_coupling, *make())
            fused_saved = saved_bytes(ff.affine_coupling, *make())
        rows.append({"figure": f"coupling fwd+bwd (N={n} C={c} {s}x{s}): ATen ops + Triton launches",
                     "eager": eager["total"], "fastflow": fused["total"],
                     "ratio": eager["total"] / fused["total"],
                     "detail": f"eager {eager['aten_ops']} ATen; fastflow {fused['aten_ops']} ATen "
                               f"({', '.join(fused['ops'])}) + {fused['triton_launches']} launches"})
        eager_saved = saved_bytes(_eager, *make())
        rows.append({"figure": f"coupling: bytes saved for backward (N={n} C={c} {s}x{s}, fp32)",
                     "eager": eager_saved, "fastflow": fused_saved,
                     "ratio": eager_saved / fused_saved,
                     "detail": "fastflow keeps its inputs x and h (C and 2*(C//2) channels; "
                               "the backward kernel recomputes s from them), eager the "
                               "intermediates s and xb + t (C//2 channels each)"})
    return rows
