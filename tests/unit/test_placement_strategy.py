"""``cluster.placement_strategy``: validated, carried by the plan into the placement group and the
dry-run description, and STRICT_SPREAD refused before any actor starts when the cluster has fewer
nodes than bundles (the two-node run: tests/cluster/test_trainers_two_nodes.py)."""

from __future__ import annotations

import pytest

from posttrain.rl.config import ClusterConfig, RolloutSection
from posttrain.rl.placement import ResourceError, check_resources, describe_placement, plan_placement


def test_strategy_is_validated_and_reaches_the_plan():
    problem = ClusterConfig(placement_strategy="EVEN").validate()
    assert problem is not None and problem[0] == "placement_strategy" and "SPREAD" in problem[2]
    cluster = ClusterConfig(placement_strategy="SPREAD")
    assert plan_placement(cluster, RolloutSection(), 2).strategy == "SPREAD"
    assert describe_placement(cluster, RolloutSection(), 2)["strategy"] == "SPREAD"
    assert plan_placement(ClusterConfig(), RolloutSection(), 2).strategy == "PACK"


@pytest.mark.slow
def test_strict_spread_needs_a_node_per_bundle():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        plan = plan_placement(ClusterConfig(placement_strategy="STRICT_SPREAD"), RolloutSection(), 2)
        with pytest.raises(ResourceError, match="3 bundles .* 1 node"):
            check_resources(plan)
        check_resources(plan_placement(ClusterConfig(placement_strategy="SPREAD"), RolloutSection(), 2))  # fits
    finally:
        ray.shutdown()
