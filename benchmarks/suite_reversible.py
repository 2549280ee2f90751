"""Reversible (memory-free) Glow training against the stored-activation one: bytes kept for
backward and train-step time. A standalone script (``python benchmarks/suite_reversible.py``)
and an importable module (``saved_bytes``, ``alive_bytes``, ``step_time_ratio``, ``drift``).

Two independent memory measures of what one forward leaves for backward (the model's
state -- parameters, buffers, cached tensors -- excluded from both):

* ``saved_bytes``: the bytes that ``torch.autograd.graph.saved_tensors_hooks`` sees being
  packed (unique storages) and still held when forward has returned, i.e. what autograd
  nodes keep, custom Functions' ``save_for_backward`` included;
* ``alive_bytes``: every storage created while forward ran (recorded by a
  ``TorchDispatchMode`` with weak references only) that is still alive once forward has
  returned and garbage is collected: whatever the forward left reachable, through the
  autograd graph, ctx attributes or anything else (the outputs' own storages are reported
  apart).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import fastflow as ff


def _state_tensors(obj, depth=0, seen=None):
    """Tensors held as state by ``obj`` (a module: parameters, buffers and any tensor in
    its attributes, e.g. caches), recursively through containers and plain objects."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 16:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, torch.nn.Module):
        out = [t for t in list(obj.parameters(recurse=False)) + list(obj.buffers(recurse=False))]
        for v in obj.__dict__.values():
            if not isinstance(v, dict) or v is not obj._modules:
                out += _state_tensors(v, depth + 1, seen)
        for m in obj.children():
            out += _state_tensors(m, depth + 1, seen)
        return out
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _state_tensors(v, depth + 1, seen)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _state_tensors(v, depth + 1, seen)]
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("fastflow"):
        return _state_tensors(vars(obj), depth + 1, seen)
    return []


def _param_storages(model):
    """Storages of the model's state (parameters, buffers, cached tensors): not per-step
    memory, excluded from both measures."""
    return {t.untyped_storage().data_ptr() for t in _state_tensors(model)}


def _remember(table, t, key):
    """Record ``t``'s storage under its address unless a live storage is already there
    (an address freed and reused during the call is a new storage)."""
    old = table.get(key[0])
    if old is None or old[0].expired():
        table[key[0]] = (StorageWeakRef(t.untyped_storage()), key[1])


def _storage_key(t):
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except (NotImplementedError, RuntimeError):
        return None


def saved_bytes(model, x, loss_fn=None):
    """(bytes of the unique non-parameter storages that autograd packed for backward during
    ``loss_fn(model, x)`` and still holds when it has returned, the loss). Packs of graphs
    already freed (a matrix assembled with gradients on and detached) are not kept."""
    params = _param_storages(model)
    seen = {}

    def pack(t):
        key = _storage_key(t)
        if key is not None and key[0] not in params:
            _remember(seen, t, key)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = (loss_fn or _glow_loss)(model, x)
    gc.collect()
    return sum(n for ref, n in seen.values() if not ref.expired()), out


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.made = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                key = _storage_key(t)
                if key is not None and key[1] > 0:
                    _remember(self.made, t, key)
        return out


def alive_bytes(model, x, loss_fn=None, exclude_outputs=True):
    """(bytes of storages created during ``loss_fn(model, x)`` still alive after it returned
    and ``gc.collect()``, the loss). ``exclude_outputs``: the returned tensors' own storages
    are not counted."""
    rec = _Recorder()
    with rec:
        out = (loss_fn or _glow_loss)(model, x)
    gc.collect()
    skip = _param_storages(model)
    if exclude_outputs:
        skip |= {t.untyped_storage().data_ptr() for t in _tensors(out)}
    return sum(n for ptr, (ref, n) in rec.made.items()
               if not ref.expired() and ptr not in skip), out


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _glow_loss(model, x):
    """The training loss of a Glow (bits per dimension) and its z list."""
    log_p, logdet, z = model(x)
    return ff.bits_per_dim(log_p, logdet, x[0].numel()), z


def make_pair(n_flow, n_block=3, in_channel=3, filter_size=128, dtype=torch.float32, seed=0):
    """(stored, reversible) Glows with the same parameters, ActNorm initialised."""
    torch.manual_seed(seed)
    stored = ff.Glow(in_channel, n_flow, n_block, filter_size=filter_size).to(dtype)
    rev = ff.Glow(in_channel, n_flow, n_block, filter_size=filter_size, reversible=True).to(dtype)
    return stored, rev


def _init_pair(stored, rev, x):
    stored(x)  # data-dependent ActNorm initialisation
    rev.load_state_dict(stored.state_dict())
    for m in (stored, rev):  # one warm call each: caches built once are not per forward
        _glow_loss(m, x)[0].backward()
        m.zero_grad(set_to_none=True)


def one_step_net_bytes(model, x):
    """Bytes the coupling network of block 0's first step saves (stored activations)."""
    step = model.blocks[0].flows[0]
    from fastflow.glow import squeeze2x2
    with torch.no_grad():
        h_in = step.actnorm(squeeze2x2(x))[0]
    ca = step.coupling.in_channel - step.coupling.in_channel // 2
    n, _ = saved_bytes(step.coupling.net, h_in[:, :ca].clone().requires_grad_(True),
                       lambda m, v: m(v))
    return n


def memory_table(n_flows=(4, 8, 16, 32), batch=4, size=32, **kw):
    rows = []
    for n_flow in n_flows:
        stored, rev = make_pair(n_flow, **kw)
        x = torch.rand(batch, stored.in_channel, size, size) - 0.5
        _init_pair(stored, rev, x)
        row = {"n_flow": n_flow}
        for name, m in (("stored", stored), ("reversible", rev)):
            row[f"{name}_saved"] = saved_bytes(m, x)[0]
            row[f"{name}_alive"] = alive_bytes(m, x)[0]
            row[f"{name}_alive_with_outputs"] = alive_bytes(m, x, exclude_outputs=False)[0]
        row["one_step_net"] = one_step_net_bytes(stored, x)
        rows.append(row)
        del stored, rev
        gc.collect()
    return rows


def step_time_ratio(n_flow=8, n_block=2, in_channel=1, size=16, batch=64, filter_size=64,
                    repeats=10, warmup=2):
    """Median train step (forward, backward, Adam step) of the stored and the reversible
    model, interleaved in one run: {"wall": (stored s, reversible s, ratio), "cpu": (...)}.
    The CPU-time figures (``time.process_time``, all threads of this process) are the ones
    to read on a machine shared with other jobs."""
    stored, rev = make_pair(n_flow, n_block, in_channel, filter_size)
    x = torch.rand(batch, in_channel, size, size) - 0.5
    _init_pair(stored, rev, x)
    opts = {id(m): torch.optim.Adam(m.parameters(), 1e-4) for m in (stored, rev)}
    times = {(id(m), k): [] for m in (stored, rev) for k in ("wall", "cpu")}
    for i in range(warmup + repeats):
        for m in (stored, rev):
            t, c = time.perf_counter(), time.process_time()
            opts[id(m)].zero_grad(set_to_none=True)
            _glow_loss(m, x)[0].backward()
            opts[id(m)].step()
            if i >= warmup:
                times[id(m), "wall"].append(time.perf_counter() - t)
                times[id(m), "cpu"].append(time.process_time() - c)
    out = {}
    for k in ("wall", "cpu"):
        s, r = statistics.median(times[id(stored), k]), statistics.median(times[id(rev), k])
        out[k] = (s, r, r / s)
    return out


# --------------------------------------------------------------------------------------
# Drift: reversible vs stored gradients along a digits training run
# --------------------------------------------------------------------------------------


def _groups(name):
    for key in ("actnorm", "invconv", "coupling", "prior"):
        if f".{key}." in name or name.endswith(f".{key}"):
            return key
    return "other"


def grad_drift(stored, rev, x):
    """Relative difference ||g_rev - g_stored|| / ||g_stored|| per parameter group, for the
    same parameters (``rev`` gets ``stored``'s state first)."""
    rev.load_state_dict(stored.state_dict())
    grads = []
    for m in (stored, rev):
        m.zero_grad(set_to_none=True)
        _glow_loss(m, x)[0].backward()
        grads.append({n: p.grad.detach().double().clone() for n, p in m.named_parameters()
                      if p.grad is not None})
    diff, norm = {}, {}
    for n, g in grads[0].items():
        k = _groups(n)
        diff[k] = diff.get(k, 0.0) + (grads[1][n] - g).square().sum().item()
        norm[k] = norm.get(k, 0.0) + g.square().sum().item()
    stored.zero_grad(set_to_none=True)
    return {k: math.sqrt(diff[k]) / max(math.sqrt(norm[k]), 1e-300) for k in diff}


def drift(checkpoints=(0, 100, 1000), n_flow=4, n_block=2, filter_size=32, batch=64, lr=1e-3,
          size=8, seed=0, dtype=torch.float32):
    """Train a stored Glow on the embedded digits; at each step count in ``checkpoints``
    measure the reversible/stored gradient drift per group on a fixed batch. Returns
    {step: {group: relative difference}} and the reversible model's fallback count."""
    from fastflow.data import batches, digits

    torch.manual_seed(seed)
    images = digits("train", size=size)[0].to(dtype)
    images = images + torch.rand(images.shape, dtype=dtype) / 256 - 0.5
    probe = images[:batch]
    stored = ff.Glow(1, n_flow, n_block, filter_size=filter_size).to(dtype)
    rev = ff.Glow(1, n_flow, n_block, filter_size=filter_size, reversible=True).to(dtype)
    stored(probe)
    opt = torch.optim.Adam(stored.parameters(), lr)
    gen = torch.Generator().manual_seed(seed)
    out, step = {}, 0
    last = max(checkpoints)
    while True:
        for xb in batches(images, batch, generator=gen, drop_last=True):
            if step in checkpoints:
                out[step] = grad_drift(stored, rev, probe)
            if step >= last:
                return out, int(rev.fallback_count)
            opt.zero_grad(set_to_none=True)
            _glow_loss(stored, xb)[0].backward()
            opt.step()
            step += 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-drift", action="store_true", help="skip the 1000-step drift run")
    ap.add_argument("--skip-memory", action="store_true", help="skip the memory table")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default); 1 gives steadier figures on "
                         "a machine shared with other jobs")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if not args.skip_memory:
        _print_memory()
    _print_times()
    if not args.skip_drift:
        _print_drift()
    return 0


def _print_memory():
    print("\nbytes kept for backward per train step (Glow 3x32x32, L=3, filter 128, batch 4; "
          "model state (parameters, buffers, caches) excluded; alive: after forward, outputs excluded)")
    print(f"{'n_flow':>6} {'stored saved':>13} {'rev saved':>11} {'ratio':>7} "
          f"{'stored alive':>13} {'rev alive':>11} {'ratio':>7} {'1 step net':>11}")
    for r in memory_table():
        print(f"{r['n_flow']:>6} {r['stored_saved']:>13,} {r['reversible_saved']:>11,} "
              f"{r['stored_saved'] / r['reversible_saved']:>7.1f} {r['stored_alive']:>13,} "
              f"{r['reversible_alive']:>11,} {r['stored_alive'] / r['reversible_alive']:>7.1f} "
              f"{r['one_step_net']:>11,}")


def _print_times():
    print("\ntrain step (forward, backward, Adam), stored vs reversible, interleaved, median of 10:")
    for cfg in (dict(n_flow=8, n_block=2, in_channel=1, size=16, batch=64, filter_size=64),
                dict(n_flow=8, n_block=3, in_channel=3, size=32, batch=16, filter_size=128)):
        res = step_time_ratio(**cfg)
        print(f"  Glow {cfg['in_channel']}x{cfg['size']}x{cfg['size']}, K={cfg['n_flow']}, "
              f"L={cfg['n_block']}, filter {cfg['filter_size']}, batch {cfg['batch']}: " +
              "; ".join(f"{k} stored {s * 1e3:.1f} ms, reversible {r * 1e3:.1f} ms, ratio "
                        f"{q:.3f}" for k, (s, r, q) in res.items()))


def _print_drift():
    res, count = drift()
    print("\ngradient drift ||g_rev - g_stored|| / ||g_stored|| on digits (Glow 1x8x8, K=4, "
          "L=2, filter 32, float32, Adam 1e-3):")
    for step, groups in sorted(res.items()):
        print(f"  step {step:>5}: " + ", ".join(f"{k} {v:.2e}" for k, v in sorted(groups.items())))
    print(f"  fallback stage inputs kept: {count}")


if __name__ == "__main__":
    sys.exit(main())
