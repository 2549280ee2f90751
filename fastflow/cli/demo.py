"""``python -m fastflow demo`` (``make demo``): the main job."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import bench, train
from .common import positive


def main(argv=None) -> int:
    """``python -m fastflow demo`` (``make demo``): the benchmark tables for this device, then
    a short Glow training run on the embedded digits with samples written to runs/demo."""
    p = argparse.ArgumentParser(prog="python -m fastflow demo", description=main.__doc__)
    p.add_argument("--epochs", type=positive(int), default=4)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--skip-bench", action="store_true")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not args.skip_bench:
        print("== 1. benchmarks ==", flush=True)
        bench_args = ["--out", str(Path(args.out) / "bench")]
        if not cuda:  # CPU: small shapes; the timings say nothing about GPU speed
            bench_args.append("--quick")
        bench.main(bench_args)
    print("\n== 2. Glow on the embedded digits ==", flush=True)
    return train.main(["--epochs", str(args.epochs), "--out", str(Path(args.out) / "glow"),
                            "--no-progress"])
