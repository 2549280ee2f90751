"""The built wheel holds every module of the source tree and runs a command from outside it.

The wheel is built from a copy of the packaging inputs (no build/ or egg-info left in the
checkout) with ``pip wheel --no-deps --no-build-isolation`` (setuptools from the venv, no
network), unzipped into a temporary folder and run with PYTHONPATH pointing there and the
working directory elsewhere, so neither the checkout nor an editable install can hide a
missing file. The expected module list is read from the source tree, so a new module or
subpackage is covered without editing this test."""

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the wheel path of every source folder: fastflow.kernels is the top-level kernels/ folder
SOURCES = {"fastflow": "fastflow", "kernels": "fastflow/kernels"}
BUILD_INPUTS = ["pyproject.toml", "setup.py", "README.md", "fastflow", "kernels"]


def _source_modules() -> set[str]:
    out = set()
    for folder, target in SOURCES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder)
            if "__pycache__" in rel.parts:
                continue
            out.add(f"{target}/{rel.as_posix()}")
    return out


def _builds_wheels(setuptools_version: str) -> bool:
    """Whether this venv's setuptools builds wheels with --no-build-isolation: itself from
    70.1 on, older ones through the separate ``wheel`` package (a fresh Python 3.11 venv
    has setuptools 65 and no wheel: "invalid command 'bdist_wheel'")."""
    major_minor = tuple(int(p) for p in setuptools_version.split(".")[:2] if p.isdigit())
    if major_minor >= (70, 1):
        return True
    return importlib.util.find_spec("wheel") is not None


def test_builds_wheels_reads_the_setuptools_version():
    assert _builds_wheels("84.2.1") and _builds_wheels("70.1.0")
    assert _builds_wheels("65.5.0") == (importlib.util.find_spec("wheel") is not None)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    setuptools = pytest.importorskip("setuptools")
    if not _builds_wheels(setuptools.__version__):
        pytest.skip(f"setuptools {setuptools.__version__} without the wheel package cannot "
                    "build a wheel offline (setuptools >= 70.1 can, or any with wheel)")
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in BUILD_INPUTS:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=ignore)
        elif p.exists():
            shutil.copy2(p, src / name)
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "--no-index", str(src), "-w", str(dist)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = dist.glob("fastflow-*.whl")
    return whl


def test_wheel_holds_every_module_of_the_source_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _source_modules()
    assert "fastflow/kernels/__init__.py" in expected and "fastflow/cli/__init__.py" in expected
    missing = sorted(expected - names)
    assert not missing, f"modules missing from {wheel.name}: {missing}"


def test_wheel_runs_a_command_outside_the_source_tree(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    code = ("import fastflow, fastflow.kernels, fastflow.cli, sys; "
            "print(fastflow.__file__); print(fastflow.kernels.__file__); "
            "print(sorted(fastflow.kernels.FAMILIES) if hasattr(fastflow.kernels, 'FAMILIES') else '')")
    r = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    for line in r.stdout.splitlines()[:2]:
        assert line.startswith(str(site)), (line, r.stdout)  # not the checkout, not -e
    r = subprocess.run([sys.executable, "-m", "fastflow", "--help"], cwd=elsewhere, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    for command in ("demo", "bench", "train", "train-vae"):
        assert command in r.stdout
