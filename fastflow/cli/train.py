"""``python -m fastflow train``: a multi-scale Glow on the embedded digits or the user's images
(one process, or several with ``torchrun --nproc_per_node N -m fastflow train ...``)."""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from ..data import DIGIT_LEVELS
from .common import (HelpFormatter, add_cadence_options, add_data_options,
                     add_optimisation_options, add_precision_option, add_run_options,
                     add_step_options, backend_name, check_resume_batch, check_resume_config,
                     check_resume_data, check_step_options, check_test_fraction, load_data,
                     positive, prepare_out, progress, read_checkpoint, remove_earlier_run,
                     resume_data, rng_state, run_interruptible, save_checkpoint,
                     save_image_grid, say_changed_options, say_nothing_left, set_rng_state,
                     set_threads, step_options, stop_between_steps, write_metrics)
from .loop import Distributed, StepRunner, epoch_generator, epoch_order

INIT_IMAGES = 512  # ActNorm's data-dependent initialisation: this many training images


def _temperatures(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not (0 < v < math.inf) for v in values):
        raise argparse.ArgumentTypeError(f"expected positive temperatures, got {text!r}")
    return values


def _glow_parser():
    p = argparse.ArgumentParser(
        prog="python -m fastflow train", formatter_class=HelpFormatter,
        description="Train a multi-scale Glow. Several processes: torchrun --nproc_per_node N "
                    "-m fastflow train ... (DistributedDataParallel; rank 0 writes).")
    g = p.add_argument_group("data")
    add_data_options(g, test_fraction_help="held-out share for test bits/dim (digits: 0.2; "
                                           "CIFAR: its test batch)",
                     n_bits_help="keep the top N bits of 8-bit images (Glow's 5-bit setting); "
                                 "the bits/dim constant follows")
    g.add_argument("--hflip", action="store_true", help="random horizontal flips")
    g = p.add_argument_group("model")
    g.add_argument("--n-flow", type=positive(int), default=8, help="steps per block")
    g.add_argument("--n-block", type=positive(int), default=2, help="squeeze levels")
    g.add_argument("--filter-size", type=positive(int), default=64, help="coupling net width")
    g.add_argument("--no-lu", action="store_true", help="plain InvConv2d instead of the LU one")
    g.add_argument("--additive", action="store_true",
                   help="additive instead of affine coupling")
    g = p.add_argument_group("optimisation")
    add_optimisation_options(
        g, epochs=20, lr=None, batch_help="global batch: split evenly across torchrun's processes",
        lr_help="Adam learning rate (None: 1e-3, or with --resume the checkpoint's; a value "
                "given with --resume replaces the checkpoint's)")
    add_step_options(g, warmup=100)
    add_precision_option(g, help="autocast dtype of the coupling networks and priors (flow "
                                 "layers, log-dets and the likelihood stay float32); fp16 "
                                 "scales the loss")
    g = p.add_argument_group("run")
    add_run_options(g, out="runs/glow")
    g.add_argument("--temperature", type=_temperatures, default="0.7",
                   help="sampling temperature(s), comma-separated: one grid row each")
    g.add_argument("--n-samples", type=positive(int), default=12, help="images per grid row")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (fullgraph, except with --reversible)")
    g.add_argument("--reversible", action="store_true",
                   help="rebuild each flow step's input from its output in backward instead of "
                        "keeping activations (memory flat in --n-flow, same gradients)")
    g.add_argument("--cuda-graph", action="store_true",
                   help="CUDA only, one process, not with --compile: capture the whole "
                        "training step (forward, backward, non-finite check, clipping, warmup "
                        "lr, fused Adam) as one CUDA graph after 3 eager steps and replay it "
                        "per batch (the last partial batch of an epoch is dropped, as always)")
    add_cadence_options(g, evaluated="test bits/dim, sample grid and checkpoint")
    return p


def glow_input(x: torch.Tensor, generator=None, n_bins: int = DIGIT_LEVELS) -> torch.Tensor:
    """Glow's dequantised input of images in [0, 1]: integer levels / n_bins - 0.5 plus
    uniform noise / n_bins."""
    levels = torch.round(x * (n_bins - 1))
    noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device)
    return levels / n_bins - 0.5 + noise / n_bins


def to_unit(x: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Glow's [-0.5, 0.5) space back to images in [0, 1] (for pictures and the scorer): the
    level whose dequantisation bin holds x (Glow's floor), as ``levels_to_unit`` shows it."""
    levels = torch.floor((x.float() + 0.5) * n_bins).clamp(0, n_bins - 1)
    return levels / (n_bins - 1)


@torch.no_grad()
def evaluate_bpd(model, images, seed: int, runner, device, batch_size: int = 256) -> float:
    """Mean test bits/dim over ``images`` (an ImageSet), one dequantisation draw each: the
    same draws at every evaluation (a generator seeded with ``seed``), so that the epochs'
    numbers compare and a resumed run reports those of the run it continues."""
    from ..data import dequantize
    from ..glow import bits_per_dim

    was_training = model.training
    model.eval()
    n_pixel, total = math.prod(images.shape), 0.0
    generator = torch.Generator().manual_seed(seed)
    sums = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(images), batch_size):
        levels = images.levels[start:start + batch_size]
        noise = torch.rand(levels.shape, generator=generator)
        x = dequantize(levels, images.n_bins, noise).to(device)
        with runner.autocast():
            log_p, logdet, _ = model(x)
        bpd = bits_per_dim(log_p.float(), logdet.float(), n_pixel, images.n_bins)
        sums += bpd.double() * x.shape[0]
    total = float(sums) / len(images)
    model.train(was_training)
    return total


@torch.no_grad()
def picture_rows(model, test, args, device):
    """The grid: data, x -> z -> x, then one row of samples per temperature."""
    from ..data import dequantize, levels_to_unit

    model.eval()
    n = min(args.n_samples, len(test))
    data = test.levels[:n]
    x = dequantize(data, test.n_bins, torch.full(data.shape, 0.5)).to(device)
    _, _, z = model(x)
    rows = [levels_to_unit(data, test.n_bins),  # these n, not the whole held-out set
            to_unit(model.reverse(z, reconstruct=True), test.n_bins)]
    titles = ["data", "x->z->x"]
    for t in args.temperature:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        rows.append(to_unit(model.sample(args.n_samples, temperature=t, generator=gen,
                                         image_size=test.shape[1:]), test.n_bins))
        titles.append(f"T={t:g}")
    model.train()
    return rows, titles


@torch.no_grad()
def score_samples(model, test, args, device, n: int = 200) -> dict:
    """For digits: the digit classifier's recognition of ``n`` samples per temperature."""
    from ..data import digit_score

    model.eval()
    scores = {}
    for t in args.temperature:
        gen = torch.Generator(device=device).manual_seed(args.seed + 3)
        samples = model.sample(n, temperature=t, generator=gen, image_size=test.shape[1:])
        scores[f"{t:g}"] = digit_score(to_unit(samples, test.n_bins))
    model.train()
    return scores


def training_options(args) -> dict:
    """The options of the training step that --resume takes as given (the learning rate
    has its own message): saved with the checkpoint, so that a change is said."""
    return {**step_options(args), "hflip": args.hflip}


def main(argv=None) -> int:
    """``python -m fastflow train``: returns the exit status."""
    from ..data import dequantize
    from ..glow import Glow, bits_per_dim

    args = _glow_parser().parse_args(argv)
    check_test_fraction(args)
    check_step_options(args)
    if args.cuda_graph and args.compile:
        raise SystemExit("--cuda-graph: expected without --compile (it captures the eager "
                         "step), got both")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.cuda_graph and world > 1:
        raise SystemExit(f"--cuda-graph: expected one process, got {world} (torchrun's "
                         "DistributedDataParallel all-reduces are not captured)")
    dist_ = Distributed(args.device)
    try:
        return run_interruptible(lambda: _train(args, dist_, Glow, bits_per_dim, dequantize),
                                 args.out, quiet=not dist_.is_main)
    finally:
        dist_.close()


def _train(args, dist_, Glow, bits_per_dim, dequantize) -> int:
    device, main_rank = dist_.device, dist_.is_main
    if args.cuda_graph and device.type != "cuda":
        raise SystemExit(f"--cuda-graph: needs a CUDA device, got {device}")
    set_threads(args)
    ckpt_path = prepare_out(args.out, resume=args.resume, force=args.force, write=main_rank)
    out = ckpt_path.parent
    say = print if main_rank else (lambda *a, **k: None)

    train, test = load_data(args, say)
    channels, height, width = train.shape
    side = 2 ** args.n_block
    if height % side or width % side:
        raise SystemExit(f"--size: the images are {height}x{width}; Glow with --n-block "
                         f"{args.n_block} needs sides divisible by {side} (pass a --size "
                         f"divisible by {side})")
    if args.batch_size % dist_.world:
        raise SystemExit(f"--batch-size: the global batch {args.batch_size} must split evenly "
                         f"across {dist_.world} processes")
    steps_per_epoch = len(train) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"--batch-size: {args.batch_size} exceeds the {len(train)} training "
                         "images")
    n_pixel, n_bins = channels * height * width, train.n_bins

    data = resume_data(args, train, test)  # the held-out split and the images, for --resume
    config = {"n_flow": args.n_flow, "n_block": args.n_block, "filter_size": args.filter_size,
              "conv_lu": not args.no_lu, "affine": not args.additive,
              "image": [channels, height, width], "n_bins": n_bins}
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = Glow(channels, args.n_flow, args.n_block, affine=config["affine"],
                 conv_lu=config["conv_lu"], filter_size=args.filter_size,
                 reversible=args.reversible).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr or 1e-3, fused=True)

    history, step, start_epoch, base_lr = {"initial": None, "epochs": []}, 0, 0, args.lr or 1e-3
    saved = read_checkpoint(ckpt_path, map_location=device) if args.resume and \
        ckpt_path.is_file() else None
    runner_state, partial = None, None
    if saved is not None:
        check_resume_config(saved.get("config"), config, ckpt_path)
        check_resume_data(saved, ckpt_path, data, args.data)
        try:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            start_epoch, step, history = saved["epoch"], saved["step"], saved["history"]
            partial = saved.get("partial")  # an epoch a --max-steps stop left unfinished
            # the epoch's order is drawn from --seed: the rest of it needs the same one
            check_resume_batch(partial, ckpt_path, start_epoch, args.batch_size, args.seed)
            set_rng_state(saved["rng"], device=device)
            old_lr, runner_state = float(saved["lr"]), saved["step_runner"]
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise SystemExit(f"--resume: {ckpt_path} is not a complete `fastflow train` "
                             f"checkpoint ({type(err).__name__}: {err})") from None
        base_lr = args.lr if args.lr is not None else old_lr
        # the step's other options apply as given on --resume: said when they changed
        say_changed_options(saved.get("training"), training_options(args), say)
        say(f"resumed from {ckpt_path} at epoch {start_epoch}, step {step}"
            + (f" (batch {partial['batch']} of epoch {start_epoch + 1})" if partial else "")
            + (f"; --lr {base_lr:g} replaces the checkpoint's {old_lr:g}"
               if base_lr != old_lr else f"; lr {base_lr:g}"))
        say_nothing_left(start_epoch, step, args, say)
    low, high = dist_.spread(step)
    if low != high:  # across nodes without a shared disk, one rank found no checkpoint
        raise SystemExit(f"--resume: the processes start from different steps ({low} to "
                         f"{high}): each reads OUT/checkpoint.pt, so OUT must be a folder "
                         f"every node sees (got {args.out!r})")
    torch.manual_seed(args.seed + 1000 * dist_.rank + step)  # per-rank seeds from here on

    runner = StepRunner(model.parameters(), opt, device=device, precision=args.precision,
                        clip=args.clip, warmup=args.warmup, base_lr=base_lr, distributed=dist_)
    if runner_state is not None:
        runner.load_state_dict(runner_state)
    if saved is None:
        # ActNorm's data-dependent initialisation: the same images and noise on every rank
        # (rank 0's statistics are also what DDP broadcasts when it wraps the model)
        init = train.levels[:INIT_IMAGES]
        noise = torch.rand(init.shape, generator=torch.Generator().manual_seed(args.seed + 5))
        with torch.no_grad():
            model(dequantize(init, n_bins, noise).to(device))

    net = dist_.wrap(model)
    if args.compile:
        # the reversible chain is an autograd.Function that runs eagerly: no full graph
        net = torch.compile(net, fullgraph=not (dist_.enabled or args.reversible))

    n_params = sum(p.numel() for p in model.parameters())
    say(f"train: Glow on {len(train)} train / {len(test)} test images from {args.data} "
        f"({channels}x{height}x{width}, {n_bins} levels), {args.n_block} blocks x {args.n_flow} "
        f"steps, {n_params} parameters, {args.precision}, device {device}"
        + (f" x {dist_.world} processes" if dist_.enabled else "")
        + f", fastflow backend {backend_name(device)}"
        + "".join(f", {flag}" for flag, on in (("reversible (activations recomputed)",
                                                args.reversible),
                                               ("compiled", args.compile),
                                               ("CUDA graph", args.cuda_graph)) if on),
        flush=True)

    written, grids, saved_now = [], [], False  # what this run writes, for the summary
    if saved is None and main_rank:
        # a fresh start: grids of an earlier run in OUT (a --force over it, or one stopped
        # before its first checkpoint) would sit beside this run's under the same names
        stale = sorted(out.glob("samples_epoch*.png"))
        for path in stale:
            path.unlink()
        if stale:
            names = stale[0].name + (f" .. {stale[-1].name}" if len(stale) > 1 else "")
            say(f"--out: removed {len(stale)} sample grid(s) of an earlier run in {out} "
                f"({names})")
        remove_earlier_run(ckpt_path, say)  # and the checkpoint a --force starts over
    is_digits = args.data == "digits" and channels == 1
    if history["initial"] is None:
        history["initial"] = {"bpd": evaluate_bpd(model, test, args.seed + 2, runner, device)}
        if is_digits:
            history["initial"]["digits"] = score_samples(model, test, args, device)
        if main_rank:
            rows, titles = picture_rows(model, test, args, device)
            written.append(save_image_grid(out / "samples_before.png", rows, titles))
        say(f"before training: test {history['initial']['bpd']:.3f} bits/dim"
            + _score_text(history["initial"].get("digits")), flush=True)

    def loss_fn(x):
        log_p, logdet, _ = net(x)
        return {"bpd": bits_per_dim(log_p.float(), logdet.float(), n_pixel, n_bins)}

    run_config = {**vars(args), "lr": base_lr}  # the lr actually used

    def metrics():
        return {"config": run_config, "model": config, "history": history}

    graph = None
    if args.cuda_graph:
        from .graph_step import GraphStep

        graph = GraphStep(runner, loss_fn, model=model)
    runner.start(step)  # the device-side step counter of the warmup learning rate
    t_start, stopped = time.perf_counter(), None
    for epoch in range(start_epoch, args.epochs):
        if args.max_steps is not None and step >= args.max_steps:
            break
        order, gen = epoch_order(len(train), args.seed, epoch), epoch_generator(args.seed, epoch)
        runner.skipped.zero_()
        sum_bpd = torch.zeros((), dtype=torch.float64, device=device)
        n_ok = torch.zeros((), dtype=torch.float64, device=device)
        first, earlier_seconds, worlds = 0, 0.0, [dist_.world]
        if partial is not None:  # go on where the --max-steps stop left this epoch
            # its entry is written again when the epoch ends, with its steps' seconds and
            # process counts too
            earlier = history["epochs"].pop()
            earlier_seconds = earlier.get("seconds") or 0.0
            worlds = sorted({*_as_list(earlier.get("world_size", dist_.world)), dist_.world})
            first = partial["batch"]
            gen.set_state(partial["noise"])
            runner.skipped.fill_(partial["skipped"])
            if main_rank:  # the saved sums are all ranks' (all-reduced again below)
                sum_bpd.fill_(partial["sum_bpd"])
                n_ok.fill_(partial["n_ok"])
            partial = None
        t_epoch, images, batch = time.perf_counter(), 0, first
        bar = progress(range(first, steps_per_epoch), total=steps_per_epoch - first,
                       desc=f"epoch {epoch + 1}/{args.epochs}",
                       enabled=main_rank and not args.no_progress, every=args.log_every)
        # a Ctrl-C or SIGTERM (one process): the step under way ends, then its checkpoint
        with stop_between_steps(not dist_.enabled) as stop:
            for i in bar:
                idx = order[i * args.batch_size:(i + 1) * args.batch_size]
                levels = train.levels[idx]
                noise = torch.rand(levels.shape, generator=gen)
                if args.hflip:
                    flip = (torch.rand(len(idx), generator=gen) < 0.5).view(-1, 1, 1, 1)
                    levels = torch.where(flip, levels.flip(-1), levels)
                x = dist_.shard(dequantize(levels, n_bins, noise)).to(device, non_blocking=True)
                terms = graph.step(x) if graph is not None else runner.step(lambda: loss_fn(x))
                step += 1
                images, batch = images + len(idx), i + 1
                ok = 1.0 - runner.found_inf.double()
                sum_bpd += torch.where(ok > 0, terms["bpd"].double(), 0.0) * x.shape[0] * ok
                n_ok += x.shape[0] * ok
                if main_rank and not args.no_progress and step % args.log_every == 0:
                    rate = images / max(time.perf_counter() - t_epoch, 1e-9)
                    bar.set_postfix_str(f"{float(sum_bpd / n_ok.clamp(min=1)):.3f} bits/dim, "
                                        f"{rate:.0f} img/s")
                if stop.pending is not None or (args.max_steps is not None
                                                and step >= args.max_steps):
                    break
        bar.close()
        if dist_.enabled:
            torch.distributed.all_reduce(sum_bpd)
            torch.distributed.all_reduce(n_ok)
        # the epoch's steps, those before a mid-epoch --resume too (full batches all)
        seconds = earlier_seconds + time.perf_counter() - t_epoch
        # a --max-steps stop inside the epoch: the checkpoint records where, and the
        # random state as it was before this extra evaluation, for --resume
        unfinished = batch < steps_per_epoch
        resume_rng = rng_state(device=device) if unfinished else None
        last = epoch + 1 == args.epochs or stop.pending is not None or (
            args.max_steps is not None and step >= args.max_steps)
        evaluate = last or (epoch + 1) % args.eval_every == 0
        entry = {"epoch": epoch + 1, "step": step,
                 "train": {"bpd": float(sum_bpd / n_ok)},  # NaN when every step was skipped
                 "test": ({"bpd": evaluate_bpd(model, test, args.seed + 2, runner, device)}
                          if evaluate else None),
                 "skipped": int(runner.skipped.item()), "lr": runner.lr(step - 1),
                 "base_lr": base_lr,
                 "images_per_s": batch * args.batch_size / max(seconds, 1e-9),
                 "seconds": seconds, "world_size": worlds[0] if len(worlds) == 1 else worlds}
        if is_digits and evaluate:
            entry["digits"] = score_samples(model, test, args, device)
        history["epochs"].append(entry)
        test_text = f"test {entry['test']['bpd']:6.3f}" if evaluate else "test   --  "
        say(f"epoch {epoch + 1:3d}/{args.epochs}  train {entry['train']['bpd']:6.3f}  "
            f"{test_text} bits/dim  {entry['images_per_s']:7.1f} img/s"
            + (f"  skipped {entry['skipped']} non-finite step(s)" if entry["skipped"] else "")
            + _score_text(entry.get("digits"))
            + f"  {time.perf_counter() - t_start:6.1f}s", flush=True)
        if main_rank and evaluate:
            rows, titles = picture_rows(model, test, args, device)
            grids.append(save_image_grid(out / f"samples_epoch{epoch + 1:03d}.png", rows,
                                         titles))
            left = None if not unfinished else {
                "batch": batch, "batch_size": args.batch_size, "seed": args.seed,
                "noise": gen.get_state(),
                "sum_bpd": float(sum_bpd), "n_ok": float(n_ok),
                "skipped": float(runner.skipped)}
            save_checkpoint(ckpt_path, model, opt, epoch=epoch + int(not unfinished), step=step,
                            history=history, config=config, **data, lr=base_lr,
                            step_runner=runner.state_dict(), partial=left,
                            rng=resume_rng or rng_state(device=device),
                            world_size=dist_.world, training=training_options(args))
            # the checkpoint's epochs, whatever stops the run next
            write_metrics(out, metrics())
            saved_now = True
        if stop.pending is not None:  # interrupted: its last step saved; the rest below
            stopped = stop.pending
            break

    if not main_rank:
        return 0
    rows, titles = picture_rows(model, test, args, device)
    written.append(save_image_grid(out / "samples.png", rows, titles))
    written += write_metrics(out, metrics())
    if grids:  # this run's per-epoch grids: the first .. the last
        written.append(grids[0] if len(grids) == 1 else
                       f"{grids[0]} .. {grids[-1].name} ({len(grids)} per-epoch grids)")
    written += [ckpt_path] if saved_now else []
    final = history["epochs"][-1] if history["epochs"] else history["initial"]
    final_bpd = final["test"]["bpd"] if history["epochs"] else final["bpd"]
    print(f"{'stopped' if stopped else 'done'}: {step} steps, test "
          f"{history['initial']['bpd']:.3f} -> {final_bpd:.3f} bits/dim"
          + _score_text(final.get("digits")) + "\nwrote:\n  "
          + "\n  ".join(str(p) for p in written), flush=True)
    if stopped:  # Ctrl-C or SIGTERM: its status and where --resume goes on from
        raise stopped()
    return 0


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _score_text(scores: dict | None) -> str:
    if not scores:
        return ""
    return "  digits recognised " + ", ".join(
        f"T={t}: {s['recognised']:.2f} ({s['classes']} classes)" for t, s in scores.items())
