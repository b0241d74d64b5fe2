"""Countdown reward: is the completion an arithmetic expression over the given numbers that hits the target?

The expression is parsed with :mod:`ast` and evaluated with exact fractions; only ``+ - * /``,
parentheses and integer literals from ``fields["numbers"]`` (each used at most once) are allowed.
Nothing is ever passed to ``eval``.
"""

from __future__ import annotations

import ast
from collections import Counter
from fractions import Fraction

from posttrain.rewards.fn import batch_reward
from posttrain.rewards.parsing import extract_answer

from posttrain.types import RewardSample

_OPS = {
    ast.Add: Fraction.__add__,
    ast.Sub: Fraction.__sub__,
    ast.Mult: Fraction.__mul__,
    ast.Div: Fraction.__truediv__,
}
MAX_EXPRESSION_CHARS = 200


class InvalidExpression(ValueError):
    """The text is not an allowed countdown expression."""


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        if isinstance(node.op, ast.Div) and right == 0:
            raise InvalidExpression("division by zero")
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    raise InvalidExpression(f"{type(node).__name__} is not allowed")


def evaluate_countdown(expression: str, numbers: list[int]) -> tuple[Fraction, list[int]]:
    """Exact value of ``expression`` and the numbers it used; raises InvalidExpression on a broken rule."""
    text = expression.split("=")[0].strip()  # "3*5+7 = 22" -> "3*5+7"
    if not text or len(text) > MAX_EXPRESSION_CHARS:
        raise InvalidExpression("empty or overlong expression")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise InvalidExpression(f"syntax error: {exc.msg}") from None
    used: list[int] = []
    value = _evaluate(tree.body, used)
    if Counter(used) - Counter(int(n) for n in numbers):
        raise InvalidExpression(f"uses numbers {used} not all available in {numbers}")
    return value, used


@batch_reward
def countdown_reward(
    samples: list[RewardSample], tag: str = "answer", require_all: bool = False
) -> list[float | None]:
    """1.0 when the expression equals ``fields["target"]`` using ``fields["numbers"]`` at most once each.

    Format: ``"3*5+7<|im_end|>"``, ``"<answer>(3+5)*7</answer>"``; a trailing ``= 22`` is
    ignored. ``require_all=True`` also demands every number be used. Invalid expressions score
    0.0; samples without ``numbers``/``target`` fields get None.
    """
    out: list[float | None] = []
    for s in samples:
        if "numbers" not in s.fields or "target" not in s.fields:
            out.append(None)
            continue
        numbers = [int(n) for n in s.fields["numbers"]]
        expression = extract_answer(s.completion, tag)
        try:
            value, used = evaluate_countdown(expression, numbers)
        except InvalidExpression:
            out.append(0.0)
            continue
        hit = value == Fraction(s.fields["target"]) and (not require_all or len(used) == len(numbers))
        out.append(1.0 if hit else 0.0)
    return out
