"""Every kernel specialisation the public API launches compiles for a Hopper GPU (sm_90),
on this GPU-less machine: see tests/compile_for_gpu.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
KERNELS = ("_coupling_fwd_kernel", "_coupling_bwd_kernel", "_mix_kernel", "_reduce_kernel",
           "_finish_kernel", "_lu_weight_kernel", "_lu_weight_bwd_kernel",
           "_reparam_kl_fwd_kernel", "_reparam_kl_bwd_kernel")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile them for real")
@pytest.mark.skipif(not PTXAS.exists(), reason="this triton wheel carries no ptxas")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90"], capture_output=True,
                         text=True, env=env, timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    lines = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.startswith("_")}
    for name in KERNELS:
        assert name in lines, f"{name} was never compiled:\n{out.stdout}"
        assert int(lines[name][1]) >= 1
