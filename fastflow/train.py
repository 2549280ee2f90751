"""Training commands and the pieces they share.

Shared (for every trainer): ``pick_device``, ``run_dir`` (results under ``runs/<name>/``),
``progress`` (tqdm when installed, plain prints otherwise), ``save_checkpoint`` /
``load_checkpoint`` (model + optimizer + any state, resumable), ``save_image_grid`` (a PNG of
image rows via matplotlib) and ``write_json``.

Commands: ``train_glow_main`` -> ``python -m fastflow train``, ``train_vae_main`` ->
``python -m fastflow train-vae``, ``bench_main`` -> ``bench``, ``demo_main`` -> ``demo``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

# --------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_dir(out: str | os.PathLike) -> Path:
    """The results folder (created): ``runs/<name>`` by convention."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


class _PlainProgress:
    """The fallback progress bar: a line every ``every`` steps and at the end."""

    def __init__(self, iterable, total, desc, every):
        self.iterable, self.total, self.desc, self.every = iterable, total, desc, every
        self.postfix, self.n, self.start = "", 0, time.perf_counter()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1
            if self.every != math.inf and (self.n % self.every == 0 or self.n == self.total):
                rate = self.n / max(time.perf_counter() - self.start, 1e-9)
                print(f"{self.desc} {self.n}/{self.total or '?'} ({rate:.1f} it/s) {self.postfix}",
                      file=sys.stderr, flush=True)

    def set_postfix_str(self, text):
        self.postfix = text

    def close(self):
        pass


def progress(iterable, *, total: int | None = None, desc: str = "", enabled: bool = True,
             every: int = 50):
    """A progress bar over ``iterable`` with ``set_postfix_str``/``close``: tqdm when it is
    installed and ``enabled``, else plain lines on stderr (silent when not ``enabled``)."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    return _PlainProgress(iterable, total, desc, every if enabled else math.inf)


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, **state) -> Path:
    """Write model (and optimizer) state plus any extra picklable ``state`` (epoch, step,
    config, history, RNG state...) atomically: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": model.state_dict(), **state}
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    map_location=None) -> dict:
    """Restore ``model`` (and ``optimizer``) from ``save_checkpoint``'s file; returns the
    extra state saved with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint at {path}")
    payload = torch.load(path, map_location=map_location, weights_only=False)
    model.load_state_dict(payload.pop("model"))
    opt_state = payload.pop("optimizer", None)
    if optimizer is not None and opt_state is not None:
        optimizer.load_state_dict(opt_state)
    return payload


def save_image_grid(path: str | os.PathLike, rows, titles=None, *, scale: float = 0.6) -> Path:
    """A PNG with one row per tensor in ``rows`` (each (n, C, H, W) in [0, 1], C = 1 or 3),
    ``titles`` labelling the rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r.detach().float().clamp(0, 1).cpu() for r in rows]
    n_cols = max(r.shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), n_cols, squeeze=False,
                             figsize=(scale * n_cols + 1.2, scale * len(rows) + 0.3))
    for i, r in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < r.shape[0]:
                img = r[j]
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(img.permute(1, 2, 0).numpy())
        if titles:
            axes[i][0].set_ylabel(titles[i], rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout(pad=0.2)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_json(path: str | os.PathLike, data) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
        return value

    return parse


# --------------------------------------------------------------------------------------
# The training loop both commands share
# --------------------------------------------------------------------------------------


def resume_or_start(args, ckpt_path: Path, model, opt, config: dict, generators: dict, device):
    """(start_epoch, step, history): from ``ckpt_path`` when ``--resume`` finds it (model,
    optimizer, the named generators' and torch's RNG states come back; a different
    ``config`` is refused), else a fresh start."""
    if not (args.resume and ckpt_path.is_file()):
        return 0, 0, {"initial": None, "epochs": []}
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=False).get("config")
    if saved != config:
        raise SystemExit(f"--resume: {ckpt_path} was trained with {saved}, got {config}")
    state = load_checkpoint(ckpt_path, model, opt, map_location=device)
    for name, gen in generators.items():
        gen.set_state(state["rng"][name])
    torch.set_rng_state(state["torch_rng"])
    print(f"resumed from {ckpt_path} at epoch {state['epoch']}, step {state['step']}")
    return state["epoch"], state["step"], state["history"]


def train_epochs(args, *, model, opt, x_train, loss_terms, evaluate, describe, ckpt_path,
                 config, generators, start, history) -> int:
    """Shuffled mini-batches (``generators["shuffle"]``), one optimizer step per batch on
    the first value of ``loss_terms(xb)`` (a dict of scalars, all averaged per epoch), then
    ``evaluate()`` on the test split, a line ``describe(train, test)`` and a checkpoint, per
    epoch; until ``args.epochs`` or ``args.max_steps``. ``start`` = (epoch, step) to go on
    from; returns the step count."""
    from .data import batches

    epoch0, step = start
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    t0 = time.perf_counter()
    for epoch in range(epoch0, args.epochs):
        if args.max_steps is not None and step >= args.max_steps:
            break
        sums, seen = None, 0
        bar = progress(batches(x_train, args.batch_size, generator=generators["shuffle"]),
                       total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                       enabled=not args.no_progress)
        for xb in bar:
            terms = loss_terms(xb)
            loss = next(iter(terms.values()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += xb.shape[0]
            batch = torch.stack([t.detach() for t in terms.values()]).double() * xb.shape[0]
            sums = batch if sums is None else sums + batch
            if step % 10 == 0:
                bar.set_postfix_str(f"{next(iter(terms))} {loss.item():.3f}")
            if args.max_steps is not None and step >= args.max_steps:
                break
        bar.close()
        train = dict(zip(terms, (sums / max(seen, 1)).tolist()))
        test = evaluate()
        history["epochs"].append({"epoch": epoch + 1, "step": step, "train": train,
                                  "test": test})
        print(f"epoch {epoch + 1:3d}/{args.epochs}  {describe(train, test)}  "
              f"{time.perf_counter() - t0:6.1f}s", flush=True)
        save_checkpoint(ckpt_path, model, opt, epoch=epoch + 1, step=step, history=history,
                        config=config, rng={k: g.get_state() for k, g in generators.items()},
                        torch_rng=torch.get_rng_state())
    return step


# --------------------------------------------------------------------------------------
# train-vae
# --------------------------------------------------------------------------------------


def _vae_parser():
    p = argparse.ArgumentParser(prog="python -m fastflow train-vae",
                                description="Train the small conv VAE on the bundled 8x8 digits.")
    p.add_argument("--epochs", type=_positive(int), default=10)
    p.add_argument("--batch-size", type=_positive(int), default=64)
    p.add_argument("--lr", type=_positive(float), default=2e-3)
    p.add_argument("--latent", type=_positive(int), default=8)
    p.add_argument("--hidden", type=_positive(int), default=32, help="conv channels")
    p.add_argument("--likelihood", choices=("bernoulli", "gaussian"), default="bernoulli")
    p.add_argument("--out", default="runs/vae", help="results folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    p.add_argument("--max-steps", type=_positive(int), default=None,
                   help="stop after this many optimizer steps in total")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt when it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@torch.no_grad()
def _evaluate(model, x, batch_size, generator):
    """Mean -ELBO, recon and KL over ``x`` (one noise draw per sample)."""
    from .data import batches

    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for xb in batches(x, batch_size, shuffle=False):
        recon, kl = model.terms(xb, generator=generator)
        totals += torch.stack([recon.sum(), kl.sum()]).double().cpu()
    model.train()
    recon, kl = (totals / x.shape[0]).tolist()
    return {"neg_elbo": recon + kl, "recon": recon, "kl": kl}


def train_vae_main(argv=None) -> int:
    """``python -m fastflow train-vae``: returns the exit status."""
    from .data import digits
    from .vae import ConvVAE

    args = _vae_parser().parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    out = run_dir(args.out)
    ckpt_path = out / "checkpoint.pt"

    x_train = digits("train")[0].to(device)
    x_test = digits("test")[0].to(device)
    config = {k: getattr(args, k) for k in ("latent", "hidden", "likelihood")}
    model = ConvVAE(channels=1, size=8, **config).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    eval_gen = torch.Generator().manual_seed(args.seed + 1)  # seeds the op's noise, on CPU
    shuffle_gen = torch.Generator().manual_seed(args.seed)

    generators = {"shuffle": shuffle_gen}
    start_epoch, step, history = resume_or_start(args, ckpt_path, model, opt, config,
                                                 generators, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"train-vae: {len(x_train)} train / {len(x_test)} test digits (1x8x8), "
          f"{n_params} parameters, latent {args.latent}, device {device}, "
          f"fastflow backend {_backend_name(device)}")
    if history["initial"] is None:
        history["initial"] = _evaluate(model, x_test, 256, eval_gen)
        print(f"before training: test -ELBO {history['initial']['neg_elbo']:.3f} nats")

    def loss_terms(xb):
        terms = model.loss(xb)
        return {"neg_elbo": terms["loss"], "recon": terms["recon"], "kl": terms["kl"]}

    def describe(train, test):
        return (f"train -ELBO {train['neg_elbo']:8.3f} (recon {train['recon']:7.3f} + "
                f"KL {train['kl']:6.3f})  test -ELBO {test['neg_elbo']:8.3f} "
                f"(recon {test['recon']:7.3f} + KL {test['kl']:6.3f})")

    step = train_epochs(args, model=model, opt=opt, x_train=x_train, loss_terms=loss_terms,
                        evaluate=lambda: _evaluate(model, x_test, 256, eval_gen),
                        describe=describe, ckpt_path=ckpt_path, config=config,
                        generators=generators, start=(start_epoch, step), history=history)

    model.eval()
    originals = x_test[:12]
    picture = save_image_grid(
        out / "vae_samples.png",
        [originals, model.reconstruct(originals),
         model.sample(12, generator=torch.Generator(device=device).manual_seed(args.seed))],
        ["data", "recon", "samples"])
    write_json(out / "metrics.json", {"config": vars(args), "history": history})
    final = history["epochs"][-1]["test"] if history["epochs"] else history["initial"]
    print(f"done: {step} steps, test -ELBO {history['initial']['neg_elbo']:.3f} -> "
          f"{final['neg_elbo']:.3f} nats; wrote {picture}, {ckpt_path}, {out / 'metrics.json'}")
    return 0


def _backend_name(device: torch.device) -> str:
    from .backend import current_mode

    mode = current_mode()
    if mode == "auto":
        return "triton" if device.type == "cuda" else "reference"
    return mode


# --------------------------------------------------------------------------------------
# train (Glow)
# --------------------------------------------------------------------------------------

DIGIT_LEVELS = 17  # the bundled digits hold the integer intensities 0..16


def _glow_parser():
    p = argparse.ArgumentParser(prog="python -m fastflow train",
                                description="Train a multi-scale Glow on the bundled digits.")
    p.add_argument("--epochs", type=_positive(int), default=20)
    p.add_argument("--batch-size", type=_positive(int), default=64)
    p.add_argument("--lr", type=_positive(float), default=1e-3)
    p.add_argument("--n-flow", type=_positive(int), default=8, help="steps per block")
    p.add_argument("--n-block", type=_positive(int), default=2, help="squeeze levels")
    p.add_argument("--filter-size", type=_positive(int), default=64, help="coupling net width")
    p.add_argument("--no-lu", action="store_true", help="plain InvConv2d instead of the LU one")
    p.add_argument("--additive", action="store_true", help="additive instead of affine coupling")
    p.add_argument("--size", type=_positive(int), default=8, help="image side (digits resized)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (fullgraph)")
    p.add_argument("--out", default="runs/glow", help="results folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    p.add_argument("--max-steps", type=_positive(int), default=None,
                   help="stop after this many optimizer steps in total")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def glow_input(x: torch.Tensor, generator=None, n_bins: int = DIGIT_LEVELS) -> torch.Tensor:
    """Glow's dequantised input: integer levels / n_bins - 0.5 plus uniform noise / n_bins."""
    levels = torch.round(x * (n_bins - 1))
    noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device)
    return levels / n_bins - 0.5 + noise / n_bins


@torch.no_grad()
def _glow_bpd(model, x, batch_size, generator):
    """Mean bits per dimension over ``x`` (one dequantisation draw per image)."""
    from .data import batches
    from .glow import bits_per_dim

    total, n_pixel = 0.0, x[0].numel()
    for xb in batches(x, batch_size, shuffle=False):
        log_p, logdet, _ = model(glow_input(xb, generator))
        total += bits_per_dim(log_p, logdet, n_pixel, DIGIT_LEVELS).item() * xb.shape[0]
    return total / x.shape[0]


def train_glow_main(argv=None) -> int:
    """``python -m fastflow train``: returns the exit status."""
    from .data import digits
    from .glow import Glow, bits_per_dim

    args = _glow_parser().parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    out = run_dir(args.out)
    ckpt_path = out / "checkpoint.pt"
    side = 2 ** args.n_block
    if args.size % side:
        raise SystemExit(f"--size: expected a multiple of 2**n_block = {side}, got {args.size}")

    x_train = digits("train", size=args.size)[0].to(device)
    x_test = digits("test", size=args.size)[0].to(device)
    config = {"n_flow": args.n_flow, "n_block": args.n_block, "filter_size": args.filter_size,
              "conv_lu": not args.no_lu, "affine": not args.additive, "size": args.size}
    model = Glow(1, args.n_flow, args.n_block, affine=config["affine"],
                 conv_lu=config["conv_lu"], filter_size=args.filter_size).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    shuffle_gen = torch.Generator().manual_seed(args.seed)
    noise_gen = torch.Generator().manual_seed(args.seed + 1)
    eval_gen = torch.Generator().manual_seed(args.seed + 2)
    n_pixel = x_train[0].numel()

    generators = {"shuffle": shuffle_gen, "noise": noise_gen}
    start_epoch, step, history = resume_or_start(args, ckpt_path, model, opt, config,
                                                 generators, device)
    if history["initial"] is None:  # a fresh start
        with torch.no_grad():  # ActNorm's data-dependent initialisation on a large batch
            model(glow_input(x_train[:512], noise_gen))
    step_fn = torch.compile(model, fullgraph=True) if args.compile else model
    n_params = sum(p.numel() for p in model.parameters())
    print(f"train: Glow on {len(x_train)} train / {len(x_test)} test digits "
          f"(1x{args.size}x{args.size}), {args.n_block} blocks x {args.n_flow} steps, "
          f"{n_params} parameters, device {device}, fastflow backend {_backend_name(device)}")
    if history["initial"] is None:
        history["initial"] = {"bpd": _glow_bpd(model, x_test, 256, eval_gen)}
        print(f"before training: test {history['initial']['bpd']:.3f} bits/dim")

    def loss_terms(xb):
        log_p, logdet, _ = step_fn(glow_input(xb, noise_gen))
        return {"bpd": bits_per_dim(log_p, logdet, n_pixel, DIGIT_LEVELS)}

    step = train_epochs(
        args, model=model, opt=opt, x_train=x_train, loss_terms=loss_terms,
        evaluate=lambda: {"bpd": _glow_bpd(model, x_test, 256, eval_gen)},
        describe=lambda tr, te: f"train {tr['bpd']:6.3f}  test {te['bpd']:6.3f} bits/dim",
        ckpt_path=ckpt_path, config=config, generators=generators,
        start=(start_epoch, step), history=history)

    model.eval()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    samples = model.sample(12, temperature=args.temperature, generator=gen)
    with torch.no_grad():
        data = x_test[:12]
        _, _, z = model(glow_input(data, eval_gen))
        recon = model.reverse(z, reconstruct=True)
    to_image = lambda t: ((t + 0.5) * DIGIT_LEVELS / (DIGIT_LEVELS - 1)).clamp(0, 1)  # noqa: E731
    picture = save_image_grid(out / "glow_samples.png", [data, to_image(recon), to_image(samples)],
                              ["data", "x->z->x", f"T={args.temperature}"])
    write_json(out / "metrics.json", {"config": vars(args), "history": history})
    final = (history["epochs"][-1]["test"] if history["epochs"] else history["initial"])["bpd"]
    print(f"done: {step} steps, test {history['initial']['bpd']:.3f} -> {final:.3f} bits/dim; "
          f"wrote {picture}, {ckpt_path}, {out / 'metrics.json'}")
    return 0


# --------------------------------------------------------------------------------------
# bench and demo
# --------------------------------------------------------------------------------------


def _benchmarks_run():
    """benchmarks/run.py of the source tree this package runs from."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
    if not path.is_file():
        raise SystemExit(f"bench: needs the source tree's benchmarks/run.py, not found at {path}")
    spec = importlib.util.spec_from_file_location("fastflow_bench_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_main(argv=None) -> int:
    """``python -m fastflow bench [run.py options]``: the benchmark tables for this device."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # figures run the kernels interpreted
    return _benchmarks_run().main(argv)


def demo_main(argv=None) -> int:
    """``python -m fastflow demo`` (``make demo``): the benchmark tables for this device, then
    a short Glow training run on the embedded digits with samples written to runs/demo."""
    p = argparse.ArgumentParser(prog="python -m fastflow demo", description=demo_main.__doc__)
    p.add_argument("--epochs", type=_positive(int), default=4)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--skip-bench", action="store_true")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not args.skip_bench:
        print("== 1. benchmarks ==", flush=True)
        bench_args = ["--out", str(Path(args.out) / "bench")]
        if not cuda:  # CPU: small shapes; the timings say nothing about GPU speed
            bench_args.append("--quick")
        bench_main(bench_args)
    print("\n== 2. Glow on the embedded digits ==", flush=True)
    return train_glow_main(["--epochs", str(args.epochs), "--out", str(Path(args.out) / "glow"),
                            "--no-progress"])
