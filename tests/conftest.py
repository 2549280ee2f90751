"""Shared test set-up.

Without a GPU the Triton kernels run under the interpreter: TRITON_INTERPRET=1 must be set
before any kernel is compiled, so it is set here, before fastflow is imported by a test.
With a GPU the same tests run the compiled kernels on CUDA tensors.
"""

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fastflow as ff  # noqa: E402

# Property tests draw the same examples on every run (reproducible CI, no example database).
settings.register_profile("fastflow", derandomize=True, database=None, deadline=None)
settings.load_profile("fastflow")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# On a GPU, the coupling networks' float32 convolutions would run in TF32 (cuDNN's default)
# and cuDNN may pick non-deterministic backward algorithms: the tests compare float32 models
# with float64 oracles, compiled with eager runs, and one backward with another bitwise, so
# they ask for exact float32 and deterministic convolutions. (fastflow's own kernels use no
# TF32 unless asked; the benchmarks keep torch's defaults.) No effect on a CPU machine.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.deterministic = True
torch.backends.cudnn.benchmark = False

@pytest.fixture(scope="module")
def on_device():
    """Tensors made without a device go to ``DEVICE`` for a whole test module (its
    module-scoped fixtures included): for the kernel-level tests, which call the launchers
    directly, so that on a GPU machine they launch the compiled kernels on CUDA tensors
    (a compiled kernel cannot read CPU memory). On a CPU machine nothing changes."""
    if DEVICE == "cpu":
        yield
        return
    with torch.device(DEVICE):
        yield


@pytest.fixture
def float_conversions(monkeypatch):
    """The image counts a test's code turns into floats (``ImageSet.as_float``,
    ``data.levels_to_unit``), in call order: the training commands must convert batches,
    never a whole set."""
    from fastflow import data

    counts = []
    as_float, to_unit = data.ImageSet.as_float, data.levels_to_unit
    monkeypatch.setattr(data.ImageSet, "as_float",
                        lambda self: counts.append(len(self)) or as_float(self))
    monkeypatch.setattr(data, "levels_to_unit", lambda levels, n_bins: counts.append(
        len(levels)) or to_unit(levels, n_bins))
    return counts


# What fastflow.backend says when the Triton path meets a CPU tensor without the interpreter.
NEEDS_INTERPRETER = "on CPU tensors needs TRITON_INTERPRET=1"


def interpreter_skip_reason(exc: BaseException, gpu: bool) -> str | None:
    """On a GPU machine the kernels are compiled, not interpreted, so a test that runs the
    Triton half of the ``backend`` fixture on CPU tensors cannot run there (its CUDA twin is
    every test written on ``DEVICE``): the reason to skip it, None for any other failure."""
    if gpu and isinstance(exc, RuntimeError) and NEEDS_INTERPRETER in str(exc):
        return ("Triton path on CPU tensors: needs the interpreter, which a GPU run leaves off "
                "(the compiled kernels are tested on CUDA tensors)")
    return None


COMPILE_CHECK = "test_every_kernel_compiles_for_sm90_without_spills"


def pytest_collection_modifyitems(config, items):
    """The sm_90 compile check (tests/test_compile_for_gpu.py) runs last: its processes,
    started when collection ends, compile beside the rest of the suite."""
    items.sort(key=lambda item: item.name == COMPILE_CHECK)  # stable: the rest keep order


def pytest_collection_finish(session):
    for item in session.items:
        if item.name == COMPILE_CHECK and getattr(item.module, "NEEDED", False):
            item.module.start_compiles()


def pytest_sessionfinish(session):
    module = sys.modules.get("test_compile_for_gpu")
    if module is not None:
        module.stop_compiles()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except RuntimeError as exc:
        reason = interpreter_skip_reason(exc, torch.cuda.is_available())
        if reason is None:
            raise
        pytest.skip(reason)

# (rtol, atol) of an op's result against the float64 reference, per input dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
# The same on a GPU: the only tl.dot is exact float32 ("ieee"), so float32 needs no
# GPU-only loosening.

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def assert_close(actual, expected, dtype=None, *, rtol=None, atol=None, msg=""):
    """``actual`` against a float64 ``expected`` with the tolerance of ``dtype``."""
    r, a = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64),
                               rtol=rtol if rtol is not None else r,
                               atol=atol if atol is not None else a, msg=msg or None)


def assert_close_to_eager(actual, expected, eager, *, atol=None, factor=2.0, msg=""):
    """Low-precision results judged against eager PyTorch, as flash-attention's tests do:
    ``max|actual - expected| <= factor * max|eager - expected| + atol``, where ``expected``
    is the float64 reference and ``eager`` the same computation in plain PyTorch at the
    input's dtype (atol: the dtype's absolute tolerance by default)."""
    expected = expected.to(torch.float64)
    err = (actual.to(torch.float64) - expected).abs().max().item()
    eager_err = (eager.to(torch.float64) - expected).abs().max().item()
    a = TOLERANCES[actual.dtype][1] if atol is None else atol
    assert err <= factor * eager_err + a, (
        f"{msg + ': ' if msg else ''}max error {err:.3g} > {factor} x eager's {eager_err:.3g} + {a:.3g}")


@pytest.fixture(params=["triton", "reference"])
def backend(request):
    """Run the test once with the Triton kernels (interpreted on CPU) and once with the
    plain PyTorch reference."""
    with ff.use_backend(request.param):
        yield request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture
def small_npz(tmp_path):
    """80 digits as an 8-bit .npz (the training commands' tests): 4 steps per epoch at
    batch 16."""
    import numpy as np

    from fastflow.data import digits

    images = (digits("all")[0][:80, 0] * 255).round().to(torch.uint8).numpy()
    path = tmp_path / "digits80.npz"
    np.savez(path, images=images)
    return str(path)


class OpenedOpsMode(TorchDispatchMode):
    """A dispatch mode that sees the ATen ops inside fastflow's custom ops too: a
    ``fastflow::`` op runs its implementation (launcher, allocations) under the mode again.
    Every other op reaches ``seen(func, args, kwargs, out)`` after it ran."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastflow":
            from torch._library.custom_ops import OPDEFS

            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        self.seen(func, args, kwargs, out)
        return out

    def seen(self, func, args, kwargs, out):
        pass


class CastCounter(OpenedOpsMode):
    """dtype conversions (``aten.to`` / ``_to_copy``) of the tensors ``which(t)`` picks, as
    ``casts``: a list of (from, to) dtypes."""

    def __init__(self, which):
        super().__init__()
        self.which, self.casts = which, []

    def seen(self, func, args, kwargs, out):
        if (func.overloadpacket in (torch.ops.aten.to, torch.ops.aten._to_copy)
                and self.which(args[0]) and out.dtype != args[0].dtype):
            self.casts.append((args[0].dtype, out.dtype))


class OpsCounter(OpenedOpsMode):
    """The ATen ops that ran, by packet name: ``count("log")`` is how many ``aten.log``."""

    def __init__(self):
        super().__init__()
        self.names = []

    def seen(self, func, args, kwargs, out):
        self.names.append(func.overloadpacket.__name__)

    def count(self, name: str) -> int:
        return self.names.count(name)


def assert_device_assert_fails(code: str) -> None:
    """Run ``code`` (a Python program that should trip a device-side assert) in another
    process, with this checkout's fastflow: a failed device assert ends the process's CUDA
    context, so it cannot run in the test process. It must exit non-zero naming an assert."""
    import fastflow

    root = os.path.dirname(os.path.dirname(os.path.abspath(fastflow.__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode != 0 and "assert" in done.stderr.lower(), done.stderr[-2000:]
