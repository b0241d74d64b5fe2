"""Per-slot cgroups (v1 memory+pids+cpu hierarchies, or a v2 unified one): limits, OOM count, kill-all."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import SandboxUnavailableError

_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000


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
    cpu_file: Path  # v1 cpu.cfs_quota_us (period written at creation) or v2 cpu.max
    cpu_stat_file: Path

    def set_limits(self, memory_bytes: int, pids_max: int, cpu_cores: float) -> None:
        """(Re)write the memory, pids and CPU-bandwidth limits."""
        for f in self.memory_files:
            try:
                _write(f, str(memory_bytes))
            except OSError:
                if f.name == self.memory_files[0].name:
                    raise
        _write(self.pids_file, str(pids_max))
        quota = max(1000, int(cpu_cores * CPU_PERIOD_US))
        _write(self.cpu_file, f"{quota} {CPU_PERIOD_US}" if self.cpu_file.name == "cpu.max" else str(quota))

    def cpu_throttled(self) -> int:
        """How many CPU periods the slot was throttled in (its quota was used up) so far."""
        try:
            for line in self.cpu_stat_file.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "nr_throttled":
                    return int(value)
        except OSError:
            pass
        return 0

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


def _add_weight(path: Path, per_slot: int) -> None:
    """Raise the shared parent group's CPU weight by one slot's worth (capped by the kernel's max)."""
    try:
        created = len([d for d in path.parent.iterdir() if d.is_dir()])
        _write(path, str(min(per_slot * max(1, created), 10000 if path.name == "cpu.weight" else 262144)))
    except (OSError, ValueError):
        pass  # weight is a fairness nicety; the quota is what bounds a slot


def create_slot_cgroup(
    group: str, slot: str, memory_bytes: int, pids_max: int, cpu_cores: float
) -> SlotCgroup:
    """Create the slot's cgroup with memory, pids and CPU limits; v2 if mounted there, else v1.

    Raises SandboxUnavailableError naming what is missing when neither works, or when the cgroup
    already holds processes (another Sandbox uses the same name: they would kill each other's jobs).
    """
    try:
        if (_ROOT / "cgroup.controllers").is_file():
            cg = _create_v2(group, slot)
        elif all((_ROOT / c / "cgroup.procs").is_file() for c in ("memory", "pids", "cpu")):
            cg = _create_v1(group, slot)
        else:
            raise SandboxUnavailableError(
                "cgroup layer: neither a cgroup v2 hierarchy nor v1 memory+pids+cpu hierarchies are mounted "
                "under /sys/fs/cgroup; mount them, or pass allow_weaker=True to run without the cgroup layer"
            )
        busy = cg.pids()
        if busy:
            raise SandboxUnavailableError(
                f"cgroup layer: cgroup {group}/{slot} already holds processes {sorted(busy)[:5]}: another "
                "Sandbox on this host uses it; give each Sandbox its own uid range (leave uid_base unset)"
            )
        cg.set_limits(memory_bytes, pids_max, cpu_cores)
        return cg
    except OSError as exc:
        raise SandboxUnavailableError(
            f"cgroup layer: cannot set up {group}/{slot}: {exc}; run as root with cgroup memory, pids and cpu "
            "controllers mounted, or pass allow_weaker=True to run without the cgroup layer"
        ) from None


def _create_v1(group: str, slot: str) -> SlotCgroup:
    mem = _ROOT / "memory" / group / slot
    pids = _ROOT / "pids" / group / slot
    cpu = _ROOT / "cpu" / group / slot
    for d in (mem, pids, cpu):
        d.mkdir(parents=True, exist_ok=True)
    _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
    # The group competes with host tasks as one entity: weigh it as one task per slot, not one in all.
    _add_weight(cpu.parent / "cpu.shares", 1024)
    memsw = mem / "memory.memsw.limit_in_bytes"  # swap accounting, where enabled: no swap escape
    return SlotCgroup(
        dirs=(mem, pids, cpu, mem.parent, pids.parent, cpu.parent),
        procs_files=(mem / "cgroup.procs", pids / "cgroup.procs", cpu / "cgroup.procs"),
        events_file=mem / "memory.oom_control",
        memory_files=(mem / "memory.limit_in_bytes", memsw, mem / "memory.limit_in_bytes")
        if memsw.exists()
        else (mem / "memory.limit_in_bytes",),
        pids_file=pids / "pids.max",
        cpu_file=cpu / "cpu.cfs_quota_us",
        cpu_stat_file=cpu / "cpu.stat",
    )


def _create_v2(group: str, slot: str) -> SlotCgroup:
    parent = _ROOT / group
    parent.mkdir(exist_ok=True)
    missing = {"memory", "pids", "cpu"} - set((_ROOT / "cgroup.controllers").read_text().split())
    if missing:
        raise OSError(f"cgroup v2 controllers {sorted(missing)} are not available")
    _write(_ROOT / "cgroup.subtree_control", "+memory +pids +cpu")
    _write(parent / "cgroup.subtree_control", "+memory +pids +cpu")
    path = parent / slot
    path.mkdir(exist_ok=True)
    _add_weight(parent / "cpu.weight", 100)
    try:
        _write(path / "memory.swap.max", "0")
    except OSError:
        pass
    return SlotCgroup(
        dirs=(path, parent),
        procs_files=(path / "cgroup.procs",),
        events_file=path / "memory.events",
        memory_files=(path / "memory.max",),
        pids_file=path / "pids.max",
        cpu_file=path / "cpu.max",
        cpu_stat_file=path / "cpu.stat",
    )
