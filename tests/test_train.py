"""The Glow training command: what it writes, mixed precision, the non-finite-step skip,
checkpoints (weights_only, bad files, resume reproducibility) and the guards on --out."""

import json

import pytest
import torch

from fastflow.cli import train
from fastflow.cli.loop import StepRunner
from fastflow.glow import Glow, bits_per_dim

TINY = ["--n-flow", "2", "--filter-size", "16", "--no-progress", "--threads", "1"]


def _run(out, *extra):
    argv = ["--epochs", "2", "--max-steps", "12", "--batch-size", "32", *TINY,
            "--out", str(out), *extra]
    assert train.main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def test_glow_training_improves_bits_per_dim_and_writes_its_files(tmp_path, capsys):
    metrics = _run(tmp_path, "--lr", "3e-3", "--epochs", "1", "--temperature", "0.7,1",
                   "--warmup", "0")
    history = metrics["history"]
    assert history["epochs"][-1]["step"] == 12 and history["epochs"][-1]["skipped"] == 0
    assert history["epochs"][-1]["test"]["bpd"] < history["initial"]["bpd"] - 0.2
    for name in ("checkpoint.pt", "metrics.json", "metrics.csv", "samples.png",
                 "samples_before.png", "samples_epoch001.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert set(history["epochs"][-1]["digits"]) == {"0.7", "1"}
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "test_bpd" in header and "images_per_s" in header and "recognised_T0.7" in header
    printed = capsys.readouterr().out
    assert "wrote:" in printed and str(tmp_path / "samples.png") in printed
    # everything in the checkpoint loads with weights_only=True
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 12 and state["lr"] == 3e-3


def test_resume_at_an_epoch_boundary_reports_the_same_numbers(tmp_path, small_npz):
    common = ["--data", small_npz, "--batch-size", "16", "--test-fraction", "0.2", "--warmup",
              "3", "--max-steps", "100"]
    whole = _run(tmp_path / "a", *common, "--epochs", "2")["history"]
    first = _run(tmp_path / "b", *common, "--epochs", "1")["history"]
    resumed = _run(tmp_path / "b", *common, "--epochs", "2", "--resume")["history"]
    timing = ("seconds", "images_per_s")
    strip = lambda e: {k: v for k, v in e.items() if k not in timing}  # noqa: E731
    assert [e["step"] for e in whole["epochs"]] == [4, 8]
    assert resumed["initial"] == whole["initial"] == first["initial"]
    assert [strip(e) for e in resumed["epochs"]] == [strip(e) for e in whole["epochs"]]


def test_resume_after_a_max_steps_stop_inside_an_epoch_reports_the_same_numbers(tmp_path,
                                                                               small_npz):
    """The checkpoint of a --max-steps stop after batch 2 of 4 was marked epoch 1 done: the
    resumed run skipped that epoch's other batches (6 steps instead of 8, other numbers)."""
    common = ["--data", small_npz, "--batch-size", "16", "--test-fraction", "0.2", "--warmup",
              "3", "--epochs", "2"]
    whole = _run(tmp_path / "a", *common, "--max-steps", "8")["history"]
    first = _run(tmp_path / "b", *common, "--max-steps", "2")["history"]
    again = _run(tmp_path / "b", *common, "--max-steps", "2", "--resume")["history"]
    assert again["epochs"] == first["epochs"]  # nothing left to run: the entry stays
    with pytest.raises(SystemExit, match="--batch-size: .* stopped after batch 2 of epoch 1 "
                                         "at --batch-size 16; got 8"):
        _run(tmp_path / "b", *common, "--max-steps", "8", "--resume", "--batch-size", "8")
    resumed = _run(tmp_path / "b", *common, "--max-steps", "8", "--resume")["history"]
    timing = ("seconds", "images_per_s")
    strip = lambda e: {k: v for k, v in e.items() if k not in timing}  # noqa: E731
    assert [e["step"] for e in whole["epochs"]] == [4, 8]
    assert [strip(e) for e in resumed["epochs"]] == [strip(e) for e in whole["epochs"]]


def test_an_epoch_of_skipped_steps_has_no_train_bpd_and_metrics_stay_strict_json(tmp_path,
                                                                                  monkeypatch):
    """Every step non-finite (skipped): the epoch's train bits/dim was reported as 0.000,
    and the NaN test bits/dim was written to metrics.json as NaN, which is not JSON."""
    import fastflow.glow as glow

    real = glow.bits_per_dim
    monkeypatch.setattr(glow, "bits_per_dim", lambda *a, **k: real(*a, **k) * float("nan"))
    _run(tmp_path, "--max-steps", "2", "--epochs", "1")

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    metrics = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    entry = metrics["history"]["epochs"][-1]
    assert entry["skipped"] == 2 and entry["step"] == 2
    assert entry["train"]["bpd"] is None and entry["test"]["bpd"] is None
    row = (tmp_path / "metrics.csv").read_text().splitlines()[1].split(",")
    assert row[2] != "0.0"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resume_on_cuda_reports_the_same_numbers(tmp_path, small_npz):
    """A checkpoint loads with map_location the GPU, which puts its RNG states there; they
    are restored from CPU copies (torch takes no other), so resuming on CUDA works."""
    common = ["--data", small_npz, "--batch-size", "16", "--test-fraction", "0.2", "--warmup",
              "3", "--max-steps", "100", "--device", "cuda"]
    whole = _run(tmp_path / "a", *common, "--epochs", "2")["history"]
    _run(tmp_path / "b", *common, "--epochs", "1")
    resumed = _run(tmp_path / "b", *common, "--epochs", "2", "--resume")["history"]
    assert [e["step"] for e in resumed["epochs"]] == [4, 8]
    assert resumed["epochs"][-1]["test"]["bpd"] == pytest.approx(
        whole["epochs"][-1]["test"]["bpd"], rel=1e-4)


def test_rng_states_are_restored_from_cpu_copies(monkeypatch):
    """set_rng_state hands torch CPU tensors whatever device the loaded state is on."""
    from fastflow.cli import common

    gen = torch.Generator().manual_seed(3)
    state = common.rng_state(gen)
    moved = []

    class Elsewhere(torch.Tensor):  # a state tensor as map_location="cuda" would leave it
        def cpu(self):
            moved.append(1)
            return torch.Tensor(self).as_subclass(torch.Tensor)

    state = {"cpu": state["cpu"].as_subclass(Elsewhere),
             "generators": [g.as_subclass(Elsewhere) for g in state["generators"]]}
    seen = []
    monkeypatch.setattr(torch, "set_rng_state", lambda t: seen.append(type(t)))
    common.set_rng_state(state, gen)
    assert moved == [1, 1] and seen == [torch.Tensor]


def test_resume_refuses_another_held_out_split(tmp_path, small_npz):
    """--seed and --test-fraction draw the held-out images: resuming with other values would
    train on test images and report their bits/dim as held out, so it is refused."""
    common = ["--data", small_npz, "--batch-size", "16", "--epochs", "1", "--max-steps", "2"]
    _run(tmp_path, *common, "--test-fraction", "0.2")
    for extra in (["--test-fraction", "0.3"], ["--test-fraction", "0.2", "--seed", "1"]):
        with pytest.raises(SystemExit, match=r"--seed, --test-fraction: .* held out its test "
                                             r"images with \{'seed': 0, 'test_fraction': 0.2\}"):
            _run(tmp_path, *common, *extra, "--epochs", "2", "--resume")
    _run(tmp_path, *common, "--test-fraction", "0.2", "--epochs", "2", "--resume")


def test_resume_refuses_data_that_gained_images(tmp_path, small_npz):
    """The held-out images are a permutation of range(N): with images added to the folder
    or array, the same seed and --test-fraction hold out other ones, some of them trained
    on, and the resumed run reported their bits/dim as held out."""
    import numpy as np

    common = ["--batch-size", "16", "--test-fraction", "0.2", "--max-steps", "2"]
    _run(tmp_path / "out", "--data", small_npz, *common, "--epochs", "1")
    images = np.load(small_npz)["images"]
    grown = tmp_path / "grown.npz"
    np.savez(grown, images=np.concatenate([images, images[:10]]))
    with pytest.raises(SystemExit, match=r"--data: .* held out its test images from 80 "
                                         r"images; .* now holds 90"):
        _run(tmp_path / "out", "--data", str(grown), *common, "--epochs", "2", "--resume")
    _run(tmp_path / "out", "--data", small_npz, *common, "--epochs", "2", "--resume")


def test_resume_refuses_other_images_of_the_same_shape_and_count(tmp_path, small_npz):
    """One pixel changed: the same shape, count and held-out split, which resumed silently
    and went on training on other images than the run's history says."""
    import numpy as np

    common = ["--batch-size", "16", "--test-fraction", "0.2", "--max-steps", "2"]
    _run(tmp_path / "out", "--data", small_npz, *common, "--epochs", "1")
    images = np.load(small_npz)["images"]
    images[40, 4, 4] ^= 1
    other = tmp_path / "other.npz"
    np.savez(other, images=images)
    with pytest.raises(SystemExit, match=r"^--data: .* was trained on other images than "
                                         r".*other\.npz holds now"):
        _run(tmp_path / "out", "--data", str(other), *common, "--epochs", "2", "--resume")
    _run(tmp_path / "out", "--data", small_npz, *common, "--epochs", "2", "--resume")


def test_the_picture_rows_convert_only_the_images_they_show(tmp_path, small_npz,
                                                         float_conversions):
    """Every sample grid made a float copy of the whole held-out set (120 MB for CIFAR-10's)
    for its first n_samples images."""
    _run(tmp_path, "--data", small_npz, "--test-fraction", "0.5", "--batch-size", "16",
         "--epochs", "1", "--max-steps", "1", "--n-samples", "3")
    converted = float_conversions
    assert converted and max(converted) == 3, converted


def test_resume_guards_and_new_lr(tmp_path, capsys):
    _run(tmp_path, "--max-steps", "3", "--epochs", "1", "--lr", "1e-3")
    with pytest.raises(SystemExit, match="--resume to continue it or --force"):
        _run(tmp_path, "--max-steps", "3")
    metrics = _run(tmp_path, "--max-steps", "5", "--resume", "--lr", "1e-6")
    assert "--lr 1e-06 replaces the checkpoint's 0.001" in capsys.readouterr().out
    assert metrics["config"]["lr"] == 1e-6 and metrics["history"]["epochs"][-1]["base_lr"] == 1e-6
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["lr"] == 1e-6
    with pytest.raises(SystemExit, match="--resume"):
        _run(tmp_path, "--resume", "--filter-size", "8")
    fresh = tmp_path / "fresh"
    _run(fresh, "--max-steps", "2", "--epochs", "1", "--resume")
    printed = capsys.readouterr().out
    assert "no checkpoint at" in printed and "starting fresh" in printed
    _run(tmp_path, "--max-steps", "2", "--epochs", "1", "--force")  # starts over


@pytest.mark.parametrize("content", [b"", b"garbage bytes", "truncated", "other"])
def test_resume_from_a_bad_checkpoint_is_one_clear_error(tmp_path, content):
    _run(tmp_path, "--max-steps", "2", "--epochs", "1")
    ckpt = tmp_path / "checkpoint.pt"
    if content == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:200])
    elif content == "other":
        torch.save([1, 2, 3], ckpt)
    else:
        ckpt.write_bytes(content)
    with pytest.raises(SystemExit) as err:
        _run(tmp_path, "--resume")
    assert str(ckpt) in str(err.value) and "\n" not in str(err.value)


def test_out_is_checked_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="--out: cannot write"):
        _run(blocker / "run")
    (tmp_path / "run" / "checkpoint.pt").mkdir(parents=True)
    with pytest.raises(SystemExit, match="not a file"):
        _run(tmp_path / "run")


@pytest.mark.parametrize("name, message", [("gpu", "expected auto, cpu, cuda"),
                                           ("cuda", "cuda")])
def test_device_errors_are_one_line(tmp_path, name, message):
    if name == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit, match=message) as err:
        _run(tmp_path, "--device", name)
    assert "\n" not in str(err.value)
    with pytest.raises(SystemExit, match="--cuda-graph: needs a CUDA device"):
        _run(tmp_path, "--device", "cpu", "--cuda-graph")


def _tiny_glow():
    torch.manual_seed(0)
    model = Glow(1, 2, 2, filter_size=8)
    x = torch.rand(16, 1, 8, 8) - 0.5
    with torch.no_grad():
        model(x)  # ActNorm's initialisation
    return model, x


def test_bf16_autocast_step_keeps_logdets_fp32_and_close_to_fp32():
    model, x = _tiny_glow()
    with torch.no_grad():
        log_p32, logdet32, _ = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            log_p, logdet, _ = model(x)
    assert logdet.dtype == torch.float32 and torch.isfinite(logdet).all()
    assert torch.isfinite(log_p).all()
    bpd32 = bits_per_dim(log_p32, logdet32, 64, 17)
    bpd16 = bits_per_dim(log_p.float(), logdet.float(), 64, 17)
    assert abs(float(bpd16 - bpd32)) < 0.02


def test_bf16_run_ends_close_to_the_fp32_run(tmp_path):
    ends = {}
    for precision in ("fp32", "bf16"):
        metrics = _run(tmp_path / precision, "--precision", precision, "--max-steps", "15",
                       "--epochs", "1", "--lr", "3e-3", "--temperature", "1")
        ends[precision] = metrics["history"]["epochs"][-1]["test"]["bpd"]
    assert abs(ends["bf16"] - ends["fp32"]) < 0.05, ends


def test_a_non_finite_step_is_skipped_on_the_device_and_counted():
    model, x = _tiny_glow()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    runner = StepRunner(model.parameters(), opt, device=torch.device("cpu"), clip=5.0,
                        warmup=2)

    def loss(batch):
        return lambda: {"bpd": bits_per_dim(*model(batch)[:2], 64, 17)}

    runner.step(loss(x), 0)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {p: (s["exp_avg"].clone(), s["exp_avg_sq"].clone(), s["step"].clone())
               for p, s in opt.state.items()}
    bad = x.clone()
    bad[3, 0, 2, 2] = float("nan")
    runner.step(loss(bad), 1)
    assert int(runner.skipped) == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    for p, (m, v, s) in moments.items():
        assert torch.equal(opt.state[p]["exp_avg"], m) and torch.equal(opt.state[p]["step"], s)
        assert torch.equal(opt.state[p]["exp_avg_sq"], v)
    runner.step(loss(x), 2)  # and training goes on
    assert int(runner.skipped) == 1
    assert not torch.equal(model.state_dict()["blocks.0.prior.conv.weight"],
                           params["blocks.0.prior.conv.weight"])


def test_glow_input_dequantises_the_digit_levels():
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3)
    y = train.glow_input(x, torch.Generator().manual_seed(0))
    levels = torch.tensor([0.0, 8.0, 16.0])
    lo = levels / train.DIGIT_LEVELS - 0.5
    assert torch.all(y.flatten() >= lo) and torch.all(y.flatten() < lo + 1 / train.DIGIT_LEVELS)


def test_fp16_scales_the_loss_and_backs_off_on_overflow():
    model, x = _tiny_glow()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    runner = StepRunner(model.parameters(), opt, device=torch.device("cpu"), precision="fp16")
    runner.scale.fill_(2.0 ** 126)  # the scaled gradients overflow float32
    params = {k: v.clone() for k, v in model.state_dict().items()}
    terms = runner.step(lambda: {"bpd": bits_per_dim(*model(x)[:2], 64, 17)}, 0)
    assert torch.isfinite(terms["bpd"]) and int(runner.skipped) == 1
    assert float(runner.scale) == 2.0 ** 125  # backed off
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    runner.scale.fill_(2.0 ** 8)
    runner.step(lambda: {"bpd": bits_per_dim(*model(x)[:2], 64, 17)}, 1)
    assert int(runner.skipped) == 1
    assert not torch.equal(model.state_dict()["blocks.0.prior.conv.weight"],
                           params["blocks.0.prior.conv.weight"])



def test_a_run_resumed_in_another_precision_keeps_its_gradients_unscaled():
    """--resume --precision fp32 (or bf16) from an fp16 run's checkpoint used to take its
    loss scale (2**16) and divide every gradient by it, the loss being unscaled."""
    import copy

    model, x = _tiny_glow()
    cpu = torch.device("cpu")
    fp16 = StepRunner(model.parameters(), torch.optim.Adam(model.parameters(), fused=True),
                      device=cpu, precision="fp16")
    saved = fp16.state_dict()
    assert float(saved["scale"][0]) == 2.0 ** 16
    grads = {}
    for name in ("fresh", "resumed"):
        m = copy.deepcopy(model)
        runner = StepRunner(m.parameters(), torch.optim.Adam(m.parameters(), fused=True),
                            device=cpu, precision="fp32")
        if name == "resumed":
            runner.load_state_dict(saved)
        runner.step(lambda: {"bpd": bits_per_dim(*m(x)[:2], 64, 17)}, 0)
        assert float(runner.scale) == 1.0, name
        grads[name] = [p.grad for p in m.parameters()]
    for fresh, resumed in zip(grads["fresh"], grads["resumed"]):
        torch.testing.assert_close(resumed, fresh)
    again = StepRunner(model.parameters(), torch.optim.Adam(model.parameters(), fused=True),
                       device=cpu, precision="fp16")
    again.scale.fill_(2.0 ** 10)
    fp16.load_state_dict(again.state_dict())  # fp16 to fp16 keeps the scale
    assert float(fp16.scale) == 2.0 ** 10

def test_reversible_training_gives_the_stored_run(tmp_path, small_npz, capsys):
    """--reversible changes what backward keeps, not what it computes: the same run with
    and without it reports the same bits/dim (float32 rounding apart). The start-up line
    says which mode runs."""
    common = ["--data", small_npz, "--batch-size", "16", "--epochs", "1", "--warmup", "0"]
    stored = _run(tmp_path / "s", *common)["history"]["epochs"][-1]
    assert capsys.readouterr().out.splitlines()[0].endswith("fastflow backend reference")
    rev = _run(tmp_path / "r", *common, "--reversible")["history"]["epochs"][-1]
    assert capsys.readouterr().out.splitlines()[0].endswith(
        "fastflow backend reference, reversible (activations recomputed)")
    assert rev["step"] == stored["step"] == 4
    assert rev["train"]["bpd"] == pytest.approx(stored["train"]["bpd"], abs=1e-4)
    assert rev["test"]["bpd"] == pytest.approx(stored["test"]["bpd"], abs=1e-4)


def test_resume_with_eval_every_reports_the_test_bpd_of_the_whole_run(tmp_path, small_npz):
    """The evaluation's dequantisation noise came from a generator that every evaluation
    advanced: a run stopped at an epoch that --eval-every skips (its last epoch evaluates)
    and resumed drew other noise for the next evaluation than the uninterrupted run."""
    common = ["--data", small_npz, "--batch-size", "16", "--test-fraction", "0.2", "--warmup",
              "3", "--max-steps", "100", "--eval-every", "2"]
    whole = _run(tmp_path / "a", *common, "--epochs", "2")["history"]
    _run(tmp_path / "b", *common, "--epochs", "1")
    resumed = _run(tmp_path / "b", *common, "--epochs", "2", "--resume")["history"]
    assert whole["epochs"][0]["test"] is None and resumed["epochs"][0]["test"] is not None
    assert resumed["epochs"][1]["test"] == whole["epochs"][1]["test"]


def test_test_bpd_is_the_weighted_mean_over_the_whole_test_set_with_fixed_noise():
    """Against a hand computation: Glow's -log p(x) with uniform dequantisation over n_bins
    levels, per C*H*W dimension, each held-out image once (a last partial batch weighted by
    its size), the same noise at every evaluation."""
    import contextlib
    import math
    import types

    from fastflow.data import ImageSet

    model, _ = _tiny_glow()
    levels = torch.randint(0, 17, (11, 1, 8, 8), dtype=torch.uint8)
    images = ImageSet(levels, 17)
    runner = types.SimpleNamespace(autocast=contextlib.nullcontext)
    cpu = torch.device("cpu")
    got = [train.evaluate_bpd(model, images, 7, runner, cpu, batch_size=b) for b in (4, 4, 11)]
    noise = torch.cat([torch.rand(levels[s:s + 4].shape, generator=g)
                       for g in [torch.Generator().manual_seed(7)] for s in range(0, 11, 4)])
    with torch.no_grad():
        log_p, logdet, _ = model.eval()((levels.double() + noise.double()).float() / 17 - 0.5)
    nll = -(log_p.double() + logdet.double()) + 64 * math.log(17)
    want = float((nll / (64 * math.log(2))).mean())
    assert got[0] == got[1]
    assert got[0] == pytest.approx(want, rel=1e-6) and got[2] == pytest.approx(want, rel=1e-6)


def test_samples_become_images_at_the_datas_levels():
    """to_unit scaled x + 0.5 by n_bins / (n_bins - 1) instead of taking the level of its
    bin: a dequantised digit came back up to 1/16 brighter than the data (the x->z->x row
    and the digit scorer's input)."""
    from fastflow.data import dequantize, levels_to_unit

    levels = torch.arange(17, dtype=torch.uint8).repeat(3, 1).view(3, 1, 17, 1)
    noise = torch.stack([torch.full((17,), v) for v in (0.001, 0.5, 0.999)])
    x = dequantize(levels, 17, noise.view(3, 1, 17, 1))
    assert torch.equal(train.to_unit(x, 17), levels_to_unit(levels, 17))
    assert torch.equal(train.to_unit(torch.tensor([-0.7, 0.6]), 17), torch.tensor([0.0, 1.0]))
