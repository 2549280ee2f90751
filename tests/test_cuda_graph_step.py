"""``train --cuda-graph``: the step function the capture records (``StepRunner.step``) against
the previous eager step, bit for bit; what a capture forbids (host reads, tensors built from
Python data, cross-device copies, random numbers) never happens in it; the warmup learning
rate follows the device-side counter; old checkpoints resume; the refusals. The capture and
replay themselves need a GPU (skipped without one)."""

import copy

import pytest
import torch
import fastflow as ff
from fastflow.cli import train
from fastflow.cli.graph_step import GraphStep
from fastflow.cli.loop import StepRunner, warmup_lr
from fastflow.glow import Glow, bits_per_dim

from conftest import OpenedOpsMode

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")


class PreviousStep:
    """The eager step as it was before --cuda-graph captured it (a Python float learning
    rate set per step from the loop's step number): the oracle the shared step must match."""

    def __init__(self, params, opt, *, device, precision="fp32", clip=None, warmup=0,
                 base_lr=1e-3):
        self.params = [p for p in params if p.requires_grad]
        self.opt, self.precision, self.clip = opt, precision, clip
        self.warmup, self.base_lr = warmup, base_lr
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.device = torch.device(device)
        self.found_inf = torch.zeros((), device=device)
        self.skipped = torch.zeros((), device=device)
        self.scale = torch.full((1,), 2.0 ** 16 if precision == "fp16" else 1.0, device=device)
        self.growth_tracker = torch.zeros(1, dtype=torch.int32, device=device)

    def step(self, loss_fn, step):
        for group in self.opt.param_groups:
            group["lr"] = warmup_lr(self.base_lr, step, self.warmup)
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                            enabled=self.dtype is not None):
            terms = loss_fn()
        terms = {k: v.float() for k, v in terms.items()}
        loss = next(iter(terms.values()))
        (loss * self.scale[0] if self.precision == "fp16" else loss).backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        self.found_inf.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf,
                                                         self.scale.reciprocal())
        torch.maximum(self.found_inf, (~torch.isfinite(loss.detach())).float(),
                      out=self.found_inf)
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.opt.grad_scale, self.opt.found_inf = None, self.found_inf
        self.opt.step()
        self.opt.found_inf = None
        if self.precision == "fp16":
            torch._amp_update_scale_(self.scale, self.growth_tracker, self.found_inf,
                                     2.0, 0.5, 2000)
        self.skipped += self.found_inf
        return {k: v.detach() for k, v in terms.items()}


def _glow(device="cpu", reversible=False):
    torch.manual_seed(0)
    model = Glow(1, 2, 2, filter_size=8, reversible=reversible).to(device)
    x = (torch.rand(16, 1, 8, 8) - 0.5).to(device)
    with torch.no_grad():
        model(x)  # ActNorm's data-dependent initialisation
    return model


def _batches(n, device="cpu", nan_at=None, size=16):
    gen = torch.Generator().manual_seed(1)
    out = [(torch.rand(size, 1, 8, 8, generator=gen) - 0.5).to(device) for _ in range(n)]
    if nan_at is not None:
        out[nan_at][3, 0, 2, 2] = float("nan")
    return out


def _loss(model, x):
    log_p, logdet, _ = model(x)
    return {"bpd": bits_per_dim(log_p.float(), logdet.float(), 64, 17)}


def _assert_same_state(a, b, opt_a, opt_b, exact=True):
    same = torch.equal if exact else (lambda u, v: torch.allclose(u, v, rtol=1e-5, atol=1e-6))
    for (name, u), v in zip(a.state_dict().items(), b.state_dict().values()):
        assert same(u, v), name
    for p, q in zip(a.parameters(), b.parameters()):
        s, t = opt_a.state[p], opt_b.state[q]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert same(s[key], t[key]), key


@pytest.mark.parametrize("precision, clip", [("fp32", None), ("fp32", 0.05), ("bf16", 0.05),
                                             ("fp16", None)])
def test_the_shared_step_equals_the_previous_eager_step_bitwise(precision, clip):
    old_model = _glow()
    new_model = copy.deepcopy(old_model)
    old_opt = torch.optim.Adam(old_model.parameters(), lr=1e-2, fused=True)
    new_opt = torch.optim.Adam(new_model.parameters(), lr=1e-2, fused=True)
    options = dict(precision=precision, clip=clip, warmup=3, base_lr=1e-2)
    old = PreviousStep(old_model.parameters(), old_opt, device="cpu", **options)
    new = StepRunner(new_model.parameters(), new_opt, device=torch.device("cpu"), **options)
    new.start(0)
    for i, x in enumerate(_batches(6, nan_at=2)):
        t_old = old.step(lambda: _loss(old_model, x), i)
        t_new = new.step(lambda: _loss(new_model, x))  # the counter, not the loop, says i
        a, b = t_old["bpd"], t_new["bpd"]
        assert torch.equal(a, b) or (i == 2 and a.isnan() and b.isnan()), i
        assert torch.equal(old.found_inf, new.found_inf) and torch.equal(old.scale, new.scale)
        _assert_same_state(old_model, new_model, old_opt, new_opt)
    assert int(new.skipped) == int(old.skipped) == 1  # the NaN batch, skipped and counted
    assert float(new.counter) == 6
    assert not torch.equal(new_model.state_dict()["blocks.0.prior.conv.weight"],
                           _glow().state_dict()["blocks.0.prior.conv.weight"])


def test_the_warmup_lr_follows_the_device_counter():
    model = _glow()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    runner = StepRunner(model.parameters(), opt, device=torch.device("cpu"), warmup=10,
                        base_lr=3e-3)
    runner.start(4)
    x = _batches(1)[0]
    for step in (4, 5, 6):
        runner.step(lambda: _loss(model, x))
        assert float(runner.lr_tensor) == warmup_lr(3e-3, step, 10) == runner.lr(step)
        assert float(runner.counter) == step + 1
        assert all(g["lr"] is runner.lr_tensor for g in opt.param_groups)
    runner.start(50)  # past the warmup
    runner.step(lambda: _loss(model, x))
    assert float(runner.lr_tensor) == 3e-3 and float(runner.counter) == 51
    # an optimizer state saved with a float lr (an older checkpoint) loads, and the runner
    # points the optimizer at its tensor again
    state = opt.state_dict()
    for group in state["param_groups"]:
        group["lr"], group["capturable"] = 1e-3, False
    opt.load_state_dict(state)
    runner.capturable = True  # what GraphStep sets before its capture
    runner.step(lambda: _loss(model, x))
    assert all(g["lr"] is runner.lr_tensor and g["capturable"] for g in opt.param_groups)


FORBIDDEN = {
    "_local_scalar_dense": "reads a device value on the host (.item(), float(), bool(), tolist)",
    "item": "reads a device value on the host (.item(), float())",
    "is_nonzero": "reads a device value on the host (bool(tensor))",
    "equal": "reads a device value on the host (torch.equal)",
    "nonzero": "an output shape that depends on the data (a host sync)",
    "masked_select": "an output shape that depends on the data (a host sync)",
    "_unique2": "an output shape that depends on the data (a host sync)",
    "lift_fresh": "a tensor built from Python data (a CPU->device copy on a GPU)",
    "lift_fresh_copy": "a tensor built from Python data (a CPU->device copy on a GPU)",
    "_pin_memory": "pinned host memory inside the step",
}
RANDOM = ("rand", "normal", "bernoulli", "uniform", "exponential", "multinomial")


class CaptureHazards(OpenedOpsMode):
    """Every op dispatched in the block that a CUDA-graph capture cannot take, fastflow's
    custom ops opened up: their implementations (the launchers and what they allocate) run
    under the detector again, so a host read inside a launcher is seen too."""

    def __init__(self):
        super().__init__()
        self.found = []

    def seen(self, func, args, kwargs, out):
        name = func.overloadpacket.__name__
        if name in FORBIDDEN:
            self.found.append(f"{func}: {FORBIDDEN[name]}")
        elif any(word in name for word in RANDOM):
            self.found.append(f"{func}: draws random numbers")
        elif name in ("copy_", "_to_copy"):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            devices = {t.device for t in tensors} | ({torch.device(kwargs["device"])}
                                                     if kwargs.get("device") else set())
            if len(devices) > 1:
                self.found.append(f"{func}: a copy between {sorted(map(str, devices))}")


def test_the_hazard_detector_sees_syncs_copies_and_random_numbers():
    x = torch.ones(3)
    with CaptureHazards() as seen:
        x.sum().item()
        bool(x.sum() > 0)
        x.nonzero()
        torch.tensor([1.0, 2.0])
        torch.rand(2)
    text = "\n".join(seen.found)
    for op in ("_local_scalar_dense", "nonzero", "lift_fresh", "rand"):
        assert op in text, (op, text)


def test_the_hazard_detector_sees_inside_fastflow_ops(monkeypatch):
    """A host read planted in a Triton launcher is found through the custom op."""
    from fastflow.kernels import channel_mix as k_mix

    mix = k_mix.mix

    def reading_mix(inp, *args, **kwargs):
        float(inp.sum())
        return mix(inp, *args, **kwargs)

    monkeypatch.setattr(k_mix, "mix", reading_mix)
    model = _glow(reversible=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    runner = StepRunner(model.parameters(), opt, device=torch.device("cpu"), precision="fp32")
    x, _ = _batches(2, nan_at=1)
    with ff.use_backend("triton"), CaptureHazards() as seen:
        runner.step(lambda: _loss(model, x))
    assert any("aten.item" in f or "_local_scalar_dense" in f for f in seen.found), seen.found


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("precision, clip, warmup, reversible",
                         [("fp32", 1.0, 5, False), ("bf16", None, 0, False),
                          ("fp16", 0.5, 2, False), ("fp32", 1.0, 5, True)])
def test_the_step_has_nothing_a_capture_forbids(precision, clip, warmup, reversible, backend):
    model = _glow(reversible=reversible)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    runner = StepRunner(model.parameters(), opt, device=torch.device("cpu"),
                        precision=precision, clip=clip, warmup=warmup)
    x, bad = _batches(2, nan_at=1, size=4)  # a small batch: the interpreter runs every program
    with ff.use_backend(backend):
        runner.step(lambda: _loss(model, x), 0)  # Adam's state exists, as after warm-up
        rng = torch.get_rng_state()
        with CaptureHazards() as seen:
            for batch in (x, bad, x):
                runner.step(lambda: _loss(model, batch))
    assert seen.found == [], "\n".join(seen.found)
    assert torch.equal(torch.get_rng_state(), rng)  # no random numbers: nothing to replay
    assert int(runner.skipped) == 1 and float(runner.counter) == 4


def test_graph_step_refuses_what_it_cannot_capture():
    model = _glow()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    runner = StepRunner(model.parameters(), opt, device=torch.device("cpu"))
    loss_fn = lambda x: _loss(model, x)  # noqa: E731
    with pytest.raises(ValueError, match="runner: expected a StepRunner on a CUDA device"):
        GraphStep(runner, loss_fn)
    with pytest.raises(ValueError, match="warmup_steps: expected >= 1"):
        GraphStep(runner, loss_fn, warmup_steps=0)
    fresh = Glow(1, 2, 2, filter_size=8)
    with pytest.raises(ValueError, match="model: expected ActNorm's data-dependent"):
        GraphStep(runner, loss_fn, model=fresh)
    for m in fresh.modules():  # ActNorms set by hand (loc and scale given): initialised
        if isinstance(m, ff.ActNorm):
            m.initialized.fill_(1)
    with pytest.raises(ValueError, match="runner: expected a StepRunner on a CUDA device"):
        GraphStep(runner, loss_fn, model=fresh)


TINY = ["--n-flow", "2", "--filter-size", "16", "--no-progress", "--threads", "1"]


def test_the_command_refuses_cuda_graph_combinations(tmp_path, monkeypatch):
    argv = ["--epochs", "1", "--max-steps", "2", *TINY, "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="--cuda-graph: expected without --compile"):
        train.main([*argv, "--cuda-graph", "--compile"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="--cuda-graph: expected one process, got 2"):
        train.main([*argv, "--cuda-graph"])
    monkeypatch.delenv("WORLD_SIZE")
    if not CUDA:
        with pytest.raises(SystemExit, match="--cuda-graph: needs a CUDA device"):
            train.main([*argv, "--cuda-graph"])
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_checkpoint_with_a_float_lr_resumes_like_a_new_one(tmp_path):
    """Checkpoints written before the lr became a tensor hold a float lr and capturable=False
    in the optimizer state: they resume, to the same numbers."""
    import json

    argv = ["--epochs", "2", "--batch-size", "32", "--warmup", "20", *TINY, "--temperature", "1"]
    assert train.main([*argv, "--epochs", "1", "--max-steps", "4", "--out", str(tmp_path / "a")]) == 0
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    for group in ckpt["optimizer"]["param_groups"]:
        group["lr"], group["capturable"] = float(group["lr"]), False
    (tmp_path / "b").mkdir()
    torch.save(ckpt, tmp_path / "b" / "checkpoint.pt")
    ends = {}
    for name in ("a", "b"):
        assert train.main([*argv, "--max-steps", "8", "--resume", "--out",
                           str(tmp_path / name)]) == 0
        ends[name] = json.loads((tmp_path / name / "metrics.json").read_text())["history"]
    strip = lambda e: {k: v for k, v in e.items() if k not in ("seconds", "images_per_s")}  # noqa: E731
    assert [strip(e) for e in ends["a"]["epochs"]] == [strip(e) for e in ends["b"]["epochs"]]
    assert ends["a"]["epochs"][-1]["step"] == 8


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_replaying_the_graph_equals_the_eager_steps(precision):
    eager_model = _glow("cuda")
    graph_model = copy.deepcopy(eager_model)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2, fused=True)
            for m in (eager_model, graph_model)]
    options = dict(device=torch.device("cuda"), precision=precision, clip=0.05, warmup=4,
                   base_lr=1e-2)
    eager = StepRunner(eager_model.parameters(), opts[0], **options)
    runner = StepRunner(graph_model.parameters(), opts[1], **options)
    graph = GraphStep(runner, lambda x: _loss(graph_model, x), model=graph_model)
    eager.start(0)
    runner.start(0)
    for i, x in enumerate(_batches(9, "cuda", nan_at=6)):  # 3 eager, capture, 5 replays
        t_eager = eager.step(lambda: _loss(eager_model, x))
        t_graph = graph.step(x)
        assert torch.allclose(t_eager["bpd"], t_graph["bpd"], rtol=1e-5, equal_nan=True), i
    assert graph.graph is not None
    _assert_same_state(eager_model, graph_model, *opts, exact=False)
    assert int(runner.skipped) == int(eager.skipped) == 1
    assert float(runner.lr_tensor) == float(eager.lr_tensor) and float(runner.counter) == 9
    with pytest.raises(ValueError, match="x: expected a batch of shape"):
        graph.step(torch.zeros(8, 1, 8, 8, device="cuda"))


@needs_cuda
def test_the_command_trains_with_cuda_graph_like_without(tmp_path):
    import json

    argv = ["--epochs", "2", "--max-steps", "12", "--batch-size", "32", "--warmup", "5",
            "--clip", "1", *TINY, "--temperature", "1", "--device", "cuda"]
    ends = {}
    for name, extra in (("eager", []), ("graph", ["--cuda-graph"])):
        assert train.main([*argv, *extra, "--out", str(tmp_path / name)]) == 0
        ends[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    last = {k: v["history"]["epochs"][-1] for k, v in ends.items()}
    assert last["graph"]["step"] == 12
    assert last["graph"]["train"]["bpd"] == pytest.approx(last["eager"]["train"]["bpd"], abs=1e-3)
    assert last["graph"]["test"]["bpd"] == pytest.approx(last["eager"]["test"]["bpd"], abs=1e-3)
