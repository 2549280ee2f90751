"""ff.TarFlow: exact log-det and inverse, the KV-cache sampler against a naive one, Jacobi
against sequential, no host syncs while sampling, denoising, and the training command."""

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastflow as ff
from fastflow.cli import train_tarflow

from conftest import DEVICE, assert_device_assert_fails


def tiny(num_classes=0, dtype=torch.float64, blocks=2, seed=0, **kw):
    """1x4x4 images, patch 2 (4 tokens of 4), ``blocks`` blocks of 1 layer, random weights
    (the zero-initialised output projections would make every block the identity)."""
    torch.manual_seed(seed)
    model = ff.TarFlow(1, 4, 2, 8, blocks, 1, num_classes, head_dim=4, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.to(device=DEVICE, dtype=dtype).eval()


def test_logdet_equals_log_abs_det_of_the_jacobian(backend):
    model = tiny(num_classes=3)
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64, device=DEVICE)
    y = torch.tensor([2], device=DEVICE)
    _, logdet = model(x, y)
    # samples are independent: 16 copies of x, row i of the Jacobian from copy i, one pass
    xs = x.repeat(16, 1, 1, 1).requires_grad_(True)
    z = model(xs, y.repeat(16))[0].reshape(16, 16)
    (jac,) = torch.autograd.grad(z.diagonal().sum(), xs)
    _, expected = torch.linalg.slogdet(jac.reshape(16, 16))
    torch.testing.assert_close(logdet[0], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("blocks", [2, 3])
def test_reverse_of_forward_recovers_x(backend, blocks):
    model = tiny(blocks=blocks, clamp=2.0)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64, device=DEVICE)
    z, logdet = model(x)
    assert z.shape == (3, 4, 4) and logdet.shape == (3,)
    torch.testing.assert_close(model.reverse(z), x, rtol=0, atol=1e-10)
    torch.testing.assert_close(model.reverse(model.unpatchify(z)), x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("num_classes,labelled,guidance",
                         [(0, False, 0.0), (4, True, 0.0), (4, True, 1.5), (4, False, 0.0)])
def test_kv_cache_sampler_equals_naive_recompute(backend, num_classes, labelled, guidance):
    model = tiny(num_classes=num_classes, clamp=3.0)
    z = torch.randn(3, 4, 4, dtype=torch.float64, device=DEVICE)
    y = torch.tensor([0, 3, 1], device=DEVICE) if labelled else None
    naive = model.reverse(z, y, guidance=guidance, cache="none")
    for cache in ("static", "cat"):
        got = model.reverse(z, y, guidance=guidance, cache=cache)
        torch.testing.assert_close(got, naive, rtol=0, atol=1e-10, msg=cache)
    if guidance:  # guidance changes the samples
        assert (naive - model.reverse(z, y, cache="none")).abs().max() > 1e-3


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_jacobi_agrees_with_sequential(backend, guidance):
    model = tiny(num_classes=4, blocks=3)
    z = torch.randn(2, 4, 4, dtype=torch.float64, device=DEVICE)
    y = torch.tensor([1, 2], device=DEVICE)
    seq = model.reverse(z, y, guidance=guidance)
    stats = {}
    jac = model.reverse(z, y, guidance=guidance, method="jacobi", tol=1e-9, check_every=1,
                        stats=stats)
    torch.testing.assert_close(jac, seq, rtol=0, atol=1e-7)
    assert len(stats["jacobi_iterations"]) == 3
    assert all(1 <= i <= 4 for i in stats["jacobi_iterations"])


def test_jacobi_stops_early_on_a_near_identity_model():
    """Blocks that barely depend on their past converge in fewer than T iterations, and
    the count reported is the first iteration under the tolerance."""
    torch.manual_seed(0)
    model = ff.TarFlow(1, 8, 2, 8, 2, 1, head_dim=4).double().to(DEVICE).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0.0, 1e-3)
    z = torch.randn(2, 16, 4, dtype=torch.float64, device=DEVICE)
    stats = {}
    jac = model.reverse(z, method="jacobi", tol=1e-8, check_every=2, stats=stats)
    assert all(i < 16 for i in stats["jacobi_iterations"]), stats
    torch.testing.assert_close(jac, model.reverse(z), rtol=0, atol=1e-6)


class _SyncCounter(TorchDispatchMode):
    """Counts the ops that make the host wait for a device value."""

    SYNCS = ("_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNCS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_sequential_sampling_reads_nothing_on_the_host(backend):
    model = tiny(num_classes=4, dtype=torch.float32)
    y = torch.tensor([0, 1], device=DEVICE)
    with _SyncCounter() as syncs:
        model.sample(2, y, guidance=1.0)
    assert syncs.count == 0
    with _SyncCounter() as syncs:  # Jacobi reads its test once every check_every iterations
        model.reverse(torch.randn(2, 4, 4, device=DEVICE), y, method="jacobi", check_every=2)
    assert 1 <= syncs.count <= 2 * 1  # 2 blocks, T = 4: one check each (iteration 2)


def test_denoise_is_one_score_step():
    """A fresh TarFlow is the identity (zero output projections): log p is the standard
    normal, so the score step maps x to x (1 - sigma^2)."""
    model = ff.TarFlow(1, 4, 2, 8, 2, 1, head_dim=4, noise_std=0.3).double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(model.denoise(x), x * (1 - 0.09), rtol=1e-12, atol=1e-12)
    out = model.sample(3, generator=torch.Generator().manual_seed(0))
    raw = model.sample(3, generator=torch.Generator().manual_seed(0), denoise=False)
    torch.testing.assert_close(out, raw * (1 - 0.09), rtol=1e-12, atol=1e-12)


def test_training_labels_drop_to_the_null_class():
    model = ff.TarFlow(1, 4, 2, 8, 1, 1, num_classes=3, head_dim=4, class_dropout=0.5)
    y = torch.zeros(2000, dtype=torch.long)
    model.train()
    dropped = (model._labels(y, 2000, y.device, drop=True) == 3).float().mean().item()
    assert 0.4 < dropped < 0.6
    assert torch.equal(model._labels(y, 2000, y.device), y)  # sampling never drops
    x = torch.randn(4, 1, 4, 4)
    with torch.no_grad():
        model.blocks[0].proj_out.weight.normal_()
    y4 = torch.zeros(4, dtype=torch.long)
    runs = [model(x, y4, drop_labels=False)[0] for _ in range(3)]
    assert all(torch.equal(r, runs[0]) for r in runs)
    model.eval()
    assert torch.equal(model(x, y4)[0], runs[0])


def test_forward_matches_between_backends_in_float32():
    model = tiny(num_classes=3, dtype=torch.float32, clamp=2.0)
    x = torch.randn(2, 1, 4, 4, device=DEVICE)
    y = torch.tensor([0, 2], device=DEVICE)
    with ff.use_backend("reference"):
        z_r, ld_r = model(x, y)
    with ff.use_backend("triton"):
        z_t, ld_t = model(x, y)
    torch.testing.assert_close(z_t, z_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld_t, ld_r, rtol=1e-5, atol=1e-5)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="patch_size"):
        ff.TarFlow(1, 5, 2, 8, 1, 1)
    with pytest.raises(ValueError, match="channels"):
        ff.TarFlow(1, 4, 2, 10, 1, 1, head_dim=3)
    model = ff.TarFlow(1, 4, 2, 8, 1, 1, head_dim=4)
    with pytest.raises(ValueError, match="x: expected shape"):
        model(torch.randn(2, 1, 4, 5))
    with pytest.raises(ValueError, match="y: this TarFlow has num_classes=0"):
        model(torch.randn(2, 1, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="guidance"):
        model.sample(2, guidance=1.0)
    with pytest.raises(ValueError, match="method"):
        model.sample(2, method="parallel")
    with pytest.raises(ValueError, match="z: expected tokens"):
        model.reverse(torch.randn(2, 5, 4))
    cond = ff.TarFlow(1, 4, 2, 8, 1, 1, num_classes=2, head_dim=4)
    with pytest.raises(ValueError, match="guidance: classifier-free guidance steers"):
        cond.sample(2, guidance=1.0)
    with pytest.raises(ValueError, match=r"y: expected shape \(2,\)"):
        cond(torch.randn(2, 1, 4, 4), torch.tensor([0]))
    with pytest.raises(TypeError, match="y: expected an integer tensor"):
        cond(torch.randn(2, 1, 4, 4), torch.tensor([0.0, 1.0]))


def _untimed(history: dict) -> dict:
    """``history`` without the epochs' timings (seconds, images/s), which differ per run."""
    timing = ("seconds", "images_per_s")
    return {**history, "epochs": [{k: v for k, v in e.items() if k not in timing}
                                  for e in history["epochs"]]}


def _train(tmp_path, *extra):
    argv = ["--epochs", "2", "--max-steps", "8", "--batch-size", "32", "--channels", "16",
            "--blocks", "2", "--head-dim", "8", "--out", str(tmp_path), "--no-progress", *extra]
    assert train_tarflow.main(argv) == 0
    return json.loads((tmp_path / "metrics.json").read_text())


def test_train_tarflow_improves_and_resumes(tmp_path):
    first = _train(tmp_path, "--max-steps", "4", "--epochs", "1")
    history = first["history"]
    assert history["epochs"][-1]["step"] == 4
    assert history["epochs"][-1]["test"]["nll"] < history["initial"]["nll"]
    for name in ("checkpoint.pt", "metrics.json", "tarflow_samples.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert len(first["sampling"]["jacobi_iterations"]) == 2
    resumed = _train(tmp_path, "--resume")["history"]
    # 45 steps per epoch: the resumed run goes on inside epoch 1 (it used to skip to 2)
    assert [e["epoch"] for e in resumed["epochs"]] == [1]
    assert resumed["initial"] == history["initial"]
    assert resumed["epochs"][-1]["step"] == 8
    with pytest.raises(SystemExit, match="--resume"):
        _train(tmp_path, "--resume", "--channels", "8")
    # the message said "a multiple of channels // head_dim" without the count
    with pytest.raises(SystemExit, match=r"^--channels: expected a multiple of the 3 attention "
                                         r"heads \(--channels // --head-dim\), got 50"):
        _train(tmp_path / "heads", "--channels", "50", "--head-dim", "16")


def test_cli_lists_train_tarflow(capsys):
    from fastflow import __main__ as cli

    assert cli.main(["--help"]) == 0
    assert "train-tarflow" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train-tarflow", "--help"])
    assert exit_.value.code == 0
    assert "--noise-std" in capsys.readouterr().out


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_sampler_equals_eager_steps():
    model = tiny(num_classes=4, blocks=3, dtype=torch.float32)
    z = torch.randn(3, 4, 4, device=DEVICE)
    y = torch.tensor([0, 3, 1], device=DEVICE)
    for guidance in (0.0, 1.0):
        eager = model.reverse(z, y, guidance=guidance, graphs=False)
        graphed = model.reverse(z, y, guidance=guidance, graphs=True)
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stop", [["--epochs", "1"], ["--max-steps", "1"]],
                         ids=["epoch-boundary", "inside-an-epoch"])
def test_train_tarflow_resumed_reports_the_same_numbers(tmp_path, stop):
    """2 steps per epoch. At an epoch boundary the evaluation generator used to restart from
    its seed on resume; after a --max-steps stop inside an epoch, the checkpoint marked the
    epoch done, so the resumed run skipped that epoch's second batch."""
    common = ["--batch-size", "720"]
    whole = _train(tmp_path / "whole", *common)["history"]
    _train(tmp_path / "split", *common, *stop)
    resumed = _train(tmp_path / "split", *common, "--resume")["history"]
    assert [e["step"] for e in whole["epochs"]] == [2, 4]
    assert _untimed(resumed) == _untimed(whole)


@pytest.mark.parametrize("cache", ["static", "cat", "none"])
def test_sampling_under_autocast_follows_the_uncast_sampler(backend, cache):
    """Under torch.autocast the transformer runs in bfloat16 and the flow math in float32:
    every sampler runs (the static KV cache used to fail with "index_copy_(): self and
    source expected to have the same dtype") and stays within bfloat16 rounding of fp32."""
    model = tiny(num_classes=4, dtype=torch.float32, clamp=2.0)
    z = torch.randn(2, 4, 4, device=DEVICE)
    y = torch.tensor([0, 3], device=DEVICE)
    for guidance in (0.0, 1.5):
        want = model.reverse(z, y, guidance=guidance, cache=cache)
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            got = model.reverse(z, y, guidance=guidance, cache=cache)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def test_reverse_names_z_for_a_bad_image_shaped_z():
    model = ff.TarFlow(1, 4, 2, 8, 1, 1, head_dim=4)
    with pytest.raises(ValueError, match=r"^z: expected shape \(N, 1, 4, 4\)"):
        model.reverse(torch.randn(2, 1, 4, 5))
    with pytest.raises(TypeError, match="^z: expected a floating"):
        model.reverse(torch.zeros(2, 1, 4, 4, dtype=torch.long))


def test_train_tarflow_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    _train(tmp_path, "--max-steps", "1", "--epochs", "1", "--resume")
    assert "no checkpoint" in capsys.readouterr().out
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="--out"):
        train_tarflow.main(["--out", str(blocker / "run"), "--max-steps", "1"])


def test_an_empty_batch_is_refused_by_name():
    """N = 0 used to die inside the attention with "cannot reshape tensor of 0 elements";
    as in ff.Glow, it is refused up front."""
    model = ff.TarFlow(1, 4, 2, 8, 2, 1, num_classes=3, head_dim=4)
    with pytest.raises(ValueError, match=r"^x: expected at least one sample, "
                                         r"shape \(N >= 1, 1, 4, 4\)"):
        model(torch.randn(0, 1, 4, 4))
    with pytest.raises(ValueError, match=r"^z: expected at least one sample, "
                                         r"shape \(N >= 1, 4, 4\)"):
        model.reverse(torch.randn(0, 4, 4))
    with pytest.raises(ValueError, match=r"^z: expected at least one sample"):
        model.reverse(torch.randn(0, 1, 4, 4), method="jacobi")


@pytest.mark.parametrize("kw", [{"noise_std": -0.1}, {"noise_std": float("nan")},
                                {"class_dropout": 1.5}, {"class_dropout": -0.1},
                                {"clamp": float("inf")}, {"clamp": 0.0}, {"clamp": True}],
                         ids=str)
def test_bad_noise_and_dropout_are_refused(kw):
    """A negative noise_std used to be accepted and then skip the denoising step in sample
    while denoise() used noise_std**2; a class_dropout outside [0, 1] silently dropped every
    label (or none); clamp=inf made every log-det and sample NaN (inf * tanh(0)), and
    clamp=0 was refused only at the first forward."""
    with pytest.raises(ValueError, match=f"^{next(iter(kw))}: expected"):
        ff.TarFlow(1, 4, 2, 8, 1, 1, num_classes=2, head_dim=4, **kw)


@pytest.mark.parametrize("blocks", [1, 3])
def test_jacobian_is_block_triangular_in_token_order(backend, blocks):
    """9 tokens (odd) of 8 values: one block's Jacobian dz/dx is lower block-triangular in
    its token order (token t depends on tokens < t only) with diagonal blocks
    diag(exp(-a_t)); with any number of blocks log|det| equals the reported log-det."""
    torch.manual_seed(3)
    model = ff.TarFlow(2, 6, 2, 8, blocks, 2, num_classes=3, head_dim=4, clamp=2.0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model = model.to(device=DEVICE, dtype=torch.float64).eval()
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, device=DEVICE)
    y = torch.tensor([1], device=DEVICE)
    _, logdet = model(x, y)
    n = model.tokens * model.dim  # 72: row i of the Jacobian from copy i of x
    xs = x.repeat(n, 1, 1, 1).requires_grad_(True)
    z = model(xs, y.repeat(n))[0].reshape(n, n)
    (grad,) = torch.autograd.grad(z.diagonal().sum(), xs)
    jac = model.patchify(grad).reshape(n, n)  # columns in token order
    _, expected = torch.linalg.slogdet(jac)
    torch.testing.assert_close(logdet[0], expected, rtol=1e-10, atol=1e-10)
    if blocks == 1:
        t = torch.arange(n, device=DEVICE) // model.dim
        assert jac[t[:, None] < t[None, :]].abs().max() == 0  # no token sees its future
        same = t[:, None] == t[None, :]
        off_diagonal = same & ~torch.eye(n, dtype=torch.bool, device=DEVICE)
        assert jac[off_diagonal].abs().max() == 0
        assert (jac.diagonal() > 0).all()
        torch.testing.assert_close(jac.diagonal().log().sum(), logdet[0], rtol=1e-12, atol=1e-12)


def test_sample_under_inference_mode_denoises_as_under_no_grad():
    """torch.inference_mode() around sampling used to fail in the denoising step with
    "element 0 of tensors does not require grad and does not have a grad_fn"."""
    model = tiny(num_classes=3, noise_std=0.3)
    y = torch.tensor([0, 2], device=DEVICE)
    with torch.no_grad():
        want = model.sample(2, y, guidance=1.0, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        y_inf = torch.tensor([0, 2], device=DEVICE)
        got = model.sample(2, y_inf, guidance=1.0, generator=torch.Generator().manual_seed(0))
        x = torch.randn(2, 1, 4, 4, dtype=torch.float64, device=DEVICE)
        denoised = model.denoise(x, y_inf)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(denoised, model.denoise(x.clone(), y), rtol=0, atol=0)
    raw = model.sample(2, y, guidance=1.0, generator=torch.Generator().manual_seed(0),
                       denoise=False)
    assert (got - raw).abs().max() > 1e-6  # the denoising step did something


def test_train_tarflow_resume_applies_a_new_lr_and_says_when_there_is_no_checkpoint(
        tmp_path, capsys):
    """A --lr given with --resume was recorded in metrics.json but the optimizer kept the
    checkpoint's; --resume without a checkpoint started afresh without a word."""
    _train(tmp_path, "--max-steps", "1", "--epochs", "1", "--resume", "--lr", "1e-3")
    assert "no checkpoint at" in capsys.readouterr().out
    metrics = _train(tmp_path, "--max-steps", "2", "--resume", "--lr", "1e-6")
    assert "--lr: using 1e-06 (the checkpoint had 0.001)" in capsys.readouterr().out
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert metrics["config"]["lr"] == 1e-6
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [1e-6]


def test_labels_outside_the_classes_are_refused_on_cpu():
    """y == num_classes was silently taken as the null (unconditional) class, and y < 0 or
    y > num_classes failed inside the embedding with 'index out of range in self'."""
    model = ff.TarFlow(1, 4, 2, 8, 1, 1, num_classes=3, head_dim=4)
    x = torch.randn(2, 1, 4, 4)
    for bad in ([0, 3], [-1, 0], [5, 1]):
        with pytest.raises(ValueError, match=r"^y: expected class indices in \[0, 3\)"):
            model(x, torch.tensor(bad))
    with pytest.raises(ValueError, match=r"^y: expected class indices"):
        model.sample(2, torch.tensor([0, 3]))
    z, ld = model(x, torch.tensor([0, 2]))
    assert z.shape == (2, 4, 4) and ld.shape == (2,)


def test_labels_off_the_cpu_are_asserted_on_the_device(monkeypatch):
    """Off the CPU the labels went unchecked (reading them waits for the device): there
    y == num_classes silently trained and sampled the null class."""
    import fastflow.tarflow

    calls = []
    record = lambda ok, msg: calls.append((ok, msg))  # noqa: E731
    monkeypatch.setattr(fastflow.tarflow, "assert_on_device", record, raising=False)
    model = ff.TarFlow(1, 4, 2, 8, 1, 1, num_classes=3, head_dim=4).to("meta")
    y = torch.tensor([0, 3], device="meta")
    assert model._labels(y, 2, y.device).device.type == "meta"
    [(ok, msg)] = calls
    assert ok.shape == () and ok.dtype == torch.bool and ok.device.type == "meta"
    assert msg == "y: expected class indices in [0, 3)"


def test_the_device_assert_is_no_host_sync_and_compiles_fullgraph():
    from fastflow.ops._checks import assert_on_device

    with _SyncCounter() as syncs:  # the op the labels' check queues, as benchmarks count
        assert_on_device(torch.tensor(True), "y: unused")
        with pytest.raises(RuntimeError, match=r"^y: expected"):  # on the CPU it raises
            assert_on_device(torch.tensor(False), "y: expected")
    assert syncs.count == 0
    model = ff.TarFlow(1, 4, 2, 8, 1, 1, num_classes=3, head_dim=4).to("meta")
    labels = torch.compile(lambda y: model._labels(y, 2, y.device), fullgraph=True,
                           backend="aot_eager")
    assert labels(torch.tensor([0, 2], device="meta")).shape == (2,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_labels_past_the_classes_fail_on_cuda_without_a_host_sync():
    model = ff.TarFlow(1, 4, 2, 8, 1, 1, num_classes=3, head_dim=4).cuda()
    with _SyncCounter() as syncs:
        model._labels(torch.tensor([0, 2], device="cuda"), 2, torch.device("cuda"))
    torch.cuda.synchronize()
    assert syncs.count == 0
    code = ("import torch, fastflow as ff\n"
            "m = ff.TarFlow(1, 4, 2, 8, 1, 1, num_classes=3, head_dim=4).cuda()\n"
            "m._labels(torch.tensor([0, 3], device='cuda'), 2, torch.device('cuda'))\n"
            "torch.cuda.synchronize()\n")
    assert_device_assert_fails(code)


@pytest.mark.parametrize("kw", [{"in_channels": True}, {"num_blocks": True},
                                {"layers_per_block": True}, {"num_classes": True},
                                {"head_dim": True}, {"patch_size": 2.0}], ids=str)
def test_sizes_must_be_integers_not_bools(kw):
    """A bool is an int to isinstance: TarFlow(True, ...) built a 1-channel model (Glow
    refuses bools); now each size names itself."""
    args = dict(in_channels=1, img_size=4, patch_size=2, channels=8, num_blocks=1,
                layers_per_block=1, num_classes=2, head_dim=4)
    args.update(kw)
    with pytest.raises(ValueError, match=f"^{next(iter(kw))}: expected"):
        ff.TarFlow(**args)


def test_sample_count_and_check_every_refuse_bools():
    model = ff.TarFlow(1, 4, 2, 8, 1, 1, head_dim=4)
    with pytest.raises(ValueError, match="^n: expected a positive integer"):
        model.sample(True)
    with pytest.raises(ValueError, match="^check_every: expected a positive integer"):
        model.reverse(torch.randn(1, 4, 4), method="jacobi", check_every=True)


def test_flags_and_sampling_numbers_are_checked_by_name():
    """drop_labels="no" dropped labels (a true string), and a NaN or inf guidance or
    temperature made every sample NaN without a word."""
    model = ff.TarFlow(1, 4, 2, 8, 1, 1, num_classes=2, head_dim=4).eval()
    x, y = torch.randn(2, 1, 4, 4), torch.tensor([0, 1])
    with pytest.raises(TypeError, match="^drop_labels: expected a bool"):
        model(x, y, drop_labels="no")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="^guidance: expected a finite number"):
            model.sample(2, y, guidance=bad)
        with pytest.raises(ValueError, match="^temperature: expected a finite number"):
            model.sample(2, y, temperature=bad)
    with pytest.raises(TypeError, match="^temperature: expected a finite number"):
        model.sample(2, y, temperature="0.5")
    for name in ("temperature", "guidance"):  # a flag passed where the number goes
        with pytest.raises(TypeError, match=f"^{name}: expected a finite number, got True"):
            model.sample(2, y, **{name: True})
    with pytest.raises(TypeError, match="^denoise: expected a bool"):
        model.sample(2, y, denoise="no")
    with pytest.raises(TypeError, match="^graphs: expected a bool"):
        model.reverse(torch.randn(2, 4, 4), y, graphs="no")
