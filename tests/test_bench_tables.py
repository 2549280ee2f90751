"""What the benchmark tables time and print (benchmarks/harness.py and the suites): every
implementation is checked against eager before it is timed, fastflow's rows time the op as a
user calls it, and first-call work (compiles, Adam's state) stays out of the timed calls.
Fast: tiny tensors, one repetition, no real timing asserted."""

import sys
from pathlib import Path

import pytest
import torch

import fastflow as ff

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CPU tables: threads contending on a busy machine are slow
    try:
        import harness
        import run

        yield harness, run
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(ROOT / "benchmarks"))


def _case(harness, impls, **kw):
    def make_inputs():
        return (torch.randn(3, 4, requires_grad=True),)

    return harness.Case("toy", "N=3", torch.float32, make_inputs, impls, 48, 96, **kw)


def test_an_implementation_computing_another_function_is_flagged_not_printed(bench, monkeypatch):
    """A row whose outputs or gradients are not eager's was timed and printed with a
    speed-up as if it did the same work; now it is flagged (the table prints the flag, not
    its numbers) and left out of the ratios. A peer declared to compute its own formula
    says so in the check column instead."""
    harness, run = bench
    impls = [harness.Impl("eager", lambda x: (x * 2, x.sum(1))),
             harness.Impl("same", lambda x: (x + x, x.sum(1))),
             harness.Impl("wrong", lambda x: (x * 2, -x.sum(1))),
             harness.Impl("shape", lambda x: (x * 2, x.sum(0))),
             harness.Impl("peer", lambda x: (x * 3, x.sum(1)), differs="its own formula")]
    monkeypatch.setattr(harness, "flag_row", lambda r: r)  # one repetition: no timing flags
    rows = {r["impl"]: r for r in harness.measure(_case(harness, impls), "cpu", None,
                                                  reps=1, warmup=0)}
    assert rows["same"]["check"].startswith("ok") and "flag" not in rows["same"]
    assert "speedup_vs_eager" in rows["same"]
    for name in ("wrong", "shape"):
        assert "WRONG" in rows[name]["flag"] and "MISMATCH" in rows[name]["check"]
        assert "speedup_vs_eager" not in rows[name]
    assert "shape (3, 4) against eager's (4, 3)" not in rows["shape"]["check"]
    assert "shape (4,) against eager's (3,)" in rows["shape"]["check"]
    assert rows["peer"]["check"].startswith("another function: its own formula")
    assert "flag" not in rows["peer"]
    text = run.table([run.add_ms(r) for r in rows.values()], run.TIME_COLS)
    header = [c.strip() for c in text.splitlines()[0].strip("|").split("|")]
    line = next(ln for ln in text.splitlines() if "| wrong |" in ln)
    cells = dict(zip(header, [c.strip() for c in line.strip("|").split("|")]))
    assert "WRONG" in cells["flag"] and cells["fwd_bwd_ms"] == "—"


def test_gaussian_rows_compare_what_does_not_depend_on_the_noise(bench):
    """The Gaussian case compares kl and d mu (z and d logvar use each implementation's
    own noise), and fastflow's row passes on it."""
    harness, _ = bench
    import suite_gaussian

    case = suite_gaussian.cases("cpu", True)[0]
    impl = next(i for i in case.impls if i.name == "fastflow")
    checked = harness.check_outputs(case, impl, case.make_inputs())
    assert checked["check"].startswith("ok") and "kl and d mu" in checked["check"]


def test_fastflow_rows_time_the_op_as_a_user_calls_it(bench, monkeypatch):
    """Each op suite's fastflow row entered a ``use_backend("auto")`` block on every call
    (about 2 us on this CPU), a cost only fastflow's times carried; the block is now held
    once around the whole measurement, so fastflow still runs its default backend whatever
    FASTFLOW_BACKEND says."""
    harness, _ = bench
    import importlib

    entered = []
    real = ff.use_backend

    def spy(mode):
        entered.append(mode)
        return real(mode)

    monkeypatch.setattr(ff, "use_backend", spy)
    for name in harness.op_suites():
        case = importlib.import_module(f"suite_{name}").cases("cpu", True)[0]
        impl = next(i for i in case.impls if i.name == "fastflow")
        with real("reference"):
            impl.fn(*case.make_inputs())
        assert entered == [], name

    monkeypatch.setenv("FASTFLOW_BACKEND", "triton")
    modes = []

    def probe(x):
        modes.append(ff.backend.current_mode())
        return x * 2

    harness.measure(_case(harness, [harness.Impl("eager", lambda x: x * 2),
                                    harness.Impl("fastflow", probe)]), "cpu", None,
                    reps=1, warmup=0)
    assert modes and set(modes) == {"auto"}


def test_the_first_backward_runs_before_any_timed_repetition(bench, monkeypatch):
    """With --warmup 0 the first call was a forward only, so the first backward (where
    torch.compile builds its backward graph and Triton compiles the backward kernels) was
    timed as the first repetition's backward."""
    harness, _ = bench
    backwards, at_first_timer = [], []

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            backwards.append(1)
            return g * 2

    real_enter = harness._Timer.__enter__

    def enter(self):
        if not at_first_timer:
            at_first_timer.append(len(backwards))
        return real_enter(self)

    monkeypatch.setattr(harness._Timer, "__enter__", enter)
    harness.time_impl(harness.Impl("x", Double.apply), (torch.ones(3, requires_grad=True),),
                      "cpu", reps=1, warmup=0)
    assert at_first_timer == [1]


def test_the_ratio_table_calls_each_function_once_before_timing(bench, monkeypatch):
    """The ratio table timed its closures right away: with --warmup 0 the first train step
    (Adam's state made, kernels compiled) was one of the timed calls."""
    harness, _ = bench
    import suite_glow

    calls = {}

    def counting(make):
        def wrapped(*args, **kwargs):
            key = len(calls)
            calls[key] = 0
            make(*args, **kwargs)

            def run():
                calls[key] += 1
            run.key = key
            return run
        return wrapped

    seen = []

    def fake_interleaved(fns, device, reps, warmup):
        seen.extend(calls[f.key] for f in fns.values())
        return {name: {"median": 1.0} for name in fns}

    monkeypatch.setattr(harness, "fwd_bwd_closure", counting(lambda fn, inputs: None))
    monkeypatch.setattr(suite_glow, "train_step", counting(lambda *a: None))
    monkeypatch.setattr(suite_glow, "sample_fn", counting(lambda *a: None))
    monkeypatch.setattr(harness, "time_interleaved", fake_interleaved)
    rows = suite_glow.ratio_rows("cpu", reps=1, warmup=0)
    assert rows and seen and all(n == 1 for n in seen), seen


def test_the_log_det_figure_does_not_call_the_no_grad_assembly_cached(bench, monkeypatch):
    """InvConv2dLU caches nothing (fastflow/layers/channel_mix.py); the figure called its
    no-grad assembly "eval (cached)"."""
    import suite_channel_mix

    monkeypatch.setattr(suite_channel_mix, "_median_s", lambda fn, reps=30, warmup=3: 1e-6)
    rows = suite_channel_mix._logdet_figures()
    assert rows and all("(cached)" not in r["detail"] and "nothing is cached" in r["detail"]
                        for r in rows)


def test_the_bfloat16_channel_mix_case_times_eager_too(bench, monkeypatch):
    """The GPU table's bfloat16 channel-mix case: eager's conv2d got a bfloat16 input and
    a float32 W and raised, so the case had no eager (nor compile) row and no speed-ups."""
    harness, _ = bench
    import suite_channel_mix

    case = suite_channel_mix._case(2, 4, 4, torch.bfloat16, "cpu", compile_=False)
    monkeypatch.setattr(harness, "flag_row", lambda r: r)  # one repetition: no timing flags
    rows = {r["impl"]: r for r in harness.measure(case, "cpu", None, reps=1, warmup=0)}
    assert set(rows) == {"eager", "fastflow"}
    assert all("error" not in r for r in rows.values()), rows
    assert rows["fastflow"]["check"].startswith("ok")
    assert "speedup_vs_eager" in rows["fastflow"]


def test_glow_rows_with_other_weights_than_eager_are_flagged(bench, monkeypatch):
    """The Glow tables timed fastflow against the peer without checking that both compute
    the same loss, gradients and samples from the same weights; now each row is checked
    first, and one that differs is flagged (not printed as a result, no ratios)."""
    harness, run = bench
    import suite_glow

    tiny = suite_glow.Config("tiny", 2, 8, 2, 1, 8)
    real = suite_glow.make_models

    def make_models(cfg, device, seed=0):
        models = real(cfg, device, seed)
        with torch.no_grad():  # another model than the peer's
            models["fastflow"].blocks[0].flows[0].actnorm.scale.mul_(2)
        return models

    monkeypatch.setattr(suite_glow, "configs", lambda device, quick: [tiny])
    rows = {r["impl"]: r for r in suite_glow.step_rows("cpu", True, 1, 0, False)}
    assert rows["fastflow"]["check"].startswith("output rel diff 0, gradients rel diff")
    assert "flag" not in rows["fastflow"] and "speed_vs_eager" in rows["fastflow"]
    for rows_of in (suite_glow.step_rows, suite_glow.sample_rows):
        monkeypatch.setattr(suite_glow, "make_models", make_models)
        rows = {r["impl"]: r for r in rows_of("cpu", True, 1, 0, False)}
        monkeypatch.setattr(suite_glow, "make_models", real)
        assert "WRONG" in rows["fastflow"]["flag"], rows_of
        assert "speed_vs_eager" not in rows["fastflow"]
        assert rows["eager"]["check"] == "reference" and "flag" not in rows["eager"]
        text = run.table(list(rows.values()), suite_glow.STEP_COLS)
        line = next(ln for ln in text.splitlines() if "| fastflow |" in ln)
        assert "WRONG" in line and "| — |" in line


def test_the_counted_train_step_uses_the_timed_steps_optimizer(bench, monkeypatch):
    """The figures counted the Adam step of a ``foreach=False`` Adam (488 ATen ops at the
    figures' size) while the timed step runs the fused one (4)."""
    import suite_glow

    built = []

    class Recording(torch.optim.Adam):
        def __init__(self, params, **kwargs):
            built.append(kwargs)
            super().__init__(params, **kwargs)

    class Toy(torch.nn.Module):  # a model with _loss's interface, for speed
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return (x * self.w).flatten(1).sum(1), torch.zeros(x.shape[0]), []

    monkeypatch.setattr(torch.optim, "Adam", Recording)
    model, x = Toy(), torch.randn(2, 3, 4, 4)
    suite_glow.train_step(model, model, x, "cpu", torch.float32)
    suite_glow._count_step(model, x, "reference")
    assert len(built) == 2 and built[0] == built[1]


def test_a_peer_that_is_not_installed_shows_as_skipped(bench, monkeypatch):
    """Without normflows or FrEIA their rows vanished from the coupling table (and the
    sampling figure from channel_mix's) with nothing said; now each says it was skipped,
    and pytest-benchmark skips it."""
    harness, run = bench
    import suite_channel_mix
    import suite_coupling

    monkeypatch.setitem(sys.modules, "normflows", None)  # import normflows: ImportError
    monkeypatch.setitem(sys.modules, "FrEIA", None)
    monkeypatch.setitem(sys.modules, "FrEIA.modules", None)
    case = suite_coupling.cases("cpu", True)[0]
    case.impls = [i for i in case.impls if i.name in ("eager", "normflows", "FrEIA")]
    rows = {r["impl"]: r for r in harness.measure(case, "cpu", None, reps=1, warmup=0)}
    for name in ("normflows", "FrEIA"):
        assert rows[name]["error"] == f"skipped: {name} not installed (pip install {name})"
        assert "fwd_bwd_s" not in rows[name]
    assert "| skipped: normflows not installed" in run.table(list(rows.values()), run.TIME_COLS)
    fig = suite_channel_mix._sampling_figures()
    assert len(fig) == 1 and "normflows not installed" in fig[0]["detail"]


def test_pytest_benchmark_runs_the_cpu_tables_on_one_thread_as_run_py(monkeypatch):
    """run.py times on one torch thread on a CPU; ``pytest benchmarks --benchmark-only``
    kept torch's default, so its numbers were of another configuration (on this 2-core
    machine a Glow train step of 750 ms against run.py's 31 ms)."""
    import importlib.util

    if torch.cuda.is_available():
        pytest.skip("the CPU configuration")
    before = torch.get_num_threads()
    monkeypatch.setattr(sys, "path", list(sys.path))  # the conftest adds benchmarks/
    try:
        torch.set_num_threads(2)
        spec = importlib.util.spec_from_file_location("bench_conftest_under_test",
                                                      ROOT / "benchmarks" / "conftest.py")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_an_eager_row_that_fails_does_not_take_the_others_with_it(bench):
    """The check runs eager on every other row's behalf: eager raising must stay eager's
    error, not become every row's."""
    harness, _ = bench

    def broken(x):
        raise RuntimeError("eager broke")

    rows = {r["impl"]: r for r in harness.measure(
        _case(harness, [harness.Impl("eager", broken), harness.Impl("fastflow", lambda x: x * 2)]),
        "cpu", None, reps=1, warmup=0)}
    assert rows["eager"]["error"] == "RuntimeError: eager broke"
    assert "error" not in rows["fastflow"] and rows["fastflow"]["fwd_bwd_s"] > 0
    assert rows["fastflow"]["check"] == "not checked: eager raised RuntimeError"


def test_the_channel_mix_row_times_the_layer_not_functional_call(bench, monkeypatch):
    """fastflow's channel-mix row put the case's parameters into the layer with
    ``torch.func.functional_call`` on every call: 40-50 us of Python (136 against 93 us of
    forward here) that only fastflow's time carried. Now they are put in once per set of
    inputs, and the row still computes eager's outputs and gradients from them."""
    harness, _ = bench
    import suite_channel_mix

    calls = []
    real = torch.func.functional_call
    monkeypatch.setattr(torch.func, "functional_call", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    case = suite_channel_mix._case(2, 4, 4, torch.float32, "cpu", compile_=False)
    impl = next(i for i in case.impls if i.name == "fastflow")
    inputs = case.make_inputs()
    for _ in range(3):
        impl.fn(*inputs)
    assert calls == []
    assert harness.check_outputs(case, impl, case.make_inputs())["check"].startswith("ok")


def test_a_case_times_its_implementations_in_turn(bench, monkeypatch):
    """Each implementation's repetitions ran back to back, one implementation after the
    other: a change in the machine's load during the run (other work starting, clocks
    dropping) reached only the rows timed then, and moved the speed-up columns with it.
    Now every repetition takes each implementation once, the order rotated; one that fails
    while timed is reported in its row and the others still timed."""
    harness, _ = bench
    calls, timing = [], []
    monkeypatch.setattr(harness, "flag_row", lambda r: r)
    real_enter = harness._Timer.__enter__
    monkeypatch.setattr(harness._Timer, "__enter__",
                        lambda self: (timing.append(len(calls)), real_enter(self))[1])

    def impl(name, fails=False):
        def fn(x):
            calls.append(name)
            if fails and timing and calls[timing[0]:].count(name) == 3:  # its third timed call
                raise RuntimeError(f"{name} failed")
            return x * 2
        return harness.Impl(name, fn)

    case = _case(harness, [impl("eager"), impl("a"), impl("b", fails=True)])
    rows = {r["impl"]: r for r in harness.measure(case, "cpu", None, reps=4, warmup=0)}
    timed = calls[timing[0]:]  # the calls from the first timed repetition on
    assert timed[:7] == ["eager", "a", "b", "a", "b", "eager", "b"]  # rotated every repetition
    assert "b" not in timed[7:] and rows["b"]["error"] == "RuntimeError: b failed"
    for name in ("eager", "a"):
        assert rows[name]["reps"] == 4 and rows[name]["fwd_bwd_s"] > 0
    assert "speedup_vs_eager" in rows["a"]


def test_a_case_keeps_its_rows_in_order_and_refuses_two_rows_of_one_name(bench):
    """The table lists a case's rows in the order of its implementations, a skipped one and
    one that failed its check in their places (not first); two of one name would share one
    row (the second's numbers under the first's name, one row fewer)."""
    harness, _ = bench

    def broken(x):
        raise RuntimeError("broke")

    double = lambda x: x * 2  # noqa: E731
    impls = [harness.Impl("eager", double), harness.Impl("peer", double, skip="not here"),
             harness.Impl("bad", broken), harness.Impl("fastflow", double)]
    rows = harness.measure(_case(harness, impls), "cpu", None, reps=1, warmup=0)
    assert [r["impl"] for r in rows] == ["eager", "peer", "bad", "fastflow"]
    assert "error" in rows[1] and "error" in rows[2] and rows[3]["fwd_bwd_s"] > 0
    with pytest.raises(ValueError, match=r"^case.impls: expected distinct names, got "
                                         r"\['eager', 'eager'\]"):
        harness.measure(_case(harness, [harness.Impl("eager", double)] * 2), "cpu", None,
                        reps=1, warmup=0)


def test_time_impl_raises_what_the_implementation_raised(bench):
    """``time_impl`` (one implementation) raises its error, as before ``time_impls``
    (which reports it in the row instead): a returned exception read as a row."""
    harness, _ = bench

    def broken(x):
        raise RuntimeError("broke")

    with pytest.raises(RuntimeError, match="^broke$"):
        harness.time_impl(harness.Impl("x", broken), (torch.ones(2, requires_grad=True),),
                          "cpu", reps=1, warmup=0)
