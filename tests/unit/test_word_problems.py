"""The word-problem task (posttrain/data/word_problems.py): answers right, splits disjoint."""

from __future__ import annotations

import ast
import re

import pytest

from posttrain.data.word_problems import TEMPLATES, WordProblemTask, final_number

NUMBER = re.compile(r"\d+")


def evaluate_step(expr: str) -> float:
    """Value of a step's left side: numbers and + - * / only (parsed, never exec'd)."""
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"not plain arithmetic: {ast.dump(node)}")

    return walk(ast.parse(expr, mode="eval"))


@pytest.mark.parametrize("split", ["train", "eval"])
def test_every_step_and_answer_is_right(split):
    """Each step re-evaluated independently equals the value it states; the last step's value is the
    answer, the response boxes it, the rejected response does not; every number the solution starts
    from is in the question (the steps are about this problem)."""
    task = WordProblemTask(split=split)
    rows = task.generate(300, seed=3)
    assert {r["prompt"].split(" ")[1] for r in rows}  # some variety of stories
    for row in rows:
        values = []
        for step in row["steps"]:
            lhs, rhs = step.rsplit("=", 1)
            assert evaluate_step(lhs) == int(rhs), (row["prompt"], step)
            values.append(int(rhs))
            for n in NUMBER.findall(lhs):
                stated = n in NUMBER.findall(row["prompt"]) or (n == "2" and "twice" in row["prompt"])
                assert int(n) in values[:-1] or stated, (row["prompt"], step)
        assert int(row["answer"]) == values[-1] and int(row["answer"]) >= 0
        assert row["response"].endswith(f"\\boxed{{{row['answer']}}}.")
        assert task.is_correct(row, row["response"]) and not task.is_correct(row, row["rejected"])


def test_splits_are_disjoint_whatever_the_seeds():
    """Train and eval draw from disjoint halves of the problem space (by hash, not by seed): even
    the same seed gives no shared problem, and different seeds give different problems."""
    train = {r["prompt"] for seed in (0, 1) for r in WordProblemTask(split="train").generate(1000, seed)}
    evals = [{r["prompt"] for r in WordProblemTask(split="eval").generate(200, seed)} for seed in (0, 1)]
    strip = lambda p: tuple(NUMBER.findall(p)) + (p.split(" ")[2],)  # noqa: E731 - numbers + story, not the name
    assert not {strip(p) for p in train} & {strip(p) for e in evals for p in e}
    assert evals[0] != evals[1]
    assert WordProblemTask(split="eval").generate(50, 7) == WordProblemTask(split="eval").generate(50, 7)  # seeded


def test_all_templates_are_drawn_and_rows_are_distinct():
    rows = WordProblemTask().generate(500, seed=0)
    assert len({r["prompt"] for r in rows}) == 500
    first_words = {r["steps"][0].split(" ")[1] for r in rows}  # the first step's operator differs by template
    assert len(first_words) >= 3 and len(TEMPLATES) >= 6


def test_system_prompt_makes_message_rows():
    row = WordProblemTask(system="You are a careful math tutor.").generate(1, seed=0)[0]
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert row["messages"][1]["content"] == row["prompt"] and row["messages"][2]["content"] == row["response"]


@pytest.mark.parametrize(("text", "value"), [
    ("so 3 + 4 = 7. The answer is \\boxed{7}.", 7), ("\\boxed{1,200}", 1200), ("it is 12 then 15", 15),
    ("\\boxed{12} wait no \\boxed{13}", 13), ("no number", None),
])  # fmt: skip
def test_final_number(text, value):
    assert final_number(text) == value
