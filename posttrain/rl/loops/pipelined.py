"""The pipelined loop: rollout workers generate while the trainer trains, within the staleness bound.

Two loops share a :class:`~posttrain.rollout.buffer.RolloutBuffer`:

* the rollout loop (:class:`RolloutLoop`, a thread) consumes the prompt stream, waits for the
  version gate of each step (``StalenessBound.first_version``; ``pace``) and for idle workers, and
  unblocks the trainer by adding whole groups to the buffer;
* the trainer loop (:func:`run_pipelined`, the main thread) consumes step ``t``'s groups, waits
  only when they are not finished (trainer idle time), runs the step (train, publish), and
  unblocks the rollout loop by announcing version ``t`` (``RolloutLoop.advance``).

In-flight updates are at chunk granularity (``rollout.chunk_tokens``): a request generates at most
that many tokens; an unfinished completion continues as a new request (prompt + its tokens so far)
on whatever version the worker serves by then, each token recording its version. Weight updates
queue on the worker actor behind the chunk it is running, so they land between chunks. True
mid-decode pausing of vLLM is not used.

A request that runs longer than the request deadline is re-queued on another worker and its
worker set aside (:class:`~posttrain.rl.fleet.WorkerFleet`); once the worker answers, the weight
publisher re-syncs it and it rejoins (``WeightPublisher.readmit``).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from posttrain.config.errors import PosttrainError
from posttrain.rl.fleet import WorkerFleet
from posttrain.rl.loops import LoopParts
from posttrain.rl.publisher import WeightPublisher
from posttrain.rollout.buffer import RolloutBuffer, StalenessBound
from posttrain.types import Completion, Group, PromptRecord


class RolloutStarved(PosttrainError):
    """Work is waiting but every rollout worker has been set aside for too long."""


@dataclass
class _Sample:
    """One completion being generated, possibly over several chunks and versions."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "abort"
    chunks: int = 0


@dataclass
class _StepState:
    prompts: list[PromptRecord]
    samples: dict[tuple[int, int], _Sample]  # (ordinal, sample index) -> sample
    unfinished: int


@dataclass
class _Job:
    """One request to one worker: first chunks of some prompts, or continuations of some samples."""

    id: int
    step: int
    prompts: list[PromptRecord]  # first chunk: the step's prompts; continuation: prompt + tokens so far
    keys: list[tuple[int, int]] | None  # continuation: (ordinal, sample index) of each prompt
    sampling: Any
    shard: int = 0  # preferred worker (first chunks keep the synchronous sharding)


class LoopControls(threading.Thread):
    """What the trainer loop calls on a rollout loop thread (single- or multi-turn). Subclasses
    set ``_lock``, ``_halt`` (an Event), ``version`` and ``idle_s``."""

    _lock: Any
    _halt: threading.Event
    version: int
    idle_s: float

    def advance(self, version: int) -> None:
        """The workers now serve ``version``: steps whose gate it opens may start."""
        with self._lock:
            self.version = version

    def stop(self) -> None:
        self._halt.set()

    def before_step(self, step: int) -> None:
        """Step ``step``'s groups were taken (single-turn rollouts hand nothing else over)."""

    def take_idle(self) -> float:
        """Worker-seconds without a request in flight since the last call."""
        with self._lock:
            idle, self.idle_s = self.idle_s, 0.0
        return idle


class RolloutLoop(LoopControls):
    """The rollout loop: consumes prompts, waits for the version gate and idle workers, fills the buffer."""

    def __init__(
        self, fleet: WorkerFleet, publisher: WeightPublisher, sampling: Any, next_prompts: Callable[[], list[PromptRecord]],
        buffer: RolloutBuffer, gate: StalenessBound, decode: Callable[[list[int]], str], *,
        chunk_tokens: int | None, max_steps: int, start_step: int = 0,
    ) -> None:  # fmt: skip
        super().__init__(name="posttrain-rollout-loop", daemon=True)
        self.fleet, self.publisher, self.sampling = fleet, publisher, sampling
        self.next_prompts, self.buffer, self.gate, self.decode = next_prompts, buffer, gate, decode
        self.max_steps, self.chunk = max_steps, chunk_tokens
        self.timeout = fleet.deadlines.request_s  # every request has a deadline
        self.version, self.launched = publisher.version, start_step  # a resumed run starts past step 0
        self.steps: dict[int, _StepState] = {}
        self.jobs: list[_Job] = []  # waiting for a worker
        self.inflight: dict[Any, tuple[int, _Job, float]] = {}  # ref -> (worker, job, start)
        self._ids = itertools.count()
        self._lock = threading.RLock()  # guards version, jobs, steps (the trainer loop adds regenerations)
        self._halt = threading.Event()
        self.idle_s = 0.0  # worker-seconds with no request in flight (usable workers)
        self.requeued = 0
        self._starved_since: float | None = None

    # -- called by the trainer loop (and LoopControls' verbs) -----------------------------------
    def regenerate(self, step: int, prompts: list[PromptRecord]) -> None:
        """Generate ``prompts`` again for ``step`` now (drop policy), ahead of everything else."""
        with self._lock:
            self._launch(step, prompts)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            last = time.perf_counter()
            while not self._halt.is_set():
                with self._lock:
                    while (
                        self.launched < self.max_steps
                        and self.gate.first_version(self.launched + 1) <= self.version
                    ):
                        self.launched += 1
                        self._launch(self.launched, self.next_prompts())
                    self._dispatch()
                self._collect()
                self.publisher.readmit()
                self._check_starved()
                now = time.perf_counter()
                busy = {w for w, _, _ in self.inflight.values()}
                with self._lock:
                    self.idle_s += (now - last) * len(set(self.fleet.usable()) - busy)
                last = now
        except BaseException as err:  # the trainer loop re-raises it from RolloutBuffer.take
            self.buffer.fail(err)

    def _check_starved(self) -> None:
        """Work is waiting but every worker has been set aside for too long: stop with a clear error."""
        if not self.jobs or self.fleet.usable():
            self._starved_since = None
            return
        self._starved_since = self._starved_since or time.perf_counter()
        if time.perf_counter() - self._starved_since > 5 * (self.timeout or 0):
            raise RolloutStarved(
                f"every rollout worker has been unresponsive for over {5 * self.timeout:.0f} s (5 x the request deadline: "
                "rollout.request_timeout_s, else cluster.call_timeout_s).\n  "
                "fix: check the workers' logs (a hung engine, out of memory), raise rollout.request_timeout_s, or add "
                "rollout.num_workers so one slow worker can be routed around"
            )

    def _launch(self, step: int, prompts: list[PromptRecord]) -> None:
        n = self.sampling.n
        samples = {(p.ordinal, i): _Sample() for p in prompts for i in range(n)}
        state = self.steps.setdefault(step, _StepState([], {}, 0))
        state.prompts += prompts
        state.samples.update(samples)
        state.unfinished += len(samples)
        sampling = self._chunked(self.sampling, self.sampling.max_tokens)
        shards = len(self.fleet)
        for i in range(shards):
            if prompts[i::shards]:
                self.jobs.append(_Job(next(self._ids), step, prompts[i::shards], None, sampling, shard=i))

    def _chunked(self, sampling: Any, remaining: int) -> Any:
        return (
            sampling
            if self.chunk is None
            else dataclasses.replace(sampling, max_tokens=min(self.chunk, remaining))
        )

    def _dispatch(self) -> None:
        busy = {w for w, _, _ in self.inflight.values()}
        for job in sorted(self.jobs, key=lambda j: (j.step, j.id)):  # oldest step first
            idle = [w for w in self.fleet.usable() if w not in busy]
            if not idle:
                return
            worker = job.shard if job.shard in idle else idle[0]
            ref = self.fleet.submit(worker, job.prompts, job.sampling)
            self.inflight[ref] = (worker, job, time.perf_counter())
            self.jobs.remove(job)
            busy.add(worker)

    def _collect(self) -> None:
        import ray

        if not self.inflight:
            time.sleep(0.02)
            return
        ready, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0.05)
        for ref in ready:
            worker, job, _ = self.inflight.pop(ref)
            try:
                groups = ray.get(ref)
            except ray.exceptions.RayActorError as err:  # the worker died: replace it, re-dispatch its request
                self.publisher.replace(worker, err)
                with self._lock:
                    self.jobs.append(dataclasses.replace(job, id=next(self._ids), shard=-1))
                    self.requeued += 1
                continue
            self._absorb(job, groups)
        now = time.perf_counter()
        for ref, (worker, job, start) in list(self.inflight.items()):
            if self.timeout is not None and now - start > self.timeout:
                self.fleet.set_aside(
                    worker, ref, f"a rollout request ran over its deadline of {self.timeout:g} s (rollout.request_timeout_s, else cluster.call_timeout_s)"
                )
                del self.inflight[ref]
                with self._lock:
                    self.jobs.append(dataclasses.replace(job, id=next(self._ids), shard=-1))
                    self.requeued += 1

    def _absorb(self, job: _Job, groups: list[Group]) -> None:
        """Append a request's tokens to its samples; queue continuations; hand finished steps over."""
        with self._lock:
            self._absorb_locked(job, groups)

    def _absorb_locked(self, job: _Job, groups: list[Group]) -> None:
        state = self.steps[job.step]
        budget = self.sampling.max_tokens
        pending: dict[int, list[tuple[PromptRecord, tuple[int, int]]]] = {}
        results = (
            [((g.prompt.ordinal, c.sample_index), c) for g in groups for c in g.completions]
            if job.keys is None
            else [(key, g.completions[0]) for key, g in zip(job.keys, groups, strict=True)]
        )
        for key, c in results:
            s = state.samples[key]
            s.token_ids += c.token_ids
            s.logprobs += c.logprobs
            s.versions += c.versions
            s.text, s.finish_reason, s.chunks = c.text, c.finish_reason, s.chunks + 1
            if self.chunk is not None and c.finish_reason == "length" and len(s.token_ids) < budget:
                prompt = next(p for p in state.prompts if p.ordinal == key[0])
                cont = PromptRecord(
                    prompt.ordinal, prompt.text, prompt.token_ids + s.token_ids, prompt.fields
                )
                pending.setdefault(budget - len(s.token_ids), []).append((cont, key))
            else:
                state.unfinished -= 1
        for remaining, items in pending.items():
            sampling = self._chunked(dataclasses.replace(self.sampling, n=1), remaining)
            self.jobs.append(
                _Job(
                    next(self._ids),
                    job.step,
                    [p for p, _ in items],
                    [k for _, k in items],
                    sampling,
                    shard=-1,
                )
            )
        if state.unfinished == 0:
            self.buffer.add(job.step, [self._group(p, state) for p in state.prompts])
            del self.steps[job.step]

    def _group(self, prompt: PromptRecord, state: _StepState) -> Group:
        completions = []
        for i in range(self.sampling.n):
            s = state.samples[(prompt.ordinal, i)]
            # one chunk: the engine's text; several: decode the whole completion (chunk texts may split a character)
            text = s.text if s.chunks <= 1 else self.decode(s.token_ids)
            completions.append(
                Completion(prompt, i, s.token_ids, text, s.logprobs, s.versions, s.finish_reason)
            )
        return Group(prompt, completions)


def admit(
    loop: RolloutLoop, buffer: RolloutBuffer, step: int, bound: StalenessBound, policy: str, expected: int, group_size: int
) -> tuple[list[Group], dict[str, float]]:
    """Step ``step``'s groups within the bound: pace asserts it, drop regenerates what is beyond it."""
    admitted, waited, dropped = [], 0.0, 0
    while len(admitted) < expected:
        groups, w = buffer.take(step, expected - len(admitted))
        waited += w
        stale = [g for g in groups if not bound.admits(step, bound.group_v_min(g))]
        if stale and policy == "pace":
            raise RuntimeError(
                f"step {step}: a group of version {bound.group_v_min(stale[0])} exceeds max_staleness (pacing bug)"
            )
        admitted += [g for g in groups if all(g is not x for x in stale)]
        if stale:
            dropped += len(stale)
            loop.regenerate(step, [g.prompt for g in stale])
    admitted.sort(key=lambda g: g.prompt.ordinal)  # prompt order, as the synchronous loop
    metrics = {f"staleness/count_{s}": float(n) for s, n in sorted(bound.histogram(step, admitted).items())}
    metrics.update({"staleness/dropped_groups": float(dropped), "staleness/dropped_samples": float(dropped * group_size)})
    return admitted, {**metrics, "async/trainer_wait_s": waited}


def _refill(loop: RolloutLoop, buffer: RolloutBuffer, parts: LoopParts, step: int) -> Callable[[int], list[Group]]:
    """More groups for ``step`` from new prompts, generated now (dynamic sampling, k = 0 only)."""

    def refill(count: int) -> list[Group]:
        loop.regenerate(step, parts.refill_prompts(count))
        got: list[Group] = []
        while len(got) < count:
            got += buffer.take(step, count - len(got))[0]
        return sorted(got, key=lambda g: g.prompt.ordinal)

    return refill


def run_pipelined(
    parts: LoopParts, fleet: WorkerFleet, publisher: WeightPublisher, sampling: Any, decode: Callable[[list[int]], str], *,
    max_staleness: int, policy: str, prompts_per_step: int, chunk_tokens: int | None, start_step: int, max_steps: int,
    agent: Any = None,
) -> None:  # fmt: skip
    """The trainer loop: consumes step t's groups, runs the step, and announces version t.

    Starts after ``start_step`` (a resumed run). Rollouts generated ahead of a failed step are
    dropped with the loop. ``agent`` (posttrain.rl.agent.AgentRollouts): multi-turn rollouts
    (:class:`~posttrain.rl.loops.agent_pipelined.AgentRolloutLoop`) instead of single completions."""
    buffer = RolloutBuffer()
    # drop: one batch further ahead than the bound allows; what is too stale is dropped later
    gate = StalenessBound(max_staleness + (1 if policy == "drop" else 0))
    if agent is not None:
        from posttrain.rl.loops.agent_pipelined import AgentRolloutLoop

        loop: Any = AgentRolloutLoop(agent, fleet, publisher, sampling, parts.next_prompts, buffer, gate,
                                     max_steps=max_steps, start_step=start_step)  # fmt: skip
    else:
        loop = RolloutLoop(fleet, publisher, sampling, parts.next_prompts, buffer, gate, decode,
                           chunk_tokens=chunk_tokens, max_steps=max_steps, start_step=start_step)  # fmt: skip
    loop.start()
    bound = StalenessBound(max_staleness)
    try:
        for step in range(start_step + 1, max_steps + 1):
            groups, admit_m = admit(loop, buffer, step, bound, policy, prompts_per_step, sampling.n)
            loop.before_step(step)
            m = {**parts.step(groups, admit_m["async/trainer_wait_s"], _refill(loop, buffer, parts, step)), **admit_m}
            parts.evaluate(step, m)
            loop.advance(publisher.version)
            idle = loop.take_idle() / max(1, len(fleet))
            m.update({
                "async/trainer_idle_frac": admit_m["async/trainer_wait_s"] / max(1e-9, m["time/step_s"]),
                "async/rollout_idle_s": idle,
                "async/rollout_idle_frac": idle / max(1e-9, m["time/step_s"]),
                "async/requeued_requests": float(loop.requeued),
                "async/workers_set_aside": float(fleet.set_aside_count),
            })  # fmt: skip
            parts.record(step, m)
    finally:
        loop.stop()
        loop.join(timeout=30)
