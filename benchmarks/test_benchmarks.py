"""pytest-benchmark suites: ``pytest benchmarks --benchmark-only``.

Every case of every ``suite_*.py`` (the small "quick" shapes on CPU, the real ones on a GPU)
and every implementation, timed for forward+backward; and suite_glow's training step
(forward, backward, Adam) of the floor, the eager peer, fastflow and (on a GPU) the compiled
peer. Benchmarks measure; nothing here asserts a time."""

import importlib

import pytest
import torch

import fastflow as ff
import harness

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = DEVICE == "cpu"


def _params():
    out = []
    for name in harness.op_suites():  # every registered kernel family's suite
        try:
            suite = importlib.import_module(f"suite_{name}")
        except ImportError:
            continue
        for case in suite.cases(DEVICE, QUICK):
            for impl in case.impls:
                tag = f"{case.op}-{case.shape}-{str(case.dtype).replace('torch.', '')}-{impl.name}"
                marks = [pytest.mark.skip(reason=impl.skip)] if impl.skip else []
                out.append(pytest.param(case, impl, id=tag.replace(" ", "_"), marks=marks))
    return out


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("case,impl", _params())
def test_forward_backward(benchmark, case, impl):
    # as run.py's harness.measure: fastflow's default backend whatever FASTFLOW_BACKEND
    # says, one block around the whole test (not one per call), and the outputs checked
    # against eager's first (an implementation computing another function fails here)
    with ff.use_backend("auto"):
        checked = harness.check_outputs(case, impl, case.make_inputs())
        assert "flag" not in checked, checked["check"]
        inputs = case.make_inputs()
        outs = [o for o in harness._tensors(impl.fn(*inputs)) if o.requires_grad]
        outs, grads = harness._grad_outputs(outs)

        def step():
            o = [t for t in harness._tensors(impl.fn(*inputs)) if t.requires_grad]
            harness.run_backward(o, grads, inputs)
            _sync()

        benchmark.group = f"{case.op} {case.shape} {case.dtype}"
        benchmark(step)


def _glow_params():
    import suite_glow

    return [pytest.param(step, check, id=name)
            for name, step, check in suite_glow.benchmark_steps(DEVICE)]


@pytest.mark.parametrize("step,check", _glow_params())
def test_glow_train_step(benchmark, step, check):
    checked = check()  # the loss and gradients are the eager peer's, as run.py checks
    assert "flag" not in checked, checked["check"]

    def run():
        step()
        _sync()

    benchmark.group = "glow train step"
    benchmark(run)
