"""posttrain.rewards (installed from the top-level rewards/ folder): reward functions and reward DAGs.

Public API::

    from posttrain.rewards import RewardGraph, RewardNode, build_reward_graph, RewardGraphConfig
    graph = RewardGraph([RewardNode("fmt", format_reward, weight=0.2), ...], aggregate="weighted_sum")
    scored_groups, metrics = await graph.score_groups(groups)   # or graph.score_groups_sync(groups)

See rewards/README.md for a complete custom pipeline.
"""

from posttrain.rewards.aggregate import AGGREGATORS, minimum, product, weighted_sum
from posttrain.rewards.config import RewardGraphConfig, RewardNodeConfig, build_reward_graph
from posttrain.rewards.errors import (
    RewardActorError,
    RewardConfigError,
    RewardError,
    RewardFailureError,
    RewardGraphError,
    VerdictParseError,
)
from posttrain.rewards.fn import batch_reward, call_reward_fn, group_reward, sample_reward
from posttrain.rewards.graph import RewardGraph
from posttrain.rewards.node import RewardNode
from posttrain.rewards.report import StepReport

__all__ = [
    "AGGREGATORS",
    "RewardActorError",
    "RewardConfigError",
    "RewardError",
    "RewardFailureError",
    "RewardGraph",
    "RewardGraphConfig",
    "RewardGraphError",
    "RewardNode",
    "RewardNodeConfig",
    "StepReport",
    "VerdictParseError",
    "batch_reward",
    "build_reward_graph",
    "call_reward_fn",
    "group_reward",
    "minimum",
    "product",
    "sample_reward",
    "weighted_sum",
]
