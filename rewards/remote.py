"""Run a CPU-heavy (or possibly hanging) reward function in a pool of Ray actors.

Threads share the GIL, so a pure-Python function that burns CPU gains nothing from the graph's
thread pool; and Python cannot stop a hung thread. ``RayFunctionReward`` wraps any reward
function (a callable or its import path, any mode) and splits each call across ``num_actors``
Ray actors: real parallelism, and a node timeout kills the actors (hung work included) so the
next step starts fresh ones. An actor that dies (killed, out of memory) is replaced and the chunk
it held is scored again on the replacement, up to ``max_actor_restarts`` times per node.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from posttrain.rewards.errors import RewardActorError, SampleFailure
from posttrain.rewards.fn import is_async_callable, reward_mode_of
from posttrain.rewards.loading import import_object

from posttrain.types import RewardSample


def describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (Ray's messages run to many lines)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def check_replacement(what: str, exc: Exception, replaced: int, limit: int, n_samples: int) -> None:
    """An actor of a reward node died with ``exc``: raise RewardActorError when it must not be
    replaced (it failed in its constructor, or ``replaced`` already reached ``limit``); otherwise
    print the one line saying it is being replaced."""
    if getattr(exc, "actor_init_failed", False):  # a replacement would fail the same way
        raise RewardActorError(
            f"{what} failed to start ({describe(exc)}).\n  fix: make its constructor work in a Ray "
            "worker (import path, model path, dependencies); its traceback is in the Ray worker logs"
        ) from exc
    if replaced >= limit:
        raise RewardActorError(
            f"{what} died ({describe(exc)}) after {replaced} replacements already: limit "
            f"max_actor_restarts={limit}.\n  fix: check the actor's logs for OOM or a crash "
            "(/tmp/ray/session_latest/logs), give each actor less work or more memory, or raise "
            "max_actor_restarts"
        ) from exc
    print(
        f"[posttrain] {what} died ({type(exc).__name__}); starting a replacement and re-scoring its "
        f"{n_samples} samples",
        flush=True,
    )


class FunctionWorker:
    """What each actor holds: the function, called over a chunk of samples."""

    def __init__(self, fn: str | Callable[..., Any], kwargs: dict[str, Any]) -> None:
        self.fn = import_object(fn) if isinstance(fn, str) else fn
        self.kwargs = kwargs

    def score(self, samples: list[RewardSample], inputs: dict[str, list[Any]]) -> list[Any]:
        """``inputs[dep][i]`` is sample i's value of dependency ``dep``.

        A sample-mode function that raises fails only its own sample (a SampleFailure in its place).
        """
        mode = reward_mode_of(self.fn)

        def call(arg: Any, extra: dict[str, Any]) -> Any:
            out = self.fn(arg, **extra, **self.kwargs)
            return asyncio.run(out) if is_async_callable(self.fn) else out

        if mode != "sample":
            return list(call(samples, inputs))
        out: list[Any] = []
        for i, s in enumerate(samples):
            try:
                out.append(call(s, {d: v[i] for d, v in inputs.items()}))
            except Exception as exc:  # noqa: BLE001 - recorded as this sample's error
                out.append(SampleFailure(f"{type(exc).__name__}: {exc}"))
        return out


class RayFunctionReward:
    """Reward node that runs ``fn`` in ``num_actors`` Ray actors (started on first use).

    Its mode follows ``fn``: a group function gets one actor call per group; sample and batch
    functions have each step's batch split evenly across the actors. An exception raised by
    ``fn`` fails its sample (sample mode) or its chunk (batch and group mode). An actor that dies
    is replaced and its chunk re-scored; ``max_actor_restarts`` bounds the replacements over the
    node's lifetime (``actors_replaced`` counts them), past it the call raises RewardActorError.
    """

    def __init__(
        self,
        fn: str | Callable[..., Any],
        kwargs: dict[str, Any] | None = None,
        num_actors: int = 2,
        num_cpus: float = 1.0,
        max_actor_restarts: int = 3,
    ) -> None:
        target = import_object(fn) if isinstance(fn, str) else fn
        self.reward_mode = "group" if reward_mode_of(target) == "group" else "batch"
        self.fn, self.kwargs = fn, dict(kwargs or {})
        self.num_actors, self.num_cpus = num_actors, num_cpus
        self.max_actor_restarts = max_actor_restarts
        self.actors_replaced = 0
        self._name = fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn))
        self._actors: list[Any] = []
        self._next = 0

    def _start_actor(self) -> Any:
        import ray

        if not ray.is_initialized():
            ray.init(include_dashboard=False)
        return ray.remote(num_cpus=self.num_cpus)(FunctionWorker).remote(self.fn, self.kwargs)

    def _pool(self) -> list[Any]:
        if not self._actors:
            self._actors = [self._start_actor() for _ in range(self.num_actors)]
        return self._actors

    async def _score_chunk(
        self, k: int, samples: list[RewardSample], inputs: dict[str, list[Any]]
    ) -> list[Any]:
        """Score one chunk on actor ``k``; if that actor dies, on its replacement."""
        from ray.exceptions import RayActorError, RayTaskError

        while True:
            actor = self._pool()[k]
            try:
                return await actor.score.remote(samples, inputs)
            except RayTaskError as exc:  # fn raised (checked first: it may wrap a RayActorError)
                return [SampleFailure(describe(exc.cause))] * len(samples)
            except RayActorError as exc:
                if self._actors and self._actors[k] is actor:  # else close() or another chunk replaced it
                    what = f"reward actor {k} of RayFunctionReward({self._name})"
                    check_replacement(what, exc, self.actors_replaced, self.max_actor_restarts, len(samples))
                    self.actors_replaced += 1
                    self._actors[k] = self._start_actor()

    async def __call__(self, samples: list[RewardSample], **inputs: list[Any]) -> list[Any]:
        if not samples:
            return []
        actors = self._pool()
        if self.reward_mode == "group":  # round-robin whole groups over the actors
            self._next = (self._next + 1) % len(actors)
            chunks = [(self._next, 0, len(samples))]
        else:
            size = -(-len(samples) // len(actors))
            chunks = [
                (k, lo, min(lo + size, len(samples))) for k, lo in enumerate(range(0, len(samples), size))
            ]
        tasks = [
            asyncio.ensure_future(
                self._score_chunk(k, samples[lo:hi], {d: v[lo:hi] for d, v in inputs.items()})
            )
            for k, lo, hi in chunks
        ]
        try:
            parts = await asyncio.gather(*tasks)
        except asyncio.CancelledError:  # the node timed out: the actors may be stuck, replace them
            self.close()
            raise
        except Exception:  # an actor past its restarts: stop the other chunks
            for task in tasks:
                task.cancel()
            raise
        return [value for part in parts for value in part]

    def close(self) -> None:
        """Kill the actors (new ones start on the next call)."""
        import ray

        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
