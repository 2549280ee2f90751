"""``python -m fastflow train-vae``: the small conv VAE on the embedded digits or the user's
images (``--data``), in fp32, bf16 or fp16 (``--precision``)."""

from __future__ import annotations

import argparse

import torch

from .common import (HelpFormatter, add_cadence_options, add_data_options,
                     add_optimisation_options, add_precision_option, add_run_options,
                     add_step_options, backend_name, check_one_process, check_step_options,
                     load_data, pick_device, positive, prepare_out, resume_data,
                     run_interruptible, save_image_grid, set_threads, write_metrics)
from .loop import StepRunner, resume_or_start, train_epochs

LR = 2e-3  # --lr's default on a fresh run


def _vae_parser():
    p = argparse.ArgumentParser(prog="python -m fastflow train-vae",
                                formatter_class=HelpFormatter,
                                description="Train the small conv VAE on the bundled 8x8 digits "
                                            "or your images (--data).")
    g = p.add_argument_group("data")
    add_data_options(g)
    g = p.add_argument_group("model")
    g.add_argument("--latent", type=positive(int), default=8, help="latent dimensions")
    g.add_argument("--hidden", type=positive(int), default=32, help="conv channels")
    g.add_argument("--likelihood", choices=("bernoulli", "gaussian"), default="bernoulli",
                   help="the decoder's distribution of the pixels")
    g = p.add_argument_group("optimisation")
    add_optimisation_options(g, epochs=10, lr=None,
                             lr_help=f"Adam learning rate (None: {LR:g}, or with --resume the "
                                     "checkpoint's; a value given with --resume replaces it)")
    add_step_options(g, warmup=0)
    add_precision_option(g, help="autocast dtype of the training step, evaluation and sampling "
                                 "(the likelihood and KL stay float32); fp16 scales the loss")
    g = p.add_argument_group("run")
    add_cadence_options(g, evaluated="test -ELBO and checkpoint")
    add_run_options(g, out="runs/vae")
    return p


@torch.no_grad()
def _evaluate(model, levels, n_bins, batch_size, generator, runner):
    """Mean -ELBO, recon and KL over the images ``levels`` (one noise draw per sample),
    under the run's autocast."""
    from ..data import batches, levels_to_unit

    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for xb in batches(levels, batch_size, shuffle=False):
        with runner.autocast():
            recon, kl = model.terms(levels_to_unit(xb, n_bins), generator=generator)
        totals += torch.stack([recon.sum(), kl.sum()]).double().cpu()
    model.train()
    recon, kl = (totals / levels.shape[0]).tolist()
    return {"neg_elbo": recon + kl, "recon": recon, "kl": kl}


def main(argv=None) -> int:
    """``python -m fastflow train-vae``: returns the exit status (``INTERRUPTED`` on Ctrl-C)."""
    args = _vae_parser().parse_args(argv)
    check_one_process("train-vae")
    return run_interruptible(lambda: _main(args), args.out)


def _main(args) -> int:
    from ..data import levels_to_unit
    from ..vae import ConvVAE

    check_step_options(args)
    device = pick_device(args.device)
    set_threads(args)
    torch.manual_seed(args.seed)
    ckpt_path = prepare_out(args.out, resume=args.resume, force=args.force)
    out = ckpt_path.parent

    train, test = load_data(args)
    channels, height, width = train.shape
    if height != width or height % 2:
        raise SystemExit(f"--size: the images are {height}x{width}; the VAE needs square "
                         "images with an even side (pass an even --size)")
    # the Bernoulli likelihood wants values in [0, 1]: levels / (n_bins - 1), made per batch
    # (as train does: the whole set as floats would be 4x its uint8 size)
    x_train, x_test, n_bins = train.levels.to(device), test.levels.to(device), train.n_bins
    hyper = {k: getattr(args, k) for k in ("latent", "hidden", "likelihood")}
    config = {**hyper, "image": [channels, height, width], "n_bins": train.n_bins}
    model = ConvVAE(channels=channels, size=height, **hyper).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr or LR, fused=True)
    eval_gen = torch.Generator().manual_seed(args.seed + 1)  # seeds the op's noise, on CPU
    shuffle_gen = torch.Generator().manual_seed(args.seed)
    runner = StepRunner(model.parameters(), opt, device=device, precision=args.precision,
                        clip=args.clip, warmup=args.warmup, base_lr=args.lr or LR)
    data = resume_data(args, train, test)

    generators = {"shuffle": shuffle_gen, "eval": eval_gen}  # all saved and resumed
    # checkpoints from before --data: the digits, held out with seed 0 whatever --seed
    start_epoch, step, history, partial = resume_or_start(
        args, ckpt_path, model, opt, config, generators, device, runner=runner, data=data,
        legacy={"image": [1, 8, 8], "n_bins": 17},
        legacy_split={"seed": 0}, metric="test -ELBO")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"train-vae: {len(x_train)} train / {len(x_test)} test images from {args.data} "
          f"({channels}x{height}x{width}, {train.n_bins} levels), {n_params} parameters, "
          f"latent {args.latent}, {args.precision}, device {device}, "
          f"fastflow backend {backend_name(device)}")
    recon_is = (f"a Gaussian density of levels / {n_bins - 1}, not dequantised"
                if args.likelihood == "gaussian" else
                "the Bernoulli likelihood of the binary pixels" if n_bins == 2 else
                f"a Bernoulli cross-entropy with levels / {n_bins - 1}, not a likelihood of "
                f"the {n_bins} levels")
    print(f"test -ELBO: nats per image (one posterior sample each), recon summed over the "
          f"C*H*W pixels ({recon_is}) + KL")
    # the same noise at every evaluation (as train's bits/dim), so that the epochs' numbers
    # compare and a resumed run reports those of the run it continues
    evaluate = lambda: _evaluate(model, x_test, n_bins, 256,  # noqa: E731
                                 eval_gen.manual_seed(args.seed + 1), runner)
    if history["initial"] is None:
        history["initial"] = evaluate()
        print(f"before training: test -ELBO {history['initial']['neg_elbo']:.3f} nats")

    def loss_terms(xb):
        terms = model.loss(levels_to_unit(xb, n_bins))
        return {"neg_elbo": terms["loss"], "recon": terms["recon"], "kl": terms["kl"]}

    def describe(train, test):
        return (f"train -ELBO {train['neg_elbo']:8.3f} (recon {train['recon']:7.3f} + "
                f"KL {train['kl']:6.3f})  "
                + ("test -ELBO    --" if test is None else
                   f"test -ELBO {test['neg_elbo']:8.3f} (recon {test['recon']:7.3f} + "
                   f"KL {test['kl']:6.3f})"))

    def metrics():
        return {"config": {**vars(args), "lr": runner.base_lr},  # the lr used
                "model": config, "history": history}

    first_step = step  # a checkpoint is written once a step is taken (the last epoch's end)
    step, stopped = train_epochs(args, model=model, runner=runner, x_train=x_train,
                                 loss_terms=loss_terms, evaluate=evaluate, describe=describe,
                                 ckpt_path=ckpt_path, config=config, generators=generators,
                                 start=(start_epoch, step, partial), history=history,
                                 save=data, metrics=metrics)

    model.eval()
    originals = levels_to_unit(x_test[:12], n_bins)
    with runner.autocast():
        rows = [originals, model.reconstruct(originals),
                model.sample(12, generator=torch.Generator(device=device).manual_seed(args.seed))]
    picture = save_image_grid(out / "vae_samples.png", rows, ["data", "recon", "samples"])
    written = write_metrics(out, metrics())
    final = history["epochs"][-1]["test"] if history["epochs"] else history["initial"]
    print(f"{'stopped' if stopped else 'done'}: {step} steps, test -ELBO "
          f"{history['initial']['neg_elbo']:.3f} -> {final['neg_elbo']:.3f} nats "
          f"({args.precision}); wrote {picture}, "
          + (f"{ckpt_path}, " if step > first_step else "")
          + ", ".join(str(p) for p in written), flush=True)
    if stopped:  # Ctrl-C or SIGTERM: its status and where --resume goes on from
        raise stopped()
    return 0
