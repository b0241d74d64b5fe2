"""The pipelined loop's rollout side for multi-turn rollouts (``rollout.agent.env`` with
``max_staleness > 0``): trajectories of the next steps are generated while the trainer trains.

:class:`AgentRolloutLoop` is a drop-in for :class:`~posttrain.rl.loops.pipelined.RolloutLoop` in
:func:`~posttrain.rl.loops.pipelined.run_pipelined` (the trainer side, the buffer and the staleness
gate are the same). It runs one asyncio event loop in its own thread:

* a step's trajectories start once the gate opens (``StalenessBound.first_version``), as a task
  of their own; steps in flight share one :class:`~posttrain.rl.agent.TurnDispatcher`, so the
  turns of step t+1 join the worker batches of step t's late turns;
* weight updates queue on the worker actors between turn batches, so a trajectory may span
  versions: each policy token records the version that sampled it, and the contract (and the
  drop policy) reads the oldest one, as for chunked single-turn rollouts;
* a finished step's groups go into the buffer; its agent metrics are handed to the scorer when
  the trainer takes that step (:meth:`before_step`), so each step reports its own trajectories.

Turns are the natural chunks of a trajectory: ``rollout.chunk_tokens`` and the request deadline
(``rollout.request_timeout_s``) stay single-turn features; a turn batch whose worker dies or misses
``cluster.call_timeout_s`` is re-run on the replacement with the same content-derived seeds.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from posttrain.rl.fleet import WorkerFleet
from posttrain.rl.loops.pipelined import LoopControls
from posttrain.rl.publisher import WeightPublisher
from posttrain.rollout.buffer import RolloutBuffer, StalenessBound
from posttrain.types import PromptRecord


class AgentRolloutLoop(LoopControls):
    """Multi-turn rollouts ahead of training, within the staleness gate (see the module docstring)."""

    def __init__(
        self, agent: Any, fleet: WorkerFleet, publisher: WeightPublisher, sampling: Any,
        next_prompts: Callable[[], list[PromptRecord]], buffer: RolloutBuffer, gate: StalenessBound, *,
        max_steps: int, start_step: int = 0,
    ) -> None:  # fmt: skip
        super().__init__(name="posttrain-agent-rollout-loop", daemon=True)
        self.agent, self.fleet, self.sampling = agent, fleet, sampling
        self.next_prompts, self.buffer, self.gate, self.max_steps = next_prompts, buffer, gate, max_steps
        self.version, self.launched = publisher.version, start_step
        self.queued: list[tuple[int, list[PromptRecord]]] = []  # regenerations, ahead of new steps
        self.counters: dict[int, dict[str, float]] = {}  # step -> its trajectories' agent metrics
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self.idle_s = 0.0
        self.requeued = 0  # turn batches are re-run inside the dispatcher (fleet.replaced counts them)

    # -- called by the trainer loop (and LoopControls' verbs) -----------------------------------
    def regenerate(self, step: int, prompts: list[PromptRecord]) -> None:
        with self._lock:
            self.queued.append((step, prompts))

    def before_step(self, step: int) -> None:
        """Step ``step``'s groups were taken: its trajectories' metrics go to the scorer."""
        with self._lock:
            self.agent.counters = self.counters.pop(step, defaultdict(float))

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as err:  # the trainer loop re-raises it from RolloutBuffer.take
            self.buffer.fail(err)

    def _due(self) -> list[tuple[int, list[PromptRecord]]]:
        with self._lock:
            work, self.queued = self.queued, []
            while self.launched < self.max_steps and self.gate.first_version(self.launched + 1) <= self.version:
                self.launched += 1
                work.append((self.launched, self.next_prompts()))
        return work

    async def _main(self) -> None:
        dispatcher = self.agent.dispatcher(self.sampling)
        tasks: set[asyncio.Task] = set()
        last = time.perf_counter()
        while not self._halt.is_set():
            for step, prompts in self._due():
                tasks.add(asyncio.get_running_loop().create_task(self._rollout(step, prompts, dispatcher)))
            for task in [t for t in tasks if t.done()]:
                tasks.discard(task)
                task.result()  # a failure ends the loop (and the run, through the buffer)
            await asyncio.sleep(0.02)
            now = time.perf_counter()
            with self._lock:
                self.idle_s += (now - last) * len(set(self.fleet.usable()) - dispatcher.busy)
            last = now
        for task in tasks:
            task.cancel()

    async def _rollout(self, step: int, prompts: list[PromptRecord], dispatcher: Any) -> None:
        groups, counters = await self.agent.rollout(prompts, self.sampling, self.fleet.usable(), dispatcher)
        with self._lock:
            mine = self.counters.setdefault(step, defaultdict(float))
            for k, v in counters.items():
                mine[k] += v
        self.buffer.add(step, groups)
