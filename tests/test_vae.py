"""The digits data, the conv VAE on the fused reparameterisation op, and ``train-vae``."""

import json

import pytest
import torch

import fastflow as ff
from fastflow import data
from fastflow.__main__ import main as cli
from fastflow.cli.common import load_checkpoint, save_checkpoint
from fastflow.vae import ConvVAE

from conftest import DEVICE, assert_device_assert_fails


def test_digits_splits_are_deterministic_and_disjoint():
    x_train, y_train = data.digits("train")
    x_test, y_test = data.digits("test")
    assert x_train.shape[1:] == (1, 8, 8) and x_train.dtype == torch.float32
    assert len(x_train) + len(x_test) == 1797 and len(x_test) == round(0.2 * 1797)
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) <= 1.0
    assert float(x_train.max()) == 1.0
    assert torch.equal(x_train, data.digits("train")[0])
    train_idx, test_idx = data.split_indices(1797)
    assert not set(train_idx.tolist()) & set(test_idx.tolist())
    assert set(y_test.tolist()) == set(range(10))
    assert not torch.equal(data.split_indices(1797, seed=1)[1], test_idx)


def test_fit_size_pad_and_resize():
    x, _ = data.digits("test")
    padded = data.fit_size(x, 16, "pad")
    assert padded.shape[1:] == (1, 16, 16)
    assert torch.equal(padded[:, :, 4:12, 4:12], x) and float(padded[:, :, :4].abs().sum()) == 0
    resized = data.digits("test", size=16, channels=3)[0]
    assert resized.shape[1:] == (3, 16, 16)
    assert 0.0 <= float(resized.min()) and float(resized.max()) <= 1.0
    # the mean intensity survives bilinear resizing
    assert abs(float(resized.mean()) - float(x.mean())) < 0.02
    with pytest.raises(ValueError, match="size"):
        data.fit_size(x, 4, "pad")
    with pytest.raises(ValueError, match="mode"):
        data.fit_size(x, 16, "crop")
    with pytest.raises(ValueError, match="split"):
        data.digits("validation")


def test_batches_cover_the_data():
    x = torch.arange(10.0).reshape(10, 1)
    got = torch.cat(list(data.batches(x, 3, generator=torch.Generator().manual_seed(0))))
    assert sorted(got.flatten().tolist()) == list(range(10))
    assert [len(b) for b in data.batches(x, 3, drop_last=True)] == [3, 3, 3]


def test_vae_terms_and_gradients(backend):
    torch.manual_seed(0)
    model = ConvVAE(latent=3, hidden=4).to(DEVICE)
    x = data.digits("test")[0][:5].to(DEVICE)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    recon, kl = model.terms(x, gen())
    assert recon.shape == (5,) and kl.shape == (5,) and bool((kl >= 0).all())
    assert torch.equal(model.elbo(x, gen()), -(recon + kl))
    terms = model.loss(x, gen())
    torch.testing.assert_close(terms["loss"], (recon + kl).mean())
    terms["loss"].backward()
    # the encoder is trained through the fused op (both mu and logvar receive gradients)
    assert float(model.encoder[-1].weight.grad.abs().sum()) > 0
    assert model.sample(4).shape == (4, 1, 8, 8)
    assert model.reconstruct(x).shape == x.shape
    with pytest.raises(ValueError, match="x: expected shape"):
        model.loss(torch.zeros(2, 1, 16, 16, device=DEVICE))
    with pytest.raises(ValueError, match="likelihood"):
        ConvVAE(likelihood="poisson")


def test_gaussian_likelihood_vae_trains_a_step():
    model = ConvVAE(latent=2, hidden=4, likelihood="gaussian")
    x = data.digits("test")[0][:8]
    loss = model.loss(x)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.log_scale.grad is not None


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ConvVAE(latent=2, hidden=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.loss(data.digits("test")[0][:8])["loss"].backward()
    opt.step()
    path = save_checkpoint(tmp_path / "ck" / "checkpoint.pt", model, opt, epoch=3,
                           history=[1.0, 2.0])
    other = ConvVAE(latent=2, hidden=4)
    other_opt = torch.optim.Adam(other.parameters(), lr=1e-3)
    state = load_checkpoint(path, other, other_opt)
    assert state == {"epoch": 3, "history": [1.0, 2.0]}
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert other_opt.state_dict()["state"][0]["step"] == 1
    torch.testing.assert_close(other_opt.state_dict()["state"][0]["exp_avg"],
                               opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(FileNotFoundError, match="path"):
        load_checkpoint(tmp_path / "missing.pt", other)


def test_train_vae_command_improves_elbo_and_resumes(tmp_path, capsys):
    out = tmp_path / "vae"
    args = ["train-vae", "--epochs", "2", "--max-steps", "25", "--batch-size", "32",
            "--out", str(out), "--no-progress", "--device", "cpu"]
    assert cli(args) == 0
    printed = capsys.readouterr().out
    assert "recon" in printed and "KL" in printed and "-ELBO" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert history["epochs"][-1]["step"] == 25
    first = history["initial"]["neg_elbo"]
    last = history["epochs"][-1]["test"]["neg_elbo"]
    assert last < first - 5.0, (first, last)  # the ELBO improves
    for key in ("recon", "kl"):
        assert history["epochs"][-1]["train"][key] >= 0
    assert (out / "vae_samples.png").stat().st_size > 1000
    assert (out / "checkpoint.pt").is_file()
    # resume: continues from the saved step and keeps the history
    assert cli(args + ["--max-steps", "35", "--resume"]) == 0  # the last --max-steps wins
    history2 = json.loads((out / "metrics.json").read_text())["history"]
    assert history2["initial"] == history["initial"]
    # 45 steps per epoch: the resumed run finishes more of epoch 1 (it used to skip to 2)
    assert [(e["epoch"], e["step"]) for e in history2["epochs"]] == [(1, 35)]
    assert "resumed from" in capsys.readouterr().out


def test_vae_step_on_triton_backend():
    """One training step with the fused op on the Triton kernels (interpreted on CPU)."""
    if DEVICE == "cpu" and not ff.backend.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    torch.manual_seed(0)
    model = ConvVAE(latent=3, hidden=4).to(DEVICE)
    x = data.digits("test")[0][:6].to(DEVICE)
    with ff.use_backend("triton"):
        losses = [model.loss(x, torch.Generator().manual_seed(1)) for _ in range(2)]
        losses[0]["loss"].backward()
    assert torch.equal(losses[0]["loss"], losses[1]["loss"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _untimed(history: dict) -> dict:
    """``history`` without the epochs' timings (seconds, images/s), which differ per run."""
    timing = ("seconds", "images_per_s")
    return {**history, "epochs": [{k: v for k, v in e.items() if k not in timing}
                                  for e in history["epochs"]]}


def test_train_vae_resumed_at_an_epoch_boundary_reports_the_same_numbers(tmp_path):
    # 2 steps per epoch; the test -ELBO draws its noise from the evaluation generator, which
    # a resume used to restart from its seed instead of restoring
    args = ["train-vae", "--batch-size", "720", "--no-progress", "--device", "cpu"]
    whole_out, split_out = tmp_path / "whole", tmp_path / "split"
    assert cli(args + ["--epochs", "2", "--out", str(whole_out)]) == 0
    assert cli(args + ["--epochs", "1", "--out", str(split_out)]) == 0
    assert cli(args + ["--epochs", "2", "--out", str(split_out), "--resume"]) == 0
    whole, resumed = (json.loads((out / "metrics.json").read_text())["history"]
                      for out in (whole_out, split_out))
    assert _untimed(resumed) == _untimed(whole)


def test_train_vae_resumed_after_a_max_steps_stop_inside_an_epoch_reports_the_same_numbers(
        tmp_path):
    # 2 steps per epoch; a stop after step 1 was checkpointed as epoch 1 done, so the
    # resumed run skipped that epoch's second batch
    args = ["train-vae", "--batch-size", "720", "--no-progress", "--device", "cpu",
            "--epochs", "2"]
    whole_out, split_out = tmp_path / "whole", tmp_path / "split"
    assert cli(args + ["--out", str(whole_out)]) == 0
    assert cli(args + ["--out", str(split_out), "--max-steps", "1"]) == 0
    first = json.loads((split_out / "metrics.json").read_text())["history"]
    assert cli(args + ["--out", str(split_out), "--max-steps", "1", "--resume"]) == 0
    again = json.loads((split_out / "metrics.json").read_text())["history"]
    assert again == first  # nothing left to run: the entry stays
    with pytest.raises(SystemExit, match="--batch-size: .* stopped after batch 1 of epoch 1"):
        cli(args[:2] + ["700"] + args[3:] + ["--out", str(split_out), "--resume"])
    assert cli(args + ["--out", str(split_out), "--resume"]) == 0
    whole, resumed = (json.loads((out / "metrics.json").read_text())["history"]
                      for out in (whole_out, split_out))
    assert [e["step"] for e in whole["epochs"]] == [2, 4]
    assert _untimed(resumed) == _untimed(whole)


def test_bernoulli_likelihood_refuses_pixels_outside_0_1():
    # images in [0, 255] (a forgotten / 255) gave a large negative "-log p(x | z)" and an
    # ELBO far above 0, silently; the Bernoulli likelihood is defined for x in [0, 1]
    torch.manual_seed(0)
    model = ConvVAE(latent=2, hidden=4)
    x = data.digits("test")[0][:3]
    for bad in (x * 255, x - 0.5, torch.where(x > 0.5, float("nan"), x)):
        for call in (model.loss, model.elbo, model.terms):
            with pytest.raises(ValueError, match=r"x: .*\[0, 1\]"):
                call(bad)
        with pytest.raises(ValueError, match=r"x: .*\[0, 1\]"):
            model.recon_nll(torch.zeros_like(bad), bad)
    # the edges and grey levels in between are fine; the Gaussian likelihood takes any x
    assert torch.isfinite(model.loss(x.round())["loss"])
    assert torch.isfinite(ConvVAE(latent=2, hidden=4, likelihood="gaussian").loss(x * 255)["loss"])


def test_bernoulli_pixels_off_the_cpu_are_asserted_on_the_device(monkeypatch):
    """Off the CPU the pixel range went unchecked (reading it waits for the device)."""
    import fastflow.vae

    calls = []
    record = lambda ok, msg: calls.append((ok, msg))  # noqa: E731
    monkeypatch.setattr(fastflow.vae, "assert_on_device", record, raising=False)
    model = ConvVAE(latent=2, hidden=4)
    model._check_unit_interval(torch.empty(3, 1, 8, 8, device="meta"))
    [(ok, msg)] = calls
    assert ok.shape == () and ok.dtype == torch.bool and ok.device.type == "meta"
    assert msg == "x: expected pixels in [0, 1] for the Bernoulli likelihood"
    monkeypatch.undo()
    check = torch.compile(model._check_unit_interval, fullgraph=True, backend="aot_eager")
    check(torch.empty(3, 1, 8, 8, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bernoulli_pixels_outside_0_1_fail_on_cuda():
    model = ConvVAE(latent=2, hidden=4).cuda()
    model.recon_nll(torch.zeros(3, 1, 8, 8, device="cuda"), torch.rand(3, 1, 8, 8, device="cuda"))
    torch.cuda.synchronize()
    code = ("import torch\nfrom fastflow.vae import ConvVAE\n"
            "m = ConvVAE(latent=2, hidden=4).cuda()\n"
            "x = torch.full((3, 1, 8, 8), 255.0, device='cuda')\n"
            "m.recon_nll(torch.zeros_like(x), x)\ntorch.cuda.synchronize()\n")
    assert_device_assert_fails(code)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_sums_the_likelihood_in_float32(likelihood, dtype):
    # a model cast to bfloat16 summed -log p(x | z) over the pixels in bfloat16 (3072 pixels:
    # every sample came out 2128.0, a few nats off) and cast the op's float32 KL down to it;
    # the per-sample terms are float32 for half inputs, as log-determinants are
    torch.manual_seed(0)
    model = ConvVAE(latent=4, channels=3, size=32, hidden=4, likelihood=likelihood).to(dtype)
    x = torch.rand(4, 3, 32, 32).to(dtype)
    out, kl_op, *_ = model(x, torch.Generator().manual_seed(0))
    recon, kl = model.terms(x, torch.Generator().manual_seed(0))
    assert recon.dtype == kl.dtype == torch.float32
    assert torch.equal(kl, kl_op)
    scale = None if model.log_scale is None else model.log_scale.double()
    exact = ConvVAE(latent=4, channels=3, size=32, hidden=4, likelihood=likelihood).double()
    exact.log_scale = None if scale is None else torch.nn.Parameter(scale)
    want = exact.recon_nll(out.double(), x.double())
    torch.testing.assert_close(recon.double(), want, rtol=1e-5, atol=1e-3)
    loss = model.loss(x)["loss"]
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad.dtype == dtype for p in model.parameters() if p.grad is not None)


def test_vae_refuses_integer_images_and_non_tensors_naming_x():
    """uint8 images (the common mistake: not scaled to [0, 1]) and non-tensors get a
    TypeError naming x, not a convolution's dtype RuntimeError or an AttributeError."""
    model = ConvVAE()
    images = (torch.rand(2, 1, 8, 8) * 255).to(torch.uint8)
    for call in (model, model.loss, model.elbo, model.reconstruct):
        with pytest.raises(TypeError, match=r"^x: expected a floating-point tensor .* got dtype torch\.uint8"):
            call(images)
    with pytest.raises(TypeError, match=r"^x: expected a torch\.Tensor, got list"):
        model.loss([[0.0]])


@pytest.mark.parametrize("kw", [{"latent": True}, {"latent": 2.0}, {"channels": 0},
                                {"size": 4.0}, {"hidden": True}], ids=str)
def test_bad_sizes_are_refused_by_name(kw):
    """A bool latent built a 1-latent VAE; a float size, latent or hidden failed inside
    torch (``empty(): argument 'size'``), channels=0 at the first convolution."""
    with pytest.raises(ValueError, match=f"^{next(iter(kw))}: expected"):
        ConvVAE(**kw)


@pytest.mark.parametrize("n", [-1, 2.0, True])
def test_sample_refuses_a_bad_count_by_name(n):
    with pytest.raises(ValueError, match=r"^n: expected a positive integer"):
        ConvVAE(hidden=4).sample(n)
