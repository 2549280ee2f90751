"""Single-process checks of the torchrun helpers with a fake world (no process group):
the ranks' shards of the epochs' global batches, and what only rank 0 says."""

import torch

from fastflow.cli.common import prepare_out
from fastflow.cli.loop import Distributed, epoch_order


def _fake(world, rank):
    d = object.__new__(Distributed)  # no torchrun: only the fields shard() reads
    d.world, d.rank, d.local_rank, d.device = world, rank, rank, torch.device("cpu")
    return d


def test_shards_of_an_epoch_cover_its_full_batches_once_as_one_process():
    """90 images, global batch 12, 2 or 3 processes: each step the ranks' shards are the
    one-process batch in rank order; an epoch sees 84 distinct images (the last partial
    batch dropped, as with one process), and another epoch's order differs."""
    n, batch = 90, 12
    for world in (2, 3):
        seen = []
        order = epoch_order(n, 0, 3)
        for i in range(n // batch):
            idx = order[i * batch:(i + 1) * batch]
            shards = [_fake(world, r).shard(idx) for r in range(world)]
            assert all(len(s) == batch // world for s in shards)
            assert torch.equal(torch.cat(shards), _fake(1, 0).shard(idx))
            seen += torch.cat(shards).tolist()
        assert len(seen) == len(set(seen)) == n - n % batch
    assert not torch.equal(epoch_order(n, 0, 3), epoch_order(n, 0, 4))


def test_resume_without_checkpoint_is_said_by_the_writing_process_only(tmp_path, capsys):
    prepare_out(tmp_path / "run", resume=True, write=False)  # torchrun's other ranks
    assert capsys.readouterr().out == ""
    prepare_out(tmp_path / "run", resume=True, write=True)
    assert "starting fresh" in capsys.readouterr().out


def test_the_test_fraction_note_goes_where_train_says_it(capsys):
    """'--test-fraction ... does not apply' was printed by every torchrun process: it goes
    to the caller's ``say`` (rank 0's print; the others' say nothing)."""
    import argparse

    from fastflow.cli.common import load_data

    args = argparse.Namespace(data="digits", size=None, n_bits=None, test_fraction=0.5, seed=0)
    said = []
    load_data(args, lambda *a, **k: said.append(a[0]))
    assert capsys.readouterr().out == ""
    assert said == ["--test-fraction: 0.5 does not apply to digits, which holds out a fixed 20%"]


def test_readme_says_the_batch_is_global_under_torchrun():
    """--help said it; the README did not, and a per-process batch is what other trainers
    (a DistributedSampler with a per-rank DataLoader) take: N times the steps' images."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "`--batch-size` is the global batch, split\nevenly across the N processes" in readme


def test_an_epoch_resumed_mid_way_counts_all_its_steps_seconds_and_processes(tmp_path,
                                                                            small_npz):
    """An epoch stopped by --max-steps after batch 2 of 4 and resumed (here, as if by another
    number of processes): its row's seconds were those of the resumed run's steps alone and
    its images/s of their images, and world_size said the resumed run's count alone."""
    import json

    from fastflow.cli import train

    out = tmp_path / "run"
    argv = ["--data", small_npz, "--test-fraction", "0.2", "--batch-size", "16", "--epochs",
            "1", "--n-flow", "2", "--filter-size", "8", "--warmup", "0", "--no-progress",
            "--threads", "1", "--device", "cpu", "--out", str(out)]
    assert train.main([*argv, "--max-steps", "2"]) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    stopped = ckpt["history"]["epochs"][-1]
    assert stopped["step"] == 2 and stopped["world_size"] == 1
    stopped["world_size"] = 2  # what torchrun --nproc_per_node 2 writes
    stopped["seconds"] = 1000.0  # far longer than a step: only the sum with it passes below
    torch.save(ckpt, out / "checkpoint.pt")
    assert train.main([*argv, "--resume"]) == 0
    entry = json.loads((out / "metrics.json").read_text())["history"]["epochs"][-1]
    assert entry["step"] == 4 and 1000 < entry["seconds"] < 1100
    assert abs(entry["images_per_s"] * entry["seconds"] - 4 * 16) < 1e-6
    assert entry["world_size"] == [1, 2]


def test_the_ddp_wrapper_copies_no_buffers_before_each_forward(tmp_path):
    """DDP's default copies every buffer from rank 0 before each forward; under torch 2.11
    that moves their version counters, so every ActNorm read its flag from the device at
    every step. The wrapper turns that copy off (a one-process gloo group here)."""
    import torch.distributed as dist

    from fastflow import Glow

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        d = _fake(2, 0)  # enabled: wraps (the group above is the one DDP uses)
        net = d.wrap(Glow(1, 2, 2, filter_size=8))
        assert isinstance(net, torch.nn.parallel.DistributedDataParallel)
        assert not net.will_sync_module_buffers()
        assert _fake(1, 0).wrap(net.module) is net.module  # one process: no wrapper
    finally:
        dist.destroy_process_group()
