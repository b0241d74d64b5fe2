"""One clipped policy-gradient loss for PPO and the GRPO family, plus KL and value losses.

GRPO, Dr.GRPO, DAPO and GSPO are parameterisations of ``PolicyLossConfig`` (see the presets at
the end), not copies of the loss. Per valid token t of sequence i:

    ratio_t   = exp(logprobs_t - old_logprobs_t)              (token level)
              = exp(mean_{t in i}(logprobs - old)) (GSPO)      (sequence level, same value on
                                                                every token of the sequence)
    pg_t      = max(-A_t ratio_t, -A_t clip(ratio_t, 1 - clip_low, 1 + clip_high))
    pg_t      = min(pg_t, -A_t dual_clip)   where A_t < 0     (dual clip, optional)
    loss_t    = w_t pg_t + kl_coef KL_t - entropy_coef H_t

``KL_t`` is a per-token estimator from ``posttrain.algorithms.kl`` (k3 clamped as in verl, k2 not). Its
gradient in the loss is that of KL(pi || ref) for k2 and of KL(ref || pi) for k3; k1 has zero
expected gradient, so ``kl_estimator: k1`` with ``kl_coef > 0`` is rejected.

``w_t`` is the behaviour importance weight ``exp(old_logprobs - behaviour_logprobs)``
(detached) between the trainer's old/proximal logprobs and the rollout engine's logprobs:

    decoupled=False, tis_cap=None : w = 1 (behaviour logprobs only feed the mismatch metrics)
    decoupled=False, tis_cap=c    : w = min(w, c)            truncated IS (TIS)
    decoupled=True,  tis_cap=None : w uncapped               decoupled PPO (AReaL; old = proximal)
    decoupled=True,  tis_cap=c    : w, but 0 where w > c     AReaL's behaviour-weight cap (drop)

The log-ratio is clamped to [-20, 20] before exp (tokens that far off-policy get no gradient).
The per-token losses are then aggregated with GLOBAL counts passed in (``num_tokens`` valid tokens
or ``num_seqs`` sequences over every micro-batch and rank), so micro-batches sum to the full batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from posttrain.algorithms.config_check import raise_if_invalid
from posttrain.algorithms.kl import KL_ESTIMATORS, KLEstimator, k3_unclamped, kl_penalty
from posttrain.algorithms.logprobs import masked_mean, masked_sum, zero_masked

Metrics = dict[str, torch.Tensor]
MAX_LOG_RATIO = 20.0
RatioLevel = Literal["token", "sequence"]
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


# ---------------------------------------------------------------- config
@dataclass(frozen=True)
class PolicyLossConfig:
    """General clipped policy loss.

    clip_low / clip_high: ratio clipped to [1 - clip_low, 1 + clip_high] (DAPO clip-higher when
      clip_high > clip_low).
    ratio_level: "token" (PPO/GRPO) or "sequence" (GSPO length-normalised sequence ratio).
    aggregation: "token_mean" (sum / num_tokens), "seq_mean_token_mean" (mean over tokens of each
      sequence, then sum / num_seqs), "seq_mean_token_sum_norm" (Dr.GRPO: token sum / norm_length,
      then sum / num_seqs).
    norm_length: the constant of seq_mean_token_sum_norm (the generation budget in tokens);
      required by that aggregation and forbidden otherwise.
    kl_coef / kl_estimator: KL to the reference in the loss (needs ref logprobs when kl_coef > 0);
      k2 (gradient of KL(pi || ref)) or k3 (gradient of KL(ref || pi)); k1 is refused there.
    entropy_coef: entropy bonus (needs entropy_BT when > 0).
    tis_cap / decoupled: behaviour importance weighting, see the module docstring.
    dual_clip: lower bound c > 1 on the ratio term for negative advantages (Ye et al. 2020).
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    ratio_level: RatioLevel = "token"
    aggregation: Aggregation = "token_mean"
    norm_length: int | None = None
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    entropy_coef: float = 0.0
    tis_cap: float | None = None
    decoupled: bool = False
    dual_clip: float | None = None

    def validate(self) -> tuple[str, str, str] | None:
        """(key, problem, fix) for the recipe loader's ConfigError, or None when consistent."""
        choices = {"ratio_level": _RATIOS, "aggregation": _AGGREGATIONS, "kl_estimator": KL_ESTIMATORS}
        for key, table in choices.items():
            if getattr(self, key) not in table:
                return (key, f"{getattr(self, key)!r} is not allowed", f"use one of {sorted(table)}")
        if not 0.0 <= self.clip_low < 1.0:
            return ("clip_low", f"{self.clip_low} must be in [0, 1)", "e.g. clip_low: 0.2")
        if self.clip_high < 0.0:
            return ("clip_high", f"{self.clip_high} must be >= 0", "e.g. clip_high: 0.28 (DAPO clip-higher)")
        uses_norm = self.aggregation == "seq_mean_token_sum_norm"
        if uses_norm and (self.norm_length is None or self.norm_length <= 0):
            return (
                "norm_length",
                "aggregation seq_mean_token_sum_norm divides by a constant length and needs norm_length > 0",
                "set norm_length to the generation budget (max new tokens)",
            )
        if not uses_norm and self.norm_length is not None:
            return (
                "norm_length",
                f"has no effect with aggregation {self.aggregation!r}",
                "remove norm_length, or use aggregation: seq_mean_token_sum_norm",
            )
        for key in ("kl_coef", "entropy_coef"):
            if getattr(self, key) < 0.0:
                return (key, f"{getattr(self, key)} must be >= 0", f"set {key}: 0 to disable")
        if self.kl_coef > 0 and self.kl_estimator == "k1":
            return (
                "kl_estimator",
                "k1 in the loss has zero expected gradient (E_pi[grad log pi] = 0): kl_coef would do nothing",
                "use kl_estimator: k3 (low variance, gradient of KL(ref||pi)) or k2 (gradient of KL(pi||ref)); "
                "k1 belongs in the reward (kl_in_reward_coef)",
            )
        if self.tis_cap is not None and self.tis_cap <= 0.0:
            return ("tis_cap", f"{self.tis_cap} must be > 0", "e.g. tis_cap: 2.0, or null to disable")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            return ("dual_clip", f"{self.dual_clip} must be > 1", "e.g. dual_clip: 3.0, or null to disable")
        return None


# ---------------------------------------------------------------- ratio levels
def _token_log_ratio(log_ratio_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    return log_ratio_BT


def _sequence_log_ratio(log_ratio_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    # GSPO-token form: value = the sequence's mean log-ratio on every token; the gradient of
    # token t is that of log pi_t alone (aggregated per sequence it is GSPO's gradient).
    seq_mean_B1 = masked_sum(log_ratio_BT, mask_BT, dim=-1).unsqueeze(-1) / mask_BT.sum(
        -1, keepdim=True
    ).clamp(min=1)
    return log_ratio_BT - log_ratio_BT.detach() + seq_mean_B1.detach()


_RATIOS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "token": _token_log_ratio,
    "sequence": _sequence_log_ratio,
}


# ---------------------------------------------------------------- aggregations
# (per_token_BT, mask_BT, cfg, num_tokens, num_seqs) -> scalar loss
Aggregator = Callable[[torch.Tensor, torch.Tensor, "PolicyLossConfig", float, float], torch.Tensor]


def _token_mean(
    loss_BT: torch.Tensor, mask_BT: torch.Tensor, cfg: PolicyLossConfig, num_tokens: float, num_seqs: float
) -> torch.Tensor:
    return masked_sum(loss_BT, mask_BT) / num_tokens


def _seq_mean_token_mean(
    loss_BT: torch.Tensor, mask_BT: torch.Tensor, cfg: PolicyLossConfig, num_tokens: float, num_seqs: float
) -> torch.Tensor:
    per_seq_B = masked_sum(loss_BT, mask_BT, dim=-1) / mask_BT.sum(-1).clamp(min=1)
    return per_seq_B.sum() / num_seqs


def _seq_mean_token_sum_norm(
    loss_BT: torch.Tensor, mask_BT: torch.Tensor, cfg: PolicyLossConfig, num_tokens: float, num_seqs: float
) -> torch.Tensor:
    assert cfg.norm_length is not None  # enforced by PolicyLossConfig
    return masked_sum(loss_BT, mask_BT) / (cfg.norm_length * num_seqs)


_AGGREGATIONS: dict[str, Aggregator] = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "seq_mean_token_sum_norm": _seq_mean_token_sum_norm,
}


# ---------------------------------------------------------------- behaviour importance weight
def _behaviour_weight(
    old_BT: torch.Tensor, behaviour_BT: torch.Tensor, cfg: PolicyLossConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_BT, over_cap_BT); the weight is detached (a constant per token)."""
    raw = torch.exp(old_BT - behaviour_BT).detach()
    over_cap = raw > cfg.tis_cap if cfg.tis_cap is not None else torch.zeros_like(raw, dtype=torch.bool)
    if cfg.decoupled:
        weight = torch.where(over_cap, 0.0, raw)
    elif cfg.tis_cap is not None:
        weight = raw.clamp(max=cfg.tis_cap)
    else:
        weight = torch.ones_like(raw)
    return weight, over_cap


def policy_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    behaviour_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    loss_mask_BT: torch.Tensor,
    cfg: PolicyLossConfig,
    num_tokens: float,
    num_seqs: float,
    ref_logprobs_BT: torch.Tensor | None = None,
    entropy_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped policy-gradient loss (see module docstring). All logprobs are nats, per token.

    logprobs_BT: current policy (with grad). old_logprobs_BT: the trainer's logprobs before this
    step's updates (the proximal policy when decoupled); pass the behaviour logprobs again when
    they were not recomputed. behaviour_logprobs_BT: the rollout engine's (vLLM) logprobs.
    num_tokens / num_seqs: GLOBAL valid-token / sequence counts of the optimizer step (count the
    sequences with at least one valid token: a fully masked sample contributes 0 and should not
    dilute the sequence mean).
    Metrics (detached, local micro-batch): clip fractions, ratio, IS weight, approx KL to old,
    behaviour mismatch, KL to ref, entropy.
    """
    raise_if_invalid(cfg)
    if cfg.kl_coef > 0 and ref_logprobs_BT is None:
        raise ValueError("PolicyLossConfig.kl_coef > 0 needs ref_logprobs_BT (a reference model)")
    if cfg.entropy_coef > 0 and entropy_BT is None:
        raise ValueError("PolicyLossConfig.entropy_coef > 0 needs entropy_BT (see entropy_from_logits)")

    mask = loss_mask_BT.to(torch.bool)
    # Zero masked inputs first: a NaN there must reach neither the loss nor the gradient.
    lp = zero_masked(logprobs_BT, mask)
    old = zero_masked(old_logprobs_BT, mask).detach()
    behaviour = zero_masked(behaviour_logprobs_BT, mask).detach()
    adv = zero_masked(advantages_BT, mask).detach()

    # Clamp as verl does: |log ratio| > 20 is a token far off-policy (and exp would overflow).
    log_ratio = _RATIOS[cfg.ratio_level](lp - old, mask).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg = torch.maximum(-adv * ratio, -adv * clipped_ratio)
    dual_clipped = torch.zeros_like(mask)
    if cfg.dual_clip is not None:
        dual_bound = -adv * cfg.dual_clip
        dual_clipped = (adv < 0) & (pg > dual_bound)
        pg = torch.where(dual_clipped, dual_bound, pg)

    weight, over_cap = _behaviour_weight(old, behaviour, cfg)
    per_token = weight * pg

    kl_ref = None
    if ref_logprobs_BT is not None:
        kl_ref = kl_penalty(lp, zero_masked(ref_logprobs_BT, mask).detach(), cfg.kl_estimator)
        if cfg.kl_coef > 0:
            per_token = per_token + cfg.kl_coef * kl_ref
    entropy = None
    if entropy_BT is not None:
        entropy = zero_masked(entropy_BT, mask)
        if cfg.entropy_coef > 0:
            per_token = per_token - cfg.entropy_coef * entropy

    loss = _AGGREGATIONS[cfg.aggregation](per_token, mask, cfg, num_tokens, num_seqs)

    with torch.no_grad():
        r = ratio.detach()
        metrics: Metrics = {
            "pg_loss": masked_mean(weight * pg, mask),
            "clip_frac_low": masked_mean(((r < 1.0 - cfg.clip_low) & (adv < 0)).float(), mask),
            "clip_frac_high": masked_mean(((r > 1.0 + cfg.clip_high) & (adv > 0)).float(), mask),
            "dual_clip_frac": masked_mean(dual_clipped.float(), mask),
            "ratio_mean": masked_mean(r, mask),
            "ratio_max": zero_masked(r, mask).amax(),  # ratios are > 0: 0 only when nothing is valid
            "approx_kl": masked_mean(k3_unclamped(old - lp.detach()), mask),  # KL(old || pi), k3
            "behaviour_kl": masked_mean(k3_unclamped(behaviour - old), mask),  # KL(behaviour || old), k3
            "is_weight_mean": masked_mean(weight, mask),
            "is_weight_max": zero_masked(weight, mask).amax(),
            "is_frac_over_cap": masked_mean(over_cap.float(), mask),
        }
        if kl_ref is not None:
            metrics["kl_ref"] = masked_mean(kl_ref.detach(), mask)
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy.detach(), mask)
    return loss, metrics


def value_loss(
    values_BT: torch.Tensor,
    old_values_BT: torch.Tensor,
    returns_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    clip: float | None,
    num_tokens: float,
) -> tuple[torch.Tensor, Metrics]:
    """PPO critic loss ``0.5 * max((V - R)^2, (V_clipped - R)^2)``, summed / num_tokens (GLOBAL).

    ``V_clipped = V_old + clamp(V - V_old, -clip, clip)``; ``clip=None`` gives the plain squared
    error. Values and returns are in reward units.
    """
    mask = mask_BT.to(torch.bool)
    v = zero_masked(values_BT, mask)
    old = zero_masked(old_values_BT, mask).detach()
    ret = zero_masked(returns_BT, mask).detach()
    unclipped = (v - ret) ** 2
    if clip is None:
        per_token = unclipped
        clipped_frac = torch.zeros((), device=v.device)
    else:
        v_clipped = old + (v - old).clamp(-clip, clip)
        clipped = (v_clipped - ret) ** 2
        per_token = torch.maximum(unclipped, clipped)
        clipped_frac = masked_mean((clipped > unclipped).float().detach(), mask)
    loss = 0.5 * masked_sum(per_token, mask) / num_tokens
    with torch.no_grad():
        residual_var = masked_mean((ret - v) ** 2, mask) - masked_mean(ret - v, mask) ** 2
        returns_var = masked_mean(ret**2, mask) - masked_mean(ret, mask) ** 2
        metrics = {
            "vf_clip_frac": clipped_frac,
            "value_mean": masked_mean(v, mask),
            "returns_mean": masked_mean(ret, mask),
            "vf_explained_var": 1.0 - residual_var / returns_var.clamp(min=1e-8),
        }
    return loss, metrics


# ---------------------------------------------------------------- presets
# Each preset is PolicyLossConfig with other defaults, so a recipe can name it by _target_ and
# override any field; the loss code never knows which preset it got.
@dataclass(frozen=True)
class GRPOLossConfig(PolicyLossConfig):
    """GRPO (DeepSeekMath): symmetric 0.2 clip, per-sequence token mean, k3 KL when kl_coef > 0.

    kl_coef defaults to 0 as in TRL; DeepSeekMath used 0.04 (requires reference logprobs).
    """

    aggregation: Aggregation = "seq_mean_token_mean"


@dataclass(frozen=True)
class DrGRPOLossConfig(PolicyLossConfig):
    """Dr.GRPO: token sums divided by the constant ``norm_length`` (set it to the generation
    budget), so neither long nor short answers are favoured; pair with GRPOAdvantage(scale_by_std=False)."""

    aggregation: Aggregation = "seq_mean_token_sum_norm"


@dataclass(frozen=True)
class DAPOLossConfig(PolicyLossConfig):
    """DAPO: clip-higher (0.2 / 0.28), token-level mean over the whole batch, no KL."""

    clip_high: float = 0.28
    aggregation: Aggregation = "token_mean"


@dataclass(frozen=True)
class GSPOLossConfig(PolicyLossConfig):
    """GSPO: sequence-level geometric-mean ratio, clip 3e-4 / 4e-4, per-sequence token mean."""

    clip_low: float = 3e-4
    clip_high: float = 4e-4
    ratio_level: RatioLevel = "sequence"
    aggregation: Aggregation = "seq_mean_token_mean"
