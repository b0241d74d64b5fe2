"""Offline losses: SFT cross-entropy, DPO (sigmoid / IPO / cDPO) and the Bradley-Terry reward loss.

Every loss is a pure function returning ``(loss, metrics)``. The loss is a *sum* over the local
micro-batch divided by a *global* count passed in (valid tokens, or pairs, over all micro-batches
and ranks), so summing the losses (or gradients) of the micro-batches equals one big batch.
Metrics are detached 0-dim tensors describing the local micro-batch (means over local items).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from posttrain.algorithms.config_check import raise_if_invalid
from posttrain.algorithms.logprobs import masked_mean, masked_sum, zero_masked

Metrics = dict[str, torch.Tensor]


def sft_loss(
    logprobs_BT: torch.Tensor, loss_mask_BT: torch.Tensor, num_tokens: float
) -> tuple[torch.Tensor, Metrics]:
    """Token-level negative log-likelihood: ``-sum(logprobs over loss_mask) / num_tokens``.

    logprobs_BT: log p(token t) in nats (see ``token_logprobs``); loss_mask_BT: 1 on the tokens
    that are trained (response tokens; the prompt is masked). num_tokens: the GLOBAL count of
    loss-mask tokens over every micro-batch and rank of this optimizer step.
    """
    logprobs_BT = zero_masked(logprobs_BT, loss_mask_BT)
    loss = -masked_sum(logprobs_BT, loss_mask_BT) / num_tokens
    nll = -masked_mean(logprobs_BT.detach(), loss_mask_BT)
    metrics = {"nll": nll, "perplexity": nll.exp(), "num_tokens": (loss_mask_BT != 0).sum().float()}
    return loss, metrics


DPOVariant = Literal["sigmoid", "ipo", "cdpo"]


@dataclass(frozen=True)
class DPOLossConfig:
    """DPO family.

    beta: KL strength (the implicit reward is ``beta * log(pi/ref)``).
    variant: ``sigmoid`` (Rafailov et al. 2023), ``ipo`` (Azar et al. 2023),
      ``cdpo`` (conservative DPO: the sigmoid loss with label smoothing, Mitchell 2023).
    label_smoothing: probability that a preference label is flipped; only for ``cdpo``,
      where it must lie in (0, 0.5).
    """

    beta: float = 0.1
    variant: DPOVariant = "sigmoid"
    label_smoothing: float = 0.0

    def validate(self) -> tuple[str, str, str] | None:
        """(key, problem, fix) for the recipe loader's ConfigError, or None when consistent."""
        if self.variant not in _DPO_PAIR_LOSSES:
            return (
                "variant",
                f"{self.variant!r} is not a DPO variant",
                f"use one of {sorted(_DPO_PAIR_LOSSES)}",
            )
        if self.beta <= 0:
            return ("beta", f"{self.beta} must be > 0", "set beta, e.g. 0.1")
        if self.variant == "cdpo" and not 0.0 < self.label_smoothing < 0.5:
            return (
                "label_smoothing",
                f"{self.label_smoothing}: variant 'cdpo' needs 0 < label_smoothing < 0.5",
                "set label_smoothing, e.g. 0.1",
            )
        if self.variant != "cdpo" and self.label_smoothing != 0.0:
            return (
                "label_smoothing",
                f"{self.label_smoothing} has no effect with variant {self.variant!r}",
                "use variant: cdpo for label-smoothed DPO, or remove label_smoothing",
            )
        return None


def _sigmoid_pair_loss(logratio_diff_B: torch.Tensor, cfg: DPOLossConfig) -> torch.Tensor:
    return -F.logsigmoid(cfg.beta * logratio_diff_B)


def _cdpo_pair_loss(logratio_diff_B: torch.Tensor, cfg: DPOLossConfig) -> torch.Tensor:
    # BCE against a soft label: the chosen answer is preferred with probability 1 - eps.
    eps = cfg.label_smoothing
    h_B = cfg.beta * logratio_diff_B
    return -(1.0 - eps) * F.logsigmoid(h_B) - eps * F.logsigmoid(-h_B)


def _ipo_pair_loss(logratio_diff_B: torch.Tensor, cfg: DPOLossConfig) -> torch.Tensor:
    # IPO regresses the log-ratio difference h onto 1/(2 beta); beta is not applied to h.
    return (logratio_diff_B - 1.0 / (2.0 * cfg.beta)) ** 2


_DPO_PAIR_LOSSES: dict[str, Callable[[torch.Tensor, DPOLossConfig], torch.Tensor]] = {
    "sigmoid": _sigmoid_pair_loss,
    "cdpo": _cdpo_pair_loss,
    "ipo": _ipo_pair_loss,
}


def dpo_loss(
    pol_chosen_B: torch.Tensor,
    pol_rejected_B: torch.Tensor,
    ref_chosen_B: torch.Tensor,
    ref_rejected_B: torch.Tensor,
    cfg: DPOLossConfig,
    num_pairs: float,
) -> tuple[torch.Tensor, Metrics]:
    """DPO-family loss on per-sequence logprob SUMS (nats), one entry per preference pair.

    ``h = (pol_chosen - ref_chosen) - (pol_rejected - ref_rejected)``; the per-pair loss is
    ``-log sigmoid(beta h)`` (sigmoid), its label-smoothed form (cdpo) or ``(h - 1/(2 beta))^2``
    (ipo). IPO is applied to the inputs as given: with sums it is NOT length-averaged (TRL
    length-averages for IPO; pass per-token mean logprobs to get that behaviour).
    The loss is ``sum over local pairs / num_pairs`` where num_pairs is the GLOBAL pair count.

    Metrics: implicit rewards ``beta * (pol - ref)`` for chosen/rejected, their margin, and the
    reward accuracy ``rewards/accuracy`` (fraction of the batch's pairs where the chosen implicit
    reward is strictly higher: relative to the reference, so 0 at step 0, as TRL's
    ``rewards/accuracies``). The held-out ``eval/pair_accuracy`` of :class:`posttrain.offline.dpo.DPO`
    compares the policy's own logprobs, without the reference.
    """
    raise_if_invalid(cfg)
    chosen_logratio_B = pol_chosen_B - ref_chosen_B
    rejected_logratio_B = pol_rejected_B - ref_rejected_B
    per_pair_B = _DPO_PAIR_LOSSES[cfg.variant](chosen_logratio_B - rejected_logratio_B, cfg)
    loss = per_pair_B.sum() / num_pairs

    with torch.no_grad():
        chosen_reward_B = cfg.beta * chosen_logratio_B
        rejected_reward_B = cfg.beta * rejected_logratio_B
        metrics = {
            "rewards/chosen": chosen_reward_B.mean(),
            "rewards/rejected": rejected_reward_B.mean(),
            "rewards/margin": (chosen_reward_B - rejected_reward_B).mean(),
            "rewards/accuracy": (chosen_reward_B > rejected_reward_B).float().mean(),
            "logps/chosen": pol_chosen_B.mean(),
            "logps/rejected": pol_rejected_B.mean(),
        }
    return loss, metrics


def bradley_terry_loss(
    chosen_scores_B: torch.Tensor,
    rejected_scores_B: torch.Tensor,
    num_pairs: float,
    margin_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Pairwise reward-model loss ``-log sigmoid(s_chosen - s_rejected - margin)``.

    Scores are scalar outputs of the reward head (one per sequence). ``margin_B`` (optional, e.g.
    Llama-2's preference-strength margin) demands the chosen score exceed the rejected one by at
    least that much. Loss = sum over local pairs / num_pairs (GLOBAL pair count).
    Metrics: pairwise accuracy (chosen strictly above rejected, margin not applied), mean scores.
    """
    diff_B = chosen_scores_B - rejected_scores_B
    shifted_B = diff_B if margin_B is None else diff_B - margin_B
    loss = -F.logsigmoid(shifted_B).sum() / num_pairs
    with torch.no_grad():
        metrics = {
            "accuracy": (diff_B > 0).float().mean(),
            "score/chosen": chosen_scores_B.mean(),
            "score/rejected": rejected_scores_B.mean(),
            "score/margin": diff_B.mean(),
        }
    return loss, metrics
