"""Runs one scoring step of a reward graph: nodes concurrently, each with timeout, gate, cache and error policy.

Every node is an asyncio task that waits for its dependencies and gates, then calls its function
on the samples it applies to: async functions on the event loop, sync ones on daemon threads (so
a hung function costs its timeout, never the step). Within a step, identical inputs
(node, prompt, completion, fields, dependency values) are computed once.

A node's timeout counts running time. An async function that first waits for a resource of its
own (a sandbox slot) declares ``queue_timeout_s`` (its bound on that wait) and calls
:func:`start_clock` once the resource is acquired: its ``timeout_s`` then counts from there, and
the whole call is bounded by ``queue_timeout_s + timeout_s``. What a queue wait past its bound
means (scored 0 as a timeout, re-queued) is the function's decision, not a masked sample.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.rewards.cells import FAILED, Cell, check_value
from posttrain.rewards.errors import RewardFailureError
from posttrain.rewards.node import RewardNode
from posttrain.rewards.threads import DaemonThreadPool

from posttrain.types import RewardSample

_CLOCK: contextvars.ContextVar[Any] = contextvars.ContextVar("posttrain_reward_clock", default=None)


def start_clock() -> Any:
    """The callable that starts the calling node's timeout when called (see the module docstring).
    Thread-safe: a sandbox's worker thread calls it once it holds a slot. A no-op outside a node
    that declares ``queue_timeout_s``."""
    start = _CLOCK.get()
    if start is None:
        return lambda: None
    return start


@dataclass
class StepInput:
    """Samples of one step; ``groups[g]`` is the index range of prompt g's samples.

    ``keys[i]`` identifies sample i's content (prompt, completion, fields) for the step cache.
    """

    samples: list[RewardSample]
    groups: list[range]
    n_tokens: list[int | None]
    keys: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        fields_keys: dict[int, str] = {}  # samples of one prompt share their fields dict
        for s in self.samples:
            fk = fields_keys.get(id(s.fields))
            if fk is None:
                text = json.dumps(s.fields, sort_keys=True, default=repr)
                fk = fields_keys[id(s.fields)] = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
            # the token count is part of the content: two samples with one text may differ in tokens
            self.keys.append(f"{len(s.prompt)}:{s.prompt}{len(s.completion)}:{s.completion}{fk}#{s.num_tokens}")


@dataclass
class NodeStats:
    """Counters of one node over one step (latencies are per call, in seconds)."""

    latencies_s: list[float] = field(default_factory=list)
    cache_hits: int = 0


@dataclass
class StepOutput:
    """``cells[node][i]``: what ``node`` gave sample i."""

    cells: dict[str, list[Cell]]
    stats: dict[str, NodeStats]
    wall_s: float


def _freeze(inputs: dict[str, Any]) -> tuple:
    """Hashable form of dependency values (floats, None, or per-token lists)."""
    return tuple(tuple(v) if isinstance(v, list) else v for v in inputs.values())


class _NodeRun:
    """Scores the samples a node applies to, filling ``cells[node.name]``."""

    def __init__(
        self, node: RewardNode, step: StepInput, cells: dict[str, list[Cell]], pool: DaemonThreadPool
    ):
        self.node, self.step, self.cells, self.pool = node, step, cells, pool
        self.stats = NodeStats()
        self.sem = asyncio.Semaphore(node.max_concurrency)

    def _inputs(self, i: int) -> dict[str, Any] | Cell:
        """Dependency values for sample i, or the Cell to record when the node must not run."""
        for name in self.node.upstream:
            c = self.cells[name][i]
            if c.masked or c.status == "upstream":
                return Cell("upstream", error=f"input {name!r} failed")
        for name in self.node.gate:
            passed = self.cells[name][i].scalar
            if passed is None or passed <= 0:
                return Cell("gated")
        return {name: self.cells[name][i].value for name in self.node.deps}

    async def _call(self, arg: Any, inputs: dict[str, Any]) -> Any:
        """One call of fn; returns its raw result or raises (TimeoutError after timeout_s)."""
        node = self.node
        async with self.sem:
            start = time.perf_counter()
            try:
                if node.is_async:
                    queue_s = getattr(node.fn, "queue_timeout_s", None)
                    coro = node.fn(arg, **inputs, **node.kwargs)
                    if sys.version_info < (3, 11):
                        return await asyncio.wait_for(coro, node.timeout_s + (queue_s or 0.0))
                    if queue_s is None:
                        async with asyncio.timeout(node.timeout_s):  # no extra task per call, unlike wait_for
                            return await coro
                    return await self._queued(coro, float(queue_s))
                thunk = functools.partial(node.fn, arg, **inputs, **node.kwargs)
                return await self.pool.run(thunk, node.timeout_s)
            finally:
                self.stats.latencies_s.append(time.perf_counter() - start)

    async def _queued(self, coro: Any, queue_s: float) -> Any:
        """Await a call whose ``timeout_s`` starts at its ``start_clock()`` (bounded by
        ``queue_s + timeout_s`` before that)."""
        loop = asyncio.get_running_loop()
        timeout_s = self.node.timeout_s
        running = [True]
        async with asyncio.timeout(queue_s + timeout_s) as clock:

            def reschedule(when: float) -> None:
                if running[0] and not clock.expired():
                    clock.reschedule(when)

            def started() -> None:
                loop.call_soon_threadsafe(reschedule, loop.time() + timeout_s)

            token = _CLOCK.set(started)
            try:
                return await coro
            finally:
                running[0] = False
                _CLOCK.reset(token)

    async def _sync_samples(self, todo: dict[int, tuple[Any, dict[str, Any]]], out: list[Any]) -> None:
        """Sample-mode sync fn: one pool job per distinct sample, no task per sample (the hot path)."""
        node, jobs = self.node, {}
        for i, (key, inputs) in todo.items():
            if key in jobs:
                self.stats.cache_hits += 1
                continue
            thunk = functools.partial(node.fn, self.step.samples[i], **inputs, **node.kwargs)
            jobs[key] = (i, *self.pool.submit(thunk, node.timeout_s))
        await asyncio.gather(*(fut for _, fut, _ in jobs.values()), return_exceptions=True)
        cells: dict[Any, Cell] = {}
        for key, (i, fut, job) in jobs.items():
            exc = fut.exception()
            self.stats.latencies_s.append(node.timeout_s if isinstance(exc, TimeoutError) else job.elapsed_s)
            cells[key] = (
                self._failed(exc)
                if exc
                else check_value(fut.result(), node.token_level, self.step.n_tokens[i])
            )
        for i, (key, _) in todo.items():
            out[i] = cells[key]

    def _failed(self, exc: BaseException) -> Cell:
        if isinstance(exc, TimeoutError):
            return Cell("timeout", error=f"timed out after {self.node.timeout_s:g}s")
        return Cell("error", error=f"{type(exc).__name__}: {exc}")

    async def _one(self, i: int, inputs: dict[str, Any]) -> Cell:
        try:
            raw = await self._call(self.step.samples[i], inputs)
        except Exception as exc:  # noqa: BLE001 - recorded per sample, policy applied later
            return self._failed(exc)
        return check_value(raw, self.node.token_level, self.step.n_tokens[i])

    async def _many(self, idx: Sequence[int], inputs: list[dict[str, Any]]) -> list[Cell]:
        """One batch/group call over samples ``idx``; returns one Cell per sample."""
        batched = {d: [inp[d] for inp in inputs] for d in self.node.deps}
        try:
            raw = await self._call([self.step.samples[i] for i in idx], batched)
            if not isinstance(raw, list | tuple) or len(raw) != len(idx):
                got = len(raw) if isinstance(raw, list | tuple) else type(raw).__name__
                raise TypeError(
                    f"{self.node.mode}-mode function returned {got} values for {len(idx)} samples"
                )
        except Exception as exc:  # noqa: BLE001
            return [self._failed(exc) for _ in idx]
        return [
            check_value(r, self.node.token_level, self.step.n_tokens[i])
            for r, i in zip(raw, idx, strict=True)
        ]

    async def run(self) -> list[Cell]:
        n = len(self.step.samples)
        out: list[Cell | asyncio.Future[Cell]] = [Cell("upstream")] * n
        todo: dict[int, tuple[Any, dict[str, Any]]] = {}
        for i in range(n):
            inputs = self._inputs(i)
            if isinstance(inputs, Cell):
                out[i] = inputs
            else:
                key = self.step.keys[i]
                todo[i] = ((key, _freeze(inputs)) if inputs else key, inputs)
        if self.node.mode == "sample" and not self.node.is_async:
            await self._sync_samples(todo, out)
        elif self.node.mode == "sample":
            cache: dict[Any, asyncio.Future[Cell]] = {}
            for i, (key, inputs) in todo.items():
                if key in cache:
                    self.stats.cache_hits += 1
                else:
                    cache[key] = asyncio.ensure_future(self._one(i, inputs))
                out[i] = cache[key]
        else:
            chunks = self.step.groups if self.node.mode == "group" else [range(n)]
            calls = [self._chunk([i for i in chunk if i in todo], todo, out) for chunk in chunks]
            await asyncio.gather(*calls)
        cells = [await c if isinstance(c, asyncio.Future) else c for c in out]
        return [self._apply_policy(c) for c in cells]

    async def _chunk(
        self, idx: list[int], todo: dict[int, tuple[Any, dict[str, Any]]], out: list[Any]
    ) -> None:
        """One batch (or group) call over ``idx``; identical samples are sent once."""
        if not idx:
            return
        if self.node.mode == "group":  # a group's values depend on all its members: no dedup inside
            cells = await self._many(idx, [todo[i][1] for i in idx])
            for i, cell in zip(idx, cells, strict=True):
                out[i] = cell
            return
        first: dict[str, int] = {}
        for i in idx:
            if todo[i][0] in first:
                self.stats.cache_hits += 1
            else:
                first[todo[i][0]] = i
        cells = await self._many(list(first.values()), [todo[i][1] for i in first.values()])
        by_key = dict(zip(first, cells, strict=True))
        for i in idx:
            out[i] = by_key[todo[i][0]]

    def _apply_policy(self, cell: Cell) -> Cell:
        cell = Cell(cell.status, cell.value, cell.error, reason=cell.reason)  # deduplicated samples share a Cell: copy
        if cell.status in FAILED:
            if self.node.on_error == "default":
                cell.value = self.node.default
            else:
                cell.masked = True
        return cell


async def run_step(
    nodes: dict[str, RewardNode], order: list[str], step: StepInput, pool: DaemonThreadPool
) -> StepOutput:
    """Run every node over ``step``; raises RewardFailureError when an ``on_error="fail"`` node fails."""
    start = time.perf_counter()
    cells: dict[str, list[Cell]] = {}
    runs = {name: _NodeRun(nodes[name], step, cells, pool) for name in order}
    tasks: dict[str, asyncio.Task[None]] = {}

    async def node_task(name: str) -> None:
        await asyncio.gather(*(tasks[u] for u in nodes[name].upstream))
        cells[name] = await runs[name].run()
        failed = [c for c in cells[name] if c.status in FAILED]
        if failed and nodes[name].on_error == "fail":
            raise RewardFailureError(
                f"reward node {name!r} failed on {len(failed)} of {len(cells[name])} samples and has "
                f"on_error='fail'; first error: {failed[0].error}. Fix the node, or set on_error to "
                "'mask' or 'default'"
            )

    for name in order:  # topological: upstream tasks exist before their dependants
        tasks[name] = asyncio.ensure_future(node_task(name))
    try:
        await asyncio.gather(*tasks.values())
    finally:
        for t in tasks.values():
            t.cancel()
    stats = {name: run.stats for name, run in runs.items()}
    return StepOutput(cells, stats, time.perf_counter() - start)
