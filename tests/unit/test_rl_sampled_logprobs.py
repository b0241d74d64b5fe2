"""The trainer rank's logprobs are of the distribution the engine sampled from: the plain path it
takes without top-p equals the processed-logprobs function, and temperature matters."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from posttrain.algorithms.logprobs import processed_token_logprobs
from posttrain.rl.trainer_worker import TrainerWorker


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (0.7, 0.9), (1.3, 0.8)])
def test_trainer_scores_the_sampled_distribution(temperature, top_p):
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(3, 9, 40, generator=g) * 3, torch.randint(0, 40, (3, 9), generator=g)
    rank = SimpleNamespace(temperature=temperature, top_p=top_p)
    lp, ent = TrainerWorker._sampled(rank, logits[:, :-1], ids[:, 1:])  # (prediction, next id) pairs
    ref_lp, ref_ent = processed_token_logprobs(logits[:, :-1], ids[:, 1:], temperature, 0, top_p)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)  # fp32, one reduction order apart
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)


def test_temperature_changes_the_trainer_logprobs():
    g = torch.Generator().manual_seed(1)
    logits, ids = torch.randn(2, 6, 30, generator=g) * 3, torch.randint(0, 30, (2, 6), generator=g)
    at_1, _ = TrainerWorker._sampled(SimpleNamespace(temperature=1.0, top_p=1.0), logits, ids)
    at_07, _ = TrainerWorker._sampled(SimpleNamespace(temperature=0.7, top_p=1.0), logits, ids)
    assert (at_1 - at_07).abs().mean() > 0.1
