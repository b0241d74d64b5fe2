"""Run a CPU-heavy (or possibly hanging) reward function in a pool of Ray actors.

Threads share the GIL, so a pure-Python function that burns CPU gains nothing from the graph's
thread pool; and Python cannot stop a hung thread. ``RayFunctionReward`` wraps any reward
function (a callable or its import path, any mode) and splits each call across ``num_actors``
Ray actors: real parallelism, and a node timeout kills the actors (hung work included) so the
next step starts fresh ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from posttrain.rewards.fn import is_async_callable, reward_mode_of
from posttrain.rewards.loading import import_object

from posttrain.types import RewardSample


class FunctionWorker:
    """What each actor holds: the function, called over a chunk of samples."""

    def __init__(self, fn: str | Callable[..., Any], kwargs: dict[str, Any]) -> None:
        self.fn = import_object(fn) if isinstance(fn, str) else fn
        self.kwargs = kwargs

    def score(self, samples: list[RewardSample], inputs: dict[str, list[Any]]) -> list[Any]:
        """``inputs[dep][i]`` is sample i's value of dependency ``dep``."""
        mode = reward_mode_of(self.fn)

        def call(arg: Any, extra: dict[str, Any]) -> Any:
            out = self.fn(arg, **extra, **self.kwargs)
            return asyncio.run(out) if is_async_callable(self.fn) else out

        if mode == "sample":
            return [call(s, {d: v[i] for d, v in inputs.items()}) for i, s in enumerate(samples)]
        return list(call(samples, inputs))


class RayFunctionReward:
    """Reward node that runs ``fn`` in ``num_actors`` Ray actors (started on first use).

    Its mode follows ``fn``: a group function gets one actor call per group; sample and batch
    functions have each step's batch split evenly across the actors.
    """

    def __init__(
        self,
        fn: str | Callable[..., Any],
        kwargs: dict[str, Any] | None = None,
        num_actors: int = 2,
        num_cpus: float = 1.0,
    ) -> None:
        target = import_object(fn) if isinstance(fn, str) else fn
        self.reward_mode = "group" if reward_mode_of(target) == "group" else "batch"
        self.fn, self.kwargs = fn, dict(kwargs or {})
        self.num_actors, self.num_cpus = num_actors, num_cpus
        self._actors: list[Any] = []
        self._next = 0

    def _pool(self) -> list[Any]:
        import ray

        if not self._actors:
            if not ray.is_initialized():
                ray.init(include_dashboard=False)
            actor_cls = ray.remote(num_cpus=self.num_cpus)(FunctionWorker)
            self._actors = [actor_cls.remote(self.fn, self.kwargs) for _ in range(self.num_actors)]
        return self._actors

    async def __call__(self, samples: list[RewardSample], **inputs: list[Any]) -> list[Any]:
        if not samples:
            return []
        actors = self._pool()
        if self.reward_mode == "group":  # round-robin whole groups over the actors
            self._next = (self._next + 1) % len(actors)
            chunks = [(actors[self._next], 0, len(samples))]
        else:
            size = -(-len(samples) // len(actors))
            chunks = [
                (a, lo, min(lo + size, len(samples)))
                for a, lo in zip(actors, range(0, len(samples), size), strict=False)
            ]
        refs = [
            a.score.remote(samples[lo:hi], {d: v[lo:hi] for d, v in inputs.items()}) for a, lo, hi in chunks
        ]
        try:
            parts = await asyncio.gather(*refs)
        except asyncio.CancelledError:  # the node timed out: the actors may be stuck, replace them
            self.close()
            raise
        return [value for part in parts for value in part]

    def close(self) -> None:
        """Kill the actors (new ones start on the next call)."""
        import ray

        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
