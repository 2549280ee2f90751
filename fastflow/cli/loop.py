"""The training machinery both trainers share: ``Distributed`` (torchrun set-up),
``StepRunner`` (one optimizer step: autocast, loss scaling, warmup, clipping and a skip of
non-finite steps decided on the device), ``epoch_order`` (the same global order on every
rank, whatever the number of processes), ``resume_or_start`` and the epoch loop of
``train-vae`` and ``train-tarflow`` (``train_epochs``, on a ``StepRunner``)."""

from __future__ import annotations

import itertools
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .common import (PRECISIONS, check_resume_batch, check_resume_config,
                     check_resume_data, progress, read_checkpoint, remove_earlier_run,
                     restore_checkpoint, rng_state, save_checkpoint, say_changed_options,
                     say_nothing_left, set_rng_state, step_options, stop_between_steps,
                     write_metrics)


class Distributed:
    """The process group when launched by torchrun (``WORLD_SIZE`` > 1 in the environment):
    NCCL on CUDA, gloo on CPU; rank/local rank/world size; ``is_main`` for the one process
    that writes. Across nodes, torchrun's rendezvous options (--nnodes, --rdzv-endpoint...)
    set the same environment variables, so nothing else changes."""

    def __init__(self, device_arg: str):
        from .common import pick_device

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = pick_device(device_arg)
        if self.world > 1:
            if device.type == "cuda":
                device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.device = device

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's equal part of a global batch (its size divisible by the world)."""
        if not self.enabled:
            return batch
        per = batch.shape[0] // self.world
        return batch[self.rank * per:(self.rank + 1) * per]

    def wrap(self, model):
        """``model`` in DistributedDataParallel (itself alone in one process), without DDP's
        copy of every buffer from rank 0 before each forward: the buffers (ActNorm's flag,
        the LU layers' fixed permutation) are equal on every rank from DDP's first
        broadcast on, and under torch 2.11 that per-step copy moves their version counters,
        so each ActNorm read its flag from the device at every step (a host sync) and each
        InvConv2dLU rebuilt its row order."""
        if not self.enabled:
            return model
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # forward_sync_buffers from torch 2.13 on, where broadcast_buffers is deprecated
        no_sync = ("forward_sync_buffers"
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else "broadcast_buffers")
        return DistributedDataParallel(
            model, device_ids=[self.device] if self.device.type == "cuda" else None,
            **{no_sync: False})

    def spread(self, value: int) -> tuple[int, int]:
        """(min, max) of ``value`` over the processes (one all-reduce; ``(value, value)``
        alone). Called once at start-up, where a host read costs nothing."""
        if not self.enabled:
            return value, value
        both = torch.tensor([value, -value], dtype=torch.int64, device=self.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        return -int(both[1]), int(both[0])

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of epoch ``epoch``: a function of (seed, epoch) alone, so every rank
    and every number of processes (and a resumed run) walks the same global order, as
    DistributedSampler.set_epoch does."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch, 1)))


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of an epoch's augmentation noise (dequantisation, flips): drawn for
    the global batch and sliced per rank, so N processes see what one process sees."""
    return torch.Generator().manual_seed(_mix(seed, epoch, 2))


def _mix(seed: int, epoch: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + stream * 104_729) % (2 ** 63)


def warmup_lr(base_lr: float, step: int, warmup: int) -> float:
    """Linear warmup over the first ``warmup`` optimizer steps (Glow's schedule)."""
    return base_lr if warmup <= 0 else base_lr * min(1.0, (step + 1) / warmup)


class StepRunner:
    """One optimizer step with no host synchronisation, the same code eagerly and inside a
    CUDA graph (``fastflow.cli.graph_step.GraphStep`` captures ``step``):

    - the learning rate of the linear warmup is computed on the device from a device-side
      step counter (``counter``) into ``lr_tensor``, which the fused Adam reads (a Python
      float would be baked into a capture); ``start(step)`` sets the counter;
    - the loss function runs under ``torch.autocast`` for bf16/fp16 (the coupling networks
      and priors follow autocast; fastflow's flow layers compute in float32);
    - fp16 scales the loss (a GradScaler's growth/backoff, kept on the device);
    - ``torch._amp_foreach_non_finite_check_and_unscale_`` unscales the gradients and
      raises ``found_inf`` when any gradient, or the loss, is not finite (all-reduced with
      MAX across ranks);
    - optional gradient-norm clipping;
    - the fused Adam reads ``found_inf`` and leaves the parameters, both moments and the
      step count untouched when it is set (the GradScaler mechanism, on the device);
    - ``skipped`` counts the skipped steps on the device (read once per epoch).

    ``lr_tensor`` is float64 on CPU (the CPU fused Adam reads it as a double: the same
    numbers as a Python float) and float32 on CUDA (what the CUDA fused Adam reads).
    """

    def __init__(self, params, opt: torch.optim.Optimizer, *, device: torch.device,
                 precision: str = "fp32", clip: float | None = None, warmup: int = 0,
                 base_lr: float = 1e-3, distributed: Distributed | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {tuple(PRECISIONS)}, got {precision!r}")
        if not opt.defaults.get("fused"):
            raise ValueError("opt: expected a fused optimizer (its step reads found_inf)")
        self.params = [p for p in params if p.requires_grad]
        self.opt, self.device, self.precision = opt, device, precision
        self.dtype = PRECISIONS[precision]
        self.clip, self.warmup, self.base_lr = clip, warmup, base_lr
        self.distributed = distributed
        self.found_inf = torch.zeros((), device=device)  # 0-dim: the fused step's shape
        self.skipped = torch.zeros((), device=device)
        self.scale = torch.full((1,), 2.0 ** 16 if precision == "fp16" else 1.0, device=device)
        self.growth_tracker = torch.zeros(1, dtype=torch.int32, device=device)
        self.counter = torch.zeros((), dtype=torch.float64, device=device)
        lr_dtype = torch.float64 if device.type == "cpu" else torch.float32
        self.lr_tensor = torch.full((), self.lr(0), dtype=lr_dtype, device=device)
        self.capturable = False  # GraphStep sets it for its capture (True warns when eager)
        self.bind()

    def bind(self) -> None:
        """Point the optimizer at ``lr_tensor`` and set its ``capturable`` flag (again after
        an ``opt.load_state_dict``, which brings back the saved float lr and flags)."""
        for group in self.opt.param_groups:
            group["lr"] = self.lr_tensor
            group["capturable"] = self.capturable

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                              enabled=self.dtype is not None)

    def lr(self, step: int) -> float:
        """The warmup learning rate of step ``step`` as a Python float (for reports)."""
        return warmup_lr(self.base_lr, step, self.warmup)

    def start(self, step: int) -> None:
        """Set the device step counter: the next ``step`` call is step number ``step``."""
        self.counter.fill_(step)

    def _set_lr(self) -> None:
        """``warmup_lr`` of ``counter``, on the device (float64, as Python computes it)."""
        if self.warmup > 0:
            factor = torch.clamp_max((self.counter + 1) / self.warmup, 1.0)
            self.lr_tensor.copy_(factor * self.base_lr)
        else:
            self.lr_tensor.fill_(self.base_lr)
        self.bind()

    def step(self, loss_fn, step: int | None = None) -> dict:
        """Run ``loss_fn()`` (a dict of scalar terms, the first being the loss) forward and
        backward and take the step; returns the detached terms (float32). ``step``: set the
        counter first (``start``); None goes on from the counter."""
        if step is not None:
            self.start(step)
        self._set_lr()
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
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
        if self.distributed is not None and self.distributed.enabled:
            dist.all_reduce(self.found_inf, op=dist.ReduceOp.MAX)
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.opt.grad_scale = None
        self.opt.found_inf = self.found_inf
        try:
            self.opt.step()
        finally:
            self.opt.found_inf = None
        if self.precision == "fp16":
            torch._amp_update_scale_(self.scale, self.growth_tracker, self.found_inf,
                                     2.0, 0.5, 2000)
        self.skipped += self.found_inf
        self.counter += 1
        return {k: v.detach() for k, v in terms.items()}

    def state_dict(self) -> dict:
        return {"scale": self.scale.cpu(), "growth_tracker": self.growth_tracker.cpu(),
                "precision": self.precision}

    def load_state_dict(self, state: dict) -> None:
        """The loss scale of an fp16 run, into an fp16 run only: the other precisions do not
        scale the loss, so unscaling their gradients by it would shrink them (an older state,
        without ``precision``, counts as fp16's)."""
        if self.precision != "fp16" or state.get("precision", "fp16") != "fp16":
            return
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])


def resume_or_start(args, ckpt_path: Path, model, opt, config: dict, generators: dict, device,
                    *, runner: StepRunner | None = None, data: dict | None = None,
                    legacy: dict | None = None, legacy_split: dict | None = None,
                    metric: str = "test bits/dim"):
    """(start_epoch, step, history, partial): from ``ckpt_path`` when ``--resume`` finds it
    (model, optimizer, the named generators' and torch's RNG states come back; a different
    ``config`` is refused; ``--lr`` replaces the checkpoint's learning rate, None keeps it),
    else a fresh start.
    ``partial``: where a ``--max-steps`` stop left an epoch (``train_epochs`` goes on there).
    ``runner``: its optimizer binding is renewed and an fp16 loss scale comes back.
    ``data``: ``resume_data(args, train, test)``, refused as ``train`` refuses it
    (``check_resume_data``;
    ``metric`` names the held-out numbers). A ``--warmup`` or ``--clip`` other than the
    checkpoint's is said (``say_changed_options``). ``legacy``: the
    values of config keys that checkpoints from before them lack (what they were trained
    on); ``legacy_split``: the ``split_key`` of checkpoints from before it was saved (how
    they held out their test images)."""
    if not (args.resume and ckpt_path.is_file()):
        remove_earlier_run(ckpt_path)  # a --force over an earlier run (no other reaches here)
        return 0, 0, {"initial": None, "epochs": []}, None
    # what it was trained on is checked first: another --data or --size is named as such,
    # not as a state dict that does not fit the model
    state = read_checkpoint(ckpt_path, map_location=device)
    saved_config = state.get("config")
    if isinstance(saved_config, dict) and legacy:
        saved_config = {**legacy, **saved_config}
    check_resume_config(saved_config, config, ckpt_path)
    if data is not None:
        if legacy_split is not None and "split" not in state:
            state = {**state, "split": legacy_split}
        check_resume_data(state, ckpt_path, data, args.data, metric=metric)
    state = restore_checkpoint(state, ckpt_path, model, opt)
    names = list(generators)
    set_rng_state(state["rng"], *(generators[k] for k in names), device=device)
    partial = state.get("partial")
    check_resume_batch(partial, ckpt_path, state["epoch"], args.batch_size)
    print(f"resumed from {ckpt_path} at epoch {state['epoch']}, step {state['step']}")
    say_nothing_left(state["epoch"], state["step"], args)
    # --lr applies on resume too; without it the checkpoint's (older checkpoints: the
    # optimizer's, a tensor when a StepRunner saved it)
    old = float(state.get("lr", opt.param_groups[0]["lr"]))
    lr = old if args.lr is None else args.lr
    if lr != old:
        print(f"--lr: using {lr:g} (the checkpoint had {old:g})")
    for group in opt.param_groups:
        group["lr"] = lr
        if opt.defaults.get("fused"):  # a checkpoint of the unfused optimizer: fused again
            group["fused"], group["foreach"] = True, None
    say_changed_options(state.get("training"), step_options(args))
    if runner is not None:
        runner.base_lr = lr
        runner.bind()  # the optimizer reads the runner's lr tensor again
        if state.get("step_runner") is not None:
            runner.load_state_dict(state["step_runner"])
    return state["epoch"], state["step"], state["history"], partial


def train_epochs(args, *, model, runner: StepRunner, x_train, loss_terms, evaluate, describe,
                 ckpt_path, config, generators, start, history, save: dict | None = None,
                 metrics=None):
    """Shuffled mini-batches (``generators["shuffle"]``), one ``runner`` step per batch on
    the first value of ``loss_terms(xb)`` (a dict of scalars, all averaged per epoch over
    the steps that were taken), then every ``args.eval_every`` epochs and at the end
    ``evaluate()`` on the test split and a checkpoint (with ``save``'s entries, the
    runner's state and ``step_options``), with ``metrics()`` (a dict for ``write_metrics``)
    written beside it, so that metrics.csv always holds the checkpoint's epochs; per epoch
    a line ``describe(train, test)`` (``test`` None without evaluation; plus the non-finite
    steps skipped, if any) and a history entry (the means, the skipped steps, the learning
    rate, images/s and the seconds of the steps: a ``metrics_row``). Until ``args.epochs``
    or ``args.max_steps``, or a Ctrl-C or SIGTERM (``stop_between_steps``), which ends the
    step under way and checkpoints it as a ``--max-steps`` stop inside an epoch.
    ``start`` = (epoch, step, partial) to go on from (``resume_or_start``). Returns
    (step count, the stop's exception class or None): a stopped command writes what it
    writes at the end (samples, metrics, the list of them), then raises it. Nothing reads
    the device per step except the progress bar's updates (every ``args.log_every``
    steps)."""
    from ..data import batches

    opt = runner.opt
    epoch0, step, partial = start
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    t0 = time.perf_counter()
    names = list(generators)
    device = x_train.device
    runner.start(step)
    for epoch in range(epoch0, args.epochs):
        if args.max_steps is not None and step >= args.max_steps:
            break
        sums, seen, first = None, torch.zeros((), dtype=torch.float64, device=device), 0
        runner.skipped.zero_()
        order_state = generators["shuffle"].get_state()  # this epoch's order, for a resume
        earlier_seconds = 0.0
        if partial is not None:  # go on where the --max-steps stop left this epoch
            # its entry is written again when the epoch ends, with its steps' seconds too
            earlier_seconds = history["epochs"].pop().get("seconds") or 0.0
            first, order_state = partial["batch"], partial["order"]
            generators["shuffle"].set_state(order_state)
            sums = torch.tensor(partial["sums"], dtype=torch.float64, device=device)
            seen.fill_(partial["seen"])
            runner.skipped.fill_(partial.get("skipped", 0))
            partial = None
        walk = batches(x_train, args.batch_size, generator=generators["shuffle"])
        bar = progress(itertools.islice(walk, first, None), total=steps_per_epoch - first,
                       desc=f"epoch {epoch + 1}/{args.epochs}", enabled=not args.no_progress,
                       every=args.log_every)
        done, images, t_epoch = first, 0, time.perf_counter()
        # a Ctrl-C or SIGTERM: the step under way ends, then its checkpoint
        with stop_between_steps() as stop:
            for xb in bar:
                terms = runner.step(lambda: loss_terms(xb))
                step, done, images = step + 1, done + 1, images + xb.shape[0]
                ok = 1.0 - runner.found_inf.double()  # 0 for a skipped step: not averaged
                batch = torch.stack(list(terms.values())).double()
                batch = torch.where(ok > 0, batch, 0.0) * (xb.shape[0] * ok)
                seen += xb.shape[0] * ok
                sums = batch if sums is None else sums + batch
                if step % args.log_every == 0 and not args.no_progress:
                    bar.set_postfix_str(f"{next(iter(terms))} "
                                        f"{float(sums[0] / seen.clamp(min=1)):.3f}")
                if stop.pending is not None or (args.max_steps is not None
                                                and step >= args.max_steps):
                    break
        bar.close()
        # the steps only, as train's, those before a mid-epoch --resume too
        seconds = earlier_seconds + time.perf_counter() - t_epoch
        images += first * args.batch_size  # the full batches before it
        # a --max-steps stop inside the epoch: the checkpoint records where, and the
        # generators as they were before this extra evaluation, for --resume
        unfinished = done < steps_per_epoch
        resume_rng = rng_state(*(generators[k] for k in names), device=device) \
            if unfinished else None
        last = epoch + 1 == args.epochs or stop.pending is not None or (
            args.max_steps is not None and step >= args.max_steps)
        evaluated = last or (epoch + 1) % args.eval_every == 0
        # NaN when every step of the epoch was skipped
        train = dict(zip(terms, (sums / seen).tolist()))
        skipped = int(runner.skipped.item())  # the one read of the count, per epoch
        test = evaluate() if evaluated else None
        history["epochs"].append({"epoch": epoch + 1, "step": step, "train": train,
                                  "test": test, "skipped": skipped, "lr": runner.lr(step - 1),
                                  "images_per_s": images / max(seconds, 1e-9),
                                  "seconds": seconds})
        print(f"epoch {epoch + 1:3d}/{args.epochs}  {describe(train, test)}"
              + (f"  skipped {skipped} non-finite step(s)" if skipped else "")
              + f"  {time.perf_counter() - t0:6.1f}s", flush=True)
        if evaluated:
            left = None if not unfinished else {
                "batch": done, "batch_size": args.batch_size, "order": order_state,
                "sums": sums.tolist(), "seen": float(seen), "skipped": skipped}
            save_checkpoint(ckpt_path, model, opt, epoch=epoch + int(not unfinished),
                            step=step, history=history, config=config, partial=left,
                            lr=runner.base_lr, step_runner=runner.state_dict(),
                            training=step_options(args), **(save or {}),
                            rng=resume_rng or rng_state(*(generators[k] for k in names),
                                                        device=device))
            if metrics is not None:  # the checkpoint's epochs, whatever stops the run next
                write_metrics(ckpt_path.parent, metrics())
        if stop.pending is not None:  # interrupted: stopped, its last step saved
            return step, stop.pending
    return step, None
