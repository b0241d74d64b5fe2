"""The plain reward-function interface (the reward DAG's basic node type).

A reward function is a Python callable, sync or async, in one of three calling modes:

- ``"batch"`` (the plain interface): ``fn(samples: list[RewardSample], **inputs) -> list[float | None]``;
  ``inputs[dep]`` is the list of dependency values aligned with ``samples``.
- ``"sample"``: ``fn(sample: RewardSample, **inputs) -> float | None``; ``inputs[dep]`` is one value.
- ``"group"``: like ``"batch"`` but called once per prompt with that prompt's n samples
  (pairwise / rank rewards).

In a graph, batch and group functions receive only the samples that passed the node's gates and
whose inputs did not fail; identical samples in a batch are sent once.

``None`` means "not applicable" (no signal), never 0. A function declares its mode with the
decorators below (or a ``reward_mode`` attribute on a callable object); undecorated functions are
``"sample"``. Built-ins in :mod:`posttrain.rewards.builtins` are ``"batch"``.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from posttrain.types import RewardSample

Mode = Literal["sample", "batch", "group"]
MODES: tuple[Mode, ...] = ("sample", "batch", "group")
F = TypeVar("F", bound=Callable[..., Any])


def _mark(mode: Mode) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        fn.reward_mode = mode  # type: ignore[attr-defined]
        return fn

    return decorate


batch_reward = _mark("batch")
"""Decorator: ``fn(samples, **inputs) -> list[value]`` over a batch of samples."""
sample_reward = _mark("sample")
"""Decorator: ``fn(sample, **inputs) -> value`` for one sample (the default for plain functions)."""
group_reward = _mark("group")
"""Decorator: ``fn(group_samples, **inputs) -> list[value]``, called once per prompt group."""


def reward_mode_of(fn: Callable[..., Any]) -> Mode:
    """The calling mode a callable declares (``reward_mode`` attribute), ``"sample"`` if none."""
    mode = getattr(fn, "reward_mode", "sample")
    if mode not in MODES:
        raise ValueError(f"{fn!r} declares reward_mode={mode!r}; use one of {MODES}")
    return mode


def is_async_callable(fn: Callable[..., Any]) -> bool:
    """True for ``async def`` functions and objects whose ``__call__`` is ``async def``."""
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - we want the bound method, not callable()
    return call is not None and inspect.iscoroutinefunction(call)


async def call_reward_fn(fn: Callable[..., Any], samples: list[RewardSample], **kwargs: Any) -> list[Any]:
    """Score ``samples`` with a reward function of any mode, sync or async (no DAG, no timeouts).

    Returns one value per sample. Use this to call a plain reward function directly; the reward
    graph adds timeouts, gates, error policies and caching on top.
    """
    mode = reward_mode_of(fn)

    async def invoke(arg: Any) -> Any:
        if is_async_callable(fn):
            return await fn(arg, **kwargs)
        return fn(arg, **kwargs)

    if mode == "sample":
        return list(await asyncio.gather(*(invoke(s) for s in samples)))
    values = await invoke(samples)
    if not isinstance(values, list | tuple) or len(values) != len(samples):
        raise TypeError(
            f"{getattr(fn, '__name__', fn)!r} is a {mode}-mode reward function and must return a list "
            f"with one value per sample ({len(samples)}), got {type(values).__name__}"
        )
    return list(values)
