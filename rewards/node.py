"""One node of a reward graph: a reward function plus how the graph runs it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from posttrain.rewards.errors import RewardGraphError
from posttrain.rewards.fn import MODES, Mode, is_async_callable, reward_mode_of

OnError = Literal["mask", "default", "fail"]
ON_ERROR: tuple[OnError, ...] = ("mask", "default", "fail")


@dataclass
class RewardNode:
    """A reward function in the graph.

    fn:          sync or async callable (see :mod:`posttrain.rewards.fn` for the calling modes);
                 it receives each name in ``deps`` as a keyword argument holding that node's value(s).
    deps:        nodes whose outputs this node reads.
    gate:        nodes that must *pass* (value not None and > 0) for this node to run on a sample;
                 a gated-off sample gets None ("not applicable") from this node.
    weight:      weight in the aggregation; 0 keeps the node out of it (a pure gate or helper).
    timeout_s:   limit per call (per sample, per batch or per group, by mode). Sync sample-mode
                 calls count it from when they are queued for a thread; other calls from when
                 they start (after waiting for ``max_concurrency``).
    on_error:    what an exception, timeout or NaN/inf does: "mask" the sample (reward None),
                 use ``default``, or "fail" the step with RewardFailureError.
    kwargs:      fixed keyword arguments for ``fn`` (e.g. ``{"tag": "answer"}``).
    mode:        overrides the mode ``fn`` declares ("sample", "batch", "group").
    token_level: ``fn`` returns a per-token list for each sample; the weighted lists go to
                 ``ScoredGroup.token_rewards`` (the breakdown shows their sum) and stay out of
                 the scalar aggregation.
    max_concurrency: calls of this node in flight at once (async, batch and group calls; sync
                 sample-mode calls are bounded by the graph's ``max_threads``).
    """

    name: str
    fn: Callable[..., Any]
    deps: Sequence[str] = ()
    gate: Sequence[str] | str = ()
    weight: float = 1.0
    timeout_s: float = 30.0
    on_error: OnError = "mask"
    default: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    mode: Mode | None = None
    token_level: bool = False
    max_concurrency: int = 64

    def __post_init__(self) -> None:
        self.deps = tuple(self.deps)
        self.gate = (self.gate,) if isinstance(self.gate, str) else tuple(self.gate)
        self.kwargs = dict(self.kwargs)
        where = f"reward node {self.name!r}"
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise RewardGraphError(f"{where}: name must be a Python identifier (it is passed as a keyword)")
        if not callable(self.fn):
            raise RewardGraphError(f"{where}: fn must be callable, got {type(self.fn).__name__}")
        if self.mode is None:
            self.mode = reward_mode_of(self.fn)
        if self.mode not in MODES:
            raise RewardGraphError(f"{where}: mode={self.mode!r}; use one of {MODES}")
        if self.on_error not in ON_ERROR:
            raise RewardGraphError(f"{where}: on_error={self.on_error!r}; use one of {ON_ERROR}")
        if self.on_error == "default" and (self.default is None or not math.isfinite(self.default)):
            raise RewardGraphError(f"{where}: on_error='default' needs a finite `default` value")
        if not (isinstance(self.timeout_s, int | float) and self.timeout_s > 0):
            raise RewardGraphError(f"{where}: timeout_s must be > 0, got {self.timeout_s!r}")
        if not math.isfinite(self.weight):
            raise RewardGraphError(f"{where}: weight must be finite, got {self.weight!r}")
        if self.max_concurrency < 1:
            raise RewardGraphError(f"{where}: max_concurrency must be >= 1")
        clash = set(self.deps) & set(self.kwargs)
        if clash:
            raise RewardGraphError(f"{where}: {sorted(clash)} is both a dependency and a kwarg; rename one")

    @property
    def is_async(self) -> bool:
        """True when ``fn`` is a coroutine function (run on the event loop, not a thread)."""
        return is_async_callable(self.fn)

    @property
    def upstream(self) -> tuple[str, ...]:
        """Nodes that must finish before this one: dependencies and gates."""
        return tuple(dict.fromkeys((*self.deps, *self.gate)))
