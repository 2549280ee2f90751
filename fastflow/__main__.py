"""Command line: ``python -m fastflow <command>``.

Each command lives in its own module and registers a sub-parser through ``COMMANDS``:
a name mapped to "module:function" where ``function(argv)`` parses its own arguments."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("fastflow.cli.demo:main", "the main job: benchmark table, then a short training run"),
    "bench": ("fastflow.cli.bench:main", "print and save the benchmark tables for this device"),
    "train": ("fastflow.cli.train:main", "train a multi-scale Glow (digits or your images)"),
    "train-vae": ("fastflow.cli.train_vae:main", "train the small VAE (digits or your images)"),
    "train-tarflow": ("fastflow.cli.train_tarflow:main", "train a small TarFlow (digits or your images)"),
}


def usage(file=None) -> None:
    file = file or sys.stdout
    print("usage: python -m fastflow <command> [options]\n\ncommands:", file=file)
    width = max(map(len, COMMANDS))
    for name, (_, help_) in COMMANDS.items():
        print(f"  {name:{width}s}  {help_}", file=file)
    print("\nrun 'python -m fastflow <command> --help' for the options of a command", file=file)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        usage()
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"python -m fastflow: unknown command {argv[0]!r}\n", file=sys.stderr)
        usage(sys.stderr)
        return 2
    target, _ = COMMANDS[argv[0]]
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
