"""The embedded data set: scikit-learn's bundled 8x8 handwritten digits (no download).

``digits(split)`` gives float images in [0, 1] shaped (N, 1, 8, 8) and their labels, with a
deterministic train/test split; ``fit_size`` pads or resizes them (e.g. to 16x16 for a Glow
with more squeeze levels); ``batches`` walks a tensor in (optionally shuffled) mini-batches.

``load_image_sets`` reads the training commands' ``--data`` sources (digits, an image
folder, an .npy/.npz array, CIFAR-10's python batches through a restricted unpickler) as
integer levels; ``dequantize`` makes Glow's input of them; ``digit_score`` measures how many
generated images a fixed digit classifier recognises.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

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


# ---------------------------------------------------------------------------------------
# Image sources for training (``--data``): everything becomes integer levels (uint8, NCHW)
# plus the number of levels, so the dequantisation and the bits/dim constant follow the data.

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
OTHER_IMAGE_SUFFIXES = (".bmp", ".gif", ".tif", ".tiff", ".webp")  # not read, but said
DIGIT_LEVELS = 17  # the bundled digits hold the integer intensities 0..16


class ImageSet:
    """Integer images of one split: ``levels`` uint8 (N, C, H, W) in ``0..n_bins-1``."""

    def __init__(self, levels: torch.Tensor, n_bins: int, labels: torch.Tensor | None = None):
        self.levels, self.n_bins, self.labels = levels, int(n_bins), labels

    def __len__(self):
        return self.levels.shape[0]

    @property
    def shape(self):
        return tuple(self.levels.shape[1:])

    def as_float(self) -> torch.Tensor:
        """Images in [0, 1] (for pictures)."""
        return levels_to_unit(self.levels, self.n_bins)


def levels_to_unit(levels: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Integer levels to images in [0, 1], ``levels / (n_bins - 1)``: for a batch at a time
    (a float copy of a whole training set is 4x its uint8 size: 600 MB for CIFAR-10)."""
    return levels.float() / (n_bins - 1)


def _data_error(text: str) -> ValueError:
    return ValueError(f"--data: {text}")


CHANNELS = (1, 3, 4)  # grey, RGB, RGBA (alpha dropped)


def _to_nchw_uint8(array, what: str, channels_last: bool = False) -> torch.Tensor:
    """uint8 images (N, H, W), (N, H, W, C) or (N, C, H, W), C in 1, 3, 4, as (N, C, H, W).

    A 4-D array is read channels-last when its last dim is 1, 3 or 4 and its dim 1 is not,
    channels-first when dim 1 is and the last dim is not; when both are (say (N, 3, 8, 4):
    3x8 RGBA or 8x4 RGB) it is refused, naming both readings. ``channels_last`` (images
    stacked here, whose layout is known) skips the guess. A 3-D array whose last dim is 1,
    3 or 4 and differs from its dim 1 (one (H, W, C) image, np.save'd alone) is refused."""
    import numpy as np

    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise _data_error(f"{what}: expected uint8 images, got dtype {array.dtype}")
    shape = tuple(array.shape)
    if array.ndim == 3:
        if shape[2] in CHANNELS and shape[1] != shape[2]:  # np.save(path, one_image)
            h, w, c = shape
            raise _data_error(
                f"{what}: shape {shape} reads as {h} grey images of {w}x{c} pixels (N, H, W), "
                f"or one {h}x{w} image of {c} channel(s) (H, W, C); save the images "
                "stacked, (N, H, W, C) (np.stack(images)), or grey images this narrow as "
                "(N, H, W, 1) (x[..., None])")
        array = array[:, None]
    elif array.ndim == 4:
        last, first = shape[3] in CHANNELS, shape[1] in CHANNELS and not channels_last
        if last and first:
            n, a, b, c = shape
            raise _data_error(
                f"{what}: shape {shape} reads two ways: channels-last (N, H, W, C) as {c} "
                f"channel(s) of {a}x{b} images, or channels-first (N, C, H, W) as {a} "
                f"channel(s) of {b}x{c} images; save it transposed to (N, H, W, C), e.g. "
                "np.save(path, x.transpose(0, 2, 3, 1)) for a channels-first x (an array is "
                "read one way when only its last dim, or only its dim 1, is 1, 3 or 4)")
        if first:
            array = array.transpose(0, 2, 3, 1)
        if not (last or first):
            raise _data_error(f"{what}: expected images shaped (N, H, W), (N, H, W, C) or "
                              f"(N, C, H, W) with C in 1, 3, 4, got {shape}")
        if array.shape[3] == 4:
            print(f"--data: {what} has 4 channels: the 4th (alpha) is dropped, the first 3 "
                  "read as RGB", flush=True)
        array = array[..., :3].transpose(0, 3, 1, 2)
    else:
        raise _data_error(f"{what}: expected images shaped (N, H, W), (N, H, W, C) or "
                          f"(N, C, H, W) with C in 1, 3, 4, got {shape}")
    if array.shape[0] == 0:
        raise _data_error(f"{what}: holds no images (shape {shape})")
    return torch.from_numpy(np.ascontiguousarray(array))


def _npz_images_header(npz, key: str) -> bool:
    """Whether member ``key`` of an open .npz is a uint8 array of 3 or 4 dimensions, read
    from its header alone (the data is not decompressed)."""
    import numpy as np

    fmt = np.lib.format
    try:
        with npz.zip.open(key + ".npy") as f:
            version = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f)
    except Exception:  # noqa: BLE001 - an unreadable member is not the images
        return False
    return dtype == np.uint8 and len(shape) in (3, 4)


def _load_array(path: Path) -> torch.Tensor:
    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
        raise _data_error(f"cannot read {path}: {err}") from None
    what = str(path)
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            image_keys = [k for k in keys if _npz_images_header(loaded, k)]  # headers only
            # x and images by name (a wrong one is refused by name); arr_0, the first
            # unnamed member, only when it holds images: np.savez(f, labels, images)
            preferred = [k for k in ("x", "images") if k in keys] or (
                ["arr_0"] if "arr_0" in image_keys else [])
            if not preferred:  # e.g. np.savez(f, labels=..., imgs=...): the one image array
                preferred = image_keys
                if len(preferred) > 1:  # x_train and x_test: reading one would drop the rest
                    names = ", ".join(map(repr, preferred))
                    raise _data_error(
                        f"{path} holds several image arrays ({names}) and none named x, "
                        "images or arr_0: save the images to train on as x, e.g. "
                        "np.savez(path, x=np.concatenate([a, b])) (the held-out share is "
                        "drawn from them by --test-fraction)")
            key = (preferred or keys or [None])[0]
            if key is None:
                raise _data_error(f"{path} holds no arrays")
            what = f"{path}: array {key!r} of {keys}"
            others = [k for k in image_keys if k != key]
            if others:  # np.savez(f, train, test): arr_1 is images too, and not read
                print(f"--data: read {key!r} of {path}; left out its other image "
                      f"array(s) {others} (to train on all, save them as one x: "
                      "np.savez(path, x=np.concatenate([a, b])))", flush=True)
            try:  # members are read here, not by np.load
                loaded = loaded[key]
            except Exception as err:  # noqa: BLE001 - object arrays, damaged members
                raise _data_error(f"cannot read {what}: {err}") from None
    return _to_nchw_uint8(loaded, what)


def _load_folder(path: Path, size: int | None) -> torch.Tensor:
    import numpy as np
    from PIL import Image, ImageOps

    files, grids, others, unlisted = _image_files(path)
    if unlisted:
        print(f"--data: could not list {len(unlisted)} folder(s) under {path}, so the images "
              f"in them are left out: {unlisted[0]}"
              + (f" and {len(unlisted) - 1} more" if len(unlisted) > 1 else ""), flush=True)
    if others:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(others.items()))
        print(f"--data: left out {sum(others.values())} image file(s) under {path} of types "
              f"it does not read ({kinds}); convert them to PNG", flush=True)
    if grids:
        print(f"--data: skipped {grids} sample grid(s) of fastflow runs under {path} (the "
              "PNGs a training command writes beside its checkpoint.pt or metrics.json)",
              flush=True)
    images, bad, transparent = [], 0, 0
    for file in files:
        try:
            with Image.open(file) as img:
                img.load()
                img = ImageOps.exif_transpose(img)  # as viewers show it (camera rotation)
                if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                    alpha = img.convert("RGBA").getchannel("A")  # P/L/RGB: tRNS applied
                    transparent += alpha.getextrema()[0] < 255
                # 16-bit grey (mode I;16, or I from Pillow < 10.3: a PNG has no other I
                # image): its top 8 bits (convert("L") clips at 255)
                if img.mode.startswith("I;16") or img.mode == "I":
                    top = np.asarray(img).astype(np.int64).clip(0, 65535) >> 8
                    img = Image.fromarray(top.astype(np.uint8))
                img = img.convert("L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB")
                if size is not None:
                    img = _center_crop_resize_pil(img, size)
                images.append(np.asarray(img, dtype=np.uint8))
        except Exception:  # noqa: BLE001 - a broken file is skipped and counted, not fatal
            bad += 1
    n_grey = sum(im.ndim == 2 for im in images)
    if n_grey < len(images):  # any colour image: the grey ones become RGB
        images = [np.repeat(im[..., None], 3, -1) if im.ndim == 2 else im for im in images]
        if n_grey:
            n_colour = len(images) - n_grey
            verb = "is" if n_colour == 1 else "are"
            print(f"--data: {n_colour} of the {len(images)} images under {path} {verb} in "
                  f"colour: the {n_grey} grey one(s) are read as RGB (their grey repeated)",
                  flush=True)
    if bad:
        print(f"--data: skipped {bad} unreadable image file(s) in {path}", flush=True)
    if transparent:  # alpha dropped, as torchvision's loader does
        print(f"--data: {transparent} image(s) under {path} have transparent pixels; their "
              "alpha is dropped, so the colours stored under them (which viewers do not "
              "show) are trained on", flush=True)
    if not images:
        raise _data_error(f"no readable PNG/JPEG images under {path} "
                          f"({len(files)} candidate file(s))")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise _data_error(f"images under {path} differ in size ({sorted(shapes)[:3]}...): "
                          "pass --size to center-crop and resize them")
    return _to_nchw_uint8(np.stack(images), str(path), channels_last=True)


# what a training command writes in its --out folder: a run in the image folder (say
# `--data .` with the default runs/<name>) must not feed its sample grids to the next run
RUN_MARKERS = ("checkpoint.pt", "metrics.json", "samples_before.png")
RUN_GRIDS = re.compile(r"(samples|samples_before|samples_epoch\d+|vae_samples|tarflow_samples)"
                       r"\.png")


def _image_files(path: Path) -> tuple[list[Path], int, dict, list[str]]:
    """The PNG/JPEG files under ``path``, sorted, through symlinked folders too (rglob does
    not enter them), each real folder once (a link back up is no cycle); how many sample
    grids of fastflow runs (``RUN_GRIDS`` in a folder holding a ``RUN_MARKERS`` file) were
    left out; the other image files (``OTHER_IMAGE_SUFFIXES``, not read) counted by
    suffix; the folders that could not be listed (say, no read permission), each with its
    error. A dangling link stays, to be counted unreadable; a FIFO or device named .png is
    no file (never opened)."""
    files, seen, grids, others, unlisted = [], set(), 0, {}, []
    for root, dirs, names in os.walk(path, followlinks=True,
                                     onerror=lambda e: unlisted.append(f"{e.filename} ({e.strerror})")):
        real = os.path.realpath(root)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        run = any(n in names for n in RUN_MARKERS)
        for n in names:
            suffix = Path(n).suffix.lower()
            if suffix in OTHER_IMAGE_SUFFIXES:
                others[suffix] = others.get(suffix, 0) + 1
            if suffix not in IMAGE_SUFFIXES:
                continue
            if run and RUN_GRIDS.fullmatch(n):
                grids += 1
            else:
                files.append(Path(root, n))
    return sorted(p for p in files if p.is_file() or not p.exists()), grids, others, unlisted


def _center_crop_resize_pil(img, size: int):
    from PIL import Image

    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img if side == size else img.resize((size, size), Image.Resampling.BICUBIC)


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10's python batches hold: dicts, lists, bytes, str, ints and
    numpy uint8 arrays. Any other global (os.system, builtins.eval...) is refused, so a
    planted file cannot run code."""

    def find_class(self, module, name):
        import numpy as np

        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
            ("_codecs", "encode"): _latin1_encode,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a "
                                         "CIFAR-10 batch")
        return allowed[(module, name)]


def _np_reconstruct(cls, shape, dtype):
    import numpy as np

    if cls is not np.ndarray:
        raise pickle.UnpicklingError("only plain numpy arrays are allowed")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _latin1_encode(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("only latin1 bytes are allowed")
    return text.encode("latin1")


def read_cifar_batch(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 python batch file -> (levels uint8 (N, 3, 32, 32), labels (N,))."""
    import numpy as np

    path = Path(path)
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise _data_error(f"{path} is not a CIFAR-10 python batch: {err}") from None
    if not isinstance(batch, dict):
        raise _data_error(f"{path}: expected a dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32 or not isinstance(labels, list) \
            or len(labels) != data.shape[0]:
        raise _data_error(f"{path}: expected 'data' uint8 (N, 3072) and N 'labels'")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.as_tensor(labels, dtype=torch.int64)


def _load_cifar(root: Path):
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
    missing = [str(p) for p in train_files + [folder / "test_batch"] if not p.is_file()]
    if missing:
        raise _data_error(f"cifar10:{root}: missing {', '.join(missing)} (the python "
                          "version of CIFAR-10, extracted; nothing is downloaded)")
    parts = [read_cifar_batch(p) for p in train_files]
    train = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return train, read_cifar_batch(folder / "test_batch")


def _resize_levels(levels: torch.Tensor, n_bins: int, size: int) -> torch.Tensor:
    """Center crop to a square, then resize (antialiased bilinear) and round back to levels."""
    h, w = levels.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    levels = levels[:, :, top:top + side, left:left + side]
    if side == size:
        return levels.contiguous()
    out = []
    for chunk in levels.split(4096):
        x = F.interpolate(chunk.float(), size=(size, size), mode="bilinear",
                          align_corners=False, antialias=size < side)
        out.append(x.round_().clamp_(0, n_bins - 1).to(torch.uint8))
    return torch.cat(out)


def load_image_sets(source: str = "digits", *, size: int | None = None,
                    n_bits: int | None = None, test_fraction: float = 0.1,
                    seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """(train, test) integer images from ``--data``: ``digits``, a folder of PNG/JPEG images
    (recursive), an ``.npy``/``.npz`` uint8 array (N, H, W), (N, H, W, C) or (N, C, H, W)
    (C in 1, 3, 4; an array both 4-D readings fit is refused: see ``_to_nchw_uint8``), or
    ``cifar10:ROOT`` (the python batches; its test batch is the held-out split). Other
    sources hold out ``test_fraction`` of the images. ``size`` center-crops and resizes;
    ``n_bits`` keeps the top bits of 8-bit images (Glow's 5-bit setting)."""
    if n_bits is not None and not 1 <= n_bits <= 8:
        raise ValueError(f"--n-bits: expected an integer in 1..8, got {n_bits}")
    labels_train = labels_test = None
    if source == "digits":
        images, labels = load_digits()
        levels, n_bins = torch.round(images * DIGITS_MAX).to(torch.uint8), DIGIT_LEVELS
        if n_bits is not None:  # to 8-bit first, so --n-bits means what it says
            levels, n_bins = torch.round(levels.float() * (255 / DIGITS_MAX)).to(torch.uint8), 256
        train_idx, test_idx = split_indices(len(levels), 0.2, seed)
        train, test = levels[train_idx], levels[test_idx]
        labels_train, labels_test = labels[train_idx], labels[test_idx]
    else:
        n_bins = 256
        if source.startswith("cifar10:"):
            (train, labels_train), (test, labels_test) = _load_cifar(Path(source[8:]).expanduser())
        else:
            path = Path(source).expanduser()  # cifar10:~/x and --data=~/x: the shell leaves ~
            if path.is_dir():
                levels = _load_folder(path, size)
            elif path.is_file() and path.suffix.lower() in (".npy", ".npz"):
                levels = _load_array(path)
            else:
                why = ("a file, not a folder or an .npy/.npz array" if path.exists()
                       else "not found")
                raise _data_error(f"expected 'digits', a folder of images, an .npy/.npz file "
                                  f"or cifar10:ROOT, got {source!r} ({why})")
            if len(levels) < 2:
                raise _data_error(f"{source}: need at least 2 images (train and held-out), "
                                  f"got {len(levels)}")
            train_idx, test_idx = split_indices(len(levels), test_fraction, seed)
            if len(test_idx) == 0:
                train_idx, test_idx = train_idx[1:], train_idx[:1]
            if len(train_idx) == 0:
                raise ValueError(f"--test-fraction: expected a share that leaves training "
                                 f"images, got {test_fraction} of {len(levels)} images")
            train, test = levels[train_idx], levels[test_idx]
    if size is not None:
        train = _resize_levels(train, n_bins, size)
        test = _resize_levels(test, n_bins, size)
    if n_bits is not None and n_bins == 256:
        shift = 8 - n_bits
        train, test, n_bins = train >> shift, test >> shift, 2 ** n_bits
    return (ImageSet(train.contiguous(), n_bins, labels_train),
            ImageSet(test.contiguous(), n_bins, labels_test))


def dequantize(levels: torch.Tensor, n_bins: int, noise: torch.Tensor | None) -> torch.Tensor:
    """Glow's input: levels / n_bins - 0.5 plus uniform ``noise`` in [0, 1) / n_bins."""
    x = levels.float() / n_bins - 0.5
    return x if noise is None else x + noise / n_bins


# ---------------------------------------------------------------------------------------
# A deterministic digit classifier: how many generated 8x8 images look like digits.

_CLASSIFIER = None


def digit_classifier():
    """Logistic regression on all 1797 bundled digits (pixels in [0, 1]); deterministic.
    On the held-out 20 % a classifier fitted on the rest is >= 0.8 confident on ~78 % of
    real digits and on ~5 % of per-pixel Gaussian noise with the digits' mean and std."""
    global _CLASSIFIER
    if _CLASSIFIER is None:
        from sklearn.datasets import load_digits as _load
        from sklearn.linear_model import LogisticRegression

        from threadpoolctl import threadpool_limits  # a scikit-learn dependency

        bunch = _load()
        with threadpool_limits(1):  # a small fit: threads only contend (~1 s on one core)
            _CLASSIFIER = LogisticRegression(C=1.0, max_iter=5000).fit(
                bunch.images.reshape(len(bunch.images), -1) / DIGITS_MAX, bunch.target)
    return _CLASSIFIER


def digit_score(images: torch.Tensor, confidence: float = 0.8) -> dict:
    """``images`` (N, 1, H, W) in [0, 1] (resized to 8x8 when needed): the fraction the
    digit classifier labels with probability >= ``confidence`` and how many classes those
    cover (real digits: ~0.9 and 10)."""
    images = images.detach().float().cpu()
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images: expected (N, 1, H, W), got {tuple(images.shape)}")
    finite = torch.isfinite(images).flatten(1).all(1).numpy()  # NaN samples: not recognised
    images = torch.nan_to_num(images, 0.0, 0.0, 0.0).clamp(0, 1)
    if images.shape[-2:] != (8, 8):
        images = F.interpolate(images, size=(8, 8), mode="area")
    proba = digit_classifier().predict_proba(images.reshape(len(images), -1).double().numpy())
    sure = (proba.max(1) >= confidence) & finite
    classes = sorted({int(c) for c in proba.argmax(1)[sure]})
    return {"recognised": float(sure.mean()), "classes": len(classes),
            "confidence": confidence, "n": len(images)}
