"""The recipe (YAML / import path) form of a graph builds the same graph as the Python form."""

from __future__ import annotations

import pytest
import yaml
from posttrain.rewards import (
    RewardConfigError,
    RewardGraph,
    RewardGraphConfig,
    RewardNode,
    build_reward_graph,
)
from posttrain.rewards.builtins import countdown_reward, format_reward, length_penalty

from posttrain.types import RewardSample

RECIPE = """
reward:
  aggregate: weighted_sum
  max_failed_fraction: 0.5
  nodes:
    - {name: fmt, fn: posttrain.rewards.builtins.format_reward, weight: 0.2}
    - {name: solved, fn: posttrain.rewards.builtins.countdown_reward, gate: [fmt], kwargs: {require_all: true}}
    - name: short
      fn: posttrain.rewards.builtins.length_penalty
      weight: 0.5
      timeout_s: 5
      on_error: default
      default: 0.0
      kwargs: {max_length: 60, buffer: 20}
    - {name: shaped, fn: test_reward_config.shaped, deps: [solved, short], weight: 0}
"""


def shaped(sample: RewardSample, solved: float | None, short: float) -> float:
    """A user node over other nodes' outputs (importable by path from this test module)."""
    return (solved or 0.0) + short


def python_graph() -> RewardGraph:
    return RewardGraph(
        [
            RewardNode("fmt", format_reward, weight=0.2),
            RewardNode("solved", countdown_reward, gate="fmt", kwargs={"require_all": True}),
            RewardNode(
                "short",
                length_penalty,
                weight=0.5,
                timeout_s=5,
                on_error="default",
                default=0.0,
                kwargs={"max_length": 60, "buffer": 20},
            ),
            RewardNode("shaped", shaped, deps=["solved", "short"], weight=0),
        ],
        aggregate="weighted_sum",
        max_failed_fraction=0.5,
    )


def test_recipe_form_equals_python_form(group_of) -> None:
    recipe_graph = build_reward_graph(yaml.safe_load(RECIPE)["reward"])
    py_graph = python_graph()
    assert recipe_graph.order == py_graph.order
    for name, node in py_graph.nodes.items():
        other = recipe_graph.nodes[name]
        for attr in (
            "deps",
            "gate",
            "weight",
            "timeout_s",
            "on_error",
            "default",
            "kwargs",
            "mode",
            "token_level",
        ):
            assert getattr(other, attr) == getattr(node, attr), (name, attr)
    groups = [
        group_of(
            "Use 3, 5, 7 to make 22",
            [
                "<answer>3*5+7</answer>",
                "<answer>3*5</answer>",
                "3*5+7",
                "<answer>" + "3*5+7" + " " * 40 + "</answer>",
            ],
            numbers=[3, 5, 7],
            target=22,
        )
    ]
    got, got_m = recipe_graph.score_groups_sync(groups)
    want, want_m = py_graph.score_groups_sync(groups)
    assert got[0].rewards == want[0].rewards
    assert got[0].breakdown == want[0].breakdown
    assert want[0].rewards == [pytest.approx(1.2), 0.2, 0.0, pytest.approx(0.7)]
    assert want[0].breakdown["shaped"][0] == 1.0
    assert {k: v for k, v in got_m.items() if "latency" not in k and "step_s" not in k} == {
        k: v for k, v in want_m.items() if "latency" not in k and "step_s" not in k
    }


def test_recipe_errors_name_the_key() -> None:
    with pytest.raises(RewardConfigError, match="'wieght' not in 'RewardNodeConfig'"):
        RewardGraphConfig.from_dict({"nodes": [{"name": "a", "fn": "x.y", "wieght": 1}]})
    with pytest.raises(RewardConfigError, match="timeout_s"):
        RewardGraphConfig.from_dict({"nodes": [{"name": "a", "fn": "x.y", "timeout_s": "soon"}]})
    with pytest.raises(RewardConfigError, match="cannot import module 'no_such_pkg'"):
        build_reward_graph({"nodes": [{"name": "a", "fn": "no_such_pkg.fn"}]})
    with pytest.raises(RewardConfigError, match="has no attribute 'format_rewrd'"):
        build_reward_graph({"nodes": [{"name": "a", "fn": "posttrain.rewards.builtins.format_rewrd"}]})
