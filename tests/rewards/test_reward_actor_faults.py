"""Reward actors that die (SIGKILL, as the OOM killer does) are replaced and their samples re-scored.

Real local Ray: the reward functions below SIGKILL their own actor process. Each call records one
file per sample it was given (``calls/<completion>.<pid>.<n>``), so a test can count how often each
sample was really executed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from posttrain.rewards import RewardActorError, RewardFailureError, RewardGraph, RewardNode
from posttrain.rewards.fn import batch_reward
from posttrain.rewards.remote import RayFunctionReward

from posttrain.types import RewardSample

pytestmark = pytest.mark.slow

TEXTS = ["a", "bb", "ccc", "dddd"]  # 2 actors: chunks ["a", "bb"] and ["ccc", "dddd"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray


def calls_of(tmp_path: Path) -> dict[str, int]:
    """How many times the function was executed for each completion."""
    counts: dict[str, int] = {}
    for f in (tmp_path / "calls").iterdir():
        text = f.name.split(".")[0]
        counts[text] = counts.get(text, 0) + 1
    return counts


def length_reward(tmp_path: Path, die: str) -> Callable[..., list[float]]:
    """Batch function scoring len(completion); ``die``: "first" = SIGKILL its actor on the first call
    of the run only (a marker file decides which call), "always" = on every call."""
    calls, marker = tmp_path / "calls", tmp_path / "died"
    calls.mkdir()

    @batch_reward
    def score(samples: list[Any], **_: Any) -> list[float]:  # pickled by value into the actors
        import signal

        for s in samples:
            n = len(list(calls.glob(f"{s.completion}.*")))
            (calls / f"{s.completion}.{os.getpid()}.{n}").touch()
        if die == "always":
            os.kill(os.getpid(), signal.SIGKILL)
        if die == "first":
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # exactly one call wins
            except FileExistsError:
                pass
            else:
                os.write(fd, ",".join(s.completion for s in samples).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        return [float(len(s.completion)) for s in samples]

    return score


def test_killed_actor_is_replaced_and_its_chunk_rescored(ray_local, tmp_path: Path, group_of, capsys) -> None:
    node = RayFunctionReward(length_reward(tmp_path, "first"), num_actors=2, num_cpus=0.5)
    graph = RewardGraph([RewardNode("length", node, timeout_s=120)])
    try:
        [scored], metrics = graph.score_groups_sync([group_of("q", TEXTS)])
        assert scored.rewards == [1.0, 2.0, 3.0, 4.0]  # every sample has its real score
        assert metrics["reward/masked_fraction"] == 0.0 and metrics["reward/length/errors"] == 0.0
        assert node.actors_replaced == 1
        killed = (tmp_path / "died").read_text().split(",")
        assert sorted(killed) in (["a", "bb"], ["ccc", "dddd"])  # one whole chunk died with its actor
        assert calls_of(tmp_path) == {t: 2 if t in killed else 1 for t in TEXTS}  # that chunk ran twice
        assert "starting a replacement and re-scoring its 2 samples" in capsys.readouterr().out

        [scored], _ = graph.score_groups_sync([group_of("q", ["eeeee"])])  # the pool keeps serving
        assert scored.rewards == [5.0] and node.actors_replaced == 1
    finally:
        graph.close()


def test_an_actor_that_always_dies_stops_after_max_actor_restarts(
    ray_local, tmp_path: Path, group_of
) -> None:
    node = RayFunctionReward(
        length_reward(tmp_path, "always"), num_actors=1, num_cpus=0.5, max_actor_restarts=2
    )
    graph = RewardGraph([RewardNode("length", node, timeout_s=120)])
    try:
        with pytest.raises(RewardFailureError, match="max_actor_restarts=2") as info:
            graph.score_groups_sync([group_of("q", TEXTS[:2])])
        assert "reward actor 0 of RayFunctionReward" in str(info.value) and "died" in str(info.value)
        assert "raise max_actor_restarts" in str(info.value)
        assert node.actors_replaced == 2
        assert calls_of(tmp_path) == {"a": 3, "bb": 3}  # the first actor and its 2 replacements
        with pytest.raises(RewardActorError, match="after 2 replacements already"):  # the node's own error
            graph.run_sync(node(_samples(["x"])))
    finally:
        graph.close()


def test_a_raising_function_fails_only_its_own_samples_and_keeps_the_actor(
    ray_local, tmp_path: Path, group_of
) -> None:
    def picky(sample: Any) -> float:  # sample mode: only the raising sample fails
        if sample.completion == "bb":
            raise ValueError("cannot score bb")
        return float(len(sample.completion))

    @batch_reward
    def picky_batch(samples: list[Any]) -> list[float]:  # batch mode: only the raising chunk fails
        if any(s.completion == "bb" for s in samples):
            raise ValueError("cannot score a batch holding bb")
        return [float(len(s.completion)) for s in samples]

    for fn, expected, error in (
        (picky, [1.0, None, 3.0, 4.0], "ValueError: cannot score bb"),
        (picky_batch, [None, None, 3.0, 4.0], "ValueError: cannot score a batch holding bb"),
    ):
        node = RayFunctionReward(fn, num_actors=2, num_cpus=0.5)
        graph = RewardGraph([RewardNode("picky", node, timeout_s=120)], max_failed_fraction=1.0)
        try:
            report = graph.run_sync(graph.score_samples(_samples(TEXTS)))
            assert report.rewards == expected
            failed = [c for c in report.cells["picky"] if c.status == "error"]
            assert failed and all(c.error == error for c in failed)
            assert node.actors_replaced == 0 and len(node._actors) == 2
        finally:
            graph.close()


def _samples(texts: list[str]) -> list[RewardSample]:
    return [RewardSample(prompt="q", completion=t, fields={}) for t in texts]


def test_killed_reward_model_actor_is_replaced(ray_local, rm_dir: str, group_of) -> None:
    import signal

    from posttrain.rewards.reward_model import RewardModelReward

    node = RewardModelReward(rm_dir, batch_size=2, num_cpus=0.5)
    graph = RewardGraph([RewardNode("rm", node, timeout_s=120)])
    group = group_of("What is 37+58?", ["95", "<answer>95</answer>", "no idea"])
    try:
        [before], _ = graph.score_groups_sync([group])
        pid = ray_local.get(node._actor.__ray_call__.remote(lambda self: os.getpid()))
        os.kill(pid, signal.SIGKILL)  # as the OOM killer would, between two steps
        [after], metrics = graph.score_groups_sync([group])
        assert after.rewards == pytest.approx(before.rewards, abs=1e-5)  # a new actor, the same scores
        assert metrics["reward/masked_fraction"] == 0.0 and node.actors_replaced == 1
        assert node._actor is not None
    finally:
        graph.close()
