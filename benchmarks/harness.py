"""Benchmark harness shared by the op suites (``benchmarks/suite_*.py``).

A suite module exposes ``cases(device, quick) -> list[Case]`` and optionally
``cpu_figures() -> list[dict]`` (device-independent figures: operator counts, bytes saved
for backward, algorithmic ratios). ``benchmarks/run.py`` prints and saves the tables;
``benchmarks/test_benchmarks.py`` runs the same cases under pytest-benchmark.

Timings: warm-up, then ``reps`` repetitions reported as median, quartiles and range; on
CUDA, CUDA events around each repetition with the L2 cache flushed before it (as
``triton.testing.do_bench``); on CPU, ``time.perf_counter`` (fastflow runs its reference
path on CPU, and CPU timings say nothing about GPU speed). A row whose forward+backward is
shorter than its forward is flagged (``flag_row``) and printed as a flag, not a result.

Before timing, ``measure`` compares each implementation's outputs and input gradients with
eager's on the same inputs (``check_outputs``): a mismatch flags the row the same way; a
peer declared to compute its own formula (``Impl.differs``) is shown with its difference.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes


# The timed op suites, from the one registry of kernel families (``fastflow.kernels.FAMILIES``,
# which the GPU compile check and the tests iterate too): the suite (``suite_<name>.py``) that
# times each family's op, forward, backward and forward+backward. lu_weight is timed inside
# channel_mix's fastflow row (W and the log-det from one lu_weight launch, as FlowStep runs).
FAMILY_SUITES = {"coupling": "coupling", "channel_mix": "channel_mix",
                 "lu_weight": "channel_mix", "gaussian": "gaussian", "tarflow": "tarflow_head"}


def op_suites() -> tuple[str, ...]:
    """The op suites of every registered kernel family, in the registry's order; a family
    added to the registry without a suite here is an error, not a silent gap."""
    from fastflow.kernels import FAMILIES

    missing = [f for f in FAMILIES if f not in FAMILY_SUITES]
    if missing:
        raise RuntimeError(f"kernel families {missing} (fastflow.kernels.FAMILIES) have no "
                           f"benchmark suite in harness.FAMILY_SUITES")
    return tuple(dict.fromkeys(FAMILY_SUITES[f] for f in FAMILIES))


@dataclass
class Impl:
    name: str            # "eager", "compile", "fastflow", "normflows", "FrEIA", ...
    fn: Callable[..., Any]  # fn(*inputs) -> Tensor or tuple of Tensors
    # why this implementation computes another function than eager (a peer's own formula):
    # its difference is shown, not flagged; empty: it must match eager (``check_outputs``)
    differs: str = ""
    # why it cannot run here (a peer library not installed): its row says so, untimed
    skip: str = ""


@dataclass
class Case:
    op: str              # "coupling", "channel_mix", "gaussian", "tarflow_head"
    shape: str           # human-readable, e.g. "N=64 C=48 32x32"
    dtype: torch.dtype
    make_inputs: Callable[[], tuple]  # fresh inputs; requires_grad set where grads are wanted
    impls: list[Impl]
    bytes_fwd: int       # minimal bytes one forward must read + write
    bytes_bwd: int       # minimal bytes one backward must read + write
    extra: dict = field(default_factory=dict)
    # (outputs, input gradients) -> the tensors ``check_outputs`` compares with eager's, and
    # what that leaves out; None: every output and every input gradient
    compare: Callable[[list, list], list] | None = None
    compare_note: str = ""


# --------------------------------------------------------------------------------------
# Running one implementation
# --------------------------------------------------------------------------------------


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def _grad_outputs(outs: list[torch.Tensor]):
    """Fixed random upstream gradients for every differentiable output."""
    pairs = [(o, torch.randn_like(o)) for o in outs if o.requires_grad]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _leaves(inputs) -> list[torch.Tensor]:
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def run_backward(outs, grads, inputs):
    torch.autograd.grad(outs, _leaves(inputs), grads, allow_unused=True)


class _Timer:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            self.start, self.end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
        else:
            self.seconds = time.perf_counter() - self.t0

    def elapsed(self) -> float:
        if self.cuda:
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        return self.seconds


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------
# Timing: warm-up, repetitions, median and spread; on CUDA the L2 cache is flushed
# before every repetition (triton.testing.do_bench's method: write a buffer larger than
# any L2), so no repetition reads what the previous one left in cache.
# --------------------------------------------------------------------------------------

CPU_NOTE = ("CPU: fastflow runs its reference path here (the default backend on CPU); "
            "CPU times say nothing about GPU speed")
FLUSH_BYTES = 256 << 20  # larger than the L2 of any current GPU (H100 50 MB, H200 60 MB)


class _Flusher:
    """Zeroes a 256 MB buffer before each CUDA repetition; nothing on CPU."""

    def __init__(self, device: str):
        self.buf = (torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device)
                    if device.startswith("cuda") else None)

    def __call__(self):
        if self.buf is not None:
            self.buf.zero_()


def summary(seconds: list[float]) -> dict:
    """Median, quartiles, min and max of repetition times (seconds)."""
    if not seconds:
        nan = float("nan")
        return {"median": nan, "q1": nan, "q3": nan, "min": nan, "max": nan, "n": 0}
    s = sorted(seconds)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
    return {"median": statistics.median(s), "q1": q[0], "q3": q[2], "min": s[0], "max": s[-1],
            "n": len(s)}


def _check_counts(reps: int, warmup: int):
    if reps < 1:
        raise ValueError(f"reps: expected at least 1, got {reps}")
    if warmup < 0:
        raise ValueError(f"warmup: expected at least 0, got {warmup}")


def time_fn(fn: Callable[[], Any], device: str, reps: int = 20, warmup: int = 3) -> dict:
    """``summary`` of ``reps`` timed calls of ``fn()`` after ``warmup`` untimed ones."""
    _check_counts(reps, warmup)
    for _ in range(warmup):
        fn()
    _sync(device)
    flush = _Flusher(device)
    times = []
    for _ in range(reps):
        flush()
        with _Timer(device) as t:
            fn()
        times.append(t)
    return summary([t.elapsed() for t in times])


def time_interleaved(fns: dict[str, Callable[[], Any]], device: str, reps: int = 20,
                     warmup: int = 3) -> dict[str, dict]:
    """``summary`` per name of ``reps`` timed calls of each function, taken in turn (one
    call of each per repetition, the order rotated every repetition), after ``warmup``
    untimed rounds. For ratios: a change in the machine's load during the run reaches every
    function alike, where timing one after the other would credit it to whichever ran
    while the machine was busy."""
    _check_counts(reps, warmup)
    if not fns:
        raise ValueError("fns: expected at least one function to time, got none")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    _sync(device)
    flush = _Flusher(device)
    times = {name: [] for name in names}
    for rep in range(reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            flush()
            with _Timer(device) as t:
                fns[name]()
            times[name].append(t)
    return {name: summary([t.elapsed() for t in ts]) for name, ts in times.items()}


def fwd_bwd_closure(fn: Callable, inputs) -> Callable[[], None]:
    """A closure that runs ``fn(*inputs)`` and its backward (fixed random upstream
    gradients), as ``time_impl``'s forward+backward rows do."""
    _, grads = _grad_outputs(_tensors(fn(*inputs)))

    def run():
        outs = [o for o in _tensors(fn(*inputs)) if o.requires_grad]
        if grads:
            run_backward(outs, grads, inputs)

    return run


def flag_row(row: dict) -> dict:
    """Mark a row whose times contradict each other (forward+backward shorter than the
    forward alone: the machine was busy, or something was cached between the runs). A
    flagged row keeps its raw numbers in the JSON but the tables print the flag instead."""
    fwd, both = row.get("fwd_s"), row.get("fwd_bwd_s")
    if fwd is not None and both is not None and both == both and fwd == fwd and both < fwd:
        row["flag"] = (f"UNRELIABLE: fwd+bwd {both * 1e3:.3g} ms < fwd {fwd * 1e3:.3g} ms; "
                       "not a result, rerun on an idle machine")
    return row


class _ImplTimes:
    """One implementation's timed calls: forward, backward (on a fresh forward each time)
    and forward+backward, collected one repetition at a time (``time_impls`` takes the
    implementations of a case in turn)."""

    def __init__(self, impl: Impl, inputs, device: str, warmup: int):
        self.impl, self.inputs, self.device = impl, inputs, device
        outs0 = _tensors(impl.fn(*inputs))
        self.has_grad = any(o.requires_grad for o in outs0)
        outs0, self.grads = _grad_outputs(outs0)
        if self.has_grad:  # the first call runs backward too: its compiles (torch.compile's
            run_backward(outs0, self.grads, inputs)  # backward graph, Triton's kernels) stay
        del outs0                                     # untimed at warmup 0
        for _ in range(warmup):
            self._call()
        self.fwd, self.bwd, self.both = [], [], []

    def _call(self):
        outs = [o for o in _tensors(self.impl.fn(*self.inputs)) if o.requires_grad]
        if self.has_grad:
            run_backward(outs, self.grads, self.inputs)

    def split(self, flush):
        """One forward, then its backward, each timed."""
        flush()
        with _Timer(self.device) as t:
            outs = _tensors(self.impl.fn(*self.inputs))
        self.fwd.append(t)
        if self.has_grad:
            outs = [o for o in outs if o.requires_grad]
            flush()
            with _Timer(self.device) as t:
                run_backward(outs, self.grads, self.inputs)
            self.bwd.append(t)
        del outs

    def whole(self, flush):
        """One forward+backward, timed as one."""
        flush()
        with _Timer(self.device) as t:
            self._call()
        self.both.append(t)

    def result(self, reps: int, warmup: int) -> dict:
        peak = None
        if self.device.startswith("cuda"):
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self._call()
            _sync(self.device)
            peak = torch.cuda.max_memory_allocated() - base
        out = {"peak_bytes": peak, "reps": reps, "warmup": warmup}
        for key, ts in (("fwd", self.fwd), ("bwd", self.bwd), ("fwd_bwd", self.both)):
            s = summary([t.elapsed() for t in ts])
            out[f"{key}_s"] = s["median"]
            out[f"{key}_q1_s"], out[f"{key}_q3_s"] = s["q1"], s["q3"]
            out[f"{key}_min_s"], out[f"{key}_max_s"] = s["min"], s["max"]
        return flag_row(out)


def time_impls(entries: dict[str, tuple[Impl, tuple]], device: str, reps: int = 20,
               warmup: int = 3) -> dict[str, dict | Exception]:
    """Per name of ``entries`` ({name: (impl, inputs)}): forward, backward and
    forward+backward (median, quartiles and range, seconds; peak memory on CUDA), or the
    exception that implementation raised (the others are still timed).

    The implementations are timed in turn, one repetition of each at a time with the order
    rotated every repetition (as ``time_interleaved``): the forward and backward
    repetitions first, then the forward+backward ones. A change in the machine's load
    during the run reaches every row of the case alike, where timing one implementation
    after the other credited it to whichever ran while the machine was busy, and the
    speed-up columns (ratios of these medians) moved with it."""
    _check_counts(reps, warmup)
    timers, failed = {}, {}
    for name, (impl, inputs) in entries.items():
        try:
            timers[name] = _ImplTimes(impl, inputs, device, warmup)
        except Exception as e:  # noqa: BLE001 - reported in its row
            failed[name] = e
    _sync(device)
    flush = _Flusher(device)
    for phase in ("split", "whole"):
        for rep in range(reps):
            names = [n for n in timers if n not in failed]
            k = rep % len(names) if names else 0
            for name in names[k:] + names[:k]:
                try:
                    getattr(timers[name], phase)(flush)
                except Exception as e:  # noqa: BLE001 - reported in its row
                    failed[name] = e
    del flush
    results = {}
    for name in entries:
        if name not in failed:
            try:
                results[name] = timers[name].result(reps, warmup)
            except Exception as e:  # noqa: BLE001 - reported in its row
                failed[name] = e
        if name in failed:
            results[name] = failed[name]
    return results


def time_impl(impl: Impl, inputs, device: str, reps: int = 20, warmup: int = 3) -> dict:
    """Forward, backward and forward+backward of one implementation: median, quartiles and
    range (seconds), and peak memory on CUDA. Backward is timed on a fresh forward each
    repetition. (``time_impls`` for several, timed in turn.)"""
    out = time_impls({impl.name: (impl, inputs)}, device, reps=reps, warmup=warmup)[impl.name]
    if isinstance(out, Exception):
        raise out
    return out


def copy_bandwidth(device: str, nbytes: int = 1 << 28, reps: int = 20) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), measured now."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    times = []
    for _ in range(reps):
        with _Timer(device) as t:
            dst.copy_(src)
        times.append(t)
    return 2 * src.numel() * 4 / statistics.median(t.elapsed() for t in times)


# Largest |impl - eager| / max|eager| (per compared tensor) taken as the same function. Loose
# enough for a GPU's TF32 convolutions (torch's default, which the tables keep) and 16-bit
# rounding, far below what a wrong formula, sign, direction or missing term gives (O(1)).
CHECK_TOL = {torch.float64: 1e-6, torch.float32: 1e-2, torch.bfloat16: 5e-2,
             torch.float16: 5e-2}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |b - a| / max |a|, in float64 (0 for empty tensors, inf for another shape)."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item() if a.numel() else 0.0


def _results(fn, inputs) -> tuple[list, list]:
    """(outputs, input gradients) of ``fn`` on clones of ``inputs``, the upstream gradients
    drawn from a fixed seed (the same for every implementation)."""
    ins = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
           else t for t in inputs]
    outs = _tensors(fn(*ins))
    diff = [o for o in outs if o.requires_grad]
    gen = torch.Generator().manual_seed(0)
    ups = [torch.randn(o.shape, generator=gen).to(o) for o in diff]
    grads = list(torch.autograd.grad(diff, _leaves(ins), ups, allow_unused=True)) if diff else []
    return [o.detach() for o in outs], grads


def check_outputs(case: Case, impl: Impl, inputs) -> dict:
    """Compare ``impl``'s outputs and input gradients with the eager implementation's on the
    same inputs: {"check": what was found}, plus a "flag" (the row is not a result) where an
    implementation that should compute eager's function does not."""
    if impl.skip:
        return {"check": f"skipped: {impl.skip}"}
    eager = next((i for i in case.impls if i.name == "eager"), None)
    if eager is None or impl is eager:
        return {"check": "reference" if impl is eager else "no eager row to compare with"}
    pick = case.compare or (lambda outs, grads: [*outs, *grads])
    try:
        ref = pick(*_results(eager.fn, inputs))
    except Exception as e:  # eager's own row reports it; this one is still timed
        return {"check": f"not checked: eager raised {type(e).__name__}"}
    got = pick(*_results(impl.fn, inputs))
    worst, where = 0.0, None
    if len(ref) != len(got):
        worst, where = float("inf"), f"{len(got)} results against eager's {len(ref)}"
    for k, (a, b) in enumerate(zip(ref, got)):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        if a.shape != b.shape:
            worst, where = float("inf"), (f"result {k}: shape {tuple(b.shape)} against "
                                          f"eager's {tuple(a.shape)}")
            break
        err = rel_diff(a, b)
        if worst == worst and not err <= worst:  # NaN counts as the worst
            worst, where = err, f"result {k} of {len(ref)}"
    note = f" ({case.compare_note})" if case.compare_note else ""
    if impl.differs:
        return {"check": f"another function: {impl.differs}; max rel diff {worst:.2g}{note}"}
    tol = CHECK_TOL.get(case.dtype, 1e-2)
    if where is not None and not worst <= tol:
        return {"check": f"MISMATCH: {where}, rel err {worst:.2g} > {tol:g}{note}",
                "flag": f"WRONG: {where} differs from eager's (rel err {worst:.2g} > {tol:g}); "
                        "not the same function, not a result"}
    return {"check": f"ok, max rel err {worst:.2g}{note}"}


def measure(case: Case, device: str, copy_bw: float | None, reps: int = 20,
            warmup: int = 3) -> list[dict]:
    """One row per implementation of ``case``, each first checked against eager
    (``check_outputs``: a mismatch flags the row, which the tables then print as the flag),
    then all timed in turn (``time_impls``), so their ratios share the machine's load.

    All of it inside one ``use_backend("auto")`` block: fastflow runs its default backend
    whatever FASTFLOW_BACKEND says, and its rows call the ops as a user does, without a
    block of their own per call (about 2 us that only fastflow's times would include)."""
    from fastflow import use_backend

    names = [impl.name for impl in case.impls]
    if len(set(names)) != len(names):
        raise ValueError(f"case.impls: expected distinct names, got {names}")
    dtype = str(case.dtype).replace("torch.", "")
    rows, entries, checked = {}, {}, {}
    check_inputs = case.make_inputs()
    for impl in case.impls:
        head = {"op": case.op, "shape": case.shape, "dtype": dtype, "impl": impl.name}
        if impl.skip:
            rows[impl.name] = {**head, "error": f"skipped: {impl.skip}"}
            continue
        try:
            with use_backend("auto"):
                checked[impl.name] = check_outputs(case, impl, check_inputs)
        except Exception as e:  # a peer that cannot run this case is reported, not fatal
            rows[impl.name] = {**head, "error": f"{type(e).__name__}: {e}"[:200]}
            continue
        entries[impl.name] = (impl, case.make_inputs())
    with use_backend("auto"):  # all of the case's rows timed in turn (``time_impls``)
        timed = time_impls(entries, device, reps=reps, warmup=warmup)
    entries.clear()  # the inputs
    for name, r in timed.items():
        head = {"op": case.op, "shape": case.shape, "dtype": dtype, "impl": name}
        if isinstance(r, Exception):
            rows[name] = {**head, "error": f"{type(r).__name__}: {r}"[:200]}
            continue
        check = checked[name]
        if "flag" in check:
            flags = [check.pop("flag")] + ([r["flag"]] if "flag" in r else [])
            r["flag"] = "; ".join(flags)
        r.update(check)
        row = {**head, **r}
        row["fwd_GBps"] = case.bytes_fwd / r["fwd_s"] / 1e9
        row["fwd_bwd_GBps"] = (case.bytes_fwd + case.bytes_bwd) / r["fwd_bwd_s"] / 1e9
        if copy_bw:
            row["fwd_bwd_copy_frac"] = (case.bytes_fwd + case.bytes_bwd) / r["fwd_bwd_s"] / copy_bw
        rows[name] = row
    rows = [rows[impl.name] for impl in case.impls]
    base = {r["impl"]: r for r in rows if "error" not in r and "flag" not in r}
    for r in rows:
        for ref in ("eager", "compile"):
            if r["impl"] in base and ref in base:
                r[f"speedup_vs_{ref}"] = base[ref]["fwd_bwd_s"] / r["fwd_bwd_s"]
    return rows


# --------------------------------------------------------------------------------------
# Device-independent figures
# --------------------------------------------------------------------------------------


class _LaunchCounter:
    """Counts Triton kernel launches (compiled or interpreted) while active."""

    def __init__(self):
        self.count = 0
        self._patched = []

    def __enter__(self):
        try:
            from triton.runtime.jit import JITFunction
            classes = [JITFunction]
            try:
                from triton.runtime.interpreter import InterpretedFunction
                classes.append(InterpretedFunction)
            except ImportError:
                pass
        except ImportError:
            return self
        for cls in classes:
            orig = cls.run

            def run(fn_self, *args, _orig=orig, **kwargs):
                if not kwargs.get("warmup", False):
                    self.count += 1
                # the interpreter's own host copies are not the op's work: not counted
                with _disable_current_modes():
                    return _orig(fn_self, *args, **kwargs)

            cls.run = run
            self._patched.append((cls, orig))
        return self

    def __exit__(self, *exc):
        for cls, orig in self._patched:
            cls.run = orig


class _AtenCounter(TorchDispatchMode):
    """Counts ATen operators; a fastflow custom op is opened up and the ops inside it are
    counted instead of the op itself."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastflow":
            from torch._library.custom_ops import OPDEFS
            opdef = OPDEFS[func._schema.name]
            with self:
                return opdef._init_fn(*args, **kwargs)
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)


def count_ops(fn: Callable, *inputs) -> dict:
    """ATen operators and Triton launches of one forward + backward of ``fn(*inputs)``.

    The upstream gradients are made before counting starts; the count covers the forward,
    the backward and nothing else."""
    outs = _tensors(fn(*inputs))  # warm-up: compiles kernels outside the count
    outs, grads = _grad_outputs(outs)
    if outs:
        run_backward(outs, grads, inputs)
    aten, launches = _AtenCounter(), _LaunchCounter()
    with launches, aten:
        outs = [o for o in _tensors(fn(*inputs)) if o.requires_grad]
        if outs:
            run_backward(outs, grads, inputs)
    return {"aten_ops": len(aten.ops), "triton_launches": launches.count,
            "total": len(aten.ops) + launches.count, "ops": aten.ops}


def saved_bytes(fn: Callable, *inputs) -> int:
    """Bytes of the distinct storages that autograd saves for backward in ``fn(*inputs)``."""
    seen = {}

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            seen[key] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    del out
    return sum(seen.values())


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn, fullgraph=True)``, one compiled object per function."""
    return torch.compile(fn, fullgraph=True)
