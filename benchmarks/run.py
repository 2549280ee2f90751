"""Print and save the benchmark tables for this device.

    python benchmarks/run.py [--quick] [--suites coupling,channel_mix,gaussian] [--out DIR]
                             [--no-figures] [--reps 20]

Each ``benchmarks/suite_<name>.py`` contributes timed cases (eager reference, torch.compile
of the reference, fastflow, peers) and device-independent figures (operator counts, bytes
saved for backward). Results go to ``DIR/bench-<device>.json`` and ``.md`` with the device
name and the torch and triton versions. Without a GPU the Triton kernels run interpreted
for the figures, and the timed "fastflow" rows use the reference path (auto backend):
CPU timings say nothing about GPU speed.
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
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

SUITES = ("coupling", "channel_mix", "gaussian")


def device_info(device: str) -> dict:
    import triton

    info = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name()
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


def table(rows: list[dict], cols: list[str]) -> str:
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


TIME_COLS = ["op", "shape", "dtype", "impl", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "fwd_bwd_GBps",
             "fwd_bwd_copy_frac", "speedup_vs_eager", "speedup_vs_compile", "peak_MB", "error"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    ap.add_argument("--suites", default=",".join(SUITES))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-figures", action="store_true", help="skip the device-independent figures")
    ap.add_argument("--no-timing", action="store_true", help="only the device-independent figures")
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = device_info(device)
    report: list[str] = []

    def say(text: str):  # printed now, and kept for the markdown copy
        print(text, flush=True)
        report.append(text)

    say(f"# fastflow benchmarks on {info['device_name']} (torch {info['torch']}, "
        f"triton {info['triton']}, {info['time']})\n")
    copy_bw = None
    if not args.no_timing:
        copy_bw = harness.copy_bandwidth(device, nbytes=(1 << 28) if device == "cuda" else (1 << 24))
        info["copy_GBps"] = copy_bw / 1e9
        say(f"device-to-device copy: {copy_bw / 1e9:.1f} GB/s (read + write)\n")
    results = {"info": info, "timings": [], "figures": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", info["device_name"]).strip("-").lower() or device
    path = out / f"bench-{slug}.json"

    def save():  # after every suite: a run cut short keeps what it measured
        path.write_text(json.dumps(results, indent=1, default=str))
        path.with_suffix(".md").write_text("\n".join(report) + "\n")

    for name in [s for s in args.suites.split(",") if s]:
        try:
            suite = importlib.import_module(f"suite_{name}")
        except ImportError as e:
            print(f"(suite {name} not available: {e})\n")
            continue
        if not args.no_timing:
            rows = []
            for case in suite.cases(device, args.quick):
                rows += harness.measure(case, device, copy_bw, reps=args.reps)
            for r in rows:
                for k in ("fwd", "bwd", "fwd_bwd"):
                    if f"{k}_s" in r:
                        r[f"{k}_ms"] = r[f"{k}_s"] * 1e3
                if r.get("peak_bytes") is not None:
                    r["peak_MB"] = r["peak_bytes"] / 2**20
            say(f"## {name}: median times\n\n{table(rows, TIME_COLS)}\n")
            results["timings"] += rows
        if not args.no_figures and hasattr(suite, "cpu_figures"):
            figs = [{"suite": name, **f} for f in suite.cpu_figures()]
            cols = ["figure", "eager", "fastflow", "ratio", "detail"]
            cols += sorted({k for f in figs for k in f} - set(cols) - {"suite"})
            say(f"## {name}: device-independent figures\n\n{table(figs, cols)}\n")
            results["figures"] += figs
        save()
    print(f"saved {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
