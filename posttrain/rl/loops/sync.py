"""The synchronous loop: each step generates with the current version, then trains on it.

    for each step:  prompts ─► generate (every usable worker, version v) ─► Step ─► version v+1
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from posttrain.rl.loops import LoopParts
from posttrain.types import Group, PromptRecord


def run_sync(parts: LoopParts, generate: Callable[[list[PromptRecord], Any], list[Group]], sampling: Any,
             start_step: int, max_steps: int) -> None:  # fmt: skip
    """Steps ``start_step + 1 .. max_steps``; consumes prompts, waits for every rollout."""
    def refill(count: int) -> list[Group]:
        return generate(parts.refill_prompts(count), sampling)

    for step in range(start_step + 1, max_steps + 1):
        t0 = time.perf_counter()
        groups = generate(parts.next_prompts(), sampling)
        metrics = parts.step(groups, time.perf_counter() - t0, refill)
        parts.evaluate(step, metrics)
        parts.record(step, metrics)
