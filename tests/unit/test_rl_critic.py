"""PPO's value model: built from a factory model (no checkpoint) and from a saved one, with every
dropout off (value clipping compares its values with those of a deterministic forward)."""

from __future__ import annotations

import pytest
import torch

from posttrain.models.factory import TinyModelSpec, save_tiny_model
from posttrain.models.loading import ModelConfig, load_causal_lm
from posttrain.rl.trainer_worker import critic_model, disable_dropout

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


def _family_configs():
    """Tiny configs of three families, each with its own dropout keys at 0.1."""
    from transformers import GPT2Config, LlamaConfig, PhiConfig

    gpt2 = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                      resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, summary_first_dropout=0.1)  # fmt: skip
    phi = PhiConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                    max_position_embeddings=32, resid_pdrop=0.1, embd_pdrop=0.1, attention_dropout=0.1)  # fmt: skip
    llama = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, max_position_embeddings=32, attention_dropout=0.1)  # fmt: skip
    return {"gpt2": gpt2, "phi": phi, "llama": llama}


@pytest.mark.parametrize("family", ["gpt2", "phi", "llama"])
def test_critic_of_any_family_has_no_dropout(family):
    config = _family_configs()[family]
    # the policy of the same config does have active dropout: the check below can fail
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    assert not _deterministic_in_train_mode(policy)
    torch.manual_seed(0)
    critic = critic_model(ModelConfig(factory=SPEC), config)
    assert critic.config.num_labels == 1
    assert all(p == 0.0 for p in _dropouts(critic))
    assert _deterministic_in_train_mode(critic)
    assert disable_dropout(critic) == 0  # nothing left to switch off
    assert config.resid_pdrop if family != "llama" else config.attention_dropout  # the policy's config untouched


def test_disable_dropout_reaches_functional_probabilities_on_modules():
    """A module that holds its dropout as a float (read as ``dropout=p if self.training``)."""

    class Attn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention_dropout, self.resid_pdrop, self.scale = 0.1, 0.2, 0.5
            self.drop = torch.nn.Dropout(0.3)

    m = torch.nn.Sequential(Attn())
    assert disable_dropout(m) == 3
    assert (m[0].attention_dropout, m[0].resid_pdrop, m[0].drop.p, m[0].scale) == (0.0, 0.0, 0.0, 0.5)
