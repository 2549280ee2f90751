"""The training commands' data sources (``--data``): digits, an image folder, .npy/.npz
arrays and CIFAR-10's python batches (through a restricted unpickler), and the digit scorer."""

import os
import pickle

import numpy as np
import pytest
import torch

from fastflow import data


def test_digits_source_holds_the_17_levels():
    train, test = data.load_image_sets("digits")
    assert train.levels.dtype == torch.uint8 and train.shape == (1, 8, 8)
    assert train.n_bins == 17 and int(train.levels.max()) == 16
    assert len(train) + len(test) == 1797
    assert torch.equal(train.as_float(), data.digits("train")[0])
    five = data.load_image_sets("digits", n_bits=5)[0]
    assert five.n_bins == 32 and int(five.levels.max()) == 31


def _png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_recursive_skips_unreadable_files(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i in range(5):
        _png(tmp_path / f"sub{i % 2}" / f"img{i}.png", rng.integers(0, 256, (12, 10, 3), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("ignored")
    train, test = data.load_image_sets(str(tmp_path), test_fraction=0.2)
    assert "skipped 1 unreadable" in capsys.readouterr().out
    assert train.shape == (3, 12, 10) and len(train) + len(test) == 5 and train.n_bins == 256
    sized, _ = data.load_image_sets(str(tmp_path), size=8, test_fraction=0.2)
    assert sized.shape == (3, 8, 8) and sized.levels.dtype == torch.uint8


def test_image_folder_follows_symlinked_folders_once(tmp_path):
    """pathlib's rglob does not enter symlinked folders: a folder assembled from links to
    the user's image folders silently lost their images. Links to a folder seen already
    (here a link back to the root, a cycle) add nothing."""
    rng = np.random.default_rng(3)
    for i in range(3):
        _png(tmp_path / "elsewhere" / f"img{i}.png", rng.integers(0, 256, (8, 8), np.uint8))
    _png(tmp_path / "data" / "own.png", rng.integers(0, 256, (8, 8), np.uint8))
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "data" / "loop").symlink_to(tmp_path / "data", target_is_directory=True)
    (tmp_path / "data" / "one.png").symlink_to(tmp_path / "elsewhere" / "img0.png")
    train, test = data.load_image_sets(str(tmp_path / "data"), test_fraction=0.2)
    assert len(train) + len(test) == 5  # own, one.png, linked/img0..2


def test_image_folder_counts_dangling_links_as_unreadable(tmp_path, capsys):
    """A link to an image that is gone (a moved data set) is an unreadable file: it was
    dropped from the listing without the count the other unreadable files get."""
    for i in range(2):
        _png(tmp_path / f"img{i}.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "gone.png").symlink_to(tmp_path / "moved" / "gone.png")
    train, test = data.load_image_sets(str(tmp_path), test_fraction=0.5)
    assert len(train) + len(test) == 2
    assert f"--data: skipped 1 unreadable image file(s) in {tmp_path}" in capsys.readouterr().out


def test_image_folder_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="--data: no readable"):
        data.load_image_sets(str(tmp_path))
    _png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "b.png", np.zeros((6, 8), np.uint8))
    with pytest.raises(ValueError, match="--size"):
        data.load_image_sets(str(tmp_path))
    assert data.load_image_sets(str(tmp_path), size=4)[0].shape == (1, 4, 4)
    with pytest.raises(ValueError, match="--data"):
        data.load_image_sets(str(tmp_path / "missing"))
    # a file that is there but no array: it used to be called "not found"
    with pytest.raises(ValueError, match=r"--data: .*a\.png'? \(a file, not a folder or an "
                                         r"\.npy/\.npz array\)"):
        data.load_image_sets(str(tmp_path / "a.png"))
    with pytest.raises(ValueError, match=r"missing'? \(not found\)"):
        data.load_image_sets(str(tmp_path / "missing"))


def test_arrays_npy_and_npz(tmp_path):
    grey = np.arange(10 * 8 * 8, dtype=np.uint8).reshape(10, 8, 8)
    np.save(tmp_path / "grey.npy", grey)
    train, test = data.load_image_sets(str(tmp_path / "grey.npy"), test_fraction=0.2)
    assert train.shape == (1, 8, 8) and len(train) == 8 and len(test) == 2
    both = torch.cat([train.levels, test.levels])
    assert sorted(both.flatten().tolist()) == sorted(grey.flatten().tolist())
    rgb = np.random.default_rng(1).integers(0, 256, (6, 16, 16, 3), np.uint8)
    np.savez(tmp_path / "rgb.npz", images=rgb)
    train, _ = data.load_image_sets(str(tmp_path / "rgb.npz"), n_bits=5, test_fraction=0.2)
    assert train.shape == (3, 16, 16) and train.n_bins == 32 and int(train.levels.max()) < 32
    np.save(tmp_path / "bad.npy", np.zeros((4, 8), np.uint8))
    with pytest.raises(ValueError, match=r"--data: .*\(N, H, W\)"):
        data.load_image_sets(str(tmp_path / "bad.npy"))
    np.save(tmp_path / "float.npy", np.zeros((4, 8, 8), np.float32))
    with pytest.raises(ValueError, match="--data: .*uint8"):
        data.load_image_sets(str(tmp_path / "float.npy"))


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_an_npz_of_labels_and_images_loads_its_one_image_array(tmp_path, save):
    """No member named x, images or arr_0: the one uint8 array of 3 or 4 dimensions is the
    images (the first member, the labels, was taken and refused as 'int64, expected uint8'),
    found from the members' headers."""
    imgs = np.random.default_rng(2).integers(0, 256, (5, 8, 8, 3), np.uint8)
    save(tmp_path / "pairs.npz", labels=np.arange(5), imgs=imgs)
    train, test = data.load_image_sets(str(tmp_path / "pairs.npz"), test_fraction=0.2)
    assert train.shape == (3, 8, 8) and len(train) + len(test) == 5
    got = torch.cat([train.levels, test.levels]).permute(0, 2, 3, 1).reshape(5, -1)
    assert sorted(map(tuple, got.tolist())) == sorted(
        map(tuple, torch.from_numpy(imgs).reshape(5, -1).tolist()))


def test_an_npz_member_that_cannot_be_read_names_the_file(tmp_path):
    """An object array (or a damaged member) in an .npz fails when the member is read, after
    the guarded np.load: the error named neither --data nor the file."""
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}] * 3, dtype=object))
    with pytest.raises(ValueError, match=r"--data: cannot read .*objects\.npz.*'x'"):
        data.load_image_sets(str(tmp_path / "objects.npz"))


def test_an_npz_error_names_the_array_it_read(tmp_path):
    """With several arrays, none named x/images/arr_0 and no single uint8 image array, the
    first is read: its shape error used to name only the file, not which array (here the
    labels) it had picked."""
    np.savez(tmp_path / "two.npz", labels=np.zeros(10, np.uint8),
             pictures=np.zeros((10, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"two\.npz: array 'labels' of \['labels', 'pictures'\]: "
                                         r"expected images shaped"):
        data.load_image_sets(str(tmp_path / "two.npz"))


def _cifar_tree(root, n=3):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": b"x", b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"data": rng.integers(0, 256, (n, 3072), np.uint8),
                 b"filenames": [b"a.png"] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)  # the format the real files use
    return folder


def test_cifar10_python_batches(tmp_path):
    folder = _cifar_tree(tmp_path)
    train, test = data.load_image_sets(f"cifar10:{tmp_path}")
    assert train.shape == (3, 32, 32) and len(train) == 15 and len(test) == 3
    assert train.labels.shape == (15,) and train.n_bins == 256
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f)[b"data"]
    assert torch.equal(test.levels, torch.from_numpy(raw.reshape(3, 3, 32, 32)))
    small, _ = data.load_image_sets(f"cifar10:{folder}", size=16, n_bits=5)
    assert small.shape == (3, 16, 16) and small.n_bins == 32
    (folder / "data_batch_5").unlink()
    with pytest.raises(ValueError, match="--data: cifar10.*data_batch_5"):
        data.load_image_sets(f"cifar10:{tmp_path}")


def test_a_home_relative_data_path_is_expanded(tmp_path, monkeypatch):
    """The shell leaves the ~ of cifar10:~/... alone (it is not at a word's start), and the
    path was used as given: 'missing ~/.../data_batch_1' for data that is there."""
    monkeypatch.setenv("HOME", str(tmp_path))
    _cifar_tree(tmp_path / "datasets")
    train, test = data.load_image_sets("cifar10:~/datasets")
    assert len(train) == 15 and len(test) == 3
    np.save(tmp_path / "grey.npy", np.zeros((4, 8, 8), np.uint8))
    assert len(data.load_image_sets("~/grey.npy", test_fraction=0.25)[0]) == 3


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_unpickler_refuses_planted_code(tmp_path):
    folder = _cifar_tree(tmp_path)
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": _Planted(marker), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="--data: .*data_batch_2.*not allowed"):
        data.load_image_sets(f"cifar10:{tmp_path}")
    assert not marker.exists()
    with open(folder / "data_batch_3", "wb") as f:  # plain pickle.load would run this one
        pickle.dump(_Planted(marker), f, protocol=2)
    with pytest.raises(ValueError, match="not allowed"):
        data.read_cifar_batch(folder / "data_batch_3")
    assert not marker.exists()


def test_digit_score_tells_digits_from_noise():
    real = data.digits("test")[0]
    good = data.digit_score(real)
    assert good["recognised"] > 0.8 and good["classes"] == 10
    noise = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert data.digit_score(noise)["recognised"] < 0.3
    big = data.digit_score(torch.nn.functional.interpolate(real, size=16, mode="nearest"))
    assert big["recognised"] > 0.8


def test_a_test_fraction_that_leaves_no_training_images_names_the_option(tmp_path):
    np.save(tmp_path / "ten.npy", np.zeros((10, 8, 8), np.uint8))
    # 0.96 of 10 rounds to all 10 held out: the trainer used to blame --batch-size instead
    with pytest.raises(ValueError, match=r"--test-fraction: .*0\.96.* 10 images"):
        data.load_image_sets(str(tmp_path / "ten.npy"), test_fraction=0.96)
    train, test = data.load_image_sets(str(tmp_path / "ten.npy"), test_fraction=0.9)
    assert (len(train), len(test)) == (1, 9)


def test_image_folder_16_bit_grey_pngs_keep_their_top_8_bits(tmp_path):
    from PIL import Image

    grey = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8) * 2
    for i, image in enumerate(grey):  # 16-bit PNGs (mode I;16) of the same levels
        Image.fromarray(image.astype(np.uint16) * 257).save(tmp_path / f"img{i}.png")
    train, test = data.load_image_sets(str(tmp_path), test_fraction=0.5)
    # convert("L") clipped every 16-bit value above 255 to white
    both = torch.cat([train.levels, test.levels])
    assert both.shape == (2, 1, 8, 8) and train.n_bins == 256
    assert sorted(both.flatten().tolist()) == sorted(grey.flatten().tolist())
    sized, _ = data.load_image_sets(str(tmp_path), size=4, test_fraction=0.5)
    assert sized.shape == (1, 4, 4) and 0 < int(sized.levels.max()) < 255


def test_image_folder_with_grey_and_colour_images_stays_in_colour(tmp_path):
    """The first file's mode used to decide for the whole folder: one grey image sorted
    first turned every colour image grey (pure red came back as level 76)."""
    _png(tmp_path / "a_grey.png", np.full((8, 8), 200, np.uint8))
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    for i in range(3):
        _png(tmp_path / f"b{i}.png", red)
    train, test = data.load_image_sets(str(tmp_path), test_fraction=0.25)
    both = torch.cat([train.levels, test.levels])
    assert both.shape == (4, 3, 8, 8)
    colours = sorted({tuple(px) for px in both.permute(0, 2, 3, 1).reshape(-1, 3).tolist()})
    assert colours == [(200, 200, 200), (255, 0, 0)]


def test_image_folder_applies_the_exif_orientation(tmp_path):
    """A camera JPEG stored landscape with EXIF orientation 6 (shown rotated 90 degrees
    clockwise) is read as every viewer shows it: portrait, its white half on top."""
    from PIL import Image

    stored = np.zeros((8, 16, 3), np.uint8)
    stored[:, :8] = 255  # left half white, as stored
    for i in range(2):
        img = Image.fromarray(stored)
        exif = img.getexif()
        exif[0x0112] = 6
        img.save(tmp_path / f"photo{i}.JPG", exif=exif, quality=100)
    train, _ = data.load_image_sets(str(tmp_path), test_fraction=0.5)
    assert train.shape == (3, 16, 8)
    grey = train.levels[0].float().mean(0)
    assert grey[:8].mean() > 250 and grey[8:].mean() < 5
