"""posttrain.sandboxes: isolated execution of untrusted code for code rewards and tools.

Installed from the repository's top-level ``sandboxes/`` folder as ``posttrain.sandboxes``.
Host set-up (root, Debian/Ubuntu): ``sandboxes/setup.sh`` installs bubblewrap and python3-seccomp.

Usage::

    from posttrain.sandboxes import Limits, Sandbox, SandboxConfig, Status

    with Sandbox(SandboxConfig(slots=2, limits=Limits(wall_s=5, memory_mb=256))) as sb:
        v = sb.run("def add(a, b):\\n    return a + b", tests=["assert add(1, 2) == 3"])
        assert v.status is Status.PASS and v.passed == v.total == 1
        v = sb.run("print(int(input()) * 2)", io_cases=[("21\\n", "42\\n")])
        # from async code (e.g. a reward node):  v = await sb.arun(code, tests=[...])

Verdicts: PASS / FAIL / TIMEOUT / OOM / NO_TESTS / SANDBOX_ERROR, decided by the trusted parent
(NO_TESTS: an empty test list, or no assertion ran; it scores 0).
SANDBOX_ERROR means the harness failed, not the program (a program cannot cause it): mask it (do
not score it) and count it (``Sandbox.counts``). Statement tests run in a process of their own and
reach the candidate only through a plain-data channel; the design, threat model and comparison
policy are in sandboxes/README.md. Isolation layers, per slot: its own unprivileged host uid (setpriv), leased per
host so two Sandboxes never share one, bwrap namespaces with a user namespace, read-only binds of the interpreter's own tree of /usr and a size-capped tmpfs workdir, no host
environment, a libseccomp filter, prlimit rlimits, a memory+pids+cpu-quota cgroup, read-only /dev, a hard wall-clock kill
and parent-enforced output caps. Start-up runs an escape canary and refuses to serve if a probe
gets through. Scoring rules against reward hacks: see ``posttrain.sandboxes.judge``.
"""

from .config import Layer, Limits, SandboxConfig
from .errors import (
    SandboxClosedError,
    SandboxConfigError,
    SandboxError,
    SandboxEscapeError,
    SandboxUnavailableError,
)
from .sandbox import Sandbox
from .verdict import Status, Verdict

__all__ = [
    "Layer",
    "Limits",
    "Sandbox",
    "SandboxClosedError",
    "SandboxConfig",
    "SandboxConfigError",
    "SandboxError",
    "SandboxEscapeError",
    "SandboxUnavailableError",
    "Status",
    "Verdict",
]
