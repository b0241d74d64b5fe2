"""Checks shared by the rollout engine tests: the record contract and a reference forward."""

from __future__ import annotations

import dataclasses
from typing import Any

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
            cap = min(sampling.max_tokens, group.prompt.max_tokens or sampling.max_tokens)  # a request's own cap
            assert 1 <= len(c.token_ids) <= cap
            assert len(c.token_ids) == len(c.logprobs) == len(c.versions)
            assert all(v == version for v in c.versions)
            assert all(lp <= 0.0 and lp > -float("inf") for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length")
            if c.finish_reason == "length":
                assert len(c.token_ids) == cap


def assert_request_caps(engine: Any, prompts: list[PromptRecord], version: int) -> None:
    """A request's own ``max_tokens`` caps it below ``sampling.max_tokens`` in the same batch (the
    multi-turn dispatcher's per-trajectory budgets), and changes nothing else: with the same seeds
    the capped completion is the uncapped one cut, and the other request is untouched."""
    sampling = SamplingConfig(n=1, temperature=1.0, max_tokens=12, seed=3)
    free = engine.generate(prompts[:2], sampling)
    capped_prompts = [dataclasses.replace(prompts[0], max_tokens=2), prompts[1]]
    capped = engine.generate(capped_prompts, sampling)
    assert_well_formed(capped, capped_prompts, sampling, version)
    a, b = free[0].completions[0], capped[0].completions[0]
    assert b.token_ids == a.token_ids[:2]
    if len(a.token_ids) > 2:
        assert b.finish_reason == "length"
    assert capped[1].completions[0].token_ids == free[1].completions[0].token_ids
