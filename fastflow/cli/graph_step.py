"""``--cuda-graph``: the whole training step (forward, backward, the non-finite check,
clipping, the warmup learning rate and the fused Adam step) as one CUDA graph.

``GraphStep`` runs ``StepRunner.step`` (the eager loop's step function, so the two cannot
drift) on a static input buffer: the first ``warmup_steps`` batches eagerly on a side stream
(Triton compiles its kernels, Adam creates its state, cuDNN/cuBLAS pick their algorithms),
then one capture, then a replay per batch. Every batch must have the captured shape (the
Glow loop drops the last partial batch). What the capture needs from the step, and what
``tests/test_cuda_graph_step.py`` checks on CPU: no host reads of device values, no tensors
built from Python data, no random numbers, the learning rate and the step counter on the
device. ActNorm's data-dependent initialisation must have run before the first call.
"""

from __future__ import annotations

import torch

from ..layers import ActNorm
from .loop import StepRunner


class GraphStep:
    """``step(x)`` = ``runner.step(lambda: loss_fn(x))`` with ``x`` copied into a static
    buffer and, after ``warmup_steps`` eager steps, replayed from a CUDA graph. The returned
    terms are the graph's output tensors: read them before the next ``step``."""

    def __init__(self, runner: StepRunner, loss_fn, *, warmup_steps: int = 3, model=None):
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps: expected >= 1 eager steps before the capture, "
                             f"got {warmup_steps}")
        pending = [name for name, m in (model.named_modules() if model is not None else ())
                   if isinstance(m, ActNorm) and not m.is_initialized()]
        if pending:
            raise ValueError(f"model: expected ActNorm's data-dependent initialisation to have "
                             f"run before the capture, got uninitialised {pending[:3]}")
        if runner.device.type != "cuda":
            raise ValueError(f"runner: expected a StepRunner on a CUDA device, got "
                             f"{runner.device}")
        if runner.distributed is not None and runner.distributed.enabled:
            raise ValueError("runner: expected one process (CUDA-graph capture of "
                             "DistributedDataParallel's all-reduces is not supported here), "
                             f"got {runner.distributed.world}")
        self.runner, self.loss_fn, self.warmup_steps = runner, loss_fn, warmup_steps
        self.static_x: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.terms: dict | None = None
        self.eager_steps = 0

    def _run(self) -> dict:
        return self.runner.step(lambda: self.loss_fn(self.static_x))

    def _load(self, x: torch.Tensor) -> None:
        if self.static_x is None:
            self.static_x = torch.empty(x.shape, dtype=x.dtype, device=self.runner.device)
        elif x.shape != self.static_x.shape or x.dtype != self.static_x.dtype:
            raise ValueError(f"x: expected a batch of shape {tuple(self.static_x.shape)} and "
                             f"dtype {self.static_x.dtype} (the captured one), got "
                             f"{tuple(x.shape)} {x.dtype}")
        self.static_x.copy_(x, non_blocking=True)

    def step(self, x: torch.Tensor) -> dict:
        self._load(x)
        if self.graph is not None:
            self.graph.replay()
            return self.terms
        if self.eager_steps < self.warmup_steps:
            self.eager_steps += 1
            side = torch.cuda.Stream(self.runner.device)
            side.wait_stream(torch.cuda.current_stream(self.runner.device))
            with torch.cuda.stream(side):
                terms = self._run()
            torch.cuda.current_stream(self.runner.device).wait_stream(side)
            return terms
        self.runner.opt.zero_grad(set_to_none=True)  # backward allocates them in the pool
        self.runner.capturable = True  # Adam refuses a capture otherwise (set in step())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.terms = self._run()
        self.graph = graph
        graph.replay()  # capturing recorded the step without running it
        return self.terms
