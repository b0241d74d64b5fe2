"""``posttrain export RUN_DIR --merge``: the merged model of a LoRA run, as a Hugging Face directory.

A LoRA run exports its adapter (``RUN_DIR/hf``: PEFT's ``adapter_model.safetensors`` +
``adapter_config.json``). Merging rebuilds the run's base model from its resolved
``config.yaml`` (``model`` section: the same path, or the same factory spec and seed), loads the
adapter, folds ``W + alpha/r * B @ A`` into every adapted layer and saves a plain checkpoint that
transformers and vLLM load without PEFT.
"""

from __future__ import annotations

import os

import yaml

from posttrain.config.errors import PosttrainError


class ExportError(PosttrainError):
    pass


def export_merged(run_dir: str, out_dir: str | None = None) -> str:
    """Write the merged model of the LoRA run in ``run_dir`` to ``out_dir`` (default RUN_DIR/hf_merged)."""
    from posttrain.config.targets import build_dataclass
    from posttrain.models.factory import check_tokenizer_roundtrip
    from posttrain.models.loading import ModelConfig, load_causal_lm, load_tokenizer
    from posttrain.models.lora import load_adapter, merge_lora
    from posttrain.models.tokenizer import CHAT_TEMPLATE

    config_path, adapter_dir = os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, "hf")
    if not os.path.isfile(config_path):
        raise ExportError(f"{run_dir} has no config.yaml.\n  fix: give the directory of a finished run (posttrain run writes config.yaml there)")
    with open(config_path) as f:
        model_cfg = build_dataclass(ModelConfig, (yaml.safe_load(f) or {}).get("model") or {}, "model", config_path)
    if model_cfg.lora is None:
        raise ExportError(f"{run_dir} is not a LoRA run (its config has no model.lora): {adapter_dir} already holds the full model.\n"
                          "  fix: use RUN_DIR/hf as it is; --merge is for runs trained with model.lora")
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise ExportError(f"no adapter in {adapter_dir}.\n  fix: let the run finish with checkpoint.export_hf=true (it writes the adapter there)")
    model = load_causal_lm(model_cfg)
    load_adapter(model, adapter_dir)
    merge_lora(model)
    out_dir = out_dir or os.path.join(run_dir, "hf_merged")
    model.save_pretrained(out_dir, safe_serialization=True)
    tok = load_tokenizer(model_cfg)
    tok.save_pretrained(out_dir)
    if getattr(tok, "chat_template", "") == CHAT_TEMPLATE:
        check_tokenizer_roundtrip(out_dir)
    return out_dir
