"""Which implementation runs an op: the Triton kernels or the plain PyTorch reference.

The choice is made per call, from the tensor's device and the selected mode:

* ``"auto"`` (default): CUDA tensors run the Triton kernels, everything else the reference.
* ``"triton"``: always the Triton kernels. CPU tensors need ``TRITON_INTERPRET=1`` set
  before the kernels are first used (Triton reads it when it compiles the ``@triton.jit``
  functions); without it a ``RuntimeError`` says so.
* ``"reference"``: always plain PyTorch.

The mode comes from ``fastflow.use_backend(...)`` when one is active, else from the
``FASTFLOW_BACKEND`` environment variable, read at call time. Each thread and each asyncio task has
its own ``use_backend`` blocks (a new thread starts with none), and a block that is left
out of order (a generator suspended inside one) ends only its own mode. Nothing here touches a GPU
and the Triton kernels are imported only when first needed.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import threading

import torch
import torch.autograd.forward_ad as _forward_ad

from .kernels._dtypes import compute_dtype  # noqa: F401  (the one compute-dtype helper)

MODES = ("auto", "triton", "reference")

# The active ``use_backend`` blocks, innermost last, as a tuple held in a context variable:
# each thread, and each asyncio task (which runs in a copy of its creator's context), sees its
# own, so a block in one never changes the mode of another.
_blocks: contextvars.ContextVar = contextvars.ContextVar("fastflow_backend_blocks", default=())
# The same tuple per thread, for torch.compile: dynamo cannot trace ``ContextVar.get`` (it
# would break the graph) but traces and guards this thread-local, so a compiled function
# recompiles when the mode changes. It equals ``_blocks`` except while asyncio tasks of one
# thread interleave blocks (it then holds the last block entered or left in the thread).
_local = threading.local()
_get_blocks = _blocks.get


# Whether dynamo is tracing the caller (it cannot trace ``ContextVar.get``): True only then.
# ``torch.compiler.is_compiling`` says the same through one more Python call (a percent of a
# small CPU op's forward+backward); torch < 2.3 has only that one.
_tracing = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)


def _set_blocks(blocks: tuple):
    _blocks.set(blocks)
    _local.blocks = blocks


def _check_mode(mode, where):
    if mode not in MODES:
        raise ValueError(f"{where}: expected one of {MODES}, got {mode!r}")
    return mode


def current_mode() -> str:
    """The active mode: the innermost ``use_backend`` block, else ``FASTFLOW_BACKEND``."""
    if _tracing():  # dynamo: the thread-local blocks, and no lru_cache (it warns)
        blocks, parse = getattr(_local, "blocks", ()), _parse_env
    else:
        blocks, parse = _get_blocks(), _env_mode
    return blocks[-1][0] if blocks else parse(_env_value())


_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("FASTFLOW_BACKEND") if _ENV_DATA is not None else None


def _env_value() -> str:
    """FASTFLOW_BACKEND as it is now. ``os.environ.get`` of an unset variable raises and
    catches two KeyErrors per call (several microseconds: more than the rest of an op's
    entry on a small CPU tensor), so the mapping behind ``os.environ`` is read directly; it
    is the one ``os.environ[...] = ...``, ``del`` and ``monkeypatch.setenv`` change."""
    if _ENV_DATA is None:
        return os.environ.get("FASTFLOW_BACKEND", "auto")
    raw = _ENV_DATA.get(_ENV_KEY)
    return "auto" if raw is None else os.environ.decodevalue(raw)


def _parse_env(raw: str) -> str:
    """FASTFLOW_BACKEND's value, parsed."""
    return _check_mode(raw.strip().lower() or "auto", "FASTFLOW_BACKEND")


# cached per raw string: the variable is still read on every call, only its parsing is
# remembered. Not while dynamo traces: it warns about any lru_cache it meets
_env_mode = functools.lru_cache(maxsize=16)(_parse_env)


@contextlib.contextmanager
def use_backend(mode: str):
    """Run the ops inside the block with ``mode`` ("auto", "triton" or "reference")."""
    _check_mode(mode, "use_backend(mode)")
    if _tracing():
        # a block inside a function torch.compile traces: dynamo cannot trace the context
        # variable (``ContextVar.get`` is unsupported: an error under fullgraph=True), so the
        # block is traced on the thread-local alone, which ``current_mode`` reads while
        # compiling; it is restored on exit, as the context variable never changed
        outer = getattr(_local, "blocks", ())
        _local.blocks = outer + ((mode,),)
        try:
            yield
        finally:
            _local.blocks = outer
        return
    entry = (mode,)  # this block's own entry: removed by identity on exit
    _set_blocks(_blocks.get() + (entry,))
    try:
        yield
    finally:
        # Blocks need not exit in the order they entered: a generator suspended inside one
        # exits when it is resumed or closed, possibly inside a block the caller opened later.
        # Remove this block's entry, not whichever is innermost now.
        blocks = _blocks.get()
        if blocks and blocks[-1] is entry:
            _set_blocks(blocks[:-1])
        else:
            _set_blocks(tuple(b for b in blocks if b is not entry))


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def use_triton(t: torch.Tensor) -> bool:
    """True when an op on tensor ``t`` should launch the Triton kernels.

    Called once per call, by the public function where the call enters fastflow: the
    Triton path then runs custom ops whose forward and backward launch the kernels
    unconditionally, the reference path plain autograd through ``fastflow.reference``, so
    backward (on whatever thread, after whatever ``use_backend`` block) uses what forward
    decided and never reads this setting again."""
    # current_mode(), written out: the call cost a percent of a small CPU op's forward+backward
    if _tracing():  # dynamo: the thread-local blocks, and no lru_cache (it warns)
        blocks, parse = getattr(_local, "blocks", ()), _parse_env
    else:
        blocks, parse = _get_blocks(), _env_mode
    mode = blocks[-1][0] if blocks else parse(_env_value())
    if mode == "auto":
        return t.is_cuda
    if mode == "reference":
        return False
    if t.is_cuda:
        return True
    if t.device.type == "cpu" and interpreter_enabled():
        return True
    if t.device.type == "cpu":
        where = 'use_backend("triton")' if blocks else "FASTFLOW_BACKEND=triton"
        raise RuntimeError(
            f"{where} on CPU tensors needs TRITON_INTERPRET=1 set before fastflow's kernels "
            f"are first used (got TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}); "
            "use a CUDA tensor or the reference backend")
    raise RuntimeError(f"the Triton backend supports CUDA and (interpreted) CPU tensors, "
                       f"got a tensor on {t.device}")


def _transforms():
    """The functorch transforms (``torch.func.grad``, ``jvp``, ``vmap``...) active now."""
    from torch._C import _functorch as ft

    stack = getattr(ft, "get_interpreter_stack", None)
    if stack is not None:
        found = stack() or []
        return [i.key() for i in found]
    top = ft.peek_interpreter_stack()
    return [] if top is None else [top.key()]


def refuse_transforms(op: str, *tensors):
    """On the Triton path, refuse ``torch.func.grad`` / ``jvp`` / ``vjp`` (the custom ops'
    fused backward has no formula for those transforms) at the first call, with what to use
    instead; and forward-mode AD, where one of ``tensors`` (the op's tensor inputs, None
    allowed) is a dual tensor of ``torch.autograd.forward_ad``: the custom ops have no
    forward derivative, so where no input requires grad the tangent was dropped without a
    word (the output not dual: a zero tangent). ``vmap`` and torch.compile are let
    through."""
    if torch.compiler.is_compiling():  # dynamo traces no functorch transform of its own here
        return
    from torch._C._functorch import TransformType

    keys = _transforms()
    if any(k in (TransformType.Grad, TransformType.Jvp) for k in keys):
        raise NotImplementedError(
            f"{op}: torch.func transforms (grad, vjp, jvp, hessian...) are not supported on the "
            "Triton backend (its fused backward is not itself differentiable); run the call "
            "under fastflow.use_backend('reference'), which is plain PyTorch autograd and "
            "supports them, or use torch.autograd.grad for first derivatives")
    # (after the transforms: torch.func.jvp's inputs are dual tensors too, and its users
    # are told about torch.func)
    if _forward_ad._current_level >= 0 and any(  # a dual level is open: any tangent here?
            t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(
            f"{op}: forward-mode AD (torch.autograd.forward_ad dual tensors) is not supported "
            "on the Triton backend (its custom ops have no forward derivative); run the call "
            "under fastflow.use_backend('reference'), which is plain PyTorch autograd and "
            "supports it")


def refuse_double_backward(op: str):
    """Called from a Triton op's backward: with ``create_graph=True`` (grad mode is on in
    backward) refuse now, at the first backward, rather than at the second."""
    if torch.is_grad_enabled():
        raise NotImplementedError(
            f"{op}: double backward (create_graph=True, e.g. a gradient penalty) is not "
            "supported on the Triton backend (the fused backward is not itself "
            "differentiable); run the forward under fastflow.use_backend('reference'), "
            "which is plain PyTorch autograd and supports it")


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU the current one for a kernel launch (Triton launches on the current
    device and stream, not the tensor's)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# A tensor inside ``torch.func.vmap`` (a per-sample view, e.g. with ``in_dims=1``): it
# refuses a channels_last query ("NYI: querying is_contiguous inside of vmap"), and its
# layout is vmap's business, so it counts as NCHW
_is_batched = torch._C._functorch.is_batchedtensor


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D channels_last (and not NCHW-contiguous) tensor, else NCHW
    (NCHW inside ``torch.func.vmap``). Every op returns its outputs in its main input's
    format, on both backends."""
    if (t.dim() == 4 and not t.is_contiguous() and not _is_batched(t)
            and t.is_contiguous(memory_format=torch.channels_last)):
        return torch.channels_last
    return torch.contiguous_format


def empty_output(t: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """An uninitialised tensor in ``t``'s memory format (for fake/meta implementations)."""
    out = torch.empty(t.shape if shape is None else shape, dtype=dtype or t.dtype, device=t.device)
    return out.contiguous(memory_format=memory_format_of(t)) if out.dim() == 4 else out
