"""Tiny-model factory: Qwen2/Llama-shaped dense models and a Qwen3-MoE-shaped model from config.

Recipes name a model either by a local path (`model.path`) or by a factory spec
(`model.factory`). The factory builds randomly initialised weights at any size, paired with the
in-code character tokenizer, and can save both as a Hugging Face directory that transformers and
vLLM load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from posttrain.models.tokenizer import build_char_tokenizer

Arch = Literal["qwen2", "llama", "qwen3_moe"]


@dataclass
class TinyModelSpec:
    """Shape of a model built from scratch. Defaults give a ~0.8M-parameter Llama.

    Saved factory models default to Llama: transformers 5 replaces the tokenizer of a saved
    ``qwen2`` directory with its own byte-level Qwen2Tokenizer, which does not round-trip the
    in-code character tokenizer (``save_tiny_model`` checks this and refuses)."""

    arch: Arch = "llama"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    vocab_size: int = 128  # >= tokenizer size (101); rounded for kernels
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True
    # MoE only (arch == "qwen3_moe")
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128
    seed: int = 0


def build_config(spec: TinyModelSpec) -> PretrainedConfig:
    head_dim = spec.hidden_size // spec.num_heads
    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        rms_norm_eps=1e-6,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    if spec.arch == "qwen2":
        return AutoConfig.for_model("qwen2", **common)
    if spec.arch == "llama":
        return AutoConfig.for_model("llama", head_dim=head_dim, **common)
    if spec.arch == "qwen3_moe":
        return AutoConfig.for_model(
            "qwen3_moe",
            head_dim=head_dim,
            num_experts=spec.num_experts,
            num_experts_per_tok=spec.num_experts_per_tok,
            moe_intermediate_size=spec.moe_intermediate_size,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            **common,
        )
    raise ValueError(f"unknown tiny-model arch {spec.arch!r}; use one of qwen2, llama, qwen3_moe")


def build_tiny_model(spec: TinyModelSpec, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Randomly initialised causal LM of the given shape (deterministic in ``spec.seed``)."""
    config = build_config(spec)
    tok = build_char_tokenizer()
    if len(tok) > spec.vocab_size:
        raise ValueError(f"model.factory.vocab_size={spec.vocab_size} is smaller than the tokenizer ({len(tok)})")
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def build_on_meta(config: PretrainedConfig, dtype: torch.dtype, cls=AutoModelForCausalLM, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model of ``config`` on the meta device: every parameter and buffer has its shape and
    dtype but no storage. Costs no memory (a 30B MoE builds in under a second), so the memory plan
    and the trainer ranks that receive their weights by broadcast start from it."""
    with torch.device("meta"):
        return cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def save_tiny_model(spec: TinyModelSpec, out_dir: str) -> str:
    """Build and save model + tokenizer as a Hugging Face directory (safetensors)."""
    model = build_tiny_model(spec)
    model.save_pretrained(out_dir, safe_serialization=True)
    build_char_tokenizer().save_pretrained(out_dir)
    check_tokenizer_roundtrip(out_dir)
    return out_dir


def check_tokenizer_roundtrip(model_dir: str) -> None:
    """Raise if the tokenizer saved in ``model_dir`` does not load back as the in-code one."""
    from transformers import AutoTokenizer

    probe = "<|im_start|>user\n12+34=<|im_end|>\n"
    want = build_char_tokenizer()(probe, add_special_tokens=False)["input_ids"]
    got = AutoTokenizer.from_pretrained(model_dir)(probe, add_special_tokens=False)["input_ids"]
    if got != want:
        raise ValueError(
            f"the character tokenizer saved in {model_dir} loads back differently ({got[:8]}... != {want[:8]}...): "
            "transformers substitutes its own tokenizer for this model type. Use arch: llama (or qwen3_moe) for saved tiny models."
        )


def spec_dict(spec: TinyModelSpec) -> dict:
    return asdict(spec)
