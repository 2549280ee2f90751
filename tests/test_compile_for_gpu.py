"""Every kernel specialisation the public API launches compiles for a Hopper GPU (sm_90),
on this GPU-less machine, with no spill: see tests/compile_for_gpu.py (it exits 1 on a
compile error, a spill, or a registered family it cannot reach)."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from fastflow.kernels import FAMILIES

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def registered_kernels():
    names = []
    for family in FAMILIES:
        module = importlib.import_module(f"fastflow.kernels.{family}")
        names += [k for k, v in vars(module).items() if k.endswith("_kernel") and hasattr(v, "fn")]
    return names


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile them for real")
@pytest.mark.skipif(not PTXAS.exists(), reason="this triton wheel carries no ptxas")
def test_every_kernel_compiles_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90"], capture_output=True,
                         text=True, env=env, timeout=1800)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    summary = out.stdout.split("max REG", 1)[1]
    rows = {line.split()[0]: line.split() for line in summary.splitlines() if line.startswith("_")}
    for name in registered_kernels():
        assert name in rows, f"{name} was never compiled:\n{out.stdout[-4000:]}"
        specs, _reg, stack, spill_st, spill_ld, local = map(int, rows[name][1:7])
        assert specs >= 1 and stack == spill_st == spill_ld == local == 0, rows[name]
