"""Typed records that cross package boundaries (data -> rollout -> rewards -> advantages -> trainer).

Nothing else crosses between ``posttrain.rollout``, ``posttrain.rewards`` and the trainer: these
records are plain dataclasses (picklable, so they travel through Ray unchanged).

Shapes are in the names where a field is a tensor (``logprobs_BT``: batch x tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class Completion:
    """One sampled completion of a prompt.

    ``logprobs`` are the behaviour policy's per-token logprobs as reported by the engine;
    ``versions[i]`` is the policy version that generated token i (a completion may span versions
    when weights are updated in flight).
    """

    prompt: PromptRecord
    sample_index: int  # 0..n-1 within its group
    token_ids: list[int]
    text: str
    logprobs: list[float]
    versions: list[int]
    finish_reason: str  # "stop" | "length" | "abort"

    @property
    def v_min(self) -> int:
        """Oldest policy version that produced any token (the staleness contract uses this)."""
        return min(self.versions) if self.versions else -1

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class RewardSample:
    """What a reward function sees for one completion."""

    prompt: str
    completion: str
    fields: dict[str, Any] = field(default_factory=dict)


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


@dataclass
class TrainBatch:
    """A padded batch for the policy loss (right-padded, prompt + response).

    input_ids_BT / attention_mask_BT cover prompt+response; loss_mask_BT is 1 on response tokens
    that count towards the loss. Per-token tensors (old_logprobs_BT, advantages_BT, ...) are
    aligned with input_ids_BT: position t holds the value for predicting token t (so position 0
    is always masked).
    """

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    loss_mask_BT: torch.Tensor
    advantages_BT: torch.Tensor
    behaviour_logprobs_BT: torch.Tensor
    versions_BT: torch.Tensor
    returns_BT: torch.Tensor | None = None
    old_values_BT: torch.Tensor | None = None
    ref_logprobs_BT: torch.Tensor | None = None
    ordinals_B: torch.Tensor | None = None
