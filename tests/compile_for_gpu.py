"""Compile fastflow's Triton kernels for a GPU on a machine without one.

The interpreter checks what the kernels compute; this checks that they compile for a real
GPU target (sm_90: H100/H200 by default): Triton's own front end, its GPU passes and ptxas
(bundled with the triton wheel) run on every specialisation that the public API launches,
with a stand-in driver that compiles instead of launching. Outputs are never computed.
It reports, per kernel, the specialisations compiled and the worst registers, spilled
(local) memory and shared memory from ``cuobjdump --dump-resource-usage``.

    python tests/compile_for_gpu.py [--arch 90] [--quick]

It must start without TRITON_INTERPRET (the kernels are decorated when first imported).
Exit status 1 when a kernel fails to compile.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import fastflow.kernels.channel_mix  # noqa: E402,F401  decorated now: compiled kernels
import fastflow.kernels.lu_weight  # noqa: E402,F401
import fastflow.kernels.coupling  # noqa: E402,F401
import fastflow.kernels.gaussian  # noqa: E402,F401

# fastflow routes CPU tensors to the kernels only "under the interpreter"; the kernels above
# are already compiled-mode objects, so this flag now only opens that route
os.environ["TRITON_INTERPRET"] = "1"

import fastflow as ff  # noqa: E402
from fastflow import reference  # noqa: E402
from fastflow.ops import coupling as coupling_ops  # noqa: E402


class CompileOnlyDriver:
    """Answers the few questions Triton's launcher asks, for a GPU that is not there."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


class Recorder:
    def __init__(self):
        self.kernels: dict[str, dict[int, object]] = {}
        self._orig = JITFunction.run

    def __enter__(self):
        recorder = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            kernel = recorder._orig(fn_self, *args, grid=grid, warmup=True, **kwargs)
            recorder.kernels.setdefault(fn_self.fn.__name__, {})[id(kernel)] = kernel
            return kernel

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._orig


DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def exercise_coupling(quick: bool):
    variants = list(itertools.product(reference.SCALES, reference.LAYOUTS, reference.SHIFTS))
    cases = [(v, torch.float32) for v in variants] + [(variants[0], dt) for dt in DTYPES[1:]]
    if quick:
        cases = cases[:3] + cases[-3:]
    for (scale, layout, shift), dtype in cases:
        for reverse in (False, True):
            x = torch.randn(2, 5, 6, 7, dtype=dtype, requires_grad=True)
            h = torch.randn(2, 4, 6, 7, dtype=dtype, requires_grad=True)
            y, ld = ff.affine_coupling(x, h, scale=scale, layout=layout, shift=shift,
                                       reverse=reverse)
            torch.autograd.grad((y, ld), (x, h), (torch.ones_like(y), torch.ones_like(ld)))
            coupling_ops.coupling_backward(y, ld, y.detach(), h.detach(), scale, layout, shift,
                                           2.0, reverse, True)
    x = torch.randn(2, 5, 6, 7, requires_grad=True)
    y, _ = ff.additive_coupling(x, torch.randn(2, 2, 6, 7, requires_grad=True))
    y.sum().backward()
    cl = torch.randn(2, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    ff.affine_coupling(cl, torch.randn(2, 6, 5, 5).contiguous(memory_format=torch.channels_last))


def exercise_channel_mix(quick: bool):
    for dtype, conv_lu, c in [(torch.float32, True, 12), (torch.float32, False, 12),
                              (torch.bfloat16, True, 12), (torch.float16, True, 12),
                              (torch.float64, True, 12), (torch.float32, True, 70)][:3 if quick else 6]:
        step = ff.FlowStep(c, filter_size=8, conv_lu=conv_lu).to(dtype)
        x = torch.randn(2, c, 4, 4, dtype=dtype, requires_grad=True)
        with torch.no_grad():
            step(x)  # ActNorm's initialisation
        y, ld = step(x)
        (y.float().sum() + ld.sum()).backward()
        step.eval()
        with torch.no_grad():
            step.reverse(y)
            step(x.contiguous(memory_format=torch.channels_last))
    an = ff.ActNorm(3)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    an(z)
    y, ld = an(z)
    (y.sum() + ld.sum()).backward()


def exercise_gaussian(quick: bool):
    for dtype in DTYPES[:2] if quick else DTYPES:
        for reduction in reference.REDUCTIONS:
            for given in (False, True):
                mu = torch.randn(4, 9, dtype=dtype, requires_grad=True)
                lv = torch.randn(4, 9, dtype=dtype, requires_grad=True)
                eps = torch.randn(4, 9, dtype=dtype) if given else None
                z, kl = ff.reparameterize_kl(mu, lv, eps, reduction=reduction)
                (z.float().sum() + kl.sum()).backward()


def resource_usage(kernel) -> dict:
    """Registers, local (spilled) and shared memory of a compiled kernel's cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cubin = kernel.asm.get("cubin")
    if not cubin or not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    found = dict(re.findall(r"(REG|LOCAL|SHARED|STACK):(\d+)", out))
    return {k: int(v) for k, v in found.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper)")
    ap.add_argument("--quick", action="store_true", help="a few specialisations per kernel")
    args = ap.parse_args(argv)
    driver.set_active(CompileOnlyDriver(GPUTarget("cuda", args.arch, 32)))
    t0 = time.perf_counter()
    failures = []
    with Recorder() as rec, ff.use_backend("triton"):
        for name, fn in [("coupling", exercise_coupling), ("channel_mix", exercise_channel_mix),
                         ("gaussian", exercise_gaussian)]:
            try:
                fn(args.quick)
            except Exception as e:  # a compile error: report it, go on with the others
                failures.append(f"{name}: {type(e).__name__}: {e}")
    total = sum(len(v) for v in rec.kernels.values())
    print(f"compiled {total} kernel specialisations for sm_{args.arch} in "
          f"{time.perf_counter() - t0:.0f} s (triton {triton.__version__})")
    print(f"{'kernel':28s} {'specs':>5s} {'max REG':>7s} {'max LOCAL':>9s} {'max SHARED':>10s}")
    for name, kernels in sorted(rec.kernels.items()):
        usage = [resource_usage(k) for k in kernels.values()]
        worst = {key: max((u.get(key, 0) for u in usage), default=0)
                 for key in ("REG", "LOCAL", "SHARED")}
        print(f"{name:28s} {len(kernels):5d} {worst['REG']:7d} {worst['LOCAL']:9d} "
              f"{worst['SHARED']:10d}")
    for f in failures:
        print("FAILED", f[:2000])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
