"""``train-vae`` and ``train-tarflow`` on ``--data`` sources other than the digits (an .npz
array, a folder of PNGs), their errors, ``--precision`` and ``--resume`` across sources."""

import json
import re

import numpy as np
import pytest
import torch

from fastflow.cli import train_tarflow, train_vae

TINY = {
    "vae": (train_vae, ["--hidden", "8", "--latent", "4"]),
    "tarflow": (train_tarflow, ["--channels", "16", "--blocks", "2", "--head-dim", "8"]),
}


def _images(n, seed=0, channels=3):
    rng = np.random.default_rng(seed)
    shape = (n, 8, 8, channels) if channels > 1 else (n, 8, 8)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


@pytest.fixture
def rgb_npz(tmp_path):
    path = tmp_path / "rgb.npz"
    np.savez(path, x=_images(20))
    return path


@pytest.fixture
def png_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "pngs"
    (folder / "sub").mkdir(parents=True)
    for i, img in enumerate(_images(12, seed=1)):
        Image.fromarray(img).save(folder / ("sub" if i % 2 else "") / f"{i}.png")
    return folder


def _run(command, out, *extra):
    module, tiny = TINY[command]
    argv = ["--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--no-progress",
            "--device", "cpu", "--out", str(out), *tiny, *extra]
    assert module.main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("command", ["vae", "tarflow"])
@pytest.mark.parametrize("source", ["rgb_npz", "png_folder"])
def test_trains_on_an_array_and_a_folder_of_rgb_images(command, source, tmp_path, capsys,
                                                       request):
    data = request.getfixturevalue(source)
    out = tmp_path / "run"
    metrics = _run(command, out, "--data", str(data))
    assert metrics["model"]["image"] == [3, 8, 8] and metrics["model"]["n_bins"] == 256
    entry = metrics["history"]["epochs"][-1]
    assert entry["step"] == 2 and entry["skipped"] == 0
    picture = "vae_samples.png" if command == "vae" else "tarflow_samples.png"
    for name in ("checkpoint.pt", "metrics.json", picture):
        assert (out / name).stat().st_size > 0, name
    weights = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    if command == "vae":  # the first and last convolutions see the data's 3 channels
        assert weights["encoder.0.weight"].shape[1] == 3
        assert weights["decoder.5.weight"].shape[0] == 3
    else:  # 2x2 patches of 3 channels: 16 tokens of 12 values
        assert metrics["sampling"]["tokens"] == 16
        assert weights["blocks.0.proj_in.weight"].shape[1] == 12
    printed = capsys.readouterr().out
    assert f"from {data}" in printed and "3x8x8" in printed
    if command == "tarflow":  # no labels in an array or a folder: unconditional, said once
        assert printed.count("has no class labels; training unconditional") == 1
        assert metrics["model"]["num_classes"] == 0 and "unconditional" in printed


def test_tarflow_on_the_digits_stays_class_conditional(tmp_path, capsys):
    metrics = _run("tarflow", tmp_path)
    assert metrics["model"]["num_classes"] == 10 and metrics["model"]["image"] == [1, 8, 8]
    assert "no class labels" not in capsys.readouterr().out


@pytest.mark.parametrize("command", ["vae", "tarflow"])
def test_images_become_floats_a_batch_at_a_time(command, tmp_path, float_conversions):
    # train-vae and train-tarflow made floats of the whole training set up front (4x its
    # uint8 size: 600 MB for CIFAR-10) where train converts per batch; the first step's loss
    # is still the one of its batch converted alone
    from fastflow import data
    from fastflow.tarflow import TarFlow
    from fastflow.vae import ConvVAE

    metrics = _run(command, tmp_path, "--max-steps", "1", "--batch-size", "32")
    converted = float_conversions
    assert converted and max(converted) <= 256, converted  # the evaluation's batches
    train, _ = data.load_image_sets("digits", seed=0)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:32]
    x = train.levels[idx].float() / 16
    torch.manual_seed(0)
    with torch.no_grad():
        if command == "vae":
            loss = ConvVAE(channels=1, size=8, latent=4, hidden=8).loss(x)["loss"]
        else:
            model = TarFlow(1, 8, 2, 16, 2, 1, 10, head_dim=8, noise_std=0.1)
            loss = train_tarflow.nll_per_dim(model, 2 * x - 1, train.labels[idx], 0.1,
                                             torch.Generator().manual_seed(1))
    assert metrics["history"]["epochs"][0]["train"][CLOSE[command][0]] == float(loss)


def test_channels_first_arrays_are_read_channels_first(tmp_path):
    from fastflow.data import load_image_sets

    last = _images(10)  # (10, 8, 8, 3)
    for i, x in enumerate([last, last[..., :1]]):
        first = x.transpose(0, 3, 1, 2)  # (N, C, H, W) as a PyTorch user saves it
        np.save(tmp_path / f"first{i}.npy", first)
        # (10, 3, 8, 8) was refused; (10, 1, 8, 8) was read as 8 channels... refused too
        train, test = load_image_sets(str(tmp_path / f"first{i}.npy"), test_fraction=0.2)
        assert train.shape == first.shape[1:]
        got = torch.cat([train.levels, test.levels]).sort(0).values
        assert torch.equal(got, torch.from_numpy(first).sort(0).values)
    # channels-last arrays whose height is not 1, 3 or 4 read as before
    np.save(tmp_path / "last.npy", last[:, :, :3])
    assert load_image_sets(str(tmp_path / "last.npy"))[0].shape == (3, 8, 3)


# each was read channels-last, silently: a channels-first (6, 3, 8, 4) as 3x8 RGBA images
@pytest.mark.parametrize("shape", [(6, 3, 8, 4), (6, 1, 4, 4), (6, 4, 8, 3), (6, 3, 3, 3)])
def test_arrays_both_layouts_fit_are_refused_naming_both(tmp_path, shape):
    from fastflow.data import load_image_sets

    path = tmp_path / "both.npy"
    np.save(path, np.zeros(shape, np.uint8))
    n, a, b, c = shape
    with pytest.raises(ValueError, match=rf"^--data: .*both\.npy: shape {re.escape(str(shape))}"
                                         rf" reads two ways: channels-last \(N, H, W, C\) as "
                                         rf"{c} channel\(s\) of {a}x{b} images, or channels-"
                                         rf"first \(N, C, H, W\) as {a} channel\(s\) of "
                                         rf"{b}x{c} images; save it transposed to \(N, H, W, C\)"):
        load_image_sets(str(path))


def test_an_ambiguous_array_is_refused_by_the_training_commands(tmp_path):
    path = tmp_path / "both.npz"
    np.savez(path, x=np.zeros((6, 3, 8, 4), np.uint8))
    with pytest.raises(SystemExit, match=r"^--data: .* reads two ways: channels-last"):
        _run("vae", tmp_path / "vae", "--data", str(path))


@pytest.mark.parametrize("command", ["vae", "tarflow"])
def test_bad_sources_are_refused_naming_data(command, tmp_path):
    with pytest.raises(SystemExit, match=r"^--data: .*\(not found\)"):
        _run(command, tmp_path / "run", "--data", str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SystemExit, match=r"^--data: .*\(a file, not a folder"):
        _run(command, tmp_path / "run", "--data", str(tmp_path / "notes.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"^--data: no readable PNG/JPEG images"):
        _run(command, tmp_path / "run", "--data", str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match=r"^--test-fraction: expected a number in \(0, 1\)"):
        _run(command, tmp_path / "run", "--test-fraction", "1.5")


def test_guidance_without_class_labels_is_refused(tmp_path, rgb_npz):
    # it was ignored silently: the samples were drawn unguided
    with pytest.raises(SystemExit, match=r"^--guidance: expected none with --unconditional "
                                         r".*got --guidance 3$"):
        _run("tarflow", tmp_path, "--unconditional", "--guidance", "3")
    with pytest.raises(SystemExit, match=r"^--guidance: expected none for .*rgb\.npz, which "
                                         r"gives no class labels .*none are read from a folder or "
                                         r"an array file\), got --guidance 2\.5$"):
        _run("tarflow", tmp_path, "--data", str(rgb_npz), "--guidance", "2.5")
    assert _run("tarflow", tmp_path, "--unconditional")["sampling"]["guidance"] == 0.0
    assert _run("tarflow", tmp_path / "labelled")["sampling"]["guidance"] == 1.0
    assert _run("tarflow", tmp_path / "given", "--guidance", "2")["sampling"]["guidance"] == 2.0


def test_odd_or_unsquare_images_are_refused_naming_size(tmp_path):
    path = tmp_path / "odd.npz"
    np.savez(path, x=np.zeros((6, 7, 7), np.uint8))
    with pytest.raises(SystemExit, match=r"^--size: the images are 7x7; the VAE needs"):
        _run("vae", tmp_path / "vae", "--data", str(path))
    np.savez(path, x=np.zeros((6, 8, 6), np.uint8))
    with pytest.raises(SystemExit, match=r"^--size: the images are 8x6; TarFlow needs square"):
        _run("tarflow", tmp_path / "tarflow", "--data", str(path))
    metrics = _run("tarflow", tmp_path / "tarflow", "--data", str(path), "--size", "4")
    assert metrics["model"]["image"] == [1, 4, 4]


# bf16 against fp32 on the digits, 8 steps of 32 (seeds 0-3, measured on CPU): |test
# bf16 - fp32| <= 2.7e-3 nats (VAE -ELBO, which training lowers by ~2 nats in those steps)
# and <= 4e-5 nats/dim (TarFlow, lowered by ~0.14). The tolerances are ~10-25x the measured
# gaps and far below what training moves, so a bf16 step that diverges, stalls or trains
# another model fails; bf16 equal to fp32 to the last bit would mean autocast never ran.
CLOSE = {"vae": ("neg_elbo", 0.03), "tarflow": ("nll", 1e-3)}


@pytest.mark.parametrize("command", ["vae", "tarflow"])
def test_bf16_trains_close_to_fp32_and_fp16_stays_finite(command, tmp_path, capsys):
    key, tol = CLOSE[command]
    runs = {p: _run(command, tmp_path / p, "--precision", p, "--max-steps", "8",
                    "--batch-size", "32", "--force" if command == "vae" else "--no-progress")
            for p in ("fp32", "bf16", "fp16")}
    printed = capsys.readouterr().out
    final = {p: m["history"]["epochs"][-1] for p, m in runs.items()}
    for p, entry in final.items():
        assert entry["step"] == 8
        assert np.isfinite(entry["test"][key]) and np.isfinite(entry["train"][key]), p
        assert f"({p}); wrote" in printed and f", {p}, device" in printed
    assert final["fp32"]["skipped"] == final["bf16"]["skipped"] == 0
    trained = runs["fp32"]["history"]["initial"][key] - final["fp32"]["test"][key]
    assert trained > 10 * tol  # the tolerance is small against what training does
    gap = abs(final["bf16"]["test"][key] - final["fp32"]["test"][key])
    assert 0 < gap < tol, (final["bf16"]["test"][key], final["fp32"]["test"][key])
    assert abs(final["bf16"]["train"][key] - final["fp32"]["train"][key]) < tol


def test_fp16_loss_scale_is_saved_and_resumed(tmp_path, capsys):
    # the VAE's first fp16 steps overflow at the initial scale 2^16: each skip halves it
    # (growth comes after 2000 good steps), so the checkpoint's scale is 2^16 / 2^skipped
    metrics = _run("vae", tmp_path, "--precision", "fp16", "--max-steps", "8",
                   "--batch-size", "32")
    skipped = metrics["history"]["epochs"][-1]["skipped"]
    assert 0 < skipped < 8
    assert f"skipped {skipped} non-finite step(s)" in capsys.readouterr().out
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step_runner"]
    assert state["precision"] == "fp16" and state["scale"].item() == 2.0 ** (16 - skipped)
    # resumed inside the same epoch: a scale started again at 2^16 would skip more steps
    metrics = _run("vae", tmp_path, "--precision", "fp16", "--max-steps", "16",
                   "--batch-size", "32", "--resume")
    entry = metrics["history"]["epochs"][-1]
    assert entry["step"] == 16 and entry["skipped"] == skipped
    assert np.isfinite(entry["test"]["neg_elbo"])
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step_runner"]
    assert state["scale"].item() == 2.0 ** (16 - skipped)


@pytest.mark.parametrize("command", ["vae", "tarflow"])
def test_resume_with_other_data_is_refused(command, tmp_path, rgb_npz):
    force = ["--force"]
    out = tmp_path / "run"
    _run(command, out)  # the digits
    with pytest.raises(SystemExit, match=r"^--resume: .* was trained with"):
        _run(command, out, "--data", str(rgb_npz), "--resume")
    _run(command, out, "--data", str(rgb_npz), *force)
    more = tmp_path / "more.npz"  # the same shape, more images: other ones held out
    np.savez(more, x=_images(24))
    with pytest.raises(SystemExit, match=r"^--data: .* held out its test images from 20 "
                                         r"images; .* now holds 24"):
        _run(command, out, "--data", str(more), "--resume")
    with pytest.raises(SystemExit, match=r"^--seed, --test-fraction: .* held out its test"):
        _run(command, out, "--data", str(rgb_npz), "--resume", "--seed", "1")
    with pytest.raises(SystemExit, match=r"^--resume: .* was trained with"):
        _run(command, out, "--data", str(rgb_npz), "--resume", "--size", "4")
    metrics = _run(command, out, "--data", str(rgb_npz), "--resume", "--max-steps", "3")
    assert metrics["history"]["epochs"][-1]["step"] == 3


@pytest.mark.parametrize("command", ["vae", "tarflow"])
def test_resume_on_other_images_of_the_same_shape_and_count_is_refused(command, tmp_path,
                                                                       rgb_npz):
    # one pixel changed: the same shape, count and split, which resumed silently and went
    # on training on other images than the run's history says
    out = tmp_path / "run"
    _run(command, out, "--data", str(rgb_npz))
    images = np.load(rgb_npz)["x"]
    images[7, 3, 3, 1] ^= 1
    other = tmp_path / "other.npz"
    np.savez(other, x=images)
    with pytest.raises(SystemExit, match=r"^--data: .* was trained on other images than "
                                         r".*other\.npz holds now"):
        _run(command, out, "--data", str(other), "--resume", "--max-steps", "3")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(state["fingerprint"]) == 4
    del state["fingerprint"]  # a checkpoint from before the fingerprint: as given
    torch.save(state, out / "checkpoint.pt")
    metrics = _run(command, out, "--data", str(other), "--resume", "--max-steps", "3")
    assert metrics["history"]["epochs"][-1]["step"] == 3


@pytest.mark.parametrize("command", ["vae", "tarflow"])
def test_resume_without_lr_keeps_the_checkpoints(command, tmp_path, capsys):
    # --lr defaulted to 2e-3, so a resume without it reset the learning rate (with a
    # message) where train keeps the checkpoint's
    assert _run(command, tmp_path, "--max-steps", "1")["config"]["lr"] == 2e-3
    _run(command, tmp_path, "--max-steps", "2", "--resume", "--lr", "1e-3")
    capsys.readouterr()
    metrics = _run(command, tmp_path, "--max-steps", "3", "--resume")
    assert "--lr:" not in capsys.readouterr().out
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert metrics["config"]["lr"] == state["lr"] == 1e-3
    assert [float(g["lr"]) for g in state["optimizer"]["param_groups"]] == [1e-3]
    # a checkpoint from before "lr" was saved: its optimizer's
    del state["lr"]
    torch.save(state, tmp_path / "checkpoint.pt")
    assert _run(command, tmp_path, "--max-steps", "4", "--resume")["config"]["lr"] == 1e-3
    assert "--lr:" not in capsys.readouterr().out
    module, _ = TINY[command]
    parser = module._vae_parser() if command == "vae" else module._parser()
    assert "(None: 0.002, or with --resume the checkpoint's" in \
        " ".join(parser.format_help().split())


@pytest.mark.parametrize("command", ["vae", "tarflow"])
def test_a_checkpoint_from_before_data_and_precision_resumes(command, tmp_path, capsys):
    # made by the unfused Adam/AdamW on the digits, without image/n_bins, split, n_images,
    # step_runner, fingerprint or lr: it resumes on the digits (and a fused step again), not
    # elsewhere
    _run(command, tmp_path, "--max-steps", "1")
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    for key in ("split", "n_images", "step_runner", "fingerprint", "lr"):
        state.pop(key)
    for key in ("image", "n_bins"):
        state["config"].pop(key)
    for group in state["optimizer"]["param_groups"]:
        group.update(fused=None, lr=float(group["lr"]))
    torch.save(state, path)
    # they held out the digits with seed 0 whatever --seed: another seed holds out others
    # (some of them trained on), which resumed silently
    with pytest.raises(SystemExit, match=r"^--seed: .* held out its test images with "
                                         r"\{'seed': 0\}; this run asks for \{'seed': 1\}"):
        _run(command, tmp_path, "--max-steps", "2", "--resume", "--seed", "1")
    metrics = _run(command, tmp_path, "--max-steps", "2", "--resume")
    assert "resumed from" in capsys.readouterr().out
    assert metrics["history"]["epochs"][-1]["step"] == 2
    assert np.isfinite(metrics["history"]["epochs"][-1]["test"][CLOSE[command][0]])
