"""The training commands as a user runs them: what a run writes and says it wrote, failed
writes (a full disk), interrupts, an --out holding another run, and the help texts."""

import errno
import math
import re
from pathlib import Path

import pytest
import torch

from fastflow.cli import common, train, train_tarflow, train_vae

# 1438 training digits at batch 512: 2 steps an epoch
GLOW = ["--n-flow", "1", "--n-block", "1", "--filter-size", "8", "--batch-size", "512",
        "--no-progress", "--threads", "1"]
VAE = ["--hidden", "8", "--latent", "4", "--batch-size", "512", "--no-progress"]
TARFLOW = ["--channels", "16", "--blocks", "1", "--head-dim", "8", "--batch-size", "512",
           "--no-progress"]


def _written(printed: str) -> list[str]:
    """The lines of the Glow summary's 'wrote:' list (paths, and the per-epoch grids as
    'FIRST .. LAST-NAME (n per-epoch grids)')."""
    return [line.strip() for line in printed.split("wrote:\n")[-1].splitlines()
            if line.startswith("  ")]


def _written_paths(printed: str) -> list[str]:
    """``_written`` with a range of grids as its first and last paths."""
    paths = []
    for line in _written(printed):
        grids = re.fullmatch(r"(.+) \.\. (\S+) \(\d+ per-epoch grids\)", line)
        paths += [grids[1], str(Path(grids[1]).parent / grids[2])] if grids else [line]
    return paths


def test_a_fresh_run_over_an_earlier_one_lists_and_keeps_only_its_own_grids(tmp_path,
                                                                          capsys):
    """A --force run over a longer earlier one listed that run's last grid
    (samples_epoch003.png) as written and left its grids beside its own."""
    assert train.main([*GLOW, "--epochs", "3", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "samples_epoch003.png").is_file()
    # all three of its per-epoch grids, not the last alone
    assert (f"{tmp_path / 'samples_epoch001.png'} .. samples_epoch003.png (3 per-epoch grids)"
            in _written(capsys.readouterr().out))
    assert train.main([*GLOW, "--epochs", "1", "--out", str(tmp_path), "--force"]) == 0
    printed = capsys.readouterr().out
    written = _written(printed)
    assert str(tmp_path / "samples_epoch001.png") in written
    assert not any("samples_epoch003" in p for p in written)
    assert sorted(p.name for p in tmp_path.glob("samples_epoch*.png")) == \
        ["samples_epoch001.png"]
    assert ("removed 3 sample grid(s) of an earlier run in "
            f"{tmp_path} (samples_epoch001.png .. samples_epoch003.png)") in printed
    for path in written:  # everything listed is on disk
        assert (tmp_path / path).is_file(), path


@pytest.mark.parametrize("command, tiny, stop_at", [
    (train, GLOW, "its first evaluation"), (train_vae, VAE, "its first step"),
    (train_tarflow, TARFLOW, "its first step")], ids=["train", "train-vae", "train-tarflow"])
def test_a_fresh_run_stopped_before_its_first_checkpoint_leaves_none_of_the_earlier_run(
        command, tiny, stop_at, tmp_path, capsys, monkeypatch):
    """A --force run stopped before its first checkpoint (Ctrl-C in its first evaluation or
    step) said 'checkpoint.pt (its last checkpoint) is intact: --resume goes on from it' of
    the earlier run's, and --resume went on with that run."""
    from fastflow.cli.loop import StepRunner

    assert command.main([*tiny, "--max-steps", "1", "--out", str(tmp_path)]) == 0
    capsys.readouterr()

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    if stop_at == "its first evaluation":
        monkeypatch.setattr(train, "evaluate_bpd", stop)
    else:
        monkeypatch.setattr(StepRunner, "step", stop)
    assert command.main([*tiny, "--max-steps", "1", "--out", str(tmp_path), "--force"]) == 130
    printed = capsys.readouterr()
    assert (f"--out: removed the earlier run's checkpoint.pt, metrics.json, metrics.csv in "
            f"{tmp_path}: this run starts afresh") in printed.out
    assert f"no checkpoint was written yet in {tmp_path}" in printed.err
    assert not any(tmp_path.glob("*.pt")) and not any(tmp_path.glob("metrics.*"))


def test_a_resumed_run_that_trains_no_more_lists_no_checkpoint_or_grid(tmp_path, capsys):
    """--resume at the --max-steps already reached writes no checkpoint and no epoch grid:
    the summary listed the earlier run's as written by it."""
    assert train.main([*GLOW, "--epochs", "1", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert train.main([*GLOW, "--epochs", "1", "--out", str(tmp_path), "--resume"]) == 0
    written = _written(capsys.readouterr().out)
    assert written == [str(tmp_path / n) for n in ("samples.png", "metrics.json",
                                                    "metrics.csv")]


def test_a_resumed_run_keeps_the_grids_of_its_earlier_epochs(tmp_path, capsys):
    """Only a fresh start removes an earlier run's epoch grids: --resume goes on with the
    same run, whose grids of the epochs before stay beside the new ones."""
    assert train.main([*GLOW, "--epochs", "1", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert train.main([*GLOW, "--epochs", "2", "--out", str(tmp_path), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "removed" not in printed
    assert sorted(p.name for p in tmp_path.glob("samples_epoch*.png")) == \
        ["samples_epoch001.png", "samples_epoch002.png"]


def test_torch_saves_runtime_error_is_one_line_and_removes_the_temporary(tmp_path):
    """torch.save reports a failed write (a full disk) as a RuntimeError ('unexpected pos
    64 vs 0'), not an OSError: one line naming the file too, the earlier one kept."""
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 1}, path)

    def failing(tmp):
        tmp.write_bytes(b"PK\x03\x04 half")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter "
                           "failed writing file data/0: file write failed\nunexpected pos 64 vs 0")

    with pytest.raises(SystemExit) as exit_:
        common.write_atomic(path, failing)
    message = str(exit_.value.code)
    assert message.startswith(f"--out: cannot write {path} (the earlier one is kept): "), message
    assert "\n" not in message
    assert not list(tmp_path.glob("*.tmp"))
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def _full_disk_after(monkeypatch, n_ok: int):
    """torch.save writes ``n_ok`` files, then fails as on a full disk (half a file left)."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) > n_ok:
            with open(f, "wb") as handle:
                handle.write(b"PK\x03\x04 half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("command, tiny", [(train, GLOW), (train_vae, VAE),
                                           (train_tarflow, TARFLOW)],
                         ids=["train", "train-vae", "train-tarflow"])
def test_a_full_disk_is_one_line_and_keeps_the_earlier_checkpoint(command, tiny, tmp_path,
                                                                  monkeypatch):
    """The second epoch's checkpoint write failed with a traceback and left
    checkpoint.pt.tmp behind."""
    _full_disk_after(monkeypatch, 1)
    with pytest.raises(SystemExit) as exit_:
        command.main([*tiny, "--epochs", "2", "--out", str(tmp_path)])
    message = str(exit_.value.code)
    assert message.startswith(f"--out: cannot write {tmp_path / 'checkpoint.pt'} (the earlier "
                              "one is kept): No space left on device"), message
    assert not list(tmp_path.glob("*.tmp"))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_an_interrupted_write_leaves_the_earlier_file_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    common.write_json(path, {"a": 1})

    def interrupted(tmp):
        tmp.write_text('{"a": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        common.write_atomic(path, interrupted)
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(SystemExit, match=r"^--out: cannot write .*samples\.png: No such file"):
        common.save_image_grid(tmp_path / "gone" / "samples.png", [torch.zeros(1, 1, 2, 2)])


@pytest.mark.parametrize("first", ["train-tarflow", "train-vae"])
def test_train_tarflow_does_not_overwrite_another_run_without_force(first, tmp_path, capsys):
    """train-tarflow started afresh over any OUT/checkpoint.pt without a word: a TarFlow
    run's, or another command's (a VAE's), was silently replaced; now refused as train and
    train-vae refuse it, and --force starts over."""
    runs = {"train-tarflow": (train_tarflow, TARFLOW), "train-vae": (train_vae, VAE)}
    module, tiny = runs[first]
    assert module.main([*tiny, "--max-steps", "1", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"^--out: .*checkpoint\.pt exists; pass --resume to "
                                         "continue it or --force"):
        train_tarflow.main([*TARFLOW, "--max-steps", "1", "--out", str(tmp_path)])
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert train_tarflow.main([*TARFLOW, "--max-steps", "1", "--out", str(tmp_path),
                               "--force"]) == 0
    assert "num_classes" in torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]


def _option_blocks(text: str) -> dict[str, str]:
    """``--help``'s options, each with its help text (the lines after it, joined)."""
    blocks, name = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            name = line.split()[0].rstrip(",")
            blocks[name] = line
        elif name and line.startswith("     "):
            blocks[name] += " " + line.strip()
        else:
            name = None
    return blocks


@pytest.mark.parametrize("command", ["train", "train-vae", "train-tarflow", "demo", "bench"])
def test_every_option_of_every_command_shows_its_default_in_help(command, capsys):
    """train-vae's --latent and --likelihood and train-tarflow's --patch-size had no help
    text, so their defaults were not shown; bench showed none of its defaults (--reps,
    --warmup, --suites) and named itself 'fastflow bench', which is not a command."""
    from fastflow import __main__ as cli

    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m fastflow {command} ")
    blocks = _option_blocks(out)
    assert len(blocks) > 5
    missing = [name for name, text in blocks.items()
               if name != "-h" and "(default:" not in text]
    assert not missing, missing


@pytest.mark.parametrize("command", ["train", "train-vae", "train-tarflow"])
@pytest.mark.parametrize("value", ["18446744073709551615", "-9223372036854775809",
                                   str(2 ** 62 + 1)])
def test_a_seed_out_of_range_is_refused_naming_seed(command, value, tmp_path, capsys):
    """A seed past torch's generators' range (or within reach of it once the commands add
    their offsets) was a ValueError traceback ('Overflow when unpacking long long') or a
    line that did not say which option."""
    from fastflow import __main__ as cli

    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--seed", value, "--max-steps", "1", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert (f"argument --seed: expected an integer from -2**62 to 2**62, got {value}"
            in capsys.readouterr().err)
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("command", ["train", "train-vae", "train-tarflow", "demo"])
def test_an_empty_out_is_refused_not_the_current_folder(command, tmp_path, monkeypatch):
    """--out '' is Path(''), the current folder: the run wrote its checkpoint, grids and
    metrics there."""
    from fastflow import __main__ as cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"^--out: expected a folder, got ''$"):
        cli.main([command, "--out", "", "--max-steps", "1"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, tiny, changed, message", [
    (train, GLOW, ["--n-flow", "2", "--no-lu"],
     "--n-flow 1, got 2; --no-lu (conv_lu True, got False)"),
    (train, GLOW, ["--size", "16", "--n-bits", "3"],
     "--data/--size (image [1, 8, 8], got [1, 16, 16]); --n-bits (n_bins 17, got 8)"),
    (train_vae, VAE, ["--latent", "2"], "--latent 4, got 2"),
    (train_tarflow, TARFLOW, ["--unconditional"], "--unconditional/--data (num_classes 10, got 0)"),
], ids=["train-model", "train-data", "train-vae", "train-tarflow"])
def test_resume_with_other_model_options_names_them(command, tiny, changed, message, tmp_path):
    """The refusal printed the two config dicts whole, naming no option."""
    assert command.main([*tiny, "--max-steps", "1", "--out", str(tmp_path)]) == 0
    with pytest.raises(SystemExit) as exit_:
        command.main([*tiny, *changed, "--max-steps", "2", "--out", str(tmp_path),
                      "--resume"])
    text = str(exit_.value.code)
    assert text.startswith(f"--resume: {tmp_path / 'checkpoint.pt'} was trained with other "
                           f"options: {message} (pass the checkpoint's values"), text


def test_resume_says_when_warmup_clip_or_hflip_change(tmp_path, capsys):
    """train --resume took another --warmup, --clip or --hflip without a word (the learning
    rate schedule, clipping and augmentation of the rest of the run changed silently)."""
    assert train.main([*GLOW, "--max-steps", "1", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert train.main([*GLOW, "--max-steps", "2", "--out", str(tmp_path), "--resume",
                       "--warmup", "0", "--clip", "1.5", "--hflip"]) == 0
    printed = capsys.readouterr().out
    for text in ("--warmup: using 0 (the checkpoint's run had 100)",
                 "--clip: using 1.5 (the checkpoint's run had None)",
                 "--hflip: using True (the checkpoint's run had False)"):
        assert text in printed, text
    assert train.main([*GLOW, "--max-steps", "3", "--out", str(tmp_path), "--resume",
                       "--warmup", "0", "--clip", "1.5", "--hflip"]) == 0
    assert "the checkpoint's run had" not in capsys.readouterr().out


def test_resume_at_an_epochs_end_says_when_the_batch_size_changes(tmp_path, capsys):
    """train --resume at an epoch boundary took another --batch-size without a word (other
    steps per epoch from then on; mid-epoch it is refused)."""
    assert train.main([*GLOW, "--epochs", "1", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert train.main([*GLOW, "--epochs", "2", "--out", str(tmp_path), "--resume",
                       "--batch-size", "256"]) == 0
    assert ("--batch-size: using 256 (the checkpoint's run had 512)"
            in capsys.readouterr().out)
    metrics = (tmp_path / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[:2] for row in metrics[1:]] == [["1", "2"], ["2", "7"]]


@pytest.mark.parametrize("command, tiny", [(train, GLOW), (train_vae, VAE)],
                         ids=["train", "train-vae"])
def test_a_resume_that_has_nothing_left_to_train_says_so(command, tiny, tmp_path, capsys):
    """A --resume whose checkpoint already reached --epochs or --max-steps (an --epochs
    raised with the last run's --max-steps left on) trained nothing, and its summary read
    as a finished run's."""
    assert command.main([*tiny, "--epochs", "1", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert command.main([*tiny, "--epochs", "1", "--out", str(tmp_path), "--resume"]) == 0
    assert re.search(r"--resume: nothing to train: the checkpoint is at epoch 1, step \d+, "
                     r"which reaches --epochs 1 \(pass a larger value to go on\)",
                     capsys.readouterr().out)
    assert command.main([*tiny, "--epochs", "3", "--max-steps", "2", "--out", str(tmp_path),
                         "--resume"]) == 0
    assert "which reaches --max-steps 2 (pass" in capsys.readouterr().out
    assert command.main([*tiny, "--epochs", "2", "--out", str(tmp_path), "--resume"]) == 0
    assert "nothing to train" not in capsys.readouterr().out


def test_nothing_left_names_both_limits_when_both_are_reached():
    """The line for a --resume with nothing to train names every limit it reaches; it
    named the first alone."""
    from argparse import Namespace

    said = []
    common.say_nothing_left(2, 8, Namespace(epochs=2, max_steps=8), said.append)
    common.say_nothing_left(1, 4, Namespace(epochs=2, max_steps=None), said.append)
    assert said == ["--resume: nothing to train: the checkpoint is at epoch 2, step 8, which "
                    "reaches --epochs 2 and --max-steps 8 (pass a larger value to go on)"]


@pytest.mark.parametrize("out, message", [("", "--out: expected a folder, got ''"),
                                          ("file", "--out: cannot create the folder "),
                                          ("file/sub", "--out: cannot create the folder ")])
def test_bench_refuses_an_out_it_cannot_write_before_measuring(out, message, tmp_path,
                                                               monkeypatch, capsys):
    """bench --out over a file measured first, then failed with a FileExistsError
    traceback; --out '' wrote the tables into the current folder."""
    from fastflow import __main__ as cli

    (tmp_path / "file").write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--quick", "--no-timing", "--suites", "gaussian", "--out", out])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err and "saved" not in captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _csv_rows(out, timings: bool = True) -> list[dict]:
    import csv

    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in row.items()
             if timings or k not in ("images_per_s", "seconds")} for row in rows]


def _metrics_match_checkpoint(out):
    """metrics.csv holds the epochs of the checkpoint beside it, no more, no fewer."""
    history = torch.load(out / "checkpoint.pt", weights_only=True)["history"]["epochs"]
    assert [(r["epoch"], r["step"]) for r in _csv_rows(out)] == \
        [(str(e["epoch"]), str(e["step"])) for e in history]


def _resume_ends_as_whole(command, tiny, out, whole, per_epoch):
    """``--resume`` of the interrupted run in ``out`` ends, after 2 epochs, with the step
    count, weights and metrics.csv (but the timings) of the uninterrupted run in
    ``whole``."""
    assert command.main([*tiny, "--epochs", "2", "--out", str(out), "--resume"]) == 0
    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(out / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 2 * per_epoch
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert _csv_rows(out, timings=False) == _csv_rows(whole, timings=False)


@pytest.mark.parametrize("command, tiny, per_epoch", [(train, GLOW, 2), (train_vae, VAE, 3),
                                                      (train_tarflow, TARFLOW, 3)],
                         ids=["train", "train-vae", "train-tarflow"])
def test_ctrl_c_says_where_to_resume_from_and_the_resumed_run_matches(command, tiny, per_epoch,
                                                                    tmp_path, monkeypatch,
                                                                    capsys):
    """Ctrl-C in the second epoch was a KeyboardInterrupt traceback; now one line naming the
    intact checkpoint of epoch 1 and exit status 130; --resume from it ends where an
    uninterrupted run ends."""
    from fastflow.cli.loop import StepRunner

    whole = tmp_path / "whole"
    assert command.main([*tiny, "--epochs", "2", "--out", str(whole)]) == 0
    real, calls = StepRunner.step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == per_epoch + 1:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    out = tmp_path / "cut"
    with monkeypatch.context() as patch:
        patch.setattr(StepRunner, "step", step)
        capsys.readouterr()
        assert command.main([*tiny, "--epochs", "2", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"interrupted: {out / 'checkpoint.pt'} (its last checkpoint) is intact: --resume" \
        in err and "Traceback" not in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    _metrics_match_checkpoint(out)  # the run had written none: it was stopped before its end
    _resume_ends_as_whole(command, tiny, out, whole, per_epoch)


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command, tiny, per_epoch", [(train, GLOW, 2), (train_vae, VAE, 3),
                                                      (train_tarflow, TARFLOW, 3)],
                         ids=["train", "train-vae", "train-tarflow"])
def test_a_signal_mid_epoch_saves_the_step_under_way_and_resume_matches(command, tiny,
                                                                       per_epoch, signum,
                                                                       tmp_path, monkeypatch,
                                                                       capsys):
    """Ctrl-C or SIGTERM in the second epoch lost the steps of that epoch: the checkpoint
    was epoch 1's. Now the step under way ends and is saved (as a --max-steps stop inside
    an epoch: where in the epoch's order, its sums), the status is still 130 / 143, and
    --resume from it ends where an uninterrupted run ends. The stopped run wrote no
    metrics (metrics.csv lacked the checkpoint's epochs; a resumed run's ended with the
    epoch before it was resumed), no sample grid and no list of what it wrote: it now
    writes and lists them as a run that ends, then stops, and the resumed run's metrics.csv
    is the uninterrupted run's."""
    import os
    import signal

    from fastflow.cli.loop import StepRunner

    whole = tmp_path / "whole"
    assert command.main([*tiny, "--epochs", "2", "--out", str(whole)]) == 0
    real, calls = StepRunner.step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        terms = real(self, *args, **kwargs)
        if len(calls) == per_epoch + 1:
            os.kill(os.getpid(), getattr(signal, signum))
        return terms

    out = tmp_path / "cut"
    # Python's own Ctrl-C handler, whatever this test process was started with (a
    # background job ignores SIGINT)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(StepRunner, "step", step)
            capsys.readouterr()
            status = command.main([*tiny, "--epochs", "2", "--out", str(out)])
        assert status == (130 if signum == "SIGINT" else 143)
        assert len(calls) == per_epoch + 1 and signal.getsignal(signal.SIGINT) == \
            signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    printed, err = capsys.readouterr()
    assert "saving a checkpoint after the step under way" in err and "Traceback" not in err
    assert f"{out / 'checkpoint.pt'} (its last checkpoint) is intact: --resume" in err
    cut = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (cut["epoch"], cut["step"], cut["partial"]["batch"]) == (1, per_epoch + 1, 1)
    _metrics_match_checkpoint(out)
    assert f"stopped: {per_epoch + 1} steps" in printed
    listed = (_written_paths(printed) if command is train else
              printed.split("; wrote ")[-1].strip().split(", "))
    picture = {train: "samples.png", train_vae: "vae_samples.png",
               train_tarflow: "tarflow_samples.png"}[command]
    assert {str(out / n) for n in (picture, "checkpoint.pt", "metrics.json",
                                   "metrics.csv")} <= set(listed)
    assert all((out / p).is_file() for p in listed), listed
    _resume_ends_as_whole(command, tiny, out, whole, per_epoch)


def test_ctrl_c_before_any_checkpoint_says_so(tmp_path, monkeypatch, capsys):
    from fastflow.cli.loop import StepRunner

    def step(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(StepRunner, "step", step)
    assert train_vae.main([*VAE, "--out", str(tmp_path)]) == 130
    assert f"interrupted: no checkpoint was written yet in {tmp_path}" in capsys.readouterr().err


@pytest.mark.parametrize("command, tiny, picture", [(train_vae, VAE, "vae_samples.png"),
                                                    (train_tarflow, TARFLOW,
                                                     "tarflow_samples.png")],
                         ids=["train-vae", "train-tarflow"])
def test_the_summary_names_the_checkpoint_only_when_this_run_wrote_it(command, tiny, picture,
                                                                      tmp_path, capsys):
    """--resume with nothing left to train (--max-steps reached) said it wrote the
    checkpoint, which it left as it was."""
    assert command.main([*tiny, "--max-steps", "1", "--out", str(tmp_path)]) == 0
    ckpt = tmp_path / "checkpoint.pt"
    assert f"wrote {tmp_path / picture}, {ckpt}, {tmp_path / 'metrics.json'}" \
        in capsys.readouterr().out
    before = ckpt.stat().st_mtime_ns
    assert command.main([*tiny, "--max-steps", "1", "--out", str(tmp_path), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / picture}, {tmp_path / 'metrics.json'}" in printed
    assert str(ckpt) not in printed.split("wrote")[-1]
    assert ckpt.stat().st_mtime_ns == before


@pytest.mark.parametrize("command, tiny, terms", [(train_vae, VAE, ("neg_elbo", "recon", "kl")),
                                                  (train_tarflow, TARFLOW, ("nll",))],
                         ids=["train-vae", "train-tarflow"])
def test_metrics_csv_has_a_row_per_epoch_and_a_resume_appends(command, tiny, terms, tmp_path,
                                                              capsys):
    """train-vae and train-tarflow wrote no metrics.csv (train did): one row per epoch, the
    columns of train's rows in each command's terms, the earlier epochs kept by --resume,
    and the file in the summary's list."""
    import csv

    def rows():
        with open(tmp_path / "metrics.csv", newline="") as f:
            return list(csv.DictReader(f))

    assert command.main([*tiny, "--epochs", "1", "--out", str(tmp_path)]) == 0
    assert f"{tmp_path / 'metrics.json'}, {tmp_path / 'metrics.csv'}" in capsys.readouterr().out
    first = rows()
    assert command.main([*tiny, "--epochs", "2", "--out", str(tmp_path), "--resume"]) == 0
    both = rows()
    assert [r["epoch"] for r in both] == ["1", "2"] and both[0] == first[0]
    assert list(both[0]) == ["epoch", "step", *(f"train_{t}" for t in terms),
                             *(f"test_{t}" for t in terms), "skipped_steps", "lr",
                             "images_per_s", "seconds"]
    for row in both:
        assert int(row["skipped_steps"]) == 0 and float(row["lr"]) == 2e-3
        assert all(math.isfinite(float(v)) for k, v in row.items() if k != "epoch")
    assert int(both[1]["step"]) == 2 * int(both[0]["step"])


@pytest.mark.parametrize("command, tiny", [(train, GLOW), (train_vae, VAE),
                                           (train_tarflow, TARFLOW)],
                         ids=["train", "train-vae", "train-tarflow"])
def test_sigterm_stops_like_ctrl_c_and_removes_a_half_written_checkpoint(command, tiny, tmp_path,
                                                                        monkeypatch, capsys):
    """SIGTERM (a scheduler's stop) killed the process on the spot: during a checkpoint
    write it left checkpoint.pt.tmp, and it said nothing. It now stops as Ctrl-C does, with
    status 143, and the handler before the run is back after it (all three training
    commands)."""
    import os
    import signal

    real = torch.save
    before = signal.getsignal(signal.SIGTERM)

    def save(obj, f, *args, **kwargs):  # the second checkpoint: SIGTERM half-way through
        real(obj, f, *args, **kwargs)
        if (tmp_path / "checkpoint.pt").exists():
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(torch, "save", save)
    assert command.main([*tiny, "--epochs", "3", "--out", str(tmp_path)]) == 143
    err = capsys.readouterr().err
    assert f"terminated: {tmp_path / 'checkpoint.pt'} (its last checkpoint) is intact" in err
    assert not list(tmp_path.glob("*.tmp"))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert signal.getsignal(signal.SIGTERM) == before


def test_demo_stops_with_the_training_when_it_is_interrupted(tmp_path, monkeypatch, capsys):
    """demo went on after an interrupted training run: it read the metrics.json of an
    earlier run (or none: FileNotFoundError) and summarised it as this run's."""
    import json

    from fastflow.cli import demo
    from fastflow.cli.loop import StepRunner

    glow = tmp_path / "glow"
    glow.mkdir()
    (glow / "metrics.json").write_text(json.dumps({"stale": True}))

    def step(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(StepRunner, "step", step)
    assert demo.main(["--skip-bench", "--out", str(tmp_path), "--epochs", "1"]) == 130
    assert "digit classifier recognises" not in capsys.readouterr().out
    assert json.loads((glow / "metrics.json").read_text()) == {"stale": True}


def test_a_second_signal_stops_at_once_and_several_processes_stop_as_before(capsys):
    """The first Ctrl-C between steps is noted and the step goes on; a second raises at
    once (a hung step can still be stopped); not enabled (torchrun's processes, which
    could stop a step apart and wait for ever on each other), the first one raises. The
    note said a second one stopped 'without' the metrics and samples only, but it also
    stops the evaluation that comes before the checkpoint."""
    import os
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as an interactive run
    try:
        with common.stop_between_steps() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.pending is KeyboardInterrupt
            assert "(again to stop at once, without what is not written yet)" in \
                capsys.readouterr().err
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):
            with common.stop_between_steps(enabled=False):
                os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(common.Terminated):
            stop.pending = common.Terminated
            stop.raise_pending()
        # started ignoring SIGINT (nohup, a script's background job): it stays ignored
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with common.stop_between_steps() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.pending is None
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("command", [train_vae, train_tarflow], ids=["train-vae", "train-tarflow"])
def test_vae_and_tarflow_refuse_torchrun_naming_the_one_command_that_runs_on_it(
        command, tmp_path, monkeypatch):
    """torchrun -m fastflow train-vae (or train-tarflow) started N processes that each
    trained the whole model alone and all wrote the same checkpoint, grid and metrics (only
    train has DistributedDataParallel): now refused before anything is written."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="expected one process, got WORLD_SIZE 2 .*only "
                                         "train runs on several processes"):
        command.main(["--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [train_vae, train_tarflow], ids=["vae", "tarflow"])
def test_resume_with_eval_every_reports_the_test_number_of_the_whole_run(command, tmp_path,
                                                                         small_npz):
    """As train's bits/dim: the evaluation noise came from a generator every evaluation
    advanced, so a run stopped at an epoch --eval-every skips (its last epoch evaluates)
    and resumed reported another test number than the uninterrupted run (on the digits:
    42.642 vs 42.674 nats, 1.2057 vs 1.2068 nats/dim), its training the same."""
    import json

    opts = [*(VAE if command is train_vae else TARFLOW), "--data", small_npz, "--batch-size",
            "32", "--eval-every", "2"]
    assert command.main([*opts, "--epochs", "2", "--out", str(tmp_path / "a")]) == 0
    assert command.main([*opts, "--epochs", "1", "--out", str(tmp_path / "b")]) == 0
    assert command.main([*opts, "--epochs", "2", "--out", str(tmp_path / "b"), "--resume"]) == 0
    whole, resumed = (json.loads((tmp_path / r / "metrics.json").read_text())["history"]
                      for r in "ab")
    assert whole["epochs"][0]["test"] is None and resumed["epochs"][0]["test"] is not None
    assert resumed["epochs"][1]["train"] == whole["epochs"][1]["train"]
    assert resumed["epochs"][1]["test"] == whole["epochs"][1]["test"]
