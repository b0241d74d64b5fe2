"""Answer extraction shared by the built-in verifiers.

Completion formats the built-ins accept (from a chat model, possibly tiny and char-level):

- bare answer, optionally ending in an end-of-turn token: ``"95<|im_end|>"``, ``"95"``;
- tagged: ``"<answer>95</answer>"``, optionally after ``"<think>...</think>"``;
- for math: ``"... \\boxed{95}"``; see "final answers" below for how math_answer reads it.

Everything from the first end-of-turn marker on is ignored.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

END_MARKERS = ("<|im_end|>", "<|endoftext|>", "</s>")
_ANSWER_TAG = r"<{tag}>(.*?)</{tag}>"


def strip_end(text: str) -> str:
    """The completion up to the first end-of-turn marker, surrounding whitespace removed."""
    for marker in END_MARKERS:
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut]
    return text.strip()


def tagged(text: str, tag: str = "answer") -> str | None:
    """Content of the last ``<tag>...</tag>`` in ``text`` (stripped), or None when there is none."""
    found = re.findall(_ANSWER_TAG.format(tag=re.escape(tag)), text, flags=re.DOTALL)
    return found[-1].strip() if found else None


def extract_answer(completion: str, tag: str = "answer") -> str:
    """The answer a completion gives: the last ``<tag>`` content, else the whole bare text."""
    body = strip_end(completion)
    inner = tagged(body, tag)
    return inner if inner is not None else body


def normalize_answer(text: str) -> str:
    """Case-, space- and trailing-period-insensitive form; numbers in canonical form ("95.0" -> "95")."""
    text = " ".join(text.strip().lower().split()).rstrip(".")
    try:
        number = float(text.replace(",", ""))
    except ValueError:
        return text
    if number != number or number in (float("inf"), float("-inf")):
        return text
    return str(int(number)) if number.is_integer() else repr(number)


# ---------------------------------------------------------------- final answers (math_answer)
#
# A math reward must pay for the answer the completion *states*, never for an expression it
# copies: math_verify evaluates what it parses, so "17 + 48" (the question restated) would equal
# 65. The answer therefore comes from the completion's final-answer slot, and a numeric answer
# must be written as a number:
#
# 1. the slot: the content of the last ``<tag>...</tag>`` (a ``\boxed{}`` inside it wins), else
#    of the last ``\boxed{...}``. A slot that exists is the answer, even when empty
#    (``17 + 48 = \boxed{}`` has answer "").
# 2. no slot: the fallback is the last number in the text (``17 + 48 = 65`` -> 65,
#    ``17 + 48`` -> 48, ``a+b=`` -> b). An expression is never evaluated.
# 3. inside a slot, text after the last "=" is the answer (``\boxed{17+48=65}`` -> 65).
#
# A numeric gold answer matches only a slot holding one number (words and units around it are
# allowed: ``\boxed{65 \text{ apples}}``; a reduced fraction ``\frac{1}{2}`` or ``1/2`` is one
# number): ``\boxed{17+48}`` and ``\boxed{130/2}`` score 0 when the answer is 65. Non-numeric gold
# answers (``\sqrt{2}``, ``x^2+1``) are compared by math_verify, except that a slot which restates
# an expression of the prompt verbatim and differs from the gold scores 0.

_NUMBER = r"(?:(?<![\w)\]}.])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][+-]?\d+)?|(?<![\w.])\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_FRAC_RE = re.compile(r"^(-?)\\[dt]?frac\{\s*(\d+)\s*\}\{\s*(\d+)\s*\}$|^(-?)(\d+)\s*/\s*(\d+)$")
_LATEX_NOISE = re.compile(r"\\[,!;: ]|\\left|\\right|\{,\}|\$|\\%|%|\\\$")
_TEXT_WRAP = re.compile(r"\\(?:text|mathrm|textbf|mbox)\{([^{}]*)\}")


def boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, None if none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i : j - 1].strip() if depth == 0 else text[i:].strip()


def answer_slot(completion: str, tag: str = "answer") -> str | None:
    """The completion's final-answer slot (rule 1 above), or None when it has none."""
    body = strip_end(completion)
    inner = tagged(body, tag)
    if inner is not None:
        box = boxed(inner)
        return box if box is not None else inner
    return boxed(body)


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (``"-3"``, ``"1,234.5"``), None when there is none."""
    found = _NUMBER_RE.findall(text)
    return found[-1] if found else None


def final_answer(completion: str, tag: str = "answer") -> str | None:
    """The answer a completion states: its slot, else its last number (rules 1-2 above)."""
    slot = answer_slot(completion, tag)
    return slot if slot is not None else last_number(strip_end(completion))


def _compact(text: str) -> str:
    return re.sub(r"\s+", "", _LATEX_NOISE.sub("", text)).lower()


def number_value(text: str, strict: bool = True) -> Fraction | None:
    """The exact value of a text that states one number, None when it states no single number.

    ``strict`` (a completion's answer): the text holds exactly one number and no other digits,
    after the last "=" and around words/units; a fraction must be reduced (``\\frac{1}{2}``,
    ``1/2``, not ``130/2``). Not strict (a gold answer): any ``p/q`` is accepted.
    """
    text = _TEXT_WRAP.sub(r" \1 ", text)
    text = _LATEX_NOISE.sub("", text).strip().rstrip(".").strip()
    if "=" in text:
        text = text.rsplit("=", 1)[1].strip()
    frac = _FRAC_RE.match(text)
    if frac:
        sign, p, q = (frac.group(1), frac.group(2), frac.group(3)) if frac.group(2) else frac.group(4, 5, 6)
        p_i, q_i = int(p), int(q)
        if q_i == 0 or (strict and (q_i == 1 or math.gcd(p_i, q_i) != 1)):
            return None
        return Fraction(-p_i if sign else p_i, q_i)
    found = _NUMBER_RE.findall(text)
    if len(found) != 1:
        return None
    rest = text.replace(found[0], " ", 1)
    if re.search(r"\d", rest) or (strict and re.search(r"[+*/^×÷]|(?<![a-z])-", rest)):
        return None  # more digits, or an operator: an expression, not a stated number
    try:
        return Fraction(found[0].replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def restates_prompt(answer: str, prompt: str) -> bool:
    """True when ``answer`` is an expression (two numbers or more) copied verbatim from ``prompt``."""
    if len(_NUMBER_RE.findall(answer)) < 2:
        return False
    a = _compact(answer)
    return bool(a) and a in _compact(prompt)
