"""Aggregations of per-node values into one scalar reward per sample.

An aggregator is ``agg(values, weights) -> float | None``: ``values`` maps each aggregated node
(weight != 0, not token-level) to its value for one sample, None when the node was not
applicable or gated off (those are skipped, never read as 0); ``weights`` maps the same names to
their weights. Returning None means "no signal" for the sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from posttrain.rewards.errors import RewardConfigError
from posttrain.rewards.loading import import_object

Aggregator = Callable[[dict[str, float | None], dict[str, float]], float | None]


def _weighted(values: dict[str, float | None], weights: dict[str, float]) -> list[float]:
    return [weights[name] * v for name, v in values.items() if v is not None]


def weighted_sum(values: dict[str, float | None], weights: dict[str, float]) -> float | None:
    """Sum of weight * value over applicable nodes."""
    terms = _weighted(values, weights)
    return math.fsum(terms) if terms else None


def product(values: dict[str, float | None], weights: dict[str, float]) -> float | None:
    """Product of weight * value over applicable nodes (e.g. format 0/1 times correctness)."""
    terms = _weighted(values, weights)
    return math.prod(terms) if terms else None


def minimum(values: dict[str, float | None], weights: dict[str, float]) -> float | None:
    """Smallest weight * value over applicable nodes (every criterion must hold)."""
    terms = _weighted(values, weights)
    return min(terms) if terms else None


AGGREGATORS: dict[str, Aggregator] = {"weighted_sum": weighted_sum, "product": product, "min": minimum}


def resolve_aggregate(spec: str | Aggregator) -> tuple[str, Aggregator]:
    """(display name, callable) for a built-in name, an import path or a callable."""
    if callable(spec):
        return getattr(spec, "__qualname__", repr(spec)), spec
    if spec in AGGREGATORS:
        return spec, AGGREGATORS[spec]
    if not isinstance(spec, str) or ("." not in spec and ":" not in spec):
        raise RewardConfigError(
            f"aggregate {spec!r} is neither a built-in ({', '.join(AGGREGATORS)}) nor an import path "
            "like 'my_pkg.rewards.my_aggregate'"
        )
    fn = import_object(spec, what="aggregate")
    if not callable(fn):
        raise RewardConfigError(f"aggregate {spec!r} imports a {type(fn).__name__}, not a callable")
    return spec, fn
