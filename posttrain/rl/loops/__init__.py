"""The two RL loops. Each takes the same narrow parts (:class:`LoopParts`), never the driver:

* :mod:`.sync` — generate with version v, then train on it (colocated placement, and the
  reference loop that ``max_staleness: 0`` must reproduce sample for sample);
* :mod:`.pipelined` — a rollout thread generates ahead within ``algorithm.max_staleness``
  while the trainer trains.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posttrain.types import Group, PromptRecord


@dataclass
class LoopParts:
    """What a loop consumes and whom it tells: prompts in, a step per batch of groups, then the
    evaluation due, the metrics log and the after-step hook (checkpoints), in that order."""

    next_prompts: Callable[[], list[PromptRecord]]
    refill_prompts: Callable[[int], list[PromptRecord]]  # more prompts for the current step (DAPO)
    # (groups, generate_s, refill: count -> that many new generated groups) -> metrics
    step: Callable[[list[Group], float, Callable[[int], list[Group]]], dict[str, Any]]
    evaluate_after: Callable[[int], dict[str, float]]
    log: Callable[[int, dict[str, Any]], None]
    after_step: Callable[[int, dict[str, Any]], None]
    fleet_metrics: Callable[[], dict[str, float]]  # replacements and set-asides so far

    def evaluate(self, step: int, metrics: dict[str, Any]) -> None:
        """Add the fleet counters and the evaluation due after ``step`` to its metrics."""
        t0 = time.perf_counter()
        evaluated = self.evaluate_after(step)
        if evaluated:
            evaluated["time/eval_s"] = time.perf_counter() - t0
        metrics.update({**self.fleet_metrics(), **evaluated})

    def record(self, step: int, metrics: dict[str, Any]) -> None:
        """Log the step, then the after-step hook (checkpoints)."""
        self.log(step, metrics)
        self.after_step(step, metrics)
