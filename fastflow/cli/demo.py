"""``python -m fastflow demo`` (``make demo``): the main job."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import bench, train
from .common import HelpFormatter, check_one_process, out_folder, positive, write_json

# The demo's Glow on the 8x8 digits: two squeeze levels (4x4x4, 2x2x8), 8 affine steps each,
# a 64-wide coupling net, 80 epochs (1760 steps) at lr 2e-3. Measured on a shared 2-core CPU,
# one thread, fresh clones of 2026-12-06: 84-146 s of training as the machine's load varied;
# test 4.26 -> 2.25 bits/dim; the digit classifier recognises 60 % of the T=1 samples (all
# 10 classes; 30 % before training).
# Tried beside it: one level with a 128-wide net, and 4 steps per level with a 96-wide net
# at batch 32: both recognised fewer samples for the same CPU time.
DEMO_MODEL = ["--n-block", "2", "--n-flow", "8", "--filter-size", "64"]
DEMO_EPOCHS = 80
DEMO_EVAL_EVERY = "10"
DEMO_LR = "2e-3"
DEMO_BATCH = "64"
DEMO_TEMPERATURES = "0.8,1.0"


def _bpd(value) -> str:
    """A bits/dim from metrics.json, where a NaN or infinite one is stored as null."""
    return "not finite" if value is None else f"{value:.3f}"


def main(argv=None) -> int:
    """``python -m fastflow demo`` (``make demo``): the benchmark tables for this device, then
    a short Glow training run on the embedded digits; writes the sample grids before and
    after training and scores the samples with a digit classifier."""
    p = argparse.ArgumentParser(prog="python -m fastflow demo", description=main.__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--epochs", type=positive(int), default=DEMO_EPOCHS,
                   help="Glow training epochs over the 1438 training digits")
    p.add_argument("--max-steps", type=positive(int), default=None,
                   help="stop the training after this many optimizer steps")
    p.add_argument("--out", type=out_folder, default="runs/demo",
                   help="results folder (bench/ and glow/ in it)")
    p.add_argument("--skip-bench", action="store_true", help="skip the benchmark tables")
    p.add_argument("--threads", type=positive(int), default=None,
                   help="CPU threads for the training (None: 1 on CPU, where the demo's "
                        "small convolutions run faster on one thread than on two)")
    args = p.parse_args(argv)
    check_one_process("demo", "each process would run the benchmark tables and the training "
                              "alone, all writing the same files")
    if not args.out.strip():  # Path("") is the current folder
        raise SystemExit(f"--out: expected a folder, got {args.out!r}")
    cuda = torch.cuda.is_available()
    if not args.skip_bench and not bench.run_py().is_file():
        # an installed wheel has no benchmarks/: the demo's main part, the training, runs
        print(f"== 1. benchmarks: skipped, they need the source tree's benchmarks/run.py (a "
              f"clone), not found at {bench.run_py()} ==", flush=True)
    elif not args.skip_bench:
        print("== 1. benchmarks ==", flush=True)
        bench_args = ["--out", str(Path(args.out) / "bench")]
        if not cuda:  # CPU: small shapes; the timings say nothing about GPU speed
            bench_args.append("--quick")
        bench.main(bench_args)
    print("\n== 2. Glow on the embedded digits ==", flush=True)
    out = Path(args.out) / "glow"
    threads = args.threads or (None if cuda else 1)
    train_args = [*DEMO_MODEL, "--epochs", str(args.epochs), "--lr", DEMO_LR,
                  "--batch-size", DEMO_BATCH, "--temperature", DEMO_TEMPERATURES,
                  "--eval-every", DEMO_EVAL_EVERY,
                  "--out", str(out), "--no-progress", "--force"]
    if threads:
        train_args += ["--threads", str(threads)]
    if args.max_steps:
        train_args += ["--max-steps", str(args.max_steps)]
    t0 = time.perf_counter()
    status = train.main(train_args)
    wall = time.perf_counter() - t0
    if status:  # stopped (Ctrl-C, SIGTERM): metrics.json is not this run's, or not there
        return status
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    before, after = history["initial"], (history["epochs"] or [history["initial"]])[-1]
    t_best = max(after["digits"], key=lambda t: after["digits"][t]["recognised"])
    score = after["digits"][t_best]
    print(f"\ndemo: {wall:.0f} s for the Glow run; test bits/dim {_bpd(before['bpd'])} -> "
          f"{_bpd(after['test']['bpd'] if 'test' in after else after['bpd'])}; a digit "
          f"classifier recognises {score['recognised']:.0%} of {score['n']} samples at "
          f"T={t_best} with confidence >= {score['confidence']} ({score['classes']} of 10 "
          f"classes; before training: {before['digits'][t_best]['recognised']:.0%}).\n"
          f"samples before: {out / 'samples_before.png'}\nsamples after:  {out / 'samples.png'}",
          flush=True)
    metrics["demo"] = {"wall_seconds": wall, "temperature": t_best, "score": score,
                       "score_before": before["digits"][t_best]}
    write_json(out / "metrics.json", metrics)  # atomically, like the run's own
    return status
