"""TarFlow sampler figures that do not depend on the device.

    python benchmarks/suite_tarflow.py [--quick] [--json PATH]

* ATen operators + Triton launches per sampled token per block, for the static KV cache
  with the fused one-token head (fastflow), the cat-grown cache of the published sampler
  and the naive sampler that recomputes the transformer over the whole prefix; with the
  elements each copies into its cache and the FLOPs per token (linear layers counted,
  attention computed from the number of (query, key) pairs each evaluates). Per-token
  figures are the difference between two images of 16 and 64 tokens divided by 48, so
  per-block set-up is not counted.
* Host synchronisations in ``sample`` (sequential: the goal is 0) and in Jacobi sampling.
* Jacobi iterations to converge per block against T, on TarFlows trained here on the
  embedded digits (``python -m fastflow train-tarflow``, a short run per T).

On a GPU the static-cache step is additionally captured in one CUDA graph per block: one
graph launch per token instead of the operator count below (not measurable on a CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # the Triton kernels run interpreted on a CPU-only machine
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import fastflow as ff

sys.path.insert(0, str(Path(__file__).parent))
from harness import _AtenCounter, _LaunchCounter  # noqa: E402

SYNC_OPS = ("_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal")
# ATen operators that only make a view (no GPU kernel); the others launch one (or more)
VIEW_OPS = {"view", "_unsafe_view", "unsqueeze", "squeeze", "t", "transpose", "permute",
            "unbind", "select", "slice", "expand", "alias", "as_strided", "detach",
            "lift_fresh", "split", "chunk"}


class _Copies(TorchDispatchMode):
    """Elements written into KV caches (cat outputs, index_copy sources) and host syncs."""

    def __init__(self):
        super().__init__()
        self.cat_elems = self.index_copy_elems = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name == "cat":
            self.cat_elems += out.numel()
        elif name in ("index_copy_", "index_copy"):
            self.index_copy_elems += args[3].numel()
        elif name in SYNC_OPS:
            self.syncs += 1
        return out


def _model(img_size, channels=64, layers=2, classes=10):
    torch.manual_seed(0)
    model = ff.TarFlow(3, img_size, 2, channels, 2, layers, classes, head_dim=16)
    with torch.no_grad():
        for b in model.blocks:
            b.proj_out.weight.normal_(0, 0.02)
    return model.eval()


def _one_block(model, cache, n, guidance):
    """Sample the last block (the first one inverted) of ``model``; returns the counters."""
    block = model.blocks[-1]
    z = torch.randn(n, model.tokens, model.dim)
    y = torch.arange(n) % model.num_classes
    guided = guidance != 0.0
    labels = torch.cat([y, torch.full_like(y, model.num_classes)]) if guided else y
    kw = dict(clamp=model.clamp, order=model.order(len(model.blocks) - 1), guidance=guidance,
              guided=guided)
    cond = block.condition(labels)

    def run():
        caches = model._new_caches(z, 2 * n if guided else n) if cache == "static" else None
        with torch.no_grad():
            model._sequential_block(block, z, cond, kw, cache, caches, graphs=False)

    run()  # warm-up: compiles (or interprets once) the kernels outside the counts
    aten, launches, copies, flops = _AtenCounter(), _LaunchCounter(), _Copies(), \
        FlopCounterMode(display=False)
    with launches, aten, copies, flops:
        run()
    return {"ops": len(aten.ops), "views": sum(o in VIEW_OPS for o in aten.ops),
            "launches": launches.count, "cat": copies.cat_elems,
            "index_copy": copies.index_copy_elems, "flops": flops.get_total_flops(),
            "syncs": copies.syncs}


def token_figures(n=4, guidance=1.0) -> list[dict]:
    rows = []
    small, big = _model(8), _model(16)  # T = 16 and T = 64 tokens, otherwise identical
    dt = big.tokens - small.tokens
    per = {}
    for cache, backend in [("static", "triton"), ("static", "reference"), ("cat", "triton"),
                           ("none", "triton")]:
        with ff.use_backend(backend):
            a, b = _one_block(small, cache, n, guidance), _one_block(big, cache, n, guidance)
        per[(cache, backend)] = {k: (b[k] - a[k]) / dt for k in a} | {"total_T64": b}
    names = {("static", "triton"): "static KV cache + fused head (fastflow)",
             ("static", "reference"): "static KV cache, head in eager PyTorch",
             ("cat", "triton"): "cat-grown cache (published sampler)",
             ("none", "triton"): "naive: transformer over the whole prefix"}
    shape = (f"N={n} x2 (guidance), 2 layers, width 64, 3x{{8,16}}^2 images, patch 2, "
             f"D=12, T=16 vs 64")
    # attention FLOPs (FlopCounterMode does not see CPU attention): per layer, QK^T and
    # AV cost 4 * B * C per (query, key) pair; averaged over the T - 1 token steps of T = 64
    rows_b, width, n_layers, t_big = 2 * n, 64, 2, big.tokens
    pairs = {"static": [t_big] * (t_big - 1),                    # masked: every position
             "cat": [t + 1 for t in range(t_big - 1)],           # the grown past only
             "none": [(t + 1) ** 2 for t in range(t_big - 1)]}   # full causal prefix matrix
    attn = {k: 4 * rows_b * width * n_layers * sum(v) / (t_big - 1) for k, v in pairs.items()}
    for key, name in names.items():
        p = per[key]
        rows.append({
            "figure": f"tarflow sampler, per token per block: {name} ({shape})",
            "aten_ops": p["ops"], "aten_view_ops": p["views"], "triton_launches": p["launches"],
            "kernel_launches_eager": p["ops"] - p["views"] + p["launches"],
            "cache_elements_copied": p["cat"] + p["index_copy"],
            "linear_flops": p["flops"], "attention_flops_T64_avg": attn[key[0]],
            "host_syncs": p["syncs"],
            "T64_block_totals": p["total_T64"]})
    return rows


def sync_figures() -> list[dict]:
    model = _model(8, channels=32, layers=1)
    y = torch.arange(4) % 10
    rows = []
    for backend in ("triton", "reference"):
        with ff.use_backend(backend):
            for method, kw in [("sequential", {}), ("jacobi", {"check_every": 4})]:
                model.sample(4, y, guidance=1.0, method=method, **kw)  # warm-up
                copies = _Copies()
                with copies:
                    model.sample(4, y, guidance=1.0, method=method, **kw)
                rows.append({"figure": f"tarflow sample(): host syncs, {method}, {backend} "
                                       f"backend (T=16, 2 blocks, guidance 1.0)",
                             "host_syncs": copies.syncs})
    return rows


def jacobi_figures(quick: bool) -> list[dict]:
    """Train a TarFlow per token count on the digits, then count Jacobi iterations."""
    from fastflow.cli import train_tarflow
    from fastflow.data import digits

    rows = []
    configs = [(8, 4), (8, 2), (8, 1)] if not quick else [(8, 4), (8, 2)]
    x_test, y_test = digits("test", size=8)
    for size, patch in configs:
        out = Path(tempfile.mkdtemp(prefix=f"tarflow_p{patch}_"))
        argv = ["--size", str(size), "--patch-size", str(patch), "--out", str(out),
                "--no-progress", "--epochs", "2" if quick else "6"]
        with ff.use_backend("reference"):
            train_tarflow.main(argv)
        model = ff.TarFlow(1, size, patch, 32, 4, 1, 10, head_dim=16, noise_std=0.1)
        model.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=True)["model"])
        model.eval()
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(32, model.tokens, model.dim, generator=gen)
        y = torch.arange(32) % 10
        for tol in (1e-3, 1e-4):
            for guidance in (0.0, 1.0):
                stats = {}
                with ff.use_backend("reference"):
                    seq = model.reverse(z, y, guidance=guidance)
                    jac = model.reverse(z, y, guidance=guidance, method="jacobi", tol=tol,
                                        check_every=1, stats=stats)
                its = stats["jacobi_iterations"]
                rows.append({"figure": f"tarflow Jacobi iterations per block (trained digits, "
                                       f"T={model.tokens}, tol={tol}, guidance={guidance})",
                             "T": model.tokens, "iterations_per_block": its,
                             "mean_iterations": sum(its) / len(its),
                             "fraction_of_T": sum(its) / len(its) / model.tokens,
                             "max_abs_vs_sequential": (jac - seq).abs().max().item()})
    return rows


def cpu_figures(quick: bool = True) -> list[dict]:
    return token_figures() + sync_figures() + (jacobi_figures(quick) if not quick else [])


def cases(device: str, quick: bool) -> list:
    """No timed cases: the sampler's timing needs a GPU (CUDA graphs); see the figures."""
    return []


def _print(rows):
    for r in rows:
        print(r["figure"])
        for k, v in r.items():
            if k != "figure":
                if isinstance(v, float):
                    v = f"{v:.4g}" if math.isfinite(v) else v
                print(f"    {k}: {v}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter training runs")
    ap.add_argument("--skip-training", action="store_true", help="no Jacobi-vs-T training runs")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    rows = token_figures() + sync_figures()
    _print(rows)
    if not args.skip_training:
        more = jacobi_figures(args.quick)
        _print(more)
        rows += more
    if args.json:
        Path(args.json).write_text(json.dumps({"device": "cpu", "torch": torch.__version__,
                                               "rows": rows}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
