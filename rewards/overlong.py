"""DAPO soft overlong punishment on completion *token* counts, as a reward-graph node.

    penalty(L) = 0                                   L <= max_tokens - buffer_tokens
               = -penalty * (L - (max_tokens - buffer_tokens)) / buffer_tokens   in between
               = -penalty                            L >= max_tokens

(Yu et al. 2025, DAPO eq. 13, with ``L_max = max_tokens`` and ``L_cache = buffer_tokens``.) Set
``max_tokens`` to the rollout's ``sampling.max_tokens``: a truncated completion then gets the
full penalty. The value is added to the other nodes' (``weight`` scales it as for any node).

Recipe form::

    - name: overlong
      fn: posttrain.rewards.overlong.OverlongPenalty
      kwargs: {max_tokens: 256, buffer_tokens: 64}

The token count is ``RewardSample.num_tokens`` (the completion's ``len(token_ids)``), which the
graph fills from each completion; the character-based ``builtins.length_penalty`` is for callers
without token ids.
"""

from __future__ import annotations

from posttrain.rewards.errors import RewardConfigError

from posttrain.types import RewardSample


def soft_overlong_penalty(num_tokens: int, max_tokens: int, buffer_tokens: int, penalty: float = 1.0) -> float:
    """The DAPO penalty (<= 0) for one completion of ``num_tokens`` tokens (formula above)."""
    excess = (num_tokens - (max_tokens - buffer_tokens)) / buffer_tokens
    return -penalty * min(max(excess, 0.0), 1.0)


class OverlongPenalty:
    """Batch-mode node: ``soft_overlong_penalty`` of each sample's completion token count."""

    reward_mode = "batch"

    def __init__(self, max_tokens: int, buffer_tokens: int, penalty: float = 1.0) -> None:
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise RewardConfigError(
                f"OverlongPenalty kwargs.max_tokens={max_tokens!r}: must be an integer >= 1; "
                "set it to rollout.sampling.max_tokens"
            )
        if not isinstance(buffer_tokens, int) or not 0 < buffer_tokens <= max_tokens:
            raise RewardConfigError(
                f"OverlongPenalty kwargs.buffer_tokens={buffer_tokens!r}: must be an integer in [1, max_tokens="
                f"{max_tokens}] (the soft zone before the limit); e.g. buffer_tokens: {max(1, max_tokens // 4)}"
            )
        if not penalty > 0:
            raise RewardConfigError(
                f"OverlongPenalty kwargs.penalty={penalty!r}: must be > 0 (the penalty at max_tokens, as a positive "
                "size); e.g. penalty: 1.0, or remove the node to disable it"
            )
        self.max_tokens, self.buffer_tokens, self.penalty = max_tokens, buffer_tokens, penalty

    def __call__(self, samples: list[RewardSample]) -> list[float | None]:
        out: list[float | None] = []
        for s in samples:
            n = getattr(s, "num_tokens", None)
            if n is None:
                raise RewardConfigError(
                    "OverlongPenalty counts completion tokens but the sample has no num_tokens: score through "
                    "RewardGraph.score_groups (it fills RewardSample.num_tokens), or set num_tokens when "
                    "building RewardSample by hand"
                )
            out.append(soft_overlong_penalty(int(n), self.max_tokens, self.buffer_tokens, self.penalty))
        return out
