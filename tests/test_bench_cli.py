"""``python -m fastflow bench`` (benchmarks/run.py): argument checks, where it writes, and
the harness's flagging of contradictory timing rows. Fast: no timing is run here except one
tiny suite with --no-timing."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_py():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield _load("bench_run_under_test", ROOT / "benchmarks" / "run.py")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _bench(args, cwd):
    return subprocess.run([sys.executable, "-m", "fastflow", "bench", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["--suites", "nope"], "--suites: unknown suite(s) nope"),
    (["--suites", ","], "--suites: expected one or more"),
    (["--reps", "0"], "--reps: expected an integer >= 1, got 0"),
    (["--reps", "-3"], "--reps: expected an integer >= 1, got -3"),
    (["--warmup", "-1"], "--warmup: expected an integer >= 0"),
    (["--threads", "0"], "--threads: expected an integer >= 1"),
])
def test_bad_arguments_are_refused_with_a_message(run_py, tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        run_py.main([*args, "--out", str(tmp_path / "out")])
    assert e.value.code != 0
    err = capsys.readouterr()
    assert needle in err.err and "saved" not in err.out
    assert not (tmp_path / "out").exists()  # nothing written


def test_the_command_exits_nonzero_on_an_unknown_suite(tmp_path):
    r = _bench(["--suites", "nope"], cwd=tmp_path)
    assert r.returncode == 2
    assert "unknown suite(s) nope" in r.stderr and "saved" not in r.stdout
    assert not (tmp_path / "runs").exists()


def test_default_output_is_runs_bench_not_the_tracked_results(run_py, tmp_path):
    args = run_py.parse_args([])
    out = (tmp_path / args.out).resolve()
    assert out == (tmp_path / "runs" / "bench").resolve()
    assert "benchmarks" not in Path(args.out).parts
    assert not str(Path(args.out).resolve()).startswith(str((ROOT / "benchmarks").resolve()))


def test_bench_writes_under_runs_of_the_current_directory(run_py, tmp_path, monkeypatch):
    tracked = ROOT / "benchmarks" / "results"
    before = {p: p.stat().st_mtime_ns for p in tracked.glob("*")} if tracked.exists() else {}
    monkeypatch.chdir(tmp_path)
    assert run_py.main(["--suites", "gaussian", "--quick", "--no-figures", "--reps", "2"]) == 0
    written = list((tmp_path / "runs" / "bench").glob("bench-*.json"))
    assert len(written) == 1
    info = json.loads(written[0].read_text())["info"]
    for key in ("device_name", "torch", "triton"):
        assert info[key]
    after = {p: p.stat().st_mtime_ns for p in tracked.glob("*")} if tracked.exists() else {}
    assert after == before  # the tracked results were not touched


def test_a_row_with_fwd_bwd_shorter_than_fwd_is_flagged_not_printed(run_py):
    import harness

    bad = harness.flag_row({"op": "coupling", "shape": "N=4", "dtype": "float32", "impl": "x",
                            "fwd_s": 0.0395, "bwd_s": 0.0638, "fwd_bwd_s": 0.00094})
    good = harness.flag_row({"op": "coupling", "shape": "N=4", "dtype": "float32", "impl": "y",
                             "fwd_s": 0.001, "bwd_s": 0.002, "fwd_bwd_s": 0.003})
    assert "flag" in bad and "UNRELIABLE" in bad["flag"]
    assert "flag" not in good
    text = run_py.table([run_py.add_ms(bad), run_py.add_ms(good)], run_py.TIME_COLS)
    bad_line = next(line for line in text.splitlines() if "| x |" in line)
    good_line = next(line for line in text.splitlines() if "| y |" in line)
    header = [c.strip() for c in text.splitlines()[0].strip("|").split("|")]
    cells = dict(zip(header, [c.strip() for c in bad_line.strip("|").split("|")]))
    assert "UNRELIABLE" in cells["flag"]
    for col in ("fwd_ms", "bwd_ms", "fwd_bwd_ms"):
        assert cells[col] == "—", cells  # no number printed as a result
    assert "| 3 |" in good_line  # fwd_bwd_ms of the good row is printed


def test_summary_reports_median_and_spread(run_py):
    import harness

    s = harness.summary([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median"], s["min"], s["max"], s["q1"], s["q3"]) == (3.0, 1.0, 5.0, 2.0, 4.0)
    with pytest.raises(ValueError, match="reps"):
        harness.time_fn(lambda: None, "cpu", reps=0)


def test_cpu_tables_say_fastflow_runs_the_reference_path(run_py):
    import harness

    assert "reference path" in harness.CPU_NOTE and "say nothing about GPU speed" in harness.CPU_NOTE


def test_bench_leaves_the_callers_thread_count_alone(run_py, tmp_path, monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run_py.main(["--reps", "0"])
    run_py.main(["--suites", "gaussian", "--quick", "--no-figures", "--reps", "1", "--threads", "1"])
    assert torch.get_num_threads() == before


def test_interleaved_timing_takes_the_functions_in_turn(run_py):
    """The ratio table's timer: every function runs warmup + reps times, one call of each per
    repetition with the order rotated, and each gets its own summary."""
    import harness
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    out = harness.time_interleaved(fns, "cpu", reps=4, warmup=1)
    assert set(out) == {"a", "b", "c"} and all(s["n"] == 4 for s in out.values())
    assert calls[:3] == ["a", "b", "c"]  # warm-up round
    rounds = [calls[3 + 3 * i: 6 + 3 * i] for i in range(4)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    with pytest.raises(ValueError, match="reps: expected at least 1, got 0"):
        harness.time_interleaved(fns, "cpu", reps=0)



def test_glow_rows_report_an_implementation_failing_while_timed(run_py):
    """The Glow tables time the implementations interleaved: one that raised after its
    first call (say, out of memory) ended the whole benchmark, where it used to be its
    row's error; now it is, and the others are timed."""
    from types import SimpleNamespace

    import suite_glow
    calls = {"floor": 0, "eager": 0, "fastflow": 0}

    def build(impl, fails_at=None):
        def run():
            calls[impl] += 1
            if calls[impl] == fails_at:
                raise RuntimeError(f"{impl} failed")
        return lambda: run

    fns = {"floor": build("floor"), "eager": build("eager", fails_at=1),
           "fastflow": build("fastflow", fails_at=4)}
    rows = suite_glow._timed_rows(fns, SimpleNamespace(name="c", n=8), torch.float32, "cpu",
                                  reps=2, warmup=1)
    by = {r["impl"]: r for r in rows}
    assert by["eager"]["error"] == "RuntimeError: eager failed"
    assert by["fastflow"]["error"] == "RuntimeError: fastflow failed"
    assert "error" not in by["floor"] and by["floor"]["median_ms"] >= 0

def test_fwd_bwd_closure_runs_forward_and_backward(run_py):
    import harness
    x = torch.randn(3, 4, requires_grad=True)
    seen = []

    def fn(t):
        y = t * 2
        y.register_hook(lambda g: seen.append(g.shape))
        return y

    run = harness.fwd_bwd_closure(fn, (x,))
    seen.clear()
    run()
    assert seen == [torch.Size([3, 4])] and x.grad is None  # autograd.grad: no .grad written


def test_warmup_reaches_the_per_op_timings(run_py, tmp_path, monkeypatch):
    """--warmup is the number of untimed calls before every timed row, as the header and
    the saved info say, for the per-op suites too (measure used its own default of 3)."""
    import harness
    seen = []
    real = harness.time_impls

    def spy(entries, device, reps=20, warmup=3):
        seen.append(warmup)
        return real(entries, device, reps=reps, warmup=warmup)

    monkeypatch.setattr(harness, "time_impls", spy)
    monkeypatch.chdir(tmp_path)
    assert run_py.main(["--suites", "gaussian", "--quick", "--no-figures", "--reps", "1",
                        "--warmup", "0"]) == 0
    assert seen and set(seen) == {0}
    saved = json.loads(next((tmp_path / "runs" / "bench").glob("bench-*.json")).read_text())
    assert saved["info"]["warmup"] == 0
    assert {r["warmup"] for r in saved["timings"] if "error" not in r} == {0}


def test_timers_refuse_bad_arguments_by_name(run_py):
    """No functions to interleave (was ZeroDivisionError: integer modulo by zero) and a
    negative warm-up (was taken silently as none) are refused naming the argument."""
    import harness
    with pytest.raises(ValueError, match="fns: expected at least one function to time"):
        harness.time_interleaved({}, "cpu", reps=2)
    impl = harness.Impl("x", lambda t: t * 2)
    for call in (lambda: harness.time_fn(lambda: None, "cpu", reps=2, warmup=-1),
                 lambda: harness.time_interleaved({"a": lambda: None}, "cpu", reps=2, warmup=-1),
                 lambda: harness.time_impl(impl, (torch.ones(2, requires_grad=True),), "cpu",
                                           reps=2, warmup=-1)):
        with pytest.raises(ValueError, match="warmup: expected at least 0, got -1"):
            call()


def test_every_registered_kernel_family_is_benchmarked(run_py):
    """DESIGN.md: the kernel registry is what the benchmarks iterate. Every family of
    ``fastflow.kernels.FAMILIES`` has a timed op suite that ``run.py`` (and so
    ``python -m fastflow bench``), the pytest-benchmark suites and the GPU check run; the
    TarFlow head's suite times the same map as the eager head it is compared with."""
    import importlib
    import re

    from fastflow.kernels import FAMILIES

    harness = run_py.harness
    assert set(harness.FAMILY_SUITES) == set(FAMILIES)
    ops = harness.op_suites()
    assert set(ops) <= set(run_py.SUITES) and "tarflow_head" in ops
    gpu_check = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    listed = re.search(r'run\.py --out "\$OUT" .*--suites (\S+)', gpu_check).group(1)
    assert set(listed.split(",")) == set(ops)
    for name in ops:
        suite = importlib.import_module(f"suite_{name}")
        cases = suite.cases("cpu", True)
        assert cases and all("fastflow" in [i.name for i in c.impls] for c in cases), name

    import suite_tarflow_head

    case = suite_tarflow_head.cases("cpu", True)[0]
    impls = {i.name: i.fn for i in case.impls}
    with torch.no_grad():
        inputs = case.make_inputs()
        for a, b in zip(impls["fastflow"](*inputs), impls["eager"](*inputs)):
            torch.testing.assert_close(a, b)
    rows = harness.measure(case, "cpu", None, reps=1, warmup=0)
    assert {r["impl"] for r in rows} == set(impls)
    assert all(r.get("fwd_s", 0) > 0 and r.get("fwd_bwd_s", 0) > 0 for r in rows)


@pytest.mark.parametrize("command", [["benchmarks/run.py"], ["-m", "fastflow", "bench"]])
def test_usage_names_the_command_as_it_was_run(command):
    """The README runs the tables both ways; each one's error line names itself."""
    done = subprocess.run([sys.executable, *command, "--reps", "0"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2
    name = "python benchmarks/run.py" if command[0].endswith("run.py") else "python -m fastflow bench"
    assert f"{name}: error: --reps" in done.stderr, done.stderr


def _run_gpu_check(tmp_path, python: str):
    """benchmarks/gpu_check.sh run end to end with stand-ins for nvidia-smi and for a CUDA
    Python (``python``: the stand-in's bash script): (the finished process, $OUT)."""
    import os
    import stat
    import subprocess

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'Stand-in GPU, 0.0, 1 MiB'\n")
    (fake / "python").write_text("#!/usr/bin/env bash\n" + python)
    for f in fake.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "PYTHON": str(fake / "python"),
           "OUT": str(out)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    return done, out


def test_gpu_check_writes_what_the_device_tool_brings_back(tmp_path):
    """The device tool brings back at most 8 files from $OUT, at most two folders down, named
    in letters, digits, '.', '_' and '-': the script wrote 9 (a JUnit XML beside the log),
    so one of its results would have stayed on the GPU machine. Run here end to end with a
    stand-in for nvidia-smi and for a CUDA Python (each part writes what it would)."""
    import re

    done, out = _run_gpu_check(
        tmp_path,
        "if [ \"$1\" = benchmarks/run.py ]; then\n"  # run.py writes bench-<device>.json/.md
        "  mkdir -p \"$3\"; echo '{}' > \"$3/bench-stand-in.json\"; echo t > \"$3/bench-stand-in.md\"\n"
        "fi\n"
        "for a in \"$@\"; do case $a in --junitxml=*) echo x > \"${a#--junitxml=}\";; esac; done\n"
        "echo \"stand-in python $*\"\n")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gpu_check: passed" in done.stdout
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    for f in files:
        assert len(f.parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", p) for p in f.parts), f
    assert {"device.txt", "tests.log", "bench.log", "glow.log"} <= {str(f) for f in files}
    said = (out / "tests.log").read_text()
    assert "-m pytest -v" in said and "--timeout 90" in said


def test_gpu_check_fails_when_the_tests_fail_and_removes_its_copy_of_the_package(tmp_path):
    """The tests' exit status reaches the script's (the output goes to tests.log, no longer
    through a pipe), the failing tests are named on the console, and the copy of fastflow
    the script runs from is removed at the end (it stayed in /tmp, one per run)."""
    import os

    done, out = _run_gpu_check(
        tmp_path,
        "echo \"site=$PYTHONPATH\"\n"
        "if [ \"$1\" = -m ] && [ \"$2\" = pytest ]; then\n"
        "  echo 'FAILED tests/test_x.py::test_y - boom'; seq 40; exit 1\n"  # then tracebacks
        "fi\n")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED tests/test_x.py::test_y - boom" in done.stdout
    log = (out / "tests.log").read_text()
    assert "tests exit: 1" in log and "gpu_check: FAILED" in done.stdout
    sites = {line[len("site="):] for line in log.splitlines() if line.startswith("site=")}
    assert len(sites) == 1
    site = sites.pop()
    assert site.startswith("/tmp/fastflow-site.") and not os.path.exists(site)
