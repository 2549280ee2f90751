"""``python -m fastflow``: the command table, usage and help texts, and the demo."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastflow import __main__ as cli
from fastflow.cli import demo


def test_cli_lists_commands_and_points_to_command_help(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "bench", "train", "train-vae"):
        assert name in out
    assert "python -m fastflow <command> --help" in out


def test_unknown_command_says_so_and_prints_usage(capsys):
    assert cli.main(["bogus"]) == 2
    captured = capsys.readouterr()
    assert "unknown command 'bogus'" in captured.err and "usage:" in captured.err


@pytest.mark.parametrize("command", ["train", "train-vae", "demo"])
def test_each_help_names_its_command_and_shows_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: python -m fastflow {command}" in out
    assert "(default:" in out
    if command == "demo":  # every option explains itself
        for text in ("training epochs", "optimizer steps", "results folder",
                     "skip the benchmark", "CPU threads"):
            assert text in out, text


def test_module_entry_point_runs_a_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastflow", "train", "--max-steps", "2",
                          "--epochs", "1", "--n-flow", "1", "--filter-size", "8",
                          "--out", str(tmp_path), "--no-progress", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "bits/dim" in out.stdout


def test_demo_writes_grids_before_and_after_and_improves(tmp_path, capsys):
    assert demo.main(["--skip-bench", "--out", str(tmp_path), "--epochs", "1",
                      "--max-steps", "25"]) == 0
    glow = tmp_path / "glow"
    for name in ("samples_before.png", "samples.png", "metrics.json"):
        assert (glow / name).stat().st_size > 0, name
    metrics = json.loads((glow / "metrics.json").read_text())
    history = metrics["history"]
    assert history["epochs"][-1]["test"]["bpd"] < history["initial"]["bpd"]
    assert 0.0 <= metrics["demo"]["score"]["recognised"] <= 1.0
    printed = capsys.readouterr().out
    assert "digit classifier recognises" in printed and "samples after" in printed


def test_demo_without_the_source_trees_benchmarks_skips_them_and_trains(tmp_path, capsys,
                                                                         monkeypatch):
    """From an installed wheel (no benchmarks/ folder) the demo said "bench: needs the source
    tree" and exited before its main part, the training: it now says the tables are skipped
    and trains."""
    from fastflow.cli import bench

    monkeypatch.setattr(bench, "run_py", lambda: tmp_path / "no-clone" / "run.py")
    assert demo.main(["--out", str(tmp_path), "--epochs", "1", "--max-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "benchmarks: skipped, they need the source tree's benchmarks/run.py" in printed
    assert (tmp_path / "glow" / "samples.png").stat().st_size > 0
    assert not (tmp_path / "bench").exists()


@pytest.mark.parametrize("module, parser, defaults", [
    ("train", "_glow_parser", {"epochs": 20, "lr": None, "out": "runs/glow", "force": False}),
    ("train_vae", "_vae_parser", {"epochs": 10, "lr": None, "out": "runs/vae", "force": False}),
    ("train_tarflow", "_parser", {"epochs": 6, "lr": None, "out": "runs/tarflow",
                                  "force": False}),
])
def test_training_commands_share_their_run_options_with_their_own_defaults(module, parser,
                                                                            defaults):
    import importlib

    p = getattr(importlib.import_module(f"fastflow.cli.{module}"), parser)()
    args = vars(p.parse_args([]))
    shared = {"batch_size": 64, "max_steps": None, "seed": 0, "device": "auto",
              "resume": False, "no_progress": False}
    assert {k: args[k] for k in {**shared, **defaults}} == {**shared, **defaults}
    assert ("force" in args) == ("force" in defaults)
    given = vars(p.parse_args(["--epochs", "3", "--batch-size", "8", "--lr", "0.5",
                               "--max-steps", "7", "--seed", "4", "--device", "cpu",
                               "--out", "x", "--resume", "--no-progress"]))
    assert (given["epochs"], given["batch_size"], given["lr"], given["max_steps"],
            given["seed"], given["device"], given["out"], given["resume"],
            given["no_progress"]) == (3, 8, 0.5, 7, 4, "cpu", "x", True, True)
    with pytest.raises(SystemExit):
        p.parse_args(["--epochs", "0"])


def test_out_with_a_tilde_goes_to_the_home_folder(tmp_path, monkeypatch):
    """--out=~/x (the shell leaves a ~ after '=' as it is) wrote the run into a folder
    named '~' under the current one, while the summary listed '~/x/...'."""
    from fastflow.cli import demo, train, train_tarflow, train_vae

    monkeypatch.setenv("HOME", str(tmp_path))
    want = str(tmp_path / "x")
    for parser in (train._glow_parser, train_vae._vae_parser, train_tarflow._parser):
        assert parser().parse_args(["--out=~/x"]).out == want
    seen = []
    monkeypatch.setattr(demo.train, "main", lambda argv: seen.append(argv) or 130)
    assert demo.main(["--out=~/x", "--skip-bench"]) == 130
    assert seen[0][seen[0].index("--out") + 1] == str(tmp_path / "x" / "glow")


@pytest.mark.parametrize("option", ["--lr", "--clip"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_float_options_are_refused_naming_the_option(option, value, capsys):
    from fastflow.cli import train

    # --lr inf or --clip nan used to train on silently and end at a nan bits/dim
    with pytest.raises(SystemExit) as exit_:
        train._glow_parser().parse_args([option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert option in err and f"expected a finite positive number, got {value}" in err


@pytest.mark.parametrize("option, value, message", [
    ("--temperature", "nan", "expected a finite positive number, got nan"),
    ("--temperature", "0", "expected a finite positive number, got 0"),
    ("--guidance", "nan", "expected a finite number, got nan"),
    ("--guidance", "inf", "expected a finite number, got inf"),
])
def test_train_tarflow_sampling_options_are_refused_naming_the_option(option, value, message,
                                                                      capsys):
    from fastflow.cli import train_tarflow

    # --temperature nan or --guidance inf trained on and then drew NaN samples silently
    with pytest.raises(SystemExit) as exit_:
        train_tarflow._parser().parse_args([option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert option in err and message in err


def test_demo_summary_of_a_diverged_run(tmp_path, capsys, monkeypatch):
    """metrics.json stores a NaN or infinite bits/dim as null; the demo's closing line then
    failed with "unsupported format string passed to NoneType" instead of saying so."""
    score = {"recognised": 0.0, "n": 200, "confidence": 0.8, "classes": 0}

    def diverged_run(argv):
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        history = {"initial": {"bpd": 4.2, "digits": {"1.0": score}},
                   "epochs": [{"test": {"bpd": None}, "digits": {"1.0": score}}]}
        (out / "metrics.json").write_text(json.dumps({"history": history}))
        return 0

    monkeypatch.setattr(demo.train, "main", diverged_run)
    assert demo.main(["--skip-bench", "--out", str(tmp_path)]) == 0
    assert "test bits/dim 4.200 -> not finite" in capsys.readouterr().out


def test_every_checkpoint_load_uses_weights_only():
    """DESIGN.md: checkpoints are loaded with ``weights_only=True``. Every ``torch.load``
    call of the package, the benchmarks and the scripts passes ``weights_only=True`` (a
    planted checkpoint cannot run code in any of them)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    files = [p for d in ("fastflow", "kernels", "benchmarks") for p in (root / d).rglob("*.py")]
    calls, unsafe = 0, []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"):
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant)
                        and kw["weights_only"].value is True):
                    unsafe.append(f"{path.relative_to(root)}:{node.lineno}")
    assert calls >= 1  # the checker finds the calls it checks
    assert unsafe == []


@pytest.mark.parametrize("command", ["bench", "demo"])
def test_bench_and_demo_refuse_torchrun(command, monkeypatch, tmp_path):
    """Under torchrun every process ran the tables at once (timings of processes competing
    for the machine, written to the same files); the demo's second rank then read the
    metrics rank 0 had not written yet (FileNotFoundError)."""
    from fastflow.cli import bench

    monkeypatch.setenv("WORLD_SIZE", "2")
    main = {"bench": bench.main, "demo": demo.main}[command]
    with pytest.raises(SystemExit, match=rf"^{command}: expected one process, got WORLD_SIZE 2 "
                                         r"\(torchrun\); .*run it without torchrun"):
        main(["--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["train", "demo"])
def test_a_command_without_the_app_extra_says_what_to_install(command, monkeypatch, capsys):
    """From `pip install .` (no [app] extra) train crashed on a ModuleNotFoundError of
    sklearn, and train-vae on its own data trained, then crashed writing the grid (PIL)."""
    import sys

    from fastflow import __main__ as entry

    monkeypatch.setitem(sys.modules, "PIL", None)  # an import of it raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert entry.main([command, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert f"python -m fastflow {command}: needs scikit-learn and Pillow, from the app extra: " \
           "pip install 'fastflow[app]'" in err
    with pytest.raises(SystemExit) as shown:  # the options still show (argparse exits 0)
        entry.main([command, "--help"])
    assert shown.value.code == 0 and "usage:" in capsys.readouterr().out
