"""Backend choice (FASTFLOW_BACKEND, use_backend) and a GPU-free import."""

import os
import subprocess
import sys

import pytest
import torch

import fastflow as ff
from fastflow import backend


def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.delenv("FASTFLOW_BACKEND", raising=False)
    assert ff.current_mode() == "auto"
    with ff.use_backend("reference"):
        assert ff.current_mode() == "reference"
        with ff.use_backend("triton"):
            assert ff.current_mode() == "triton"
        assert ff.current_mode() == "reference"
    assert ff.current_mode() == "auto"


def test_environment_variable_is_read_per_call(monkeypatch):
    monkeypatch.setenv("FASTFLOW_BACKEND", "reference")
    assert ff.current_mode() == "reference"
    assert not backend.use_triton(torch.zeros(1))
    monkeypatch.setenv("FASTFLOW_BACKEND", "triton")
    assert backend.use_triton(torch.zeros(1)) == (torch.cuda.is_available() or backend.interpreter_enabled())
    monkeypatch.setenv("FASTFLOW_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTFLOW_BACKEND: expected one of"):
        ff.current_mode()


def test_auto_picks_reference_on_cpu_tensors(monkeypatch):
    monkeypatch.delenv("FASTFLOW_BACKEND", raising=False)
    assert not backend.use_triton(torch.zeros(1))


def _run_clean(code: str, **env_extra) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter without TRITON_INTERPRET (Triton reads it once)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTFLOW_BACKEND")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = ("import torch, fastflow as ff\n"
            "try:\n"
            "    ff.affine_coupling(torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2))\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    out = _run_clean(code, FASTFLOW_BACKEND="triton")
    assert out.returncode == 0, out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match=r"use_backend\(mode\): expected one of"):
        with ff.use_backend("cuda"):
            pass


def test_both_backends_give_the_same_numbers():
    x, h = torch.randn(2, 6, 5, 3), torch.randn(2, 6, 5, 3)
    with ff.use_backend("triton"):
        a = ff.affine_coupling(x, h)
    with ff.use_backend("reference"):
        b = ff.affine_coupling(x, h)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_import_touches_no_gpu_and_compiles_nothing():
    code = ("import sys, torch, fastflow as ff; "
            "assert 'fastflow.kernels.coupling' not in sys.modules; "
            "assert 'triton' not in sys.modules, 'triton imported at import time'; "
            "assert not torch.cuda.is_initialized(); print('ok')")
    out = _run_clean(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_one_compute_dtype_helper():
    """The reference, the ops and the kernels share one definition of the compute dtype
    (and ``compute_type`` is its Triton type)."""
    from fastflow import backend, reference
    from fastflow.kernels import _dtypes, _layout

    assert backend.compute_dtype is reference.compute_dtype is _layout.compute_dtype is _dtypes.compute_dtype
    for dtype, want in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                        (torch.float16, torch.float32), (torch.bfloat16, torch.float32)):
        assert _dtypes.compute_dtype(dtype) == want
        assert str(_layout.compute_type(dtype)) == {torch.float64: "fp64", torch.float32: "fp32"}[want]


def test_a_gpu_run_skips_cpu_tensor_triton_tests_only_for_the_missing_interpreter(monkeypatch):
    """conftest turns the Triton path's 'needs TRITON_INTERPRET=1' error into a skip on a GPU
    machine (where the interpreter is off), and nothing else: the message it matches is the
    one fastflow raises, and on a CPU machine it is never a skip."""
    from conftest import interpreter_skip_reason

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ff.use_backend("triton"), pytest.raises(RuntimeError) as caught:
        ff.affine_coupling(torch.randn(1, 2, 1, 1), torch.randn(1, 2, 1, 1))
    assert interpreter_skip_reason(caught.value, gpu=True)
    assert interpreter_skip_reason(caught.value, gpu=False) is None
    assert interpreter_skip_reason(RuntimeError("shape mismatch"), gpu=True) is None
    assert interpreter_skip_reason(ValueError(str(caught.value)), gpu=True) is None
