"""The demo's flawed teacher (ArithmeticTask.teacher_drops_carry): demonstrations forget the carry
on some carry problems only, by exactly -10, while ``answer`` stays the true sum."""

from __future__ import annotations

import pytest

from posttrain.data.tasks import ArithmeticTask


def _carries(row) -> bool:
    a, b = (int(x) for x in row["prompt"].rstrip("=").split("+"))
    return a % 10 + b % 10 >= 10


def test_the_flaw_off_leaves_rows_as_they_were():
    assert ArithmeticTask(teacher_drops_carry=0.0).generate(200, seed=3) == ArithmeticTask().generate(200, seed=3)


def test_the_teacher_drops_the_carry_only_on_carry_problems():
    rows = ArithmeticTask(teacher_drops_carry=0.6).generate(2000, seed=5)
    wrong = [r for r in rows if r["response"] != r["answer"]]
    assert all(_carries(r) and int(r["response"]) == int(r["answer"]) - 10 for r in wrong)
    carry_rows = [r for r in rows if _carries(r)]
    assert 0.5 < len(wrong) / len(carry_rows) < 0.7  # about 60% of the carry problems
    assert all(str(sum(int(x) for x in r["prompt"].rstrip("=").split("+"))) == r["answer"] for r in rows)


def test_teacher_flaw_is_checked():
    with pytest.raises(ValueError, match="teacher_drops_carry"):
        ArithmeticTask(teacher_drops_carry=1.5)
    with pytest.raises(ValueError, match="ops"):
        ArithmeticTask(ops="*", teacher_drops_carry=0.5)


# -- the tool task's teacher who estimates in the head (ToolArithmeticTask.tool_rate) -----------
def test_tool_teacher_uses_the_tool_at_its_rate_and_estimates_otherwise():
    from posttrain.data.tasks import ToolArithmeticTask

    task = ToolArithmeticTask(tool_rate=0.3)
    rows = task.generate(2000, seed=4)
    tool = [r for r in rows if r["response"].startswith("<tool>")]
    assert 0.25 < len(tool) / len(rows) < 0.35
    for r in rows:
        a, rest = r["prompt"].rstrip("=").split("*")
        b, c = rest.split("+")
        assert r["answer"] == str(int(a) * int(b) + int(c))  # the true value, tool or not
        if r in tool:  # a demonstration's final answer is right
            assert task.is_correct(r, r["response"])
        else:  # the estimate: rounded to hundreds, marked, and checked as wrong
            assert r["response"] == f"~{round(int(r['answer']), -2)}" and not task.is_correct(r, r["response"])


def test_tool_teacher_at_rate_one_is_the_plain_task():
    from posttrain.data.tasks import ToolArithmeticTask

    assert ToolArithmeticTask(tool_rate=1.0).generate(100, seed=1) == ToolArithmeticTask().generate(100, seed=1)
    with pytest.raises(ValueError, match="tool_rate"):
        ToolArithmeticTask(tool_rate=1.5)
