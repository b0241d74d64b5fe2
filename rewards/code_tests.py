"""Sandboxed test-harness node: runs a completion's code against the sample's tests in posttrain.sandboxes.

Completion format: the last fenced code block (```python ... ``` or ``` ... ```), else the
last ``<answer>...</answer>``, else the whole completion (up to the end-of-turn marker).
Tests come from the dataset: ``fields[tests_field]`` is a list of assert statements (or of
``{"test": str, "rel_tol": float, "abs_tol": float}`` for a per-test numeric tolerance), or
``fields[io_field]`` a list of [stdin, expected stdout] pairs. Statement tests run in their own
sandboxed process, apart from the candidate; numbers compare under the tolerance policy of
``posttrain.sandboxes.plain`` (``3.0`` answers ``3``). See sandboxes/README.md.

Scoring: PASS, FAIL, TIMEOUT and OOM are the program's outcome (FAIL/TIMEOUT/OOM give the
fraction of tests passed, or 0.0 with ``score="all"``); SANDBOX_ERROR is the harness failing, so
the node raises and the sample is masked and counted, never scored 0. A program cannot reach
SANDBOX_ERROR: one that kills or crashes its runner scores 0. NO_TESTS (an empty ``tests`` /
``io_cases`` list, or tests in which no assertion ran) scores 0 and is counted as a data problem
(metric ``reward/<node>/no_tests``), never a pass.

Time: the node's ``timeout_s`` counts from the moment a sandbox slot is acquired (see
``posttrain.rewards.execute.start_clock``); the wait for a slot has its own bound,
``queue_timeout_s``, past which the sample is scored 0 as a TIMEOUT, never masked. So a batch of
programs that hang costs its own samples, not those queued behind it.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import Counter
from typing import Any, Literal

from posttrain.rewards.errors import RewardError
from posttrain.rewards.execute import start_clock
from posttrain.rewards.parsing import strip_end, tagged
from posttrain.sandboxes import Limits, Sandbox, SandboxConfig, Status

from posttrain.types import RewardSample

_FENCE = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)```", re.DOTALL)


class SandboxHarnessError(RewardError):
    """The sandbox itself failed (SANDBOX_ERROR): not the completion's fault, so the sample is masked."""


def extract_code(completion: str) -> str:
    """The program in a completion: last fenced block, else last <answer>, else the bare text."""
    body = strip_end(completion)
    blocks = _FENCE.findall(body)
    if blocks:
        return blocks[-1]
    inner = tagged(body, "answer")
    return inner if inner is not None else body


class CodeTestsReward:
    """Sample-mode node scoring code with a warm :class:`posttrain.sandboxes.Sandbox` (started on first use).

    Give the node a ``timeout_s`` above ``wall_s`` plus about a second (a slot's start-up): it
    counts from the moment a slot is acquired. ``queue_timeout_s`` bounds the wait for a slot
    (past it: TIMEOUT, scored 0). ``uid_base=None`` leases a free uid range per node, so several
    nodes or reward actors on one host never collide.
    """

    reward_mode = "sample"

    def __init__(
        self,
        tests_field: str = "tests",
        io_field: str = "io_cases",
        score: Literal["fraction", "all"] = "fraction",
        slots: int = 2,
        wall_s: float = 5.0,
        memory_mb: int = 256,
        allow_weaker: bool = False,
        uid_base: int | None = None,
        sandbox: Any = None,
        queue_timeout_s: float = 600.0,
    ) -> None:
        if score not in ("fraction", "all"):
            raise ValueError(f"CodeTestsReward score={score!r}; use 'fraction' or 'all'")
        if not queue_timeout_s > 0:
            raise ValueError(
                f"CodeTestsReward queue_timeout_s={queue_timeout_s!r}; use a number of seconds > 0"
            )
        self.queue_timeout_s = float(queue_timeout_s)  # read by the graph's executor (execute.py)
        self.tests_field, self.io_field, self.score = tests_field, io_field, score
        self._config = SandboxConfig(
            slots=slots,
            limits=Limits(wall_s=wall_s, memory_mb=memory_mb),
            allow_weaker=allow_weaker,
            uid_base=uid_base,
            cgroup_name="posttrain-reward-sandbox",
        )
        self._sandbox = sandbox
        self._lock = threading.Lock()
        self.reset_step_metrics()

    def reset_step_metrics(self) -> None:
        """Zero the per-status counters (the graph calls this every step)."""
        self._counts: Counter[str] = Counter()

    def step_metrics(self) -> dict[str, float]:
        """Verdicts this step by status: ``pass``, ``fail``, ``timeout``, ``oom``, ``no_tests`` (a data
        problem: no test or no assertion ran), ``sandbox_error``."""
        return {s.value.lower(): float(self._counts[s.value]) for s in Status}

    def _get_sandbox(self) -> Any:
        with self._lock:
            if self._sandbox is None:
                self._sandbox = Sandbox(self._config)
            return self._sandbox

    async def __call__(self, sample: RewardSample) -> float | None:
        tests = sample.fields.get(self.tests_field)
        io_cases = sample.fields.get(self.io_field)
        if tests is None and io_cases is None:
            return None  # nothing to check against: not applicable
        sandbox = await asyncio.to_thread(self._get_sandbox)
        timing = {"queue_timeout_s": self.queue_timeout_s, "on_start": start_clock()}
        if tests is not None:
            verdict = await sandbox.arun(extract_code(sample.completion), tests=list(tests), **timing)
        else:
            verdict = await sandbox.arun(
                extract_code(sample.completion), io_cases=[tuple(c) for c in io_cases], **timing
            )
        self._counts[verdict.status.value] += 1
        if verdict.status is Status.SANDBOX_ERROR:
            raise SandboxHarnessError(f"sandbox harness error: {verdict.detail}")
        if verdict.status is Status.PASS:
            return 1.0
        if verdict.status is Status.NO_TESTS:
            return 0.0
        if self.score == "all" or not verdict.total:
            return 0.0
        return verdict.passed / verdict.total

    def close(self) -> None:
        """Stop the sandbox's slots (a new sandbox starts on the next call)."""
        with self._lock:
            if self._sandbox is not None:
                self._sandbox.close()
                self._sandbox = None
