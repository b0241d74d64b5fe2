"""Held-out evaluation of the served policy: greedy completions from the rollout workers, checked."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from posttrain.rollout.sampling import SamplingConfig
from posttrain.types import Group, PromptRecord

Generate = Callable[[list[PromptRecord], SamplingConfig], list[Group]]


class Evaluator:
    """``eval/accuracy``: the fraction of eval prompts whose greedy completion the checker accepts.

    ``every`` (``eval.every_steps``) also evaluates after every ``every``-th step;
    before and after training always (when the recipe has eval data and a checker)."""

    def __init__(self, prompts: list[PromptRecord], checker: Callable[[dict, str], Any] | None, generate: Generate,
                 max_tokens: int, every: int, max_steps: int) -> None:  # fmt: skip
        self.prompts, self.checker, self.generate = prompts, checker, generate
        self.greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens)
        self.every, self.max_steps = every, max_steps

    def __call__(self) -> dict[str, float]:
        if not self.prompts or self.checker is None:
            return {}
        groups = self.generate(self.prompts, self.greedy)
        correct = sum(bool(self.checker(g.prompt.fields, g.completions[0].text)) for g in groups)
        return {"eval/accuracy": correct / len(groups)}

    def after(self, step: int) -> dict[str, float]:
        """The evaluation due after ``step`` (none after the last: the final one follows)."""
        due = self.every and step % self.every == 0 and step < self.max_steps
        return self() if due else {}
