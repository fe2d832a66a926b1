"""Imports point down: a module may import its own layer or a lower one, never a higher one.

The order (lowest first) is the one docs/design.md describes. Function-local imports count too: an
import hidden inside a function is still a dependency, and a cycle hidden that way is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "darkhorse"

# Top-level module or subpackage of darkhorse -> its layer (lower numbers sit lower).
LAYERS = {
    "errors": 0,
    "files": 0,
    "config": 0,
    "model": 1,
    "data": 2,
    "checkpoint": 3,
    "infer": 4,
    "eval": 4,
    "train": 5,
    "finetune": 6,
    "interop": 6,
    "serve": 6,
    "commands": 7,
    "cli": 8,
    "__main__": 8,
    "__init__": 0,  # only the version string
}


def top_level(module: str) -> str | None:
    """`darkhorse.train.trainer` -> `train`; None for imports from outside the package."""
    parts = module.split(".")
    if parts[0] != "darkhorse":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    return ".".join(["darkhorse", *path.relative_to(root).with_suffix("").parts])


def imported_modules(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`, wherever it stands."""
    own = module_name(path, root)
    package = own.rsplit(".", 1)[0] if path.name != "__init__.py" else own.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def source_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    unplaced = {top_level(module_name(p)) for p in source_files()}
    assert unplaced - set(LAYERS) == set(), "give new top-level modules a layer in LAYERS and docs/design.md"


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    here = top_level(module_name(path))
    upward = [
        f"{path.relative_to(PACKAGE)}:{line} imports {module} ({target}, layer {LAYERS[target]}) from {here} "
        f"(layer {LAYERS[here]})"
        for line, module in imported_modules(path)
        if (target := top_level(module)) is not None and target in LAYERS and LAYERS[target] > LAYERS[here]
    ]
    assert upward == []


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    module = tmp_path / "darkhorse" / "model" / "thing.py"
    module.parent.mkdir(parents=True)
    module.write_text("import torch\n\n\ndef f():\n    from ..train import trainer\n    import darkhorse.cli\n")
    found = [m for _, m in imported_modules(module, tmp_path / "darkhorse")]
    assert found == ["torch", "darkhorse.train", "darkhorse.cli"]
