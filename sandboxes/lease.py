"""Host-wide leases of slot uids: two Sandboxes on one host never share a uid (nor its cgroup).

Every slot uid is leased with an exclusive `flock` on ``/run/posttrain-sandbox/uid-<uid>.lock``,
held for the Sandbox's lifetime; the kernel releases it when the process dies, so a crashed
owner never leaks its range. Slot cgroups are named after the slot uid, so a uid lease is also
a cgroup lease. Besides the locks, a range is refused when any host process already runs as
one of its uids (a sandbox outside this protocol, e.g. an older posttrain, or a stale slot).
"""

from __future__ import annotations

import fcntl
import os
import pwd
from pathlib import Path

from .errors import SandboxUnavailableError

LOCK_DIR = Path("/run/posttrain-sandbox")
AUTO_UID_FIRST = 61000
AUTO_UID_LAST = 65000  # below 65534 (nobody) and the usual subuid ranges (100000+)


def processes_of_uids(lo: int, hi: int) -> dict[int, int]:
    """pid -> uid of live host processes whose uid is in [lo, hi) (zombies, already dead, are skipped)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            uid = os.stat(f"/proc/{entry}").st_uid
            if lo <= uid < hi:
                with open(f"/proc/{entry}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                if state not in ("Z", "X"):
                    found[int(entry)] = uid
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return found


class UidLease:
    """An exclusive lease of uids [base, base + n). Release with `release()` (idempotent)."""

    def __init__(self, base: int, n: int, fds: list[int]) -> None:
        self.base, self.n, self._fds = base, n, fds

    @property
    def uids(self) -> range:
        return range(self.base, self.base + self.n)

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)  # closing the fd drops its flock
        self._fds = []


def _try_lock(uid: int) -> int | None:
    LOCK_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(LOCK_DIR / f"uid-{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for the error message of the next one
    return fd


def _holder(uid: int) -> str:
    try:
        pid = (LOCK_DIR / f"uid-{uid}.lock").read_text().strip()
    except OSError:
        return "another Sandbox"
    return f"the Sandbox of pid {pid}" if pid else "another Sandbox"


def _problem(base: int, n: int) -> str | None:
    """Why [base, base+n) cannot be used even when unlocked, or None."""
    for uid in range(base, base + n):
        try:
            return f"uid {uid} belongs to user {pwd.getpwuid(uid).pw_name!r}"
        except KeyError:
            pass
    procs = processes_of_uids(base, base + n)
    if procs:
        pid, uid = next(iter(procs.items()))
        return f"process {pid} already runs as slot uid {uid} ({len(procs)} such processes)"
    return None


def _lock_range(base: int, n: int) -> tuple[list[int], int | None]:
    """Lock every uid of the range; on the first busy one release all and return its uid."""
    fds: list[int] = []
    for uid in range(base, base + n):
        fd = _try_lock(uid)
        if fd is None:
            for f in fds:
                os.close(f)
            return [], uid
        fds.append(fd)
    return fds, None


def lease_uids(n: int, base: int | None) -> UidLease:
    """Lease n slot uids: exactly [base, base+n) when base is given, else the first free range."""
    if base is not None:
        fds, busy = _lock_range(base, n)
        if busy is not None:
            raise SandboxUnavailableError(
                f"uid layer: slot uid {busy} (range {base}..{base + n - 1}) is leased by {_holder(busy)} on "
                "this host; two Sandboxes sharing uids or cgroups kill each other's jobs. Leave "
                "SandboxConfig.uid_base unset (None) to lease a free range, or choose a disjoint one"
            )
        problem = _problem(base, n)
        if problem:
            for f in fds:
                os.close(f)
            raise SandboxUnavailableError(
                f"uid layer: cannot use slot uids {base}..{base + n - 1}: {problem}. Leave "
                "SandboxConfig.uid_base unset (None) to lease a free range, or choose another one"
            )
        return UidLease(base, n, fds)
    start = AUTO_UID_FIRST
    while start + n <= AUTO_UID_LAST:
        fds, busy = _lock_range(start, n)
        if busy is not None:
            start = busy + 1
            continue
        if _problem(start, n) is None:
            return UidLease(start, n, fds)
        for f in fds:
            os.close(f)
        start += n
    raise SandboxUnavailableError(
        f"uid layer: no free range of {n} slot uids in {AUTO_UID_FIRST}..{AUTO_UID_LAST} on this host "
        "(every one is leased or in use): close idle Sandboxes, or pass an explicit SandboxConfig.uid_base"
    )
