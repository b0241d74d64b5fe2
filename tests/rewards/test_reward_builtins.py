"""Built-in rule rewards on hand-made completions."""

from __future__ import annotations

import asyncio
import pickle
from fractions import Fraction

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
from posttrain.rewards.errors import BadReference
from posttrain.rewards.parsing import final_answer, number_value

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


def test_math_answer_bad_gold_fails_only_its_own_sample() -> None:
    out = math_answer([s("1", answer=""), s("95", answer="95"), s("\\boxed{3}", answer="N/A")])
    assert isinstance(out[0], BadReference) and "gold answer ''" in str(out[0])
    assert out[1] == 1.0
    assert isinstance(out[2], BadReference) and out[2].metric == "bad_reference"
    again = pickle.loads(pickle.dumps(out[2]))  # crosses a Ray actor boundary intact
    assert isinstance(again, BadReference) and again.metric == "bad_reference" and str(again) == str(out[2])


ADD = "What is 17 + 48? Put the final answer in \\boxed{}."
# the question restated, in every form a policy can find: none names the answer 65 itself
RESTATED = [
    "17 + 48",
    "17 + 48 = \\boxed{}",
    "17+48=",
    "\\boxed{17+48}",  # decided: a numeric answer must be stated as a number, not left to evaluate
    "\\boxed{17 + 48}",
    "<answer>17 + 48</answer>",
    "\\boxed{130/2}",  # an unreduced fraction is an expression too
    "What is 17 + 48?",
    "The sum is \\boxed{}.",
]
HONEST = [
    "\\boxed{65}",
    "17 + 48 = \\boxed{65}",
    "17 + 48 = 65",  # no slot: the last number is the fallback
    "The answer is \\boxed{65}.",
    "<answer>65</answer>",
    "<think>17+48</think><answer>65.0</answer>",
    "65<|im_end|>",
    "\\boxed{17+48=65}",  # text after the slot's last '=' is its answer
    "\\boxed{65 \\text{ apples}}",
]


@pytest.mark.parametrize("completion", RESTATED)
def test_math_answer_does_not_pay_for_the_restated_question(completion: str) -> None:
    sample = RewardSample(prompt=ADD, completion=completion, fields={"answer": "65"})
    assert math_answer([sample]) == [0.0]


@pytest.mark.parametrize("completion", HONEST)
def test_math_answer_pays_for_the_stated_answer(completion: str) -> None:
    sample = RewardSample(prompt=ADD, completion=completion, fields={"answer": 65})
    assert math_answer([sample]) == [1.0]


def test_math_answer_symbolic_gold_and_copied_expression() -> None:
    prompt = "Simplify \\sqrt{8}/2."
    samples = [
        RewardSample(prompt=prompt, completion=c, fields={"answer": "\\sqrt{2}"})
        for c in ("\\boxed{\\sqrt{8}/2}", "\\boxed{\\sqrt{2}}", "\\boxed{\\sqrt{3}}")
    ]
    assert math_answer(samples) == [0.0, 1.0, 0.0]


def test_final_answer_slot_and_fallback() -> None:
    assert final_answer("x \\boxed{\\frac{1}{2}} then \\boxed{7}") == "7"
    assert final_answer("<answer>so \\boxed{4}</answer> \\boxed{9}") == "4"  # the tag wins
    assert final_answer("17 + 48 = \\boxed{}") == ""  # an empty slot is an empty answer
    assert final_answer("a+b= 17 + 48") == "48" and final_answer("no digits") is None
    assert number_value("1,065") == 1065 and number_value("-3.5") == Fraction(-7, 2)
    assert number_value("17+48") is None and number_value("130/2") is None
    assert number_value("130/2", strict=False) == 65


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
