"""posttrain.kernels imports nothing from the rest of posttrain (DESIGN.md import rules)."""

from __future__ import annotations

import ast
from pathlib import Path

import posttrain.kernels

KERNELS_DIR = Path(posttrain.kernels.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.startswith("posttrain.")
        ):
            names.add(node.value)  # modules imported by name (importlib)
    return names


def test_kernels_import_only_kernels_torch_and_triton() -> None:
    files = sorted(KERNELS_DIR.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        outside = {
            m
            for m in _imported_modules(path)
            if m.startswith("posttrain") and not m.startswith("posttrain.kernels")
        }
        assert not outside, f"{path.name} imports {sorted(outside)}"
