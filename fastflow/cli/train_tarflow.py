"""``python -m fastflow train-tarflow``: a small class-conditional TarFlow on the embedded
digits or the user's images (``--data``; sources without labels train it unconditional),
trained with Gaussian input noise (TarFlow's recipe) in fp32, bf16 or fp16 (``--precision``)
and sampled with the KV-cache sampler, the Jacobi sampler and classifier-free guidance, then
denoised by one score step."""

from __future__ import annotations

import argparse
import math

import torch

from .common import (HelpFormatter, add_cadence_options, add_data_options,
                     add_optimisation_options, add_precision_option, add_run_options,
                     add_step_options, backend_name, check_one_process, check_step_options,
                     finite, load_data, pick_device, positive, prepare_out, resume_data,
                     run_interruptible, save_image_grid, set_threads, write_metrics)
from .loop import StepRunner, resume_or_start, train_epochs

LR = 2e-3  # --lr's default on a fresh run
GUIDANCE = 1.0  # --guidance's default (class-conditional models)


def _parser():
    p = argparse.ArgumentParser(prog="python -m fastflow train-tarflow",
                                formatter_class=HelpFormatter,
                                description="Train a small TarFlow on the bundled digits or "
                                            "your images (--data).")
    g = p.add_argument_group("data")
    add_data_options(g)  # --size: the image side of the model too
    g = p.add_argument_group("optimisation")
    add_optimisation_options(g, epochs=6, lr=None,
                             lr_help=f"AdamW learning rate (None: {LR:g}, or with --resume the "
                                     "checkpoint's; a value given with --resume replaces it)")
    add_step_options(g, warmup=0)
    add_precision_option(g, help="autocast dtype of the training step, evaluation and sampling "
                                 "(the transformer follows it; the flow math and the "
                                 "likelihood stay float32); fp16 scales the loss")
    g = p.add_argument_group("model")
    g.add_argument("--patch-size", type=positive(int), default=2,
                   help="side of the square patches that make the tokens")
    g.add_argument("--channels", type=positive(int), default=32, help="transformer width")
    g.add_argument("--blocks", type=positive(int), default=4, help="autoregressive flow blocks")
    g.add_argument("--layers", type=positive(int), default=1, help="transformer layers per block")
    g.add_argument("--head-dim", type=positive(int), default=16, help="attention head width")
    g.add_argument("--noise-std", type=positive(float), default=0.1,
                   help="Gaussian noise added to the [-1, 1] images while training")
    g.add_argument("--unconditional", action="store_true",
                   help="no class labels (so always for a source without labels)")
    g.add_argument("--guidance", type=finite, default=None,
                   help=f"classifier-free guidance of samples (None: {GUIDANCE:g}; a class-"
                        "conditional model only: refused with --unconditional or a source "
                        "without labels)")
    g.add_argument("--temperature", type=positive(float), default=1.0,
                   help="sampling temperature")
    g = p.add_argument_group("run")
    add_cadence_options(g, evaluated="test nats/dim and checkpoint")
    add_run_options(g, out="runs/tarflow")
    return p


def to_model(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] to the model's range [-1, 1]."""
    return 2.0 * x - 1.0


def to_image(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1.0) / 2.0).clamp(0, 1)


def nll_per_dim(model, x, y, noise_std, generator):
    """Mean negative log-likelihood of the noisy images, nats per dimension (C*H*W), in the
    model's [-1, 1] scale: no dequantisation constant and no log-det of the [0, 1] -> [-1, 1]
    map (+ log((n_bins - 1) / 2) per dim gives the density of the noisy integer levels)."""
    noisy = x + noise_std * torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
    return -model.log_prob(noisy, y).mean() / x[0].numel()


def batch_input(levels: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Integer images to the model's [-1, 1], a batch at a time (the whole set as floats
    would be 4x its uint8 size)."""
    from ..data import levels_to_unit

    return to_model(levels_to_unit(levels, n_bins))


@torch.no_grad()
def _evaluate(model, levels, n_bins, y, noise_std, generator, runner, batch_size=256):
    """``nll_per_dim`` over the images ``levels`` (one noise draw each), weighted by the
    batches' sizes, under the run's autocast."""
    was = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(levels), batch_size):
        yb = None if y is None else y[i:i + batch_size]
        xb = batch_input(levels[i:i + batch_size], n_bins)
        with runner.autocast():
            nll = nll_per_dim(model, xb, yb, noise_std, generator)
        total += nll.item() * len(xb)
    model.train(was)
    return {"nll": total / len(levels)}


def main(argv=None) -> int:
    """``python -m fastflow train-tarflow``: returns the exit status (``INTERRUPTED`` on
    Ctrl-C)."""
    args = _parser().parse_args(argv)
    check_one_process("train-tarflow")
    return run_interruptible(lambda: _main(args), args.out)


def _main(args) -> int:
    from ..tarflow import TarFlow

    if args.unconditional and args.guidance is not None:
        raise SystemExit(f"--guidance: expected none with --unconditional (classifier-free "
                         f"guidance needs class labels), got --guidance {args.guidance:g}")
    check_step_options(args)
    device = pick_device(args.device)
    set_threads(args)
    torch.manual_seed(args.seed)
    ckpt_path = prepare_out(args.out, resume=args.resume, force=args.force)
    out = ckpt_path.parent

    train, test = load_data(args)
    channels, height, width = train.shape
    if height != width:
        raise SystemExit(f"--size: the images are {height}x{width}; TarFlow needs square "
                         "images (pass --size)")
    size = height
    if size % args.patch_size:
        raise SystemExit(f"--patch-size: expected a divisor of the image side (--size) {size}, "
                         f"got {args.patch_size}")
    heads = max(1, args.channels // args.head_dim)
    if args.channels % heads:
        raise SystemExit(f"--channels: expected a multiple of the {heads} attention heads "
                         f"(--channels // --head-dim), got {args.channels}")

    x_train, x_test, n_bins = train.levels.to(device), test.levels.to(device), train.n_bins
    labelled = train.labels is not None and test.labels is not None
    if not labelled and not args.unconditional:
        if args.guidance is not None:
            raise SystemExit(f"--guidance: expected none for {args.data}, which gives no class "
                             "labels (classifier-free guidance needs them; labels come with "
                             "digits and cifar10: only, none are read from a folder or an "
                             f"array file), got --guidance {args.guidance:g}")
        print(f"train-tarflow: {args.data} has no class labels; training unconditional "
              "(labels come with digits and cifar10: only; none are read from a folder or "
              "an array file)")
    num_classes = 0 if args.unconditional or not labelled else \
        int(max(train.labels.max(), test.labels.max())) + 1
    y_train = y_test = None
    if num_classes:
        y_train, y_test = train.labels.to(device), test.labels.to(device)
    config = {"size": size, "patch_size": args.patch_size, "channels": args.channels,
              "blocks": args.blocks, "layers": args.layers, "head_dim": args.head_dim,
              "noise_std": args.noise_std, "num_classes": num_classes,
              "image": [channels, height, width], "n_bins": train.n_bins}
    model = TarFlow(channels, size, args.patch_size, args.channels, args.blocks, args.layers,
                    num_classes, head_dim=args.head_dim, noise_std=args.noise_std).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr or LR, weight_decay=1e-4,
                            fused=True)
    runner = StepRunner(model.parameters(), opt, device=device, precision=args.precision,
                        clip=args.clip, warmup=args.warmup, base_lr=args.lr or LR)
    data = resume_data(args, train, test)
    shuffle_gen = torch.Generator().manual_seed(args.seed)
    noise_gen = torch.Generator().manual_seed(args.seed + 1)
    eval_gen = torch.Generator().manual_seed(args.seed + 2)
    generators = {"shuffle": shuffle_gen, "noise": noise_gen, "eval": eval_gen}  # resumed
    # checkpoints from before --data: the digits, held out with seed 0 whatever --seed
    start_epoch, step, history, partial = resume_or_start(
        args, ckpt_path, model, opt, config, generators, device, runner=runner, data=data,
        legacy={"image": [1, size, size], "n_bins": 17},
        legacy_split={"seed": 0}, metric="test nats/dim")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"train-tarflow: TarFlow on {len(x_train)} train / {len(x_test)} test images from "
          f"{args.data} ({channels}x{size}x{size}, {model.tokens} tokens of {model.dim}), "
          f"{args.blocks} blocks x {args.layers} layers, width {args.channels}, "
          f"{'unconditional' if num_classes == 0 else f'{num_classes} classes'}, "
          f"{n_params} parameters, {args.precision}, device {device}, "
          f"fastflow backend {backend_name(device)}")
    print(f"test nats/dim: -log p per C*H*W of the test images "
          f"{'given their labels ' if num_classes else ''}plus N(0, {args.noise_std:g}^2) noise, "
          f"in the model's [-1, 1] scale (a density: no dequantisation constant, not train's "
          f"bits/dim; + log({n_bins - 1} / 2) = {math.log((n_bins - 1) / 2):.3f} gives the "
          f"noisy levels' density)")
    # the same noise at every evaluation (as train's bits/dim), so that the epochs' numbers
    # compare and a resumed run reports those of the run it continues
    evaluate = lambda: _evaluate(model, x_test, n_bins, y_test, args.noise_std,  # noqa: E731
                                 eval_gen.manual_seed(args.seed + 2), runner)
    if history["initial"] is None:
        history["initial"] = evaluate()
        print(f"before training: test {history['initial']['nll']:.3f} nats/dim")

    # the loop shuffles a tensor of indices, so that each batch keeps its labels
    index = torch.arange(len(x_train), device=device)

    def loss_terms(idx):
        yb = None if y_train is None else y_train[idx]
        return {"nll": nll_per_dim(model, batch_input(x_train[idx], n_bins), yb, args.noise_std,
                                   noise_gen)}

    def describe(train, test):
        return (f"train {train['nll']:6.3f}  test "
                + ("  --  " if test is None else f"{test['nll']:6.3f}") + " nats/dim")

    def metrics(**more):
        return {"config": {**vars(args), "lr": runner.base_lr},  # the lr used
                "model": config, "history": history, **more}

    model.train()
    first_step = step  # a checkpoint is written once a step is taken (the last epoch's end)
    step, stopped = train_epochs(
        args, model=model, runner=runner, x_train=index, loss_terms=loss_terms,
        evaluate=evaluate, describe=describe, ckpt_path=ckpt_path, config=config,
        generators=generators, start=(start_epoch, step, partial), history=history, save=data,
        metrics=metrics)

    model.eval()
    n_show = 10
    y_show = None if num_classes == 0 else torch.arange(n_show, device=device) % num_classes
    guidance = 0.0 if num_classes == 0 else GUIDANCE if args.guidance is None else args.guidance
    gen = torch.Generator(device=device).manual_seed(args.seed)
    z = torch.randn(n_show, model.tokens, model.dim, generator=gen, device=device) * args.temperature
    stats = {}
    with torch.no_grad(), runner.autocast():
        raw = model.reverse(z, y_show, guidance=guidance)
        raw_jacobi = model.reverse(z, y_show, guidance=guidance, method="jacobi", stats=stats)
        data_rows = batch_input(x_test[:n_show], n_bins)
        z_data, _ = model(data_rows, None if y_test is None else y_test[:n_show])
        recon = model.reverse(z_data, None if y_test is None else y_test[:n_show])
    with runner.autocast():
        samples = model.denoise(raw, y_show)
    raw, raw_jacobi, recon, samples = (t.float() for t in (raw, raw_jacobi, recon, samples))
    jacobi_gap = (raw - raw_jacobi).abs().max().item()
    picture = save_image_grid(out / "tarflow_samples.png",
                              [to_image(data_rows), to_image(recon), to_image(raw),
                               to_image(samples), to_image(raw_jacobi)],
                              ["data", "x->z->x", f"w={guidance}", "denoised", "jacobi"])
    sampling = {"guidance": guidance, "temperature": args.temperature,
                "jacobi_iterations": stats.get("jacobi_iterations"), "tokens": model.tokens,
                "jacobi_vs_sequential_max_abs": jacobi_gap}
    written = write_metrics(out, metrics(sampling=sampling))
    final = (history["epochs"][-1]["test"] if history["epochs"] else history["initial"])["nll"]
    print(f"sampling: Jacobi iterations per block {sampling['jacobi_iterations']} for "
          f"{model.tokens} tokens, max |jacobi - sequential| {jacobi_gap:.2e}")
    print(f"{'stopped' if stopped else 'done'}: {step} steps, test "
          f"{history['initial']['nll']:.3f} -> {final:.3f} nats/dim ({args.precision}); "
          f"wrote {picture}, "
          + (f"{ckpt_path}, " if step > first_step else "")
          + ", ".join(str(p) for p in written), flush=True)
    if stopped:  # Ctrl-C or SIGTERM: its status and where --resume goes on from
        raise stopped()
    return 0
