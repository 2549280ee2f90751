"""Command line: ``python -m fastflow <command>``.

Each command lives in its own module and registers a sub-parser through ``COMMANDS``:
a name mapped to "module:function" where ``function(argv)`` parses its own arguments."""

from __future__ import annotations

import importlib
import importlib.util
import sys

COMMANDS = {
    "demo": ("fastflow.cli.demo:main", "the main job: benchmark table, then a short training run"),
    "bench": ("fastflow.cli.bench:main", "print and save the benchmark tables for this device"),
    "train": ("fastflow.cli.train:main", "train a multi-scale Glow (digits or your images)"),
    "train-vae": ("fastflow.cli.train_vae:main", "train the small VAE (digits or your images)"),
    "train-tarflow": ("fastflow.cli.train_tarflow:main", "train a small TarFlow (digits or your images)"),
}


# what the training commands and the demo import beyond torch (the digits and their
# classifier: scikit-learn; the sample grids and image folders: Pillow), from the [app] extra
APP_MODULES = {"sklearn": "scikit-learn", "PIL": "Pillow"}
APP_COMMANDS = ("demo", "train", "train-vae", "train-tarflow")


def missing_app_modules() -> list[str]:
    """The [app] extra's distributions that cannot be imported here, found without importing
    them (scikit-learn's import alone takes over a second, and a run on its own images never
    needs it)."""
    missing = []
    for module, dist in APP_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # ValueError: sys.modules[module] is None
            found = False
        if not found:
            missing.append(dist)
    return missing


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
    if argv[0] in APP_COMMANDS and not {"-h", "--help"} & set(argv[1:]):
        missing = missing_app_modules()
        if missing:  # said before any work (a grid written after training raised at the end)
            print(f"python -m fastflow {argv[0]}: needs {' and '.join(missing)}, from the app "
                  "extra: pip install 'fastflow[app]' (in a clone: pip install -e '.[app]')",
                  file=sys.stderr)
            return 2
    target, _ = COMMANDS[argv[0]]
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
