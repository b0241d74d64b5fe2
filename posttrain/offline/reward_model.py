"""Reward-model training: Bradley–Terry loss on a scalar sequence-classification head."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.algorithms.offline_losses import bradley_terry_loss
from posttrain.models.loading import load_sequence_classifier
from posttrain.offline.common import Batch
from posttrain.offline.dpo import PreferencePairs
from posttrain.rewards.reward_model import sequence_scores


@dataclass
class RewardModelConfig:
    """``algorithm: {_target_: posttrain.offline.reward_model.RewardModelConfig}``."""

    margin: float = 0.0  # demand chosen - rejected >= margin

    def build(self) -> RewardModelTraining:
        return RewardModelTraining(self)


def scores(model, batch: Batch) -> torch.Tensor:
    """Scalar score per sequence at its last attended token, [2B] (chosen first)."""
    return sequence_scores(model, batch["input_ids_BT"], batch["attention_mask_BT"])


class RewardModelTraining(PreferencePairs):
    needs_reference = False

    def __init__(self, cfg: RewardModelConfig) -> None:
        self.cfg = cfg

    def load_model(self, model_cfg) -> torch.nn.Module:
        return load_sequence_classifier(model_cfg)


    def loss(self, model, batch: Batch, global_count: float):
        s = scores(model, batch)
        B = s.shape[0] // 2
        margin = torch.full((B,), self.cfg.margin) if self.cfg.margin else None
        return bradley_terry_loss(s[:B], s[B:], global_count, margin)

    def evaluate(self, model, examples, rows, tokenizer, checker, max_new_tokens: int = 16) -> dict[str, float]:
        """Held-out pairwise accuracy."""
        with torch.no_grad():
            s = scores(model, self.collate(examples, tokenizer.pad_token_id))
        B = s.shape[0] // 2
        return {"pair_accuracy": float((s[:B] > s[B:]).float().mean())}
