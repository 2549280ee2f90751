"""README.md against the package: its Python snippets run, the options it names exist, and
its Layout section lists files that exist and every module of the package."""

import contextlib
import io
import re
import runpy
from pathlib import Path

import pytest
import torch

import fastflow as ff

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_the_use_snippets_run():
    blocks = _blocks(_section("Use"), "python")
    assert len(blocks) == 2, "README's Use section: expected the API block and the patch block"
    torch.manual_seed(0)
    # names the first block takes as given: a 3x64x64 image batch and a coupling net's output
    ns = {"x": torch.rand(1, 3, 64, 64) - 0.5, "h": 0.1 * torch.randn(1, 2, 64, 64),
          "mu": torch.randn(4, 8), "logvar": torch.randn(4, 8)}
    exec(compile(blocks[0], "README.md (Use)", "exec"), ns)
    assert ns["logdet_inv"].shape == (1,) and ns["kl"].shape == ()
    assert torch.isfinite(ns["loss"]).all()
    assert ns["x"].shape == (16, 3, 32, 32)  # flow.sample(16) of TarFlow(3, 32, ...)
    from test_patch import Chain, Flow  # a rosinality-style model
    ns = {"ff": ff, "model": Chain(Flow(4), Flow(4))}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[1], "README.md (patch)", "exec"), ns)
    assert "swapped" in out.getvalue() and "left alone" in out.getvalue()


def _help_of(main, argv) -> str:
    """What ``main(argv)`` prints for ``--help``, run in this process (a subprocess per
    command cost a torch import each; tests/test_cli.py runs the real entry point)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code in (0, None), (argv, stop.value.code)
    return out.getvalue()


def _helps() -> str:
    from fastflow.__main__ import main

    texts = [_help_of(main, [command, "--help"])
             for command in ("demo", "train", "train-vae", "train-tarflow", "bench")]
    for script in ("benchmarks/traffic.py", "benchmarks/suite_reversible.py"):
        names = runpy.run_path(str(ROOT / script), run_name=f"readme_{Path(script).stem}")
        texts.append(_help_of(names["main"], ["--help"]))
    assert all(t.startswith("usage:") for t in texts), [t[:80] for t in texts]
    return "\n".join(texts)


def test_every_option_the_readme_names_exists():
    helps = _helps()
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", README))
    named -= {"--nproc_per_node", "--benchmark-only"}  # torchrun's and pytest-benchmark's
    missing = sorted(o for o in named if o not in helps)
    assert not missing, f"README names options no command has: {missing}"


def _layout_paths() -> list[str]:
    (block,) = _blocks(_section("Layout"), "")
    paths = []
    for line in block.splitlines():
        if not line or line.startswith(" "):
            continue
        head = line.split("  ")[0]  # the path column, before the description
        folder = ""
        for item in head.split(","):
            item = item.strip()
            if "/" in item:
                folder = item if item.endswith("/") else item.rsplit("/", 1)[0] + "/"
                paths.append(item)
            else:
                paths.append(folder + item)
    return paths


def test_the_layout_lists_existing_files_and_every_module():
    paths = _layout_paths()
    assert "fastflow/reference.py" in paths and "fastflow/vae.py" in paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"README's Layout lists what is not there: {missing}"
    # every module and subpackage of fastflow/ (the kernels link aside) is listed
    mine = [p for p in (ROOT / "fastflow").iterdir()
            if p.name not in ("__init__.py", "__main__.py", "kernels", "__pycache__")
            and (p.suffix == ".py" or (p / "__init__.py").exists())]
    listed = {p.rstrip("/") for p in paths}
    unlisted = sorted(p.name for p in mine
                      if str(p.relative_to(ROOT)) not in listed)
    assert not unlisted, f"README's Layout leaves out fastflow/{unlisted}"
