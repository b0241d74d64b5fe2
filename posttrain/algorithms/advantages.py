"""Advantage estimation: the step between the reward stage and the policy loss.

Group estimators (GRPO, Dr.GRPO, RLOO) work on sequence rewards laid out ``[num_groups, n]``
(``rewards_NG``; a single group may be passed as ``rewards_G``), with a sample mask: a masked
sample (reward errored / timed out / NaN) gets advantage 0 and is left out of the group
statistics; a group with fewer than 2 valid samples gets all zeros (no baseline to compare to).
GAE works on per-token rewards and critic values of right-padded responses.

Token-level rewards (``AdvantageInputs.token_rewards_BT``: the KL-in-reward penalty from
``posttrain.algorithms.kl.kl_reward_penalty``, process rewards placed with
``place_token_rewards``, any shaping) reach every estimator, as in verl:
- group estimators (GRPO, Dr.GRPO, RLOO) score a sample with its sequence reward plus the sum of
  its token rewards over its valid tokens;
- GAE, REINFORCE++ and REINFORCE++-baseline use them per token (the sequence reward sits on the
  last valid token).

A recipe picks an estimator by ``_target_`` (``posttrain.algorithms.advantages.GRPOAdvantage``,
``RLOOAdvantage``, ``GAEAdvantage``, ``ReinforcePlusPlusAdvantage`` or
``ReinforcePlusPlusBaselineAdvantage``); all satisfy ``AdvantageEstimator``. Dr.GRPO is
``GRPOAdvantage(scale_by_std=False)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from posttrain.algorithms.config_check import raise_if_invalid
from posttrain.algorithms.logprobs import masked_sum, masked_whiten, zero_masked


def _valid_mask(rewards: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    valid = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    return valid & ~torch.isnan(rewards)


def _as_groups(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 1 else x


def grpo_advantages(
    rewards_NG: torch.Tensor,
    mask_NG: torch.Tensor | None = None,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> torch.Tensor:
    """GRPO group normalisation ``(r - mean) / (std + eps)``; mean only when ``scale_by_std=False``.

    mean/std are over the valid samples of each group; std is unbiased (Bessel, as torch.std in
    TRL/verl). NaN rewards count as masked. Returns advantages shaped like ``rewards_NG``.
    """
    valid = _valid_mask(rewards_NG, mask_NG)
    r = _as_groups(zero_masked(rewards_NG, valid))
    v = _as_groups(valid)
    count_N1 = v.sum(-1, keepdim=True)
    mean_N1 = r.sum(-1, keepdim=True) / count_N1.clamp(min=1)
    adv = r - mean_N1
    if scale_by_std:
        var_N1 = zero_masked(adv**2, v).sum(-1, keepdim=True) / (count_N1 - 1).clamp(min=1)
        adv = adv / (var_N1.sqrt() + eps)
    adv = torch.where(v & (count_N1 >= 2), adv, 0.0)
    return adv.view_as(rewards_NG)


def rloo_advantages(rewards_NG: torch.Tensor, mask_NG: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE leave-one-out: ``r_i - mean_{j != i} r_j`` over the valid samples of the group.

    Equal to ``k/(k-1) * (r_i - mean)`` with k valid samples.
    """
    valid = _valid_mask(rewards_NG, mask_NG)
    r = _as_groups(zero_masked(rewards_NG, valid))
    v = _as_groups(valid)
    count_N1 = v.sum(-1, keepdim=True)
    others_mean = (r.sum(-1, keepdim=True) - r) / (count_N1 - 1).clamp(min=1)
    adv = torch.where(v & (count_N1 >= 2), r - others_mean, 0.0)
    return adv.view_as(rewards_NG)


def gae(
    rewards_BT: torch.Tensor,
    values_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded response tokens.

    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, where
    ``V_{t+1}`` and ``A_{t+1}`` are 0 past the last valid token (the episode ends there).
    Masked positions inside a row (the observation tokens of a multi-turn trajectory) are skipped:
    ``t+1`` is the next valid token, so the advantage carries across a tool's output. Packed rows
    with several responses are not supported. Returns ``(advantages_BT, returns_BT)`` with
    ``returns = advantages + values``; both are 0 at masked positions.
    """
    valid = mask_BT.to(torch.bool)
    r = zero_masked(rewards_BT.float(), valid)
    v = zero_masked(values_BT.float(), valid)
    adv = torch.zeros_like(r)
    next_value_B = torch.zeros_like(r[:, 0])
    next_adv_B = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        delta_B = r[:, t] + gamma * next_value_B - v[:, t]
        a_B = torch.where(valid[:, t], delta_B + gamma * lam * next_adv_B, 0.0)
        adv[:, t] = a_B
        next_adv_B = torch.where(valid[:, t], a_B, next_adv_B)  # masked positions are skipped
        next_value_B = torch.where(valid[:, t], v[:, t], next_value_B)
    returns = zero_masked(adv + v, valid)
    return adv, returns


def discounted_returns(rewards_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go ``G_t = r_t + gamma G_{t+1}`` over each row's valid tokens (0 past the last).

    Same layout rules as ``gae`` (masked positions inside a row are skipped). Returns
    ``returns_BT``, 0 where masked.
    """
    valid = mask_BT.to(torch.bool)
    r = zero_masked(rewards_BT.float(), valid)
    out = torch.zeros_like(r)
    next_B = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        next_B = torch.where(valid[:, t], r[:, t] + gamma * next_B, next_B)
        out[:, t] = torch.where(valid[:, t], next_B, 0.0)
    return out


def place_token_rewards(
    per_sample: Sequence[Sequence[float] | None], loss_mask_BT: torch.Tensor
) -> torch.Tensor:
    """Per-sample token reward lists (e.g. ``ScoredGroup.token_rewards``, flattened group-major)
    laid on each row's valid tokens in order. Returns ``token_rewards_BT`` (fp32, 0 elsewhere).

    ``None`` (no token rewards for that sample) and rows with no valid token (masked samples) give
    zeros; otherwise a list must have one value per valid token of its row.
    """
    valid = loss_mask_BT.to(torch.bool)
    if len(per_sample) != valid.shape[0]:
        raise ValueError(f"place_token_rewards: {len(per_sample)} samples for {valid.shape[0]} rows")
    out = torch.zeros(valid.shape, dtype=torch.float32)
    for b, values in enumerate(per_sample):
        positions = torch.nonzero(valid[b]).squeeze(-1)
        if values is None or positions.numel() == 0:
            continue
        if len(values) != positions.numel():
            raise ValueError(
                f"place_token_rewards: sample {b} has {len(values)} token rewards for {positions.numel()} "
                "response tokens; a token-level reward node must return one value per completion token"
            )
        out[b, positions] = torch.tensor(list(values), dtype=torch.float32)
    return out


def whiten(advantages_BT: torch.Tensor, mask_BT: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Batch-whiten advantages over valid tokens (PPO); see ``masked_whiten``."""
    return masked_whiten(advantages_BT, mask_BT, shift_mean=shift_mean)


def broadcast_to_tokens(values_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Per-sequence values copied onto each valid token; 0 elsewhere. Returns ``_BT``."""
    return zero_masked(values_B.unsqueeze(-1).expand_as(mask_BT).to(torch.float32), mask_BT)


def place_at_last_token(values_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Sequence rewards placed on each row's last valid token (for GAE); 0 elsewhere.

    Rows with no valid token get nothing.
    """
    valid = mask_BT.to(torch.bool)
    positions_T = torch.arange(valid.shape[1], device=valid.device)
    last_B = torch.where(valid, positions_T, -1).amax(-1)
    out = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    rows_B = torch.nonzero(last_B >= 0).squeeze(-1)
    out[rows_B, last_B[rows_B]] = values_B[rows_B].to(torch.float32)
    return out


@dataclass
class AdvantageInputs:
    """What an estimator may use. Rows of the token tensors are the samples in group-major order
    (row ``g * n + i`` is sample i of group g), so ``B = num_groups * n``.

    rewards_NG: sequence rewards (NaN where masked); sample_mask_NG: False for masked samples;
    loss_mask_BT: valid response tokens; token_rewards_BT: per-token rewards (KL-in-reward
    penalties plus process rewards, already summed), summed into the sequence score by the group
    estimators and used per token by GAE / REINFORCE++; values_BT: critic values (GAE only).
    """

    rewards_NG: torch.Tensor
    sample_mask_NG: torch.Tensor
    loss_mask_BT: torch.Tensor
    token_rewards_BT: torch.Tensor | None = None
    values_BT: torch.Tensor | None = None


@dataclass
class AdvantageResult:
    """advantages_BT (0 on masked tokens/samples); returns_BT only for critic-based estimators."""

    advantages_BT: torch.Tensor
    returns_BT: torch.Tensor | None = None


@runtime_checkable
class AdvantageEstimator(Protocol):
    """Any estimator a recipe can name by ``_target_``."""

    def compute(self, inputs: AdvantageInputs) -> AdvantageResult: ...


def _sample_token_mask(inputs: AdvantageInputs) -> torch.Tensor:
    valid_B = _valid_mask(inputs.rewards_NG, inputs.sample_mask_NG).reshape(-1)
    return inputs.loss_mask_BT.to(torch.bool) & valid_B.unsqueeze(-1)


def sequence_scores(inputs: AdvantageInputs) -> torch.Tensor:
    """What group estimators normalise: the sequence reward plus the sample's summed token rewards
    over its valid tokens (NaN stays NaN: a masked sample stays masked). Returns ``scores_NG``."""
    if inputs.token_rewards_BT is None:
        return inputs.rewards_NG
    token_sum_B = masked_sum(inputs.token_rewards_BT.float(), inputs.loss_mask_BT, dim=-1)
    return inputs.rewards_NG + token_sum_B.view_as(inputs.rewards_NG)


def _token_rewards_with_outcome(inputs: AdvantageInputs, rewards_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Sequence rewards on the last valid token plus the token rewards (per-token estimators)."""
    rewards_BT = place_at_last_token(torch.nan_to_num(rewards_B.float(), nan=0.0), mask_BT)
    if inputs.token_rewards_BT is not None:
        rewards_BT = rewards_BT + zero_masked(inputs.token_rewards_BT.float(), mask_BT)
    return rewards_BT


@dataclass(frozen=True)
class GRPOAdvantage:
    """GRPO group normalisation; ``scale_by_std=False`` is Dr.GRPO (mean-centred only)."""

    eps: float = 1e-6
    scale_by_std: bool = True

    def validate(self) -> tuple[str, str, str] | None:
        if self.eps <= 0:
            return ("eps", f"{self.eps} must be > 0 (it guards groups with zero spread)", "e.g. eps: 1e-6")
        return None

    def compute(self, inputs: AdvantageInputs) -> AdvantageResult:
        raise_if_invalid(self)
        adv_NG = grpo_advantages(sequence_scores(inputs), inputs.sample_mask_NG, self.eps, self.scale_by_std)
        return AdvantageResult(broadcast_to_tokens(adv_NG.reshape(-1), _sample_token_mask(inputs)))


@dataclass(frozen=True)
class RLOOAdvantage:
    """REINFORCE leave-one-out baseline within each group."""

    def compute(self, inputs: AdvantageInputs) -> AdvantageResult:
        adv_NG = rloo_advantages(sequence_scores(inputs), inputs.sample_mask_NG)
        return AdvantageResult(broadcast_to_tokens(adv_NG.reshape(-1), _sample_token_mask(inputs)))


@dataclass(frozen=True)
class GAEAdvantage:
    """PPO with a critic: GAE(gamma, lam) then optional batch whitening of the advantages.

    The sequence reward goes on the last valid token, plus ``token_rewards_BT`` when given.
    Returns (the critic's targets) are never whitened.
    """

    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True

    def validate(self) -> tuple[str, str, str] | None:
        for key in ("gamma", "lam"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                return (key, f"{getattr(self, key)} must be in [0, 1]", f"e.g. {key}: 1.0")
        return None

    def compute(self, inputs: AdvantageInputs) -> AdvantageResult:
        raise_if_invalid(self)
        if inputs.values_BT is None:
            raise ValueError(
                "GAEAdvantage needs values_BT from the critic; use GRPOAdvantage/RLOOAdvantage without one"
            )
        mask_BT = _sample_token_mask(inputs)
        rewards_BT = _token_rewards_with_outcome(inputs, inputs.rewards_NG.reshape(-1), mask_BT)
        adv_BT, returns_BT = gae(rewards_BT, inputs.values_BT, mask_BT, self.gamma, self.lam)
        if self.whiten:
            adv_BT = whiten(adv_BT, mask_BT)
        return AdvantageResult(adv_BT, returns_BT)


@dataclass(frozen=True)
class ReinforcePlusPlusAdvantage:
    """REINFORCE++ (Hu 2025, as in OpenRLHF): no critic, no group baseline.

    Per-token rewards (sequence reward on the last valid token plus ``token_rewards_BT``, e.g. the
    KL penalty) are turned into reward-to-go ``G_t = r_t + gamma G_{t+1}``, then whitened over all
    valid tokens of the batch (``whiten=True``, the global batch normalisation).
    """

    gamma: float = 1.0
    whiten: bool = True

    def validate(self) -> tuple[str, str, str] | None:
        if not 0.0 <= self.gamma <= 1.0:
            return ("gamma", f"{self.gamma} must be in [0, 1]", "e.g. gamma: 1.0")
        return None

    def _outcome_B(self, inputs: AdvantageInputs) -> torch.Tensor:
        return inputs.rewards_NG.reshape(-1)

    def compute(self, inputs: AdvantageInputs) -> AdvantageResult:
        raise_if_invalid(self)
        mask_BT = _sample_token_mask(inputs)
        rewards_BT = _token_rewards_with_outcome(inputs, self._outcome_B(inputs), mask_BT)
        adv_BT = discounted_returns(rewards_BT, mask_BT, self.gamma)
        if self.whiten:
            adv_BT = whiten(adv_BT, mask_BT)
        return AdvantageResult(adv_BT)


@dataclass(frozen=True)
class ReinforcePlusPlusBaselineAdvantage(ReinforcePlusPlusAdvantage):
    """REINFORCE++-baseline: the sequence reward minus its group's mean (over valid samples) goes on
    the last token; token rewards stay per token; then reward-to-go and batch whitening."""

    def _outcome_B(self, inputs: AdvantageInputs) -> torch.Tensor:
        return grpo_advantages(inputs.rewards_NG, inputs.sample_mask_NG, scale_by_std=False).reshape(-1)


def dynamic_sampling_keep(rewards_NG: torch.Tensor, mask_NG: torch.Tensor | None = None) -> torch.Tensor:
    """DAPO dynamic sampling: keep groups whose valid rewards are not all equal. Returns ``keep_N``.

    A group with zero reward variance (all right or all wrong) has all-zero group advantages and
    contributes no gradient; groups with fewer than 2 valid samples are dropped too.
    """
    valid = _as_groups(_valid_mask(rewards_NG, mask_NG))
    r = _as_groups(rewards_NG)
    hi_N = torch.where(valid, r, -torch.inf).amax(-1)
    lo_N = torch.where(valid, r, torch.inf).amin(-1)
    return (valid.sum(-1) >= 2) & (hi_N > lo_N)


def overlong_filter_mask(finish_reasons: Sequence[str]) -> torch.Tensor:
    """DAPO overlong filtering: False for truncated samples (finish reason ``"length"``). ``mask_B``."""
    return torch.tensor([reason != "length" for reason in finish_reasons], dtype=torch.bool)
