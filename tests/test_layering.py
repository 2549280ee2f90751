"""DESIGN.md's "Layers of the house": every module lives on one of the listed floors, and
each imports only fastflow modules of its own floor or the floors below it, checked from
the source (every ``import`` statement, those inside functions included)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (module-name prefix, floor), most specific first
FLOORS = [
    ("fastflow.cli", 5), ("fastflow.__main__", 5), ("fastflow.data", 5),
    ("fastflow.glow", 4), ("fastflow.vae", 4), ("fastflow.tarflow", 4), ("fastflow.patch", 4),
    ("fastflow.layers", 3),
    ("fastflow.ops", 2), ("fastflow.functional", 2), ("fastflow.backend", 2),
    ("fastflow.reference", 1),
    ("fastflow.kernels", 0),
]


def floor_of(module: str):
    for prefix, floor in FLOORS:
        if module == prefix or module.startswith(prefix + "."):
            return floor
    return None


def source_modules():
    """(module name, path) of every module of the package (kernels/ as fastflow.kernels)."""
    out = []
    for path in sorted((ROOT / "fastflow").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        if "kernels" in rel.parts:  # fastflow/kernels is a link to kernels/, read below
            continue
        out.append((".".join(rel.parts), path))
    for path in sorted((ROOT / "kernels").glob("*.py")):
        out.append(("fastflow.kernels." + path.stem, path))
    return [(m[: -len(".__init__")] if m.endswith(".__init__") else m, p) for m, p in out]


def imported_fastflow_modules(module: str, path: Path):
    """The fastflow modules ``module`` imports (``from X import name`` counts X.name when
    that is a module, else X)."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    known = {m for m, _ in source_modules()}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "fastflow"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fastflow":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return found


MODULES = source_modules()


def test_every_module_is_on_a_floor():
    """The table places every module (the package's ``__init__`` is the front door, no
    floor); a module outside it has no floor to be checked against."""
    placed = {m: floor_of(m) for m, _ in MODULES if m != "fastflow"}
    assert [m for m, f in placed.items() if f is None] == []


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_only_its_floor_or_below(module, path):
    floor = floor_of(module)
    if floor is None:
        pytest.skip("not on a floor (test_every_module_is_on_a_floor)")
    above = {m: floor_of(m) for m in imported_fastflow_modules(module, path)
             if floor_of(m) is None or floor_of(m) > floor}
    assert above == {}, f"{module} (floor {floor}) imports from above it: {above}"


def test_the_checker_sees_relative_and_function_level_imports(tmp_path):
    """The import reader is not vacuous: it resolves relative imports and finds those
    inside functions."""
    p = tmp_path / "mod.py"
    p.write_text("from .. import reference\n"
                 "def f():\n    from ..glow import Glow\n    import fastflow.cli.train\n")
    assert imported_fastflow_modules("fastflow.ops.mod", p) == {
        "fastflow.reference", "fastflow.glow", "fastflow.cli.train"}
