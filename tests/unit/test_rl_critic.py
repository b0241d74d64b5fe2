"""PPO's value model: built from a factory model (no checkpoint) and from a saved one, with every
dropout off (value clipping compares its values with those of a deterministic forward)."""

from __future__ import annotations

import torch

from posttrain.models.factory import TinyModelSpec, save_tiny_model
from posttrain.models.loading import ModelConfig, load_causal_lm
from posttrain.rl.trainer_worker import critic_model

SPEC = TinyModelSpec(arch="llama", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)


def _dropouts(model: torch.nn.Module) -> list[float]:
    return [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]


def _deterministic_in_train_mode(model: torch.nn.Module) -> bool:
    model.train()
    ids = torch.randint(5, 60, (2, 7))
    return torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_critic_from_a_factory_model_has_one_label_and_no_dropout():
    cfg = ModelConfig(factory=SPEC)
    critic = critic_model(cfg, load_causal_lm(cfg).config)
    assert critic.config.num_labels == 1 and critic.score.out_features == 1
    assert all(p == 0.0 for p in _dropouts(critic)) and _deterministic_in_train_mode(critic)


def test_critic_from_a_checkpoint_has_no_dropout(tmp_path):
    save_tiny_model(SPEC, str(tmp_path / "m"))
    cfg = ModelConfig(path=str(tmp_path / "m"))
    critic = critic_model(cfg, load_causal_lm(cfg).config)
    assert all(p == 0.0 for p in _dropouts(critic)) and _deterministic_in_train_mode(critic)
