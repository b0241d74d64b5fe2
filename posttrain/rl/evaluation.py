"""Held-out evaluation of the served policy: greedy completions from the rollout workers, scored.

What decides "correct" (:func:`eval_scorer`), first match wins:

1. ``eval.scorer``: one reward node in the reward section's form (``{name, fn, kwargs}``), scored
   alone; a completion is correct when its value is at least ``eval.pass_reward``;
2. a synthetic eval task's own checker (``is_correct``): the task knows its answers;
3. the recipe's reward graph: correct when the graph's reward is at least ``eval.pass_reward``
   (default 1.0, full credit), so ``eval/accuracy`` measures what the reward measures: a
   ``math_answer`` recipe scores ``\\boxed{65}`` right in eval as it does in training;
4. no graph: exact match of the completion's first line against the row's ``answer``.

Graph-scored evals also log ``eval/reward``, the mean reward of the greedy completions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from posttrain.config.schema import EvalConfig
from posttrain.data.sources import DatasetSource
from posttrain.offline.runner import make_checker
from posttrain.rollout.sampling import SamplingConfig
from posttrain.types import Group, PromptRecord, ScoredGroup

Generate = Callable[[list[PromptRecord], SamplingConfig], list[Group]]


class GraphLike(Protocol):
    """What eval needs of a reward graph (``posttrain.rewards.graph.RewardGraph``)."""

    def score_groups_sync(self, groups: list[Group]) -> tuple[list[ScoredGroup], dict[str, float]]: ...


class EvalScorer(Protocol):
    """Scores one greedy completion per group: (correct per group, extra metrics)."""

    def __call__(self, groups: list[Group]) -> tuple[list[bool], dict[str, float]]: ...


class CheckerScorer:
    """Correct when ``checker(row fields, completion text)`` is truthy (a task checker or exact match)."""

    def __init__(self, checker: Callable[[dict, str], Any]) -> None:
        self.checker = checker

    def __call__(self, groups: list[Group]) -> tuple[list[bool], dict[str, float]]:
        return [bool(self.checker(g.prompt.fields, g.completions[0].text)) for g in groups], {}


class GraphScorer:
    """Correct when the graph's reward is at least ``pass_reward``; a masked sample (a node failed or
    did not apply) counts as wrong. Adds ``eval/reward``, the mean over unmasked samples."""

    def __init__(self, graph: GraphLike, pass_reward: float) -> None:
        self.graph, self.pass_reward = graph, pass_reward

    def __call__(self, groups: list[Group]) -> tuple[list[bool], dict[str, float]]:
        scored, _ = self.graph.score_groups_sync(groups)
        rewards = [s.rewards[0] for s in scored]
        seen = [r for r in rewards if r is not None]
        metrics = {"eval/reward": sum(seen) / len(seen)} if seen else {}
        return [r is not None and r >= self.pass_reward for r in rewards], metrics


def eval_scorer(cfg: EvalConfig, src: DatasetSource | None, graph: GraphLike | None,
                build_graph: Callable[[dict[str, Any]], GraphLike]) -> EvalScorer | None:  # fmt: skip
    """The scorer of ``eval/accuracy`` (see the module docstring for the order); None: no eval data.

    ``build_graph`` builds a reward graph from the reward section's form (the controller passes
    ``posttrain.rewards.config.build_reward_graph``: eval imports no reward code itself).
    """
    if src is None:
        return None
    if cfg.scorer is not None:
        return GraphScorer(build_graph({"nodes": [dict(cfg.scorer)]}), cfg.pass_reward)
    if src.synthetic is not None and hasattr(src.synthetic, "is_correct"):
        return CheckerScorer(src.synthetic.is_correct)
    if graph is not None:
        return GraphScorer(graph, cfg.pass_reward)
    return CheckerScorer(make_checker(src))


class Evaluator:
    """``eval/accuracy``: the fraction of eval prompts whose greedy completion the scorer accepts.

    ``every`` (``eval.every_steps``) also evaluates after every ``every``-th step;
    before and after training always (when the recipe has eval data)."""

    def __init__(self, prompts: list[PromptRecord], scorer: EvalScorer | None, generate: Generate,
                 max_tokens: int, every: int, max_steps: int) -> None:  # fmt: skip
        self.prompts, self.scorer, self.generate = prompts, scorer, generate
        self.greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens)
        self.every, self.max_steps = every, max_steps

    def __call__(self) -> dict[str, float]:
        if not self.prompts or self.scorer is None:
            return {}
        groups = self.generate(self.prompts, self.greedy)
        correct, metrics = self.scorer(groups)
        return {"eval/accuracy": sum(correct) / len(groups), **metrics}

    def after(self, step: int) -> dict[str, float]:
        """The evaluation due after ``step`` (none after the last: the final one follows)."""
        due = self.every and step % self.every == 0 and step < self.max_steps
        return self() if due else {}
