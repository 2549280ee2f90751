"""Every kernel specialisation the public API launches compiles for a Hopper GPU (sm_90),
on this GPU-less machine, with no spill: see tests/compile_for_gpu.py (it exits 1 on a
compile error, a spill, or a registered family it cannot reach)."""

import ast
import importlib
import os
import subprocess
import sys
import tempfile
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


NEEDED = not torch.cuda.is_available() and PTXAS.exists()  # the test's two skip conditions
_STARTED: dict = {}  # the running compile processes and their logs, once started


def start_compiles() -> tuple[list, list]:
    """Start the script once per half of the families, both at once (the compiles run one at
    a time inside a process: with an empty Triton cache, as on a fresh clone or CI, the whole
    set took 143 s in one process on this 2-core machine). ``conftest.py`` calls this when
    the suite is collected and runs the test last, so the compiles use the core the
    interpreted tests leave idle; at low priority (nice 10), so they do not slow those."""
    if not _STARTED:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        first = ["channel_mix", "gaussian"]  # about half the cold compile time each
        halves = [first, [f for f in FAMILIES if f not in first]]
        assert sorted(sum(halves, [])) == sorted(FAMILIES)
        folder = Path(tempfile.mkdtemp(prefix="fastflow-sm90-"))
        logs = [(folder / f"out{i}.txt", folder / f"err{i}.txt") for i in range(len(halves))]
        runs = []
        for half, (out, err) in zip(halves, logs):
            with out.open("w") as o, err.open("w") as e:  # the child keeps its own copies
                runs.append(subprocess.Popen(
                    [sys.executable, str(SCRIPT), "--arch", "90", "--families", ",".join(half)],
                    stdout=o, stderr=e, env=env,
                    preexec_fn=(lambda: os.nice(10)) if hasattr(os, "nice") else None))
        _STARTED.update(runs=runs, logs=logs)
    return _STARTED["runs"], _STARTED["logs"]


def stop_compiles():
    """End processes still running when the session ends early (-x, Ctrl-C)."""
    for run in _STARTED.get("runs", []):
        if run.poll() is None:
            run.kill()
            run.wait()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile them for real")
@pytest.mark.skipif(not PTXAS.exists(), reason="this triton wheel carries no ptxas")
def test_every_kernel_compiles_for_sm90_without_spills():
    runs, logs = start_compiles()  # (already running when the whole suite was collected)
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


def test_an_allowed_int32_product_needs_the_launch_settings_that_allow_it():
    """The reduce kernel's int32 product is allowed where its launch set INDEX64 off; a
    specialisation whose settings were not recorded was let through as well."""
    interpret = os.environ.get("TRITON_INTERPRET")  # the script sets it when imported
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import compile_for_gpu
    finally:
        sys.path.remove(str(SCRIPT.parent))
        if interpret is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = interpret
    allowed = compile_for_gpu.BOUNDED_INT32_PRODUCTS["_reduce_kernel"][0]
    assert allowed({"INDEX64": False})
    assert not allowed({"INDEX64": True})
    assert not allowed({})
