"""Typed configuration of the sandbox: per-run limits, pool size and isolation layers."""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields

from .errors import SandboxConfigError


class Layer(str, enum.Enum):
    """Isolation layers. REQUIRED ones can never be weakened; the others may be with allow_weaker."""

    UID = "uid"  # setpriv --reuid: one unprivileged host uid per slot (RLIMIT_NPROC is void for uid 0)
    USERNS = "userns"  # bwrap --unshare-user --disable-userns (root bwrap without it can remount /usr rw)
    NAMESPACES = "namespaces"  # bwrap mount/pid/ipc/uts/cgroup ns, ro interpreter tree of /usr, tmpfs workdir
    RLIMITS = "rlimits"  # prlimit: address space, cpu, nproc, fsize, nofile
    NETNS = "netns"  # bwrap --unshare-net (no host network)
    SECCOMP = "seccomp"  # libseccomp filter: no non-unix sockets, ptrace, mount, unshare, bpf, ...
    CGROUP = "cgroup"  # per-slot cgroup: memory and pids limits, kill-all at the end of a run


REQUIRED_LAYERS: frozenset[Layer] = frozenset({Layer.UID, Layer.USERNS, Layer.NAMESPACES, Layer.RLIMITS})


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run (all processes of the run together unless stated).

    wall_s: hard wall clock, then the whole process group and cgroup are killed (-> TIMEOUT).
    cpu_s: RLIMIT_CPU per process (-> TIMEOUT). memory_mb: cgroup memory limit (its OOM kill -> OOM)
    and, at twice the value, RLIMIT_AS per process (a backstop: the program's own MemoryError). nproc: RLIMIT_NPROC of the slot uid and the cgroup pids limit.
    file_size_mb: RLIMIT_FSIZE and the cap on everything the run can write: the tmpfs /tmp gets
    3/4 of it and the tmpfs /dev/shm 1/4 (the rest of /dev is read-only). open_files: RLIMIT_NOFILE.
    output_bytes: cap on captured stdout and stderr, each, enforced by the runner and the parent.
    cpu_cores: CPU bandwidth quota of the slot's cgroup (cpu controller), in cores: a program
    forking busy loops gets at most this much CPU, whatever its process count.
    """

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 512
    nproc: int = 32
    file_size_mb: int = 16
    open_files: int = 64
    output_bytes: int = 64 * 1024
    cpu_cores: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise SandboxConfigError(
                    f"Limits.{f.name}={value!r} is invalid: it must be a positive number "
                    f"(the default is {f.default!r})"
                )
        if self.file_size_mb < 4:
            raise SandboxConfigError(
                f"Limits.file_size_mb={self.file_size_mb} is too small to split between /tmp and /dev/shm: "
                "use at least 4"
            )
        if self.memory_mb < 64:
            raise SandboxConfigError(
                f"Limits.memory_mb={self.memory_mb} is too small for python3 to start: use at least 64"
            )


@dataclass(frozen=True)
class SandboxConfig:
    """Configuration of a `Sandbox` pool.

    slots: number of warm slots (concurrent runs); each owns host uid `uid_base + i` and a cgroup
    named after that uid.
    uid_base: None (the default) leases a free range of `slots` uids on this host (from 61000 up),
    so two Sandboxes (two reward actors, two test runs) never share a uid or a cgroup. An int asks
    for exactly that range; start-up fails with SandboxUnavailableError when another Sandbox on
    this host holds any of it, or a process already runs as one of its uids.
    allow_weaker: serve even when an optional layer (netns, seccomp, cgroup) is unavailable or
    disabled; the missing layers are reported in `Sandbox.missing_layers` and logged. Required
    layers (uid, userns, namespaces, rlimits) can never be weakened.
    disabled_layers: optional layers to switch off on purpose (diagnostics, tests of the canary).
    python: interpreter run inside the sandbox; it must live under /usr (only its own tree of /usr is
    bound: executable, standard library, linked shared libraries).
    """

    limits: Limits = Limits()
    slots: int = 2
    allow_weaker: bool = False
    disabled_layers: frozenset[Layer] = frozenset()
    uid_base: int | None = None
    python: str = "/usr/bin/python3"
    cgroup_name: str = "posttrain-sandbox"
    canary: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.limits, Limits):
            raise SandboxConfigError(
                f"SandboxConfig.limits must be a Limits, got {type(self.limits).__name__}"
            )
        if not isinstance(self.slots, int) or not 1 <= self.slots <= 256:
            raise SandboxConfigError(f"SandboxConfig.slots={self.slots!r} is invalid: use an int in 1..256")
        if self.uid_base is not None and (not isinstance(self.uid_base, int) or self.uid_base < 1000):
            raise SandboxConfigError(
                f"SandboxConfig.uid_base={self.uid_base!r} is invalid: use an unused uid >= 1000 "
                "(slot i runs as uid_base + i)"
            )
        if not self.python.startswith("/usr/"):
            raise SandboxConfigError(
                f"SandboxConfig.python={self.python!r} is outside /usr, the only host tree bound into the "
                "sandbox: use Debian's /usr/bin/python3"
            )
        try:
            layers = frozenset(Layer(x) for x in self.disabled_layers)
        except ValueError as exc:
            raise SandboxConfigError(
                f"SandboxConfig.disabled_layers: {exc}; valid layers are {[x.value for x in Layer]}"
            ) from None
        required = layers & REQUIRED_LAYERS
        if required:
            raise SandboxConfigError(
                f"SandboxConfig.disabled_layers contains required layer(s) {sorted(x.value for x in required)}: "
                "untrusted code must never run as host root or without a user namespace; remove them"
            )
        object.__setattr__(self, "disabled_layers", layers)
