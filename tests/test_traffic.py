"""The interpreter byte counter (benchmarks/traffic.py): exact on hand-written kernels
(partial masks, element sizes, atomics, separate launches), restores the interpreter after
its block (an exception included), refuses what it cannot count, and the fused ops' bytes
against their read-once / write-once floor, each excess byte accounted for."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the byte counter runs in the Triton interpreter (TRITON_INTERPRET=1)",
                allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import triton.runtime.interpreter as interp  # noqa: E402

import fastflow as ff  # noqa: E402
from fastflow.kernels import channel_mix as k_mix  # noqa: E402
from fastflow.kernels import coupling as k_coupling  # noqa: E402
from fastflow.kernels import gaussian as k_gaussian  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _load_traffic():
    spec = importlib.util.spec_from_file_location("traffic_under_test",
                                                  ROOT / "benchmarks" / "traffic.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


traffic = _load_traffic()


@triton.jit
def _scale_copy(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    v = tl.load(src + offs, mask=keep, other=0)
    tl.store(dst + offs, v * 2, mask=keep)


@triton.jit
def _atomic_sum(src, acc, flag, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    tl.atomic_add(acc + offs % 4, tl.full((BLOCK,), 1.0, tl.float32), mask=keep)
    tl.atomic_cas(flag, 0, 1)


def _interpreter_methods():
    names = [*traffic._MEMORY_OPS, *traffic._OPTIONAL_OPS, "set_grid_idx"]
    b = interp.InterpreterBuilder
    return ({n: b.__dict__.get(n) for n in names}, interp.GridExecutor.__dict__["__call__"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int16])
def test_counts_only_the_masked_in_elements(dtype):
    n, block = 1000, 256  # 4 programs, the last with 232 of its 256 lanes masked in
    src = torch.arange(n).to(dtype)
    dst = torch.zeros(n, dtype=dtype)
    with traffic.counting() as launches:
        _scale_copy[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block)
    assert torch.equal(dst, src * 2)
    [r] = launches
    size = src.element_size()
    assert (r.kernel, r.programs) == ("_scale_copy", 4)
    assert r.load_bytes == n * size  # not 1024 * size
    assert r.store_bytes == n * size
    assert (r.loads, r.stores, r.atomic_bytes) == (4, 4, 0)


def test_counts_atomics_and_keeps_launches_apart():
    n, block = 1000, 256
    src = torch.zeros(n)
    acc = torch.zeros(4)
    flag = torch.zeros(1, dtype=torch.int32)
    dst = torch.zeros(10)
    with traffic.counting() as launches:
        _atomic_sum[(4,)](src, acc, flag, n, BLOCK=block)
        _scale_copy[(1,)](src, dst, 10, BLOCK=16)
    assert acc.sum().item() == n and flag.item() == 1
    first, second = launches
    assert (first.kernel, first.programs) == ("_atomic_sum", 4)
    # atomic_add: the 1000 masked-in float32 lanes; atomic_cas: one int32 per program
    assert first.atomic_bytes == n * 4 + 4 * 4
    assert (first.atomics, first.load_bytes, first.store_bytes) == (8, 0, 0)
    assert (second.kernel, second.programs, second.load_bytes, second.store_bytes) == (
        "_scale_copy", 1, 40, 40)


def test_measure_and_tensor_bytes():
    src = torch.ones(300)
    dst = torch.empty(300)
    rows = traffic.measure(_scale_copy[(3,)], src, dst, 300, BLOCK=128)
    assert [(r.kernel, r.load_bytes, r.store_bytes) for r in rows] == [("_scale_copy", 1200, 1200)]
    assert traffic.tensor_bytes(src, None, torch.zeros(3, dtype=torch.float64), 7) == 1200 + 24


def test_restores_the_interpreter_after_the_block_even_on_an_exception():
    before = _interpreter_methods()
    src, dst = torch.ones(8), torch.empty(8)
    with traffic.counting() as launches:
        assert _interpreter_methods() != before  # wrapped inside
        _scale_copy[(1,)](src, dst, 8, BLOCK=8)
    assert _interpreter_methods() == before
    with pytest.raises(ZeroDivisionError):
        with traffic.counting():
            _scale_copy[(1,)](src, dst, 8, BLOCK=8)
            1 / 0
    assert _interpreter_methods() == before
    _scale_copy[(1,)](src, dst, 8, BLOCK=8)  # outside any block: nothing recorded
    assert len(launches) == 1 and launches[0].load_bytes == 32


def test_refuses_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with traffic.counting():
            pass


def test_refuses_an_interpreter_it_does_not_know(monkeypatch):
    monkeypatch.setattr(traffic, "_checked", None)
    monkeypatch.delattr(interp.InterpreterBuilder, "create_masked_store")
    with pytest.raises(RuntimeError, match="create_masked_store is missing"):
        with traffic.counting():
            pass


def test_the_probe_catches_a_miscount(monkeypatch):
    monkeypatch.setattr(traffic, "_checked", None)
    monkeypatch.setattr(traffic, "_elem_bytes", lambda ptr: 1)  # as if sizes were lost
    before = _interpreter_methods()
    with pytest.raises(RuntimeError, match="probe kernel counted"):
        with traffic.counting():
            pass
    assert _interpreter_methods() == before


# --------------------------------------------------------------------------------------
# The fused ops against their floor
# --------------------------------------------------------------------------------------


def test_coupling_forward_moves_exactly_its_floor():
    """One tile per sample: the kernel writes the log-det itself. Read x and h once,
    write y and the log-det once: bytes moved == floor."""
    n, c, s = 2, 6, 4
    assert k_coupling.launch_config(n, c, s * s).extra["N_TILES"] == 1
    x, h = torch.randn(n, c, s, s), torch.randn(n, 2 * (c // 2), s, s)
    with ff.use_backend("triton"), traffic.counting() as launches:
        y, ld = ff.affine_coupling(x, h)
    [r] = launches
    assert r.load_bytes == traffic.tensor_bytes(x, h)
    assert r.store_bytes == traffic.tensor_bytes(y, ld)


@pytest.mark.parametrize("reverse", [False, True])
def test_coupling_forward_and_inverse_at_glow_shape(reverse):
    """Several tiles per sample: inputs read exactly once; the stores are y plus one 4-byte
    log-det partial per tile (the launcher's fixed-order sum makes the log-det), so
    (N_TILES - 1) * N * 4 bytes over the floor: 1.00x."""
    n, c, s = 4, 12, 16
    x, h = torch.randn(n, c, s, s), torch.randn(n, 2 * (c // 2), s, s)
    n_tiles = k_coupling.launch_config(n, c, s * s).extra["N_TILES"]
    assert n_tiles > 1
    with ff.use_backend("triton"), traffic.counting() as launches:
        y, ld = ff.affine_coupling(x, h, reverse=reverse)
    [r] = launches
    assert r.programs == n * n_tiles
    assert r.load_bytes == traffic.tensor_bytes(x, h)
    assert r.store_bytes == traffic.tensor_bytes(y) + n * n_tiles * 4
    floor = traffic.tensor_bytes(x, h, y, ld)
    assert f"{(r.load_bytes + r.store_bytes) / floor:.2f}" == "1.00"


def test_coupling_backward_at_glow_shape():
    """Reads grad y, the transformed half of x and h once, writes grad x and grad h once;
    the only excess: each program reads its sample's 4-byte log-det gradient (a scalar
    load per program, where the floor reads N * 4 bytes)."""
    n, c, s = 4, 12, 16
    x = torch.randn(n, c, s, s, requires_grad=True)
    h = torch.randn(n, 2 * (c // 2), s, s, requires_grad=True)
    with ff.use_backend("triton"):
        y, ld = ff.affine_coupling(x, h)
        gy, gld = torch.randn_like(y), torch.randn_like(ld)
        with traffic.counting() as launches:
            gx, gh = torch.autograd.grad((y, ld), (x, h), (gy, gld))
    [r] = launches
    assert r.kernel == "_coupling_bwd_kernel"
    xb = x[:, c - c // 2:]
    assert r.load_bytes == traffic.tensor_bytes(gy, xb, h) + r.programs * 4
    assert r.store_bytes == traffic.tensor_bytes(gx, gh)
    floor = traffic.tensor_bytes(gy, gld, xb, h, gx, gh)
    assert f"{(r.load_bytes + r.store_bytes) / floor:.2f}" == "1.00"


def test_gaussian_forward_against_its_floor():
    """Reads mu and logvar once and writes z once; the noise is drawn in the kernel, never
    read. Beyond the floor: each program reads the 8-byte Philox seed, and writes one
    4-byte KL partial per (row, tile) instead of one per row. At this VAE-sized shape the
    programs hold 128 elements (MIN_TILE), so that is 12 bytes per 1536: 1.007x."""
    n, d = 8, 512
    mu, lv = torch.randn(n, d), 0.1 * torch.randn(n, d)
    cfg = k_gaussian.launch_config(n, d)
    with ff.use_backend("triton"), traffic.counting() as launches:
        z, kl = ff.reparameterize_kl(mu, lv)
    [r] = launches
    assert r.programs == cfg.grid[0]
    assert r.load_bytes == traffic.tensor_bytes(mu, lv) + 8 * r.programs
    assert r.store_bytes == traffic.tensor_bytes(z) + 4 * n * cfg.extra["N_DTILES"]
    floor = traffic.tensor_bytes(mu, lv, z, kl)
    assert abs((r.load_bytes + r.store_bytes) / floor - 1.00716) < 1e-5
    # with eps given: no seed, the inputs exactly once
    eps = torch.randn(n, d)
    with ff.use_backend("triton"), traffic.counting() as launches:
        ff.reparameterize_kl(mu, lv, eps)
    assert launches[0].load_bytes == traffic.tensor_bytes(mu, lv, eps)


def test_channel_mix_forward_rereads_the_matrix_per_program():
    """Pinned, not a floor: each program reads its output-channel rows of W and the ActNorm
    vectors, so W is read once per (sample, pixel tile) and x once per output-channel tile.
    The op casts the float64 W to float32 once per call, so the programs read 4-byte
    weights (the (C, C) cast itself is one torch op, outside the kernel). y is written
    exactly once."""
    n, c, s = 2, 12, 16
    x = torch.randn(n, c, s, s)
    w = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))[0]
    loc, scale = torch.randn(1, c, 1, 1), 1 + torch.rand(1, c, 1, 1)
    cfg = k_mix.mix_config(n, c, c, s * s, x.dtype, False)
    n_otiles = cfg.extra["N_TILES"] // cfg.extra["N_PTILES"]
    with ff.use_backend("triton"), traffic.counting() as launches:
        y = ff.channel_mix(x, w, loc=loc, scale=scale)
    [r] = launches
    assert r.programs == cfg.grid[0] == n * cfg.extra["N_TILES"]
    assert r.load_bytes == (n_otiles * traffic.tensor_bytes(x)
                            + n * cfg.extra["N_PTILES"] * traffic.tensor_bytes(w.float())
                            + r.programs * traffic.tensor_bytes(loc, scale))
    assert r.store_bytes == traffic.tensor_bytes(y)
    assert r.load_bytes > 1.5 * traffic.tensor_bytes(x, w, loc, scale)


def test_the_table_runs(capsys):
    rows = traffic.coupling_rows(2, 6, 4)
    out = traffic.format_table(rows, markdown=True, launches=True)
    assert "| coupling fwd | N=2 C=6 4x4 | 1 |" in out and "_coupling_bwd_kernel" in out
    assert [r.op for r in rows] == ["coupling fwd", "coupling bwd", "coupling inv"]
    assert all(f"{r.ratio:.2f}" == "1.00" for r in rows)
