"""Reward-model node: a tiny sequence-classification checkpoint scored through a real Ray actor."""

from __future__ import annotations

from pathlib import Path

import pytest
from posttrain.rewards import RewardConfigError, RewardGraph, RewardNode
from posttrain.rewards.builtins import format_reward
from posttrain.rewards.reward_model import RewardModelReward, RewardModelScorer


def test_missing_model_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(RewardConfigError, match="no config.json"):
        RewardModelReward(str(tmp_path / "nope"))


@pytest.mark.slow
def test_reward_model_node_through_ray_actor(rm_dir: str, group_of) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    node = RewardModelReward(rm_dir, batch_size=2)
    graph = RewardGraph([RewardNode("rm", node, timeout_s=120)])
    texts = ["95<|im_end|>", "<answer>95</answer>", "no idea", "95<|im_end|>", "9"]
    [scored], metrics = graph.score_groups_sync([group_of("What is 37+58?", texts, answer="95")])
    direct = RewardModelScorer(rm_dir, batch_size=8).score(["What is 37+58?" + t for t in texts])
    assert scored.rewards == pytest.approx(direct, abs=1e-5)  # actor batching == one local batch
    assert len(set(round(r, 6) for r in direct)) == 4  # a real model: different texts, different scores
    assert metrics["reward/rm/calls"] == 1.0 and metrics["reward/rm/cache_hits"] == 1.0
    assert node._actor is not None

    # rule + model in one graph: the reward model only scores completions that pass the format gate
    combined = RewardGraph(
        [RewardNode("fmt", format_reward, weight=0.5), RewardNode("rm", node, gate="fmt", timeout_s=120)]
    )
    [scored], metrics = combined.score_groups_sync([group_of("What is 37+58?", texts, answer="95")])
    assert scored.breakdown["rm"] == [None, pytest.approx(direct[1], abs=1e-5), None, None, None]
    assert scored.rewards[1] == pytest.approx(0.5 + direct[1], abs=1e-5) and scored.rewards[0] == 0.0
    assert metrics["reward/rm/gated"] == 4.0
    node.close()


@pytest.mark.slow
def test_ray_function_node_matches_local_and_kills_hung_actors(group_of) -> None:
    import time

    import ray
    from posttrain.rewards.builtins import countdown_reward
    from posttrain.rewards.remote import RayFunctionReward

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    node = RayFunctionReward("posttrain.rewards.builtins.countdown_reward", num_actors=2, num_cpus=0.5)
    texts = ["3*5+7", "<answer>(3+5)*7</answer>", "3*5", "7*3+5/5", "22"]
    groups = [group_of("Use 3, 5, 7 to make 22", texts, numbers=[3, 5, 7], target=22)]
    graph = RewardGraph([RewardNode("solved", node, timeout_s=60)])
    [scored], _ = graph.score_groups_sync(groups)
    local, _ = RewardGraph([RewardNode("solved", countdown_reward)]).score_groups_sync(groups)
    assert scored.rewards == local[0].rewards == [1.0, 0.0, 0.0, 0.0, 0.0]
    node.close()

    def hangs_on_x(sample, **_):  # noqa: ANN001, ANN003, ANN202 - pickled by value into the actor
        if sample.completion == "x":
            time.sleep(600)
        return 1.0

    hang = RayFunctionReward(hangs_on_x, num_actors=1, num_cpus=0.5)
    graph = RewardGraph([RewardNode("hang", hang, timeout_s=3)], max_failed_fraction=1.0)
    graph.score_groups_sync([group_of("q", ["warm"])])  # start the actor outside the timed step
    start = time.perf_counter()
    [scored], metrics = graph.score_groups_sync([group_of("q", ["x", "y"])])
    assert time.perf_counter() - start < 3 + 2
    assert scored.rewards == [None, None] and metrics["reward/hang/timeouts"] == 2.0
    assert hang._actors == []  # the stuck actor was killed
    # a fresh actor serves the next step (its start-up, slow on a loaded machine, gets a longer timeout)
    graph = RewardGraph([RewardNode("hang", hang, timeout_s=60)], max_failed_fraction=1.0)
    [scored], _ = graph.score_groups_sync([group_of("q", ["y"])])
    assert scored.rewards == [1.0]
    hang.close()
