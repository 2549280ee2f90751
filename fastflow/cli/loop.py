"""The training loop both trainers share: resume-or-start and the epoch loop."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .common import load_checkpoint, progress, save_checkpoint


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
    from ..data import batches

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
