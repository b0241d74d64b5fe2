"""Synthetic tasks whose answers can be checked: the data of demos and tests.

Each task is a config dataclass named by ``_target_`` in a recipe, with ``generate(n, seed)``
returning rows usable for SFT (prompt/response), preference pairs (prompt/chosen/rejected) and RL
(prompt plus answer fields), and ``is_correct(row, completion)`` to score a completion.
"""

from __future__ import annotations

import ast
import operator
import random
from dataclasses import dataclass
from typing import Any

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def first_line(completion: str) -> str:
    """The answer part of a completion: text before the first end-of-turn marker or newline."""
    for stop in ("<|im_end|>", "\n"):
        completion = completion.split(stop, 1)[0]
    return completion.strip()


@dataclass
class ArithmeticTask:
    """``a op b =`` with ``digits``-digit operands; the answer is the integer result.

    ``answer_format: python`` makes it a code task: the response is a Python program that prints
    the result (``print(95)``), each row carries ``io_cases`` ([stdin, expected stdout] pairs) for
    the sandboxed test-harness reward node, and ``is_correct`` accepts only the canonical program.

    ``teacher_drops_carry: p`` makes the SFT demonstrations come from a flawed teacher: when the
    units column carries (``57+68``), the ``response`` forgets the carry with probability ``p``
    (``115`` becomes ``105``). ``answer`` stays the true result, so evaluation and rewards check
    the truth: a model that imitates the teacher answers carry problems wrongly by greedy decoding
    yet still samples the right answer, which is what RL on the checkable answer can exploit.
    """

    digits: int = 2
    ops: str = "+"
    answer_format: str = "number"  # number | python
    teacher_drops_carry: float = 0.0  # probability, per carry problem, of a demonstration without the carry

    def __post_init__(self) -> None:
        if self.answer_format not in ("number", "python"):
            raise ValueError(f"ArithmeticTask answer_format={self.answer_format!r}; use 'number' or 'python'")
        if not 0.0 <= self.teacher_drops_carry <= 1.0:
            raise ValueError(f"ArithmeticTask teacher_drops_carry={self.teacher_drops_carry}; use a probability in [0, 1]")
        if self.teacher_drops_carry > 0 and self.ops != "+":
            raise ValueError(f"ArithmeticTask teacher_drops_carry needs ops='+' (got {self.ops!r}): carries are an addition error")

    def _render(self, value: int) -> str:
        return f"print({value})" if self.answer_format == "python" else str(value)

    def generate(self, n: int, seed: int) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        lo, hi = 10 ** (self.digits - 1) if self.digits > 1 else 0, 10**self.digits - 1
        rows = []
        for _ in range(n):
            a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(self.ops)
            value = _OPS[op](a, b)
            answer, wrong = self._render(value), self._render(value + rng.choice([-11, -10, -2, -1, 1, 2, 10, 11]))
            response = answer
            # drawn only when the flaw is on, so the rows of flawless tasks stay what they were
            if self.teacher_drops_carry > 0 and rng.random() < self.teacher_drops_carry and a % 10 + b % 10 >= 10:
                response = self._render(value - 10)
            row = {"prompt": f"{a}{op}{b}=", "response": response, "answer": answer, "chosen": answer, "rejected": wrong}
            if self.answer_format == "python":
                row["io_cases"] = [["", str(value)]]
            rows.append(row)
        return rows

    def is_correct(self, row: dict[str, Any], completion: str) -> bool:
        return first_line(completion) == str(row["answer"])


def eval_expression(expr: str, allowed_numbers: list[int]) -> float | None:
    """Value of an arithmetic expression using only + - * / and each allowed number at most once.

    Returns None for anything else (names, calls, other numbers, reuse): parsed with ``ast``,
    never ``eval``.
    """
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return None
    pool = list(allowed_numbers)
    binops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.BinOp) and type(node.op) in binops:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return binops[type(node.op)](left, right)
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value in pool:
            pool.remove(node.value)
            return node.value
        raise ValueError("not allowed")

    try:
        return walk(tree.body)
    except (ValueError, RecursionError):
        return None


@dataclass
class CountdownTask:
    """Reach ``target`` with the given numbers (each at most once) and + - *; e.g. ``3 5 7 -> 22``."""

    num_numbers: int = 3
    max_number: int = 9

    def generate(self, n: int, seed: int) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        rows = []
        for _ in range(n):
            nums = [rng.randint(1, self.max_number) for _ in range(self.num_numbers)]
            expr = str(nums[0])
            for x in nums[1:]:
                expr = f"{expr}{rng.choice('+-*')}{x}"
            target = int(eval_expression(expr, nums))
            shown = sorted(nums)
            prompt = f"{' '.join(map(str, shown))}->{target}:"
            rows.append({"prompt": prompt, "response": expr, "numbers": shown, "target": target, "answer": expr})
        return rows

    def is_correct(self, row: dict[str, Any], completion: str) -> bool:
        value = eval_expression(first_line(completion), list(row["numbers"]))
        return value is not None and abs(value - row["target"]) < 1e-9


@dataclass
class ToolArithmeticTask:
    """Multi-step arithmetic a small model cannot do in its head, but can with the code tool.

    ``a*b+c =`` with ``digits``-digit operands. The SFT response is a tool-use demonstration in
    the format of ``posttrain.rollout.env_tools`` (one tool call, its output, the answer)::

        <tool>print(347*29+158)</tool><output>10231</output>10231

    split into ``response_parts`` so that SFT trains the policy's turns and not the tool's output
    (``<output>...</output>`` is loss-masked, as in RL): a model trained to predict the output from
    the expression learns to recompute the answer in its head instead of copying the tool's.

    For RL the observation comes from the real tool (``CodeToolEnv``), and the final answer is
    checked against ``answer``. ``is_correct`` reads the answer after the last tool output.

    ``tool_rate`` < 1 makes a teacher who reaches for the tool only that often; on the other
    problems it answers in its head with an estimate, the value rounded to hundreds and marked
    ``~`` (``~10200``), which is wrong unless the value happens to be a round hundred. A policy that
    imitates it answers most problems greedily without the tool, yet samples the tool often enough
    for a reward on the true answer to make the tool its greedy choice (the agentic demo).
    """

    digits: int = 3
    ops: str = "*+"  # the two operators, in order
    tool_rate: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.tool_rate <= 1.0:
            raise ValueError(f"ToolArithmeticTask.tool_rate={self.tool_rate} must be in [0, 1]")

    def generate(self, n: int, seed: int) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        lo, hi = 10 ** (self.digits - 1), 10**self.digits - 1
        rows = []
        for _ in range(n):
            a, b, c = rng.randint(lo, hi), rng.randint(2, 99), rng.randint(lo, hi)
            expr = f"{a}{self.ops[0]}{b}{self.ops[1]}{c}"
            value = _OPS[self.ops[1]](_OPS[self.ops[0]](a, b), c)
            if self.tool_rate >= 1.0 or rng.random() < self.tool_rate:
                turns = [(f"<tool>print({expr})</tool>", True), (f"<output>{value}</output>", False), (str(value), True)]
            else:  # the estimate in the head: rounded to hundreds
                turns = [(f"~{round(value, -2)}", True)]
            rows.append({
                "prompt": f"{expr}=", "response": "".join(t for t, _ in turns), "answer": str(value),
                # SFT trains the policy's turns, not the tool's output (RL's loss mask)
                "response_parts": [{"text": t, "train": train} for t, train in turns],
            })  # fmt: skip
        return rows

    def is_correct(self, row: dict[str, Any], completion: str) -> bool:
        return first_line(completion.rsplit("</output>", 1)[-1]) == str(row["answer"])
