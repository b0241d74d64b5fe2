"""Graph validation at build time: each mistake gets one clear error."""

from __future__ import annotations

import pytest
from posttrain.rewards import RewardGraph, RewardGraphError, RewardNode

from posttrain.types import RewardSample


def one(sample: RewardSample, **_: object) -> float:
    return 1.0


def test_cycle_is_named() -> None:
    with pytest.raises(
        RewardGraphError, match=r"cycle: (a -> b -> c -> a|b -> c -> a -> b|c -> a -> b -> c)"
    ):
        RewardGraph(
            [
                RewardNode("a", one, deps=["c"]),
                RewardNode("b", one, deps=["a"]),
                RewardNode("c", one, gate="b"),
            ]
        )


def test_missing_input_and_missing_gate() -> None:
    with pytest.raises(
        RewardGraphError, match="'b' depends on 'nope', which is not defined; defined nodes: a, b"
    ):
        RewardGraph([RewardNode("a", one), RewardNode("b", one, deps=["nope"])])
    with pytest.raises(RewardGraphError, match="is gated by 'fmt'"):
        RewardGraph([RewardNode("b", one, gate="fmt")])


def test_duplicate_and_self_reference() -> None:
    with pytest.raises(RewardGraphError, match="two reward nodes are named 'a'"):
        RewardGraph([RewardNode("a", one), RewardNode("a", one)])
    with pytest.raises(RewardGraphError, match="'a' depends on itself"):
        RewardGraph([RewardNode("a", one, deps=["a"])])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "bad-name"}, "Python identifier"),
        ({"on_error": "ignore"}, "on_error='ignore'"),
        ({"on_error": "default"}, "needs a finite `default`"),
        ({"timeout_s": 0}, "timeout_s must be > 0"),
        ({"weight": float("nan")}, "weight must be finite"),
        ({"mode": "stream"}, "mode='stream'"),
        ({"deps": ["x"], "kwargs": {"x": 1}}, "both a dependency and a kwarg"),
    ],
)
def test_node_options_are_checked(kwargs: dict, message: str) -> None:
    args = {"name": "n", "fn": one} | kwargs
    with pytest.raises(RewardGraphError, match=message):
        RewardNode(**args)


def test_graph_options_are_checked() -> None:
    with pytest.raises(RewardGraphError, match="at least one node"):
        RewardGraph([])
    with pytest.raises(RewardGraphError, match="max_failed_fraction"):
        RewardGraph([RewardNode("a", one)], max_failed_fraction=1.5)
    with pytest.raises(RewardGraphError, match="neither a built-in"):
        RewardGraph([RewardNode("a", one)], aggregate="mean")


def test_topological_order_puts_inputs_first() -> None:
    g = RewardGraph(
        [RewardNode("c", one, deps=["b"], gate="a"), RewardNode("b", one, deps=["a"]), RewardNode("a", one)]
    )
    assert g.order.index("a") < g.order.index("b") < g.order.index("c")
