"""Value ranges of numeric config fields, checked before a section's own ``validate()`` runs.

One table, keyed by config class (import path, so this module imports none of them): each row is
a field, the allowed range and an example the fix can suggest. ``build_dataclass`` calls
:func:`check_bounds` on every section it builds, so a negative learning rate or a zero batch size
stops at load time (and in ``--dry-run``) with the key, the source and the fix, instead of a
ZeroDivisionError or a silently useless run later.

Ranges: ``(">", 0)`` strictly positive, ``(">=", 0)`` non-negative, ``("[]", (lo, hi))`` closed
interval, ``("[)", (lo, hi))`` half-open.
"""

from __future__ import annotations

import math
from typing import Any

Range = tuple[str, Any]

# config class -> {field: (range, example value for the fix)}
BOUNDS: dict[str, dict[str, tuple[Range, str]]] = {
    "posttrain.engine.trainer.TrainerConfig": {
        "max_steps": ((">", 0), "100"),
        "global_batch_size": ((">", 0), "32"),
        "micro_batch_size": ((">", 0), "8"),
        "world_size": ((">", 0), "1"),
        "grad_clip": ((">=", 0), "1.0 (0 disables clipping)"),
    },
    "posttrain.engine.trainer.OptimConfig": {
        "lr": ((">", 0), "1e-4"),
        "weight_decay": ((">=", 0), "0.0"),
        "eps": ((">", 0), "1e-8"),
    },
    "posttrain.engine.schedule.ScheduleConfig": {
        "warmup_steps": ((">=", 0), "0"),
        "min_lr_ratio": (("[]", (0.0, 1.0)), "0.0"),
    },
    "posttrain.engine.checkpoint.CheckpointConfig": {
        "every_steps": ((">=", 0), "0 (only at the end)"),
        "keep_last": ((">=", 0), "2"),
    },
    "posttrain.config.schema.EvalConfig": {
        "every_steps": ((">=", 0), "0 (only before and after training)"),
        "max_new_tokens": ((">", 0), "16"),
    },
    "posttrain.config.schema.DataConfig": {
        "max_length": ((">", 0), "256"),
    },
    "posttrain.metrics.LoggingConfig": {
        "every_steps": ((">", 0), "1"),
    },
    "posttrain.data.sources.DatasetSource": {
        "num_examples": ((">=", 0), "0 (all rows)"),
    },
}

_WORDS = {">": "must be > {}", ">=": "must be >= {}", "[]": "must be in [{}, {}]", "[)": "must be in [{}, {})"}


def _inside(value: float, rng: Range) -> bool:
    op, bound = rng
    if isinstance(value, float) and math.isnan(value):
        return False
    if op == ">":
        return value > bound
    if op == ">=":
        return value >= bound
    lo, hi = bound
    return lo <= value <= hi if op == "[]" else lo <= value < hi


def check_bounds(obj: Any, key: str = "") -> tuple[str, str, str] | None:
    """(field, problem, fix) for the first field of ``obj`` outside its range, else None.
    ``key`` is the section's dotted name, for the fix's example."""
    table = BOUNDS.get(f"{type(obj).__module__}.{type(obj).__qualname__}", {})
    for name, (rng, example) in table.items():
        value = getattr(obj, name, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not _inside(value, rng):
            op, bound = rng
            words = _WORDS[op].format(*(bound if isinstance(bound, tuple) else (bound,)))
            full = f"{key}.{name}" if key else name
            return (name, f"{value!r} {words}", f"set {full} {words.replace('must be ', '')}, e.g. {full}={example}")
    return None
