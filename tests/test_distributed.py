"""``torchrun -m fastflow train`` on CPU: two gloo processes against one process with the same
global batch, ActNorm's initialisation on every rank, rank-0-only writes, and resuming with
another number of processes."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from fastflow.cli import train

WORKER = r'''
import json, os, sys
import torch
import torch.nn.parallel as parallel
from fastflow.cli import common, train

report_path, argv = sys.argv[1], sys.argv[2:]
report = {"writes": [], "actnorm_max_diff": None}


class CheckedDDP(parallel.DistributedDataParallel):
    """Records how far the ranks' ActNorm parameters are apart before DDP broadcasts."""

    def __init__(self, module, *args, **kwargs):
        import torch.distributed as dist
        values = torch.cat([t.detach().flatten() for n, t in module.named_parameters()
                            if "actnorm" in n])
        gathered = [torch.empty_like(values) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, values)
        report["actnorm_max_diff"] = max(float((g - gathered[0]).abs().max()) for g in gathered)
        report["actnorm_loc_abs"] = sum(float(t.abs().sum()) for n, t in
                                        module.named_parameters() if n.endswith("actnorm.loc"))
        super().__init__(module, *args, **kwargs)


parallel.DistributedDataParallel = CheckedDDP


def spy(name, fn):
    def wrapped(*args, **kwargs):
        report["writes"].append(name)
        return fn(*args, **kwargs)
    return wrapped


torch.save = spy("torch.save", torch.save)
for name in ("save_image_grid", "save_checkpoint"):
    setattr(train, name, spy(name, getattr(train, name)))
for name in ("write_json", "write_csv"):  # metrics.json and .csv (common.write_metrics)
    setattr(common, name, spy(name, getattr(common, name)))
status = train.main(argv)
with open(report_path, "w") as f:
    json.dump(report, f)
sys.exit(status)
'''


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(out, data, *extra):
    return ["--data", data, "--test-fraction", "0.2", "--batch-size", "16", "--epochs", "1",
            "--n-flow", "2", "--filter-size", "8", "--warmup", "0", "--lr", "2e-3",
            "--no-progress", "--threads", "1", "--device", "cpu", "--out", str(out), *extra]


def _launch(tmp_path, argv, world=2):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script),
                                       str(tmp_path / f"report{rank}.json"), *argv],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    return [json.loads((tmp_path / f"report{r}.json").read_text()) for r in range(world)], outputs


def _params(path):
    return torch.load(path / "checkpoint.pt", weights_only=True)["model"]


def _assert_same_run(one, two):
    """The two-process run in ``two`` ended with the one-process run's parameters (float32
    tolerance) after the same 4 steps, and its train bits/dim."""
    a, b = _params(one), _params(two)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], msg=name)  # float32 tolerance
    m1 = json.loads((one / "metrics.json").read_text())["history"]["epochs"][-1]
    m2 = json.loads((two / "metrics.json").read_text())["history"]["epochs"][-1]
    assert m1["step"] == m2["step"] == 4 and m2["world_size"] == 2
    assert abs(m1["train"]["bpd"] - m2["train"]["bpd"]) < 1e-4


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_two_gloo_processes_match_one_process(tmp_path, small_npz):
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main(_argv(one, small_npz)) == 0
    reports, outputs = _launch(tmp_path, _argv(two, small_npz))
    assert "x 2 processes" in outputs[0]
    # ActNorm initialised identically on both ranks (before DDP's broadcast), and not trivially
    assert reports[0]["actnorm_max_diff"] == 0.0 and reports[0]["actnorm_loc_abs"] > 0
    # rank 0 alone writes
    assert reports[1]["writes"] == []
    assert {"save_checkpoint", "write_json", "write_csv", "save_image_grid"} <= \
        set(reports[0]["writes"])
    _assert_same_run(one, two)
    # resuming the two-process run with one process goes on like the one-process run
    for out in (one, two):
        assert train.main(_argv(out, small_npz, "--epochs", "2", "--resume")) == 0
    a, b = _params(one), _params(two)
    for name in a:
        torch.testing.assert_close(b[name], a[name], msg=name)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_two_gloo_processes_match_one_process_reversible(tmp_path, small_npz):
    """--reversible under DDP: the chain's parameters get their gradients from its autograd
    node (DDP's reducer marks each ready once, else it raises), the blocks' W from one
    stacked assembly (--n-flow 4); the same parameters as one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("--reversible", "--n-flow", "4")
    assert train.main(_argv(one, small_npz, *extra)) == 0
    _launch(tmp_path, _argv(two, small_npz, *extra))
    _assert_same_run(one, two)


SPREAD = r'''
import os
from fastflow.cli.loop import Distributed
d = Distributed("cpu")
print("spread", *d.spread(5 * int(os.environ["RANK"]) + 3))
d.close()
'''


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_spread_is_the_min_and_max_over_the_processes(tmp_path):
    script = tmp_path / "spread.py"
    script.write_text(SPREAD)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r),
                                       WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port), OMP_NUM_THREADS="1"))
             for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-2000:]
        assert "spread 3 8" in out, out[-2000:]


def test_resume_from_different_steps_on_different_processes_is_refused(tmp_path, small_npz,
                                                                       monkeypatch):
    """Across nodes without a shared disk, a rank that finds no OUT/checkpoint.pt starts at
    step 0 while rank 0 resumes: their optimizer states and step counts part (the run then
    hangs at the end or trains on with two optimizers); refused at start-up instead."""
    from fastflow.cli.loop import Distributed

    monkeypatch.setattr(Distributed, "spread", lambda self, value: (0, 4))
    with pytest.raises(SystemExit, match=r"--resume: the processes start from different "
                                         r"steps \(0 to 4\): each reads OUT/checkpoint\.pt"):
        train.main(_argv(tmp_path / "run", small_npz))
