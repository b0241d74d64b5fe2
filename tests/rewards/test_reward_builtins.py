"""Built-in rule rewards on hand-made completions."""

from __future__ import annotations

import asyncio

import pytest
from posttrain.rewards import call_reward_fn
from posttrain.rewards.builtins import (
    countdown_reward,
    exact_answer,
    format_reward,
    length_penalty,
    math_answer,
    repetition_penalty,
)
from posttrain.rewards.countdown import InvalidExpression, evaluate_countdown

from posttrain.types import RewardSample


def s(completion: str, **fields: object) -> RewardSample:
    return RewardSample(prompt="What is 37+58?", completion=completion, fields=dict(fields))


def test_exact_answer_formats_and_not_applicable() -> None:
    samples = [
        s("95<|im_end|>", answer="95"),
        s("<think>7+8=15</think><answer> 95.0 </answer>", answer="95"),
        s("96<|im_end|>", answer="95"),
        s("", answer="95"),
        s("95"),  # no answer field: not applicable, never 0
        s("95<|im_end|>garbage after the end", answer=95),
    ]
    assert exact_answer(samples) == [1.0, 1.0, 0.0, 0.0, None, 1.0]


def test_math_answer_uses_math_verify() -> None:
    samples = [
        s("<answer>1/2</answer>", answer="0.5"),
        s("so the result is \\boxed{\\frac{1}{2}}", answer="1/2"),
        s("<answer>0.6</answer>", answer="1/2"),
        s("nothing", answer="95"),
        s("<answer>3</answer>"),
    ]
    assert math_answer(samples) == [1.0, 1.0, 0.0, 0.0, None]


def test_math_answer_rejects_unparseable_gold() -> None:
    with pytest.raises(ValueError, match="gold answer"):
        math_answer([s("1", answer="")])


def test_format_reward_answer_and_think_tags() -> None:
    samples = [
        s("<answer>95</answer><|im_end|>"),
        s("<think>carry the one</think>\n<answer>95</answer>"),
        s("95"),
        s("the answer: <answer>95</answer>"),
        s("<answer>95"),
    ]
    assert format_reward(samples) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert format_reward(samples, think=True) == [0.0, 1.0, 0.0, 0.0, 0.0]


def test_length_penalty_soft_overlong() -> None:
    samples = [s("a" * n) for n in (10, 60, 80, 100, 500)]
    assert length_penalty(samples, max_length=100, buffer=40) == [0.0, 0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="buffer"):
        length_penalty(samples, max_length=10, buffer=40)


def test_repetition_penalty() -> None:
    out = repetition_penalty([s("a b c d e"), s("a b a b a b a b"), s("hi")], ngram=2)
    assert out[0] == 0.0
    assert out[1] == pytest.approx(-(1 - 2 / 7))
    assert out[2] == 0.0
    assert repetition_penalty([s("aaaa")], ngram=1, unit="char") == [pytest.approx(-0.75)]


def test_countdown_reward_safe_evaluation() -> None:
    f = {"numbers": [3, 5, 7], "target": 22}
    samples = [
        s("3*5+7<|im_end|>", **f),
        s("<answer>(7+5)*3-14</answer>", **f),  # 14 is not a given number
        s("<answer>3*5+7 = 22</answer>", **f),
        s("3*3+7+6", **f),  # 3 used twice
        s("__import__('os').system('true')", **f),
        s("22", **f),  # a bare number not in the list
        s("7*3+5/5", **f),  # 5 used twice
        s("3*5+7"),  # no fields: not applicable
    ]
    assert countdown_reward(samples) == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, None]
    assert countdown_reward([s("3*5+7", numbers=[3, 5, 7, 2], target=22)], require_all=True) == [0.0]


def test_countdown_exact_fractions_and_rejections() -> None:
    assert evaluate_countdown("(7-5/5)*3", [3, 5, 5, 7])[0] == 18
    for bad in ("3**5", "3 if 5 else 7", "-3+5", "3/(5-5)", "x", "3 5"):
        with pytest.raises(InvalidExpression):
            evaluate_countdown(bad, [3, 5, 5, 7])


def test_call_reward_fn_sync_async_and_modes() -> None:
    async def async_len(sample: RewardSample) -> float:
        return float(len(sample.completion))

    samples = [s("ab"), s("abc", answer="abc")]
    assert asyncio.run(call_reward_fn(async_len, samples)) == [2.0, 3.0]
    assert asyncio.run(call_reward_fn(exact_answer, samples, field="answer")) == [None, 1.0]
