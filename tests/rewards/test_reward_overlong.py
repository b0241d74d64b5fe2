"""DAPO soft overlong penalty node: token counts, config validation, use in a graph."""

from __future__ import annotations

import asyncio

import pytest
from posttrain.rewards import RewardConfigError, RewardGraph, RewardNode
from posttrain.rewards.fn import call_reward_fn
from posttrain.rewards.overlong import OverlongPenalty, soft_overlong_penalty

from posttrain.types import RewardSample


def _sample(n_tokens: int | None, text: str = "x") -> RewardSample:
    s = RewardSample(prompt="p", completion=text)
    s.num_tokens = n_tokens  # RewardSample.num_tokens, filled by the graph from token_ids
    return s


def test_formula_by_hand():
    # max 16, buffer 4: soft zone from 12; penalty 0.5
    got = [soft_overlong_penalty(n, 16, 4, 0.5) for n in (10, 12, 14, 16, 20)]
    assert got == [0.0, 0.0, -0.25, -0.5, -0.5]  # -(14-12)/4 * 0.5, -(16-12)/4 * 0.5, capped
    assert soft_overlong_penalty(13, 16, 4) == -0.25


def test_node_counts_tokens_not_characters():
    node = OverlongPenalty(max_tokens=16, buffer_tokens=4)
    # 3 characters but 15 tokens (e.g. a word-piece tokenizer): -(15 - 12) / 4
    out = asyncio.run(call_reward_fn(node, [_sample(15, "abc"), _sample(2, "a" * 100)]))
    assert out == [-0.75, 0.0]


def test_missing_token_count_is_a_clear_error():
    with pytest.raises(RewardConfigError, match="num_tokens"):
        OverlongPenalty(16, 4)([RewardSample(prompt="p", completion="c")])


@pytest.mark.parametrize(
    "kwargs,key",
    [({"max_tokens": 0, "buffer_tokens": 1}, "max_tokens"), ({"max_tokens": 16, "buffer_tokens": 0}, "buffer_tokens"),
     ({"max_tokens": 16, "buffer_tokens": 17}, "buffer_tokens"),
     ({"max_tokens": 16, "buffer_tokens": 4, "penalty": -1.0}, "penalty")],
)
def test_config_validation_names_key_and_fix(kwargs, key):
    with pytest.raises(RewardConfigError, match=f"kwargs.{key}.*must be"):
        OverlongPenalty(**kwargs)


def test_in_a_graph_the_penalty_adds_to_the_reward():
    def correct(sample: RewardSample) -> float:
        return 1.0

    graph = RewardGraph([RewardNode("correct", correct), RewardNode("overlong", OverlongPenalty(16, 4), weight=0.5)])
    report = asyncio.run(graph.score_samples([_sample(10, "a"), _sample(14, "b"), _sample(30, "c")], [3]))
    # 1 + 0.5 * [0, -(14 - 12) / 4, -1]
    assert report.rewards == [1.0, 0.75, 0.5]
