"""Start-up escape canary: a program that tries what the layers must block, judged by the parent."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass

from .config import Layer

_ALLOWED_ENV = {"PATH", "HOME", "PWD", "LC_CTYPE"}  # set by the harness / python itself


@dataclass(frozen=True)
class Probe:
    """A probe `name` that must not get through while any of `layers` is active."""

    name: str
    layers: frozenset[Layer]


PROBES: tuple[Probe, ...] = (
    Probe("write_usr", frozenset({Layer.NAMESPACES})),
    Probe("host_paths_visible", frozenset({Layer.NAMESPACES})),
    Probe("env_leak", frozenset({Layer.NAMESPACES})),
    Probe("host_root_uid", frozenset({Layer.UID, Layer.USERNS})),
    Probe("nproc_unlimited", frozenset({Layer.RLIMITS})),
    Probe("inet_socket", frozenset({Layer.SECCOMP})),
    Probe("connect_host", frozenset({Layer.SECCOMP, Layer.NETNS})),
    Probe("ptrace", frozenset({Layer.SECCOMP})),
    Probe("nested_userns", frozenset({Layer.SECCOMP, Layer.USERNS})),
    Probe("mount", frozenset({Layer.SECCOMP, Layer.USERNS})),
)

_PROGRAM = """
import ctypes, json, os, resource, socket
libc = ctypes.CDLL(None, use_errno=True)
got = {}
def attempt(name, fn):
    try:
        got[name] = bool(fn())
    except Exception:
        got[name] = False
def write_usr():
    with open("/usr/.posttrain_canary", "w") as f:
        f.write("x")
    return True
attempt("write_usr", write_usr)
attempt("host_paths_visible", lambda: any(os.path.exists(p) for p in HOST_PATHS))
attempt("env_leak", lambda: bool(set(os.environ) - ALLOWED_ENV))
attempt("host_root_uid", lambda: os.getuid() == 0 or os.geteuid() == 0)
attempt("nproc_unlimited", lambda: resource.getrlimit(resource.RLIMIT_NPROC)[0] in (resource.RLIM_INFINITY, -1))
attempt("inet_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close() or True)
def connect_host():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(1.0)
    s.connect(("127.0.0.1", PORT))
    return True
attempt("connect_host", connect_host)
attempt("ptrace", lambda: libc.ptrace(0, 0, 0, 0) == 0)  # PTRACE_TRACEME
attempt("nested_userns", lambda: libc.unshare(0x10000000) == 0)  # CLONE_NEWUSER
attempt("mount", lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) == 0
        or libc.mount(None, b"/usr", None, 32 | 4096, None) == 0)  # MS_REMOUNT | MS_BIND
print(json.dumps(got))
"""


def canary_program(host_paths: list[str], port: int) -> str:
    """The canary's source with the host facts it checks against filled in."""
    header = f"HOST_PATHS = {host_paths!r}\nALLOWED_ENV = {sorted(_ALLOWED_ENV)!r}\nPORT = {port}\n"
    return header + _PROGRAM


def start_listener() -> socket.socket:
    """A host TCP listener on 127.0.0.1 for the connect probe (caller closes it)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    return listener


def judge_canary(stdout: str, active: frozenset[Layer]) -> tuple[list[str], list[str]]:
    """(escapes, weaknesses): probes that got through although one of their layers is active, and
    probes that got through only because all their layers are missing. Unparseable output is an escape."""
    try:
        got = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return [f"canary produced no report (stdout {stdout[:200]!r})"], []
    escapes, weak = [], []
    for probe in PROBES:
        if got.get(probe.name) is not False:
            layers = sorted(x.value for x in probe.layers)
            if probe.layers & active:
                escapes.append(f"{probe.name} got through (should be blocked by {'/'.join(layers)})")
            else:
                weak.append(f"{probe.name} is not blocked (layers {'/'.join(layers)} missing)")
    return escapes, weak
