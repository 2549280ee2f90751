"""The embedded data set: scikit-learn's bundled 8x8 handwritten digits (no download).

``digits(split)`` gives float images in [0, 1] shaped (N, 1, 8, 8) and their labels, with a
deterministic train/test split; ``fit_size`` pads or resizes them (e.g. to 16x16 for a Glow
with more squeeze levels); ``batches`` walks a tensor in (optionally shuffled) mini-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SPLITS = ("train", "test", "all")
FIT_MODES = ("resize", "pad")
DIGITS_MAX = 16.0  # the bundled digits hold integer intensities 0..16


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (images (N, 1, 8, 8) float32 in [0, 1], labels (N,) int64)."""
    from sklearn.datasets import load_digits as _load  # bundled with scikit-learn

    bunch = _load()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / DIGITS_MAX
    return images, torch.as_tensor(bunch.target, dtype=torch.int64)


def split_indices(n: int, test_fraction: float = 0.2, seed: int = 0):
    """(train, test) index tensors of a fixed random permutation of ``range(n)``."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a number in [0, 1), got {test_fraction!r}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


def fit_size(images: torch.Tensor, size: int, mode: str = "resize") -> torch.Tensor:
    """(N, C, H, W) images brought to (N, C, size, size): bilinear ``resize`` (values stay
    in [0, 1]) or zero ``pad`` around the centre (size >= H, W)."""
    if mode not in FIT_MODES:
        raise ValueError(f"mode: expected one of {FIT_MODES}, got {mode!r}")
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    if mode == "resize":
        out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return out.clamp_(0.0, 1.0)
    if size < h or size < w:
        raise ValueError(f"size: expected at least the image size {h}x{w} to pad, got {size}")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(images, [left, size - w - left, top, size - h - top])


def digits(split: str = "train", *, size: int = 8, mode: str = "resize", channels: int = 1,
           test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of one split: images float32 (N, channels, size, size) in [0, 1]
    (the grey channel repeated when ``channels`` > 1)."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if channels < 1:
        raise ValueError(f"channels: expected a positive count, got {channels}")
    images, labels = load_digits()
    if split != "all":
        train, test = split_indices(len(images), test_fraction, seed)
        idx = train if split == "train" else test
        images, labels = images[idx], labels[idx]
    images = fit_size(images, size, mode)
    if channels > 1:
        images = images.repeat(1, channels, 1, 1)
    return images.contiguous(), labels


def batches(x: torch.Tensor, batch_size: int, *, shuffle: bool = True,
            generator: torch.Generator | None = None, drop_last: bool = False):
    """Mini-batches of ``x`` along its first dimension (a fresh permutation per call when
    ``shuffle``; ``generator`` makes it reproducible)."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield x[order[start:start + batch_size].to(x.device)]
