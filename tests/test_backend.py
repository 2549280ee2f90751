"""Backend choice (FASTFLOW_BACKEND, use_backend) and a GPU-free import."""

import os
import subprocess
import sys
import warnings

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
    assert "FASTFLOW_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1" in out.stdout


def test_triton_block_on_cpu_without_interpreter_names_the_block(monkeypatch):
    """The error names what chose the Triton path: a ``use_backend`` block, not the
    environment variable the user never set."""
    monkeypatch.delenv("FASTFLOW_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ff.use_backend("triton"), pytest.raises(
            RuntimeError, match=r'^use_backend\("triton"\) on CPU tensors needs TRITON_INTERPRET=1'):
        ff.affine_coupling(torch.randn(1, 2, 1, 1), torch.randn(1, 2, 1, 1))


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


def test_blocks_left_out_of_order_remove_their_own_mode(monkeypatch):
    """A generator suspended inside a block exits it when resumed, possibly inside a block
    its caller opened later: that must end the generator's block, not the caller's; and an
    exception leaving a block restores the mode before it."""
    monkeypatch.delenv("FASTFLOW_BACKEND", raising=False)

    def gen():
        with ff.use_backend("triton"):
            yield

    g = gen()
    next(g)
    assert ff.current_mode() == "triton"
    with ff.use_backend("reference"):
        next(g, None)  # the generator leaves its triton block
        assert ff.current_mode() == "reference"
    assert ff.current_mode() == "auto"
    with pytest.raises(KeyError), ff.use_backend("reference"):
        raise KeyError
    assert ff.current_mode() == "auto"


def test_each_thread_and_asyncio_task_has_its_own_mode(monkeypatch):
    import asyncio
    import threading

    monkeypatch.delenv("FASTFLOW_BACKEND", raising=False)
    seen = []

    async def task(mode, first_wait):
        with ff.use_backend(mode):
            for wait in (first_wait, 0.02):
                await asyncio.sleep(wait)  # the other task enters or leaves its block here
                seen.append((mode, ff.current_mode()))

    async def both():
        await asyncio.gather(task("triton", 0.01), task("reference", 0.0))

    asyncio.run(both())
    assert sorted(seen) == [("reference", "reference")] * 2 + [("triton", "triton")] * 2
    assert ff.current_mode() == "auto"

    entered, release = threading.Event(), threading.Event()

    def other():
        with ff.use_backend("triton"):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    try:
        entered.wait(10)
        assert ff.current_mode() == "auto"  # the other thread's block does not leak here
        with ff.use_backend("reference"):
            seen_there = []
            u = threading.Thread(target=lambda: seen_there.append(ff.current_mode()))
            u.start()
            u.join()
            assert seen_there == ["auto"]  # nor this thread's block into a new thread
    finally:
        release.set()
        t.join()


def _path_recorder(ran: list):
    """A torch.compile backend that runs the traced graph and appends, per call, which path
    it holds: "triton" (a fastflow custom op in the graph) or "reference"."""
    def record(gm, inputs):
        path = "triton" if "fastflow" in str(gm.graph) else "reference"

        def run(*args):
            ran.append(path)
            return gm.forward(*args)
        return run
    return record


def test_compiled_function_follows_the_mode_between_calls(monkeypatch):
    """torch.compile(fullgraph=True) reads the mode while tracing and guards on it: a change
    of use_backend block or of FASTFLOW_BACKEND between calls runs the other path."""
    monkeypatch.delenv("FASTFLOW_BACKEND", raising=False)
    ran = []
    record = _path_recorder(ran)

    compiled = torch.compile(lambda x, h: ff.affine_coupling(x, h), fullgraph=True,
                             backend=record)
    x, h = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(x, h)
        for mode in ("triton", "reference", "triton", "auto"):
            with ff.use_backend(mode):
                compiled(x, h)
        with ff.use_backend("triton"), ff.use_backend("reference"):
            compiled(x, h)
        for mode in ("triton", "reference"):
            monkeypatch.setenv("FASTFLOW_BACKEND", mode)
            compiled(x, h)
    # dynamo warned that it traces through an lru_cache ("silent incorrectness ...") on
    # every `train --compile`: the mode is parsed without the cache while tracing
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    assert ran == ["reference", "triton", "reference", "triton", "reference", "reference",
                   "triton", "reference"]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_use_backend_inside_a_compiled_function(monkeypatch, requires_grad):
    """A ``use_backend`` block inside a function torch.compile(fullgraph=True) traces selects
    the path of the ops in it (it raised dynamo's Unsupported on ``ContextVar.get``: every
    "fastflow+compile" row of the benchmark tables was an error), and leaves the caller's
    mode as it was."""
    monkeypatch.delenv("FASTFLOW_BACKEND", raising=False)
    ran = []
    record = _path_recorder(ran)

    def coupling_in(mode):
        def f(x, h):
            with ff.use_backend(mode):
                return ff.affine_coupling(x, h)
        return torch.compile(f, fullgraph=True, backend=record)

    x = torch.randn(1, 2, 2, 2, requires_grad=requires_grad)
    h = torch.randn(1, 2, 2, 2, requires_grad=requires_grad)
    torch._dynamo.reset()
    with ff.use_backend("reference"):
        y, ld = coupling_in("triton")(x, h)
        assert ff.current_mode() == "reference"
    y_ref, ld_ref = coupling_in("reference")(x, h)
    assert ff.current_mode() == "auto"
    assert ran == ["triton", "reference"]
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(ld, ld_ref)
