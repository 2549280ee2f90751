"""Pieces every command shares: ``pick_device``, ``run_dir`` (results under ``runs/<name>/``),
``progress`` (tqdm when installed, plain prints otherwise), ``save_checkpoint`` /
``load_checkpoint`` (model + optimizer + any state, resumable, loaded with
``weights_only=True``), ``prepare_out`` (``--out`` checked before training), ``rng_state``,
``save_image_grid`` (a PNG of image rows, drawn with Pillow), ``write_json``/``write_csv``
(all four through ``write_atomic``), ``write_metrics`` (a training command's
metrics.json and metrics.csv, one ``metrics_row`` per epoch),
``positive``/``finite`` (argparse types), ``add_optimisation_options``/``add_step_options``/
``add_cadence_options``/``add_run_options``/``add_data_options``/``add_precision_option``
(the options every training command has, with ``check_step_options``, ``step_options``,
``say_changed_options`` and ``set_threads``),
``load_data``/``split_key``/``data_fingerprint``/``resume_data``/``check_resume_data``/
``check_resume_batch`` (``--data`` read, and checked on ``--resume``, the same way by every
training command), ``HelpFormatter`` and
``backend_name``."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path

import torch


HelpFormatter = argparse.ArgumentDefaultsHelpFormatter  # every command's --help shows defaults

# ``--precision``: the autocast dtype of the training step, evaluation and sampling
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; otherwise the named device (``cpu``,
    ``cuda``, ``cuda:N``). A name torch does not know, or CUDA on a build without it, is one
    clear line (SystemExit), not a traceback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SystemExit(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise SystemExit(f"--device {name}: this torch ({torch.__version__}) is built "
                             "without CUDA; use --device cpu or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: no CUDA device is available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"--device {name}: only {torch.cuda.device_count()} CUDA "
                             "device(s) here")
    elif device.type != "cpu":
        raise SystemExit(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def run_dir(out: str | os.PathLike) -> Path:
    """The results folder (created): ``runs/<name>`` by convention."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepare_out(out: str | os.PathLike, *, resume: bool, force: bool = False,
                write: bool = True) -> Path:
    """Check ``--out`` before any training: creatable and writable, ``checkpoint.pt`` in it a
    file if anything, and an existing checkpoint never overwritten by a fresh run without
    ``--force``. ``write``: this process writes and speaks (rank 0); others only read.
    Returns the checkpoint path."""
    if not str(out).strip():  # Path("") is the current folder: the run would land there
        raise SystemExit(f"--out: expected a folder, got {str(out)!r}")
    path = Path(out)
    ckpt = path / "checkpoint.pt"
    if path.exists() and not path.is_dir():  # mkdir would say "File exists"
        raise SystemExit(f"--out: expected a folder, got the file {path}")
    if write:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".fastflow-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise SystemExit(f"--out: cannot write to {path}: {err.strerror or err}") from None
    if ckpt.exists() and not ckpt.is_file():
        raise SystemExit(f"--out: {ckpt} exists and is not a file; remove it or choose "
                         "another --out")
    if ckpt.is_file() and not resume and not force:
        raise SystemExit(f"--out: {ckpt} exists; pass --resume to continue it or --force to "
                         "start over and overwrite it")
    if resume and not ckpt.is_file() and write:  # said once, not by every torchrun process
        print(f"--resume: no checkpoint at {ckpt}; starting fresh", flush=True)
    return ckpt


class _PlainProgress:
    """The fallback progress bar: a line every ``every`` steps and at the end."""

    def __init__(self, iterable, total, desc, every):
        self.iterable, self.total, self.desc, self.every = iterable, total, desc, every
        self.postfix, self.n, self.start = "", 0, time.perf_counter()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1
            if self.every != math.inf and (self.n % self.every == 0 or self.n == self.total):
                rate = self.n / max(time.perf_counter() - self.start, 1e-9)
                print(f"{self.desc} {self.n}/{self.total or '?'} ({rate:.1f} it/s) {self.postfix}",
                      file=sys.stderr, flush=True)

    def set_postfix_str(self, text):
        self.postfix = text

    def close(self):
        pass


def progress(iterable, *, total: int | None = None, desc: str = "", enabled: bool = True,
             every: int = 50):
    """A progress bar over ``iterable`` with ``set_postfix_str``/``close``: tqdm when it is
    installed and ``enabled``, else plain lines on stderr (silent when not ``enabled``)."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    return _PlainProgress(iterable, total, desc, every if enabled else math.inf)


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, **state) -> Path:
    """Write model (and optimizer) state plus any extra picklable ``state`` (epoch, step,
    config, history, RNG state...) atomically: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": model.state_dict(), **state}
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    return write_atomic(path, lambda tmp: torch.save(payload, tmp))


def write_atomic(path: str | os.PathLike, write) -> Path:
    """``write(tmp)`` into ``path`` + ``.tmp``, then renamed over ``path``: a crash, an
    interrupt or a full disk never leaves half a file at ``path`` (what was there stays),
    and the temporary file is removed. A write that fails (a full disk, a read-only or
    vanished folder: OSError, or the RuntimeError torch.save turns it into) is one line
    naming ``--out`` and the file (SystemExit), not a traceback."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        _remove_quietly(tmp)
        reason = (err.strerror if isinstance(err, OSError) and err.strerror else
                  (str(err).strip().splitlines() or [type(err).__name__])[0][:200])
        kept = " (the earlier one is kept)" if path.is_file() else ""
        raise SystemExit(f"--out: cannot write {path}{kept}: {reason}; is the disk full or "
                         "the folder read-only?") from None
    except BaseException:  # KeyboardInterrupt, SystemExit: no half-written file left over
        _remove_quietly(tmp)
        raise
    return path


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def read_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """The dict ``save_checkpoint`` wrote, loaded with ``weights_only=True`` (tensors and
    plain Python values only: a planted file cannot run code). A missing file is
    FileNotFoundError; an empty, truncated or foreign file is one clear line (SystemExit)
    naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - every unreadable file gets the same message
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise SystemExit(f"--resume: cannot read the checkpoint {path} ({reason}); it is "
                         "empty, truncated or not a fastflow checkpoint") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise SystemExit(f"--resume: {path} is not a fastflow checkpoint (expected a dict with "
                         f"a 'model' state dict, got {type(payload).__name__})")
    return payload


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    map_location=None) -> dict:
    """Restore ``model`` (and ``optimizer``) from ``save_checkpoint``'s file; returns the
    extra state saved with it (see ``read_checkpoint`` for the errors)."""
    return restore_checkpoint(read_checkpoint(path, map_location), path, model, optimizer)


def restore_checkpoint(payload: dict, path: str | os.PathLike, model: torch.nn.Module,
                       optimizer: torch.optim.Optimizer | None = None) -> dict:
    """``load_checkpoint`` of a ``payload`` already read (and checked) with
    ``read_checkpoint``: its model and optimizer states go into ``model``/``optimizer``;
    the rest is returned."""
    payload = dict(payload)
    try:
        model.load_state_dict(payload.pop("model"))
        opt_state = payload.pop("optimizer", None)
        if optimizer is not None and opt_state is not None:
            optimizer.load_state_dict(opt_state)
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0]
        raise SystemExit(f"--resume: {path} does not fit this model: {first}") from None
    return payload


def rng_state(*generators: torch.Generator, device: torch.device | None = None) -> dict:
    """torch's CPU RNG, CUDA's (when ``device`` is CUDA) and the given generators' states:
    plain tensors, so a checkpoint holding them loads with ``weights_only=True``."""
    state = {"cpu": torch.get_rng_state(),
             "generators": [g.get_state() for g in generators]}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, *generators: torch.Generator,
                  device: torch.device | None = None) -> None:
    """Restore what ``rng_state`` saved. Every RNG state (a CUDA generator's too) is set
    from a CPU byte tensor: a checkpoint loaded with ``map_location`` a GPU has them there,
    so they come back to the CPU first (no copy when they already are)."""
    torch.set_rng_state(state["cpu"].cpu())
    for gen, saved in zip(generators, state["generators"]):
        gen.set_state(saved.cpu())
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def save_image_grid(path: str | os.PathLike, rows, titles=None, *, cell: int = 40) -> Path:
    """A PNG with one row per tensor in ``rows`` (each (n, C, H, W) in [0, 1], C = 1 or 3),
    ``titles`` labelling the rows; each image is magnified (nearest) to about ``cell`` pixels.
    Drawn with Pillow: fast, no plotting library; written atomically."""
    from PIL import Image, ImageDraw

    rows = [torch.nan_to_num(r.detach().float(), 0.0).clamp(0, 1).cpu() for r in rows]
    h, w = rows[0].shape[-2:]
    zoom = max(1, cell // max(h, w))
    pad, label = 2, (70 if titles else 0)
    n_cols = max(r.shape[0] for r in rows)
    height = len(rows) * (h * zoom + pad) + pad
    canvas = Image.new("RGB", (label + n_cols * (w * zoom + pad) + pad, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, r in enumerate(rows):
        top = pad + i * (h * zoom + pad)
        if titles:
            draw.text((4, top + h * zoom // 2 - 5), str(titles[i]), fill="black")
        for j in range(r.shape[0]):
            img = (r[j].expand(3, -1, -1) if r.shape[1] == 1 else r[j][:3]) * 255
            tile = Image.fromarray(img.round().to(torch.uint8).permute(1, 2, 0).numpy())
            tile = tile.resize((w * zoom, h * zoom), Image.Resampling.NEAREST)
            canvas.paste(tile, (label + pad + j * (w * zoom + pad), top))
    return write_atomic(path, lambda tmp: canvas.save(tmp, format="PNG"))


def _json_safe(value):
    """NaN and the infinities as null: JSON has no such numbers (jq, JavaScript and strict
    parsers refuse Python's NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str | os.PathLike, data) -> Path:
    """``data`` as indented JSON, written atomically; non-finite floats become null."""
    text = json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n"
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_csv(path: str | os.PathLike, rows: list[dict]) -> Path:
    """``rows`` (flat dicts) as a CSV with the union of their keys as columns, written
    atomically."""
    import csv

    columns = list(dict.fromkeys(k for row in rows for k in row))

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    return write_atomic(path, write)


def metrics_row(entry: dict) -> dict:
    """One epoch of a training command's history as a flat CSV row: epoch, step, each train
    and test term (``train_bpd``, ``test_bpd``...; the test ones empty for an epoch without
    evaluation), skipped non-finite steps, learning rate, images/s, seconds (empty for an
    entry of an older checkpoint without them), then Glow's digit scores when there are."""
    train, test = entry["train"], entry.get("test")
    row = {"epoch": entry["epoch"], "step": entry["step"],
           **{f"train_{k}": v for k, v in train.items()},
           **{f"test_{k}": (test or {}).get(k) for k in (test or train)},
           "skipped_steps": entry["skipped"]}
    row.update({k: entry.get(k) for k in ("lr", "images_per_s", "seconds")})
    for t, score in (entry.get("digits") or {}).items():
        row[f"recognised_T{t}"] = score["recognised"]
        row[f"classes_T{t}"] = score["classes"]
    return row


def write_metrics(out: str | os.PathLike, metrics: dict) -> list[Path]:
    """``metrics`` (config, model, ``history``...) as ``out``/metrics.json, and its history's
    epochs (every epoch of the run, those before a ``--resume`` too: the checkpoint keeps
    them) as ``out``/metrics.csv, one ``metrics_row`` each (none without an epoch); both
    atomically. Returns the paths written. The caller writes on rank 0 only."""
    out = Path(out)
    written = [write_json(out / "metrics.json", metrics)]
    epochs = metrics["history"]["epochs"]
    if epochs:
        written.append(write_csv(out / "metrics.csv", [metrics_row(e) for e in epochs]))
    return written


def positive(kind):
    def parse(text):
        value = kind(text)
        if not 0 < value < math.inf:  # nan and inf too: a float option would take them
            raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text}")
        return value

    return parse


SEED_LIMIT = 2 ** 62  # torch's generators take [-2^63, 2^64); the commands add offsets


def seed(text):
    """An argparse type: an integer seed within +-2^62 (torch's generators overflow past
    2^64, and the commands seed them with the seed plus small offsets)."""
    value = int(text)
    if not -SEED_LIMIT <= value <= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected an integer from -2**62 to 2**62, got {text}")
    return value


def finite(text):
    """An argparse type: a finite float (nan and inf, which float() takes, are refused)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def add_optimisation_options(parser, *, epochs: int, lr: float | None,
                             lr_help: str = "Adam learning rate",
                             batch_help: str = "images per optimizer step") -> None:
    """``--epochs``, ``--batch-size``, ``--lr``, ``--max-steps`` and ``--seed`` on ``parser``
    (a parser or an argument group), with the command's own defaults and help."""
    parser.add_argument("--epochs", type=positive(int), default=epochs,
                        help="passes over the training images")
    parser.add_argument("--batch-size", type=positive(int), default=64, help=batch_help)
    parser.add_argument("--lr", type=positive(float), default=lr, help=lr_help)
    parser.add_argument("--max-steps", type=positive(int), default=None,
                        help="stop after this many optimizer steps in total")
    parser.add_argument("--seed", type=seed, default=0,
                        help="random seed (initial weights, data order, noise)")


def add_step_options(parser, *, warmup: int) -> None:
    """``--warmup`` and ``--clip`` on ``parser``: ``StepRunner``'s linear learning-rate warmup
    and gradient-norm clipping, the same in every training command (``warmup``: the
    command's default). ``check_step_options`` refuses a negative warmup."""
    parser.add_argument("--warmup", type=int, default=warmup,
                        help="linear learning-rate warmup steps")
    parser.add_argument("--clip", type=positive(float), default=None,
                        help="clip the gradient norm to this value (None: no clipping)")


def check_step_options(args) -> None:
    if args.warmup < 0:
        raise SystemExit(f"--warmup: expected a step count >= 0, got {args.warmup}")


def step_options(args) -> dict:
    """The options of the training step that ``--resume`` takes as given (the learning rate
    has its own message): saved with the checkpoint (``training``), so that a change is
    said (``say_changed_options``): a run resumed without its --precision goes on in fp32,
    one resumed at an epoch's end with another --batch-size takes other steps (mid-epoch it
    is refused: ``check_resume_batch``)."""
    return {"warmup": args.warmup, "clip": args.clip, "precision": args.precision,
            "batch_size": args.batch_size}


def say_changed_options(saved: dict | None, given: dict, say=print) -> None:
    """On ``--resume``: one line per option of ``given`` (``step_options``) whose value
    differs from the checkpoint's ``training`` entry ``saved`` (older checkpoints, without
    it: taken as given)."""
    for name, value in given.items():
        had = (saved or {}).get(name, value)
        if had != value:
            say(f"--{name.replace('_', '-')}: using {value} (the checkpoint's run had {had})")


def remove_earlier_run(ckpt_path: Path, say=print) -> None:
    """A fresh start over an earlier run (``--force``): its ``checkpoint.pt`` and metrics
    go now. Until this run wrote its own, a stop (Ctrl-C in the first epoch or evaluation,
    a kill) said the earlier checkpoint was this run's, and ``--resume`` went on with the
    earlier run."""
    if not ckpt_path.is_file():
        return
    out = ckpt_path.parent
    earlier = [p for p in (ckpt_path, out / "metrics.json", out / "metrics.csv") if p.is_file()]
    for path in earlier:
        path.unlink()
    say(f"--out: removed the earlier run's {', '.join(p.name for p in earlier)} in {out}: "
        "this run starts afresh")


def say_nothing_left(epoch: int, step: int, args, say=print) -> None:
    """On ``--resume``: one line when the checkpoint (``epoch`` finished epochs, ``step``
    steps) already reaches ``--epochs`` or ``--max-steps``: the run trains nothing, and its
    summary read as that of a run that did."""
    reached = [f"--epochs {args.epochs}" if epoch >= args.epochs else "",
               f"--max-steps {args.max_steps}"
               if args.max_steps is not None and step >= args.max_steps else ""]
    reached = [text for text in reached if text]
    if reached:
        say(f"--resume: nothing to train: the checkpoint is at epoch {epoch}, step {step}, "
            f"which reaches {' and '.join(reached)} (pass a larger value to go on)")


def add_cadence_options(parser, *, evaluated: str) -> None:
    """``--eval-every``, ``--log-every`` and ``--threads`` on ``parser``, the same in every
    training command; ``evaluated``: what the command does on an evaluation epoch (say,
    "test bits/dim, sample grid and checkpoint")."""
    parser.add_argument("--threads", type=positive(int), default=None,
                        help="CPU threads for torch (None: torch's choice)")
    parser.add_argument("--eval-every", type=positive(int), default=1,
                        help=f"{evaluated} every N epochs (and at the end)")
    parser.add_argument("--log-every", type=positive(int), default=20,
                        help="progress-bar update interval in steps (each update reads the device)")


def set_threads(args) -> None:
    """``--threads``: torch's CPU threads (None: left as they are)."""
    if args.threads:
        torch.set_num_threads(args.threads)


def out_folder(text: str) -> str:
    """An argparse type: ``--out`` with a leading ``~`` expanded, as ``--data`` expands it
    (the shell leaves ``--out=~/x`` as it is: the run went to a folder named ``~`` here)."""
    return os.path.expanduser(text)


def add_run_options(parser, *, out: str, force: bool = True) -> None:
    """``--out``, ``--device``, ``--resume``, ``--force`` (where the command refuses to
    overwrite a checkpoint, see ``prepare_out``) and ``--no-progress`` on ``parser``."""
    parser.add_argument("--out", type=out_folder, default=out, help="results folder")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/checkpoint.pt (without one: a fresh start)")
    if force:
        parser.add_argument("--force", action="store_true",
                            help="start a fresh run over an existing OUT/checkpoint.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


TEST_FRACTION = 0.1  # --test-fraction's default (a folder or an array)
DIGITS_TEST_FRACTION = 0.2  # what the bundled digits always hold out


def add_data_options(parser, *, test_fraction_help: str = "held-out share of the images "
                     "(digits: 0.2; CIFAR: its test batch)",
                     n_bits_help: str = "keep the top N bits of 8-bit images (Glow's 5-bit "
                     "setting): 2**N levels") -> None:
    """``--data``, ``--size``, ``--n-bits`` and ``--test-fraction`` on ``parser`` (read by
    ``load_data``)."""
    parser.add_argument("--data", default="digits",
                        help="digits (bundled), a folder of PNG/JPEG images (recursive), an "
                             ".npy/.npz uint8 array (N,H,W), (N,H,W,C) or (N,C,H,W), or "
                             "cifar10:ROOT (CIFAR-10's python batches, already on disk)")
    parser.add_argument("--size", type=positive(int), default=None,
                        help="center-crop and resize the images to SIZE x SIZE (None: as "
                             "stored)")
    parser.add_argument("--n-bits", type=positive(int), default=None, help=n_bits_help)
    parser.add_argument("--test-fraction", type=float, default=TEST_FRACTION,
                        help=test_fraction_help)


def add_precision_option(parser, *, help: str) -> None:  # noqa: A002 - argparse's name
    """``--precision fp32|bf16|fp16`` on ``parser`` (``StepRunner`` runs it)."""
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help=help)


def check_one_process(command: str, why: str = "") -> None:
    """Refuse torchrun (``WORLD_SIZE`` > 1) for a command without DistributedDataParallel:
    each process would train the whole model alone and all write the same files (``why``:
    what else would go wrong, said in the message)."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world != "1":
        raise SystemExit(f"{command}: expected one process, got WORLD_SIZE {world} (torchrun)"
                         f"{'; ' + why if why else ''}; only train runs on several processes, "
                         "so run it without torchrun")


def check_test_fraction(args) -> None:
    if not 0 < args.test_fraction < 1:
        raise SystemExit(f"--test-fraction: expected a number in (0, 1), got {args.test_fraction}")


def load_data(args, say=print):
    """(train, test) ``ImageSet``s of ``--data`` with ``--size``, ``--n-bits``,
    ``--test-fraction`` and ``--seed`` (which draws the held-out images); a bad source or
    option is one line naming it (SystemExit), not a traceback. ``say``: where a note goes
    (under torchrun, rank 0's print)."""
    from ..data import load_image_sets

    check_test_fraction(args)
    # digits and CIFAR-10 hold out their own share: another value is said, not dropped
    fixed = ("its test batch" if args.data.startswith("cifar10:") else
             f"a fixed {DIGITS_TEST_FRACTION:.0%}" if args.data == "digits" else None)
    said = (TEST_FRACTION, DIGITS_TEST_FRACTION if args.data == "digits" else TEST_FRACTION)
    if fixed and args.test_fraction not in said:
        say(f"--test-fraction: {args.test_fraction:g} does not apply to {args.data}, which "
            f"holds out {fixed}", flush=True)
    try:
        return load_image_sets(args.data, size=args.size, n_bits=args.n_bits,
                               test_fraction=args.test_fraction, seed=args.seed)
    except ValueError as err:
        raise SystemExit(str(err)) from None


def split_key(args) -> dict:
    """The options that pick the held-out images (``load_image_sets``): the seed for the
    digits (their share is fixed), the seed and ``--test-fraction`` for a folder or an
    array; nothing for CIFAR-10 (its own test batch)."""
    if args.data.startswith("cifar10:"):
        return {}
    if args.data == "digits":
        return {"seed": args.seed}
    return {"seed": args.seed, "test_fraction": args.test_fraction}


def data_fingerprint(train, test) -> list[int]:
    """CRC32s of the training and held-out images (``ImageSet``s, as trained on: after
    ``--size`` and ``--n-bits``) and of their labels: other images of the same shape and
    count are told apart on ``--resume`` (CIFAR-10's 180 MB take well under a second)."""
    def crc(t):
        return 0 if t is None else zlib.crc32(t.contiguous().numpy())

    return [crc(train.levels), crc(test.levels), crc(train.labels), crc(test.labels)]


def resume_data(args, train, test) -> dict:
    """What a checkpoint keeps of the images it was trained on, for ``check_resume_data``:
    ``{"split": split_key(args), "n_images": N, "fingerprint": data_fingerprint(...)}``
    (saved with the checkpoint's other entries)."""
    return {"split": split_key(args), "n_images": len(train) + len(test),
            "fingerprint": data_fingerprint(train, test)}


def check_resume_data(saved: dict, ckpt_path, data: dict, source: str, *,
                      metric: str = "test bits/dim") -> None:
    """Refuse to resume ``saved`` (a checkpoint's dict) against ``data`` (``resume_data`` of
    this run, whose ``--data`` is ``source``) when its held-out images were drawn with other
    options (``split_key``) or from another number of images: the run would train on some
    of them and report held-out numbers on images it has seen; or when its images differ
    (``data_fingerprint``): it would go on training on other images. Checkpoints from
    before these were saved: as given."""
    split, n_images, fingerprint = data["split"], data["n_images"], data["fingerprint"]
    if saved.get("split", split) != split:
        names = ", ".join("--" + k.replace("_", "-") for k in split)
        raise SystemExit(f"{names}: {ckpt_path} held out its test images with {saved['split']}; "
                         f"this run asks for {split}, which would train on some of them "
                         f"and report {metric} on images it has seen (pass the "
                         "checkpoint's values)")
    if saved.get("n_images", n_images) != n_images:  # a permutation of range(n_images)
        raise SystemExit(f"--data: {ckpt_path} held out its test images from "
                         f"{saved['n_images']} images; {source} now holds {n_images}, "
                         "so other images would be held out, some of them trained on "
                         "(resume with the images it was trained on, or use a new --out)")
    if saved.get("fingerprint", fingerprint) != fingerprint:
        raise SystemExit(f"--data: {ckpt_path} was trained on other images than {source} holds "
                         f"now (the same shape and count, other pixels or labels: CRC32s "
                         f"{saved['fingerprint']}, got {fingerprint}); resume with the "
                         "images it was trained on, or use a new --out")


# the options behind a checkpoint's "config" keys where the name alone does not say
CONFIG_OPTIONS = {"conv_lu": "--no-lu", "affine": "--additive", "image": "--data/--size",
                  "n_bins": "--n-bits", "num_classes": "--unconditional/--data"}


def check_resume_config(saved, config: dict, ckpt_path) -> None:
    """Refuse to resume a checkpoint whose model ``config`` (``saved``) differs from this
    run's, naming each option that differs with the checkpoint's value and the given one
    (``--n-flow 2, got 3``; ``--no-lu (conv_lu True, got False)``)."""
    if saved == config:
        return
    if not isinstance(saved, dict):
        raise SystemExit(f"--resume: {ckpt_path} was trained with {saved}, got {config}")
    theirs, ours = sorted(set(saved) - set(config)), sorted(set(config) - set(saved))
    if theirs and ours:  # not one option each: another kind of model
        raise SystemExit(f"--resume: {ckpt_path} holds another kind of model (its options "
                         f"{', '.join(theirs)}; this command's {', '.join(ours)}): another "
                         "training command's checkpoint? Use a new --out")
    diffs = []
    for key in dict.fromkeys([*config, *saved]):
        if saved.get(key) != config.get(key):
            values = f"{saved.get(key)}, got {config.get(key)}"
            diffs.append(f"{CONFIG_OPTIONS[key]} ({key} {values})" if key in CONFIG_OPTIONS
                         else f"--{key.replace('_', '-')} {values}")
    raise SystemExit(f"--resume: {ckpt_path} was trained with other options: "
                     + "; ".join(diffs) + " (pass the checkpoint's values, or use a new --out)")


def check_resume_batch(partial: dict | None, ckpt_path, epoch: int, batch_size: int,
                       seed: int | None = None) -> None:
    """Refuse to go on with an epoch that a ``--max-steps`` stop left unfinished (``partial``,
    saved after ``epoch`` finished epochs) at another ``--batch-size``, or (``seed``: a
    command whose epoch order is drawn from ``--seed``, and ``partial`` saved it) another
    ``--seed``: the rest of that epoch's order would skip or repeat images."""
    if partial is None:
        return
    where = f"{ckpt_path} stopped after batch {partial['batch']} of epoch {epoch + 1}"
    if partial["batch_size"] != batch_size:
        raise SystemExit(f"--batch-size: {where} at --batch-size {partial['batch_size']}; "
                         f"got {batch_size}, which would skip or repeat images of that epoch "
                         "(pass the checkpoint's value)")
    if seed is not None and partial.get("seed", seed) != seed:
        raise SystemExit(f"--seed: {where} with --seed {partial['seed']}; got {seed}, whose "
                         "order of that epoch's images would skip or repeat some of them "
                         "(pass the checkpoint's value)")


INTERRUPTED = 130  # the exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells use


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or torchrun's stop), raised where the run is, as Ctrl-C is."""


@contextlib.contextmanager
def stop_on_sigterm():
    """SIGTERM raises ``Terminated`` in the training command (so that a half-written file is
    removed and ``interrupted`` says where to go on from) instead of killing the process
    on the spot; the previous handler is back afterwards. Only in the main thread (where
    Python runs signal handlers)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopRequest:
    """What ``stop_between_steps`` noted: ``pending``, the exception of the first Ctrl-C
    (KeyboardInterrupt) or SIGTERM (``Terminated``), None while none came."""

    def __init__(self):
        self.pending = None

    def raise_pending(self) -> None:
        """Raise the noted stop (after the training loop saved the last step), if any."""
        if self.pending is not None:
            raise self.pending()


@contextlib.contextmanager
def stop_between_steps(enabled: bool = True):
    """Within (a training command's optimizer steps): the first Ctrl-C or SIGTERM is noted
    (``StopRequest.pending``) and said, instead of raised half-way through a step, so that
    the loop can end after the step under way, checkpoint it (as a ``--max-steps`` stop
    inside an epoch), write what the run writes at its end and then raise it; a second one
    raises at once. Not
    ``enabled`` (several processes, which could stop one step apart and wait on each
    other's all-reduce for ever) or outside the main thread: signals raise as before. An
    ignored signal (SIG_IGN) stays ignored."""
    import signal
    import threading

    stop = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        err = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        if stop.pending is not None:
            raise err
        stop.pending = err
        # (a second signal also stops the evaluation that comes before the checkpoint)
        print(f"{'terminated' if err is Terminated else 'interrupted'}: saving a checkpoint "
              "after the step under way, then the metrics and samples (again to stop at "
              "once, without what is not written yet)",
              file=sys.stderr, flush=True)

    # a signal the process was started ignoring (nohup, a background job of a script)
    # stays ignored, as it was before this block
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)


def interrupted(out: str | os.PathLike, err: KeyboardInterrupt, *, quiet: bool = False) -> int:
    """What a training command does on Ctrl-C (KeyboardInterrupt) or SIGTERM (``Terminated``):
    one line on stderr saying where the run can go on from (the last checkpoint, written
    atomically, is intact) instead of a traceback; returns the exit status, 128 + the
    signal (130, 143). ``quiet``: say nothing (the processes of torchrun other than rank
    0)."""
    terminated = isinstance(err, Terminated)
    if not quiet:
        ckpt = Path(out) / "checkpoint.pt"
        where = (f"{ckpt} (its last checkpoint) is intact: --resume goes on from it"
                 if ckpt.is_file() else f"no checkpoint was written yet in {Path(out)}")
        print(f"{'terminated' if terminated else 'interrupted'}: {where}", file=sys.stderr,
              flush=True)
    return 143 if terminated else INTERRUPTED


def run_interruptible(run, out: str | os.PathLike, *, quiet: bool = False) -> int:
    """``run()``, a training command's body, with SIGTERM raised as ``Terminated``
    (``stop_on_sigterm``); on Ctrl-C or SIGTERM, ``interrupted``'s one line and exit status
    instead of a traceback."""
    try:
        with stop_on_sigterm():
            return run()
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM: where to go on from, no traceback
        return interrupted(out, err, quiet=quiet)


def backend_name(device: torch.device) -> str:
    from ..backend import current_mode

    mode = current_mode()
    if mode == "auto":
        return "triton" if device.type == "cuda" else "reference"
    return mode
