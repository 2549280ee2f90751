"""``python -m fastflow train``: a multi-scale Glow on the embedded digits."""

from __future__ import annotations

import argparse

import torch

from .common import backend_name, pick_device, positive, run_dir, save_image_grid, write_json
from .loop import resume_or_start, train_epochs

DIGIT_LEVELS = 17  # the bundled digits hold the integer intensities 0..16


def _glow_parser():
    p = argparse.ArgumentParser(prog="python -m fastflow train",
                                description="Train a multi-scale Glow on the bundled digits.")
    p.add_argument("--epochs", type=positive(int), default=20)
    p.add_argument("--batch-size", type=positive(int), default=64)
    p.add_argument("--lr", type=positive(float), default=1e-3)
    p.add_argument("--n-flow", type=positive(int), default=8, help="steps per block")
    p.add_argument("--n-block", type=positive(int), default=2, help="squeeze levels")
    p.add_argument("--filter-size", type=positive(int), default=64, help="coupling net width")
    p.add_argument("--no-lu", action="store_true", help="plain InvConv2d instead of the LU one")
    p.add_argument("--additive", action="store_true", help="additive instead of affine coupling")
    p.add_argument("--size", type=positive(int), default=8, help="image side (digits resized)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (fullgraph)")
    p.add_argument("--out", default="runs/glow", help="results folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    p.add_argument("--max-steps", type=positive(int), default=None,
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
    from ..data import batches
    from ..glow import bits_per_dim

    total, n_pixel = 0.0, x[0].numel()
    for xb in batches(x, batch_size, shuffle=False):
        log_p, logdet, _ = model(glow_input(xb, generator))
        total += bits_per_dim(log_p, logdet, n_pixel, DIGIT_LEVELS).item() * xb.shape[0]
    return total / x.shape[0]


def main(argv=None) -> int:
    """``python -m fastflow train``: returns the exit status."""
    from ..data import digits
    from ..glow import Glow, bits_per_dim

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
          f"{n_params} parameters, device {device}, fastflow backend {backend_name(device)}")
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
