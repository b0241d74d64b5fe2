"""Shared fixtures: one warm Sandbox for the whole test folder (its start-up runs the canary)."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator

import pytest
from posttrain.sandboxes import Limits, Sandbox, SandboxConfig

SECRET_ENV = "POSTTRAIN_SANDBOX_TEST_SECRET"
SECRET = secrets.token_hex(16)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "posttrain.sandboxes needs root (it drops every slot to its own uid)"
    missing = [t for t in ("bwrap", "prlimit", "setpriv") if shutil.which(t) is None]
    if missing:
        return f"{missing} not installed: run sandboxes/setup.sh"
    return None


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    """A 2-slot sandbox, started with a secret in the host environment it must not leak."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    os.environ[SECRET_ENV] = SECRET
    sb = Sandbox(SandboxConfig(slots=2, limits=Limits(wall_s=10, memory_mb=256)))  # a leased uid range
    try:
        yield sb
    finally:
        sb.close()
        os.environ.pop(SECRET_ENV, None)


@pytest.fixture
def short() -> Limits:
    """Limits for runs that are expected to hit the wall clock."""
    return Limits(wall_s=1.5, cpu_s=5, memory_mb=256)
