"""From a step's per-node cells to rewards, token rewards and flat metrics."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass

from posttrain.rewards.aggregate import Aggregator
from posttrain.rewards.cells import Cell
from posttrain.rewards.errors import RewardGraphError
from posttrain.rewards.execute import StepOutput
from posttrain.rewards.node import RewardNode


@dataclass
class StepReport:
    """Scored step: ``rewards[i]`` is None when sample i is masked or had no signal at all."""

    rewards: list[float | None]
    masked: list[bool]
    token_rewards: list[list[float]] | None
    cells: dict[str, list[Cell]]
    metrics: dict[str, float]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _node_metrics(name: str, node: RewardNode, cells: list[Cell], out: StepOutput) -> dict[str, float]:
    values = [c.scalar for c in cells if c.scalar is not None and not c.masked]
    lat = out.stats[name].latencies_s
    prefix = f"reward/{name}"
    m = {
        f"{prefix}/errors": float(sum(c.status == "error" for c in cells)),
        f"{prefix}/timeouts": float(sum(c.status == "timeout" for c in cells)),
        f"{prefix}/masked": float(sum(c.masked for c in cells)),
        f"{prefix}/not_applicable": float(sum(c.status == "na" for c in cells)),
        f"{prefix}/gated": float(sum(c.status == "gated" for c in cells)),
        f"{prefix}/calls": float(len(lat)),
        f"{prefix}/cache_hits": float(out.stats[name].cache_hits),
    }
    # per-sample failure counters (SampleFailure.metric): the ones the function declares in
    # ``failure_metrics`` are always present (0 on a clean step), any other one when it occurs
    for reason in getattr(node.fn, "failure_metrics", ()):
        m[f"{prefix}/{reason}"] = 0.0
    for c in cells:
        if c.reason:
            m[f"{prefix}/{c.reason}"] = m.get(f"{prefix}/{c.reason}", 0.0) + 1.0
    if values:  # left out (not NaN) when the node scored nothing this step
        m[f"{prefix}/mean"] = statistics.fmean(values)
    if lat:
        m[f"{prefix}/latency_p50_ms"] = 1e3 * _percentile(lat, 0.50)
        m[f"{prefix}/latency_p95_ms"] = 1e3 * _percentile(lat, 0.95)
    return m


def summarize(nodes: dict[str, RewardNode], aggregate: Aggregator, out: StepOutput) -> StepReport:
    """Aggregate every sample's node values and compute the step's metrics."""
    n = len(next(iter(out.cells.values()))) if out.cells else 0
    scalar = [nm for nm, node in nodes.items() if node.weight != 0 and not node.token_level]
    token = [nm for nm, node in nodes.items() if node.token_level and node.weight != 0]
    weights = {nm: nodes[nm].weight for nm in scalar}
    rewards: list[float | None] = []
    masked = [any(out.cells[nm][i].masked for nm in nodes) for i in range(n)]
    for i in range(n):
        values = {nm: out.cells[nm][i].scalar for nm in scalar}
        try:
            value = None if masked[i] else aggregate(values, weights)
        except Exception as exc:
            raise RewardGraphError(
                f"the aggregate raised {type(exc).__name__}: {exc} on node values {values}"
            ) from exc
        if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
            raise RewardGraphError(
                f"the aggregate returned {value!r} for node values {values}; it must return a finite float or None"
            )
        rewards.append(None if value is None else float(value))
    token_rewards = None
    if token:
        token_rewards = []
        for i in range(n):
            lists = [(nodes[nm].weight, out.cells[nm][i].value) for nm in token]
            lists = [(w, v) for w, v in lists if isinstance(v, list)]
            if masked[i] or not lists:
                token_rewards.append([])
                continue
            width = max(len(v) for _, v in lists)
            token_rewards.append([math.fsum(w * v[t] for w, v in lists if t < len(v)) for t in range(width)])
    scored = [r for r in rewards if r is not None]
    metrics: dict[str, float] = {
        "reward/samples": float(n),
        "reward/masked_fraction": sum(masked) / n if n else 0.0,
        "reward/no_signal_fraction": sum(r is None and not m for r, m in zip(rewards, masked, strict=True))
        / n
        if n
        else 0.0,
        "reward/step_s": out.wall_s,
    }
    if scored:
        metrics["reward/mean"] = statistics.fmean(scored)
        metrics["reward/std"] = statistics.pstdev(scored)
    for nm in nodes:
        metrics.update(_node_metrics(nm, nodes[nm], out.cells[nm], out))
        step_metrics = getattr(nodes[nm].fn, "step_metrics", None)
        if callable(step_metrics):  # nodes with their own counters (judge retries, parse failures, ...)
            metrics.update({f"reward/{nm}/{k}": float(v) for k, v in step_metrics().items()})
    return StepReport(rewards, masked, token_rewards, out.cells, metrics)


# what to do about each per-sample failure counter a built-in returns
_REASON_FIX = {"bad_reference": "the data's gold answers do not parse: repair those rows"}


def failure_summary(nodes: dict[str, RewardNode], report: StepReport) -> str:
    """One line per node that masked samples: counts and its first error."""
    lines = []
    for nm in nodes:
        bad = [c for c in report.cells[nm] if c.masked and c.status != "upstream"]
        if bad:
            timeouts = sum(c.status == "timeout" for c in bad)
            reasons = Counter(c.reason for c in bad if c.reason)
            counted = "".join(f" ({k} {v}: {_REASON_FIX.get(k, 'see the node')})" for k, v in reasons.items())
            lines.append(
                f"  node {nm!r}: {len(bad) - timeouts} errors{counted}, {timeouts} timeouts; first: {bad[0].error}"
            )
    return "\n".join(lines)
