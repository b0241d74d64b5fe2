"""Per-(node, sample) outcomes of one scoring step and how raw return values become them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from posttrain.rewards.errors import SampleFailure

Status = Literal["ok", "na", "gated", "upstream", "error", "timeout"]
FAILED: frozenset[str] = frozenset({"error", "timeout"})


@dataclass
class Cell:
    """What one node gave one sample.

    status: ok (value set), na (fn returned None), gated (a gate did not pass), upstream (a
    dependency failed, so the node did not run), error / timeout (failed; ``value`` holds the
    node's default when ``on_error="default"``, and ``masked`` tells whether it masks the sample).
    value is a float, or a list of floats for token-level nodes.
    """

    status: Status
    value: Any = None
    error: str = ""
    masked: bool = False
    cached: bool = False
    reason: str = ""  # a failure's counter name (SampleFailure.metric), e.g. "bad_reference"

    @property
    def scalar(self) -> float | None:
        """The value as one number (token-level lists are summed), None when there is none."""
        if self.value is None:
            return None
        return math.fsum(self.value) if isinstance(self.value, list) else self.value


def check_value(raw: Any, token_level: bool, n_tokens: int | None) -> Cell:
    """Turn one returned value into a Cell; NaN/inf and wrong types become errors, never 0."""
    if raw is None:
        return Cell("na")
    if type(raw) in _PLAIN_NUMBERS and not token_level:  # fast path for the common case
        value = float(raw)
        if value - value == 0.0:  # finite (nan - nan and inf - inf are nan)
            return Cell("ok", value)
        return Cell("error", error=f"returned {value} (nan/inf is an error, not a score)")
    if isinstance(raw, SampleFailure):  # a batch function failed this one sample
        return Cell("error", error=str(raw), reason=raw.metric or "")
    if token_level:
        if not isinstance(raw, list | tuple) or not all(_is_number(v) for v in raw):
            return Cell(
                "error", error=f"token-level node returned {type(raw).__name__}, expected a list of floats"
            )
        values = [float(v) for v in raw]
        if not all(math.isfinite(v) for v in values):
            return Cell("error", error="returned a non-finite per-token value (nan/inf)")
        if n_tokens is not None and len(values) != n_tokens:
            return Cell(
                "error", error=f"returned {len(values)} per-token values for {n_tokens} completion tokens"
            )
        return Cell("ok", values)
    if not _is_number(raw):
        return Cell(
            "error",
            error=f"returned {type(raw).__name__} {raw!r:.60}; reward functions return a float or None",
        )
    value = float(raw)
    if not math.isfinite(value):
        return Cell("error", error=f"returned {value} (nan/inf is an error, not a score)")
    return Cell("ok", value)


_PLAIN_NUMBERS = (float, int, bool)


def _is_number(v: Any) -> bool:
    # bools count (True -> 1.0); numpy / torch scalars have __float__
    return isinstance(v, (int, float)) or (hasattr(v, "__float__") and not isinstance(v, (str, bytes)))
