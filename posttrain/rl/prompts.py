"""The prompt stream of an RL run: dataset rows -> prompt records, numbered by stream position."""

from __future__ import annotations

from typing import Any

from posttrain.data.formatting import make_rl_prompt
from posttrain.data.sampler import ResumableSampler
from posttrain.data.sources import build_examples
from posttrain.types import PromptRecord


def prompt_records(
    rows: list[dict[str, Any]], tokenizer, key: str, max_bad_fraction: float, max_prompt_tokens: int | None = None
) -> list[PromptRecord]:
    """Rows of an RL dataset as prompt records (bad rows skipped and counted, see build_examples).

    ``max_prompt_tokens``: the engine's room for a prompt (``preflight.rl_prompt_limit``); longer
    prompts are bad rows, since the engine would refuse them mid-run.
    """

    def make(row):
        made = make_rl_prompt(tokenizer, row, max_prompt_tokens)
        if isinstance(made, str):
            return made
        text, ids = made
        fields = {k: v for k, v in row.items() if k not in ("prompt", "messages", "response", "chosen", "rejected")}
        return PromptRecord(ordinal=-1, text=text, token_ids=ids, fields=fields)

    records, _ = build_examples(rows, make, max_bad_fraction, key)
    for i, r in enumerate(records):
        r.ordinal = i  # position in this source; the training stream renumbers per step
    return records


class PromptStream:
    """The next ``per_step`` prompts of the seeded, epoch-aware stream, numbered by stream position
    (the ordinal is the ledger's key: step s trains exactly ordinals [s-1, s) x per_step)."""

    def __init__(self, prompts: list[PromptRecord], per_step: int, seed: int, shuffle: bool) -> None:
        self.prompts, self.per_step = prompts, per_step
        self.sampler = ResumableSampler(len(prompts), seed, shuffle)
        self.refilled = 0  # prompts taken beyond per_step by the steps so far (DAPO refills)

    def next(self) -> list[PromptRecord]:
        """The next step's prompts."""
        return self._take(self.per_step)

    def refill(self, count: int) -> list[PromptRecord]:
        """``count`` more prompts for the current step (dynamic sampling filtered some groups)."""
        self.refilled += count
        return self._take(count)

    def _take(self, count: int) -> list[PromptRecord]:
        start = self.sampler.consumed
        return [
            PromptRecord(start + j, self.prompts[i].text, self.prompts[i].token_ids, self.prompts[i].fields)
            for j, i in enumerate(self.sampler.take(count))
        ]

    def frontier(self, step: int) -> dict[str, Any]:
        """The stream position after ``step`` trained steps (the async loop's sampler ran ahead)."""
        return {**self.sampler.state_dict(), "consumed": step * self.per_step + self.refilled}

    def seek(self, state: dict[str, Any] | None, refilled: int = 0) -> None:
        """Back to a saved frontier (None: the start of the stream)."""
        self.sampler.load_state_dict(state if state is not None else {**self.sampler.state_dict(), "consumed": 0})
        self.refilled = refilled
