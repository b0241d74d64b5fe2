"""Per-slot cgroups (v1 memory+pids hierarchies, or a v2 unified one): limits, OOM count, kill-all."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import SandboxUnavailableError

_ROOT = Path("/sys/fs/cgroup")


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _oom_kills(events_file: Path) -> int:
    """The `oom_kill` counter of memory.oom_control (v1) or memory.events (v2); 0 if absent."""
    try:
        for line in events_file.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except OSError:
        pass
    return 0


@dataclass
class SlotCgroup:
    """One slot's cgroup. `procs_files` are the cgroup.procs a new process must be written to."""

    dirs: tuple[Path, ...]
    procs_files: tuple[Path, ...]
    events_file: Path
    memory_files: tuple[Path, ...]  # written in order with the memory limit in bytes
    pids_file: Path

    def set_limits(self, memory_bytes: int, pids_max: int) -> None:
        """(Re)write the memory and pids limits."""
        for f in self.memory_files:
            try:
                _write(f, str(memory_bytes))
            except OSError:
                if f.name == self.memory_files[0].name:
                    raise
        _write(self.pids_file, str(pids_max))

    def oom_kills(self) -> int:
        """Number of processes the OOM killer has killed in this cgroup so far."""
        return _oom_kills(self.events_file)

    def pids(self) -> set[int]:
        """Pids currently in the cgroup."""
        found: set[int] = set()
        for procs in self.procs_files:
            try:
                found.update(int(x) for x in procs.read_text().split())
            except OSError:
                pass
        return found

    def kill_all(self, timeout_s: float = 5.0) -> bool:
        """SIGKILL every process in the cgroup until it is empty; True when it emptied in time."""
        deadline = time.monotonic() + timeout_s
        while True:
            pids = self.pids()
            if not pids:
                return True
            if time.monotonic() > deadline:
                return False
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.002)

    def remove(self) -> None:
        """Kill what is left and remove the cgroup directories (best effort)."""
        self.kill_all()
        for d in self.dirs:
            try:
                d.rmdir()
            except OSError:
                pass


def create_slot_cgroup(group: str, slot: str, memory_bytes: int, pids_max: int) -> SlotCgroup:
    """Create (or reuse) the slot's cgroup with memory and pids limits; v2 if mounted there, else v1.

    Raises SandboxUnavailableError naming what is missing when neither works.
    """
    try:
        if (_ROOT / "cgroup.controllers").is_file():
            return _create_v2(group, slot, memory_bytes, pids_max)
        if (_ROOT / "memory" / "cgroup.procs").is_file() and (_ROOT / "pids" / "cgroup.procs").is_file():
            return _create_v1(group, slot, memory_bytes, pids_max)
    except OSError as exc:
        raise SandboxUnavailableError(
            f"cgroup layer: cannot set up {group}/{slot}: {exc}; run as root with cgroup memory and pids "
            "controllers mounted, or pass allow_weaker=True to run without the cgroup layer"
        ) from None
    raise SandboxUnavailableError(
        "cgroup layer: neither a cgroup v2 hierarchy nor v1 memory+pids hierarchies are mounted under "
        "/sys/fs/cgroup; mount them, or pass allow_weaker=True to run without the cgroup layer"
    )


def _create_v1(group: str, slot: str, memory_bytes: int, pids_max: int) -> SlotCgroup:
    mem = _ROOT / "memory" / group / slot
    pids = _ROOT / "pids" / group / slot
    mem.mkdir(parents=True, exist_ok=True)
    pids.mkdir(parents=True, exist_ok=True)
    memsw = mem / "memory.memsw.limit_in_bytes"  # swap accounting, where enabled: no swap escape
    cg = SlotCgroup(
        dirs=(mem, pids, mem.parent, pids.parent),
        procs_files=(mem / "cgroup.procs", pids / "cgroup.procs"),
        events_file=mem / "memory.oom_control",
        memory_files=(mem / "memory.limit_in_bytes", memsw, mem / "memory.limit_in_bytes")
        if memsw.exists()
        else (mem / "memory.limit_in_bytes",),
        pids_file=pids / "pids.max",
    )
    cg.set_limits(memory_bytes, pids_max)
    return cg


def _create_v2(group: str, slot: str, memory_bytes: int, pids_max: int) -> SlotCgroup:
    parent = _ROOT / group
    parent.mkdir(exist_ok=True)
    missing = {"memory", "pids"} - set((_ROOT / "cgroup.controllers").read_text().split())
    if missing:
        raise OSError(f"cgroup v2 controllers {sorted(missing)} are not available")
    _write(_ROOT / "cgroup.subtree_control", "+memory +pids")
    _write(parent / "cgroup.subtree_control", "+memory +pids")
    path = parent / slot
    path.mkdir(exist_ok=True)
    try:
        _write(path / "memory.swap.max", "0")
    except OSError:
        pass
    cg = SlotCgroup(
        dirs=(path, parent),
        procs_files=(path / "cgroup.procs",),
        events_file=path / "memory.events",
        memory_files=(path / "memory.max",),
        pids_file=path / "pids.max",
    )
    cg.set_limits(memory_bytes, pids_max)
    return cg
