"""Model and tokenizer loading: a local Hugging Face checkpoint or a tiny-model factory spec.

In a trainer group of several ranks only rank 0 reads the weights; the other ranks build the same
model on the meta device (no bytes), and the trainer engine shards it and broadcasts rank 0's
weights into the shards (``posttrain.engine.trainer.materialize_sharded``). A 30B model thus costs
one host copy per node's rank 0, not one per rank, and never lands whole on a device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from posttrain.config.errors import ModelLoadError
from posttrain.models.factory import TinyModelSpec, build_config, build_on_meta, build_tiny_model
from posttrain.models.lora import LoRAConfig, apply_lora
from posttrain.models.tokenizer import build_char_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Which model to train. Exactly one of ``path`` (local HF directory) or ``factory`` is set."""

    path: str | None = None
    factory: TinyModelSpec | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # parameter dtype (fp32 master weights)
    trust_remote_code: bool = False
    activation_checkpointing: bool = False
    moe_kernels: Literal["triton", "grouped_mm", "eager"] = "eager"
    lora: LoRAConfig | None = None  # train low-rank adapters only (posttrain.models.lora); None: full fine-tuning
    # LM head fused with the logprob, chunked over tokens (posttrain.engine.head_logprobs): no
    # [B, T, V] logits in the trainer. Exact; false: full logits, then the chunked logprob.
    fused_lm_head: bool = True

    def validate(self) -> tuple[str, str, str] | None:
        if (self.path is None) == (self.factory is None):
            return ("path", "set exactly one of model.path and model.factory", "give model.path=/local/checkpoint or a model.factory spec")
        return None


def _check_path(path: str) -> None:
    if not os.path.isdir(path):
        raise ModelLoadError(
            f"model path '{path}' does not exist or is not a directory.\n"
            "  fix: point model.path at a local Hugging Face checkpoint directory (config.json + *.safetensors), "
            "or use model.factory for a tiny model built from config (nothing is downloaded)"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(f"model path '{path}' has no config.json.\n  fix: export the checkpoint with save_pretrained, or point at its directory")
    if not os.access(os.path.join(path, "config.json"), os.R_OK):
        raise ModelLoadError(f"model path '{path}' is not readable.\n  fix: check file permissions")
    if not any(f.endswith(".safetensors") or f == "model.safetensors.index.json" for f in os.listdir(path)):
        raise ModelLoadError(
            f"model path '{path}' has config.json but no *.safetensors weights.\n"
            "  fix: save the model with save_pretrained(..., safe_serialization=True) into that directory, "
            "or point model.path at the directory that holds the weights"
        )


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer for ``cfg``: the in-code character tokenizer for factory models."""
    if cfg.factory is not None:
        return build_char_tokenizer()
    _check_path(cfg.path)
    try:
        tok = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from '{cfg.path}': {exc}\n  fix: save the tokenizer next to the weights") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def skeleton_rank() -> bool:
    """Whether this process builds models on the meta device: a rank other than 0 of an initialised
    process group of more than one rank (rank 0 loads the weights and broadcasts them)."""
    return dist.is_initialized() and dist.get_world_size() > 1 and dist.get_rank() != 0


def model_config(cfg: ModelConfig) -> PretrainedConfig:
    """The model's transformers config, from ``config.json`` or the factory spec (no weights read)."""
    if cfg.factory is not None:
        return build_config(cfg.factory)
    if not os.path.isfile(os.path.join(cfg.path or "", "config.json")):
        _check_path(cfg.path)
    try:
        return AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the model config in '{cfg.path}': {exc}\n  fix: check its config.json") from None


def load_causal_lm(cfg: ModelConfig, meta: bool | None = None) -> PreTrainedModel:
    """A causal LM from a local path or the factory, in ``cfg.dtype``.

    ``meta``: build the model on the meta device from its config (no weights read); None: on the
    ranks that :func:`skeleton_rank` names.
    """
    dtype = DTYPES[cfg.dtype]
    if meta is None:
        meta = skeleton_rank()
    if meta:
        if cfg.path is not None:
            _check_path(cfg.path)  # the same message on every rank as rank 0's load gives
        model = build_on_meta(model_config(cfg), dtype, AutoModelForCausalLM, cfg.trust_remote_code)
    elif cfg.factory is not None:
        model = build_tiny_model(cfg.factory, dtype=dtype)
    else:
        _check_path(cfg.path)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.path, dtype=dtype, trust_remote_code=cfg.trust_remote_code, local_files_only=True, use_safetensors=True
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load a causal LM from '{cfg.path}': {exc}\n  fix: check the checkpoint (safetensors weights)") from None
    apply_moe_kernels(model, cfg.moe_kernels)
    if cfg.lora is not None:
        apply_lora(model, cfg.lora)
    return model


def load_sequence_classifier(cfg: ModelConfig) -> PreTrainedModel:
    """A scalar-head sequence classifier (reward model); from a causal-LM path the head is new."""
    dtype = DTYPES[cfg.dtype]
    if skeleton_rank():  # rank 0 loads, the trainer engine broadcasts (module docstring)
        config = model_config(cfg)
        config.num_labels = 1
        model = build_on_meta(config, dtype, AutoModelForSequenceClassification, cfg.trust_remote_code)
    elif cfg.factory is not None:
        config = build_config(cfg.factory)
        config.num_labels = 1
        with torch.random.fork_rng():
            torch.manual_seed(cfg.factory.seed)
            model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    else:
        _check_path(cfg.path)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                cfg.path, num_labels=1, dtype=dtype, trust_remote_code=cfg.trust_remote_code, local_files_only=True, use_safetensors=True
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load a reward model from '{cfg.path}': {exc}\n  fix: check the checkpoint") from None
    apply_moe_kernels(model, cfg.moe_kernels)
    return model


def apply_moe_kernels(model: PreTrainedModel, kind: str) -> None:
    """Set ``model.moe_kernels`` on any model (policy, reference, reward, value) that has routed experts.

    MoE is detected by module structure (3-D expert weights), not by a config field, so
    DeepSeek-V3 (``n_routed_experts``), Mixtral (``num_local_experts``), Qwen3-MoE and OLMoE are
    all covered. Every kind is applied, "eager" included: transformers' own default is not the
    per-expert loop. Dense models are left alone.
    """
    from posttrain.models.moe_experts import experts_modules, set_moe_kernels  # imports the kernels package

    if experts_modules(model):
        set_moe_kernels(model, kind)
