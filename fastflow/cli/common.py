"""Pieces every command shares: ``pick_device``, ``run_dir`` (results under ``runs/<name>/``),
``progress`` (tqdm when installed, plain prints otherwise), ``save_checkpoint`` /
``load_checkpoint`` (model + optimizer + any state, resumable), ``save_image_grid`` (a PNG of
image rows via matplotlib), ``write_json``, ``positive`` (an argparse type) and
``backend_name``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_dir(out: str | os.PathLike) -> Path:
    """The results folder (created): ``runs/<name>`` by convention."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    map_location=None) -> dict:
    """Restore ``model`` (and ``optimizer``) from ``save_checkpoint``'s file; returns the
    extra state saved with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint at {path}")
    payload = torch.load(path, map_location=map_location, weights_only=False)
    model.load_state_dict(payload.pop("model"))
    opt_state = payload.pop("optimizer", None)
    if optimizer is not None and opt_state is not None:
        optimizer.load_state_dict(opt_state)
    return payload


def save_image_grid(path: str | os.PathLike, rows, titles=None, *, scale: float = 0.6) -> Path:
    """A PNG with one row per tensor in ``rows`` (each (n, C, H, W) in [0, 1], C = 1 or 3),
    ``titles`` labelling the rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r.detach().float().clamp(0, 1).cpu() for r in rows]
    n_cols = max(r.shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), n_cols, squeeze=False,
                             figsize=(scale * n_cols + 1.2, scale * len(rows) + 0.3))
    for i, r in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < r.shape[0]:
                img = r[j]
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(img.permute(1, 2, 0).numpy())
        if titles:
            axes[i][0].set_ylabel(titles[i], rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout(pad=0.2)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_json(path: str | os.PathLike, data) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
        return value

    return parse


def backend_name(device: torch.device) -> str:
    from ..backend import current_mode

    mode = current_mode()
    if mode == "auto":
        return "triton" if device.type == "cuda" else "reference"
    return mode
