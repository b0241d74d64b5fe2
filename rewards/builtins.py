"""Built-in rule rewards, all batch-mode: ``fn(samples, **options) -> list[float | None]``.

Each returns None (not applicable) for a sample that lacks the dataset field it needs, never 0,
and scores every sample on its own: a sample whose gold answer is unusable gets a
:class:`~posttrain.rewards.errors.BadReference` (that sample masked, counted as
``reward/<node>/bad_reference``), never an exception that would mask the whole batch.
Expected completion formats are described in :mod:`posttrain.rewards.parsing`.
"""

from __future__ import annotations

import logging
import re

from posttrain.rewards.countdown import countdown_reward
from posttrain.rewards.errors import BadReference
from posttrain.rewards.fn import batch_reward
from posttrain.rewards.parsing import (
    extract_answer,
    final_answer,
    normalize_answer,
    number_value,
    restates_prompt,
    strip_end,
)

from posttrain.types import RewardSample

__all__ = [
    "countdown_reward",
    "exact_answer",
    "format_reward",
    "length_penalty",
    "math_answer",
    "repetition_penalty",
]


@batch_reward
def exact_answer(
    samples: list[RewardSample], field: str = "answer", tag: str = "answer"
) -> list[float | None]:
    """1.0 when the extracted answer equals ``fields[field]`` after normalisation, else 0.0.

    Format: ``"95<|im_end|>"`` or ``"<answer>95</answer>"``; "95.0" equals "95", case and
    surrounding spaces are ignored.
    """
    out: list[float | None] = []
    for s in samples:
        if field not in s.fields:
            out.append(None)
            continue
        given = normalize_answer(extract_answer(s.completion, tag))
        out.append(1.0 if given and given == normalize_answer(str(s.fields[field])) else 0.0)
    return out


def _drop_timeout_notice(record: logging.LogRecord) -> bool:
    # math_verify warns on every call made without its signal timeouts; the node's timeout applies
    return not str(record.msg).startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_drop_timeout_notice)


# gold answers that mean "no answer": math_verify would read "N/A" as the symbols N / A
_NO_ANSWER = frozenset({"", "n/a", "na", "none", "null", "nan", "unknown", "?", "-", "tbd"})


def _parse_math(text: str) -> list:
    """math_verify's parse of one answer (LaTeX or plain), [] when it finds nothing."""
    from math_verify import parse  # imported lazily: sympy takes a second to load

    return parse(f"\\boxed{{{text}}}", parsing_timeout=None) or parse(text, parsing_timeout=None)


@batch_reward
def math_answer(
    samples: list[RewardSample], field: str = "answer", tag: str = "answer"
) -> list[float | None]:
    """1.0 when the completion's *final answer* equals ``fields[field]``, else 0.0.

    The final answer is read before any maths (:func:`posttrain.rewards.parsing.final_answer`):
    the last ``<tag>...</tag>`` or ``\\boxed{...}``, else the last number in the text; no
    expression of the completion is ever evaluated. A numeric gold answer (``65``, ``0.5``,
    ``1/2``) is matched exactly by value and only by a slot stating one number: ``\\boxed{65}``,
    ``<answer>65.0</answer>``, ``17 + 48 = 65`` score 1; ``17 + 48``, ``17 + 48 = \\boxed{}``,
    ``\\boxed{17+48}`` score 0. Other gold answers (``\\sqrt{2}``, ``x^2+1``) are compared by
    math_verify, and a slot that copies an expression of the prompt scores 0.

    A gold answer that states no number and that math_verify cannot parse, or a placeholder
    (``"N/A"``, ``"none"``, ``""``), masks only its own sample (``reward/<node>/bad_reference``). math_verify's own signal-based
    timeouts are off (they only work on the main thread): the node's timeout applies.
    """
    from math_verify import verify  # imported lazily: sympy takes a second to load

    out: list[float | None | BadReference] = []
    for s in samples:
        if field not in s.fields:
            out.append(None)
            continue
        gold_text = str(s.fields[field]).strip()
        gold_number = number_value(gold_text, strict=False)
        usable = gold_text.lower().rstrip(".") not in _NO_ANSWER
        gold = _parse_math(gold_text) if gold_number is None and usable else []
        if gold_number is None and not gold:
            out.append(BadReference(f"math_answer: gold answer {gold_text!r} in field {field!r} does not parse"))
            continue
        answer = final_answer(s.completion, tag)
        if not answer or restates_prompt(answer, s.prompt):
            out.append(0.0)
        elif gold_number is not None:
            out.append(1.0 if number_value(answer) == gold_number else 0.0)
        else:
            pred = _parse_math(answer)
            out.append(1.0 if pred and verify(gold, pred, timeout_seconds=None) else 0.0)
    return out


math_answer.failure_metrics = ("bad_reference",)  # type: ignore[attr-defined]


@batch_reward
def format_reward(
    samples: list[RewardSample], tag: str = "answer", think: bool = False
) -> list[float | None]:
    """1.0 when the completion is exactly ``[<think>...</think>] <tag>...</tag>``, else 0.0.

    With ``think=True`` the ``<think>`` block is required. Whitespace around blocks and a
    trailing end-of-turn token are allowed; any other text outside the tags fails.
    """
    t = re.escape(tag)
    think_part = r"<think>.*?</think>\s*" if think else r"(?:<think>.*?</think>\s*)?"
    pattern = re.compile(rf"{think_part}<{t}>.*?</{t}>", flags=re.DOTALL)
    return [1.0 if pattern.fullmatch(strip_end(s.completion)) else 0.0 for s in samples]


@batch_reward
def length_penalty(
    samples: list[RewardSample], max_length: int = 256, buffer: int = 64
) -> list[float | None]:
    """Soft overlong penalty (DAPO-style) on characters, in [-1, 0].

    0 up to ``max_length - buffer`` characters, then linear down to -1 at ``max_length`` and -1
    beyond. With the char-level tokenizer characters are tokens.
    """
    if not 0 <= buffer <= max_length:
        raise ValueError(f"length_penalty: need 0 <= buffer ({buffer}) <= max_length ({max_length})")
    out: list[float | None] = []
    for s in samples:
        n = len(strip_end(s.completion))
        over = n - (max_length - buffer)
        out.append(0.0 if over <= 0 else -min(1.0, over / buffer) if buffer else -1.0)
    return out


@batch_reward
def repetition_penalty(samples: list[RewardSample], ngram: int = 3, unit: str = "word") -> list[float | None]:
    """Minus the fraction of repeated n-grams, in [-1, 0]: 0 when every n-gram is new.

    ``unit`` is ``"word"`` (whitespace split) or ``"char"``. Texts shorter than ``ngram`` units
    score 0.
    """
    if unit not in ("word", "char") or ngram < 1:
        raise ValueError(
            f"repetition_penalty: unit must be 'word' or 'char' and ngram >= 1, got {unit!r}, {ngram}"
        )
    out: list[float | None] = []
    for s in samples:
        body = strip_end(s.completion)
        units = body.split() if unit == "word" else list(body)
        grams = [tuple(units[i : i + ngram]) for i in range(len(units) - ngram + 1)]
        out.append(-(1.0 - len(set(grams)) / len(grams)) if grams else 0.0)
    return out
