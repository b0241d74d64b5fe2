"""Scoring multi-turn trajectories: the reward graph, plus the environment's per-turn rewards.

    groups (trajectories) ─► reward graph (optional: a recipe may score with the env alone)
      ─► env error? the sample is masked (reward None, counted in agent/env_errors)
      ─► per-turn env rewards on the last token of the policy turn that earned them
         (ScoredGroup.token_rewards: one value per policy token; group estimators sum them with
         the graph's score, GAE sees them per token) ─► breakdown env/<part> (summed per sample)
      ─► trajectories.jsonl (``posttrain rollouts show``) ─► the step

It is a ``Scorer`` for :class:`~posttrain.rl.step.Step` (``score_groups_sync``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import defaultdict
from typing import Any

from posttrain.types import Completion, Group, ScoredGroup


def turn_token_rewards(c: Completion) -> list[float]:
    """One value per policy token (mask 1): each policy turn's summed reward parts on its last token."""
    mask, out = c.policy_mask, [0.0] * sum(c.policy_mask)
    index = list(itertools.accumulate(mask))  # policy-token index + 1 at each position
    for turn in c.turns or []:
        if turn.role == "policy" and turn.end > turn.start and turn.rewards:
            out[index[turn.end - 1] - 1] += sum(turn.rewards.values())
    return out


def on_policy_tokens(values: list[float], c: Completion) -> list[float]:
    """A token-level reward node's values (one per completion token) at the policy tokens only."""
    return [v for v, m in zip(values, c.policy_mask, strict=True) if m]


def runs(values: list[int]) -> list[list[int]]:
    return [[v, len(list(same))] for v, same in itertools.groupby(values)]


def trajectory_row(c: Completion, reward: float | None, decode: Any = None) -> dict[str, Any]:
    """One line of trajectories.jsonl: ids, mask and versions of every token, turns (with their text
    when ``decode`` is given), reward."""
    turns = [[t.start, t.end, t.role, t.rewards] + ([decode(c.token_ids[t.start : t.end])] if decode else []) for t in c.turns or []]
    return {
        "ordinal": c.prompt.ordinal, "sample": c.sample_index, "version": c.v_min, "reward": reward,
        "finish_reason": c.finish_reason, "env_error": c.env_error, "prompt_ids": c.prompt.token_ids,
        "token_ids": c.token_ids, "loss_mask": c.policy_mask, "versions": runs(c.versions),
        "turns": turns,
        "tokens_sha1": hashlib.sha1(json.dumps(c.token_ids).encode()).hexdigest()[:16],
    }  # fmt: skip


class TrajectoryScorer:
    """The reward graph (or none) plus the environment's rewards and failures; agent/* metrics."""

    def __init__(self, graph: Any, agent: Any, path: str | None) -> None:
        self.graph, self.agent, self.path = graph, agent, path

    def score_groups_sync(self, groups: list[Group]) -> tuple[list[ScoredGroup], dict[str, float]]:
        if self.graph is not None:
            scored, metrics = self.graph.score_groups_sync(groups)
        else:
            scored, metrics = [ScoredGroup(g, [0.0] * len(g.completions)) for g in groups], {}
        rows, masked, turns = [], 0, []
        for sg in scored:
            graph_tokens = sg.token_rewards
            n = len(sg.group.completions)
            lists, parts = [], defaultdict(lambda n=n: [0.0] * n)
            for i, c in enumerate(sg.group.completions):
                values = turn_token_rewards(c)
                if graph_tokens is not None and graph_tokens[i] is not None:
                    values = [a + b for a, b in zip(values, on_policy_tokens(graph_tokens[i], c), strict=True)]
                lists.append(values)
                for t in c.turns or []:
                    for name, v in t.rewards.items():
                        parts[f"env/{name}"][i] += v
                if c.env_error is not None:
                    sg.rewards[i], masked = None, masked + 1
                turns.append(sum(t.role == "policy" for t in c.turns or []))
                rows.append(trajectory_row(c, sg.rewards[i], getattr(self.agent, "decode", None)))
            sg.token_rewards = lists
            sg.breakdown.update(parts)
        self.write(rows)
        for name in sorted({k for sg in scored for k in sg.breakdown if k.startswith("env/")}):  # env/correct, ...
            kept = [v for sg in scored if name in sg.breakdown for v, r in zip(sg.breakdown[name], sg.rewards, strict=True)
                    if r is not None and v is not None]  # fmt: skip
            metrics[name] = sum(kept) / len(kept) if kept else float("nan")
        counters = self.agent.take_counters() if self.agent is not None else {}
        metrics.update(counters)
        metrics.update({"agent/masked_env_errors": float(masked), "agent/turns_mean": sum(turns) / max(1, len(turns)),
                        "agent/turns_max": float(max(turns, default=0))})  # fmt: skip
        return scored, metrics

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not self.path:
            return
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
