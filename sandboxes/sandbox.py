"""`Sandbox`: the client interface: a pool of warm slots behind run() / arun()."""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .canary import canary_program, judge_canary, start_listener
from .cgroups import SlotCgroup, create_slot_cgroup
from .command import HARNESS_PROCS, MiB, interpreter_tree
from .config import REQUIRED_LAYERS, Layer, Limits, SandboxConfig
from .errors import SandboxClosedError, SandboxEscapeError, SandboxUnavailableError
from .judge import JobJudge, build_job, prepare_tests
from .lease import UidLease, lease_uids
from .seccomp_filter import build_seccomp_bpf
from .slot import RawOutcome, Slot
from .verdict import Status, Verdict

log = logging.getLogger(__name__)

_TOOLS = ("bwrap", "prlimit", "setpriv")


class Sandbox:
    """Runs untrusted Python in a pool of warm, layered-isolation slots.

    Construction checks the layers, starts `config.slots` warm processes and runs the escape
    canary; it raises SandboxUnavailableError / SandboxEscapeError rather than serve unsafely.
    Thread-safe; use as a context manager or call close().
    """

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self.counts: Counter[Status] = Counter()
        self.weaknesses: tuple[str, ...] = ()
        self.slots_replaced = 0  # slots whose runner died mid-run without the parent's kill (see run())
        self._closed = False
        self._lease: UidLease | None = None
        self.uid_base = -1  # the leased range's first uid, set by _start
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when a run leaves its slot
        self._busy: set[Slot] = set()  # slots running a job now
        self._killed_by_close: set[Slot] = set()
        self._slots: list[Slot] = []
        self._free: queue.Queue[Slot] = queue.Queue()
        self._recycler = ThreadPoolExecutor(
            max_workers=self.config.slots, thread_name_prefix="sandbox-recycle"
        )
        self._async_pool = ThreadPoolExecutor(max_workers=self.config.slots, thread_name_prefix="sandbox-run")
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # -- start-up -------------------------------------------------------------------------------

    def _start(self) -> None:
        cfg = self.config
        self._check_required()
        self._lease = lease_uids(cfg.slots, cfg.uid_base)
        self.uid_base = self._lease.base
        missing = set(cfg.disabled_layers)
        seccomp_bpf = None
        if Layer.SECCOMP not in missing:
            try:
                seccomp_bpf = build_seccomp_bpf(cfg.python)
            except SandboxUnavailableError:
                if not cfg.allow_weaker:
                    raise
                missing.add(Layer.SECCOMP)
        cgroups: list[SlotCgroup | None] = [None] * cfg.slots
        if Layer.CGROUP not in missing:
            try:
                cgroups = [
                    create_slot_cgroup(
                        cfg.cgroup_name, f"slot-{self.uid_base + i}", cfg.limits.memory_mb * MiB,
                        cfg.limits.nproc + HARNESS_PROCS, cfg.limits.cpu_cores,
                    )
                    for i in range(cfg.slots)
                ]  # fmt: skip
            except SandboxUnavailableError:
                if not cfg.allow_weaker:
                    raise
                missing.add(Layer.CGROUP)
                cgroups = [None] * cfg.slots
        self.missing_layers = frozenset(missing)
        self.active_layers = frozenset(Layer) - self.missing_layers
        for i, cg in enumerate(cgroups):
            slot = Slot(self.uid_base + i, cg, seccomp_bpf, Layer.NETNS not in missing, cfg.python)
            self._slots.append(slot)
            if not slot.spawn(cfg.limits):
                raise SandboxUnavailableError(
                    f"namespaces layer: slot {i} failed to start ({slot.spawn_error}); run sandboxes/setup.sh "
                    "and check that user namespaces are enabled (sysctl user.max_user_namespaces > 0)"
                )
            self._free.put(slot)
        if cfg.canary:
            self._run_canary()
        if self.missing_layers and not cfg.allow_weaker:
            raise SandboxUnavailableError(
                f"layers {sorted(x.value for x in self.missing_layers)} are disabled or unavailable; "
                "enable them or pass allow_weaker=True to accept a weaker sandbox"
            )
        if self.missing_layers:
            log.warning(
                "posttrain.sandboxes serving in WEAKER mode: layers %s missing; %s",
                sorted(x.value for x in self.missing_layers),
                "; ".join(self.weaknesses) or "no canary probe got through",
            )

    def _check_required(self) -> None:
        cfg = self.config
        absent = [t for t in _TOOLS if shutil.which(t) is None] + [cfg.python] * (
            not os.access(cfg.python, os.X_OK)
        )
        if absent:
            raise SandboxUnavailableError(
                f"missing {absent}: run sandboxes/setup.sh (as root) to install them"
            )
        if os.geteuid() != 0:
            raise SandboxUnavailableError(
                "uid layer: the harness must run as root to drop each slot to its own unprivileged uid "
                "(setpriv --reuid); start the process as root"
            )
        try:
            with open("/proc/sys/user/max_user_namespaces") as f:
                userns_ok = int(f.read()) > 0
        except OSError:
            userns_ok = False
        if not userns_ok:
            raise SandboxUnavailableError(
                "userns layer: user namespaces are disabled (sysctl user.max_user_namespaces=0); "
                "bwrap as root without --unshare-user lets code remount /usr writable, so the sandbox refuses "
                "to start: set user.max_user_namespaces to a positive value"
            )
        assert REQUIRED_LAYERS.isdisjoint(cfg.disabled_layers)  # SandboxConfig guarantees it
        try:
            interpreter_tree(cfg.python)  # what of /usr the sandbox sees: the interpreter's own tree
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            raise SandboxUnavailableError(
                f"namespaces layer: cannot list the files {cfg.python} needs ({exc}); check that it runs "
                "and that `ldd` is installed (Debian package libc-bin)"
            ) from None

    def _run_canary(self) -> None:
        listener = start_listener()
        markers = []
        try:
            # Unique marker files on the host: the sandbox must not see any of them. Not bare
            # directories: "/" or "/tmp" (a common working directory) exist inside the sandbox too.
            for d in ("/root", tempfile.gettempdir(), "/var/tmp", os.getcwd()):
                try:
                    fd, path = tempfile.mkstemp(prefix=".posttrain-canary-", dir=d)
                except OSError:
                    continue  # not writable here: nothing to probe with
                os.close(fd)
                markers.append(path)
            host_paths = ["/etc/passwd", *markers]
            code = canary_program(host_paths, listener.getsockname()[1])
            verdict = self.run(code)
        finally:
            listener.close()
            for path in markers:
                os.unlink(path)
        # Without allow_weaker every probe must be blocked, so a disabled layer is caught by a probe.
        expected = self.active_layers if self.config.allow_weaker else frozenset(Layer)
        escapes, weak = judge_canary(verdict.stdout, expected)
        if verdict.status is not Status.PASS:
            escapes.append(
                f"canary run ended {verdict.status.value}: {verdict.detail} {verdict.stderr[-300:]}"
            )
        if escapes:
            raise SandboxEscapeError(
                "escape canary: "
                + "; ".join(escapes)
                + ". The sandbox refuses to serve: re-enable the layer(s) "
                "or fix the host (run sandboxes/setup.sh)"
            )
        self.weaknesses = tuple(weak)

    # -- runs -----------------------------------------------------------------------------------

    def run(
        self,
        code: str,
        tests: list | None = None,
        io_cases: list[tuple[str, str]] | None = None,
        limits: Limits | None = None,
        *,
        queue_timeout_s: float | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> Verdict:
        """Run `code` in a warm slot and judge it (blocks until a slot is free and the run ends).

        tests: assert statements / test code, each a str or a mapping ``{"test": str, "rel_tol":
        float, "abs_tol": float}`` (see judge.py and plain.py for the rules and the tolerance policy);
        io_cases: (stdin, expected stdout) pairs, one fresh process each; neither: plain execution,
        PASS iff the program exits with status 0. limits: override the config's limits for this run
        (the slot then starts a fresh process instead of its warm one). A slot whose runner dies
        mid-run without the parent killing it (the host OOM killer, an operator; the runner ignores
        every signal the program can send) is restarted and the job run once more; if it dies again
        the verdict is FAIL (scored 0): only the harness's own faults are SANDBOX_ERROR.

        An empty `tests` or `io_cases` list is NO_TESTS (nothing ran, score 0). queue_timeout_s:
        the longest wait for a free slot; past it the verdict is TIMEOUT (the sample is scored, not
        masked: a batch of hanging programs cannot hide the samples queued behind it). The wall
        clock of the run (`Limits.wall_s`) starts only once a slot is acquired; `on_start()` is
        called then (a reward node starts its own timeout there). A run in flight when `close()`
        is called finishes, or is killed by close and returns SANDBOX_ERROR (the harness ended it).
        """
        deadline = None if queue_timeout_s is None else time.monotonic() + queue_timeout_s
        return self._run(code, tests, io_cases, limits, deadline, on_start)

    def _run(
        self,
        code: str,
        tests: list | None,
        io_cases: list[tuple[str, str]] | None,
        limits: Limits | None,
        queue_deadline: float | None,
        on_start: Callable[[], None] | None,
    ) -> Verdict:
        if self._closed:
            raise SandboxClosedError("Sandbox.run called after close(): create a new Sandbox")
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        if tests is not None and io_cases is not None:
            raise ValueError("pass either tests or io_cases, not both")
        if io_cases is not None:
            io_cases = [(str(i), str(o)) for i, o in io_cases]
        specs = prepare_tests(list(tests)) if tests is not None else None
        if (specs is not None and not specs) or (io_cases is not None and not io_cases):
            return self._count(
                Verdict(Status.NO_TESTS, 0, 0, detail="an empty test list: nothing to check (a data problem)")
            )
        lim = limits or self.config.limits
        job = build_job(code, specs, [i for i, _ in io_cases] if io_cases is not None else None)
        # One result line holds one unit: stdout + stderr (JSON-escaped: <= 6 bytes per byte) and
        # the tests' records (asserts mode). Independent of the number of io cases.
        rec_cap = max(4 << 20, 4 * lim.output_bytes) if specs is not None else 1 << 16
        line_cap = 12 * lim.output_bytes + 2 * rec_cap + (1 << 16)
        slot = self._acquire(queue_deadline)
        if slot is None:
            if self._closed:
                return self._count(
                    Verdict(
                        Status.SANDBOX_ERROR, 0, 0, detail="the Sandbox was closed before a slot was free"
                    )
                )
            total = len(specs) if specs is not None else len(io_cases) if io_cases is not None else 0
            return self._count(
                Verdict(
                    Status.TIMEOUT,
                    0,
                    total,
                    detail="no slot was free within the queue bound (queue_timeout_s)",
                )
            )
        if on_start is not None:
            on_start()
        try:
            for attempt in range(2):  # a runner that died without the parent's kill: once more
                if slot.limits != lim or not slot.alive():
                    slot.spawn(lim)
                nonce = secrets.token_hex(16)
                judge = JobJudge(specs, io_cases, nonce)
                raw = slot.execute(job, nonce, lim.wall_s, line_cap, judge.feed)
                verdict = judge.verdict(raw)
                if slot in self._killed_by_close:
                    verdict = JobJudge(specs, io_cases, "").verdict(
                        RawOutcome("the Sandbox was closed during the run (killed by close())", False, False,
                                   False, "", raw.wall_s)
                    )  # fmt: skip
                    break
                if attempt or not raw.killed_by or raw.oom_killed or judge.ended:
                    break
                log.warning(
                    "sandbox slot %d: its runner died by signal %d mid-run without the parent's kill; "
                    "starting a replacement and re-running the job once",
                    slot.uid,
                    raw.killed_by,
                )
                with self._lock:
                    self.slots_replaced += 1
        except Exception as exc:  # a harness bug must not score the completion
            log.exception("sandbox harness error")
            verdict = JobJudge(specs, io_cases, "").verdict(
                RawOutcome(f"harness error: {exc!r}", False, False, False, "", 0.0)
            )
        finally:
            self._release(slot)
        return self._count(verdict)

    def _count(self, verdict: Verdict) -> Verdict:
        with self._lock:
            self.counts[verdict.status] += 1
        return verdict

    def _acquire(self, deadline: float | None) -> Slot | None:
        """A free slot, marked busy; None past `deadline` or once the Sandbox is closed."""
        while True:
            wait = 0.25 if deadline is None else min(0.25, deadline - time.monotonic())
            if wait <= 0:
                return None
            try:
                slot = self._free.get(timeout=wait)
            except queue.Empty:
                if self._closed:
                    return None
                continue
            with self._lock:
                if not self._closed:
                    self._busy.add(slot)
                    return slot
            self._free.put(slot)
            return None

    def _release(self, slot: Slot) -> None:
        """The run left `slot`: recycle it (or hand it back untouched once closed)."""
        with self._lock:
            self._busy.discard(slot)
            self._killed_by_close.discard(slot)
            closed = self._closed
            self._idle.notify_all()
        if closed:
            self._free.put(slot)
            return
        try:
            self._recycler.submit(self._recycle, slot)
        except RuntimeError:  # close() shut the recycler down meanwhile
            self._free.put(slot)

    async def arun(
        self,
        code: str,
        tests: list | None = None,
        io_cases: list[tuple[str, str]] | None = None,
        limits: Limits | None = None,
        *,
        queue_timeout_s: float | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> Verdict:
        """Async `run`: executes in this sandbox's own thread pool (one thread per slot). The queue
        bound counts from this call (the wait for a pool thread included); `on_start` is called
        from that thread."""
        loop = asyncio.get_running_loop()
        deadline = None if queue_timeout_s is None else time.monotonic() + queue_timeout_s
        return await loop.run_in_executor(
            self._async_pool, lambda: self._run(code, tests, io_cases, limits, deadline, on_start)
        )

    def _recycle(self, slot: Slot) -> None:
        """Clean the slot and start its next warm process, then hand it back to the pool."""
        try:
            if not self._closed:
                slot.spawn(self.config.limits)
        except Exception:  # noqa: BLE001 - the next run retries the spawn and reports SANDBOX_ERROR
            log.exception("sandbox slot %d failed to respawn", slot.uid)
        finally:
            self._free.put(slot)

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self, grace_s: float | None = None) -> None:
        """Stop serving: runs in flight get `grace_s` (default: the wall clock + 1 s) to finish, then
        are killed and return SANDBOX_ERROR; queued runs return SANDBOX_ERROR at once. Then kill
        every slot process, remove the cgroups, stop the thread pools. Idempotent."""
        grace = self.config.limits.wall_s + 1.0 if grace_s is None else grace_s
        with self._lock:
            self._closed = True
            end = time.monotonic() + grace
            while self._busy and (left := end - time.monotonic()) > 0:
                self._idle.wait(left)
            busy = list(self._busy)
            self._killed_by_close.update(busy)
        for slot in busy:  # its run sees the end of its result pipe and returns a verdict
            slot.kill()
        with self._lock:
            end = time.monotonic() + 10.0
            while self._busy and (left := end - time.monotonic()) > 0:
                self._idle.wait(left)
        self._recycler.shutdown(wait=True)
        self._async_pool.shutdown(wait=False)
        for slot in self._slots:
            slot.discard()
            if slot.cgroup is not None:
                slot.cgroup.remove()
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
