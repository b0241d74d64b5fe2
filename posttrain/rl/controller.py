"""The online-RL driver: builds the rooms of one run, picks the loop, recovers. Nothing imports it
(the CLI finds ``run_rl`` by the import path ``OnlineRLConfig.runner``).

One step, in either loop::

    prompts (PromptStream) ──► rollout workers (WorkerFleet, version v)
        ──► Step: ledger ─► reward graph ─► batch ─► forward/KL/advantages ─► TrainerGroup.train
        ──► WeightPublisher: push ─► load ─► probe ─► workers serve v+1
        ──► evaluation, metrics log, checkpoint (Checkpointer)

The rooms (see posttrain/rl/README.md): ``trainers`` (the ranks and their typed verbs), ``fleet``
(the rollout workers), ``publisher`` (the only weight path), ``step`` (one step's data flow),
``loops/`` (sync and pipelined), ``checkpointing``, ``recovery``, ``evaluation``, ``prompts``,
``records`` (the ledger). Imports flow one way: config -> step -> trainers/fleet/publisher ->
loops -> this driver.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.config.preflight import rl_prompt_limit
from posttrain.config.schema import RecipeConfig
from posttrain.config.targets import build_target, import_object
from posttrain.data.sources import load_rows
from posttrain.data.templates import apply_templates
from posttrain.diagnose import remote_class
from posttrain.metrics import MetricsLogger
from posttrain.models.factory import save_tiny_model
from posttrain.models.loading import ModelConfig, load_tokenizer
from posttrain.rewards.config import build_reward_graph
from posttrain.rl.agent import build_agent
from posttrain.rl.checkpointing import Checkpointer
from posttrain.rl.config import Deadlines
from posttrain.rl.evaluation import Evaluator, eval_scorer
from posttrain.rl.fleet import WorkerFleet, start_in_order
from posttrain.rl.loops import LoopParts
from posttrain.rl.loops.pipelined import run_pipelined
from posttrain.rl.loops.sync import run_sync
from posttrain.rl.placement import check_resources, placement_group, plan_placement, start_ray
from posttrain.rl.prompts import PromptStream, prompt_records
from posttrain.rl.publisher import WeightPublisher
from posttrain.rl.records import Ledger, roll_back_records
from posttrain.rl.recovery import Recovery
from posttrain.rl.step import Step
from posttrain.rl.trainer_worker import TrainerSpec
from posttrain.rl.trainers import TrainerFailed, TrainerGroup
from posttrain.weight_sync import dtype_from_name


@dataclass
class Rooms:
    """The built parts of one run (no behaviour of its own but ``close``)."""

    stream: PromptStream
    evaluator: Evaluator
    trainers: TrainerGroup
    fleet: WorkerFleet
    publisher: WeightPublisher
    checkpoints: Checkpointer
    recovery: Recovery
    step: Step
    decode: Any
    pg: Any
    agent: Any = None  # multi-turn rollouts (posttrain.rl.agent), with rollout.agent.env

    def close(self) -> None:
        import ray

        self.fleet.close()
        self.trainers.kill()
        with contextlib.suppress(Exception):
            ray.util.remove_placement_group(self.pg)


def model_dir(cfg: RecipeConfig, run_dir: str) -> str:
    """vLLM loads a directory: the recipe's checkpoint, or the factory model saved once."""
    if cfg.model.path:
        return cfg.model.path
    out = os.path.join(run_dir, "initial_model")
    if not os.path.exists(os.path.join(out, "config.json")):
        torch.manual_seed(0)
        save_tiny_model(cfg.model.factory, out)
    return out


def sampled_distribution(cfg: RecipeConfig) -> tuple[float, float]:
    """(temperature, top_p) of the distribution whose logprobs the engine reports as behaviour
    logprobs: the sampling settings with processed logprobs (the default), else the raw model's."""
    s = cfg.rollout.sampling
    if (cfg.rollout.engine or {}).get("logprobs_mode", "processed_logprobs") == "raw_logprobs" or s.temperature == 0:
        return 1.0, 1.0
    return s.temperature, s.top_p


def build(cfg: RecipeConfig, run_dir: str, log: MetricsLogger) -> Rooms:
    """Data, reward graph, Ray placement, trainer ranks and rollout workers, and the rooms between."""
    algo, d = cfg.algorithm, cfg.data
    tok = apply_templates(load_tokenizer(cfg.model), d)  # the chat template, or the recipe's format
    train = prompt_records(load_rows(d.train, "data.train", d.fields), tok, "data.train", d.max_bad_fraction, rl_prompt_limit(cfg))
    held_out = prompt_records(load_rows(d.eval, "data.eval", d.fields), tok, "data.eval", d.max_bad_fraction,
                              rl_prompt_limit(cfg, evaluation=True)) if d.eval else []  # fmt: skip
    agent = build_agent(cfg.rollout.agent, tok, cfg.run.seed, cfg.rollout.engine, run_dir)  # None: single-turn
    graph = build_reward_graph(cfg.reward) if cfg.reward.nodes or not agent else None  # an env may score alone
    scorer = eval_scorer(cfg.eval, d.eval, graph, build_reward_graph)  # eval/accuracy: like the reward
    path = model_dir(cfg, run_dir)
    engine_cfg = build_target({**cfg.rollout.engine, "model_path": path}, "rollout.engine", "recipe")
    worker_cls = remote_class(import_object(cfg.rollout.worker, "rollout.worker", "recipe"))

    start_ray(cfg.cluster)
    plan = plan_placement(cfg.cluster, cfg.rollout, cfg.trainer.world_size, algo.max_staleness == 0 or not is_asynchronous(cfg))
    check_resources(plan)
    pg = placement_group(plan)
    deadlines = Deadlines.of(cfg.cluster, cfg.rollout)
    spec = TrainerSpec(
        cfg.trainer.world_size, "", ModelConfig(path=path, dtype=cfg.model.dtype, moe_kernels=cfg.model.moe_kernels, lora=cfg.model.lora),
        cfg.trainer, algo, cfg.sync, plan.threads.train, cfg.cluster.call_timeout_s,
        *sampled_distribution(cfg),
    )  # fmt: skip
    colocated = cfg.cluster.placement == "colocated"
    trainers, fleet = start_in_order(lambda: TrainerGroup(spec, pg, plan, deadlines), lambda: WorkerFleet(
        worker_cls, engine_cfg, pg, plan, deadlines, colocated=colocated, max_restarts=cfg.rollout.max_worker_restarts,
        run_seed=cfg.run.seed), colocated)  # fmt: skip
    publisher = WeightPublisher(trainers, fleet, cfg.sync, dtype_from_name(cfg.model.dtype),  # level-2 sleep: a sync after every generate
                                drop_weights_on_sleep=colocated and not cfg.eval.every_steps and not agent)  # fmt: skip

    stream = PromptStream(train, algo.prompts_per_step, cfg.run.seed, d.shuffle)
    generate = agent.bind(fleet, publisher.replace).generate if agent else functools.partial(fleet.generate, on_lost=publisher.replace)
    evaluator = Evaluator(held_out, scorer, generate, cfg.eval.max_new_tokens, cfg.eval.every_steps,
                          cfg.trainer.max_steps)  # fmt: skip
    checkpoints = Checkpointer(cfg.checkpoint, run_dir, trainers, publisher, stream, cfg.trainer.max_steps)
    recovery = Recovery(trainers, checkpoints, cfg.cluster.max_trainer_restarts)
    ledger = Ledger(run_dir, functools.partial(log.log_samples, seed=cfg.run.seed))
    step = Step(algo, agent.scorer(graph) if agent else graph, trainers, publisher, ledger, tok.pad_token_id, cfg.run.seed)
    decode = functools.partial(tok.decode, skip_special_tokens=True)
    return Rooms(stream, evaluator, trainers, fleet, publisher, checkpoints, recovery, step, decode, pg, agent)


def is_asynchronous(cfg: RecipeConfig) -> bool:
    """The bounded-staleness loop runs unless placement is colocated (rollouts cannot overlap
    training); multi-turn rollouts take it only with ``max_staleness > 0`` (k = 0: synchronous loop)."""
    if cfg.rollout.agent.env:
        return cfg.algorithm.max_staleness > 0
    return cfg.cluster.placement != "colocated"


def run_loop(rooms: Rooms, cfg: RecipeConfig, parts: LoopParts, start: int, asynchronous: bool) -> None:
    algo, sampling = cfg.algorithm, cfg.rollout.sampling
    if not asynchronous:
        generate = rooms.agent.generate if rooms.agent else functools.partial(rooms.fleet.generate, on_lost=rooms.publisher.replace)
        run_sync(parts, generate, sampling, start, cfg.trainer.max_steps)
        return
    run_pipelined(
        parts, rooms.fleet, rooms.publisher, sampling, rooms.decode, max_staleness=algo.max_staleness,
        policy=algo.staleness_policy, prompts_per_step=algo.prompts_per_step, chunk_tokens=cfg.rollout.chunk_tokens,
        start_step=start, max_steps=cfg.trainer.max_steps, agent=rooms.agent,
    )  # fmt: skip


def run_rl(cfg: RecipeConfig, resolved: dict[str, Any], run_dir: str, synchronous: bool | None = None) -> dict[str, Any]:
    """Train online RL. ``synchronous=None`` picks the loop from the recipe (see ``is_asynchronous``);
    ``True`` forces the reference synchronous loop, which k=0 must reproduce exactly.

    ``checkpoint.resume`` resumes from a checkpoint (see posttrain.rl.checkpointing); a trainer
    rank that dies restarts the trainers from the newest checkpoint (posttrain.rl.recovery)."""
    log = MetricsLogger(run_dir, cfg.logging, cfg.trainer.max_steps, resolved)
    try:
        rooms = build(cfg, run_dir, log)
    except BaseException:
        log.close()
        raise
    asynchronous = is_asynchronous(cfg) if synchronous is None else not synchronous
    summary: dict[str, Any] = {}
    try:
        path = rooms.checkpoints.find(cfg.checkpoint.resume) if cfg.checkpoint.resume else None
        if path:
            state = rooms.checkpoints.restore(path)
            rooms.step.load_state_dict(state.get("step_state"))
            summary.update(before=state["before"], resumed_from=path)
            start = state["step"]
        else:
            summary["before"] = rooms.evaluator()
            roll_back_records(run_dir, -1)  # a fresh start: no records of an earlier attempt
            log.log(0, summary["before"])
            start = 0
        parts = LoopParts(
            next_prompts=rooms.stream.next, refill_prompts=rooms.stream.refill, step=rooms.step, evaluate_after=rooms.evaluator.after, log=log.log,
            after_step=lambda s, m: rooms.checkpoints.after_step(
                s, m, {"before": summary["before"], "restarts": rooms.trainers.restarts, "step_state": rooms.step.state_dict()}
            ),
            fleet_metrics=lambda: {"rollout/workers_replaced": float(rooms.fleet.replaced), **rooms.fleet.plan.threads.metrics()},
        )  # fmt: skip
        while True:
            try:
                run_loop(rooms, cfg, parts, start, asynchronous)
                break
            except TrainerFailed as err:
                state = rooms.recovery.recover(err)
                rooms.step.load_state_dict(state.get("step_state"))
                start = state["step"]
                summary["trainer_restarts"] = rooms.trainers.restarts
        summary["after"] = rooms.evaluator()
        log.log(cfg.trainer.max_steps, summary["after"])
        if cfg.checkpoint.export_hf:
            rooms.trainers.export(os.path.join(run_dir, "hf"))
    finally:
        log.close()
        rooms.close()
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
