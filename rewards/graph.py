"""The reward graph: validated nodes, one scoring entry point for the controller."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from posttrain.rewards.aggregate import Aggregator, resolve_aggregate
from posttrain.rewards.errors import RewardFailureError, RewardGraphError
from posttrain.rewards.execute import StepInput, run_step
from posttrain.rewards.node import RewardNode
from posttrain.rewards.report import StepReport, failure_summary, summarize
from posttrain.rewards.threads import DaemonThreadPool

from posttrain.types import Group, RewardSample, ScoredGroup

T = TypeVar("T")


def _topological_order(nodes: dict[str, RewardNode]) -> list[str]:
    """Nodes in dependency order; raises RewardGraphError naming a cycle."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done
    path: list[str] = []

    def visit(name: str) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = ([*path[path.index(name) :], name])[::-1]  # shown in data-flow order
            raise RewardGraphError(
                f"reward graph has a cycle: {' -> '.join(cycle)}; remove one of these edges"
            )
        state[name] = 1
        path.append(name)
        for up in nodes[name].upstream:
            visit(up)
        path.pop()
        state[name] = 2
        order.append(name)

    for name in nodes:
        visit(name)
    return order


class RewardGraph:
    """A DAG of reward nodes and the aggregation of their values into one scalar per sample.

    Validated when built: duplicate names, inputs or gates naming undefined nodes, and cycles
    raise RewardGraphError. ``max_failed_fraction``: if more than this fraction of a step's
    samples are masked, scoring raises RewardFailureError naming the failing nodes.
    """

    def __init__(
        self,
        nodes: Sequence[RewardNode],
        aggregate: str | Aggregator = "weighted_sum",
        max_failed_fraction: float = 0.2,
        max_threads: int = 8,
    ) -> None:
        if not nodes:
            raise RewardGraphError("a reward graph needs at least one node")
        self.nodes: dict[str, RewardNode] = {}
        for node in nodes:
            if node.name in self.nodes:
                raise RewardGraphError(f"two reward nodes are named {node.name!r}; node names must be unique")
            self.nodes[node.name] = node
        for node in nodes:
            for kind, refs in (("depends on", node.deps), ("is gated by", node.gate)):
                for ref in refs:
                    if ref == node.name:
                        raise RewardGraphError(f"reward node {ref!r} {kind} itself")
                    if ref not in self.nodes:
                        raise RewardGraphError(
                            f"reward node {node.name!r} {kind} {ref!r}, which is not defined; "
                            f"defined nodes: {', '.join(self.nodes)}"
                        )
        if not 0.0 <= max_failed_fraction <= 1.0:
            raise RewardGraphError(f"max_failed_fraction must be in [0, 1], got {max_failed_fraction}")
        self.order = _topological_order(self.nodes)
        self.aggregate_name, self.aggregate = resolve_aggregate(aggregate)
        self.max_failed_fraction = max_failed_fraction
        self._pool = DaemonThreadPool(max_threads)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def score_samples(
        self,
        samples: list[RewardSample],
        group_sizes: Sequence[int] | None = None,
        n_tokens: Sequence[int | None] | None = None,
    ) -> StepReport:
        """Score samples (``group_sizes`` splits them into prompt groups; default: one group)."""
        sizes = list(group_sizes) if group_sizes is not None else [len(samples)]
        if sum(sizes) != len(samples):
            raise ValueError(f"group_sizes sum to {sum(sizes)} but there are {len(samples)} samples")
        starts = [sum(sizes[:g]) for g in range(len(sizes))]
        step = StepInput(
            samples,
            [range(s, s + k) for s, k in zip(starts, sizes, strict=True)],
            list(n_tokens) if n_tokens is not None else [None] * len(samples),
        )
        for node in self.nodes.values():
            reset = getattr(node.fn, "reset_step_metrics", None)
            if callable(reset):
                reset()
        report = summarize(
            self.nodes, self.aggregate, await run_step(self.nodes, self.order, step, self._pool)
        )
        if samples and report.metrics["reward/masked_fraction"] > self.max_failed_fraction:
            raise RewardFailureError(
                f"{sum(report.masked)} of {len(samples)} samples were masked "
                f"({report.metrics['reward/masked_fraction']:.0%}), above max_failed_fraction="
                f"{self.max_failed_fraction}:\n{failure_summary(self.nodes, report)}\n"
                "Fix the failing node(s), raise their timeout_s, or raise max_failed_fraction."
            )
        return report

    async def score_groups(self, groups: list[Group]) -> tuple[list[ScoredGroup], dict[str, float]]:
        """Score every completion of every group: the controller's one entry point.

        Returns the scored groups (``rewards[i]`` None = masked) and flat metrics
        (``reward/<node>/mean``, ``.../latency_p95_ms``, ``.../errors``, ``reward/masked_fraction``, ...).
        """
        samples = [
            RewardSample(prompt=g.prompt.text, completion=c.text, fields=g.prompt.fields, num_tokens=len(c.token_ids))
            for g in groups
            for c in g.completions
        ]
        n_tokens = [len(c.token_ids) or None for g in groups for c in g.completions]
        report = await self.score_samples(samples, [len(g.completions) for g in groups], n_tokens)
        scored, at = [], 0
        for g in groups:
            span = slice(at, at + len(g.completions))
            at = span.stop
            scored.append(
                ScoredGroup(
                    group=g,
                    rewards=report.rewards[span],
                    breakdown={
                        nm: [None if c.masked else c.scalar for c in report.cells[nm][span]]
                        for nm in self.order
                    },
                    token_rewards=report.token_rewards[span] if report.token_rewards is not None else None,
                )
            )
        return scored, report.metrics

    def score_groups_sync(self, groups: list[Group]) -> tuple[list[ScoredGroup], dict[str, float]]:
        """Blocking :meth:`score_groups` for code without an event loop (one caller thread at a time).

        Runs on an event loop the graph keeps between calls, so clients bound to a loop (the
        judge's HTTP connections) are reused from step to step.
        """
        return self.run_sync(self.score_groups(groups))

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine of this graph to completion on the graph's own event loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()
            raise RuntimeError(
                "a sync RewardGraph method was called inside a running event loop; "
                "use `await graph.score_groups(...)` there"
            )
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        """Close the graph's event loop and every node that has a ``close()`` (actors, sandboxes)."""
        for node in self.nodes.values():
            close = getattr(node.fn, "close", None)
            if callable(close):
                close()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.close()
