"""Print and save the benchmark tables for this device.

    python benchmarks/run.py [--quick] [--suites coupling,channel_mix,gaussian,tarflow_head,glow]
                             [--out DIR] [--reps 20] [--warmup 3] [--threads N] [--no-figures]
                             [--no-timing] [--no-compile]

Each ``benchmarks/suite_<name>.py`` contributes timed cases (eager reference, torch.compile
of the reference, fastflow, peers) and device-independent figures (operator counts, bytes
saved for backward); ``suite_glow`` adds the end-to-end Glow training step and sampling.
Times are the median of ``--reps`` repetitions after ``--warmup`` untimed ones, with the
quartiles beside them; on a GPU the L2 cache is flushed before each repetition. A row whose
forward+backward is shorter than its forward is flagged, not printed as a result. Before
timing, every implementation's outputs and input gradients (suite glow: the loss and the
parameter gradients, the samples of one z) are compared with eager's on the same inputs and
weights (the check column); one that should compute eager's function and does not is
flagged WRONG, not printed, and left out of the ratios. A peer library that is not
installed shows as a skipped row.

Results go to ``DIR/bench-<device>.json`` and ``.md`` (default DIR: ``runs/bench`` under the
current directory; never a tracked file unless you pass ``--out`` pointing at one) with the
device name and the torch and triton versions. Without a GPU the Triton kernels run
interpreted for the figures, and the timed "fastflow" rows use the reference path (the
default backend on CPU): CPU timings say nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

# every registered kernel family's op suite, then the end-to-end Glow suite
SUITES = harness.op_suites() + ("glow",)
DEFAULT_OUT = Path("runs") / "bench"


def device_info(device: str) -> dict:
    import triton

    info = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "cpu_threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name()
    else:
        info["device_name"] = platform.processor() or platform.machine()
        info["cpu_count"] = os.cpu_count()
    return info


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


def table(rows: list[dict], cols: list[str]) -> str:
    """Markdown table of ``cols`` (those present in some row). A flagged row prints its
    identifying columns and the flag, not its numbers."""
    cols = [c for c in cols if any(c in r for r in rows)]
    if any("flag" in r for r in rows) and "flag" not in cols:
        cols.append("flag")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "flag" in r:
            cells = [_fmt(r.get(c)) if (c in IDENTITY or c == "flag") else "—" for c in cols]
        else:
            cells = [_fmt(r.get(c)) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


IDENTITY = ("op", "shape", "dtype", "impl", "config", "what")
TIME_COLS = ["op", "shape", "dtype", "impl", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "fwd_bwd_iqr_ms",
             "fwd_bwd_range_ms", "fwd_bwd_GBps", "fwd_bwd_copy_frac", "speedup_vs_eager",
             "speedup_vs_compile", "peak_MB", "check", "error"]


def add_ms(r: dict) -> dict:
    """Millisecond columns (median, quartiles, range) from a row's seconds."""
    for k in ("fwd", "bwd", "fwd_bwd"):
        if f"{k}_s" in r:
            r[f"{k}_ms"] = r[f"{k}_s"] * 1e3
    if "fwd_bwd_q1_s" in r:
        r["fwd_bwd_iqr_ms"] = f"{r['fwd_bwd_q1_s'] * 1e3:.3g}–{r['fwd_bwd_q3_s'] * 1e3:.3g}"
        r["fwd_bwd_range_ms"] = f"{r['fwd_bwd_min_s'] * 1e3:.3g}–{r['fwd_bwd_max_s'] * 1e3:.3g}"
    if r.get("peak_bytes") is not None:
        r["peak_MB"] = r["peak_bytes"] / 2**20
    return r


class _HelpFormatter(argparse.RawDescriptionHelpFormatter,
                     argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default (as the training commands)."""


# the command named in usage and error lines: `python -m fastflow bench` loads this module
# and calls main(); run as a script (`python benchmarks/run.py`), it names itself
PROG = "python -m fastflow bench"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                 formatter_class=_HelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small shapes and the short configuration lists (on CPU: no "
                         "torch.compile rows, which take minutes to compile there)")
    ap.add_argument("--suites", default=",".join(SUITES),
                    help=f"comma-separated, from: {', '.join(SUITES)}")
    ap.add_argument("--out", default=str(DEFAULT_OUT),
                    help="output folder (a relative one: under the current directory)")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per row (>= 1)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (>= 0)")
    ap.add_argument("--no-figures", action="store_true", help="skip the device-independent figures")
    ap.add_argument("--no-timing", action="store_true", help="only the device-independent figures")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads. Default without a GPU: 1, because OpenMP threads "
                         "contending on a busy machine turned a 4 us op into 20 ms and made "
                         "the tables swing from run to run; with a GPU: torch's own choice")
    ap.add_argument("--no-compile", action="store_true",
                    help="suite glow: skip torch.compile of the peer (slow to compile on CPU)")
    args = ap.parse_args(argv)
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = [s for s in suites if s not in SUITES]
    if not suites:
        ap.error(f"--suites: expected one or more of {', '.join(SUITES)}, got {args.suites!r}")
    if unknown:
        ap.error(f"--suites: unknown suite(s) {', '.join(unknown)}; expected some of "
                 f"{', '.join(SUITES)}")
    if args.reps < 1:
        ap.error(f"--reps: expected an integer >= 1, got {args.reps}")
    if args.warmup < 0:
        ap.error(f"--warmup: expected an integer >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads: expected an integer >= 1, got {args.threads}")
    if not args.out.strip():  # Path(""): the current folder
        ap.error(f"--out: expected a folder, got {args.out!r}")
    try:  # before any timing: a file in the way is said now, not after the run
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        ap.error(f"--out: cannot create the folder {args.out}: {err.strerror or err}")
    args.suite_list = suites
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:  # a caller in the same process (the demo's training) keeps its thread count
        torch.set_num_threads(threads)


def _run(args) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads is None and device == "cpu":
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = device_info(device)
    info.update(reps=args.reps, warmup=args.warmup, quick=args.quick)
    cpu = not device.startswith("cuda")
    note = f" ({harness.CPU_NOTE})" if cpu else " (L2 flushed before each repetition)"
    report: list[str] = []

    def say(text: str):  # printed now, and kept for the markdown copy
        print(text, flush=True)
        report.append(text)

    say(f"# fastflow benchmarks on {info['device_name']} (torch {info['torch']}, "
        f"triton {info['triton']}, {info['time']})\n")
    if cpu:
        say(f"**{harness.CPU_NOTE}.**\n")
    copy_bw = None
    if not args.no_timing:
        say(f"Times: median of {args.reps} repetitions after {args.warmup} warm-up calls; "
            "iqr = quartiles, range = min–max" + (f"; {info['cpu_threads']} torch CPU threads "
                                                  f"of {info['cpu_count']} cores" if cpu else "")
            + ".\n")
        copy_bw = harness.copy_bandwidth(device, nbytes=(1 << 28) if device == "cuda" else (1 << 24))
        info["copy_GBps"] = copy_bw / 1e9
        say(f"device-to-device copy: {copy_bw / 1e9:.1f} GB/s (read + write)\n")
    results = {"info": info, "timings": [], "figures": [], "tables": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", info["device_name"]).strip("-").lower() or device
    slug = f"{slug}-{device}" if cpu else slug
    path = out / f"bench-{slug}.json"

    def save():  # after every suite: a run cut short keeps what it measured
        path.write_text(json.dumps(results, indent=1, default=str))
        path.with_suffix(".md").write_text("\n".join(report) + "\n")

    failed = []
    for name in args.suite_list:
        try:
            suite = importlib.import_module(f"suite_{name}")
            if not args.no_timing:
                rows = []
                for case in (suite.cases(device, args.quick) if hasattr(suite, "cases") else []):
                    rows += harness.measure(case, device, copy_bw, reps=args.reps,
                                            warmup=args.warmup)
                rows = [add_ms(r) for r in rows]
                if rows:
                    say(f"## {name}: times{note}\n\n{table(rows, TIME_COLS)}\n")
                results["timings"] += rows
                if hasattr(suite, "tables"):  # suites with their own tables (glow)
                    for title, rows, cols in suite.tables(device, args.quick, args.reps,
                                                          args.warmup, not args.no_compile):
                        say(f"## {name}: {title}{note}\n\n{table(rows, cols)}\n")
                        results["tables"].append({"suite": name, "title": title, "rows": rows})
            if not args.no_figures and hasattr(suite, "cpu_figures"):
                # on the device: on a GPU the Triton launches are compiled kernels on CUDA
                # tensors (without a GPU, interpreted on CPU tensors: the same counts)
                with torch.device(device):
                    figs = [{"suite": name, **f} for f in suite.cpu_figures()]
                cols = ["figure", "eager", "fastflow", "ratio", "detail"]
                cols += sorted({k for f in figs for k in f} - set(cols) - {"suite"})
                say(f"## {name}: device-independent figures\n\n{table(figs, cols)}\n")
                results["figures"] += figs
        except Exception as e:  # the other suites still run; the exit status says it failed
            traceback.print_exc()
            say(f"## {name}: FAILED: {type(e).__name__}: {e}\n")
            failed.append(name)
        save()
    print(f"saved {path} and {path.with_suffix('.md')}")
    if failed:
        print(f"failed suites: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    PROG = "python benchmarks/run.py"
    sys.exit(main())
