"""The reward model's score is read at the last attended token, whatever the config's pad id."""

from __future__ import annotations

import pytest
import torch
from posttrain.rewards.reward_model import last_token_index, sequence_scores
from transformers import LlamaConfig, LlamaForSequenceClassification


def _model(pad_token_id):
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=pad_token_id)
    torch.manual_seed(0)
    return LlamaForSequenceClassification(cfg).eval()


def _alone(model, ids):
    """Score of one unpadded sequence: the last position's logit (no padding to find)."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [1, 3, 0]
    with pytest.raises(ValueError, match="no attended token"):
        last_token_index(torch.tensor([[0, 0]]))


@pytest.mark.parametrize("config_pad", [None, 5, 0])
@pytest.mark.parametrize("side", ["right", "left"])
def test_scores_equal_unpadded_scores(config_pad, side):
    model = _model(config_pad)
    a, b = [3, 7, 5, 9, 11], [4, 5, 2]  # both contain 5, one of the config pad ids tried
    tokenizer_pad = 0
    pad = [tokenizer_pad] * (len(a) - len(b))
    ids_b = b + pad if side == "right" else pad + b
    mask_b = [1] * len(b) + [0] * len(pad) if side == "right" else [0] * len(pad) + [1] * len(b)
    ids = torch.tensor([a, ids_b])
    mask = torch.tensor([[1] * len(a), mask_b])
    with torch.no_grad():
        got = sequence_scores(model, ids, mask)
    assert got.tolist() == pytest.approx([_alone(model, a), _alone(model, b)], abs=1e-5)
    assert model.config.pad_token_id == config_pad  # the temporary pad id is restored


def test_scores_are_differentiable_for_reward_model_training():
    model = _model(None).train()
    ids, mask = torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    sequence_scores(model, ids, mask).sum().backward()
    assert model.score.weight.grad is not None and model.score.weight.grad.abs().sum() > 0
