"""Running a reward graph: gates, weights, aggregation, failures, timeouts, caching, group and token nodes."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest
from posttrain.rewards import (
    RewardFailureError,
    RewardGraph,
    RewardGraphError,
    RewardNode,
    batch_reward,
    group_reward,
)
from posttrain.rewards.builtins import exact_answer, format_reward

from posttrain.types import RewardSample


def run(graph: RewardGraph, groups: list) -> tuple[list, dict]:
    return graph.score_groups_sync(groups)


def correctness_pipeline(aggregate: str = "weighted_sum") -> RewardGraph:
    return RewardGraph(
        [
            RewardNode("fmt", format_reward, weight=0.5),
            RewardNode("correct", exact_answer, gate="fmt", weight=2.0),
        ],
        aggregate=aggregate,
    )


def test_gate_and_weighted_sum(group_of) -> None:
    g = group_of(
        "What is 37+58?", ["<answer>95</answer>", "<answer>94</answer>", "95<|im_end|>"], answer="95"
    )
    [scored], metrics = run(correctness_pipeline(), [g])
    assert scored.rewards == [0.5 + 2.0, 0.5, 0.0]
    assert scored.breakdown == {"fmt": [1.0, 1.0, 0.0], "correct": [1.0, 0.0, None]}  # gated: None, not 0
    assert metrics["reward/correct/gated"] == 1.0
    assert metrics["reward/correct/mean"] == 0.5
    assert metrics["reward/fmt/mean"] == pytest.approx(2 / 3)


def test_product_min_and_custom_aggregation(group_of) -> None:
    g = group_of("q", ["<answer>95</answer>", "<answer>94</answer>", "95"], answer="95")
    assert run(correctness_pipeline("product"), [g])[0][0].rewards == [1.0, 0.0, 0.0]
    assert run(correctness_pipeline("min"), [g])[0][0].rewards == [0.5, 0.0, 0.0]

    def best(values: dict, weights: dict) -> float | None:
        return max((v for v in values.values() if v is not None), default=None)

    graph = RewardGraph(correctness_pipeline().nodes.values(), aggregate=best)
    assert run(graph, [g])[0][0].rewards == [1.0, 1.0, 0.0]


def test_dependency_values_are_passed(group_of) -> None:
    def bonus(sample: RewardSample, fmt: float, correct: float | None) -> float:
        return 10.0 if fmt and correct else -1.0

    graph = RewardGraph(
        [
            *correctness_pipeline().nodes.values(),
            RewardNode("bonus", bonus, deps=["fmt", "correct"], weight=0),
        ]
    )
    [scored], _ = run(graph, [group_of("q", ["<answer>95</answer>", "95"], answer="95")])
    assert scored.breakdown["bonus"] == [10.0, -1.0]
    assert scored.rewards == [2.5, 0.0]  # weight 0: a helper, not aggregated


def test_raising_node_is_masked_and_counted(group_of) -> None:
    def picky(sample: RewardSample) -> float:
        if "bad" in sample.completion:
            raise RuntimeError("cannot score this one")
        return 1.0

    graph = RewardGraph(
        [RewardNode("picky", picky), RewardNode("fmt", format_reward)], max_failed_fraction=0.5
    )
    [scored], metrics = run(graph, [group_of("q", ["ok", "bad", "ok2", "ok3"])])
    assert scored.rewards == [1.0, None, 1.0, 1.0]  # masked, never 0
    assert scored.breakdown["picky"] == [1.0, None, 1.0, 1.0]
    assert metrics["reward/picky/errors"] == 1.0
    assert metrics["reward/masked_fraction"] == 0.25


def test_default_policy_and_fail_policy(group_of) -> None:
    def boom(sample: RewardSample) -> float:
        raise ValueError("judge unreachable")

    g = group_of("q", ["a", "b"])
    graph = RewardGraph([RewardNode("boom", boom, on_error="default", default=-0.5)])
    [scored], metrics = run(graph, [g])
    assert scored.rewards == [-0.5, -0.5]
    assert metrics["reward/boom/errors"] == 2.0 and metrics["reward/masked_fraction"] == 0.0
    with pytest.raises(RewardFailureError, match="'boom' failed on 2 of 2 samples.*judge unreachable"):
        run(RewardGraph([RewardNode("boom", boom, on_error="fail")]), [g])


def test_masked_fraction_limit_names_the_node(group_of) -> None:
    def flaky(sample: RewardSample) -> float:
        if sample.completion.startswith("x"):
            raise KeyError("missing tests field")
        return 1.0

    graph = RewardGraph([RewardNode("flaky", flaky)], max_failed_fraction=0.25)
    with pytest.raises(
        RewardFailureError, match=r"(?s)2 of 4 samples were masked \(50%\).*'flaky': 2 errors.*KeyError"
    ):
        run(graph, [group_of("q", ["x1", "x2", "ok", "ok2"])])


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_hanging_node_costs_only_its_timeout(group_of, kind: str) -> None:
    release = threading.Event()

    async def hang_async(sample: RewardSample) -> float:
        await asyncio.sleep(60)
        return 1.0

    def hang_sync(sample: RewardSample) -> float:
        release.wait(60)  # a sync function Python cannot interrupt
        return 1.0

    graph = RewardGraph(
        [
            RewardNode("fmt", format_reward),
            RewardNode("hang", hang_async if kind == "async" else hang_sync, timeout_s=0.5),
        ],
        max_failed_fraction=1.0,
    )
    start = time.perf_counter()
    [scored], metrics = run(graph, [group_of("q", [f"c{i}" for i in range(8)])])
    wall = time.perf_counter() - start
    release.set()
    assert wall < 0.5 + 0.5, f"step took {wall:.2f}s for a 0.5s timeout"
    assert scored.rewards == [None] * 8
    assert metrics["reward/hang/timeouts"] == 8.0
    assert metrics["reward/fmt/mean"] == 0.0  # the other node still ran


def test_nan_and_wrong_types_are_errors(group_of) -> None:
    def weird(sample: RewardSample) -> object:
        return {"nan": math.nan, "inf": math.inf, "str": "1.0", "ok": 0.0, "na": None}[sample.completion]

    graph = RewardGraph([RewardNode("weird", weird)], max_failed_fraction=1.0)
    [scored], metrics = run(graph, [group_of("q", ["nan", "inf", "str", "ok", "na"])])
    assert scored.rewards == [None, None, None, 0.0, None]
    assert metrics["reward/weird/errors"] == 3.0
    assert metrics["reward/weird/not_applicable"] == 1.0
    assert metrics["reward/masked_fraction"] == pytest.approx(3 / 5)
    assert metrics["reward/no_signal_fraction"] == pytest.approx(1 / 5)


def test_cache_computes_identical_inputs_once(group_of) -> None:
    calls = {"sample": 0, "batch": 0}

    def per_sample(sample: RewardSample) -> float:
        calls["sample"] += 1
        return float(len(sample.completion))

    @batch_reward
    def per_batch(samples: list[RewardSample]) -> list[float]:
        calls["batch"] += len(samples)
        return [1.0] * len(samples)

    graph = RewardGraph([RewardNode("a", per_sample), RewardNode("b", per_batch)])
    groups = [group_of("q", ["95", "95", "96", "95"]), group_of("q", ["95", "96"], ordinal=1)]
    scored, metrics = run(graph, groups)
    assert calls == {"sample": 2, "batch": 2}
    assert metrics["reward/a/cache_hits"] == 4.0 and metrics["reward/b/cache_hits"] == 4.0
    assert scored[0].rewards == [3.0, 3.0, 3.0, 3.0] and scored[1].rewards == [3.0, 3.0]
    run(graph, groups)  # the cache lives for one step: a new call computes again
    assert calls == {"sample": 4, "batch": 4}


def test_group_node_sees_all_samples_of_its_prompt(group_of) -> None:
    seen: list[int] = []

    @group_reward
    def rank(samples: list[RewardSample]) -> list[float]:
        """Shorter is better: rank within the group, 1 for the shortest, 0 for the longest."""
        seen.append(len(samples))
        order = sorted(range(len(samples)), key=lambda i: len(samples[i].completion))
        out = [0.0] * len(samples)
        for r, i in enumerate(order):
            out[i] = 1.0 - r / (len(samples) - 1)
        return out

    groups = [group_of("p0", ["aaa", "a", "aa"]), group_of("p1", ["bb", "b"], ordinal=1)]
    scored, _ = run(RewardGraph([RewardNode("rank", rank)]), groups)
    assert sorted(seen) == [2, 3]
    assert scored[0].rewards == [0.0, 1.0, 0.5] and scored[1].rewards == [0.0, 1.0]


def test_token_level_rewards(group_of) -> None:
    def per_char(sample: RewardSample) -> list[float]:
        return [1.0 if ch.isdigit() else 0.0 for ch in sample.completion]

    graph = RewardGraph(
        [RewardNode("digits", per_char, token_level=True, weight=0.5), RewardNode("fmt", format_reward)]
    )
    [scored], metrics = run(graph, [group_of("q", ["9a5", "<answer>1</answer>"])])
    assert scored.token_rewards == [[0.5, 0.0, 0.5], [0.0] * 8 + [0.5] + [0.0] * 9]
    assert scored.breakdown["digits"] == [2.0, 1.0]  # the breakdown shows the per-sample sum
    assert scored.rewards == [0.0, 1.0]  # token-level nodes stay out of the scalar

    def wrong_length(sample: RewardSample) -> list[float]:
        return [1.0]

    graph = RewardGraph([RewardNode("w", wrong_length, token_level=True)], max_failed_fraction=1.0)
    [scored], metrics = run(graph, [group_of("q", ["abc"])])
    assert scored.rewards == [None] and metrics["reward/w/errors"] == 1.0


def test_independent_nodes_and_samples_run_concurrently(group_of) -> None:
    async def slow_a(sample: RewardSample) -> float:
        await asyncio.sleep(0.3)
        return 1.0

    def slow_b(sample: RewardSample) -> float:
        time.sleep(0.3)
        return 1.0

    graph = RewardGraph([RewardNode("a", slow_a), RewardNode("b", slow_b)])
    start = time.perf_counter()
    [scored], metrics = run(graph, [group_of("q", [f"c{i}" for i in range(6)])])
    assert time.perf_counter() - start < 0.9  # serial would be 12 x 0.3 s
    assert scored.rewards == [2.0] * 6
    assert metrics["reward/a/latency_p50_ms"] >= 300.0


def test_broken_aggregate_is_named(group_of) -> None:
    def bad(values: dict, weights: dict) -> float:
        return float("nan")

    graph = RewardGraph([RewardNode("fmt", format_reward)], aggregate=bad)
    with pytest.raises(RewardGraphError, match=r"aggregate returned nan for node values \{'fmt': 0.0\}"):
        run(graph, [group_of("q", ["x"])])


def test_empty_step() -> None:
    scored, metrics = run(correctness_pipeline(), [])
    assert scored == [] and metrics["reward/samples"] == 0.0 and "reward/mean" not in metrics


def test_bad_gold_answer_masks_one_sample_not_the_batch(group_of) -> None:
    from posttrain.rewards.builtins import math_answer

    groups = [
        group_of("What is 1+1?", ["\\boxed{2}", "\\boxed{3}", "\\boxed{2}"], ordinal=0, answer="2"),
        group_of("What is 2+2?", ["\\boxed{4}", "\\boxed{4}"], ordinal=1, answer="N/A"),
        group_of("What is 3+3?", ["\\boxed{6}", "6"], ordinal=2, answer=6),
        group_of("What is 4+4?", ["\\boxed{8}", "\\boxed{9}", "8", "x"], ordinal=3, answer="8"),
    ]
    graph = RewardGraph([RewardNode("correct", math_answer)], max_failed_fraction=0.2)
    scored, metrics = run(graph, groups)
    assert [g.rewards for g in scored] == [[1.0, 0.0, 1.0], [None, None], [1.0, 1.0], [1.0, 0.0, 1.0, 0.0]]
    assert metrics["reward/correct/bad_reference"] == 2.0  # the two samples of the N/A row
    assert metrics["reward/masked_fraction"] == 2 / 11
    # a clean step still reports the counter, at 0
    _, clean = run(graph, [groups[0]])
    assert clean["reward/correct/bad_reference"] == 0.0
    # above the limit the message says what to repair
    with pytest.raises(RewardFailureError, match=r"(?s)bad_reference 2: .*repair those rows"):
        run(graph, groups[:2])
