"""Checks shared by the rollout engine tests: the record contract and a reference forward."""

from __future__ import annotations

import torch
from posttrain.rollout.sampling import SamplingConfig

from posttrain.types import Group, PromptRecord


@torch.no_grad()
def hf_logprobs(model: torch.nn.Module, token_ids: list[int]) -> list[float]:
    """Trainer-side reference: logprob of token t given tokens < t, t = 1..L-1, by a plain HF forward."""
    ids_1T = torch.tensor([token_ids])
    logprobs_TV = torch.log_softmax(model(ids_1T).logits[0].float(), dim=-1)
    return logprobs_TV[:-1].gather(-1, ids_1T[0, 1:].unsqueeze(-1)).squeeze(-1).tolist()


def assert_well_formed(
    groups: list[Group], prompts: list[PromptRecord], sampling: SamplingConfig, version: int
) -> None:
    """The record contract every engine must meet."""
    assert [g.prompt.ordinal for g in groups] == [p.ordinal for p in prompts]
    for group in groups:
        assert len(group.completions) == sampling.n
        assert [c.sample_index for c in group.completions] == list(range(sampling.n))
        for c in group.completions:
            assert c.prompt is group.prompt or c.prompt == group.prompt
            assert 1 <= len(c.token_ids) <= sampling.max_tokens
            assert len(c.token_ids) == len(c.logprobs) == len(c.versions)
            assert all(v == version for v in c.versions)
            assert all(lp <= 0.0 and lp > -float("inf") for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length")
            if c.finish_reason == "length":
                assert len(c.token_ids) == sampling.max_tokens
