"""The MoE name/layout mapping against a checkpoint transformers itself wrote: the trainer's fused
experts, mapped, are exactly the checkpoint's per-expert tensors (names, shapes and values)."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from posttrain.models.factory import TinyModelSpec, build_tiny_model, save_tiny_model
from posttrain.sync.names import engine_tensors


def test_fused_experts_map_to_the_checkpoint_layout(tmp_path):
    spec = TinyModelSpec(arch="qwen3_moe", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, moe_intermediate_size=48)
    model_dir = save_tiny_model(spec, str(tmp_path))
    checkpoint = {}
    for f in os.listdir(model_dir):
        if f.endswith(".safetensors"):
            checkpoint.update(load_file(os.path.join(model_dir, f)))
    model = build_tiny_model(spec)
    assert "model.layers.0.mlp.experts.gate_up_proj" in model.state_dict()
    mapped = dict(engine_tensors(model.state_dict().items(), model.config.model_type))
    assert set(checkpoint) == set(mapped) - {"lm_head.weight"}  # tied: the checkpoint has no head
    for name, tensor in checkpoint.items():
        assert torch.equal(mapped[name], tensor), name
    assert mapped["model.layers.1.mlp.experts.3.up_proj.weight"].shape == (48, 64)


def test_dense_names_pass_through_untouched():
    model = build_tiny_model(TinyModelSpec())
    sd = model.state_dict()
    assert [(n, t.data_ptr()) for n, t in engine_tensors(sd.items(), "llama")] == [(n, t.data_ptr()) for n, t in sd.items()]
