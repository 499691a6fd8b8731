"""No arrow runs up a floor (docs/architecture.md): every import of our own packages, read with
`ast` from the source (function-level and `importlib.import_module("...")` calls included), goes
to the same floor or a lower one; and data_pipeline/load never imports data_pipeline/build."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Higher number = higher floor; equal numbers may not import each other (finetune and discovery).
FLOORS = {"crystalfm_common": 0, "data_pipeline": 1, "pretrain": 2, "finetune": 3, "discovery": 3, "crystalfm": 4}


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, module) of every import in a file: `import a.b`, `from a.b import c` (as a.b and
    a.b.c), relative imports resolved, and `importlib.import_module("a.b")` with a literal name."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_every_package_has_a_floor():
    ours = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert ours == set(FLOORS), f"give each top-level package a floor in FLOORS and docs/architecture.md: {ours ^ set(FLOORS)}"


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_no_package_imports_a_higher_or_sibling_floor(package):
    wrong = []
    for path in _sources(package):
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            if top in FLOORS and top != package and FLOORS[top] >= FLOORS[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "imports that run up (or across) a floor:\n" + "\n".join(wrong)


def test_load_wing_imports_nothing_from_the_build_wing():
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {module}"
             for path in _sources("data_pipeline/load") for line, module in imported_modules(path)
             if module == "data_pipeline.build" or module.startswith("data_pipeline.build.")]
    assert not wrong, "data_pipeline/load must not import data_pipeline/build:\n" + "\n".join(wrong)


def test_the_floor_under_data_pipeline_imports_neither_wing():
    floor = [ROOT / "data_pipeline" / name for name in ("record.py", "shard_format.py", "manifest.py")]
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in floor for line, module in imported_modules(path)
             if module.startswith(("data_pipeline.build", "data_pipeline.load"))]
    assert not wrong, "\n".join(wrong)


def test_objectives_never_import_release():
    wrong = [f"{path.relative_to(ROOT)}:{line}" for path in _sources("pretrain/objectives")
             for line, module in imported_modules(path) if module.startswith("pretrain.release")]
    assert not wrong, "objectives get init_from's release from the caller (pretrain.release.build_with_init): " + ", ".join(wrong)


def test_the_checker_sees_function_level_and_importlib_imports(tmp_path):
    """The checker itself can fail: hidden upward imports in a function body are found."""
    package = tmp_path / "data_pipeline"
    package.mkdir()
    (package / "x.py").write_text("def f():\n    import importlib\n    from pretrain import trainer\n"
                                  "    from .build import stages\n    return importlib.import_module('finetune.run')\n")
    modules = {m for _, m in imported_modules(package / "x.py", tmp_path)}
    assert {"pretrain", "pretrain.trainer", "finetune.run", "data_pipeline.build.stages"} <= modules
