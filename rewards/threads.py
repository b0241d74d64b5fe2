"""A pool of daemon threads for sync reward functions, so a hung function cannot freeze a step.

Python cannot kill a thread. When a call outlives its timeout the pool abandons it: its future
fails with TimeoutError, a replacement worker starts at once (so capacity stays the same) and the
stuck worker exits when its call finally returns. Workers are daemon threads, so a call that
never returns does not block interpreter exit either (``concurrent.futures.ThreadPoolExecutor``
joins its threads at exit).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any


class _Job:
    __slots__ = ("fn", "loop", "future", "abandoned", "finished", "timer", "elapsed_s")

    def __init__(
        self, fn: Callable[[], Any], loop: asyncio.AbstractEventLoop, future: asyncio.Future
    ) -> None:
        self.fn, self.loop, self.future, self.abandoned, self.finished = fn, loop, future, False, False
        self.timer: asyncio.TimerHandle | None = None
        self.elapsed_s = 0.0


class DaemonThreadPool:
    """Runs sync callables on up to ``size`` daemon threads (plus replacements for abandoned calls)."""

    def __init__(self, size: int = 8, name: str = "reward") -> None:
        if size < 1:
            raise ValueError(f"thread pool size must be >= 1, got {size}")
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._target, self._workers, self._idle, self._queued, self._name = size, 0, 0, 0, name
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[_Job, bool, Any]]] = {}

    def _spawn_if_needed(self) -> None:
        with self._lock:
            if self._queued <= self._idle or self._workers >= self._target:
                return
            self._workers += 1
            self._idle += 1
        threading.Thread(target=self._work, name=f"{self._name}-{self._workers}", daemon=True).start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            with self._lock:
                self._idle -= 1
                self._queued -= 1
            if not job.abandoned:  # skip calls that timed out before they started
                start = time.perf_counter()
                try:
                    ok, payload = True, job.fn()
                except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                    ok, payload = False, exc
                job.elapsed_s = time.perf_counter() - start
                self._post(job, ok, payload)
            with self._lock:
                job.finished = True
                if job.abandoned:  # a replacement was started for us: leave
                    self._target -= 1
                    self._workers -= 1
                    return
                self._idle += 1

    def _post(self, job: _Job, ok: bool, payload: Any) -> None:
        """Hand a result to the job's event loop; one wake-up carries every result ready by then."""
        with self._lock:
            box = self._outbox.setdefault(job.loop, [])
            box.append((job, ok, payload))
            if len(box) > 1:  # a wake-up is already scheduled for this loop
                return
        try:
            job.loop.call_soon_threadsafe(self._deliver, job.loop)
        except RuntimeError:  # the caller's event loop has closed meanwhile
            with self._lock:
                self._outbox.pop(job.loop, None)

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            box = self._outbox.pop(loop, [])
        for job, ok, payload in box:
            if job.timer is not None:
                job.timer.cancel()
            if job.future.done():  # timed out or cancelled
                continue
            if ok:
                job.future.set_result(payload)
            else:
                job.future.set_exception(payload)

    def _expire(self, job: _Job, timeout_s: float) -> None:
        if not job.future.done():
            job.future.set_exception(TimeoutError(f"timed out after {timeout_s:g}s"))
            self._abandon(job)

    def _abandon(self, job: _Job) -> None:
        """Give up on a job; if it is queued or running, one more worker keeps the capacity."""
        with self._lock:
            if job.finished or job.abandoned:
                return
            job.abandoned = True
            self._target += 1
        self._spawn_if_needed()

    def submit(self, fn: Callable[[], Any], timeout_s: float) -> tuple[asyncio.Future, _Job]:
        """Queue ``fn()``; the future fails with TimeoutError ``timeout_s`` after submission.

        Returns the future and the job (``job.elapsed_s``: seconds ``fn`` ran, once it returned).
        """
        loop = asyncio.get_running_loop()
        job = _Job(fn, loop, loop.create_future())
        job.timer = loop.call_later(timeout_s, self._expire, job, timeout_s)
        with self._lock:
            self._queued += 1
        self._queue.put(job)
        self._spawn_if_needed()
        return job.future, job

    async def run(self, fn: Callable[[], Any], timeout_s: float) -> Any:
        """Run ``fn()`` on a worker and return its result; TimeoutError after ``timeout_s``."""
        future, job = self.submit(fn, timeout_s)
        try:
            return await future
        except asyncio.CancelledError:
            self._abandon(job)
            raise
