"""Every kernel specialisation the public API launches compiles for a Hopper GPU (sm_90),
on this GPU-less machine, with no spill: see tests/compile_for_gpu.py (it exits 1 on a
compile error, a spill, or a registered family it cannot reach)."""

import ast
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
def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    """The script once per half of the families, both at once: the compiles run one at a time
    inside a process, and with an empty Triton cache (a fresh clone, CI) the whole set took
    143 s in one process on this 2-core machine; channel_mix alone is ~45% of it. With the
    TarFlow head at model widths added, the halves are channel_mix + gaussian (78 s, cold)
    and the rest (74 s)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    first = ["channel_mix", "gaussian"]
    halves = [first, [f for f in FAMILIES if f not in first]]
    assert sorted(sum(halves, [])) == sorted(FAMILIES)
    logs = [(tmp_path / f"out{i}.txt", tmp_path / f"err{i}.txt") for i in range(len(halves))]
    runs = []
    for half, (out, err) in zip(halves, logs):
        with out.open("w") as o, err.open("w") as e:  # the child keeps its own copies
            runs.append(subprocess.Popen([sys.executable, str(SCRIPT), "--arch", "90",
                                          "--families", ",".join(half)],
                                         stdout=o, stderr=e, env=env))
    rows = {}
    for run, (out, err) in zip(runs, logs):
        run.wait(timeout=1800)
        stdout, stderr = out.read_text(), err.read_text()
        assert run.returncode == 0, stdout[-4000:] + stderr[-4000:]
        summary = stdout.split("max REG", 1)[1]
        rows |= {line.split()[0]: line.split() for line in summary.splitlines()
                 if line.startswith("_")}
    for name in registered_kernels():
        assert name in rows, f"{name} was never compiled:\n{sorted(rows)}"
        specs, _reg, stack, spill_st, spill_ld, local = map(int, rows[name][1:7])
        assert specs >= 1 and stack == spill_st == spill_ld == local == 0, rows[name]


def jit_functions_with_defaults(source: str) -> list[str]:
    """The ``@triton.jit`` functions of ``source`` that give any parameter a default."""
    found = []
    for f in ast.walk(ast.parse(source)):
        if isinstance(f, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in f.decorator_list):
            if f.args.defaults or any(d is not None for d in f.args.kw_defaults):
                found.append(f.name)
    return found


def test_no_jit_function_has_a_default_argument():
    """triton 3.6 (the GPU image's) hands a ``@triton.jit`` helper's default value to the
    code inside it as a plain Python object: ``_mm``'s ``PRECISION: tl.constexpr = "ieee"``
    reached ``tl.dot(input_precision=...)`` as a str and the channel-mix reduction failed to
    compile ("'str' object has no attribute 'type'"; triton 3.9 accepts it, so only the
    GPU would have shown it). Every argument is passed explicitly instead."""
    kernels = Path(importlib.import_module("fastflow.kernels").__file__).parent
    offenders = {p.name: jit_functions_with_defaults(p.read_text())
                 for p in sorted(kernels.glob("*.py"))}
    assert {k: v for k, v in offenders.items() if v} == {}
    # the check itself sees a default where there is one
    assert jit_functions_with_defaults(
        "@triton.jit\ndef f(a, B: tl.constexpr = 1):\n    return a\n") == ["f"]
