"""The rollout Ray actor on a real local Ray instance, with a real vLLM engine inside."""

from __future__ import annotations

import pytest
from posttrain.rollout.sampling import SamplingConfig
from rollout_contract import assert_well_formed, hf_logprobs

from posttrain.weight_sync import WeightSender, check_probe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_actor_generates_and_takes_weights_through_the_object_store(
    ray_local, model_a_dir, model_b, prompts, probe_ids
):
    ray = ray_local
    from posttrain.rollout.actor import start_rollout_actor
    from posttrain.rollout.vllm_engine import VLLMEngineConfig

    config = VLLMEngineConfig(model_path=model_a_dir, max_model_len=256, cpu_kv_cache_gib=0.25)
    actor = start_rollout_actor(config, num_cpus=1)
    health = ray.get(actor.health.remote(), timeout=300)
    assert health["engine"] == "VLLMEngine" and health["version"] == 0

    sampling = SamplingConfig(n=2, max_tokens=8, seed=0)
    groups = ray.get(actor.generate.remote(prompts, sampling))
    assert_well_formed(groups, prompts, sampling, version=0)

    refs = [ray.put(b) for b in WeightSender(bucket_bytes=512 << 10).buckets(model_b.state_dict(), 1)]
    report = ray.get(actor.update_weights.remote(refs, 1))
    assert report.version == 1 and report.num_buckets == len(refs) > 1
    assert ray.get(actor.version.remote()) == 1
    engine_lp = ray.get(actor.score_tokens.remote([probe_ids]))
    assert check_probe(engine_lp, [hf_logprobs(model_b, probe_ids)], version=1) < 1e-4

    ray.get(actor.sleep.remote())  # CPU: logged no-op, but generate is refused until wake_up
    with pytest.raises(ray.exceptions.RayTaskError, match="asleep"):
        ray.get(actor.generate.remote(prompts, sampling))
    ray.get(actor.wake_up.remote())
    groups = ray.get(actor.generate.remote(prompts, sampling))
    assert_well_formed(groups, prompts, sampling, version=1)
    ray.get(actor.close.remote())
    ray.kill(actor)
