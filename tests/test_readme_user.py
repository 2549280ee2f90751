"""What a new user reading the README meets on the command line: help texts and messages
that say what the command does with the user's data."""

import numpy as np
import pytest


def _n_bits_help(command, capsys) -> str:
    from fastflow import __main__ as cli

    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text, block = capsys.readouterr().out.splitlines(), []
    for line in text:
        if block and not line.startswith("     "):
            break
        if block or line.startswith("  --n-bits"):
            block.append(line.strip())
    return " ".join(block)


@pytest.mark.parametrize("command", ["train-vae", "train-tarflow"])
def test_n_bits_help_names_no_bits_per_dim_where_none_is_reported(command, capsys):
    """--n-bits said 'the bits/dim constant follows' in train-vae (which reports the -ELBO
    in nats per image) and train-tarflow (nats/dim, no dequantisation constant)."""
    text = _n_bits_help(command, capsys)
    assert "top N bits" in text and "2**N levels" in text
    assert "bits/dim" not in text


def test_n_bits_help_of_train_keeps_its_bits_per_dim_constant(capsys):
    assert "the bits/dim constant follows" in _n_bits_help("train", capsys)


def test_tarflow_on_an_npz_with_labels_says_they_are_not_read(tmp_path, capsys):
    """np.savez(f, images=..., labels=...): train-tarflow said the file 'has no class
    labels' and trained unconditional, with no word that fastflow does not read them."""
    from fastflow.cli import train_tarflow

    rng = np.random.default_rng(0)
    path = tmp_path / "labelled.npz"
    np.savez(path, images=rng.integers(0, 256, (10, 4, 4), dtype=np.uint8),
             labels=rng.integers(0, 10, 10))
    argv = ["--data", str(path), "--max-steps", "1", "--batch-size", "8", "--channels", "8",
            "--blocks", "1", "--head-dim", "8", "--no-progress", "--device", "cpu",
            "--out", str(tmp_path / "run")]
    assert train_tarflow.main(argv) == 0
    out = capsys.readouterr().out
    assert "training unconditional" in out
    assert "none are read from a folder or an array file" in out
