"""Typed records that cross package boundaries (data -> rollout -> rewards -> advantages -> trainer).

Nothing else crosses between ``posttrain.rollout``, ``posttrain.rewards`` and the trainer: these
records are plain dataclasses (picklable, so they travel through Ray unchanged).

Shapes are in the names where a field is a tensor (``logprobs_BT``: batch x tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch


@dataclass
class PromptRecord:
    """One RL prompt, as the data loader hands it to the controller.

    ``ordinal`` is the prompt's position in the (seeded, epoch-aware) prompt stream: the ledger
    key that exact resume and fault tolerance use to prove each prompt is trained once.
    """

    ordinal: int
    text: str  # the prompt as sent to the engine (chat template already applied)
    token_ids: list[int]
    fields: dict[str, Any] = field(default_factory=dict)  # dataset columns (answer, tests, ...)
    # this request's own cap on new tokens, below sampling.max_tokens (a multi-turn trajectory's
    # remaining budget): requests with different budgets share one engine batch
    max_tokens: int | None = None


@dataclass
class Turn:
    """One segment of a multi-turn completion: tokens ``[start, end)`` of ``Completion.token_ids``.

    ``role`` is "policy" (sampled, trained) or "env" (an observation: tool output, feedback; never
    trained). ``rewards`` are the reward parts the environment gave for a policy turn's action.
    """

    start: int
    end: int
    role: str  # "policy" | "env"
    rewards: dict[str, float] = field(default_factory=dict)


@dataclass
class Completion:
    """One sampled completion of a prompt.

    ``logprobs`` are the behaviour policy's per-token logprobs as reported by the engine;
    ``versions[i]`` is the policy version that generated token i (a completion may span versions
    when weights are updated in flight).

    Multi-turn trajectories (``posttrain.rollout.env``) interleave policy and environment tokens:
    ``loss_mask[i]`` is 1 for a sampled policy token and 0 for an observation token (whose logprob
    is 0.0 and whose version is that of the policy turn before it); ``turns`` lists the segments;
    ``env_error`` is set when the environment raised (the sample is then masked, never scored).
    ``loss_mask`` None: every token is a policy token (single-turn generation).
    """

    prompt: PromptRecord
    sample_index: int  # 0..n-1 within its group
    token_ids: list[int]
    text: str
    logprobs: list[float]
    versions: list[int]
    finish_reason: str  # "stop" | "length" | "abort" | "env_error"
    loss_mask: list[int] | None = None
    turns: list[Turn] | None = None
    env_error: str | None = None

    @property
    def policy_versions(self) -> list[int]:
        """The versions of the sampled tokens (observation tokens of a trajectory left out)."""
        if self.loss_mask is None:
            return self.versions
        return [v for v, m in zip(self.versions, self.loss_mask, strict=True) if m]

    @property
    def v_min(self) -> int:
        """Oldest policy version that sampled any token (the staleness contract uses this)."""
        versions = self.policy_versions
        return min(versions) if versions else -1

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    @property
    def policy_mask(self) -> list[int]:
        """1 per trained (sampled) token, 0 per observation token."""
        return list(self.loss_mask) if self.loss_mask is not None else [1] * len(self.token_ids)


@dataclass
class RewardSample:
    """What a reward function sees for one completion."""

    prompt: str
    completion: str
    fields: dict[str, Any] = field(default_factory=dict)
    num_tokens: int | None = None  # the completion's token count (None: not known, e.g. text only)


@dataclass
class Group:
    """The n completions of one prompt; scored and trained together (group integrity)."""

    prompt: PromptRecord
    completions: list[Completion]


@dataclass
class ScoredGroup:
    """A group after the reward stage.

    ``rewards[i]`` is None when sample i is masked (its reward errored, timed out or was NaN):
    masked samples never count as 0, they are left out of the loss and counted in metrics.
    ``breakdown`` maps reward-node name -> per-sample values (None = not applicable / failed).
    ``token_rewards[i]``, when given, is a per-token reward list for sample i (process rewards).
    """

    group: Group
    rewards: list[float | None]
    breakdown: dict[str, list[float | None]] = field(default_factory=dict)
    token_rewards: list[list[float]] | None = None


def _rows(value: Any, idx: Any) -> Any:
    return value[idx] if isinstance(value, torch.Tensor) else value


@dataclass
class ForwardBatch:
    """What the trainer's forward-only verb scores: right-padded prompt+response rows.

    ``want_old``: also return the current policy's logprobs (``old_logprobs_BT``), not only the
    reference's and the critic's.
    """

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    want_old: bool = True

    def shard(self, rank: int, world: int) -> ForwardBatch:
        """Rows ``rank::world`` (each trainer rank scores its share)."""
        return ForwardBatch(self.input_ids_BT[rank::world], self.attention_mask_BT[rank::world], self.want_old)


@dataclass
class ForwardOutputs:
    """Per-token outputs of the forward verb, aligned with ``input_ids_BT`` (position t: token t).

    A field is None when the model that makes it does not exist (no reference, no critic) or was
    not asked for (``want_old=False``).
    """

    old_logprobs_BT: torch.Tensor | None = None
    ref_logprobs_BT: torch.Tensor | None = None
    values_BT: torch.Tensor | None = None


@dataclass
class TrainBatch:
    """One mini-batch for one optimizer step of the policy (and critic), right-padded prompt+response.

    input_ids_BT / attention_mask_BT cover prompt+response; loss_mask_BT is 1 on response tokens
    that count towards the loss. Per-token tensors are aligned with input_ids_BT: position t holds
    the value for predicting token t (so position 0 is always masked). ``old_logprobs_BT`` None:
    the update's own forward gives the pre-update logprobs (one mini-batch, detached).
    ``num_tokens`` / ``num_seqs`` are the GLOBAL counts of the mini-batch over all ranks, so every
    rank normalises its loss by the same number (gradient accumulation == one big batch).
    """

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    loss_mask_BT: torch.Tensor
    behaviour_logprobs_BT: torch.Tensor
    advantages_BT: torch.Tensor
    old_logprobs_BT: torch.Tensor | None = None
    ref_logprobs_BT: torch.Tensor | None = None
    values_BT: torch.Tensor | None = None  # critic values before the update (value clipping)
    returns_BT: torch.Tensor | None = None  # critic targets
    num_tokens: float = 1.0
    num_seqs: float = 1.0

    @property
    def size(self) -> int:
        return self.input_ids_BT.shape[0]

    def select(self, idx: Any) -> TrainBatch:
        """These rows (a list of indices or a slice); the counts stay those of the whole mini-batch."""
        return TrainBatch(**{f.name: _rows(getattr(self, f.name), idx) for f in fields(self)})

    def shard(self, rank: int, world: int) -> TrainBatch:
        return self.select(slice(rank, None, world))

    def tensors(self) -> dict[str, Any]:
        """Plain ``{name: value}`` of the fields that are set (what a loss function reads)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
