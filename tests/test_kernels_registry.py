"""One registry of kernel families (``fastflow.kernels.FAMILIES``): complete, and the launch
configurations it exposes fill an H100 at the shapes Glow runs."""

import ast
import importlib
import re
from pathlib import Path

import pytest
import torch

import fastflow.kernels as fk
from fastflow.kernels._layout import TARGET_SMS, Launch

ROOT = Path(fk.__file__).resolve().parent
OPS = Path(importlib.import_module("fastflow.ops").__file__).resolve().parent
COMPILE_CHECK = Path(__file__).with_name("compile_for_gpu.py")
GLOW_SHAPES = ((64, 12, 16, 16), (64, 24, 8, 8), (64, 48, 8, 8), (64, 48, 4, 4), (64, 96, 4, 4))


def family_kernels(name):
    module = importlib.import_module(f"fastflow.kernels.{name}")
    return {k for k, v in vars(module).items() if k.endswith("_kernel") and hasattr(v, "fn")}


def test_every_kernel_file_is_a_registered_family():
    files = {p.stem for p in ROOT.glob("*.py") if not p.stem.startswith("_")}
    assert files == set(fk.FAMILIES)
    for name in fk.FAMILIES:
        assert family_kernels(name), f"{name} defines no *_kernel"


def test_every_public_op_runs_registered_kernels():
    """Each op module reaches its kernels through ``from ..kernels import <family>``, and
    every family is reached by some op."""
    used = set()
    for path in OPS.glob("*.py"):
        if path.stem.startswith("_"):
            continue
        found = set(re.findall(r"from \.\.kernels import (\w+)", path.read_text()))
        assert found, f"fastflow/ops/{path.name} launches no kernel family"
        assert found <= set(fk.FAMILIES), f"{path.name}: {found - set(fk.FAMILIES)} not registered"
        used |= found
    assert used == set(fk.FAMILIES)


def test_every_family_has_a_compile_exercise():
    """Read from the script's source (importing it would unset TRITON_INTERPRET)."""
    tree = ast.parse(COMPILE_CHECK.read_text())
    exercises = next(node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                     and getattr(node.targets[0], "id", "") == "EXERCISES")
    assert {ast.literal_eval(k) for k in exercises.keys} == set(fk.FAMILIES)


def _configs(name, shape):
    n, c, h, w = shape
    mod = importlib.import_module(f"fastflow.kernels.{name}")
    if name == "coupling":
        return [mod.launch_configs(n, c, h * w)]
    if name == "channel_mix":
        return [mod.launch_configs(n, c, h * w, dt, diag=diag, reverse=rev)
                for dt in (torch.float32, torch.float64) for diag in (False, True)
                for rev in (False, True)]
    if name == "lu_weight":
        return [mod.launch_configs(c, n)]
    if name == "gaussian":
        return [mod.launch_configs(n, c * h * w)]
    if name == "tarflow":  # the image as (h*w) tokens of c values
        return [mod.launch_configs(n, h * w, c, dt) for dt in (torch.float32, torch.float64)]
    raise AssertionError(f"no launch_configs call for family {name!r}: add one here")


@pytest.mark.parametrize("name", list(fk.FAMILIES))
def test_launch_configs_cover_every_kernel(name):
    seen = set()
    for cfg in _configs(name, GLOW_SHAPES[3]):
        for kernel, launch in cfg.items():
            assert isinstance(launch, Launch)
            assert launch.num_warps in (1, 2, 4, 8) and launch.num_stages >= 1
            assert set(launch.meta) >= {"num_warps", "num_stages"}
            seen.add(kernel)
    assert seen == family_kernels(name)


@pytest.mark.parametrize("shape", GLOW_SHAPES)
def test_launches_fill_an_h100_at_glow_shapes(shape):
    """The activation-sized launches give at least one program per SM of an H100; the
    weight-gradient reduction as many as its workspace bound allows (partials within a
    quarter of the activations read), and never fewer than 64."""
    n, c, h, w = shape
    from fastflow.kernels import channel_mix, coupling
    for cfg in (coupling.launch_config(n, c, h * w),
                channel_mix.mix_config(n, c, c, h * w, torch.float32, False),
                channel_mix.mix_config(n, c, c, h * w, torch.float32, True),
                channel_mix.reduce_config(n, c, c, h * w, torch.float32, True)):
        assert cfg.programs >= TARGET_SMS, (shape, cfg)
    red = channel_mix.reduce_config(n, c, c, h * w, torch.float32, False)
    assert red.programs >= 64, (shape, red)
    assert red.extra["N_CHUNKS"] * (c * c + c) <= n * h * w * 2 * c / 4, (shape, red)


# CUDA's grid limits: x up to 2^31 - 1 programs, y and z up to 65535
GRID_LIMITS = (2**31 - 1, 65535, 65535)
# (N, C, H, W) far past Glow's: one huge image, many tiny samples, wide channels, long
# token sequences of wide tokens (the TarFlow family reads them as (N, H*W tokens, C))
EXTREME_SHAPES = ((1, 3, 2**14, 2**14), (2**22, 1, 1, 1), (2**20, 3, 1, 1), (16, 4096, 64, 64),
                  (1, 128, 2**10, 2**10), (1, 256, 2**11, 2**9), (70000, 12, 4, 4))


@pytest.mark.parametrize("name", list(fk.FAMILIES))
@pytest.mark.parametrize("shape", EXTREME_SHAPES)
def test_grids_stay_within_cuda_limits(name, shape):
    """Every launch's grid fits CUDA's limits (the interpreter has none: a grid past them
    runs there and fails to launch on a GPU). The TarFlow all-token kernels ran on a
    (N, token tiles) grid, whose second axis passed 65535 beyond 524,280 tokens of
    width >= 128 (8 tokens per tile)."""
    for cfg in _configs(name, shape):
        for kernel, launch in cfg.items():
            assert len(launch.grid) <= 3 and all(
                1 <= g <= lim for g, lim in zip(launch.grid, GRID_LIMITS)), (kernel, shape, launch.grid)
