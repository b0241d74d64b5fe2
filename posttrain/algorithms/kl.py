"""KL to the reference policy: per-token estimators, the KL-in-reward penalty, KL coefficient controllers.

Estimators (Schulman 2020) of KL(pi || ref) from the sampled token's logprobs, x = log(pi / ref):

    k1 = x                          unbiased, can be negative
    k2 = x^2 / 2                    biased, >= 0
    k3 = exp(-x) - 1 + x            unbiased, >= 0, low variance

As a *loss* term (differentiated through log pi, samples from pi), the expected gradients are:
k1 -> 0 (E_pi[grad log pi] = 0: k1 in the loss does nothing in expectation, so the loss rejects it);
k2 -> grad KL(pi || ref); k3 -> grad KL(ref || pi) (E_pi[-(ref/pi) grad log pi] = -E_ref[grad log pi]).
In the *reward* (a constant per token, no gradient through it) any of them estimates KL(pi || ref).

Clamps, as verl's ``kl_penalty``: for k3 only, x is clamped to [-20, 20] before ``exp`` and k3 to
at most ``MAX_KL_TOKEN`` = 10 nats per token (one token at logprob -30 against -1 would otherwise
give k3 = e^29 = 3.9e12); a token past either clamp gets no gradient from this term. k1 and k2 are
not clamped (nor are they in verl): k2 = x^2 / 2 grows quadratically, and its gradient x keeps
pulling a far-off token back however far it went.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from posttrain.algorithms.logprobs import zero_masked

KLEstimator = Literal["k1", "k2", "k3"]
MAX_KL_LOG_RATIO = 20.0
MAX_KL_TOKEN = 10.0


def _k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio


def _k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio**2


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    x = log_ratio.clamp(-MAX_KL_LOG_RATIO, MAX_KL_LOG_RATIO)
    return (torch.expm1(-x) + x).clamp(max=MAX_KL_TOKEN)


def k3_unclamped(log_ratio: torch.Tensor) -> torch.Tensor:
    """k3 without clamps: for metrics (approx KL, behaviour mismatch), where the size must show."""
    return torch.expm1(-log_ratio) + log_ratio


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_penalty(
    logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor, estimator: KLEstimator = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) (see the module docstring). Returns ``kl_BT`` (nats)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator {estimator!r}: expected one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logprobs_BT - ref_logprobs_BT)


def kl_reward_penalty(
    logprobs_BT: torch.Tensor,
    ref_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    coef: float,
    estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL in the reward, per token as in verl / PPO-RLHF: ``r_t -= coef * kl_t``.

    ``logprobs_BT`` are the trainer's pre-update (old) logprobs of the sampled tokens. Returns
    ``(penalty_BT, kl_BT)``: the penalty (``-coef * kl``, detached, 0 on masked tokens) to add to
    the per-token rewards, and the raw per-token KL (0 on masked tokens) whose masked mean feeds
    ``AdaptiveKLController.update``.
    """
    kl_BT = zero_masked(kl_penalty(logprobs_BT.detach(), ref_logprobs_BT.detach(), estimator), mask_BT)
    return -coef * kl_BT, kl_BT


def check_kl_in_reward(coef: float, estimator: str) -> tuple[str, str, str] | None:
    """Validation for the driver's KL-in-reward settings: ``(key, problem, fix)`` or None.

    Any advantage estimator accepts KL in the reward now (group estimators sum it into the score,
    GAE / REINFORCE++ use it per token), so the estimator is not checked; k1 is fine here (it is
    refused only in the loss, where its expected gradient is 0).
    """
    if coef < 0:
        return ("kl_in_reward_coef", f"{coef} must be >= 0", "set kl_in_reward_coef: 0 to disable KL in the reward")
    if estimator not in KL_ESTIMATORS:
        return ("kl_in_reward_estimator", f"{estimator!r} is not allowed", f"use one of {sorted(KL_ESTIMATORS)} (k1 as in verl)")
    return None


# ---------------------------------------------------------------- controllers
@dataclass
class FixedKLController:
    """A constant KL coefficient. ``_target_: posttrain.algorithms.kl.FixedKLController``."""

    coef: float = 0.0

    @property
    def value(self) -> float:
        return self.coef

    def validate(self) -> tuple[str, str, str] | None:
        if self.coef < 0:
            return ("coef", f"{self.coef} must be >= 0", "set coef: 0 to disable KL in the reward")
        return None

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.coef

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        pass


@dataclass
class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, as in verl / TRL's PPO).

    After each step with measured KL ``kl`` (mean per token, nats) over ``n_steps`` samples:
    ``error = clip(kl / target_kl - 1, -0.2, 0.2)``; ``value *= 1 + error * n_steps / horizon``.
    Above target the coefficient grows, below it shrinks, at most by 20% x n_steps / horizon.
    ``_target_: posttrain.algorithms.kl.AdaptiveKLController``.
    """

    init_coef: float = 0.05
    target_kl: float = 0.1
    horizon: int = 10000
    value: float = field(init=False)

    def __post_init__(self) -> None:
        self.value = self.init_coef

    def validate(self) -> tuple[str, str, str] | None:
        if self.init_coef <= 0:
            return ("init_coef", f"{self.init_coef} must be > 0 (a 0 coefficient never adapts)", "e.g. init_coef: 0.05")
        if self.target_kl <= 0:
            return ("target_kl", f"{self.target_kl} must be > 0", "e.g. target_kl: 0.1 (mean KL per token, nats)")
        if self.horizon < 1:
            return ("horizon", f"{self.horizon} must be >= 1", "e.g. horizon: 10000")
        return None

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adapt to the measured KL; returns the new coefficient. A non-finite KL leaves it unchanged."""
        if math.isfinite(current_kl):
            error = min(max(current_kl / self.target_kl - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
