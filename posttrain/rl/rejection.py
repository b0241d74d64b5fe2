"""Rejection sampling: generate n per prompt with the rollout workers, score with the reward
graph, keep the best (top-k per prompt, optionally above a threshold), write an SFT dataset,
and train on it with the offline SFT runner.

    posttrain run recipes/rs_tiny_arith.yaml
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any

from posttrain.config.preflight import rl_prompt_limit
from posttrain.config.schema import RecipeConfig
from posttrain.config.targets import build_target
from posttrain.data.formatting import make_rl_prompt
from posttrain.data.sampler import ResumableSampler
from posttrain.data.sources import DatasetSource, build_examples, load_rows
from posttrain.data.templates import apply_templates
from posttrain.offline.sft import SFTConfig
from posttrain.types import PromptRecord


@dataclass
class RejectionSamplingConfig:
    """``algorithm: {_target_: posttrain.rl.rejection.RejectionSamplingConfig, ...}``.

    The SFT stage uses the recipe's ``trainer``/``model``/``data.eval`` sections; its training
    data is the kept samples, written to ``<run_dir>/<output>``.
    """

    num_prompts: int = 256
    top_k: int = 1  # samples kept per prompt (best first)
    min_reward: float | None = None  # keep only samples scoring at least this
    output: str = "rejection_sampled.jsonl"
    sft: SFTConfig = field(default_factory=SFTConfig)

    def build(self):
        return self

    def sections(self) -> dict[str, type]:
        from posttrain.rewards.config import RewardGraphConfig
        from posttrain.rl.config import ClusterConfig, RolloutSection

        return {"rollout": RolloutSection, "reward": RewardGraphConfig, "cluster": ClusterConfig}

    def derived_counts(self, cfg) -> dict[str, Any]:
        n = cfg.rollout.sampling.n
        return {"prompts": self.num_prompts, "samples_generated": self.num_prompts * n, "kept_at_most": self.num_prompts * self.top_k,
                "sft_steps": cfg.trainer.max_steps}

    @property
    def runner(self):
        return run_rejection_sampling


def select(rewards: list[float | None], top_k: int, min_reward: float | None) -> list[int]:
    """Indices of the kept samples of one group: best first, masked (None) never kept."""
    scored = [(r, i) for i, r in enumerate(rewards) if r is not None and (min_reward is None or r >= min_reward)]
    return [i for _, i in sorted(scored, key=lambda t: (-t[0], t[1]))[:top_k]]


def sample_and_select(cfg: RecipeConfig, run_dir: str) -> tuple[str, dict[str, float]]:
    """Generate, score, keep; returns (path of the SFT jsonl, stats)."""
    import ray

    from posttrain.diagnose import remote_class
    from posttrain.models.loading import load_tokenizer
    from posttrain.rewards.config import build_reward_graph
    from posttrain.rl.placement import (
        actor_options,
        check_resources,
        placement_group,
        plan_placement,
        start_ray,
    )
    from posttrain.rollout.actor import RolloutWorker

    algo, tok = cfg.algorithm, apply_templates(load_tokenizer(cfg.model), cfg.data)
    rows = load_rows(cfg.data.train, "data.train", cfg.data.fields)
    limit = rl_prompt_limit(cfg)  # prompts the engine has no room for are bad rows, as in GRPO
    made, rows = build_examples(rows, lambda r: make_rl_prompt(tok, r, limit), cfg.data.max_bad_fraction, "data.train")
    order = ResumableSampler(len(rows), cfg.run.seed, cfg.data.shuffle).take(min(algo.num_prompts, len(rows)))
    prompts = [PromptRecord(j, *made[i], dict(rows[i])) for j, i in enumerate(order)]  # (text, token ids): the engine has room

    start_ray(cfg.cluster)
    plan = plan_placement(cfg.cluster, cfg.rollout, 0)
    check_resources(plan)
    pg = placement_group(plan)
    engine_cfg = build_target({**cfg.rollout.engine, "model_path": cfg.model.path}, "rollout.engine", "recipe")
    workers = [remote_class(RolloutWorker).options(**actor_options(pg, b, plan.rollout_resources)).remote(engine_cfg) for b in plan.rollout_bundle]
    try:
        sampling = cfg.rollout.sampling
        shards = ray.get([w.generate.remote(prompts[i :: len(workers)], sampling) for i, w in enumerate(workers)])
    finally:
        for w in workers:
            ray.kill(w)
        ray.util.remove_placement_group(pg)
    groups = sorted((g for s in shards for g in s), key=lambda g: g.prompt.ordinal)
    graph = build_reward_graph(cfg.reward)
    scored, metrics = graph.score_groups_sync(groups)
    graph.close()
    out = os.path.join(run_dir, algo.output)
    kept_rewards = []
    with open(out, "w") as f:
        for sg in scored:
            for i in select(sg.rewards, algo.top_k, algo.min_reward):
                kept_rewards.append(sg.rewards[i])
                f.write(json.dumps({"prompt": sg.group.prompt.fields["prompt"], "response": sg.group.completions[i].text}) + "\n")
    stats = {
        "rs/prompts": float(len(groups)), "rs/samples": float(sum(len(g.completions) for g in groups)), "rs/kept": float(len(kept_rewards)),
        "rs/kept_reward_mean": sum(kept_rewards) / max(1, len(kept_rewards)), "rs/reward_mean_all": metrics.get("reward/mean", float("nan")),
    }
    return out, stats


def run_rejection_sampling(cfg: RecipeConfig, resolved: dict[str, Any], run_dir: str) -> dict[str, Any]:
    from posttrain.offline.runner import run_offline

    if not cfg.model.path:
        from posttrain.config.errors import ConfigError

        raise ConfigError("model.path", "recipe", "rejection sampling serves a checkpoint with vLLM", "set model.path to an HF directory")
    data_path, stats = sample_and_select(cfg, run_dir)
    if stats["rs/kept"] == 0:
        from posttrain.config.errors import DataError

        raise DataError(f"rejection sampling kept no samples (min_reward={cfg.algorithm.min_reward}).\n  fix: lower algorithm.min_reward or raise rollout.sampling.n")
    sft_cfg = copy.copy(cfg)
    sft_cfg.algorithm = cfg.algorithm.sft
    sft_cfg.data = copy.copy(cfg.data)
    sft_cfg.data.train = DatasetSource(path=data_path)
    sft_cfg.rollout = sft_cfg.reward = sft_cfg.cluster = None
    summary = run_offline(sft_cfg, resolved, run_dir)
    summary["rejection_sampling"] = stats
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
