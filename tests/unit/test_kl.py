"""KL estimators (clamped as in verl), the KL-in-reward penalty, the KL coefficient controllers,
and the loss config's refusal of k1. Values are hand-computed."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms.config_check import raise_if_invalid
from posttrain.algorithms.kl import (
    MAX_KL_TOKEN,
    AdaptiveKLController,
    FixedKLController,
    check_kl_in_reward,
    kl_penalty,
    kl_reward_penalty,
)
from posttrain.algorithms.policy_loss import GRPOLossConfig, PolicyLossConfig, policy_loss
from posttrain.config.errors import ConfigError

LN = math.log


def test_estimators_and_their_sign():
    lp, ref = torch.tensor([LN(0.5)]), torch.tensor([LN(0.25)])  # x = log(pi/ref) = ln 2
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(LN(2))
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(LN(2) ** 2 / 2)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(0.5 - 1 + LN(2))  # 0.19315
    # swapped roles: x = -ln 2 -> k1 = -ln 2, k3 = 2 - 1 - ln 2 = 0.30685 (k3 is not symmetric)
    assert kl_penalty(ref, lp, "k1").item() == pytest.approx(-LN(2))
    assert kl_penalty(ref, lp, "k3").item() == pytest.approx(1 - LN(2))


def test_k3_is_clamped_and_carries_no_gradient_past_the_clamp():
    lp = torch.tensor([-30.0, -1.0], requires_grad=True)
    ref = torch.tensor([-1.0, -1.0])
    k3 = kl_penalty(lp, ref, "k3")  # unclamped: e^29 - 1 - 29 = 3.9e12
    assert k3.tolist() == [MAX_KL_TOKEN, 0.0]
    k3.sum().backward()
    assert lp.grad.tolist() == [0.0, 0.0]  # clamped token: none; x = 0: 1 - e^0 = 0
    # just inside the clamp: x = -2: e^2 - 1 - 2 = 4.389, gradient 1 - e^2 = -6.389
    x = torch.tensor([-2.0], requires_grad=True)
    v = kl_penalty(x, torch.tensor([0.0]), "k3")
    v.backward()
    assert v.item() == pytest.approx(math.e**2 - 3, rel=1e-6)
    assert x.grad.item() == pytest.approx(1 - math.e**2, rel=1e-6)


def test_k2_is_not_clamped_as_in_verl():
    # x = 5: k2 = 12.5 (above k3's 10-nat clamp) and its gradient x = 5 still pulls back
    lp = torch.tensor([4.0], requires_grad=True)
    k2 = kl_penalty(lp, torch.tensor([-1.0]), "k2")
    k2.backward()
    assert k2.item() == 12.5 > MAX_KL_TOKEN
    assert lp.grad.item() == 5.0


def test_loss_gradients_of_k2_and_k3():
    # d k2 / d log pi = x = ln 2;  d k3 / d log pi = 1 - e^-x = 0.5 (grad of KL(ref||pi) per sample)
    for est, want in (("k2", LN(2)), ("k3", 0.5)):
        lp = torch.tensor([LN(0.5)], requires_grad=True)
        kl_penalty(lp, torch.tensor([LN(0.25)]), est).sum().backward()
        assert lp.grad.item() == pytest.approx(want)


def test_kl_reward_penalty_is_minus_coef_times_kl_on_valid_tokens():
    lp = torch.tensor([[LN(0.5), LN(0.5), 7.0]])
    ref = torch.tensor([[LN(0.25), LN(0.5), float("nan")]])
    mask = torch.tensor([[1, 1, 0]])
    penalty, kl = kl_reward_penalty(lp, ref, mask, coef=0.1, estimator="k1")
    torch.testing.assert_close(penalty, torch.tensor([[-0.1 * LN(2), 0.0, 0.0]]))
    torch.testing.assert_close(kl, torch.tensor([[LN(2), 0.0, 0.0]]))


def test_adaptive_controller_by_hand():
    ctl = AdaptiveKLController(init_coef=0.1, target_kl=0.1, horizon=100)
    # kl 0.15: error clip(0.5) = 0.2 -> 0.1 * (1 + 0.2 * 10 / 100) = 0.102
    assert ctl.update(0.15, n_steps=10) == pytest.approx(0.102)
    # kl 0.09: error -0.1 -> 0.102 * (1 - 0.1 * 10 / 100) = 0.10098
    assert ctl.update(0.09, n_steps=10) == pytest.approx(0.10098)
    assert ctl.update(float("nan"), n_steps=10) == pytest.approx(0.10098)  # unchanged
    restored = AdaptiveKLController(init_coef=0.1, target_kl=0.1, horizon=100)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == pytest.approx(0.10098)
    assert FixedKLController(0.05).update(9.0, 10) == 0.05


@pytest.mark.parametrize(
    "cfg,key",
    [(AdaptiveKLController(init_coef=0.0), "init_coef"), (AdaptiveKLController(target_kl=-1.0), "target_kl"),
     (AdaptiveKLController(horizon=0), "horizon"), (FixedKLController(-0.1), "coef")],
)
def test_controller_validation_names_the_key(cfg, key):
    with pytest.raises(ConfigError, match=key):
        raise_if_invalid(cfg)


def test_k1_in_the_loss_is_refused_naming_k2_and_k3():
    problem = PolicyLossConfig(kl_coef=0.1, kl_estimator="k1").validate()
    assert problem is not None
    key, message, fix = problem
    assert key == "kl_estimator" and "zero expected gradient" in message and "k3" in fix and "k2" in fix
    assert PolicyLossConfig(kl_coef=0.0, kl_estimator="k1").validate() is None  # a metric only: fine
    assert GRPOLossConfig(kl_coef=0.04, kl_estimator="k3").validate() is None
    z = torch.zeros(1, 2)
    with pytest.raises(ConfigError, match="kl_estimator"):
        policy_loss(z, z, z, z, torch.ones(1, 2), PolicyLossConfig(kl_coef=0.1, kl_estimator="k1"), 2, 1,
                    ref_logprobs_BT=z)


def test_kl_in_reward_validation():
    assert check_kl_in_reward(0.02, "k1") is None  # k1 is fine in the reward
    key, problem, fix = check_kl_in_reward(-0.1, "k1")
    assert key == "kl_in_reward_coef" and "must be >= 0" in problem and "0 to disable" in fix
    key, problem, fix = check_kl_in_reward(0.1, "k9")
    assert key == "kl_in_reward_estimator" and "'k9'" in problem and "k3" in fix
