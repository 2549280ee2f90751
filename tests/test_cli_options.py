"""The options the three training commands share, each doing what it says in each of them:
--warmup, --clip, --threads, --eval-every, --log-every (train-vae and train-tarflow had
none of them: argparse refused them)."""

import csv
import re
import sys

import pytest
import torch

from fastflow.cli import train, train_tarflow, train_vae
from fastflow.cli.loop import StepRunner

# tiny models (as test_cli_runs), each with its own batch: 5, 3 and 3 steps an epoch; one
# thread (two contend on a small model)
RUNS = {"train": (train, ["--n-flow", "1", "--n-block", "1", "--filter-size", "8",
                          "--batch-size", "256", "--threads", "1"], 5),
        "train-vae": (train_vae, ["--hidden", "8", "--latent", "4", "--batch-size", "512",
                                  "--threads", "1"], 3),
        "train-tarflow": (train_tarflow, ["--channels", "16", "--blocks", "1", "--head-dim", "8",
                                          "--batch-size", "512", "--threads", "1"], 3)}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", list(RUNS))
def test_warmup_clip_threads_eval_and_log_cadence_in_every_training_command(
        name, tmp_path, monkeypatch, capsys):
    """One run of 2 whole epochs and 1 step of a third (--max-steps): the learning rate of
    each step, read from the optimizer, rises linearly over --warmup 4 steps; the gradient
    norm after each step is --clip's; --threads reaches torch; --eval-every 2 evaluates
    (and checkpoints) epochs 2 and 3 (the last) only; --log-every 2 prints the progress
    lines of steps 2, 4 and the epoch's last. A --resume with another --warmup says so."""
    command, tiny, per_epoch = RUNS[name]
    lr, clip, max_steps = 1e-3, 1e-3, 2 * per_epoch + 1
    real, lrs, norms, threads = StepRunner.step, [], [], []
    set_threads = torch.set_num_threads

    def step(self, *args, **kwargs):
        terms = real(self, *args, **kwargs)
        lrs.append(float(self.opt.param_groups[0]["lr"]))
        norms.append(float(torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))))
        return terms

    monkeypatch.setattr(StepRunner, "step", step)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (threads.append(n), set_threads(n)))
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # the plain progress lines
    argv = [*tiny, "--epochs", "3", "--max-steps", str(max_steps), "--lr", str(lr),
            "--warmup", "4", "--clip", str(clip), "--eval-every", "2",
            "--log-every", "2", "--out", str(tmp_path)]
    assert command.main(argv) == 0
    assert lrs == pytest.approx([lr * min(1, k / 4) for k in range(1, max_steps + 1)],
                                rel=1e-6)
    assert norms == pytest.approx([clip] * max_steps, rel=1e-4)
    assert threads == [1] and torch.get_num_threads() == 1
    rows = _rows(tmp_path / "metrics.csv")
    test_column = next(k for k in rows[0] if k.startswith("test_"))
    assert [(r["epoch"], r["step"], bool(r[test_column])) for r in rows] == [
        ("1", str(per_epoch), False), ("2", str(2 * per_epoch), True),
        ("3", str(max_steps), True)]
    assert float(rows[0]["lr"]) == pytest.approx(lr * min(1, per_epoch / 4))
    shown = re.findall(r"^epoch (\d)/3 (\d+)/", capsys.readouterr().err, re.M)
    whole = [n for n in range(1, per_epoch + 1) if n % 2 == 0 or n == per_epoch]
    assert shown == [(e, str(n)) for e in "12" for n in whole]  # epoch 3: 1 step, no line
    assert command.main([*argv[:-2], "--warmup", "0", "--max-steps", str(max_steps + 1),
                         "--resume", "--out", str(tmp_path)]) == 0
    assert "--warmup: using 0 (the checkpoint's run had 4)" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["train-vae", "train-tarflow"])
def test_a_negative_warmup_is_refused_naming_it(name, tmp_path):
    command = RUNS[name][0]
    with pytest.raises(SystemExit, match=r"^--warmup: expected a step count >= 0, got -1$"):
        command.main(["--warmup", "-1", "--out", str(tmp_path)])
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("data, fraction, note", [
    ("digits", 0.5, "--test-fraction: 0.5 does not apply to digits, which holds out a fixed 20%"),
    ("digits", 0.2, None), ("digits", 0.1, None)])
def test_a_test_fraction_digits_do_not_use_is_said(data, fraction, note, capsys):
    """--test-fraction 0.5 with the digits held out their fixed 20% without a word (the
    user asked for half)."""
    from argparse import Namespace

    from fastflow.cli import common

    args = Namespace(data=data, size=None, n_bits=None, test_fraction=fraction, seed=0)
    train_set, test_set = common.load_data(args)
    assert len(test_set) == 359  # 20% of 1797, whatever was asked
    printed = capsys.readouterr().out
    assert (note in printed) if note else "--test-fraction" not in printed


@pytest.mark.parametrize("name", list(RUNS))
def test_out_naming_a_file_is_refused_as_not_a_folder(name, tmp_path):
    """--out over a file said 'cannot write to FILE: File exists'."""
    (tmp_path / "file").write_text("keep")
    with pytest.raises(SystemExit, match=r"^--out: expected a folder, got the file .*file$"):
        RUNS[name][0].main(["--max-steps", "1", "--out", str(tmp_path / "file")])
    assert (tmp_path / "file").read_text() == "keep"


def test_glow_resumed_mid_epoch_with_another_seed_is_refused(tmp_path):
    """train draws each epoch's order from --seed, and CIFAR-10 (whose held-out images are
    its test batch) lets --resume take another seed: the rest of an epoch a stop left
    unfinished walked another order, skipping some images and repeating others."""
    from test_data import _cifar_tree

    _cifar_tree(tmp_path / "cifar")  # 15 training images of 3x32x32
    tiny = ["--data", f"cifar10:{tmp_path / 'cifar'}", "--n-flow", "1", "--n-block", "1",
            "--filter-size", "8", "--batch-size", "4", "--n-samples", "2", "--no-progress",
            "--threads", "1",
            "--out", str(tmp_path / "run")]
    assert train.main([*tiny, "--max-steps", "1"]) == 0
    with pytest.raises(SystemExit, match=r"^--seed: .*checkpoint\.pt stopped after batch 1 of "
                                         r"epoch 1 with --seed 0; got 1, "):
        train.main([*tiny, "--max-steps", "2", "--seed", "1", "--resume"])
    assert train.main([*tiny, "--max-steps", "3", "--resume"]) == 0


def test_resume_without_the_checkpoints_precision_says_so(tmp_path, capsys):
    """A bf16 run resumed without --precision went on in fp32 without a word (as --warmup
    and --clip, which train already named)."""
    command, tiny, _ = RUNS["train-vae"]  # train: the same step_options, saved with it
    argv = [*tiny, "--no-progress", "--out", str(tmp_path)]
    assert command.main([*argv, "--max-steps", "1", "--precision", "bf16"]) == 0
    capsys.readouterr()
    assert command.main([*argv, "--max-steps", "1", "--resume"]) == 0
    assert "--precision: using fp32 (the checkpoint's run had bf16)" in capsys.readouterr().out


def test_resume_of_another_commands_checkpoint_says_so(tmp_path):
    """train-tarflow --resume over a train-vae checkpoint listed every option of both
    models, each as 'None, got ...', and never said why."""
    command, tiny, _ = RUNS["train-vae"]
    assert command.main([*tiny, "--no-progress", "--max-steps", "1",
                         "--out", str(tmp_path)]) == 0
    with pytest.raises(SystemExit) as exit_:
        train_tarflow.main(["--resume", "--max-steps", "1", "--out", str(tmp_path)])
    assert str(exit_.value.code) == (
        f"--resume: {tmp_path / 'checkpoint.pt'} holds another kind of model (its options "
        "hidden, latent, likelihood; this command's blocks, channels, head_dim, layers, "
        "noise_std, num_classes, patch_size, size): another training command's checkpoint? "
        "Use a new --out")


def test_an_epoch_resumed_mid_way_counts_all_its_steps_seconds_and_images(tmp_path):
    """train-vae (train_epochs, as train-tarflow) stopped by --max-steps after batch 1 of 3
    and resumed: the epoch's row had the resumed steps' seconds and images/s alone."""
    import json

    command, tiny, _ = RUNS["train-vae"]
    argv = [*tiny, "--epochs", "1", "--no-progress", "--out", str(tmp_path)]
    assert command.main([*argv, "--max-steps", "1"]) == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    stopped = ckpt["history"]["epochs"][-1]
    # a stopped row far longer than a step: only the sum with it passes the check below
    # (the resumed run's two steps alone took longer than the first one's, here too)
    stopped["seconds"] = 1000.0
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    assert command.main([*argv, "--resume"]) == 0
    entry = json.loads((tmp_path / "metrics.json").read_text())["history"]["epochs"][-1]
    assert stopped["step"] == 1 and entry["step"] == 3
    assert 1000 < entry["seconds"] < 1100
    assert abs(entry["images_per_s"] * entry["seconds"] - 1438) < 1e-6  # every image once
