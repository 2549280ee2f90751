"""CPU speed of fastflow's default (reference) path against the same models written in eager
PyTorch with rosinality/glow-pytorch's formulas, as ratios measured in one run.

    python benchmarks/cpu_ratios.py [--reps 40]

Each case is timed interleaved (eager, fastflow, eager, ...) after a warm-up, and the
median of each is reported; ratio = eager time / fastflow time (> 1: fastflow faster).
On CPU fastflow runs its plain-PyTorch reference path: these times say nothing about GPU
speed. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastflow as ff

# ---------------------------------------------------------------------------------------
# rosinality/glow-pytorch's formulas, eager (same parameter names: state dicts load)
# ---------------------------------------------------------------------------------------


class EagerActNorm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, c, 1, 1))
        self.register_buffer("initialized", torch.tensor(1, dtype=torch.uint8))

    def forward(self, x):
        _, _, h, w = x.shape
        logdet = h * w * torch.sum(torch.log(torch.abs(self.scale)))
        return self.scale * (x + self.loc), logdet

    def reverse(self, y):
        return y / self.scale - self.loc


class EagerInvConv2dLU(nn.Module):
    def __init__(self, c):
        super().__init__()
        for name in ("w_p", "u_mask", "l_mask", "s_sign", "l_eye"):
            self.register_buffer(name, torch.zeros(c, c) if name != "s_sign" else torch.zeros(c))
        self.w_l = nn.Parameter(torch.zeros(c, c))
        self.w_s = nn.Parameter(torch.zeros(c))
        self.w_u = nn.Parameter(torch.zeros(c, c))

    def calc_weight(self):
        weight = self.w_p @ (self.w_l * self.l_mask + self.l_eye) @ (
            (self.w_u * self.u_mask) + torch.diag(self.s_sign * torch.exp(self.w_s)))
        return weight.unsqueeze(2).unsqueeze(3)

    def forward(self, x):
        _, _, h, w = x.shape
        return F.conv2d(x, self.calc_weight()), h * w * torch.sum(self.w_s)

    def reverse(self, y):
        weight = self.calc_weight()
        return F.conv2d(y, weight.squeeze().inverse().unsqueeze(2).unsqueeze(3))


class EagerCoupling(nn.Module):
    def __init__(self, coupling):
        super().__init__()
        self.net = coupling.net  # the same modules (ZeroConv2d is rosinality's formula)

    def forward(self, x):
        in_a, in_b = x.chunk(2, 1)
        log_s, t = self.net(in_a).chunk(2, 1)
        s = torch.sigmoid(log_s + 2)
        out_b = (in_b + t) * s
        logdet = torch.sum(torch.log(s).view(x.shape[0], -1), 1)
        return torch.cat([in_a, out_b], 1), logdet

    def reverse(self, y):
        out_a, out_b = y.chunk(2, 1)
        log_s, t = self.net(out_a).chunk(2, 1)
        s = torch.sigmoid(log_s + 2)
        return torch.cat([out_a, out_b / s - t], 1)


class EagerFlowStep(nn.Module):
    def __init__(self, step):
        super().__init__()
        c = step.in_channel
        self.actnorm = EagerActNorm(c)
        self.invconv = EagerInvConv2dLU(c)
        self.coupling = EagerCoupling(step.coupling)
        self.actnorm.load_state_dict(step.actnorm.state_dict())
        self.invconv.load_state_dict(step.invconv.state_dict())

    def forward(self, x):
        out, logdet = self.actnorm(x)
        out, det1 = self.invconv(out)
        out, det2 = self.coupling(out)
        return out, logdet + det1 + det2

    def reverse(self, y):
        return self.actnorm.reverse(self.invconv.reverse(self.coupling.reverse(y)))


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------


def _pair(f_eager, f_ff, reps):
    for _ in range(3):
        f_eager(), f_ff()
    te, tf = [], []
    for _ in range(reps):
        t0 = time.perf_counter(); f_eager(); t1 = time.perf_counter()  # noqa: E702
        f_ff(); t2 = time.perf_counter()  # noqa: E702
        te.append(t1 - t0)
        tf.append(t2 - t1)
    return statistics.median(te), statistics.median(tf)


def _randomise(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))


def _train_step(model, x):
    def run():
        model.zero_grad(set_to_none=True)
        out, ld = x, 0
        for step in model:
            out, d = step(out)
            ld = ld + d
        (out.square().mean() - ld.mean()).backward()
    return run


def cases(reps):
    torch.manual_seed(0)
    rows = []
    # 8 FlowSteps train step
    n, c, hw, filt = 16, 12, 8, 64
    steps = nn.ModuleList([ff.FlowStep(c, filter_size=filt) for _ in range(8)])
    x = torch.randn(n, c, hw, hw)
    with torch.no_grad():
        steps.train()
        out = x
        for s in steps:  # data-dependent init
            out = s(out)[0]
    _randomise(steps)
    eager = nn.ModuleList([EagerFlowStep(s) for s in steps])
    rows.append(("8 FlowSteps train step (N=16 C=12 8x8 filter 64)",
                 *_pair(_train_step(eager, x), _train_step(steps, x), reps)))

    # Glow sampling (8 flows x 2 blocks, 3x16x16) vs the same Glow with eager steps
    glow = ff.Glow(3, 8, 2, filter_size=filt)
    with torch.no_grad():
        glow(torch.rand(16, 3, 16, 16) - 0.5)
    _randomise(glow)
    eager_glow = ff.Glow(3, 8, 2, filter_size=filt)
    eager_glow.load_state_dict(glow.state_dict())
    for blk in eager_glow.blocks:
        blk.flows = nn.ModuleList([EagerFlowStep(s) for s in blk.flows])
    glow.eval(), eager_glow.eval()

    def sample(g):
        def run():
            torch.manual_seed(1)
            with torch.no_grad():
                g.sample(16, image_size=(16, 16))
        return run
    rows.append(("Glow sampling (3x16x16, 2 blocks x 8 flows, N=16, no_grad)",
                 *_pair(sample(eager_glow), sample(glow), reps)))

    # coupling fwd+bwd, op only
    for shape in ((64, 12, 16, 16), (4, 6, 8, 8)):
        nn_, cc, hh, ww = shape
        xa = torch.randn(shape, requires_grad=True)
        h = (0.5 * torch.randn(nn_, 2 * (cc // 2), hh, ww)).requires_grad_()

        def eager_c():
            in_a, in_b = xa.chunk(2, 1)
            log_s, t = h.chunk(2, 1)
            s = torch.sigmoid(log_s + 2)
            out_b = (in_b + t) * s
            ld = torch.sum(torch.log(s).view(nn_, -1), 1)
            y = torch.cat([in_a, out_b], 1)
            (y.sum() + ld.sum()).backward()

        def ff_c():
            y, ld = ff.affine_coupling(xa, h)
            (y.sum() + ld.sum()).backward()
        rows.append((f"affine coupling fwd+bwd {shape}", *_pair(eager_c, ff_c, reps)))

    # reparameterisation + KL fwd+bwd
    for shape in ((256, 512), (16, 32)):
        mu = torch.randn(shape, requires_grad=True)
        lv = (0.3 * torch.randn(shape)).requires_grad_()

        def eager_g():
            std = torch.exp(0.5 * lv)
            z = mu + std * torch.randn_like(std)
            kl = 0.5 * torch.sum(torch.exp(lv) + mu.pow(2) - 1.0 - lv, dim=1)
            (z.sum() + kl.sum()).backward()

        def ff_g():
            z, kl = ff.reparameterize_kl(mu, lv)
            (z.sum() + kl.sum()).backward()
        rows.append((f"reparameterize + KL fwd+bwd {shape}", *_pair(eager_g, ff_g, reps)))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    args = p.parse_args()
    if args.threads < 1:
        p.error(f"--threads: expected a positive count, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.reps < 1:
        p.error(f"--reps: expected a positive count, got {args.reps}")
    print(f"# CPU ratios (torch {torch.__version__}, {torch.get_num_threads()} threads): "
          f"fastflow runs its reference path on CPU; CPU times say nothing about GPU speed")
    print("| case | eager ms | fastflow ms | eager / fastflow |\n|---|---|---|---|")
    for name, te, tf in cases(args.reps):
        print(f"| {name} | {te * 1e3:.3f} | {tf * 1e3:.3f} | {te / tf:.2f}x |")


if __name__ == "__main__":
    main()
