"""Bytes each Triton kernel moves, counted in the interpreter, against the floor.

    python benchmarks/traffic.py [--quick] [--markdown] [--launches]

Under ``TRITON_INTERPRET=1`` every ``tl.load`` / ``tl.store`` / atomic of a kernel goes
through the interpreter's builder (``triton.runtime.interpreter.InterpreterBuilder``).
``counting()`` wraps those methods for the length of a ``with`` block and adds up, per
kernel launch, the bytes actually moved: only the masked-in elements, times the element
size of the pointer (a load of 1024 lanes with 1000 in the mask counts 1000 elements).
A scalar ``tl.load(ptr)`` in every program counts once per program: that is what the
kernel asks of memory, even where a GPU's cache would serve the repeats.

    with counting() as launches:
        y, ld = ff.affine_coupling(x, h)
    launches[0]  # Launch(kernel="_coupling_fwd_kernel", programs=..., load_bytes=..., ...)

    rows = measure(lambda: ff.affine_coupling(x, h))   # the same, as a list
    floor = tensor_bytes(x, h) + tensor_bytes(y, ld)    # read each input once, write each output once

The floor of an op is what it must move at least: each input read once and each output
written once (``Case.bytes_fwd`` / ``bytes_bwd`` in ``benchmarks/suite_*.py``; here computed
from the actual tensors). The table compares the counted bytes with it per op and shape.
The counts depend only on the kernels' tiling, not on the device, so they are the same on
a GPU; only the bytes a GPU's caches absorb are not visible here. Timings are not taken.

The counter relies on interpreter internals (the builder's ``create_masked_load`` /
``create_masked_store`` / ``create_atomic_*`` / ``set_grid_idx`` and ``GridExecutor``), which
Triton does not promise to keep: ``counting()`` checks them (names, argument positions and
a probe kernel with a known answer) on first use and raises ``RuntimeError`` naming the
Triton version if anything differs, rather than count wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton compiles any kernel

import numpy as np  # noqa: E402

KB = 1000  # bytes per KB in the table (decimal, as the suites' MB)


# --------------------------------------------------------------------------------------
# The counter
# --------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One kernel launch: its name, programs run, and the bytes its memory ops moved."""

    kernel: str
    programs: int = 0
    load_bytes: int = 0
    store_bytes: int = 0
    atomic_bytes: int = 0   # elements touched by atomics x element size (read-modify-write)
    loads: int = 0          # memory instructions executed (one per tl.load per program)
    stores: int = 0
    atomics: int = 0

    @property
    def total_bytes(self) -> int:
        return self.load_bytes + self.store_bytes + self.atomic_bytes


@dataclass
class _State:
    launches: list = field(default_factory=list)
    current: Launch | None = None
    outside: Launch = field(default_factory=lambda: Launch("<outside a launch>"))


_local = threading.local()  # the wrapped methods' nesting (see _wrap)
_active: list[_State] = []   # the counting() blocks open now (innermost last)
_lock = threading.Lock()
_checked: str | None = None  # the Triton version the probe passed on


def _interp():
    import triton.runtime.interpreter as interp

    return interp


def _version() -> str:
    import triton

    return triton.__version__


def _elem_bytes(ptr_handle) -> int:
    """Element size of the memory a pointer handle points at."""
    ty = ptr_handle.dtype
    while hasattr(ty, "element_ty"):
        ty = ty.element_ty
    bits = ty.primitive_bitwidth
    return max(1, bits // 8)  # int1 is stored as one byte


def _count(mask, shape) -> int:
    """Masked-in elements of a memory op over ``shape`` (``mask`` None: all of them)."""
    if mask is None:
        return int(np.prod(shape, dtype=np.int64))
    data = np.asarray(mask.data if hasattr(mask, "data") else mask)
    return int(np.count_nonzero(np.broadcast_to(data, shape)))


# What each wrapped builder method moves, from its arguments: (kind, pointer, mask) by
# position after ``self``. ``None`` for the mask: every element.
_MEMORY_OPS = {
    "create_masked_load": ("load", 0, 1, ("ptrs", "mask")),
    "create_masked_store": ("store", 0, 2, ("ptrs", "value", "mask")),
    "create_load": ("load", 0, None, ("ptr",)),
    "create_store": ("store", 0, None, ("ptr", "val")),
    "create_atomic_rmw": ("atomic", 1, 3, ("rmwOp", "ptr", "val", "mask")),
    "create_atomic_cas": ("atomic", 0, None, ("ptr", "cmp", "val")),
}
# Wrapped when present (they delegate to the methods above in triton 3.9; if a version
# does not, they count themselves: see _wrap).
_OPTIONAL_OPS = {
    "create_atomic_load": ("load", 0, 1, ("ptr", "mask")),
    "create_atomic_store": ("store", 0, 2, ("ptr", "val", "mask")),
}


def _record(kind: str, nbytes: int):
    for st in _active:
        launch = st.current or st.outside
        setattr(launch, f"{kind}_bytes", getattr(launch, f"{kind}_bytes") + nbytes)
        setattr(launch, f"{kind}s", getattr(launch, f"{kind}s") + 1)


def _arg(args, kwargs, pos, name):
    """Argument ``pos`` (after ``self``) of a wrapped call, passed by position or by name."""
    return args[pos] if pos < len(args) else kwargs.get(name)


def _wrap(name, original, kind, ptr_pos, mask_pos, names):
    """A builder method that counts its bytes unless a wrapped method it calls already did
    (``create_load`` calling ``create_masked_load``, an atomic load calling a masked load):
    the innermost wrapped call counts, so nothing is counted twice whatever delegates to
    what in a given Triton version."""

    def wrapper(self, *args, **kwargs):
        stack = _local.__dict__.setdefault("stack", [])
        stack.append(False)  # becomes True when a nested wrapped call counted
        try:
            result = original(self, *args, **kwargs)
        finally:
            nested = stack.pop()
        if not nested and _active:
            ptr = _arg(args, kwargs, ptr_pos, names[ptr_pos])
            mask = None if mask_pos is None else _arg(args, kwargs, mask_pos, names[mask_pos])
            _record(kind, _count(mask, np.shape(ptr.data)) * _elem_bytes(ptr))
        if stack:
            stack[-1] = True
        return result

    wrapper.__name__ = name
    wrapper.__wrapped__ = original
    return wrapper


def _wrap_set_grid_idx(original):
    def set_grid_idx(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        for st in _active:
            if st.current is not None:
                st.current.programs += 1
        return result

    set_grid_idx.__wrapped__ = original
    return set_grid_idx


def _wrap_grid_call(original):
    def __call__(self, *args, **kwargs):
        name = getattr(self.fn, "__name__", repr(self.fn))
        launches = [Launch(name) for _ in _active]
        saved = [st.current for st in _active]
        for st, launch in zip(_active, launches):
            st.launches.append(launch)
            st.current = launch
        try:
            return original(self, *args, **kwargs)
        finally:
            for st, prev in zip(_active, saved):
                st.current = prev

    __call__.__wrapped__ = original
    return __call__


def _check_internals():
    """Refuse a Triton whose interpreter does not look like the one this counter was
    written for (triton 3.6 to 3.9), naming what differs."""
    interp = _interp()
    problems = []
    builder = getattr(interp, "InterpreterBuilder", None)
    grid = getattr(interp, "GridExecutor", None)
    if builder is None:
        problems.append("no triton.runtime.interpreter.InterpreterBuilder")
    if grid is None or not callable(getattr(grid, "__call__", None)):
        problems.append("no triton.runtime.interpreter.GridExecutor.__call__")
    if builder is not None:
        present = {k: v for k, v in _OPTIONAL_OPS.items() if hasattr(builder, k)}
        for name, (_, ptr_pos, mask_pos, want) in {**_MEMORY_OPS, **present}.items():
            fn = getattr(builder, name, None)
            if fn is None:
                problems.append(f"InterpreterBuilder.{name} is missing")
                continue
            params = list(inspect.signature(fn).parameters)[1:]
            if tuple(params[:len(want)]) != want:
                problems.append(f"InterpreterBuilder.{name}{tuple(params)}: expected the "
                                f"arguments to start with {want}")
        if not hasattr(builder, "set_grid_idx"):
            problems.append("InterpreterBuilder.set_grid_idx is missing")
    if problems:
        raise RuntimeError(
            f"benchmarks/traffic.py: the Triton {_version()} interpreter differs from what the "
            f"byte counter wraps (written for triton 3.6-3.9): " + "; ".join(problems)
            + ". Update _MEMORY_OPS / _wrap in benchmarks/traffic.py before trusting any count.")


def _require_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("counting(): the byte counter needs the Triton interpreter: set "
                           "TRITON_INTERPRET=1 before triton or fastflow is imported")


def _install():
    """Wrap the interpreter's methods; returns the originals to put back."""
    interp = _interp()
    cls = interp.InterpreterBuilder
    saved = []
    ops = dict(_MEMORY_OPS)
    ops.update({k: v for k, v in _OPTIONAL_OPS.items() if hasattr(cls, k)})
    for name, (kind, ptr_pos, mask_pos, names) in ops.items():
        original = cls.__dict__.get(name, getattr(cls, name))
        saved.append((cls, name, cls.__dict__.get(name)))
        setattr(cls, name, _wrap(name, original, kind, ptr_pos, mask_pos, names))
    saved.append((cls, "set_grid_idx", cls.__dict__.get("set_grid_idx")))
    cls.set_grid_idx = _wrap_set_grid_idx(cls.__dict__.get("set_grid_idx", cls.set_grid_idx))
    g = interp.GridExecutor
    saved.append((g, "__call__", g.__dict__.get("__call__")))
    g.__call__ = _wrap_grid_call(g.__dict__.get("__call__", g.__call__))
    return saved


def _uninstall(saved):
    for owner, name, original in reversed(saved):
        if original is None:
            with contextlib.suppress(AttributeError):
                delattr(owner, name)
        else:
            setattr(owner, name, original)


_installed: list | None = None  # the originals while any counting() block is open


@contextlib.contextmanager
def _counting_unchecked():
    global _installed
    state = _State()
    with _lock:
        if not _active:
            _installed = _install()
        _active.append(state)
    try:
        yield state
    finally:
        with _lock:
            _active.remove(state)
            if not _active:
                _uninstall(_installed)
                _installed = None


def _probe():
    """Run a kernel whose traffic is known (a partial last block, a scalar load, an atomic)
    and compare: the check that the wrapped methods are the ones kernels go through."""
    import triton
    import triton.language as tl

    @triton.jit
    def _traffic_probe(src, dst, acc, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keep = offs < n
        v = tl.load(src + offs, mask=keep, other=0.0)
        tl.store(dst + offs, v * 2.0, mask=keep)
        tl.atomic_add(acc, tl.load(src))  # scalar load + one-element atomic per program

    n, block = 5, 4
    src = torch.arange(n, dtype=torch.float32)
    dst = torch.zeros(n, dtype=torch.float32)
    acc = torch.zeros(1, dtype=torch.float32)
    with _counting_unchecked() as st:
        _traffic_probe[(2,)](src, dst, acc, n, BLOCK=block)
    got = [(r.kernel, r.programs, r.load_bytes, r.store_bytes, r.atomic_bytes) for r in st.launches]
    want = [("_traffic_probe", 2, (n + 2) * 4, n * 4, 2 * 4)]
    if got != want or st.outside.total_bytes or not torch.equal(dst, src * 2):
        raise RuntimeError(
            f"benchmarks/traffic.py: the byte counter's probe kernel counted {got} "
            f"(outside launches: {st.outside.total_bytes} B), expected {want}, under the "
            f"Triton {_version()} interpreter: its internals changed; fix the counter before "
            f"trusting any count.")


@contextlib.contextmanager
def counting():
    """Count the bytes every interpreted Triton launch moves inside the block: yields a list
    that fills with one ``Launch`` per launch, in launch order. The interpreter's methods are
    restored when the block ends, also on an exception. Nested blocks each see all launches
    made while they are open."""
    global _checked
    _require_interpreter()
    if _checked != _version():
        _check_internals()
        _probe()
        _checked = _version()
    with _counting_unchecked() as state:
        yield state.launches
    if state.outside.total_bytes:
        raise RuntimeError(f"counting(): {state.outside.total_bytes} bytes of memory ops ran "
                           f"outside any kernel launch; the counter cannot attribute them")


def measure(fn, *args, **kwargs) -> list[Launch]:
    """Run ``fn(*args, **kwargs)`` under ``counting()`` and return its launches."""
    with counting() as launches:
        fn(*args, **kwargs)
    return list(launches)


def tensor_bytes(*tensors) -> int:
    """Bytes of the given tensors (None and non-tensors skipped): the floor's terms."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# --------------------------------------------------------------------------------------
# The op families at Glow-like shapes
# --------------------------------------------------------------------------------------


@dataclass
class Row:
    op: str
    shape: str
    launches: list
    floor_read: int
    floor_write: int

    @property
    def floor(self) -> int:
        return self.floor_read + self.floor_write

    @property
    def loaded(self) -> int:
        return sum(r.load_bytes for r in self.launches)

    @property
    def stored(self) -> int:
        return sum(r.store_bytes for r in self.launches)

    @property
    def atomic(self) -> int:
        return sum(r.atomic_bytes for r in self.launches)

    @property
    def programs(self) -> int:
        return sum(r.programs for r in self.launches)

    @property
    def ratio(self) -> float:
        return (self.loaded + self.stored + self.atomic) / self.floor


def _grads(outs):
    return [torch.randn_like(o) for o in outs]


def coupling_rows(n, c, s) -> list[Row]:
    import fastflow as ff

    shape = f"N={n} C={c} {s}x{s}"
    x = torch.randn(n, c, s, s, requires_grad=True)
    h = torch.randn(n, 2 * (c // 2), s, s, requires_grad=True)
    rows = []
    with ff.use_backend("triton"):
        with counting() as fwd:
            y, ld = ff.affine_coupling(x, h)
        rows.append(Row("coupling fwd", shape, list(fwd), tensor_bytes(x, h), tensor_bytes(y, ld)))
        gy, gld = _grads((y, ld))
        with counting() as bwd:
            gx, gh = torch.autograd.grad((y, ld), (x, h), (gy, gld))
        # the backward needs only the transformed part of x (the suite's bytes_bwd)
        rows.append(Row("coupling bwd", shape, list(bwd),
                        tensor_bytes(gy, gld, x[:, c - c // 2:], h), tensor_bytes(gx, gh)))
        yd = y.detach()
        with torch.no_grad(), counting() as inv:
            xr, ldr = ff.affine_coupling(yd, h, reverse=True)
        rows.append(Row("coupling inv", shape, list(inv), tensor_bytes(yd, h), tensor_bytes(xr, ldr)))
    return rows


def gaussian_rows(n, d) -> list[Row]:
    import fastflow as ff

    shape = f"N={n} D={d}"
    mu = torch.randn(n, d, requires_grad=True)
    lv = (0.1 * torch.randn(n, d)).requires_grad_(True)
    rows = []
    with ff.use_backend("triton"):
        with counting() as fwd:
            z, kl = ff.reparameterize_kl(mu, lv)
        # floor: mu, logvar in; z, kl out (the 8-byte seed and the noise are not tensors
        # the caller holds: the noise is drawn in the kernel)
        rows.append(Row("gaussian fwd", shape, list(fwd), tensor_bytes(mu, lv), tensor_bytes(z, kl)))
        gz, gkl = _grads((z, kl))
        with counting() as bwd:
            gmu, glv = torch.autograd.grad((z, kl), (mu, lv), (gz, gkl))
        rows.append(Row("gaussian bwd", shape, list(bwd), tensor_bytes(gz, gkl, mu, lv),
                        tensor_bytes(gmu, glv)))
    return rows


def _lu_params(c):
    """The parameters of Glow's LU 1x1 convolution, as ff.InvConv2dLU holds them."""
    import fastflow as ff

    layer = ff.InvConv2dLU(c)
    return layer, (layer.w_l, layer.w_u, layer.w_s, layer.s_sign, layer.w_rows)


def channel_mix_rows(n, c, s) -> list[Row]:
    """ActNorm + 1x1 convolution as FlowStep runs it: W from lu_weight, already in x's
    compute dtype (float32), the ActNorm's (1, C, 1, 1) loc and scale."""
    import fastflow as ff

    shape = f"N={n} C={c} {s}x{s}"
    layer, _ = _lu_params(c)
    x = torch.randn(n, c, s, s, requires_grad=True)
    with torch.no_grad(), ff.use_backend("triton"):
        w = layer.matrix_and_logdet(x, for_mix=True)[0].clone()
    w.requires_grad_(True)
    loc = (0.1 * torch.randn(1, c, 1, 1)).requires_grad_(True)
    scale = (1 + 0.1 * torch.rand(1, c, 1, 1)).requires_grad_(True)
    rows = []
    with ff.use_backend("triton"):
        with counting() as fwd:
            y = ff.channel_mix(x, w, loc=loc, scale=scale)
        rows.append(Row("channel_mix fwd", shape, list(fwd), tensor_bytes(x, w, loc, scale),
                        tensor_bytes(y)))
        (gy,) = _grads((y,))
        with counting() as bwd:
            grads = torch.autograd.grad(y, (x, w, loc, scale), gy)
        rows.append(Row("channel_mix bwd", shape, list(bwd), tensor_bytes(gy, x, w, loc, scale),
                        tensor_bytes(*grads)))
    return rows


def _strict_triangle_bytes(t) -> int:
    """Bytes of the strictly lower (or upper) part of a square matrix: the part of the
    ``lower`` / ``upper`` parameters the LU weight depends on (the rest is ignored)."""
    c = t.shape[0]
    return c * (c - 1) // 2 * t.element_size()


def lu_weight_rows(n, c, s) -> list[Row]:
    """W and the whole step's log-det (ActNorm's term folded in), as FlowStep asks. The
    floor reads only the strict triangles of ``lower`` and ``upper`` (the op ignores the
    other entries) and writes the full gradients."""
    import fastflow as ff
    from fastflow.ops.lu_weight import lu_weight_logdet

    shape = f"C={c} (N={n} {s}x{s})"
    _, params = _lu_params(c)
    scale = (1 + 0.1 * torch.rand(1, c, 1, 1)).requires_grad_(True)
    rows = []
    with ff.use_backend("triton"):
        with counting() as fwd:
            w, ld = lu_weight_logdet(*params, scale=scale, n=n, ld_mult=s * s,
                                     ld_dtype=torch.float32, w_dtype=torch.float32)
        tri = _strict_triangle_bytes(params[0]) + _strict_triangle_bytes(params[1])
        rows.append(Row("lu_weight fwd", shape, list(fwd), tri + tensor_bytes(*params[2:], scale),
                        tensor_bytes(w, ld)))
        gw, gld = _grads((w, ld))
        leaves = (params[0], params[1], params[2], scale)
        with counting() as bwd:
            grads = torch.autograd.grad((w, ld), leaves, (gw, gld))
        rows.append(Row("lu_weight bwd", shape, list(bwd),
                        tri + tensor_bytes(gw, gld, *params[2:], scale), tensor_bytes(*grads)))
    return rows


FLOW_SHAPES = [(8, 12, 16), (8, 24, 8), (8, 48, 4)]   # (N, C, side): Glow's levels at 32x32 / 2
FLOW_SHAPES_QUICK = [(4, 12, 16), (4, 48, 4)]
GAUSSIAN_SHAPES = [(8, 512), (64, 64)]
GAUSSIAN_SHAPES_QUICK = [(8, 512)]


def all_rows(quick: bool = False) -> list[Row]:
    torch.manual_seed(0)
    flows = FLOW_SHAPES_QUICK if quick else FLOW_SHAPES
    rows = []
    for n, c, s in flows:
        rows += coupling_rows(n, c, s)
    for n, d in (GAUSSIAN_SHAPES_QUICK if quick else GAUSSIAN_SHAPES):
        rows += gaussian_rows(n, d)
    for n, c, s in flows:
        rows += channel_mix_rows(n, c, s)
    for n, c, s in flows:
        rows += lu_weight_rows(n, c, s)
    return rows


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------

HEADER = ["op", "shape", "launches", "programs", "loaded KB", "stored KB", "floor KB", "ratio",
          "loads / read floor"]


def _cells(row: Row) -> list[str]:
    stored = row.stored + row.atomic
    return [row.op, row.shape, str(len(row.launches)), str(row.programs),
            f"{row.loaded / KB:.2f}", f"{stored / KB:.2f}", f"{row.floor / KB:.2f}",
            f"{row.ratio:.2f}x", f"{row.loaded / row.floor_read:.2f}x"]


def format_table(rows: list[Row], markdown: bool = False, launches: bool = False) -> str:
    body = [_cells(r) for r in rows]
    if launches:
        detail = []
        for r, cells in zip(rows, body):
            detail.append(cells)
            for k in r.launches:
                detail.append(["", f"  {k.kernel}", "1", str(k.programs), f"{k.load_bytes / KB:.2f}",
                               f"{(k.store_bytes + k.atomic_bytes) / KB:.2f}", "", "", ""])
        body = detail
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(c.strip() for c in cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(HEADER)]
    fmt = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(HEADER), fmt(["-" * w for w in widths])] + [fmt(c) for c in body])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer, smaller shapes (under a minute on a CPU)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--launches", action="store_true", help="one line per kernel launch under each row")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("traffic.py counts bytes in the Triton interpreter: run it with TRITON_INTERPRET=1 "
              "(the default on a machine without CUDA)", file=sys.stderr)
        return 2
    import triton

    t0 = time.perf_counter()
    rows = all_rows(quick=args.quick)
    print(f"Bytes moved per Triton kernel launch, counted in the interpreter (triton "
          f"{triton.__version__}, torch {torch.__version__}, float32); floor = each input read "
          f"once + each output written once; ratio = (loaded + stored) / floor; KB = 1000 B")
    print(format_table(rows, markdown=args.markdown, launches=args.launches))
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
