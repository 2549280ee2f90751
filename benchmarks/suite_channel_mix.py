"""ActNorm + invertible 1x1 convolution (LU-parameterised): fastflow's one fused kernel
against eager ActNorm + ``conv2d`` (rosinality/glow-pytorch's way) and torch.compile of it.

Timed cases take (x, loc, scale, w_l, w_s, w_u) as inputs so every implementation's
backward produces the same gradients (the input's and all parameters'), and each one
assembles W from the LU parameters as its layer would in training.

CPU figures: the cost of the log-determinant per step (sum(log_s) from the parameters vs
``slogdet``), sampling through 8 steps with the cached W^-1 vs normflows' Glow blocks, and
ATen operators + Triton launches of a FlowStep forward+backward vs the eager reference
(and of its ActNorm + 1x1 conv part alone, where fastflow's training path is one
``lu_weight`` launch for W and the whole log-det, one mixing launch, and three + one
launches backward).
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import fastflow as ff
from fastflow import reference

from harness import Case, Impl


def _lu_buffers(c, device):
    layer = ff.InvConv2dLU(c).to(device)
    return layer.w_p, layer.s_sign, layer


def _eager(w_p, s_sign):
    def run(x, loc, scale, w_l, w_s, w_u):
        y, ld = reference.actnorm(x, loc, scale, upcast=False)
        w = reference.lu_weight(w_p, w_l, w_u, w_s, s_sign)
        y = F.conv2d(y, w.to(y.dtype)[:, :, None, None])  # a 16-bit x: W cast to it
        return y, ld + x.shape[2] * x.shape[3] * w_s.sum()

    return run


def _fastflow(layer):
    def run(x, loc, scale, w_l, w_s, w_u):
        # the case's parameters become the layer's, once per set of inputs: the timed calls
        # run the layer's own code as FlowStep does (torch.func.functional_call per call
        # cost 40-50 us of Python here, which eager's row, given the tensors, did not pay)
        if not (layer.w_l is w_l and layer.w_s is w_s and layer.w_u is w_u):
            layer._parameters.update(w_l=w_l, w_s=w_s, w_u=w_u)
        # as FlowStep: W (in x's compute dtype) and the whole log-det from one lu_weight
        # launch, then ActNorm + 1x1 conv in one mixing launch
        w, logdet = layer.matrix_and_logdet(x, scale, for_mix=True)
        return ff.channel_mix(x, w, loc=loc, scale=scale), logdet

    return run


def _case(n, c, s, dtype, device, compile_=True):
    w_p, s_sign, layer = _lu_buffers(c, device)

    def make_inputs():
        x = torch.randn(n, c, s, s, device=device, dtype=dtype, requires_grad=True)
        loc = (0.1 * torch.randn(1, c, 1, 1, device=device)).requires_grad_()
        scale = (1 + 0.1 * torch.rand(1, c, 1, 1, device=device)).requires_grad_()
        params = [p.detach().clone().requires_grad_() for p in (layer.w_l, layer.w_s, layer.w_u)]
        return (x, loc, scale, *params)

    eager = _eager(w_p, s_sign)
    impls = [Impl("eager", eager)]
    if compile_:
        impls.append(Impl("compile", torch.compile(eager)))
    impls.append(Impl("fastflow", _fastflow(layer)))
    e = torch.finfo(dtype).bits // 8
    px = n * s * s
    return Case("channel_mix", f"N={n} C={c} {s}x{s}", dtype, make_inputs, impls,
                bytes_fwd=2 * c * px * e, bytes_bwd=3 * c * px * e)


def cases(device: str, quick: bool) -> list[Case]:
    if quick or not device.startswith("cuda"):
        return [_case(4, 6, 8, torch.float32, device, compile_=not quick)]
    out = [_case(64, c, 32, torch.float32, device) for c in (12, 24, 48)]
    out += [_case(256, 48, 64, dt, device) for dt in (torch.float32, torch.bfloat16)]
    return out


# --------------------------------------------------------------------------------------
# CPU figures
# --------------------------------------------------------------------------------------


def _median_s(fn, reps=30, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _logdet_figures() -> list[dict]:
    rows = []
    for c in (48, 192, 512):
        layer = ff.InvConv2dLU(c).double()
        w = layer.weight_and_logdet(False)[0].detach()
        t_slogdet = _median_s(lambda: torch.linalg.slogdet(w))
        t_sum = _median_s(lambda: layer.w_s.sum())
        t_assembly = _median_s(lambda: layer.weight_and_logdet(False))  # training: fresh, autograd

        def eval_call():  # the same assembly without autograd: the layer caches nothing
            with torch.no_grad():
                layer.weight_and_logdet(False)

        t_no_grad = _median_s(eval_call)
        rows.append({
            "figure": f"log|det W| per step, C={c}, float64 (CPU)",
            "eager": t_slogdet, "fastflow": t_sum, "ratio": t_slogdet / t_sum,
            "detail": f"slogdet {t_slogdet * 1e6:.1f} us vs sum(log_s) {t_sum * 1e6:.1f} us; "
                      f"W assembly + log-det: training (fresh, float64) {t_assembly * 1e6:.1f} us, "
                      f"eval (no grad, assembled afresh: nothing is cached) {t_no_grad * 1e6:.1f} us"})
    return rows


def _sampling_figures() -> list[dict]:
    try:
        import normflows as nf
    except ImportError:  # said in the table, not left out of it
        return [{"figure": "sampling 8 steps (CPU): normflows / fastflow",
                 "detail": "not measured: normflows not installed (pip install normflows)"}]
    rows = []
    for n, c, s, hidden in [(16, 12, 16, 64), (16, 48, 8, 64), (4, 192, 4, 64)]:
        torch.manual_seed(0)
        ours = torch.nn.ModuleList([ff.FlowStep(c, filter_size=hidden) for _ in range(8)]).eval()
        with warnings.catch_warnings():  # normflows' LU 1x1 conv calls torch.lu (deprecated)
            warnings.filterwarnings("ignore", message=r"(?s).*torch\.lu is deprecated")
            theirs = torch.nn.ModuleList([nf.flows.GlowBlock(c, hidden) for _ in range(8)]).eval()
        for step in ours:  # mark ActNorm initialised (no data-dependent init in sampling)
            step.actnorm.initialized.fill_(1)
            step.actnorm._initialized = True
        for block in theirs:
            block.flows[-1].data_dep_init_done.fill_(1.0)
        z = torch.randn(n, c, s, s)

        @torch.no_grad()
        def sample_ours():
            v = z
            for step in reversed(ours):
                v = step.reverse(v)
            return v

        @torch.no_grad()
        def sample_theirs():
            v = z
            for block in reversed(theirs):
                v, _ = block(v)  # normflows' forward is the sampling direction
            return v

        @torch.no_grad()
        def mix_ours():  # the ActNorm + 1x1 conv part alone
            v = z
            for step in reversed(ours):
                w_inv, w_ld = step.invconv.weight_and_logdet(True)
                v, _ = ff.actnorm_invconv(v, step.actnorm.loc, step.actnorm.scale, w_inv, w_ld, reverse=True)
            return v

        @torch.no_grad()
        def mix_theirs():
            v = z
            for block in reversed(theirs):
                for flow in block.flows[1:]:
                    v, _ = flow(v)
            return v

        with ff.use_backend("auto"):
            t_ours, t_theirs = _median_s(sample_ours, reps=10), _median_s(sample_theirs, reps=10)
            m_ours, m_theirs = _median_s(mix_ours, reps=20), _median_s(mix_theirs, reps=20)
        rows.append({
            "figure": f"sampling 8 steps N={n} C={c} {s}x{s} hidden={hidden} (CPU): normflows / fastflow",
            "eager": t_theirs, "fastflow": t_ours, "ratio": t_theirs / t_ours,
            "detail": f"whole steps {t_theirs * 1e3:.2f} ms vs {t_ours * 1e3:.2f} ms; ActNorm + 1x1 conv "
                      f"only {m_theirs * 1e3:.2f} ms vs {m_ours * 1e3:.2f} ms "
                      f"({m_theirs / m_ours:.1f}x)"})
    return rows


def _eager_flowstep(step):
    """rosinality/glow-pytorch's FlowStep in plain PyTorch, on ``step``'s parameters."""
    def run(x, loc, scale, w_l, w_s, w_u, *net_params):
        y, ld = reference.actnorm(x, loc, scale, upcast=False)
        inv = step.invconv
        w = reference.lu_weight(inv.w_p, w_l, w_u, w_s, inv.s_sign)
        y = F.conv2d(y, w[:, :, None, None])
        ld = ld + x.shape[2] * x.shape[3] * w_s.sum()
        ca = x.shape[1] - x.shape[1] // 2
        names = [k for k, _ in step.coupling.net.named_parameters()]
        h = torch.func.functional_call(step.coupling.net, dict(zip(names, net_params)), (y[:, :ca],))
        y, ld2 = reference.affine_coupling(y, h, upcast=False)
        return y, ld + ld2

    return run


def _fused_flowstep(step):
    names = [k for k, _ in step.named_parameters()]

    def run(x, *params):
        return torch.func.functional_call(step, dict(zip(names, params)), (x,))

    return run


def _count_figures() -> list[dict]:
    from harness import count_ops

    rows = []
    for n, c, s in [(2, 12, 8), (2, 48, 4)]:
        torch.manual_seed(0)
        step = ff.FlowStep(c, filter_size=32)
        step.actnorm.initialized.fill_(1)
        step.actnorm._initialized = True

        def leaves():
            x = torch.randn(n, c, s, s, requires_grad=True)
            an, inv = step.actnorm, step.invconv
            ps = [p.detach().clone().requires_grad_() for p in
                  (an.loc, an.scale, inv.w_l, inv.w_s, inv.w_u, *step.coupling.net.parameters())]
            return x, ps

        x, ps = leaves()
        eager = count_ops(_eager_flowstep(step), x, *ps)
        x, _ = leaves()
        with ff.use_backend("triton"):
            fused = count_ops(_fused_flowstep(step), x, *[p.detach().clone().requires_grad_()
                                                          for p in step.parameters()])
        # the coupling (its network's convs and the fused coupling op) is in both counts
        names = [k for k, _ in step.coupling.named_parameters()]

        def coupling(y, *params):
            return torch.func.functional_call(step.coupling, dict(zip(names, params)), (y,))

        with ff.use_backend("triton"):
            fused_coupling = count_ops(coupling, torch.randn(n, c, s, s, requires_grad=True),
                                       *[p.detach().clone().requires_grad_()
                                         for p in step.coupling.parameters()])
        rows.append({
            "figure": f"FlowStep fwd+bwd (N={n} C={c} {s}x{s}, filter 32): ATen ops + Triton launches",
            "eager": eager["total"], "fastflow": fused["total"], "ratio": eager["total"] / fused["total"],
            "detail": f"eager {eager['aten_ops']} ATen; fastflow {fused['aten_ops']} ATen + "
                      f"{fused['triton_launches']} launches, of which the coupling layer (network "
                      f"convs + fused coupling op) {fused_coupling['total']} and the rest "
                      f"(ActNorm + 1x1 conv + log-dets) {fused['total'] - fused_coupling['total']}"})

        # the part this op replaces: ActNorm + 1x1 conv (with W assembly and log-dets)
        w_p, s_sign = step.invconv.w_p, step.invconv.s_sign

        def mix_inputs():
            an, inv = step.actnorm, step.invconv
            return (torch.randn(n, c, s, s, requires_grad=True),
                    *[p.detach().clone().requires_grad_() for p in (an.loc, an.scale, inv.w_l, inv.w_s, inv.w_u)])

        eager_mix = count_ops(_eager(w_p, s_sign), *mix_inputs())
        with ff.use_backend("triton"):
            fused_mix = count_ops(_fastflow(step.invconv), *mix_inputs())
        rows.append({
            "figure": f"ActNorm + 1x1 conv fwd+bwd (N={n} C={c} {s}x{s}): ATen ops + Triton launches",
            "eager": eager_mix["total"], "fastflow": fused_mix["total"],
            "ratio": eager_mix["total"] / fused_mix["total"],
            "detail": f"eager {eager_mix['aten_ops']} ATen; fastflow {fused_mix['aten_ops']} ATen "
                      f"({', '.join(fused_mix['ops'])}) + {fused_mix['triton_launches']} launches"})
    return rows


def cpu_figures() -> list[dict]:
    return _logdet_figures() + _sampling_figures() + _count_figures()
