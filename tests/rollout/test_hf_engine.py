"""HFEngine meets the same contract as VLLMEngine (records, determinism, weight sync, probe)."""

from __future__ import annotations

import pytest
import torch
from posttrain.rollout.actor import RolloutWorker
from posttrain.rollout.engine import RolloutEngine
from posttrain.rollout.hf_engine import HFEngine, HFEngineConfig
from posttrain.rollout.sampling import SamplingConfig
from rollout_contract import assert_request_caps, assert_well_formed, hf_logprobs

from posttrain.weight_sync import WeightSender, WeightSyncError, WeightSyncProbeError, check_probe


@pytest.fixture()
def engine(model_a_dir: str) -> HFEngine:
    return HFEngine(HFEngineConfig(model_path=model_a_dir, device="cpu", max_model_len=256))


def test_generate_contract_and_seed_determinism(engine, prompts):
    assert isinstance(engine, RolloutEngine)
    sampling = SamplingConfig(n=3, temperature=1.0, max_tokens=12, seed=7)
    groups = engine.generate(prompts, sampling)
    assert_well_formed(groups, prompts, sampling, version=0)
    again = engine.generate(prompts, sampling)
    assert [c.token_ids for g in again for c in g.completions] == [
        c.token_ids for g in groups for c in g.completions
    ]
    other = engine.generate(prompts, SamplingConfig(n=3, temperature=1.0, max_tokens=12, seed=8))
    assert [c.token_ids for g in other for c in g.completions] != [
        c.token_ids for g in groups for c in g.completions
    ]


def test_batch_seed_reproduces_a_batch(engine, prompts):
    sampling = SamplingConfig(n=3, temperature=1.0, max_tokens=12, batch_seed=7)
    tokens = [c.token_ids for g in engine.generate(prompts, sampling) for c in g.completions]
    engine.generate(prompts, SamplingConfig(n=3, temperature=1.0, max_tokens=12))
    assert tokens == [c.token_ids for g in engine.generate(prompts, sampling) for c in g.completions]
    other = SamplingConfig(n=3, temperature=1.0, max_tokens=12, batch_seed=8)
    assert tokens != [c.token_ids for g in engine.generate(prompts, other) for c in g.completions]


def test_behaviour_logprobs_match_a_forward_pass(engine, prompts):
    """At temperature 1 the behaviour logprobs are the model's own: re-score unpadded and compare."""
    # prompts of different lengths: the batch is left-padded, which must not change the logprobs
    groups = engine.generate(prompts, SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=0))
    for c in [c for g in groups for c in g.completions]:
        full = c.prompt.token_ids + c.token_ids
        rescored = engine.score_tokens([full])[0][len(c.prompt.token_ids) - 1 :]
        assert max(abs(a - b) for a, b in zip(rescored, c.logprobs, strict=True)) < 1e-4


def test_stop_string_ends_completion(engine, prompts):
    # sample once, then stop at a character from the middle of what the same seed writes
    sampling = SamplingConfig(n=1, temperature=1.0, max_tokens=16, seed=3)
    text = engine.generate(prompts[:1], sampling)[0].completions[0].text
    assert len(text) >= 4
    stop = text[len(text) // 2]
    stopped = SamplingConfig(n=1, temperature=1.0, max_tokens=16, seed=3, stop=[stop])
    c = engine.generate(prompts[:1], stopped)[0].completions[0]
    assert c.finish_reason == "stop" and c.text == text[: text.index(stop)]
    assert len(c.token_ids) == len(c.logprobs) < 16


def test_weight_sync_then_probe(engine, model_b, probe_ids):
    with pytest.raises(WeightSyncProbeError):  # sync skipped: engine still serves model A
        check_probe(engine.score_tokens([probe_ids]), [hf_logprobs(model_b, probe_ids)], version=0)
    report = engine.load_weights(
        WeightSender(bucket_bytes=256 << 10).buckets(model_b.state_dict(), 1), version=1
    )
    assert engine.version == 1 and report.num_buckets > 1
    gap = check_probe(engine.score_tokens([probe_ids]), [hf_logprobs(model_b, probe_ids)], version=1)
    assert gap < 1e-4


def test_partial_update_is_never_served(engine, model_b, prompts):
    sd = {k: v for k, v in model_b.state_dict().items() if "layers.3." not in k}
    with pytest.raises(WeightSyncError, match="parameters out"):
        engine.load_weights(WeightSender().buckets(sd, 1), version=1)
    with pytest.raises(WeightSyncError, match="partial weights"):
        engine.generate(prompts, SamplingConfig(max_tokens=4))
    engine.load_weights(WeightSender().buckets(model_b.state_dict(), 2), version=2)
    assert engine.version == 2 and engine.generate(prompts[:1], SamplingConfig(max_tokens=4))


def test_rollout_worker_verbs_without_ray(model_a_dir, model_b, prompts):
    worker = RolloutWorker(HFEngineConfig(model_path=model_a_dir, device="cpu", max_model_len=256))
    worker.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        worker.generate(prompts, SamplingConfig(max_tokens=4))
    worker.wake_up()
    buckets = list(WeightSender().buckets(model_b.state_dict(), 5))
    assert worker.update_weights(buckets, 5).version == 5
    assert worker.version() == 5 and worker.health()["version"] == 5
    groups = worker.generate(prompts, SamplingConfig(n=2, max_tokens=4, seed=0))
    assert all(c.versions == [5] * len(c.token_ids) for g in groups for c in g.completions)
    assert torch.isfinite(torch.tensor(worker.score_tokens([[1, 5, 6]])[0])).all()


def test_a_request_caps_its_own_tokens(engine, prompts):
    assert_request_caps(engine, prompts, 0)
