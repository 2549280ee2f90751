"""``--data`` corners a user with their own images meets: a run's own sample grids inside
the image folder, an .npz of several image arrays, one image saved as an array."""

import numpy as np
import pytest

from fastflow import data


def _png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_skips_the_sample_grids_of_a_run_inside_it(tmp_path, capsys):
    """Run from the image folder (`--data .`), a command writes its grids to runs/<name>/
    under it: the next run read them as training images (and --size cropped them to fit)."""
    rng = np.random.default_rng(0)
    for i in range(4):
        _png(tmp_path / f"img{i}.png", rng.integers(0, 256, (8, 8, 3), np.uint8))
    run = tmp_path / "runs" / "glow"
    for name in ("samples_before.png", "samples_epoch001.png", "samples.png"):
        _png(run / name, rng.integers(0, 256, (30, 50, 3), np.uint8))
    (run / "checkpoint.pt").write_bytes(b"")
    _png(tmp_path / "runs" / "vae" / "vae_samples.png", np.zeros((30, 50, 3), np.uint8))
    (tmp_path / "runs" / "vae" / "metrics.json").write_text("{}")
    _png(tmp_path / "mine" / "samples.png", rng.integers(0, 256, (8, 8, 3), np.uint8))
    train, test = data.load_image_sets(str(tmp_path), size=8, test_fraction=0.2)
    assert len(train) + len(test) == 5  # img0..3 and mine/samples.png (no run beside it)
    said = capsys.readouterr().out
    assert "--data: skipped 4 sample grid(s) of fastflow runs under" in said


def test_an_npz_of_several_image_arrays_is_refused_naming_them(tmp_path):
    """np.savez(path, x_train=..., x_test=...): the first member was read and the others
    dropped without a word (here half the images)."""
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "split.npz", x_train=rng.integers(0, 256, (6, 8, 8, 3), np.uint8),
             x_test=rng.integers(0, 256, (4, 8, 8, 3), np.uint8), y=np.arange(10))
    with pytest.raises(ValueError, match=r"--data: .*split\.npz holds several image arrays "
                                         r"\('x_train', 'x_test'\)"):
        data.load_image_sets(str(tmp_path / "split.npz"))


def test_an_npz_of_unnamed_image_arrays_says_what_it_leaves_out(tmp_path, capsys):
    """np.savez(path, train, test) names them arr_0 and arr_1: arr_0 is read (the README's
    rule), and arr_1 was dropped without a word."""
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 256, (6, 8, 8), np.uint8), rng.integers(0, 256, (4, 8, 8), np.uint8)
    np.savez(tmp_path / "two.npz", a, b, np.arange(10))
    train, test = data.load_image_sets(str(tmp_path / "two.npz"), test_fraction=0.5)
    assert len(train) + len(test) == 6
    assert "left out its other image array(s) ['arr_1']" in capsys.readouterr().out
    np.savez(tmp_path / "one.npz", a, np.arange(10))  # labels beside the images: nothing said
    data.load_image_sets(str(tmp_path / "one.npz"), test_fraction=0.5)
    assert "left out" not in capsys.readouterr().out


def test_an_npz_of_labels_then_images_reads_the_images(tmp_path, capsys):
    """np.savez(path, labels, images): arr_0 (the labels) was read by name and refused as
    "expected uint8 images, got dtype int64" although the images were beside it."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (6, 8, 8), np.uint8)
    np.savez(tmp_path / "li.npz", np.arange(6), images)
    train, test = data.load_image_sets(str(tmp_path / "li.npz"), test_fraction=0.5)
    assert len(train) + len(test) == 6
    got = np.sort(np.concatenate([train.levels.numpy(), test.levels.numpy()]).reshape(6, -1), 0)
    assert np.array_equal(got, np.sort(images.reshape(6, -1), 0))
    assert "left out" not in capsys.readouterr().out
    np.savez(tmp_path / "named.npz", x=np.arange(6), images=images)  # a named x: its own error
    with pytest.raises(ValueError, match=r"array 'x' .*expected uint8 images, got dtype int64"):
        data.load_image_sets(str(tmp_path / "named.npz"))


def test_an_npz_member_named_images_is_read_beside_other_image_arrays(tmp_path, capsys):
    """np.savez(path, images=..., masks=...): ``images`` is read by name and the other is
    said to be left out (without the name, two image arrays are refused as ambiguous)."""
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (6, 8, 8), np.uint8)
    np.savez(tmp_path / "im.npz", masks=np.zeros((4, 8, 8), np.uint8), images=images)
    train, test = data.load_image_sets(str(tmp_path / "im.npz"), test_fraction=0.5)
    assert len(train) + len(test) == 6
    assert "left out its other image array(s) ['masks']" in capsys.readouterr().out


def test_one_image_saved_as_an_array_is_refused_naming_both_readings(tmp_path):
    """np.save(path, one (H, W, 3) image) was read as H grey images of W x 3 pixels (and
    --size then trained on their 3x3 centres); a grey stack of such narrow images can be
    saved (N, H, W, 1)."""
    one = np.random.default_rng(2).integers(0, 256, (8, 8, 3), np.uint8)
    np.save(tmp_path / "one.npy", one)
    with pytest.raises(ValueError, match=r"--data: .*one\.npy: shape \(8, 8, 3\) reads as 8 "
                                         r"grey images of 8x3 .* or one 8x8 image of 3 channel"):
        data.load_image_sets(str(tmp_path / "one.npy"), size=4)
    np.save(tmp_path / "stack.npy", np.stack([one, one[::-1]]))  # images stacked: (N, H, W, C)
    assert data.load_image_sets(str(tmp_path / "stack.npy"))[0].shape == (3, 8, 8)
    np.save(tmp_path / "square.npy", one[:, :3, :3].copy())  # (N, 3, 3) grey: as before
    assert data.load_image_sets(str(tmp_path / "square.npy"))[0].shape == (1, 3, 3)


def test_image_folder_says_when_transparency_is_dropped(tmp_path, capsys):
    """Alpha is dropped (as torchvision's loader does): the colours stored under transparent
    pixels, which a viewer does not show, are what is trained on; that went unsaid."""
    from PIL import Image

    rgba = np.full((8, 8, 4), 255, np.uint8)
    rgba[:4, :, 3] = 0  # transparent top half, its stored colour white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(np.full((8, 8, 4), 200, np.uint8) | 255, "RGBA").save(tmp_path / "b.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "c.png")
    train, test = data.load_image_sets(str(tmp_path), test_fraction=0.3)
    levels = data.torch.cat([train.levels, test.levels])
    assert levels.shape == (3, 3, 8, 8) and int(levels.max()) == 255  # the white kept
    said = capsys.readouterr().out
    assert "--data: 1 image(s) under" in said and "transparent pixels" in said


def test_image_folder_says_which_image_files_it_does_not_read(tmp_path, capsys):
    """Only PNG and JPEG are read: the WebP/BMP/TIFF/GIF images of a mixed folder were left
    out without a word."""
    from PIL import Image

    for i, suffix in enumerate([".png", ".jpg", ".webp", ".bmp", ".BMP"]):
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(tmp_path / f"{i}{suffix}")
    train, test = data.load_image_sets(str(tmp_path), test_fraction=0.5)
    assert len(train) + len(test) == 2
    assert f"--data: left out 3 image file(s) under {tmp_path} of types it does not read " \
           "(.bmp: 2, .webp: 1); convert them to PNG" in capsys.readouterr().out


def test_image_folder_says_which_folders_it_could_not_list(tmp_path, capsys, monkeypatch):
    """A subfolder that cannot be listed (no read permission) was skipped without a word:
    its images were left out of training."""
    import os

    rng = np.random.default_rng(4)
    for sub in ("ok", "locked"):
        _png(tmp_path / sub / "a.png", rng.integers(0, 256, (8, 8), np.uint8))
        _png(tmp_path / sub / "b.png", rng.integers(0, 256, (8, 8), np.uint8))
    scandir = os.scandir

    def refusing(folder="."):  # what a folder without read permission gives (root reads all)
        if os.fspath(folder).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(folder))
        return scandir(folder)

    monkeypatch.setattr(os, "scandir", refusing)
    train, test = data.load_image_sets(str(tmp_path), test_fraction=0.5)
    assert len(train) + len(test) == 2
    assert (f"--data: could not list 1 folder(s) under {tmp_path}, so the images in them are "
            f"left out: {tmp_path / 'locked'} (Permission denied)") in capsys.readouterr().out


def test_image_folder_counts_the_folders_it_could_not_list(tmp_path, capsys, monkeypatch):
    """Several unlisted folders: one is named, the others counted."""
    import os
    import re

    for sub in ("ok", "locked1", "locked2", "locked3"):
        _png(tmp_path / sub / "a.png", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "ok" / "b.png", np.ones((8, 8), np.uint8))
    scandir = os.scandir

    def refusing(folder="."):
        if "locked" in os.path.basename(os.fspath(folder)):
            raise PermissionError(13, "Permission denied", os.fspath(folder))
        return scandir(folder)

    monkeypatch.setattr(os, "scandir", refusing)
    train, test = data.load_image_sets(str(tmp_path), test_fraction=0.5)
    assert len(train) + len(test) == 2
    assert re.search(rf"--data: could not list 3 folder\(s\) under {re.escape(str(tmp_path))}, "
                     r"so the images in them are left out: \S+locked\d \(Permission denied\) "
                     r"and 2 more\n", capsys.readouterr().out)


def test_image_folder_says_when_grey_images_become_rgb(tmp_path, capsys):
    """One colour image among grey ones makes every image RGB (the grey repeated), the
    model 3 channels wide: that was said only as the shape in the command's summary."""
    for i in range(3):
        _png(tmp_path / f"grey{i}.png", np.full((8, 8), 40 * i, np.uint8))
    _png(tmp_path / "colour.png", np.zeros((8, 8, 3), np.uint8))
    train, _ = data.load_image_sets(str(tmp_path), test_fraction=0.25)
    assert train.shape == (3, 8, 8)
    assert f"--data: 1 of the 4 images under {tmp_path} is in colour: the 3 grey one(s) are " \
           "read as RGB (their grey repeated)" in capsys.readouterr().out


def test_16_bit_grey_pngs_keep_their_top_8_bits_as_older_pillow_opens_them(tmp_path,
                                                                          monkeypatch):
    """Pillow before 10.3 opens a 16-bit grey PNG as mode I (32-bit), not I;16: convert("L")
    clipped every value above 255 to white. Simulated by that Pillow's mode table entry."""
    from PIL import Image, PngImagePlugin

    if (16, 0) not in getattr(PngImagePlugin, "_MODES", {}):
        pytest.skip("this Pillow has no PNG mode table to simulate an older one with")
    grey = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8) * 2
    for i, image in enumerate(grey):
        Image.fromarray(image.astype(np.uint16) * 257).save(tmp_path / f"img{i}.png")
    monkeypatch.setitem(PngImagePlugin._MODES, (16, 0), ("I", "I;16B"))
    with Image.open(tmp_path / "img0.png") as img:
        assert img.mode == "I"
    train, test = data.load_image_sets(str(tmp_path), test_fraction=0.5)
    both = data.torch.cat([train.levels, test.levels])
    assert sorted(both.flatten().tolist()) == sorted(grey.flatten().tolist())


@pytest.mark.parametrize("shape", [(4, 8, 8, 4), (4, 4, 8, 8)])
def test_an_array_of_four_channels_says_its_fourth_is_dropped(tmp_path, capsys, shape):
    """RGBA (or RGB plus anything) arrays lose their 4th channel: that went unsaid."""
    x = np.random.default_rng(3).integers(0, 256, shape, np.uint8)
    np.save(tmp_path / "rgba.npy", x)
    train, test = data.load_image_sets(str(tmp_path / "rgba.npy"), test_fraction=0.25)
    assert train.shape == (3, 8, 8)
    assert "4 channels: the 4th (alpha) is dropped, the first 3 read as RGB" in \
        capsys.readouterr().out
