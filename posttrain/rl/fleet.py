"""The rollout workers of a run: which take requests, how every call to them waits, wake and sleep.

The fleet is the same object in both loops. Every worker is usable unless it was *set aside*:
with ``rollout.request_timeout_s`` set, a worker that does not answer a call in time is set aside
(its requests go to the others) until it has answered everything it owed; the weight publisher
then catches it up and it rejoins (``WeightPublisher.readmit``). Without ``request_timeout_s``,
nothing is set aside: a call that runs past ``cluster.call_timeout_s`` raises, naming the worker
and where it is.

Colocated placement (``cluster.placement: colocated``) shares devices with the trainer: the
engines run in sleep mode (``rollout.engine.enable_sleep_mode`` left unset turns on), workers
are woken before they generate or load weights and put to sleep after they generate
(:meth:`WorkerFleet.wake`, :meth:`WorkerFleet.sleep`, the only place that does either). Before
the engines wake to generate, ``before_generate`` runs (the trainers' offload, with
``trainer.offload``); a weight load wakes them with the trainer still on its devices (both hold
the weights while they travel).

A worker whose process died is replaced in its bundle by :meth:`WorkerFleet.respawn` (no
weights: the publisher loads the newest into it), whatever it was doing: generating, loading
weights, being probed, woken or put to sleep (``call`` replaces it through ``on_lost`` and runs
the verb again on the replacement). Past ``rollout.max_worker_restarts`` the run stops with
:class:`RolloutWorkerLost`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from posttrain.config.errors import PosttrainError
from posttrain.diagnose import ActorLost, CallTimeout, wait_calls
from posttrain.rl.config import Deadlines
from posttrain.rl.placement import Plan, actor_options
from posttrain.types import Group, PromptRecord


class RolloutWorkerLost(PosttrainError):
    """Rollout workers kept dying: more replacements than ``rollout.max_worker_restarts``."""


def batch_seed(run_seed: int, prompts: list[PromptRecord]) -> int:
    """The sampler seed of one generate request: a function of the run seed and the request's
    content (ordinals and token ids, tokens so far included), so the request samples the same
    tokens whenever and wherever it runs: re-dispatched after a worker died, or in a resumed run."""
    key = json.dumps([run_seed, [(p.ordinal, list(p.token_ids)) for p in prompts]])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") & 0x7FFFFFFF


OnLost = Callable[[int, Exception], None]
_LOADS = ("update_weights", "receive_weights")  # verbs a replacement need not run again  # replace worker i (it died or timed out), then retry


class WorkerFleet:
    """Rollout worker actors in their placement bundles; thread-safe (both async loops use it)."""

    def __init__(
        self, worker_cls: Any, engine_cfg: Any, pg: Any, plan: Plan, deadlines: Deadlines, *,
        colocated: bool, max_restarts: int, run_seed: int,
    ) -> None:  # fmt: skip
        if colocated and getattr(engine_cfg, "enable_sleep_mode", False) is None:  # unset: colocated sleeps
            engine_cfg = dataclasses.replace(engine_cfg, enable_sleep_mode=True)
        self.worker_cls, self.engine_cfg, self.pg, self.plan = worker_cls, engine_cfg, pg, plan
        self.deadlines, self.colocated, self.max_restarts, self.run_seed = deadlines, colocated, max_restarts, run_seed
        self._lock = threading.RLock()
        self._aside: dict[int, list] = {}  # worker index -> refs it still owes
        self.set_aside_count = 0
        self.replaced = 0
        # Replaces a worker that died during a call (set by the weight publisher, which loads it);
        # returns False when the replacement is held out of service until the next publish.
        self.on_lost: Callable[[int, Exception], bool | None] | None = None
        # Colocated: what leaves the devices before the engines wake to generate (the trainers'
        # offload; set by the weight publisher, which holds both).
        self.before_generate: Callable[[], Any] | None = None
        self.sleep_level = 1
        self.workers = [self._spawn(b) for b in plan.rollout_bundle]
        health = {f"rollout worker {i}": (w, w.health.remote()) for i, w in enumerate(self.workers)}
        wait_calls(health, "start", deadlines.startup_s)

    def __len__(self) -> int:
        return len(self.workers)

    def _spawn(self, bundle: int) -> Any:
        return self.worker_cls.options(**actor_options(self.pg, bundle, self.plan.rollout_resources, self.plan.threads.generate)).remote(self.engine_cfg)

    # -- who takes requests ------------------------------------------------------------------
    def usable(self) -> list[int]:
        with self._lock:
            return [i for i in range(len(self.workers)) if i not in self._aside]

    def set_aside(self, index: int, ref: Any, reason: str) -> None:
        with self._lock:
            if index not in self._aside:
                self.set_aside_count += 1
                print(f"[posttrain] rollout worker {index} set aside: {reason}; its requests go to other workers", flush=True)
            self._aside.setdefault(index, []).append(ref)

    def hold(self, index: int, reason: str) -> None:
        """Set a worker aside that owes nothing (e.g. a replacement waiting for weights): it is
        settled at once, and rejoins when the publisher has loaded the newest weights into it."""
        with self._lock:
            print(f"[posttrain] rollout worker {index} held out of service: {reason}", flush=True)
            self._aside[index] = []

    def settled(self) -> list[int]:
        """Set-aside workers that have answered everything they owed (ready to be caught up)."""
        import ray

        with self._lock:
            return [i for i, refs in self._aside.items() if not ray.wait(refs, num_returns=len(refs), timeout=0)[1]]

    def rejoin(self, index: int) -> None:
        with self._lock:
            self._aside.pop(index, None)

    def rejoin_all(self) -> None:
        with self._lock:
            self._aside.clear()

    # -- calls -------------------------------------------------------------------------------
    def call(self, indices: list[int], verb: str, *args: Any, what: str) -> dict[int, Any]:
        """``verb(*args)`` on these workers at once; their results by index.

        With ``rollout.request_timeout_s``, a worker that does not answer in time is set aside and
        left out of the result; without it, :class:`~posttrain.diagnose.CallTimeout` (after
        ``cluster.call_timeout_s``) is raised. A worker that dies meanwhile is replaced through
        ``on_lost`` (the publisher loads the newest weights into the replacement) and the verb
        runs again on the replacement (not a weight update: the replacement has them); without ``on_lost``,
        :class:`~posttrain.diagnose.ActorLost` is raised.
        """
        import ray

        refs = {i: getattr(self.workers[i], verb).remote(*args) for i in indices}
        out: dict[int, Any] = {}
        if self.deadlines.aside_s is None:
            deadline = None if self.deadlines.call_s is None else time.monotonic() + self.deadlines.call_s
            for i, ref in refs.items():
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    out[i] = wait_calls({f"rollout worker {i}": (self.workers[i], ref)}, what, left)[f"rollout worker {i}"]
                except ActorLost as err:
                    self._lost(i, err, verb, args, what, out)
            return out
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.deadlines.aside_s)
        for i, ref in refs.items():
            if ref not in ready:
                self.set_aside(i, ref, f"{what} took over rollout.request_timeout_s={self.deadlines.aside_s}")
                continue
            try:
                out[i] = ray.get(ref)
            except ray.exceptions.RayActorError as cause:
                self._lost(i, ActorLost(f"rollout worker {i}", what, cause), verb, args, what, out)
        return out

    def _lost(self, i: int, err: ActorLost, verb: str, args: tuple, what: str, out: dict[int, Any]) -> None:
        """Worker ``i`` died during ``verb``: replace it; run the verb on the replacement if asked."""
        if self.on_lost is None:
            raise err
        if self.on_lost(i, err) is False:  # held out of service until the next publish
            return
        if verb in _LOADS:  # the replacement was loaded with the newest weights already
            out[i] = None
            return
        worker, name = self.workers[i], f"rollout worker {i} (replacement)"
        out[i] = wait_calls({name: (worker, getattr(worker, verb).remote(*args))}, what, self.deadlines.call_s)[name]

    def wake(self, indices: list[int], *, generate: bool = False, tags: tuple[str, ...] | None = None) -> None:
        """Colocated: the workers take the devices back. ``tags``: only what vLLM's sleep tags name
        (``("weights",)`` before a weight load, while the trainer still holds its memory); None:
        everything, after ``before_generate`` (the trainers' offload, which empties the CUDA
        cache) when ``generate``. Disaggregated: nothing to do."""
        if self.colocated:
            if generate and self.before_generate is not None:
                self.before_generate()
            if tags is None:
                self.call(indices, "wake_up", what="wake up")
            else:
                self.call(indices, "wake_up", list(tags), what="wake up")

    def sleep(self, indices: list[int]) -> None:
        """Colocated: free device memory for the trainer's step (after generate), at
        ``sleep_level``: 1 keeps the weights in host memory, 2 drops them (set by the publisher
        once every later wake is followed by a weight sync)."""
        if self.colocated:
            self.call(indices, "sleep", self.sleep_level, what="sleep")

    # -- generation --------------------------------------------------------------------------
    def seeded(self, sampling: Any, prompts: list[PromptRecord]) -> Any:
        """``sampling`` with the request's ``batch_seed`` (unless per-request seeds are set)."""
        if sampling.seed is not None:
            return sampling
        return dataclasses.replace(sampling, batch_seed=batch_seed(self.run_seed, prompts))

    def submit(self, index: int, prompts: list[PromptRecord], sampling: Any) -> Any:
        """One seeded generate request to worker ``index``; its object ref."""
        return self.workers[index].generate.remote(prompts, self.seeded(sampling, prompts))

    def generate(self, prompts: list[PromptRecord], sampling: Any, on_lost: OnLost) -> list[Group]:
        """All prompts on the usable workers, sharded round-robin, blocking; groups in prompt order.

        A worker that dies meanwhile, or does not answer within the request deadline
        (``rollout.request_timeout_s``, else ``cluster.call_timeout_s``), is replaced through
        ``on_lost`` and its shard generated again with the same seed (no prompt lost, none twice).
        """
        usable = self.usable()
        self.wake(usable, generate=True)
        shards = {i: prompts[k :: len(usable)] for k, i in enumerate(usable)}
        refs = {i: self.submit(i, s, sampling) for i, s in shards.items() if s}
        results = []
        for i, ref in refs.items():
            while True:
                name = f"rollout worker {i}"
                try:
                    results.append(wait_calls({name: (self.workers[i], ref)}, "generate", self.deadlines.request_s)[name])
                    break
                except (ActorLost, CallTimeout) as err:
                    on_lost(i, err)
                    ref = self.submit(i, shards[i], sampling)
        self.sleep(usable)  # self.workers: replacements included
        by_ordinal = {g.prompt.ordinal: g for groups in results for g in groups}
        return [by_ordinal[p.ordinal] for p in prompts]

    # -- replacement -------------------------------------------------------------------------
    def respawn(self, index: int, err: Exception) -> Any:
        """Worker ``index`` died: start another in its bundle (no weights yet) and return it; the
        caller loads the newest weights into it (``WeightPublisher.replace``)."""
        import ray

        if self.replaced >= self.max_restarts:
            raise RolloutWorkerLost(
                f"rollout worker {index} died ({type(err).__name__}: {str(err).splitlines()[0][:200]}) after "
                f"{self.replaced} replacements already: limit rollout.max_worker_restarts={self.max_restarts}.\n  fix: check the "
                "workers' logs (out of memory? a crashing engine?), or raise rollout.max_worker_restarts"
            ) from err
        print(f"[posttrain] rollout worker {index} died ({type(err).__name__}); starting a replacement", flush=True)
        with contextlib.suppress(Exception):  # already dead: nothing to stop
            ray.kill(self.workers[index], no_restart=True)
        worker = self._spawn(self.plan.rollout_bundle[index])
        wait_calls({f"rollout worker {index} (replacement)": (worker, worker.health.remote())}, "start", self.deadlines.startup_s)
        return worker

    def install(self, index: int, worker: Any) -> None:
        """Put a started (and loaded) replacement in service."""
        with self._lock:
            self.workers[index] = worker
            self.replaced += 1

    def close(self) -> None:
        import ray

        for w in self.workers:
            with contextlib.suppress(Exception):  # a dead worker has nothing left to close
                ray.get(w.close.remote(), timeout=30)
        for w in self.workers:
            with contextlib.suppress(Exception):
                ray.kill(w)


def start_in_order(start_trainers: Callable[[], Any], start_fleet: Callable[[], Any], colocated: bool) -> tuple[Any, Any]:
    """Start the trainer ranks and the rollout workers; ``(trainers, fleet)``.

    Colocated: the engines start only once every trainer rank reported ready (model loaded), since
    vLLM profiles the device's free memory at start and counts every drop it sees as its own.
    Disaggregated: both load at once, each on its own devices.
    """
    trainers = start_trainers()
    if colocated:
        trainers.ready()
        return trainers, start_fleet()
    fleet = start_fleet()
    trainers.ready()
    return trainers, fleet
