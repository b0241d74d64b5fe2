"""Multi-step arithmetic word problems (GSM8K-like), answers in ``\\boxed{}``: the real-model task.

Each template is a short story with two or three arithmetic steps and an integer answer. A row is
usable for SFT (``response``: the worked steps, then ``\\boxed{answer}``), for preference pairs
(``rejected``: the same steps with a slip in the last one) and for RL (``answer``, scored by
``math_answer``).

Held-out split: every problem (template + its numbers) belongs to exactly one split, chosen by a
hash of the problem, not by the seed: ``split: train`` and ``split: eval`` never share a problem
whatever seeds draw them, and the seed only picks which problems of a split a run sees.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Keiko", "Liam", "Maya", "Noor")
INSTRUCTION = "Solve the problem step by step, then give the final answer in \\boxed{}."

# A template draws its numbers from ``rng`` and returns (question, steps, answer). Each step is
# "expression = value" in Python syntax over the problem's numbers and earlier step values, so a
# test can re-evaluate every step; the answer is the last step's value.
Problem = tuple[str, list[str], int]


def _apples(rng: random.Random, name: str) -> Problem:
    a, b, c = rng.randint(3, 40), rng.randint(2, 9), rng.randint(2, 12)
    q = f"{name} has {a} apples and buys {b} bags with {c} apples in each bag. How many apples does {name} have now?"
    return q, [f"{b} * {c} = {b * c}", f"{a} + {b * c} = {a + b * c}"], a + b * c


def _change(rng: random.Random, name: str) -> Problem:
    p, n = rng.randint(2, 15), rng.randint(2, 6)
    bill = next(x for x in (20, 50, 100) if x > p * n)
    q = (f"A pen costs {p} dollars. {name} buys {n} pens and pays with a {bill}-dollar bill. "
         f"How many dollars of change does {name} get?")  # fmt: skip
    return q, [f"{p} * {n} = {p * n}", f"{bill} - {p * n} = {bill - p * n}"], bill - p * n


def _pages(rng: random.Random, name: str) -> Problem:
    a = rng.randint(5, 40)
    b = rng.randint(1, 2 * a - 1)
    q = (f"{name} reads {a} pages on Monday and twice as many pages on Tuesday. On Wednesday {name} reads "
         f"{b} pages fewer than on Tuesday. How many pages does {name} read in the three days?")  # fmt: skip
    tue, wed = 2 * a, 2 * a - b
    return q, [f"2 * {a} = {tue}", f"{tue} - {b} = {wed}", f"{a} + {tue} + {wed} = {a + tue + wed}"], a + tue + wed


def _orchard(rng: random.Random, name: str) -> Problem:
    r, t = rng.randint(3, 15), rng.randint(4, 20)
    c = rng.randint(1, r * t - 1)
    q = f"{name}'s orchard has {r} rows of {t} trees. A storm knocks down {c} trees. How many trees are left standing?"
    return q, [f"{r} * {t} = {r * t}", f"{r * t} - {c} = {r * t - c}"], r * t - c


def _wages(rng: random.Random, name: str) -> Problem:
    w, h, d = rng.randint(8, 25), rng.randint(2, 8), rng.randint(2, 6)
    s = rng.randint(1, w * h * d - 1)
    q = (f"{name} earns {w} dollars an hour and works {h} hours a day for {d} days, then spends {s} dollars "
         f"on a bike. How many dollars does {name} have left?")  # fmt: skip
    day, total = w * h, w * h * d
    return q, [f"{w} * {h} = {day}", f"{day} * {d} = {total}", f"{total} - {s} = {total - s}"], total - s


def _markers(rng: random.Random, name: str) -> Problem:
    g, m, k = rng.randint(2, 6), rng.randint(3, 10), rng.randint(2, 9)
    students = g * m
    q = (f"{name}'s class of {students} students splits into groups of {g}. Each group needs {k} markers. "
         f"How many markers does the class need?")  # fmt: skip
    return q, [f"{students} / {g} = {m}", f"{m} * {k} = {m * k}"], m * k


def _stickers(rng: random.Random, name: str) -> Problem:
    a, b = rng.randint(20, 90), rng.randint(2, 9)
    c = rng.randint(1, a // 2)
    left = a - c
    q = (f"{name} has {a} stickers and gives {c} of them to a friend. Then {name} buys {b} times as many "
         f"stickers as are left. How many stickers does {name} have now?")  # fmt: skip
    return q, [f"{a} - {c} = {left}", f"{left} * {b} = {left * b}", f"{left} + {left * b} = {left + left * b}"], left + left * b


TEMPLATES: tuple[Callable[[random.Random, str], Problem], ...] = (_apples, _change, _pages, _orchard, _wages, _markers, _stickers)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"-?\d+")


def final_number(completion: str) -> int | None:
    """The completion's final answer as an integer: the last ``\\boxed{}`` holding a number, else the
    last number in the text; None when there is none."""
    boxed = _BOXED.findall(completion)
    text = boxed[-1] if boxed else completion
    found = _NUMBER.findall(text.replace(",", ""))
    return int(found[-1]) if found else None


@dataclass
class WordProblemTask:
    """Multi-step word problems; ``split`` (train | eval) picks a disjoint half of the problem space.

    ``eval_fraction``: the share of problems that belong to the eval split (by hash).
    ``system``: a system prompt; rows then carry ``messages`` (system, user, assistant). None: rows
    carry ``prompt`` only and the model's chat template adds its own default system prompt.
    """

    split: str = "train"  # train | eval
    eval_fraction: float = 0.1
    system: str | None = None

    def __post_init__(self) -> None:
        if self.split not in ("train", "eval"):
            raise ValueError(f"WordProblemTask split={self.split!r}; use 'train' or 'eval'")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"WordProblemTask eval_fraction={self.eval_fraction}; use a fraction in (0, 1)")

    def split_of(self, template: str, question: str) -> str:
        """The split a problem belongs to: a hash of its template and numbers (not the name, which
        changes nothing to solve), so it never depends on the seed."""
        key = f"{template}:{','.join(_NUMBER.findall(question))}"
        h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
        return "eval" if h < self.eval_fraction else "train"

    def generate(self, n: int, seed: int) -> list[dict[str, Any]]:
        """``n`` distinct problems of this task's split, drawn with ``seed``."""
        rng = random.Random(seed)
        rows, seen = [], set()
        for _ in range(200 * n + 1000):  # the eval split holds ~eval_fraction of draws
            if len(rows) == n:
                break
            template = rng.choice(TEMPLATES)
            question, steps, answer = template(rng, rng.choice(NAMES))
            if question in seen or self.split_of(template.__name__, question) != self.split:
                continue
            seen.add(question)
            rows.append(self._row(question, steps, answer, rng))
        if len(rows) < n:
            raise ValueError(f"WordProblemTask: only {len(rows)} distinct {self.split} problems found for n={n}; ask for fewer")
        return rows

    def _row(self, question: str, steps: list[str], answer: int, rng: random.Random) -> dict[str, Any]:
        prompt = f"{question} {INSTRUCTION}"
        work = ". ".join(steps)
        slip = answer + rng.choice([-10, -2, -1, 1, 2, 10])
        wrong_steps = [*steps[:-1], f"{steps[-1].rsplit('=', 1)[0]}= {slip}"]
        response = f"{work}. The answer is \\boxed{{{answer}}}."
        rejected = f"{'. '.join(wrong_steps)}. The answer is \\boxed{{{slip}}}."
        row: dict[str, Any] = {"prompt": prompt, "response": response, "answer": str(answer), "chosen": response,
                               "rejected": rejected, "steps": steps}  # fmt: skip
        if self.system is not None:
            row["messages"] = [{"role": "system", "content": self.system}, {"role": "user", "content": prompt},
                               {"role": "assistant", "content": response}]  # fmt: skip
        return row

    def is_correct(self, row: dict[str, Any], completion: str) -> bool:
        return final_number(completion) == int(row["answer"])
