"""``python -m fastflow train-vae``: the small conv VAE on the embedded digits."""

from __future__ import annotations

import argparse

import torch

from .common import (HelpFormatter, add_optimisation_options, add_run_options, backend_name,
                     pick_device, positive, prepare_out, save_image_grid, write_json)
from .loop import resume_or_start, train_epochs


def _vae_parser():
    p = argparse.ArgumentParser(prog="python -m fastflow train-vae",
                                formatter_class=HelpFormatter,
                                description="Train the small conv VAE on the bundled 8x8 digits.")
    add_optimisation_options(p, epochs=10, lr=2e-3)
    p.add_argument("--latent", type=positive(int), default=8)
    p.add_argument("--hidden", type=positive(int), default=32, help="conv channels")
    p.add_argument("--likelihood", choices=("bernoulli", "gaussian"), default="bernoulli")
    add_run_options(p, out="runs/vae")
    return p


@torch.no_grad()
def _evaluate(model, x, batch_size, generator):
    """Mean -ELBO, recon and KL over ``x`` (one noise draw per sample)."""
    from ..data import batches

    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for xb in batches(x, batch_size, shuffle=False):
        recon, kl = model.terms(xb, generator=generator)
        totals += torch.stack([recon.sum(), kl.sum()]).double().cpu()
    model.train()
    recon, kl = (totals / x.shape[0]).tolist()
    return {"neg_elbo": recon + kl, "recon": recon, "kl": kl}


def main(argv=None) -> int:
    """``python -m fastflow train-vae``: returns the exit status."""
    from ..data import digits
    from ..vae import ConvVAE

    args = _vae_parser().parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    ckpt_path = prepare_out(args.out, resume=args.resume, force=args.force)
    out = ckpt_path.parent

    x_train = digits("train")[0].to(device)
    x_test = digits("test")[0].to(device)
    config = {k: getattr(args, k) for k in ("latent", "hidden", "likelihood")}
    model = ConvVAE(channels=1, size=8, **config).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    eval_gen = torch.Generator().manual_seed(args.seed + 1)  # seeds the op's noise, on CPU
    shuffle_gen = torch.Generator().manual_seed(args.seed)

    generators = {"shuffle": shuffle_gen, "eval": eval_gen}  # all saved and resumed
    start_epoch, step, history, partial = resume_or_start(args, ckpt_path, model, opt, config,
                                                          generators, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"train-vae: {len(x_train)} train / {len(x_test)} test digits (1x8x8), "
          f"{n_params} parameters, latent {args.latent}, device {device}, "
          f"fastflow backend {backend_name(device)}")
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
                        generators=generators, start=(start_epoch, step, partial),
                        history=history)

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
