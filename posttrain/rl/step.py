"""One RL step on finished groups, as its data flow::

    groups ─► ledger ─► score (reward graph) ─► [dynamic sampling: drop groups whose advantages
              (the step's own: same batch builder, overlong filter, token rewards) are all zero, refill]
           ─► make_batch (masked-sample guard)
           ─► train_inputs (forward: old/ref logprobs, values; token rewards + KL into the reward
              per token; advantages)
           ─► train (ppo_epochs x mini_batches optimizer steps) ─► publish (weights -> workers, probe)
           ─► metrics

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from posttrain.algorithms.advantages import AdvantageResult, place_token_rewards
from posttrain.algorithms.kl import kl_reward_penalty
from posttrain.algorithms.logprobs import masked_mean
from posttrain.config.errors import PosttrainError
from posttrain.metrics import aggregate_metrics
from posttrain.rewards.errors import RewardFailureError
from posttrain.rl.batch import RLBatch, advantage_inputs, build_rl_batch
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
    def write(self, step: int, groups: list[Group]) -> None: ...  # the ledger, before anything else
    def scored(self, step: int, scored: list[ScoredGroup]) -> None: ...  # completion texts and rewards


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
        self.add(phase, time.perf_counter() - t0)

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    @property
    def step_s(self) -> float:
        return sum(self.phases.values())

    def metrics(self) -> dict[str, float]:
        return {**{f"time/{k}_s": v for k, v in self.phases.items()}, "time/step_s": self.step_s}


def make_batch(scored: list[ScoredGroup], algo: OnlineRLConfig, pad_id: int, reward_metrics: dict[str, float]) -> tuple[RLBatch, dict[str, float]]:
    """The padded batch, and the guard against a step of mostly masked samples."""
    batch, m = build_rl_batch(scored, pad_id, algo.overlong_filter), {}
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


def token_rewards(scored: list[ScoredGroup], batch: RLBatch) -> torch.Tensor | None:
    """Per-token rewards of token-level (process) reward nodes, placed on the response tokens; None
    when no node gives any."""
    if all(sg.token_rewards is None for sg in scored):
        return None
    lists = [x for sg in scored for x in (sg.token_rewards or [None] * len(sg.group.completions))]
    return place_token_rewards(lists, batch.loss_mask_BT)


def step_forward(batch: RLBatch, algo: OnlineRLConfig, trainers: Trainers) -> ForwardOutputs:
    """The forward verb when the step needs one (old logprobs, reference, critic), else nothing."""
    if not (algo.recompute_old or algo.use_reference or algo.critic is not None):
        return ForwardOutputs()
    return trainers.forward(ForwardBatch(batch.input_ids_BT, batch.attention_mask_BT, algo.recompute_old))


def step_advantages(batch: RLBatch, scored: list[ScoredGroup], algo: OnlineRLConfig, fwd: ForwardOutputs,
                    kl_coef: float) -> tuple[AdvantageResult, torch.Tensor | None]:  # fmt: skip
    """The advantages the update trains on: token (process) rewards and the KL penalty (per token,
    as verl, at ``kl_coef``) into the reward, then the estimator. Returns (advantages, kl_BT or None)."""
    rewards_BT, kl = token_rewards(scored, batch), None
    if algo.kl_in_reward:
        penalty, kl = kl_reward_penalty(fwd.old_logprobs_BT, fwd.ref_logprobs_BT, batch.loss_mask_BT, kl_coef, algo.kl_in_reward_estimator)
        rewards_BT = penalty if rewards_BT is None else rewards_BT + penalty
    return algo.advantage.compute(advantage_inputs(batch, rewards_BT, fwd.values_BT)), kl


def train_inputs(batch: RLBatch, scored: list[ScoredGroup], algo: OnlineRLConfig, trainers: Trainers,
                 kl_ctl: Any) -> tuple[TrainInputs, dict[str, float]]:  # fmt: skip
    """Forward pass when needed (old logprobs, reference, critic), then ``step_advantages``.
    ``kl_ctl`` adapts to the measured KL."""
    fwd = step_forward(batch, algo, trainers)
    adv, kl = step_advantages(batch, scored, algo, fwd, kl_ctl.value)
    m = {}
    if kl is not None:
        m["kl_in_reward/kl"] = float(masked_mean(kl, batch.loss_mask_BT))
        m["kl_in_reward/coef"] = kl_ctl.value
        kl_ctl.update(m["kl_in_reward/kl"], batch.size)
    return TrainInputs(batch, adv.advantages_BT, fwd, adv.returns_BT), m


def zero_advantage_groups(advantages_BT: torch.Tensor, loss_mask_BT: torch.Tensor, sizes: list[int]) -> list[bool]:
    """Per group (rows in group-major order, ``sizes`` samples each): whether every trainable token
    of the group has advantage exactly 0 (so the group gives no policy gradient). A group with no
    trainable token at all (every sample masked) counts as zero too."""
    nonzero_B = ((advantages_BT != 0) & (loss_mask_BT > 0)).any(-1)
    return [not bool(part.any()) for part in nonzero_B.split(sizes)]


def mini_batches(inputs: TrainInputs, count: int, order: torch.Tensor | None = None) -> Iterator[TrainBatch]:
    """The step's samples in ``count`` mini-batches (in ``order``, default as generated), each with
    its global token and sequence counts (the loss normalisers, the same on every rank)."""
    b, f = inputs.batch, inputs.forward
    full = TrainBatch(
        b.input_ids_BT, b.attention_mask_BT, b.loss_mask_BT, b.behaviour_logprobs_BT, inputs.advantages_BT,
        f.old_logprobs_BT, f.ref_logprobs_BT, f.values_BT, inputs.returns_BT,
    )  # fmt: skip
    for chunk in (torch.arange(b.size) if order is None else order).chunk(count):
        mb = full.select(chunk.tolist())
        mb.num_tokens = max(1.0, float(mb.loss_mask_BT.sum()))
        mb.num_seqs = max(1.0, float((mb.loss_mask_BT.sum(-1) > 0).sum()))
        yield mb


def train(inputs: TrainInputs, algo: OnlineRLConfig, trainers: Trainers, seed: int) -> dict[str, float]:
    """``ppo_epochs`` passes of ``mini_batches`` optimizer steps; the first pass in the generated
    order, later ones shuffled (seeded by ``seed``). Metrics combined (``_max`` keys: the max)."""
    per_mb, gen = [], torch.Generator().manual_seed(seed)
    for epoch in range(algo.ppo_epochs):
        order = None if epoch == 0 else torch.randperm(inputs.batch.size, generator=gen)
        per_mb += [trainers.train(mb) for mb in mini_batches(inputs, algo.mini_batches, order)]
    return {**aggregate_metrics(per_mb), "train/optimizer_steps": float(len(per_mb))}


Refill = Callable[[int], list[Group]]  # count -> that many new groups (new prompts), generated now


class DynamicSamplingExhausted(PosttrainError):
    """Dynamic sampling could not find enough groups with varied rewards within its rounds."""


def group_sizes(scored: list[ScoredGroup]) -> list[int]:
    return [len(sg.group.completions) for sg in scored]


def keep_trainable(scored: list[ScoredGroup], algo: OnlineRLConfig, pad_id: int, trainers: Trainers,
                   kl_coef: float) -> tuple[list[ScoredGroup], list[ScoredGroup]]:  # fmt: skip
    """DAPO's filter on the advantages the step would train these groups on: the same batch builder
    and overlong filter, the same token rewards, KL penalty and critic values (their forward runs
    only when the advantages need it). Returns (kept, dropped): a group is dropped exactly when every
    trainable token's advantage is zero.

    Group estimators normalise within a group, so a kept group trains on these same advantages;
    estimators that whiten over the batch (REINFORCE++) judge each round's batch, and the step
    reports what it trained (``samples/zero_advantage_groups``)."""
    if not scored:
        return [], []
    batch = build_rl_batch(scored, pad_id, algo.overlong_filter)
    needs_forward = algo.kl_in_reward or algo.critic is not None
    fwd = trainers.forward(ForwardBatch(batch.input_ids_BT, batch.attention_mask_BT, algo.kl_in_reward)) if needs_forward else ForwardOutputs()
    adv, _ = step_advantages(batch, scored, algo, fwd, kl_coef)
    zero = zero_advantage_groups(adv.advantages_BT, batch.loss_mask_BT, group_sizes(scored))
    return [sg for sg, z in zip(scored, zero, strict=True) if not z], [sg for sg, z in zip(scored, zero, strict=True) if z]


# Reward-graph counters that add up over scoring rounds (dynamic sampling scores several per step).
_ROUND_SUMS = ("/errors", "/timeouts", "/masked", "/not_applicable", "/gated", "/calls", "/cache_hits", "reward/samples", "reward/step_s")


def merge_rounds(rounds: list[dict[str, float]]) -> dict[str, float]:
    """The scorer's metrics of every round of a step: counters summed, latencies the max, the
    rest from the first round (``trained_reward_metrics`` then restates what describes samples)."""
    out = dict(rounds[0]) if rounds else {}
    for m in rounds[1:]:
        for k, v in m.items():
            if k.endswith(_ROUND_SUMS):
                out[k] = out.get(k, 0.0) + v
            elif "latency" in k:
                out[k] = max(out.get(k, v), v)
            else:
                out.setdefault(k, v)
    return out


def trained_reward_metrics(scored: list[ScoredGroup], metrics: dict[str, float], used_NG: torch.Tensor) -> dict[str, float]:
    """Per-node means (``reward/<node>/mean``, the agent's ``env/<name>``) over the samples the step
    trains on (``used_NG``: the batch's sample mask, so overlong-filtered samples are left out as
    from ``reward/mean``), and the reward-failure fraction of its samples, replacing those of
    whatever the scorer scored (dynamic sampling: several rounds)."""
    out: dict[str, float] = {}
    rewards = [r for sg in scored for r in sg.rewards]
    if rewards:
        out["reward/masked_fraction"] = sum(r is None for r in rewards) / len(rewards)
    used = [bool(u) for u in used_NG.reshape(-1).tolist()]
    for name in sorted({k for sg in scored for k in sg.breakdown}):
        key = name if name.startswith("env/") else f"reward/{name}/mean"
        values, at = [], 0
        for sg in scored:
            n = len(sg.rewards)
            if name in sg.breakdown:
                values += [v for v, u in zip(sg.breakdown[name], used[at : at + n], strict=True) if v is not None and u]
            at += n
        if values:
            out[key] = sum(values) / len(values)
        elif key in metrics:
            out[key] = float("nan")
    return out


def probe_sequences(scored: list[ScoredGroup]) -> list[list[int]]:
    """The fixed sequence the probe scores on both sides: the step's first prompt + completion."""
    first = scored[0].group
    return [first.prompt.token_ids + first.completions[0].token_ids]


def sample_returns(scored: list[ScoredGroup], batch: RLBatch) -> torch.Tensor:
    """Each used sample's whole reward: the graph's score plus its token (per-turn, process)
    rewards, as the group estimators sum them."""
    tokens_NG = torch.tensor([[sum(sg.token_rewards[i] or []) if sg.token_rewards is not None else 0.0
                               for i in range(len(sg.rewards))] for sg in scored])  # fmt: skip
    used = batch.sample_mask_NG > 0
    return batch.rewards_NG[used] + tokens_NG.reshape(batch.rewards_NG.shape)[used]


def batch_metrics(inputs: TrainInputs, scored: list[ScoredGroup]) -> dict[str, float]:
    """Rewards, advantages, lengths and the trainer/behaviour logprob gap of a step's batch.
    ``reward/*`` are over each sample's whole reward (score plus token rewards: an agent's env)."""
    batch, adv, m = inputs.batch, inputs.advantages_BT, {}
    groups = [sg.group for sg in scored]
    valid = batch.loss_mask_BT > 0
    old = inputs.forward.old_logprobs_BT
    if old is not None and valid.any():  # else the loss reports behaviour_kl (mean)
        m["logprob/behaviour_vs_trainer_max_abs"] = float((old - batch.behaviour_logprobs_BT)[valid].abs().max())
    lens = batch.response_lengths_B.float()
    rewards = sample_returns(scored, batch)
    completions = [c for g in groups for c in g.completions]
    m.update({
        "reward/mean": float(rewards.mean()) if rewards.numel() else float("nan"),
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "advantage/mean": float(adv[valid].mean()) if valid.any() else 0.0,
        "advantage/abs_mean": float(adv[valid].abs().mean()) if valid.any() else 0.0,
        # trained groups whose every trainable token has advantage 0 (no gradient): 0 under DAPO
        "samples/zero_advantage_groups": float(sum(zero_advantage_groups(adv, batch.loss_mask_BT, group_sizes(scored)))),
        "response/length_mean": float(lens.mean()),
        "response/length_max": float(lens.max()),
        "response/truncated_fraction": sum(c.truncated for c in completions) / batch.size,
        "response/versions_per_sample_max": float(max(len(set(c.versions)) for c in completions)),
    })  # fmt: skip
    return m


class Step:
    """Score, batch, train and publish one step's finished groups; its metrics."""

    def __init__(self, algo: OnlineRLConfig, scorer: Scorer, trainers: Trainers, publisher: Publisher, ledger: Recorder,
                 pad_id: int, seed: int = 0) -> None:  # fmt: skip
        self.algo, self.scorer, self.trainers, self.publisher, self.ledger = algo, scorer, trainers, publisher, ledger
        self.pad_id, self.seed = pad_id, seed
        self.kl_ctl = algo.kl_controller()

    def __call__(self, groups: list[Group], generate_s: float, refill: Refill | None = None) -> dict[str, Any]:
        timer, step = PhaseTimer(generate_s), self.publisher.version + 1
        if not self.algo.dynamic_sampling:
            self.ledger.write(step, groups)
        with timer("reward"):
            scored, m_reward = self.scorer.score_groups_sync(groups)
        m_dyn = {}
        if self.algo.dynamic_sampling:
            m_reward, m_dyn = self.dynamic_sampling(scored, m_reward, refill, timer)
            self.ledger.write(step, [sg.group for sg in scored])  # the groups that enter the step
        self.ledger.scored(step, scored)
        with timer("prepare"):
            batch, m_batch = make_batch(scored, self.algo, self.pad_id, m_reward)
            inputs, m_kl = train_inputs(batch, scored, self.algo, self.trainers, self.kl_ctl)
        calibrate = getattr(self.publisher, "calibrate", None)  # the probe's floor: both sides still hold one version
        m_floor = calibrate(probe_sequences(scored)) if calibrate is not None else {}
        with timer("train"):
            m_train = train(inputs, self.algo, self.trainers, self.seed + step)
        with timer("sync"):
            m_sync = {**m_floor, **self.publisher.publish(probe_sequences(scored))}
        m_sync.update(getattr(self.trainers, "offload_stats", {}))  # trainer.offload: rank 0's last moves
        m_reward.update(trained_reward_metrics(scored, m_reward, batch.sample_mask_NG))
        return {**m_reward, **m_dyn, **m_batch, **m_kl, **m_sync, **m_train, **batch_metrics(inputs, scored), **timer.metrics(),
                **throughput(inputs.batch, timer.step_s), "policy_version": float(self.publisher.version)}  # fmt: skip

    def dynamic_sampling(self, scored: list[ScoredGroup], m_reward: dict[str, float], refill: Refill | None,
                         timer: PhaseTimer) -> tuple[dict[str, float], dict[str, float]]:  # fmt: skip
        """Keep in ``scored`` (in place) the first ``prompts_per_step`` groups that would train (some
        trainable token with a non-zero advantage, see ``keep_trainable``); generate and score new
        prompts until there are enough (at most ``dynamic_sampling_max_rounds`` rounds). Returns the
        scorer's metrics over every round (``merge_rounds``) and the filter's: dropped groups as
        ``samples/filtered_*`` (never as failures), with the mean reward of their samples."""
        want, rounds, dropped, scores = self.algo.prompts_per_step, 0, [], [m_reward]
        keep = lambda sgs: keep_trainable(sgs, self.algo, self.pad_id, self.trainers, self.kl_ctl.value)  # noqa: E731
        kept, out = keep(scored)
        dropped += out
        while len(kept) < want:
            if refill is None or rounds >= self.algo.dynamic_sampling_max_rounds:
                raise DynamicSamplingExhausted(
                    f"dynamic sampling: {len(kept)} of {want} groups have a non-zero advantage after {rounds} refill rounds "
                    f"({len(dropped)} groups filtered: every trainable token's advantage was 0, e.g. all samples scored "
                    "the same).\n  fix: raise algorithm.dynamic_sampling_max_rounds or rollout.sampling.n, or use prompts "
                    "of mixed difficulty"
                )
            t0 = time.perf_counter()
            more = refill(want - len(kept))
            timer.add("generate", time.perf_counter() - t0)
            with timer("reward"):
                more_scored, m_more = self.scorer.score_groups_sync(more)
            scores.append(m_more)
            varied, out = keep(more_scored)
            kept, dropped, rounds = kept + varied, dropped + out, rounds + 1
        scored[:] = kept[:want]
        filtered_rewards = [r for sg in dropped for r in sg.rewards if r is not None]
        m_dyn = {"samples/filtered_groups": float(len(dropped)), "samples/filtered_samples": float(sum(group_sizes(dropped))),
                 "samples/refill_rounds": float(rounds), "samples/scored_groups": float(len(kept) + len(dropped))}  # fmt: skip
        if filtered_rewards:
            m_dyn["samples/filtered_reward_mean"] = sum(filtered_rewards) / len(filtered_rewards)
        return merge_rounds(scores), m_dyn

    def state_dict(self) -> dict[str, Any]:
        return {"kl_ctl": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.kl_ctl.load_state_dict(state["kl_ctl"])


def throughput(batch: RLBatch, step_s: float) -> dict[str, float]:
    return {
        "throughput/tokens_per_s": float(batch.response_lengths_B.sum()) / max(1e-9, step_s),
        "throughput/samples_per_s": batch.size / max(1e-9, step_s),
    }
