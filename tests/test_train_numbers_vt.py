"""The test numbers train-vae and train-tarflow report, against a hand computation in float64
over the whole held-out split with the saved checkpoint: the VAE's -ELBO per image (recon
summed over the pixels, the KL over the latents), TarFlow's nats per dimension (C*H*W) of the
noisy [-1, 1] images. Both evaluations draw noise (one posterior sample, one noise draw per
image), so the recon / nll are compared within a few standard errors of the Monte Carlo
estimate; the KL is exact. metrics.csv's last row must hold metrics.json's numbers."""

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastflow.cli import train_tarflow, train_vae
from fastflow.data import load_image_sets
from fastflow.tarflow import TarFlow
from fastflow.vae import ConvVAE

DRAWS = 16


def _run(main, out, *extra):
    argv = ["--epochs", "1", "--max-steps", "3", "--batch-size", "256", "--out", str(out),
            "--no-progress", *extra]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    cfg = metrics["config"]
    _, test = load_image_sets(cfg["data"], size=cfg["size"], n_bits=cfg["n_bits"],
                              test_fraction=cfg["test_fraction"], seed=cfg["seed"])
    with open(out / "metrics.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]
    reported = metrics["history"]["epochs"][-1]["test"]
    for key, value in reported.items():  # the CSV holds the JSON's numbers
        assert math.isclose(float(row[f"test_{key}"]), value, rel_tol=1e-12), key
    return metrics, state, test, reported


def _close(draws, reported, name):
    """``draws`` (DRAWS, N) per-image values: their mean against the one-draw ``reported``
    mean, within 6 standard errors of a one-draw mean over the N images."""
    want = draws.mean().item()
    se = draws.std(dim=1).mean().item() / math.sqrt(draws.shape[1])
    assert abs(reported - want) <= 6 * se + 1e-6, (name, reported, want, se)


def test_train_vae_reports_the_elbo_per_image_of_the_whole_test_split(tmp_path, capsys):
    _, state, test, got = _run(train_vae.main, tmp_path, "--hidden", "8", "--latent", "4")
    # what the number is: the Bernoulli of grey levels is no likelihood of the levels
    assert ("test -ELBO: nats per image (one posterior sample each), recon summed over the "
            "C*H*W pixels (a Bernoulli cross-entropy with levels / 16, not a likelihood of the "
            "17 levels) + KL") in capsys.readouterr().out
    model = ConvVAE(latent=4, channels=1, size=8, hidden=8).double()
    model.load_state_dict(state["model"])
    x = test.levels.double() / (test.n_bins - 1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        mu, logvar = model.encoder(x).chunk(2, dim=1)
        kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1)
        recon = []
        for _ in range(DRAWS):
            z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=gen,
                                                       dtype=torch.float64)
            logits = model.decoder(z)
            recon.append(-(x * F.logsigmoid(logits)
                           + (1 - x) * F.logsigmoid(-logits)).flatten(1).sum(1))
    assert math.isclose(got["kl"], kl.mean().item(), rel_tol=1e-4, abs_tol=1e-6)
    _close(torch.stack(recon), got["recon"], "recon")
    assert math.isclose(got["neg_elbo"], got["recon"] + got["kl"], rel_tol=1e-12)


@pytest.mark.parametrize("source", ["digits", "rgb"])
def test_train_tarflow_reports_nats_per_dim_of_the_whole_test_split(tmp_path, source, capsys):
    """Class-conditional on the digits; unconditional on RGB images (an array has no labels),
    where the per-dim denominator counts the 3 channels."""
    data = ["--data", "digits"]
    if source == "rgb":
        images = np.random.default_rng(0).integers(0, 256, (80, 8, 8, 3), dtype=np.uint8)
        np.save(tmp_path / "rgb.npy", images)
        data = ["--data", str(tmp_path / "rgb.npy"), "--test-fraction", "0.5"]
    metrics, state, test, got = _run(train_tarflow.main, tmp_path / "run", "--channels", "16",
                                     "--blocks", "2", "--head-dim", "8", *data)
    # what the number is: a density in the model's scale, not a discrete likelihood
    printed = capsys.readouterr().out
    labels, bins = ("given their labels ", 17) if source == "digits" else ("", 256)
    assert (f"test nats/dim: -log p per C*H*W of the test images {labels}plus N(0, 0.1^2) "
            f"noise, in the model's [-1, 1] scale (a density: no dequantisation constant, not "
            f"train's bits/dim; + log({bins - 1} / 2) = {math.log((bins - 1) / 2):.3f} gives the "
            f"noisy levels' density)") in printed
    m = metrics["model"]
    model = TarFlow(m["image"][0], m["size"], m["patch_size"], m["channels"], m["blocks"],
                    m["layers"], m["num_classes"], head_dim=m["head_dim"]).double().eval()
    model.load_state_dict(state["model"])
    x = test.levels.double() / (test.n_bins - 1) * 2 - 1
    dims = x[0].numel()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        nll = [-model.log_prob(x + m["noise_std"] * torch.randn(x.shape, generator=gen,
                                                                 dtype=torch.float64),
                               test.labels) / dims for _ in range(DRAWS)]
    _close(torch.stack(nll), got["nll"], "nll")
