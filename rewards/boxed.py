"""Format reward for ``\\boxed{}`` answers (the word-problem recipes' format node).

Batch-mode like :mod:`posttrain.rewards.builtins`: ``fn(samples) -> list[float | None]``.
"""

from __future__ import annotations

import re

from posttrain.rewards.fn import batch_reward
from posttrain.rewards.parsing import strip_end

from posttrain.types import RewardSample

# one \boxed{...} holding a (possibly signed, comma-grouped, decimal) number, then at most a
# closing period or bracket: the answer is the completion's last word, stated once
_ENDS_BOXED = re.compile(r"\\boxed\{\s*-?[\d,]+(?:\.\d+)?\s*\}[\s.)\]$]*")


@batch_reward
def boxed_format(samples: list[RewardSample]) -> list[float | None]:
    """1.0 when the completion states exactly one ``\\boxed{<number>}`` and ends with it, else 0.0.

    Rewards the answer format only (the correctness node checks the value): a completion that
    boxes several candidates, boxes an expression or keeps talking after its answer scores 0.
    """
    out: list[float | None] = []
    for s in samples:
        text = strip_end(s.completion)
        one = text.count("\\boxed{") == 1
        match = _ENDS_BOXED.search(text)
        out.append(1.0 if one and match is not None and match.end() == len(text) else 0.0)
    return out
