"""The Glow training command and the command-line entry point."""

import json
import subprocess
import sys

import pytest
import torch

from fastflow import __main__ as cli
from fastflow.cli import train


def _run(tmp_path, *extra):
    argv = ["--epochs", "2", "--max-steps", "12", "--batch-size", "32", "--n-flow", "2",
            "--filter-size", "16", "--out", str(tmp_path), "--no-progress", *extra]
    assert train.main(argv) == 0
    return json.loads((tmp_path / "metrics.json").read_text())["history"]


def test_glow_training_improves_bits_per_dim_and_writes_its_files(tmp_path):
    history = _run(tmp_path, "--lr", "3e-3", "--epochs", "1")
    assert history["epochs"][-1]["step"] == 12
    assert history["epochs"][-1]["test"]["bpd"] < history["initial"]["bpd"] - 0.2
    for name in ("checkpoint.pt", "metrics.json", "glow_samples.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_glow_training_resumes_from_its_checkpoint(tmp_path):
    first = _run(tmp_path, "--max-steps", "6", "--epochs", "1")
    assert first["epochs"][-1]["step"] == 6
    resumed = _run(tmp_path, "--resume")
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2]
    assert resumed["epochs"][0] == first["epochs"][0]
    assert resumed["initial"] == first["initial"]
    with pytest.raises(SystemExit, match="--resume"):
        _run(tmp_path, "--resume", "--filter-size", "8")


def test_glow_input_dequantises_the_digit_levels():
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3)
    y = train.glow_input(x, torch.Generator().manual_seed(0))
    levels = torch.tensor([0.0, 8.0, 16.0])
    lo = levels / train.DIGIT_LEVELS - 0.5
    assert torch.all(y.flatten() >= lo) and torch.all(y.flatten() < lo + 1 / train.DIGIT_LEVELS)


def test_cli_lists_commands_and_rejects_unknown(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "bench", "train", "train-vae"):
        assert name in out
    assert cli.main(["fly"]) == 2


def test_module_entry_point_runs_a_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastflow", "train", "--max-steps", "2",
                          "--epochs", "1", "--n-flow", "1", "--filter-size", "8",
                          "--out", str(tmp_path), "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "bits/dim" in out.stdout
