"""Compile fastflow's Triton kernels for a GPU on a machine without one.

The interpreter checks what the kernels compute; this checks that they compile for a real
GPU target (sm_90: H100/H200 by default): Triton's own front end, its GPU passes and ptxas
(bundled with the triton wheel) run on every specialisation that the public API launches,
with a stand-in driver that compiles instead of launching. Outputs are never computed.

The kernel families come from the one registry, ``fastflow.kernels.FAMILIES``; each family
has one exercise below (its specialisation list: the public calls that reach its kernels),
run at small odd shapes and at the shapes Glow runs (N=64; C=12 at 16x16, 24 at 8x8, 48 at
8x8 and 4x4, 96 at 4x4). For every compiled specialisation it prints the registers, the
stack frame, the spill stores and loads (``ptxas -v`` on the kernel's PTX), the dynamic
shared memory, num_warps / num_stages, SASS instructions and calls, mma instructions and the
programs of its launches; then the programs per launch at the Glow shapes.

    python tests/compile_for_gpu.py [--arch 90] [--quick] [--no-glow] [--sass] [--ptxas]
                                    [--families coupling,...] [--jobs 4]

It must start without TRITON_INTERPRET (the kernels are decorated when first imported).
Exit status 1 when a kernel fails to compile, spills, computes a product of two int32
runtime values (arguments, program ids: an offset that wraps past 2^31;
``int32_argument_products``), converts float64
straight to a 16-bit float (``direct_float64_to_16_bit``), or a registered family has no
exercise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import itertools
import math
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
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fastflow.kernels import FAMILIES  # noqa: E402

# decorated now, before TRITON_INTERPRET is set below: compiled-mode kernels
FAMILY_MODULES = {name: importlib.import_module(f"fastflow.kernels.{name}") for name in FAMILIES}

# fastflow routes CPU tensors to the kernels only "under the interpreter"; the kernels above
# are already compiled-mode objects, so this flag now only opens that route
os.environ["TRITON_INTERPRET"] = "1"

import fastflow as ff  # noqa: E402
from fastflow import reference  # noqa: E402
from fastflow.ops import coupling as coupling_ops  # noqa: E402

NV_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
GLOW_SHAPES = ((64, 12, 16, 16), (64, 24, 8, 8), (64, 48, 8, 8), (64, 48, 4, 4), (64, 96, 4, 4))
GAUSS_SHAPES = ((64, 16), (64, 64), (64, 256), (64, 768))
# TarFlow (N, tokens, token width): 64x64x3 images in 4x4 patches (256 tokens of 48: BLOCK_D
# 64) and in 16x16 patches (16 tokens of 768: BLOCK_D 128, six rounds of the D loop, and the
# one-token step's widest tile)
TARFLOW_SHAPES = ((64, 256, 48), (4, 16, 768))
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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
    """Compiles instead of launching, and keeps every compiled kernel and every launch
    (kernel, programs, the case it ran in)."""

    def __init__(self):
        self.kernels: dict[str, dict[int, object]] = {}
        self.programs: dict[tuple[str, int], set[int]] = {}
        self.launches: list[tuple[str, str, int]] = []
        self.meta: dict[tuple[str, int], dict] = {}  # a specialisation's named scalar arguments
        self.case = ""
        self._orig = JITFunction.run

    @contextlib.contextmanager
    def label(self, case: str):
        old, self.case = self.case, case
        try:
            yield
        finally:
            self.case = old

    def __enter__(self):
        recorder = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            kernel = recorder._orig(fn_self, *args, grid=grid, warmup=True, **kwargs)
            name = fn_self.fn.__name__
            recorder.kernels.setdefault(name, {})[id(kernel)] = kernel
            programs = math.prod(grid) if isinstance(grid, tuple) else -1
            recorder.programs.setdefault((name, id(kernel)), set()).add(programs)
            recorder.meta.setdefault((name, id(kernel)), {
                k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str))
                or type(v).__name__ == "dtype"})
            recorder.launches.append((recorder.case, name, programs))
            return kernel

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._orig


# --------------------------------------------------------------------------------------
# Specialisation lists: one exercise per registered family
# --------------------------------------------------------------------------------------


def exercise_coupling(quick: bool, glow: bool, rec: Recorder):
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
    # a float64 x with a 16-bit h: dh computed in float64, stored in h's dtype
    for other in (torch.bfloat16, torch.float16):
        x = torch.randn(2, 5, 6, 7, dtype=torch.float64, requires_grad=True)
        h = torch.randn(2, 4, 6, 7, dtype=other, requires_grad=True)
        y, ld = ff.affine_coupling(x, h)
        torch.autograd.grad((y, ld), (x, h), (torch.ones_like(y), torch.ones_like(ld)))
        y, _ = ff.additive_coupling(x, h[:, :2])
        torch.autograd.grad(y, (x, h), torch.ones_like(y))
    # one channel per tile (BLOCK_C 1: a 32x32 image of 3 channels, one sample)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    y, ld = ff.affine_coupling(x, torch.randn(1, 2, 32, 32))
    torch.autograd.grad((y, ld), x, (torch.ones_like(y), torch.ones_like(ld)))
    cl = torch.randn(2, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    ff.affine_coupling(cl, torch.randn(2, 6, 5, 5).contiguous(memory_format=torch.channels_last))
    for n, c, hh, ww in GLOW_SHAPES if glow else ():
        for dtype in (torch.float32, torch.bfloat16):
            with rec.label(f"glow {n}x{c}x{hh}x{ww} {str(dtype)[6:]}"):
                x = torch.randn(n, c, hh, ww, dtype=dtype, requires_grad=True)
                h = torch.randn(n, c, hh, ww, dtype=dtype, requires_grad=True)
                y, ld = ff.affine_coupling(x, h)
                torch.autograd.grad((y, ld), (x, h), (torch.ones_like(y), torch.ones_like(ld)))


def _flowstep(dtype, conv_lu, c, shape, channels_last=True):
    step = ff.FlowStep(c, filter_size=8, conv_lu=conv_lu).to(dtype)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        step(x)  # ActNorm's initialisation
    y, ld = step(x)
    (y.float().sum() + ld.sum()).backward()
    step.eval()
    with torch.no_grad():
        step.reverse(y)
        if channels_last:
            step(x.contiguous(memory_format=torch.channels_last))


def exercise_channel_mix(quick: bool, glow: bool, rec: Recorder):
    for dtype, conv_lu, c in [(torch.float32, True, 12), (torch.float32, False, 12),
                              (torch.bfloat16, True, 12), (torch.float16, True, 12),
                              (torch.float64, True, 12), (torch.float32, True, 70)][:3 if quick else 6]:
        _flowstep(dtype, conv_lu, c, (2, c, 4, 4))
    an = ff.ActNorm(3)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    an(z)
    y, ld = an(z)
    (y.sum() + ld.sum()).backward()
    # FlowStep's forward runs channel_mix_split (the mix writing the coupling network's
    # input too; its backward adding that gradient in): the plain mix forward (a hooked
    # FlowStep, the reversible chain, the layers alone) and both ops' other variants here
    from fastflow.ops.channel_mix import channel_mix_split

    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.randn(2, 5, 3, 3, dtype=dtype, requires_grad=True)
        w = torch.randn(5, 5, dtype=dtype, requires_grad=True)
        loc = torch.randn(5, dtype=dtype, requires_grad=True)
        scale = torch.rand(5, dtype=dtype).add(0.5).requires_grad_()
        for weight in (w, None):
            for reverse in (False, True):
                y = ff.channel_mix(x, weight, loc=loc, scale=scale, reverse=reverse)
                y.float().sum().backward()
                if dtype != torch.bfloat16:  # FlowStep's bf16 split is compiled above
                    y, head = channel_mix_split(x, weight, loc=loc, scale=scale,
                                                reverse=reverse, split=3)
                    (y.sum() + head.sum()).backward()
    # the opt-in tensor-core product (mix(..., input_precision="tf32x3")): compiled so that
    # its registers and its mma instructions can be read below
    mix = FAMILY_MODULES["channel_mix"].mix
    for n, c, hh, ww in GLOW_SHAPES if glow else GLOW_SHAPES[3:4]:
        with rec.label(f"tf32x3 mix {n}x{c}x{hh}x{ww}"):
            mix(torch.randn(n, c, hh, ww), torch.randn(c, c), input_precision="tf32x3")
    # the reduction's INDEX64 specialisation (flat pixel indices past 2^31), forced at a
    # small shape: the API reaches it only with tens of GB of activations
    cm = FAMILY_MODULES["channel_mix"]
    plain = cm.reduce_config

    def index64(*args, **kwargs):
        cfg = plain(*args, **kwargs)
        cfg.extra["INDEX64"] = True
        return cfg

    cm.reduce_config = index64
    try:
        for dtype in (torch.float32, torch.float64):
            for w in (torch.randn(5, 5, dtype=dtype), None):
                for g2 in (None, torch.randn(2, 3, 3, 3, dtype=dtype)):  # + the split's
                    x, g = torch.randn(2, 5, 3, 3, dtype=dtype), torch.randn(2, 5, 3, 3, dtype=dtype)
                    cm.mix_param_grads(g, x, w, torch.rand(5, dtype=dtype) + 0.5,
                                       torch.randn(5, dtype=dtype), reverse=False,
                                       d_a=None if w is None else torch.empty_like(w),
                                       d_loc=torch.empty(5, dtype=dtype),
                                       d_scale=torch.empty(5, dtype=dtype), grad2=g2)
    finally:
        cm.reduce_config = plain
    for shape in GLOW_SHAPES if glow else ():
        for dtype in (torch.float32, torch.bfloat16):
            with rec.label(f"glow {'x'.join(map(str, shape))} {str(dtype)[6:]}"):
                _flowstep(dtype, True, shape[1], shape, channels_last=False)


def exercise_lu_weight(quick: bool, glow: bool, rec: Recorder):
    """One layer's launch comes with every InvConv2dLU in exercise_channel_mix (FlowStep,
    conv_lu=True) at C = 12 and 70; a Glow block's stacked launch (all its steps' W at once)
    and the small tiles of C < 16 come here."""
    for dtype in DTYPES[:2] if quick else DTYPES:
        k = ff.layers.flowstep.MIN_STACK
        with rec.label(f"lu_weight stack of {k} {dtype}"):
            steps = [ff.FlowStep(12, filter_size=8) for _ in range(k)]
            x = torch.randn(2, 12, 4, 4, dtype=dtype)
            for st in steps:
                st.actnorm.initialize(x)
            mats = ff.FlowStep.forward_matrices(steps, x)
            (sum(w.sum() for w, _, _ in mats) + sum(ld.sum() for _, ld, _ in mats)).backward()
    # fewer than 16 channels: BLOCK 4 or 2 and one warp (a 1-channel image squeezed: C = 4)
    for c in (4, 2):
        steps = [ff.FlowStep(c, filter_size=8) for _ in range(ff.layers.flowstep.MIN_STACK)]
        x = torch.randn(2, c, 4, 4)
        for st in steps:
            st.actnorm.initialize(x)
        mats = ff.FlowStep.forward_matrices(steps, x)
        (sum(w.sum() for w, _, _ in mats) + sum(ld.sum() for _, ld, _ in mats)).backward()


def exercise_gaussian(quick: bool, glow: bool, rec: Recorder):
    for dtype in DTYPES[:2] if quick else DTYPES:
        for reduction in reference.REDUCTIONS:
            for given in (False, True):
                mu = torch.randn(4, 9, dtype=dtype, requires_grad=True)
                lv = torch.randn(4, 9, dtype=dtype, requires_grad=True)
                eps = torch.randn(4, 9, dtype=dtype) if given else None
                z, kl = ff.reparameterize_kl(mu, lv, eps, reduction=reduction)
                (z.float().sum() + kl.sum()).backward()
        # WIDE counters (N * ceil(D / 4) >= 2^32: the high word mixed into the Philox key),
        # forced at a small shape: the API reaches them only with a 64 GB mu
        ga = FAMILY_MODULES["gaussian"]
        mu, lv = torch.randn(4, 9, dtype=dtype), torch.randn(4, 9, dtype=dtype)
        seed = torch.tensor([2**62 + 3])
        ga.reparam_kl_forward(mu, lv, None, seed, "none", force_wide=True)
        ga.reparam_kl_backward(torch.randn_like(mu), torch.randn(4), mu, lv, None, seed, "none",
                               force_wide=True)
    for given in (False, True):  # a float64 mu with a bfloat16 logvar (and eps)
        mu = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
        lv = torch.randn(4, 9, dtype=torch.bfloat16, requires_grad=True)
        z, kl = ff.reparameterize_kl(mu, lv, torch.randn(4, 9, dtype=torch.bfloat16) if given else None)
        (z.sum() + kl.sum()).backward()
    for n, d in GAUSS_SHAPES if glow else ():
        with rec.label(f"vae {n}x{d} float32"):
            mu = torch.randn(n, d, requires_grad=True)
            lv = torch.randn(n, d, requires_grad=True)
            z, kl = ff.reparameterize_kl(mu, lv)
            (z.sum() + kl.sum()).backward()


def exercise_tarflow(quick: bool, glow: bool, rec: Recorder):
    """The TarFlow head: all-token forward/inverse and backward, the one-token sampler step
    (with and without guidance) and the Jacobi update, per dtype, clamp and token order."""
    from fastflow.ops import tarflow as tarflow_ops

    for dtype, clamp, order in itertools.product(DTYPES[:2] if quick else DTYPES, (None, 2.0),
                                                 ("same", "reversed")):
        x = torch.randn(2, 37, 12, dtype=dtype, requires_grad=True)
        h = torch.randn(2, 37, 24, dtype=dtype, requires_grad=True)
        for rev in (False, True):
            y, ld = ff.tarflow_head(x, h, clamp=clamp, order=order, reverse=rev)
            torch.autograd.grad((y, ld), (x, h), (torch.ones_like(y), torch.ones_like(ld)))
        for guided in (False, True):
            rows = 4 if guided else 2
            z = torch.randn(2, 37, 12, dtype=dtype)
            inp = torch.empty(rows, 12, dtype=dtype)
            pos = torch.zeros(1, dtype=torch.long)
            hs = tarflow_ops.HeadSampler(z, torch.empty_like(z), inp, pos, clamp=clamp,
                                         order=order, guidance=1.0 if guided else 0.0,
                                         guided=guided)
            hs.first()
            hs.step(torch.randn(rows, 24, dtype=dtype))
            hs.jacobi(torch.randn(rows, 37, 24, dtype=dtype), torch.zeros(rows, 37, 12, dtype=dtype))
    # float64 tokens with a 16-bit h: dh stored in bfloat16, with and without the clamp (at
    # 4 warps the clamped backward spilled 8 bytes under triton 3.9's ptxas: launch_config)
    for rev, clamp in itertools.product((False, True), (None, 2.0)):
        x = torch.randn(2, 37, 12, dtype=torch.float64, requires_grad=True)
        h = torch.randn(2, 37, 24, dtype=torch.bfloat16, requires_grad=True)
        y, ld = ff.tarflow_head(x, h, clamp=clamp, reverse=rev)
        torch.autograd.grad((y, ld), (x, h), (torch.ones_like(y), torch.ones_like(ld)))
    # past 65535 token tiles the all-token kernels put the tiles on the grid's axis 0
    # (TILES_ON_X): forced here at a small shape by lowering the limit
    tk = FAMILY_MODULES["tarflow"]
    limit, tk.MAX_GRID_YZ = tk.MAX_GRID_YZ, 1
    try:
        for dtype in DTYPES[:2] if quick else DTYPES:
            x = torch.randn(2, 37, 12, dtype=dtype, requires_grad=True)
            h = torch.randn(2, 37, 24, dtype=dtype, requires_grad=True)
            y, ld = ff.tarflow_head(x, h, clamp=2.0)
            torch.autograd.grad((y, ld), (x, h), (torch.ones_like(y), torch.ones_like(ld)))
            hs = tarflow_ops.HeadSampler(x.detach(), None, None, None, clamp=2.0)
            hs.jacobi(h.detach(), torch.zeros(2, 37, 12, dtype=dtype))
    finally:
        tk.MAX_GRID_YZ = limit
    for (n, t, d), dtype in itertools.product(TARFLOW_SHAPES if glow else (),
                                              (torch.float32, torch.float64)):
        with rec.label(f"tarflow {n}x{t}x{d} {str(dtype)[6:]}"):
            x = torch.randn(n, t, d, dtype=dtype, requires_grad=True)
            h = torch.randn(n, t, 2 * d, dtype=dtype, requires_grad=True)
            for rev in (False, True):
                y, ld = ff.tarflow_head(x, h, clamp=2.0, reverse=rev)
                torch.autograd.grad((y, ld), (x, h), (torch.ones_like(y), torch.ones_like(ld)))
            z = x.detach()
            hs = tarflow_ops.HeadSampler(z, torch.empty_like(z), torch.empty(2 * n, d, dtype=dtype),
                                         torch.zeros(1, dtype=torch.long), clamp=2.0,
                                         guidance=1.0, guided=True)
            hs.first()
            hs.step(torch.randn(2 * n, 2 * d, dtype=dtype))
            hs.jacobi(torch.randn(2 * n, t, 2 * d, dtype=dtype), torch.zeros(2 * n, t, d, dtype=dtype))


EXERCISES = {"coupling": exercise_coupling, "channel_mix": exercise_channel_mix,
             "lu_weight": exercise_lu_weight, "gaussian": exercise_gaussian,
             "tarflow": exercise_tarflow}


def family_kernels(module) -> list[str]:
    """The names of the ``@triton.jit`` kernels (``*_kernel``) a family module defines."""
    return sorted(name for name, obj in vars(module).items()
                  if name.endswith("_kernel") and hasattr(obj, "fn") and hasattr(obj, "run"))


# --------------------------------------------------------------------------------------
# Resource usage of a compiled kernel
# --------------------------------------------------------------------------------------


def int32_argument_products(ttir: str) -> list[str]:
    """The int32 products of two runtime values in a kernel's TTIR (``arith.muli`` on i32
    scalars or tensors, neither operand an ``arith.constant``): kernel arguments (``CO * C``
    in the channel-mix finishing kernels once wrapped past 2^31), a program id times an
    argument (``pid * STRIDE``), or values derived from them (``(pid // N) * CHUNK``). An
    argument is int32 below 2^31 and int64 from there, so such a product of two int32 values
    can wrap where each value fits: compute it in int64 (``.to(tl.int64)`` first) or pass it
    from the launcher. Each is named ``a * b``, an operand by its argument name or its
    defining op (``tt.get_program_id``, ``arith.divsi``...)."""
    sig = re.search(r"tt\.func public @\w+\((.*?)\)\s*(?:attributes|\{)", ttir, flags=re.S)
    args = set(re.findall(r"%(\w+)\s*:", sig[1])) if sig else set()
    defs = dict(re.findall(r"%([\w#]+) = ([\w.]+)", ttir))
    name = lambda v: v if v in args else defs.get(v, "?")  # noqa: E731
    found = set()
    for a, b in re.findall(r"arith\.muli %([\w#]+), %([\w#]+) : (?:tensor<[\dx]+xi32>|i32\b)", ttir):
        if "arith.constant" not in (defs.get(a), defs.get(b)):
            found.add(f"{name(a)} * {name(b)}")
    return sorted(found)


# int32 products of runtime values that a launcher keeps below 2^31, per kernel: the
# specialisations where they are allowed, and why
BOUNDED_INT32_PRODUCTS = {
    # allowed only where the launch said INDEX64 was off (a launch whose settings were not
    # recorded is not let through)
    "_reduce_kernel": (lambda meta: meta.get("INDEX64") is False,
                       "chunk * CHUNK <= N*H*W: int32 unless INDEX64 (reduce_config sets it "
                       "from N*H*W + CHUNK >= 2^31)"),
}


def direct_float64_to_16_bit(ptx: str) -> list[str]:
    """The PTX conversions straight from float64 to a 16-bit float (``cvt.rn.bf16.f64``): one
    rounding, where torch's ``.to`` rounds through float32 (and the interpreter turns a direct
    float64 -> bfloat16 conversion into garbage), so the GPU's 16-bit results would differ
    from the interpreter's and torch's. Stores go through ``_layout.rounded_for``."""
    return sorted(set(re.findall(r"\bcvt\.[\w.]*?(?:bf16|f16)\.f64\b", ptx)))


def resource_usage(kernel, arch: int, always_ptxas: bool = False, sass: bool = False) -> dict:
    """From one ``cuobjdump --dump-resource-usage`` of the kernel's cubin: REG, STACK, LOCAL,
    SHARED_STATIC, and with ``sass`` (a disassembly: slower) SASS (instructions) and CALLS
    (subroutine calls, e.g. to a division routine); SHARED_DYN (the dynamic shared memory a launch asks for), WARPS, STAGES from
    its metadata; MMA (mma / wgmma instructions in its PTX); SPILL_ST, SPILL_LD (bytes, from
    ``ptxas -v`` on its PTX with Triton's ptxas) when it has a stack frame (no stack frame:
    nowhere to spill to) or ``always_ptxas``."""
    use = {"SHARED_DYN": int(getattr(kernel.metadata, "shared", 0) or 0),
           "WARPS": kernel.metadata.num_warps, "STAGES": kernel.metadata.num_stages,
           "SPILL_ST": 0, "SPILL_LD": 0}
    ptx = kernel.asm.get("ptx") or ""
    use["MMA"] = len(re.findall(r"^\s*(?:wgmma|mma)\.", ptx, flags=re.M))
    cubin = kernel.asm.get("cubin")
    tool = os.path.join(NV_BIN, "cuobjdump")
    if cubin and os.path.exists(tool):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([tool, *(["-sass"] if sass else []), "--dump-resource-usage",
                                  f.name], capture_output=True, text=True).stdout
        found = dict(re.findall(r"\b(REG|LOCAL|SHARED|STACK):(\d+)", out))
        use.update(REG=int(found.get("REG", 0)), STACK=int(found.get("STACK", 0)),
                   LOCAL=int(found.get("LOCAL", 0)), SHARED_STATIC=int(found.get("SHARED", 0)))
        if sass:
            use["SASS"] = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", out, flags=re.M))
            use["CALLS"] = len(re.findall(r"\bCALL\.", out))
    ptxas = get_ptxas(arch).path
    if ptx and ptxas and os.path.exists(ptxas) and (always_ptxas or use.get("STACK", 1) > 0):
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            suffix = "a" if arch >= 90 else ""
            log = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2",
                                  f"--gpu-name=sm_{arch}{suffix}", src, "-o",
                                  os.path.join(d, "k.o")], capture_output=True, text=True)
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      log.stdout + log.stderr)
        if m:
            use.update(STACK=max(use.get("STACK", 0), int(m[1])), SPILL_ST=int(m[2]),
                       SPILL_LD=int(m[3]))
    return use


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper)")
    ap.add_argument("--quick", action="store_true", help="a few specialisations per kernel")
    ap.add_argument("--no-glow", action="store_true", help="skip the Glow-shape launches")
    ap.add_argument("--families", default=",".join(FAMILIES),
                    help="comma-separated families to compile (default: every registered one)")
    ap.add_argument("--jobs", type=int, default=4, help="ptxas / cuobjdump processes at once")
    ap.add_argument("--ptxas", action="store_true",
                    help="run ptxas -v on every specialisation (default: on those with a stack frame)")
    ap.add_argument("--sass", action="store_true", help="count SASS instructions and calls")
    args = ap.parse_args(argv)
    chosen = args.families.split(",")
    driver.set_active(CompileOnlyDriver(GPUTarget("cuda", args.arch, 32)))
    t0 = time.perf_counter()
    failures = [f"family {name!r} is registered but has no exercise in compile_for_gpu.py"
                for name in FAMILIES if name not in EXERCISES]
    with Recorder() as rec, ff.use_backend("triton"):
        for name in FAMILIES:
            if name not in EXERCISES or name not in chosen:
                continue
            try:
                EXERCISES[name](args.quick, not args.no_glow, rec)
            except Exception as e:  # a compile error: report it, go on with the others
                failures.append(f"{name}: {type(e).__name__}: {e}")
    for name, module in FAMILY_MODULES.items():
        for kname in family_kernels(module) if name in chosen else ():
            if kname not in rec.kernels:
                failures.append(f"{name}.{kname} was never compiled")
    total = sum(len(v) for v in rec.kernels.values())
    print(f"compiled {total} kernel specialisations for sm_{args.arch} in "
          f"{time.perf_counter() - t0:.0f} s (triton {triton.__version__})")
    cols = ("REG", "STACK", "SPILL_ST", "SPILL_LD", "LOCAL", "SHARED_DYN", "WARPS", "STAGES",
            "SASS", "CALLS", "MMA")
    print("per specialisation: registers, stack frame, spill stores / loads and local memory "
          "(bytes), dynamic shared memory (bytes), num_warps, num_stages, SASS instructions (-1: "
          "not counted, see --sass), "
          "calls (e.g. to a division routine), mma/wgmma PTX instructions, programs of its launches")
    print(f"{'kernel':24s} {'spec':>4s} " + " ".join(f"{c:>10s}" for c in cols) + "  programs")
    summary = {}
    jobs = [(name, i, key, k) for name, kernels in sorted(rec.kernels.items())
            for i, (key, k) in enumerate(kernels.items())]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        usages = list(pool.map(
            lambda job: resource_usage(job[3], args.arch, args.ptxas, args.sass), jobs))
    for (name, i, key, k), u in zip(jobs, usages):
        progs = sorted(rec.programs[(name, key)])
        print(f"{name:24s} {i:4d} " + " ".join(f"{u.get(c, -1):10d}" for c in cols)
              + "  " + ",".join(map(str, progs[:8])) + (",..." if len(progs) > 8 else ""))
        s = summary.setdefault(name, {c: 0 for c in cols} | {"specs": 0})
        s["specs"] += 1
        for c in cols:
            s[c] = max(s[c], u.get(c, 0))
        products = int32_argument_products(k.asm.get("ttir") or "")
        allowed, _why = BOUNDED_INT32_PRODUCTS.get(name, (lambda meta: False, ""))
        if products and not allowed(rec.meta.get((name, key), {})):
            failures.append(f"{name} spec {i}: int32 products of runtime values {products} (wrap "
                            f"past 2^31: compute in int64 or pass the product from the launcher)")
        direct = direct_float64_to_16_bit(k.asm.get("ptx") or "")
        if direct:
            failures.append(f"{name} spec {i}: {direct} (float64 straight to 16 bits: store "
                            f"through rounded_for); launched with {rec.meta.get((name, key), {})}")
        if u.get("STACK", 0) or u.get("SPILL_ST", 0) or u.get("SPILL_LD", 0) or u.get("LOCAL", 0):
            failures.append(f"{name} spec {i} spills: {u}; launched with "
                            f"{rec.meta.get((name, key), {})}")
    print()
    print(f"{'kernel':24s} {'specs':>5s} " + " ".join(f"{'max ' + c:>14s}" for c in cols))
    for name, s in sorted(summary.items()):
        print(f"{name:24s} {s['specs']:5d} " + " ".join(f"{s[c]:14d}" for c in cols))
    glow = {}
    for case, name, programs in rec.launches:
        if case:
            glow.setdefault(case, {}).setdefault(name, []).append(programs)
    if glow:
        print()
        print("programs per launch at the Glow / VAE shapes (each launch of a forward + backward)")
        for case, kernels in glow.items():
            print(f"  {case:28s} " + "  ".join(
                f"{name}:{'/'.join(map(str, sorted(set(p))))}" for name, p in sorted(kernels.items())))
    for f in failures:
        print("FAILED", f[:2000])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
