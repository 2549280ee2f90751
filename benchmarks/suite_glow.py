"""End-to-end Glow: a training step (forward, backward, Adam step) and sampling.

Implementations, all with the same weights (fastflow's state_dict, loaded into the peer):
  floor      the peer's coupling networks and priors only, flow layers replaced by identity
             (peer_glow.FloorGlow): the work no flow-layer implementation can avoid
  eager      the peer: Glow in plain PyTorch with rosinality's structure and formulas
  compile    torch.compile of the peer
  fastflow   fastflow.Glow (default backend: Triton on CUDA tensors, the reference on CPU)
in float32 and under bf16 autocast. Reported: step time (median, quartiles), images/s, peak
memory (CUDA), and the ratios to the floor and to eager; Adam is fused, as the training
command builds it (``train_step``); sampling (``reverse`` of fresh z)
in images/s.

Configurations: on a GPU, Glow's CIFAR-10 setting (K=32, L=3, filter 512, batch 64,
32x32); on CPU a reduced one: 8 FlowSteps at N=16 C=12 8x8 filter 64 (a one-block Glow
on 3x16x16 images) and a small multi-scale Glow (K=4, L=3, filter 64, N=16, 16x16).

Device-independent figures (``cpu_figures``): ATen ops + Triton launches per training
step, host syncs per step (``aten._local_scalar_dense`` / ``item`` / ``nonzero`` /
``equal`` / ``is_nonzero`` seen by a dispatch mode; fastflow must have 0), bytes kept for
backward. ``tables`` also prints the ratio table (fastflow / eager, each pair timed in turn).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastflow as ff

import harness
import peer_glow

IMPLS = ("floor", "eager", "compile", "fastflow")


@dataclass(frozen=True)
class Config:
    name: str
    n: int
    size: int
    n_flow: int
    n_block: int
    filter_size: int
    in_channel: int = 3

    @property
    def label(self):
        c = self.in_channel * 4
        return (f"{self.name}: K={self.n_flow} L={self.n_block} filter {self.filter_size}, "
                f"N={self.n} {self.in_channel}x{self.size}x{self.size} (first step C={c} "
                f"{self.size // 2}x{self.size // 2})")


CIFAR = Config("CIFAR-10", 64, 32, 32, 3, 512)
EIGHT_STEPS = Config("8 FlowSteps", 16, 16, 8, 1, 64)
MULTI_SCALE = Config("small multi-scale", 16, 16, 4, 3, 64)


def configs(device: str, quick: bool) -> list[Config]:
    if device.startswith("cuda"):
        return [EIGHT_STEPS] if quick else [CIFAR]
    return [EIGHT_STEPS] if quick else [EIGHT_STEPS, MULTI_SCALE]


# --------------------------------------------------------------------------------------
# Models with the same weights
# --------------------------------------------------------------------------------------


def make_models(cfg: Config, device: str, seed: int = 0) -> dict:
    """{"fastflow", "eager", "floor"}: fastflow's Glow after ActNorm's data-dependent
    initialisation, the peer with its state_dict, the floor on a copy of the peer."""
    torch.manual_seed(seed)
    ours = ff.Glow(cfg.in_channel, cfg.n_flow, cfg.n_block, filter_size=cfg.filter_size).to(device)
    with torch.no_grad():
        ours(batch(cfg, device))  # ActNorm initialisation, as a first training step would
    peer = peer_glow.Glow(cfg.in_channel, cfg.n_flow, cfg.n_block, cfg.filter_size).to(device)
    peer.load_state_dict(ours.state_dict(), strict=True)
    floor = peer_glow.FloorGlow(copy.deepcopy(peer))
    return {"fastflow": ours, "eager": peer, "floor": floor}


def batch(cfg: Config, device: str, seed: int = 1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.rand(cfg.n, cfg.in_channel, cfg.size, cfg.size, generator=g, device="cpu")
    return (x - 0.5).to(device)


def _loss(model, x, n_pixel):
    log_p, logdet, _ = model(x)
    ll = log_p.float() + logdet.float() - math.log(256) * n_pixel
    return (-ll / (math.log(2) * n_pixel)).mean()


def adam(model) -> torch.optim.Adam:
    """The optimizer of the timed step (and of the counted one): fused, as ``train`` builds it."""
    return torch.optim.Adam(model.parameters(), lr=1e-5, fused=True)


def train_step(model, forward, x, device: str, dtype: torch.dtype):
    """A closure: forward (under bf16 autocast for ``dtype=bfloat16``), backward, Adam.

    Adam is built as ``python -m fastflow train`` builds it, ``fused=True`` (one kernel for
    all parameters), for every implementation. PyTorch's default on CPU is a loop of about
    ten ops per parameter: for the 40 ActNorm and LU tensors of the 8-FlowStep
    configuration, which the floor does not update, about 1 ms per step on this CPU."""
    opt = adam(model)
    n_pixel = x[0].numel()
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    autocast = dtype != torch.float32

    def step():
        with torch.autocast(device_type, dtype=dtype, enabled=autocast):
            loss = _loss(forward, x, n_pixel)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def sample_fn(model_reverse, cfg: Config, shapes, device: str, dtype: torch.dtype):
    """A closure: ``model_reverse`` of fixed z of the given shapes (temperature 0.7)."""
    z = [0.7 * torch.randn(cfg.n, *s, device=device) for s in shapes]
    device_type = "cuda" if device.startswith("cuda") else "cpu"

    @torch.no_grad()
    def run():
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            return model_reverse(z)

    return run


def _peak(fn, device):
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _timed_rows(fns: dict, cfg: Config, dtype, device, reps, warmup, checks=None) -> list[dict]:
    """One row per implementation, from ``fns`` (impl -> a function that builds its
    closure): each closure is called once (torch.compile compiles there; an implementation
    that fails, there or while timed, is reported in its row's ``error``, not fatal), its
    peak memory taken, then all are timed in turn (``harness.time_interleaved``): a change
    in the machine's load reaches every implementation alike, so the ratios of one table
    compare like with like. ``checks``: impl -> its row's "check" (and "flag") from
    ``check_results``."""
    rows, ok = {}, {}
    for impl in IMPLS:
        if impl not in fns:
            continue
        row = rows[impl] = {"config": cfg.name, "dtype": str(dtype).replace("torch.", ""),
                            "impl": impl, **(checks or {}).get(impl, {})}
        try:
            fn = fns[impl]()
            fn()  # the first call: compiles, and raises here for a failing implementation
            row["peak_MB"] = _peak(fn, device)
            ok[impl] = fn
        except Exception as e:  # reported, not fatal
            row["error"] = f"{type(e).__name__}: {e}"[:200]
    timed = {}
    while ok:  # one that fails while timed (say, out of memory): its row's error, the rest again
        failed = {}
        try:
            timed = harness.time_interleaved({i: _noting(i, f, failed) for i, f in ok.items()},
                                             device, reps=reps, warmup=warmup)
            break
        except Exception as e:
            impl = next(iter(failed), None)
            if impl is None:  # not an implementation's: the harness's own
                raise
            rows[impl]["error"] = f"{type(e).__name__}: {e}"[:200]
            del ok[impl]
    for impl, s in timed.items():
        rows[impl].update({"median_ms": s["median"] * 1e3,
                           "iqr_ms": f"{s['q1'] * 1e3:.3g}–{s['q3'] * 1e3:.3g}",
                           "range_ms": f"{s['min'] * 1e3:.3g}–{s['max'] * 1e3:.3g}",
                           "images_per_s": cfg.n / s["median"], "_s": s["median"]})
    return list(rows.values())


def _noting(impl, fn, failed: dict):
    """``fn``, noting ``impl`` in ``failed`` when it raises (then re-raised)."""
    def run():
        try:
            return fn()
        except Exception:
            failed.setdefault(impl, True)
            raise
    return run


def _ratios(rows, key_fields=("config", "dtype")):
    """speed vs eager (eager time / this time) and time / floor, per (config, dtype)."""
    groups = {}
    for r in rows:
        if "_s" in r and "flag" not in r:  # a flagged row is not a result
            groups.setdefault(tuple(r[k] for k in key_fields), {})[r["impl"]] = r["_s"]
    for r in rows:
        g = groups.get(tuple(r[k] for k in key_fields), {})
        if r["impl"] in g and "eager" in g:
            r["speed_vs_eager"] = g["eager"] / r["_s"]
        if r["impl"] in g and "floor" in g:
            r["time_vs_floor"] = r["_s"] / g["floor"]
    return rows


# The check before timing (``check_results``): flagged above this relative difference from
# eager. Loose (a wrong formula, sign or missing term differs by O(1)): on a GPU the peer's
# 1x1 convolutions run in TF32 (torch's default) and fastflow's in float32, through up to
# 96 steps. Under bfloat16 autocast the peer's flow layers run in bfloat16 and fastflow's in
# float32 (1-3 % apart on a CPU at 8 steps): the difference is reported, not flagged.
GLOW_CHECK_TOL = {torch.float32: 0.05}


def _grads_rel(ga: dict, gb: dict) -> float:
    """The largest difference of two {name: gradient} dicts, per parameter against that
    gradient's largest entry, floored at 1% of the largest entry of any: gradients near zero
    (ActNorm's loc right after its data-dependent initialisation) are rounding noise."""
    if ga.keys() != gb.keys():
        return float("inf")
    floor = 1e-2 * max(g.abs().max().item() for g in ga.values())
    worst = 0.0
    for name, a in ga.items():
        a, b = a.double(), gb[name].double()
        if a.shape != b.shape:
            return float("inf")
        err = ((a - b).abs().max() / max(a.abs().max().item(), floor, 1e-30)).item()
        if worst == worst and not err <= worst:  # NaN counts as the worst
            worst = err
    return worst


def check_results(results: dict, dtype) -> dict:
    """impl -> {"check": ...} (and "flag" for a mismatch), from ``results``: impl -> (output,
    {parameter name: gradient} or None), each computed on the same input with the same
    weights before anything is timed; eager's is the reference, the floor computes another
    function by design."""
    out = {"floor": {"check": "another function (the floor: networks and priors only)"}}
    ref = results.get("eager")
    tol = GLOW_CHECK_TOL.get(dtype)
    for impl, (value, grads) in results.items():
        if impl in out:
            continue
        if impl == "eager" or ref is None:
            out[impl] = {"check": "reference" if impl == "eager" else "no eager row to compare with"}
            continue
        errs = {"output": harness.rel_diff(ref[0], value)}
        if grads is not None and ref[1] is not None:
            errs["gradients"] = _grads_rel(ref[1], grads)
        text = ", ".join(f"{k} rel diff {v:.2g}" for k, v in errs.items())
        bad = [k for k, v in errs.items() if tol is not None and not v <= tol]
        if bad:
            out[impl] = {"check": f"MISMATCH: {text} (> {tol:g})",
                         "flag": f"WRONG: {' and '.join(bad)} differ from eager's ({text} > "
                                 f"{tol:g}); not the same function, not a result"}
        else:
            out[impl] = {"check": text + ("" if tol is not None else
                                          " (16-bit autocast: reported, not checked)")}
    return out


def _devices(device: str) -> list:
    """The CUDA devices whose random state ``fork_rng`` keeps (none on a CPU)."""
    return [torch.device(device).index or 0] if device.startswith("cuda") else []


def _step_result(model, forward, x, device: str, dtype):
    """(loss, {name: gradient}) of one training step's forward and backward, no update."""
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
        loss = _loss(forward, x, x[0].numel())
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), {n: g for n, g in zip(names, grads) if g is not None}


def _compile_here(device: str, quick: bool, cfg: Config, dtype: torch.dtype) -> bool:
    """On CPU, inductor compiles slowly on a small machine: the compiled peer is timed for
    the 8-FlowStep configuration in float32 only, and not with --quick (as the op suites)."""
    if device.startswith("cuda"):
        return True
    return not quick and cfg == EIGHT_STEPS and dtype == torch.float32


def step_rows(device, quick, reps, warmup, compile_) -> list[dict]:
    rows = []
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    for cfg in configs(device, quick):
        for dtype in dtypes:
            models = make_models(cfg, device)
            x = batch(cfg, device)
            forwards = {"floor": models["floor"], "eager": models["eager"],
                        "fastflow": models["fastflow"]}
            if compile_ and _compile_here(device, quick, cfg, dtype):
                forwards["compile"] = torch.compile(models["eager"])
            owner = {impl: models["eager"] if impl == "compile" else models[impl]
                     for impl in forwards}
            results = {}
            for impl in forwards:  # the same loss and gradients as eager's, before timing
                if impl != "floor":
                    try:
                        results[impl] = _step_result(owner[impl], forwards[impl], x, device, dtype)
                    except Exception:  # its row reports the error from its first call
                        pass
            fns = {impl: (lambda impl=impl: train_step(owner[impl], forwards[impl], x, device,
                                                       dtype)) for impl in forwards}
            rows += _timed_rows(fns, cfg, dtype, device, reps, warmup,
                                check_results(results, dtype))
            del models, forwards
    return _ratios(rows)


def sample_rows(device, quick, reps, warmup, compile_) -> list[dict]:
    rows = []
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    for cfg in configs(device, quick):
        for dtype in dtypes:
            models = make_models(cfg, device)
            for m in models.values():
                m.eval()
            reverse = {"floor": models["floor"].reverse, "eager": models["eager"].reverse,
                       "fastflow": models["fastflow"].reverse}
            if compile_ and _compile_here(device, quick, cfg, dtype):
                reverse["compile"] = torch.compile(models["eager"].reverse)
            shapes = models["fastflow"].z_shapes(cfg.size, cfg.size)
            results = {}
            for impl in reverse:  # the same samples of the same z as eager's, before timing
                if impl != "floor":
                    try:
                        with torch.random.fork_rng(devices=_devices(device)):
                            torch.manual_seed(0)
                            z = sample_fn(reverse[impl], cfg, shapes, device, dtype)
                        results[impl] = (z(), None)
                    except Exception:  # its row reports the error from its first call
                        pass
            runs = {impl: (lambda impl=impl: sample_fn(reverse[impl], cfg, shapes, device, dtype))
                    for impl in reverse}
            rows += _timed_rows(runs, cfg, dtype, device, reps, warmup,
                                check_results(results, dtype))
    return _ratios(rows)


# --------------------------------------------------------------------------------------
# Issue 7's CPU ratio table: fastflow / eager, one run
# --------------------------------------------------------------------------------------


def ratio_rows(device, reps, warmup) -> list[dict]:
    """fastflow against eager, each pair timed in turn (``harness.time_interleaved``), so
    the ratios of one run compare like with like on a machine whose load changes. fastflow
    is called as a user calls it (``ff.affine_coupling(x, h)``), inside one
    ``use_backend("auto")`` block around the whole table rather than one per call (a
    ``with`` block costs about a microsecond, which a user calling the op does not pay)."""
    with ff.use_backend("auto"):
        return _ratio_rows(device, reps, warmup)


def _ratio_rows(device, reps, warmup) -> list[dict]:
    import suite_coupling
    import suite_gaussian

    rows = []

    def add(what, fns):
        for fn in fns.values():  # the first call (Adam's state, compiles): untimed, as in
            fn()                 # _timed_rows, whatever --warmup says
        s = harness.time_interleaved(fns, device, reps=reps, warmup=warmup)
        ours = s.pop("fastflow")["median"]
        for label, eager in s.items():
            rows.append({"what": what + label, "eager_ms": eager["median"] * 1e3,
                         "fastflow_ms": ours * 1e3, "speed_vs_eager": eager["median"] / ours})

    for shape in [(64, 12, 16, 16), (4, 6, 8, 8)]:
        n, c, hh, ww = shape
        inputs = (torch.randn(n, c, hh, ww, device=device, requires_grad=True),
                  torch.randn(n, 2 * (c // 2), hh, ww, device=device, requires_grad=True))
        add(f"affine coupling fwd+bwd {shape}",
            {", vs the eager reference": harness.fwd_bwd_closure(suite_coupling._eager, inputs),
             ", vs rosinality's eager formula":
                 harness.fwd_bwd_closure(suite_coupling._rosinality, inputs),
             "fastflow": harness.fwd_bwd_closure(ff.affine_coupling, inputs)})
    cfg = EIGHT_STEPS
    models = make_models(cfg, device)
    x = batch(cfg, device)
    add(f"Glow train step (fwd, bwd, Adam), {cfg.name}, float32",
        {"": train_step(models["eager"], models["eager"], x, device, torch.float32),
         "fastflow": train_step(models["fastflow"], models["fastflow"], x, device,
                                torch.float32)})
    for m in models.values():
        m.eval()
    shapes = models["fastflow"].z_shapes(cfg.size, cfg.size)
    add(f"Glow sampling, {cfg.name}, float32",
        {"": sample_fn(models["eager"].reverse, cfg, shapes, device, torch.float32),
         "fastflow": sample_fn(models["fastflow"].reverse, cfg, shapes, device, torch.float32)})
    for n, d in [(256, 512), (16, 37)]:
        inputs = (torch.randn(n, d, device=device, requires_grad=True),
                  (0.5 * torch.randn(n, d, device=device)).requires_grad_())
        add(f"reparameterisation + KL fwd+bwd N={n} D={d}",
            {"": harness.fwd_bwd_closure(suite_gaussian._eager, inputs),
             "fastflow": harness.fwd_bwd_closure(ff.reparameterize_kl, inputs)})
    return rows


STEP_COLS = ["config", "dtype", "impl", "median_ms", "iqr_ms", "range_ms", "images_per_s",
             "time_vs_floor", "speed_vs_eager", "peak_MB", "check", "error"]


def tables(device, quick, reps, warmup, compile_):
    """(title, rows, columns) for run.py."""
    steps = step_rows(device, quick, reps, warmup, compile_)
    samples = sample_rows(device, quick, reps, warmup, compile_)
    label = "; ".join(c.label for c in configs(device, quick))
    out = [(f"training step (forward, backward, Adam) [{label}]", steps, STEP_COLS),
           ("sampling (reverse of fresh z, no grad)", samples, STEP_COLS)]
    ratios = ratio_rows(device, reps, warmup)
    out.append(("ratio table: speed vs eager = eager time / fastflow time "
                 "(one run, each pair timed in turn)",
                ratios, ["what", "eager_ms", "fastflow_ms", "speed_vs_eager"]))
    for _, rows, _ in out:
        for r in rows:
            r.pop("_s", None)
    return out


# --------------------------------------------------------------------------------------
# Device-independent figures
# --------------------------------------------------------------------------------------


SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "equal", "is_nonzero"}


class SyncCounter(TorchDispatchMode):
    """Counts the ATen calls that make the host wait for the device's values."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


FIG_CFG = Config("figures", 2, 8, 2, 2, 16)


def _count_step(model, x, backend):
    """ATen ops + Triton launches of one forward + backward, and of the Adam step."""
    n_pixel = x[0].numel()
    opt = adam(model)  # the timed step's optimizer
    with ff.use_backend(backend):
        _loss(model, x, n_pixel).backward()  # warm-up outside the count
        opt.step()
        opt.zero_grad(set_to_none=True)
        aten, launches = harness._AtenCounter(), harness._LaunchCounter()
        syncs = SyncCounter()
        with launches, aten, syncs:
            _loss(model, x, n_pixel).backward()
        fwd_bwd = {"aten": len(aten.ops), "launches": launches.count, "syncs": len(syncs.calls)}
        aten = harness._AtenCounter()
        with aten:
            opt.step()
        opt.zero_grad(set_to_none=True)
        saved = harness.saved_bytes(lambda: _loss(model, x, n_pixel))
    return fwd_bwd, len(aten.ops), saved


def _count_sample(model, backend, dev):
    """ATen ops + Triton launches of one ``reverse`` of fixed z (sampling, no grad)."""
    with torch.no_grad():
        _, _, zs = model(batch(FIG_CFG, dev))
    run = sample_fn(model.reverse, FIG_CFG, [z.shape[1:] for z in zs], dev, torch.float32)
    with ff.use_backend(backend):
        run()  # warm-up outside the count
        aten, launches = harness._AtenCounter(), harness._LaunchCounter()
        with launches, aten:
            run()
    return {"aten": len(aten.ops), "launches": launches.count}


def cpu_figures() -> list[dict]:
    """On CUDA when there is a GPU (compiled kernels), else on CPU with the Triton kernels
    interpreted: the counts are the same."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = batch(FIG_CFG, dev)
    rows = []
    models = make_models(FIG_CFG, dev)
    eager, eager_opt, eager_saved = _count_step(models["eager"], x, "reference")
    floor, _, floor_saved = _count_step(models["floor"], x, "reference")
    ours, ours_opt, ours_saved = _count_step(models["fastflow"], x, "triton")
    try:  # the reference path under dispatch modes (a custom op re-run under vjp fails)
        ours_ref, _, ours_ref_saved = _count_step(make_models(FIG_CFG, dev)["fastflow"], x,
                                                  "reference")
    except Exception as e:
        err = f"not counted ({type(e).__name__}: {e})"[:120]
        ours_ref, ours_ref_saved = {"aten": err, "syncs": err}, err
    shape = FIG_CFG.label
    steps = FIG_CFG.n_flow * FIG_CFG.n_block
    rows.append({"figure": f"Glow train step fwd+bwd: ATen ops + Triton launches ({shape})",
                 "eager": eager["aten"], "fastflow": ours["aten"] + ours["launches"],
                 "ratio": eager["aten"] / (ours["aten"] + ours["launches"]),
                 "detail": f"per FlowStep ~{eager['aten'] / steps:.0f} eager vs "
                           f"~{(ours['aten'] + ours['launches']) / steps:.0f} fastflow (Triton "
                           f"path: {ours['aten']} ATen + {ours['launches']} launches; reference "
                           f"path {ours_ref['aten']} ATen); floor {floor['aten']} ATen; Adam step "
                           f"{eager_opt} ATen for both (fused, as timed)"})
    rows.append({"figure": f"Glow train step fwd+bwd: host syncs ({shape})",
                 "eager": eager["syncs"], "fastflow": ours["syncs"],
                 "detail": f"fastflow reference path {ours_ref['syncs']}; floor {floor['syncs']}; "
                           "counted: _local_scalar_dense/item/nonzero/equal/is_nonzero"})
    rows.append({"figure": f"Glow train step: bytes kept for backward ({shape})",
                 "eager": eager_saved, "fastflow": ours_saved,
                 "ratio": eager_saved / ours_saved if ours_saved else None,
                 "detail": f"fastflow reference path {ours_ref_saved}; floor {floor_saved}"})
    e_s = _count_sample(models["eager"], "reference", dev)
    o_s = _count_sample(models["fastflow"], "triton", dev)
    r_s = _count_sample(models["fastflow"], "reference", dev)
    rows.append({"figure": f"Glow sampling (reverse, no grad): ATen ops + Triton launches ({shape})",
                 "eager": e_s["aten"], "fastflow": o_s["aten"] + o_s["launches"],
                 "ratio": e_s["aten"] / (o_s["aten"] + o_s["launches"]),
                 "detail": f"Triton path {o_s['aten']} ATen + {o_s['launches']} launches; "
                           f"reference path {r_s['aten']} ATen"})
    return rows


# --------------------------------------------------------------------------------------
# pytest-benchmark (benchmarks/test_benchmarks.py)
# --------------------------------------------------------------------------------------


def benchmark_steps(device: str) -> list[tuple[str, object, object]]:
    """(id, step, check) triples: the training step of each implementation (small config on
    CPU), and a function giving its ``check_results`` entry: its loss and gradients against
    the eager peer's with the weights its model has when called (pytest-benchmark's steps
    train the models, so a peer model is loaded with them)."""
    quick = not device.startswith("cuda")
    out = []
    for cfg in configs(device, quick):
        models = make_models(cfg, device)
        x = batch(cfg, device)
        forwards = {impl: models[impl] for impl in ("floor", "eager", "fastflow")}
        if not quick:
            forwards["compile"] = torch.compile(models["eager"])
        for impl, forward in forwards.items():
            owner = models["eager"] if impl == "compile" else models[impl]

            def check(impl=impl, owner=owner, forward=forward, cfg=cfg, x=x):
                if impl == "floor":
                    return check_results({}, torch.float32)["floor"]
                peer = owner
                if impl == "fastflow":
                    peer = peer_glow.Glow(cfg.in_channel, cfg.n_flow, cfg.n_block,
                                          cfg.filter_size).to(device)
                    peer.load_state_dict(owner.state_dict(), strict=True)
                results = {"eager": _step_result(peer, peer, x, device, torch.float32)}
                if impl != "eager":
                    results[impl] = _step_result(owner, forward, x, device, torch.float32)
                return check_results(results, torch.float32)[impl]

            out.append((f"glow-train-{cfg.name}-{impl}".replace(" ", "_"),
                        train_step(owner, forward, x, device, torch.float32), check))
    return out
