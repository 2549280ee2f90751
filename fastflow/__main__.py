"""Command line: ``python -m fastflow <command>``.

Each command lives in its own module and registers a sub-parser through ``COMMANDS``:
a name mapped to "module:function" where ``function(argv)`` parses its own arguments."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("fastflow.cli.demo:main", "the main job: benchmark table, then a short training run"),
    "bench": ("fastflow.cli.bench:main", "print and save the benchmark tables for this device"),
    "train": ("fastflow.cli.train:main", "train a multi-scale Glow on the embedded digits"),
    "train-vae": ("fastflow.cli.train_vae:main", "train the small VAE on the embedded digits"),
    "train-tarflow": ("fastflow.cli.train_tarflow:main", "train a small TarFlow on the embedded digits"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m fastflow {" + ",".join(COMMANDS) + "} [options]\n")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:12s} {help_}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    target, _ = COMMANDS[argv[0]]
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
