"""Receiver side of LoRA sync: checks on adapter versions and the worker's merge (no vLLM here)."""

from __future__ import annotations

import pytest
import torch
from posttrain.rollout.adapter_merge import AdapterMerger, CheckpointBase
from posttrain.rollout.weight_receiver import ParamManifest, WeightUpdateSession

from posttrain.models.factory import TinyModelSpec, save_tiny_model
from posttrain.models.lora import LoRAConfig, adapter_wire_tensors, apply_lora, lora_modules, merge_lora
from posttrain.weight_sync import WeightSender, WeightSyncError

SPEC = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}  # vLLM Llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(SPEC, str(tmp_path_factory.mktemp("base")))


def _adapted(model_dir, targets, seed):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    apply_lora(model, LoRAConfig(r=4, alpha=8.0, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return model


def _sync(model_dir, model, merger, version):
    """One adapter version through the real sender, session checks and merger; name -> loaded tensor."""
    manifest = ParamManifest.from_checkpoint(model_dir, torch.float32, True)
    session = WeightUpdateSession(manifest, version - 1, version)
    merger.start()
    loaded = {}
    for bucket in WeightSender(bucket_bytes=4096).buckets(adapter_wire_tensors(model), version):
        checked = session.accept(bucket)
        loaded.update((n, t.clone()) for n, t in merger.tensors(checked.tensors(), checked.is_last))
    session.finish()
    return loaded


def test_repeated_syncs_replace_the_delta_and_fill_fused_siblings(model_dir):
    merger = AdapterMerger(CheckpointBase(model_dir, torch.float32), PACKED)
    first = _adapted(model_dir, ["q_proj", "up_proj"], seed=0)
    _sync(model_dir, first, merger, 1)
    second = _adapted(model_dir, ["q_proj", "up_proj"], seed=1)
    loaded = _sync(model_dir, second, merger, 2)
    want = merge_lora(second).state_dict()
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    # version 2 = base + version 2's delta, not + version 1's as well
    assert (loaded[q] - want[q]).abs().max() < 1e-6
    assert (loaded["model.layers.1.mlp.up_proj.weight"] - want["model.layers.1.mlp.up_proj.weight"]).abs().max() < 1e-6
    # fused siblings without adapters come from the kept base, so qkv_proj / gate_up_proj load whole
    assert torch.equal(loaded[k], want[k]) and "model.layers.1.mlp.gate_proj.weight" in loaded
    assert "model.layers.0.self_attn.o_proj.weight" not in loaded  # untouched layers are not reloaded


def test_session_rejects_half_adapters_and_wrong_shapes(model_dir):
    manifest = ParamManifest.from_checkpoint(model_dir, torch.float32, True)
    model = _adapted(model_dir, ["q_proj"], seed=0)
    wire = adapter_wire_tensors(model)
    session = WeightUpdateSession(manifest, 0, 1)
    for bucket in WeightSender().buckets([t for t in wire if t[0].endswith(":lora_A")], 1):
        session.accept(bucket)
    with pytest.raises(WeightSyncError, match="both halves"):
        session.finish()
    bad = [(wire[0][0], torch.zeros(4, 7))]
    with pytest.raises(WeightSyncError, match="input features"):
        for bucket in WeightSender().buckets(bad, 1):
            WeightUpdateSession(manifest, 0, 1).accept(bucket)


def test_hf_engine_serves_the_merged_adapters(model_dir):
    from posttrain.rollout.hf_engine import HFEngine, HFEngineConfig

    engine = HFEngine(HFEngineConfig(model_path=model_dir))
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    for version, seed in ((1, 0), (2, 1)):  # the second version replaces the first delta
        model = _adapted(model_dir, ["q_proj", "down_proj"], seed)
        report = engine.load_weights(WeightSender(bucket_bytes=4096).buckets(adapter_wire_tensors(model), version), version)
        assert report.version == version
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = engine.model(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4
