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
