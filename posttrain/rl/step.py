"""One RL step on finished groups, as its data flow::

    groups ─► ledger ─► score (reward graph) ─► make_batch (dynamic sampling, masked-sample guard)
           ─► train_inputs (forward: old/ref logprobs, values; KL into the reward; advantages)
           ─► train (one optimizer step per mini-batch) ─► publish (weights -> workers, probe)
           ─► StepMetrics

:class:`Step` takes narrow collaborators (a scorer, the trainers' ``forward``/``train``, the
publisher's ``publish``/``version``, a ledger), so each stage is a plain function that a unit
test drives with small fakes. Both loops call the same ``Step``; the metrics have one meaning:

* ``time/generate_s``: how long the step waited for its rollouts (the synchronous loop: the
  generation itself; the pipelined loop: only what was not done ahead);
* ``time/{reward,prepare,train,sync}_s``: the phases after that; ``time/step_s``: their sum
  with ``time/generate_s`` (evaluation and checkpoints excluded, logged on their own);
* ``throughput/*_per_s``: per ``time/step_s``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from posttrain.rewards.errors import RewardFailureError
from posttrain.rl.batch import RLBatch, advantage_inputs, apply_dynamic_sampling, build_rl_batch
from posttrain.rl.config import OnlineRLConfig
from posttrain.types import ForwardBatch, ForwardOutputs, Group, ScoredGroup, TrainBatch


class Scorer(Protocol):
    def score_groups_sync(self, groups: list[Group]) -> tuple[list[ScoredGroup], dict[str, float]]: ...


class Trainers(Protocol):
    def forward(self, batch: ForwardBatch) -> ForwardOutputs: ...
    def train(self, batch: TrainBatch) -> dict[str, float]: ...


class Publisher(Protocol):
    version: int

    def publish(self, probe_ids: list[list[int]]) -> dict[str, float]: ...


class Recorder(Protocol):
    def write(self, step: int, groups: list[Group]) -> None: ...


@dataclass
class TrainInputs:
    """A step's batch with what the update needs besides it (shapes [B, T] like the batch)."""

    batch: RLBatch
    advantages_BT: torch.Tensor
    forward: ForwardOutputs
    returns_BT: torch.Tensor | None = None


class PhaseTimer:
    """Wall time per phase of a step: ``with timer("train"): ...``; ``metrics()`` gives time/*_s."""

    def __init__(self, generate_s: float) -> None:
        self.phases: dict[str, float] = {"generate": generate_s}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.phases[phase] = time.perf_counter() - t0

    @property
    def step_s(self) -> float:
        return sum(self.phases.values())

    def metrics(self) -> dict[str, float]:
        return {**{f"time/{k}_s": v for k, v in self.phases.items()}, "time/step_s": self.step_s}


def make_batch(scored: list[ScoredGroup], algo: OnlineRLConfig, pad_id: int, reward_metrics: dict[str, float]) -> tuple[RLBatch, dict[str, float]]:
    """The padded batch; dynamic sampling; the guard against a step of mostly masked samples."""
    batch, m = build_rl_batch(scored, pad_id, algo.overlong_filter), {}
    if algo.dynamic_sampling:
        m["dynamic_sampling/groups_dropped"] = float(apply_dynamic_sampling(batch))
    masked = 1.0 - float(batch.sample_mask_NG.mean())
    m["samples/masked_fraction"] = masked
    if masked > algo.max_masked_fraction:
        errors = {k: v for k, v in reward_metrics.items() if k.endswith(("errors", "timeouts"))}
        raise RewardFailureError(
            f"{masked:.0%} of this step's samples are masked (reward errors, NaN, filters): limit "
            f"algorithm.max_masked_fraction={algo.max_masked_fraction}. Per-node errors: {errors}\n"
            "  fix: see the failing reward node's errors above, or raise algorithm.max_masked_fraction"
        )
    return batch, m


def train_inputs(batch: RLBatch, algo: OnlineRLConfig, trainers: Trainers) -> TrainInputs:
    """Forward pass when needed (old logprobs, reference, critic), KL into the reward, advantages."""
    need_forward = algo.recompute_old or algo.use_reference or algo.critic is not None
    fwd = trainers.forward(ForwardBatch(batch.input_ids_BT, batch.attention_mask_BT, algo.recompute_old)) if need_forward else ForwardOutputs()
    token_rewards = None
    if algo.kl_in_reward_coef > 0:
        token_rewards = -algo.kl_in_reward_coef * (fwd.old_logprobs_BT - fwd.ref_logprobs_BT) * batch.loss_mask_BT
    adv = algo.advantage.compute(advantage_inputs(batch, token_rewards, fwd.values_BT))
    return TrainInputs(batch, adv.advantages_BT, fwd, adv.returns_BT)


def mini_batches(inputs: TrainInputs, count: int) -> Iterator[TrainBatch]:
    """The step's samples in ``count`` mini-batches (in order), each with its global token and
    sequence counts (the loss normalisers, the same on every rank)."""
    b, f = inputs.batch, inputs.forward
    full = TrainBatch(
        b.input_ids_BT, b.attention_mask_BT, b.loss_mask_BT, b.behaviour_logprobs_BT, inputs.advantages_BT,
        f.old_logprobs_BT, f.ref_logprobs_BT, f.values_BT, inputs.returns_BT,
    )  # fmt: skip
    for chunk in torch.arange(b.size).chunk(count):
        mb = full.select(chunk.tolist())
        mb.num_tokens = max(1.0, float(mb.loss_mask_BT.sum()))
        mb.num_seqs = max(1.0, float((mb.loss_mask_BT.sum(-1) > 0).sum()))
        yield mb


def train(inputs: TrainInputs, algo: OnlineRLConfig, trainers: Trainers) -> dict[str, float]:
    """``algorithm.mini_batches`` optimizer steps; their metrics averaged over the mini-batches."""
    per_mb = [trainers.train(mb) for mb in mini_batches(inputs, algo.mini_batches)]
    return {k: sum(d[k] for d in per_mb) / len(per_mb) for k in per_mb[0]}


def probe_sequences(scored: list[ScoredGroup]) -> list[list[int]]:
    """The fixed sequence the probe scores on both sides: the step's first prompt + completion."""
    first = scored[0].group
    return [first.prompt.token_ids + first.completions[0].token_ids]


def batch_metrics(inputs: TrainInputs, groups: list[Group]) -> dict[str, float]:
    """Rewards, advantages, lengths and the trainer/behaviour logprob gap of a step's batch."""
    batch, adv, m = inputs.batch, inputs.advantages_BT, {}
    valid = batch.loss_mask_BT > 0
    old = inputs.forward.old_logprobs_BT
    if old is not None and valid.any():  # else the loss reports behaviour_kl (mean)
        m["logprob/behaviour_vs_trainer_max_abs"] = float((old - batch.behaviour_logprobs_BT)[valid].abs().max())
    lens = batch.response_lengths_B.float()
    rewards = batch.rewards_NG[batch.sample_mask_NG > 0]
    completions = [c for g in groups for c in g.completions]
    m.update({
        "reward/mean": float(rewards.mean()) if rewards.numel() else float("nan"),
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "advantage/mean": float(adv[valid].mean()) if valid.any() else 0.0,
        "advantage/abs_mean": float(adv[valid].abs().mean()) if valid.any() else 0.0,
        "response/length_mean": float(lens.mean()),
        "response/length_max": float(lens.max()),
        "response/truncated_fraction": sum(c.truncated for c in completions) / batch.size,
        "response/versions_per_sample_max": float(max(len(set(c.versions)) for c in completions)),
    })  # fmt: skip
    return m


class Step:
    """Score, batch, train and publish one step's finished groups; its metrics."""

    def __init__(self, algo: OnlineRLConfig, scorer: Scorer, trainers: Trainers, publisher: Publisher, ledger: Recorder, pad_id: int) -> None:
        self.algo, self.scorer, self.trainers, self.publisher, self.ledger, self.pad_id = algo, scorer, trainers, publisher, ledger, pad_id

    def __call__(self, groups: list[Group], generate_s: float) -> dict[str, Any]:
        timer = PhaseTimer(generate_s)
        self.ledger.write(self.publisher.version + 1, groups)
        with timer("reward"):
            scored, m_reward = self.scorer.score_groups_sync(groups)
        with timer("prepare"):
            batch, m_batch = make_batch(scored, self.algo, self.pad_id, m_reward)
            inputs = train_inputs(batch, self.algo, self.trainers)
        with timer("train"):
            m_train = train(inputs, self.algo, self.trainers)
        with timer("sync"):
            m_sync = self.publisher.publish(probe_sequences(scored))
        return {**m_reward, **m_batch, **m_sync, **m_train, **batch_metrics(inputs, groups), **timer.metrics(),
                **throughput(inputs.batch, timer.step_s), "policy_version": float(self.publisher.version)}  # fmt: skip


def throughput(batch: RLBatch, step_s: float) -> dict[str, float]:
    return {
        "throughput/tokens_per_s": float(batch.response_lengths_B.sum()) / max(1e-9, step_s),
        "throughput/samples_per_s": batch.size / max(1e-9, step_s),
    }
