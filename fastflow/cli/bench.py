"""``python -m fastflow bench``: the benchmark tables for this device (benchmarks/run.py).

Writes ``runs/bench/bench-<device>.json`` and ``.md`` under the current directory (or
``--out``); bad arguments exit with status 2 and a message."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .common import check_one_process


def run_py() -> Path:
    """Where benchmarks/run.py is in the source tree this package runs from (absent from
    an installed wheel: the benchmarks need a clone)."""
    return Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"


def _benchmarks_run():
    """benchmarks/run.py of the source tree this package runs from."""
    import importlib.util

    path = run_py()
    if not path.is_file():
        raise SystemExit(f"bench: needs the source tree's benchmarks/run.py (a clone, installed "
                         f"with pip install -e .), not found at {path}")
    spec = importlib.util.spec_from_file_location("fastflow_bench_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    """``python -m fastflow bench [run.py options]``: the benchmark tables for this device."""
    check_one_process("bench", "the processes would time the same tables at once, competing "
                               "for the device, and write the same files")
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # figures run the kernels interpreted
    return _benchmarks_run().main(argv)
