"""Shared test fixtures: tiny recipes written to tmp dirs, CLI runner, environment hygiene."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def repo_root() -> str:
    return REPO


@pytest.fixture
def run_cli(capsys):
    """Run ``posttrain ...`` in-process; returns (exit_code, stdout, stderr)."""
    from posttrain.cli import main

    def _run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run


@pytest.fixture(autouse=True, scope="module")
def _no_ray_across_modules():
    """A test module that starts Ray (directly or through a reward node) must not hand its
    instance to the next module: shut down whatever is still running when a module ends."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
