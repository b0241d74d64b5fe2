"""The package list in pyproject matches the tree, and the import rules of DESIGN.md hold."""

from __future__ import annotations

import ast
import os

import pytest
import tomllib

MAPPED = {"posttrain.rollout": "rollout", "posttrain.rewards": "rewards", "posttrain.sandboxes": "sandboxes"}


def _packages_on_disk(root: str) -> set[str]:
    found = set()
    for top, pkg in [("posttrain", "posttrain")] + [(d, p) for p, d in MAPPED.items()]:
        for dirpath, _, files in os.walk(os.path.join(root, top)):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                rel = os.path.relpath(dirpath, os.path.join(root, top))
                found.add(pkg if rel == "." else f"{pkg}.{rel.replace(os.sep, '.')}")
    return found


def test_pyproject_lists_every_package(repo_root):
    with open(os.path.join(repo_root, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    assert _packages_on_disk(repo_root) <= listed, "add the new package to [tool.setuptools] packages"


def _imports(folder: str) -> list[tuple[str, str]]:
    out = []
    for dirpath, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                for node in ast.walk(ast.parse(open(path).read())):
                    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                        out.append((path, node.module))
                    elif isinstance(node, ast.Import):
                        out.extend((path, a.name) for a in node.names)
    return out


@pytest.mark.parametrize(
    "folder,forbidden",
    [
        ("posttrain/engine", ["ray", "posttrain.rollout", "posttrain.rewards", "vllm"]),
        ("posttrain/kernels", ["posttrain.engine", "posttrain.rollout", "posttrain.rewards", "posttrain.offline", "posttrain.config"]),
        ("rewards", ["posttrain.rollout", "posttrain.engine", "posttrain.offline", "posttrain.rl"]),
        ("rollout", ["posttrain.rewards", "posttrain.engine", "posttrain.offline", "posttrain.rl"]),
    ],
)
def test_import_rules(repo_root, folder, forbidden):
    bad = [(p, m) for p, m in _imports(os.path.join(repo_root, folder)) if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not bad, f"import rule broken: {bad}"


def test_generic_folders_are_not_top_level_packages(tmp_path):
    import subprocess
    import sys

    code = "import importlib.util as u; print([n for n in ('rollout', 'rewards', 'sandboxes') if u.find_spec(n)]," \
        " [n for n in ('posttrain.rollout', 'posttrain.rewards', 'posttrain.sandboxes') if u.find_spec(n)])"
    # the installation alone decides (an in-process `posttrain` call may have put a checkout on PYTHONPATH)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "[] ['posttrain.rollout', 'posttrain.rewards', 'posttrain.sandboxes']"
