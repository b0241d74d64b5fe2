"""Answer extraction shared by the built-in verifiers.

Completion formats the built-ins accept (from a chat model, possibly tiny and char-level):

- bare answer, optionally ending in an end-of-turn token: ``"95<|im_end|>"``, ``"95"``;
- tagged: ``"<answer>95</answer>"``, optionally after ``"<think>...</think>"``;
- for math: ``"... \\boxed{95}"`` (math_verify finds it in the free text).

Everything from the first end-of-turn marker on is ignored.
"""

from __future__ import annotations

import re

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
