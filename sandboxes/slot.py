"""One warm slot: a host uid, a cgroup and a pre-started sandbox process waiting for its job."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .cgroups import SlotCgroup
from .command import HARNESS_PROCS, MiB, SpawnSpec, sandbox_argv
from .config import Limits

_READY_TIMEOUT_S = 15.0
# plain.py first: the runner's `from .plain import ...` fails in the sandbox (no package) and
# finds the names already defined; only the first `from __future__` import may stay.
_RUNNER_SRC = (
    (Path(__file__).parent / "plain.py").read_text()
    + "\n"
    + (Path(__file__).parent / "runner.py").read_text().replace("from __future__ import annotations\n", "", 1)
)


@dataclass(frozen=True)
class RawOutcome:
    """What the parent observed of one run; the verdict is decided from this in judge.py.

    harness_error is set only for failures before the job reached the sandbox (never caused by the
    program). The runner's result lines went to the caller's `on_line` as they arrived.
    result_overflow: a line exceeded its cap (the parent then killed the slot).
    killed_by is the signal that ended the slot's process (bwrap or the runner) during the run, None
    when it exited normally or the parent killed it (wall clock, overflow). The runner ignores every
    signal a program can send, so this is the host (OOM killer, an operator) or a runner crash.
    """

    harness_error: str | None
    timed_out: bool
    oom_killed: bool
    result_overflow: bool
    runner_stderr: str
    wall_s: float
    killed_by: int | None = None


def kill_uid(uid: int) -> int:
    """SIGKILL every host process whose real uid is `uid` (the slot's); returns how many were signalled."""
    n = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid == uid:
                os.kill(int(entry), signal.SIGKILL)
                n += 1
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return n


def _death_signal(returncode: int | None) -> int | None:
    """The signal that ended the slot's process: bwrap itself (negative return code) or the runner,
    whose death by signal N bwrap reports as exit status 128 + N. None for a normal exit or a live one."""
    if returncode is None:
        return None
    if returncode < 0:
        return -returncode
    return returncode - 128 if returncode > 128 else None


class Slot:
    """A reusable execution slot. Not thread-safe: the pool hands it to one run at a time."""

    def __init__(
        self, uid: int, cgroup: SlotCgroup | None, seccomp_bpf: bytes | None, netns: bool, python: str
    ):
        self.uid = uid
        self.cgroup = cgroup
        self._seccomp_bpf = seccomp_bpf
        self._netns = netns
        self._python = python
        self._proc: subprocess.Popen[bytes] | None = None
        self._result_r = -1
        self._nonce_w = -1
        self.limits: Limits | None = None
        self.spawn_error: str | None = None

    def alive(self) -> bool:
        """True when a warm process is waiting for a job."""
        return self._proc is not None and self._proc.poll() is None and self._nonce_w >= 0

    def spawn(self, limits: Limits) -> bool:
        """Start a warm process with `limits` and wait for its ready byte; False (with spawn_error) on failure."""
        self.discard()
        self.limits = limits
        if self.cgroup is not None:
            self.cgroup.set_limits(limits.memory_mb * MiB, limits.nproc + HARNESS_PROCS, limits.cpu_cores)
        result_r, result_w = os.pipe()
        nonce_r, nonce_w = os.pipe()
        child_fds = [result_w, nonce_r]
        seccomp_fd = None
        if self._seccomp_bpf is not None:
            seccomp_fd, sw = os.pipe()
            os.write(sw, self._seccomp_bpf)  # a few hundred bytes: fits the pipe buffer
            os.close(sw)
            child_fds.append(seccomp_fd)
        spec = SpawnSpec(
            uid=self.uid,
            limits=limits,
            python=self._python,
            runner_src=_RUNNER_SRC,
            result_fd=result_w,
            nonce_fd=nonce_r,
            seccomp_fd=seccomp_fd,
            netns=self._netns,
            cgroup_procs=self.cgroup.procs_files if self.cgroup else (),
        )
        try:
            self._proc = subprocess.Popen(
                sandbox_argv(spec),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=child_fds,
                start_new_session=True,
                cwd="/",  # not the caller's directory: it may be unreadable to the slot uid
                # Not the host environment: bwrap's own processes keep theirs, and the sandbox can read
                # /proc/1/environ of its pid-1 bwrap. --clearenv then empties the program's.
                env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
            )
        except OSError as exc:
            self.spawn_error = f"cannot start the sandbox: {exc}"
            return False
        finally:
            for fd in child_fds:
                os.close(fd)
        self._result_r, self._nonce_w = result_r, nonce_w
        ready, _, _ = select.select([result_r], [], [], _READY_TIMEOUT_S)
        if not ready or os.read(result_r, 1) != b"R":
            err = self._proc.stderr.read1(4096).decode(errors="replace") if ready else "no ready signal"
            self.spawn_error = f"sandbox process did not start: {err.strip() or 'exited early'}"
            self.discard()
            return False
        try:  # the sandbox's outermost process must already run as the slot uid on the host
            host_uid = os.stat(f"/proc/{self._proc.pid}").st_uid
        except FileNotFoundError:
            host_uid = -1
        if host_uid != self.uid:
            self.spawn_error = f"sandbox process runs as host uid {host_uid}, not the slot uid {self.uid}"
            self.discard()
            return False
        self.spawn_error = None
        return True

    def execute(self, job: bytes, nonce: str, wall_s: float, line_cap: int, on_line) -> RawOutcome:
        """Hand `job` to the warm process, pass each result line to on_line(bytes) as it arrives,
        until EOF or the wall clock, then kill everything. At most one line (<= line_cap bytes) is
        held at a time, so the parent's memory per job does not grow with the number of units."""
        t0 = time.monotonic()
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return RawOutcome(self.spawn_error or "slot has no live process", False, False, False, "", 0.0)
        oom_before = self.cgroup.oom_kills() if self.cgroup else 0
        deadline = t0 + wall_s
        os.write(self._nonce_w, nonce.encode())
        os.close(self._nonce_w)
        self._nonce_w = -1
        stdin_fd = proc.stdin.fileno()
        os.set_blocking(stdin_fd, False)
        pending = memoryview(job)
        result, stderr = bytearray(), bytearray()
        err_fd = proc.stderr.fileno()
        readers = {self._result_r: result, err_fd: stderr}
        timed_out = overflow = False
        while self._result_r in readers:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            writers = [stdin_fd] if pending is not None else []
            readable, writable, _ = select.select(list(readers), writers, [], left)
            if writable:
                try:
                    pending = pending[os.write(stdin_fd, pending) :]
                except BrokenPipeError:
                    pending = memoryview(b"")
                if not pending:
                    proc.stdin.close()
                    pending = None
            for fd in readable:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    del readers[fd]
                    continue
                buf = readers[fd]
                buf += chunk
                if fd == self._result_r:
                    while (i := buf.find(b"\n")) >= 0:
                        on_line(bytes(buf[:i]))
                        del buf[: i + 1]
                    if len(buf) > line_cap:
                        overflow = True
                        del readers[fd]
                elif len(buf) > 65536:
                    del readers[fd]
        if not timed_out:  # bwrap exits as soon as the runner has; give it a moment
            try:
                proc.wait(timeout=max(0.05, min(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
        # before our own kill below; a slot the parent killed (wall clock, overflow) is never "from outside"
        killed_by = None if timed_out or overflow else _death_signal(proc.poll())
        self.kill()
        oom = bool(self.cgroup) and self.cgroup.oom_kills() > oom_before
        return RawOutcome(
            harness_error=None,
            timed_out=timed_out,
            oom_killed=oom,
            result_overflow=overflow,
            runner_stderr=stderr[:4096].decode(errors="replace"),
            wall_s=time.monotonic() - t0,
            killed_by=killed_by,
        )

    def kill(self) -> None:
        """Kill the slot's process tree: process group, cgroup, then anything left with the slot uid."""
        proc = self._proc
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        if self.cgroup is not None:
            self.cgroup.kill_all()
        else:
            kill_uid(self.uid)

    def discard(self) -> None:
        """Kill the current process (if any) and close its pipes."""
        if self._proc is not None:
            self.kill()
            for stream in (self._proc.stdin, self._proc.stderr):
                try:
                    stream.close()
                except (OSError, BrokenPipeError):
                    pass
            self._proc = None
        for fd in (self._result_r, self._nonce_w):
            if fd >= 0:
                os.close(fd)
        self._result_r = self._nonce_w = -1
