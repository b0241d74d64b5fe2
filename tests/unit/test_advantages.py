"""Advantage estimators: GRPO, Dr.GRPO, RLOO, GAE, whitening, dynamic sampling, overlong handling.

Expected values are hand-computed (arithmetic in comments), never copied from a run.
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms.advantages import (
    AdvantageEstimator,
    AdvantageInputs,
    GAEAdvantage,
    GRPOAdvantage,
    ReinforcePlusPlusAdvantage,
    ReinforcePlusPlusBaselineAdvantage,
    RLOOAdvantage,
    discounted_returns,
    dynamic_sampling_keep,
    gae,
    grpo_advantages,
    overlong_filter_mask,
    place_at_last_token,
    place_token_rewards,
    rloo_advantages,
    sequence_scores,
)

NAN = float("nan")
EPS = 1e-6


# ------------------------------------------------------------------ GRPO / Dr.GRPO / RLOO
def test_grpo_one_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # mean 0.5; unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    a = 0.5 / (math.sqrt(1 / 3) + EPS)
    torch.testing.assert_close(grpo_advantages(rewards, eps=EPS), torch.tensor([a, -a, -a, a]))


def test_grpo_masked_sample_excluded_from_stats_and_gets_zero():
    rewards = torch.tensor([1.0, 0.0, 5.0, 2.0])
    mask = torch.tensor([True, True, False, True])
    # valid [1, 0, 2]: mean 1, unbiased var (0 + 1 + 1) / 2 = 1 -> std 1
    expected = torch.tensor([0.0, -1.0, 0.0, 1.0]) / (1.0 + EPS)
    torch.testing.assert_close(grpo_advantages(rewards, mask, eps=EPS), expected)
    # a NaN reward is masked too, even without an explicit mask
    nan_rewards = torch.tensor([1.0, 0.0, NAN, 2.0])
    torch.testing.assert_close(grpo_advantages(nan_rewards, eps=EPS), expected)


def test_dr_grpo_is_mean_only():
    rewards = torch.tensor([1.0, 0.0, 5.0, 2.0])
    mask = torch.tensor([True, True, False, True])
    # valid mean (1 + 0 + 2) / 3 = 1
    out = grpo_advantages(rewards, mask, scale_by_std=False)
    torch.testing.assert_close(out, torch.tensor([0.0, -1.0, 0.0, 1.0]))


def test_rloo_leave_one_out():
    # r_i - mean of the other three: 1 - 1/3 = 2/3, 0 - 2/3 = -2/3
    out = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(out, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    # masked sample 2; valid [1, 0, 2]: 1 - (0+2)/2 = 0, 0 - (1+2)/2 = -1.5, 2 - (1+0)/2 = 1.5
    masked = rloo_advantages(torch.tensor([1.0, 0.0, NAN, 2.0]), torch.tensor([1, 1, 0, 1]))
    torch.testing.assert_close(masked, torch.tensor([0.0, -1.5, 0.0, 1.5]))


def test_group_estimators_on_several_groups_and_degenerate_groups():
    rewards = torch.tensor(
        [
            [3.0, 1.0, 2.0],  # mean 2, unbiased std 1
            [7.0, NAN, NAN],  # one valid sample: zeros
            [4.0, 4.0, 4.0],  # no spread: zeros
        ]
    )
    grpo = grpo_advantages(rewards, eps=EPS)
    torch.testing.assert_close(grpo[0], torch.tensor([1.0, -1.0, 0.0]) / (1 + EPS))
    torch.testing.assert_close(grpo[1:], torch.zeros(2, 3))
    rloo = rloo_advantages(rewards)
    # 3 - 1.5 = 1.5, 1 - 2.5 = -1.5, 2 - 2 = 0
    torch.testing.assert_close(rloo[0], torch.tensor([1.5, -1.5, 0.0]))
    torch.testing.assert_close(rloo[1:], torch.zeros(2, 3))


def _inputs(rewards_NG, sample_mask_NG, loss_mask_BT, values_BT=None, token_rewards_BT=None):
    return AdvantageInputs(
        rewards_NG=rewards_NG,
        sample_mask_NG=sample_mask_NG,
        loss_mask_BT=loss_mask_BT,
        values_BT=values_BT,
        token_rewards_BT=token_rewards_BT,
    )


def test_estimator_configs_broadcast_to_valid_tokens():
    rewards = torch.tensor([[1.0, 0.0, NAN, 2.0]])
    sample_mask = torch.tensor([[True, True, False, True]])
    loss_mask = torch.tensor([[0, 1, 1], [0, 1, 0], [0, 1, 1], [0, 1, 1]])
    inputs = _inputs(rewards, sample_mask, loss_mask)
    estimators: list[AdvantageEstimator] = [GRPOAdvantage(scale_by_std=False), RLOOAdvantage()]
    # Dr.GRPO per sample [0, -1, 0, 1]; RLOO per sample [0, -1.5, 0, 1.5]; on valid tokens only,
    # sample 2 is masked so all its tokens are 0
    expected = [
        torch.tensor([[0.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]]),
        torch.tensor([[0.0, 0.0, 0.0], [0.0, -1.5, 0.0], [0.0, 0.0, 0.0], [0.0, 1.5, 1.5]]),
    ]
    for estimator, want in zip(estimators, expected, strict=True):
        assert isinstance(estimator, AdvantageEstimator)
        result = estimator.compute(inputs)
        torch.testing.assert_close(result.advantages_BT, want)
        assert result.returns_BT is None


# ------------------------------------------------------------------ GAE
def _gae_by_hand(rewards, values, gamma, lam):
    """4-step toy, unrolled: A_t = delta_t + gamma lam A_{t+1}, V_4 = A_4 = 0."""
    r0, r1, r2, r3 = rewards
    v0, v1, v2, v3 = values
    a3 = r3 + gamma * 0.0 - v3
    a2 = (r2 + gamma * v3 - v2) + gamma * lam * a3
    a1 = (r1 + gamma * v2 - v1) + gamma * lam * a2
    a0 = (r0 + gamma * v1 - v0) + gamma * lam * a1
    return [a0, a1, a2, a3]


def test_gae_four_step_toy():
    rewards, values = [0.0, 0.0, 0.0, 1.0], [0.5, 0.6, 0.7, 0.8]
    # a3 = 1 - 0.8 = 0.2; a2 = (0.72 - 0.7) + 0.72 * 0.2 = 0.164;
    # a1 = (0.63 - 0.6) + 0.72 * 0.164 = 0.14808; a0 = (0.54 - 0.5) + 0.72 * 0.14808 = 0.1466176
    want = [0.1466176, 0.14808, 0.164, 0.2]
    assert _gae_by_hand(rewards, values, 0.9, 0.8) == pytest.approx(want)
    adv, ret = gae(torch.tensor([rewards]), torch.tensor([values]), torch.ones(1, 4), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([want]))
    torch.testing.assert_close(ret, torch.tensor([[a + v for a, v in zip(want, values, strict=True)]]))


def test_gae_ignores_prompt_and_padding_positions_even_when_nan():
    # same 4 response tokens, with one prompt position on the left and two pads on the right
    rewards = torch.tensor([[NAN, 0.0, 0.0, 0.0, 1.0, NAN, 9.0]])
    values = torch.tensor([[3.0, 0.5, 0.6, 0.7, 0.8, NAN, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    want = _gae_by_hand([0.0, 0.0, 0.0, 1.0], [0.5, 0.6, 0.7, 0.8], 0.9, 0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.0, *want, 0.0, 0.0]]))
    assert torch.isfinite(ret).all() and ret[0, 0] == 0 and ret[0, 5:].eq(0).all()


def test_gae_gamma_lam_one_is_return_minus_value():
    # gamma = lam = 1: A_t = (sum of future rewards) - V_t = 1 - V_t
    adv, ret = gae(
        torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.2, 0.4, 0.9]]), torch.ones(1, 3), 1.0, 1.0
    )
    torch.testing.assert_close(adv, torch.tensor([[0.8, 0.6, 0.1]]))
    torch.testing.assert_close(ret, torch.ones(1, 3))


def test_gae_estimator_places_reward_on_last_token_and_adds_token_rewards():
    loss_mask = torch.tensor([[0, 1, 1, 1, 1, 0]])
    values = torch.tensor([[0.0, 0.5, 0.6, 0.7, 0.8, 0.0]])
    kl_penalty_tokens = torch.tensor([[0.0, -0.1, 0.0, 0.0, 0.0, 0.0]])
    est = GAEAdvantage(gamma=0.9, lam=0.8, whiten=False)
    result = est.compute(
        _inputs(torch.tensor([[1.0]]), torch.tensor([[True]]), loss_mask, values, kl_penalty_tokens)
    )
    want = _gae_by_hand([-0.1, 0.0, 0.0, 1.0], [0.5, 0.6, 0.7, 0.8], 0.9, 0.8)
    torch.testing.assert_close(result.advantages_BT, torch.tensor([[0.0, *want, 0.0]]))
    assert result.returns_BT is not None

    whitened = GAEAdvantage(gamma=0.9, lam=0.8, whiten=True).compute(
        _inputs(torch.tensor([[1.0]]), torch.tensor([[True]]), loss_mask, values, kl_penalty_tokens)
    )
    valid = loss_mask.bool()
    adv = whitened.advantages_BT[valid]
    # whitened over valid tokens: mean 0, unbiased std 1; returns are not whitened
    assert adv.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert adv.std().item() == pytest.approx(1.0, rel=1e-4)
    torch.testing.assert_close(whitened.returns_BT, result.returns_BT)


def test_gae_estimator_needs_values():
    with pytest.raises(ValueError, match="values_BT"):
        GAEAdvantage().compute(_inputs(torch.tensor([[1.0]]), torch.tensor([[True]]), torch.ones(1, 2)))


def test_place_at_last_token():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    out = place_at_last_token(torch.tensor([2.0, 3.0, 4.0]), mask)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 2.0, 0.0], [0.0] * 4, [0.0, 0.0, 0.0, 4.0]]))


# ------------------------------------------------------------------ dynamic sampling / overlong
def test_dynamic_sampling_keeps_groups_with_reward_spread():
    rewards = torch.tensor(
        [
            [1.0, 1.0, 1.0],  # all right -> drop
            [0.0, 1.0, 0.0],  # spread -> keep
            [0.0, 0.0, 0.0],  # all wrong -> drop
            [1.0, 0.0, 1.0],  # spread only through the masked sample -> drop
            [1.0, NAN, 0.5],  # NaN masked, spread among valid -> keep
        ]
    )
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 0, 1], [1, 1, 1]])
    keep = dynamic_sampling_keep(rewards, mask)
    assert keep.tolist() == [False, True, False, False, True]


def test_overlong_filter_mask():
    assert overlong_filter_mask(["stop", "length", "abort"]).tolist() == [True, False, True]


# ------------------------------------------------------------------ token-level rewards
# One group of 3 samples, 2 response tokens each after one prompt position.
TOK_MASK = torch.tensor([[0, 1, 1], [0, 1, 1], [0, 1, 1]])
TOK_REWARDS = torch.tensor([[9.0, -0.25, -0.25], [9.0, 0.0, 0.0], [9.0, 0.25, 0.25]])  # 9 = prompt: ignored


def test_group_estimators_sum_token_rewards_into_the_score():
    inputs = _inputs(torch.tensor([[1.0, 0.0, 0.0]]), torch.ones(1, 3, dtype=torch.bool), TOK_MASK,
                     token_rewards_BT=TOK_REWARDS)
    # scores = reward + token sum = [0.5, 0.0, 0.5]
    torch.testing.assert_close(sequence_scores(inputs), torch.tensor([[0.5, 0.0, 0.5]]))
    # GRPO: mean 1/3, deviations [1/6, -1/3, 1/6], unbiased var (1/36 + 4/36 + 1/36) / 2 = 1/12
    s = math.sqrt(1 / 12)
    grpo = GRPOAdvantage().compute(inputs).advantages_BT
    want = [(1 / 6) / (s + EPS), (-1 / 3) / (s + EPS), (1 / 6) / (s + EPS)]  # 0.57735, -1.1547, 0.57735
    torch.testing.assert_close(grpo, torch.tensor([[0.0, w, w] for w in want]))
    # Dr.GRPO: deviations only
    drgrpo = GRPOAdvantage(scale_by_std=False).compute(inputs).advantages_BT
    torch.testing.assert_close(drgrpo[:, 1], torch.tensor([1 / 6, -1 / 3, 1 / 6]))
    # RLOO: s_i - mean of the others = [0.5 - 0.25, 0 - 0.5, 0.5 - 0.25]
    rloo = RLOOAdvantage().compute(inputs).advantages_BT
    torch.testing.assert_close(rloo[:, 2], torch.tensor([0.25, -0.5, 0.25]))


def test_group_scores_leave_masked_samples_masked():
    inputs = _inputs(torch.tensor([[1.0, NAN, 0.0]]), torch.tensor([[True, False, True]]), TOK_MASK,
                     token_rewards_BT=TOK_REWARDS)
    scores = sequence_scores(inputs)
    assert torch.isnan(scores[0, 1]) and scores[0, 0].item() == pytest.approx(0.5)
    # valid scores 0.5 and 0.5: no spread -> zeros; the masked sample is 0
    assert GRPOAdvantage().compute(inputs).advantages_BT.abs().max().item() == pytest.approx(0.0, abs=1e-5)


def test_discounted_returns_by_hand():
    r = torch.tensor([[7.0, -0.1, -0.2, 1.0, 5.0]])
    m = torch.tensor([[0, 1, 1, 1, 0]])
    # gamma 1: [0.7, 0.8, 1.0]; gamma 0.5: G3 = 1, G2 = -0.2 + 0.5 = 0.3, G1 = -0.1 + 0.15 = 0.05
    torch.testing.assert_close(discounted_returns(r, m, 1.0), torch.tensor([[0.0, 0.7, 0.8, 1.0, 0.0]]))
    torch.testing.assert_close(discounted_returns(r, m, 0.5), torch.tensor([[0.0, 0.05, 0.3, 1.0, 0.0]]))


def test_reinforce_pp_uses_token_rewards_per_token():
    mask = torch.tensor([[0, 1, 1, 1]])
    tok = torch.tensor([[0.0, -0.1, -0.2, 0.0]])  # e.g. a KL penalty
    inputs = _inputs(torch.tensor([[1.0]]), torch.tensor([[True]]), mask, token_rewards_BT=tok)
    adv = ReinforcePlusPlusAdvantage(gamma=0.5, whiten=False).compute(inputs)
    # per-token rewards [-0.1, -0.2, 1.0] -> reward-to-go at gamma 0.5: [0.05, 0.3, 1.0]
    torch.testing.assert_close(adv.advantages_BT, torch.tensor([[0.0, 0.05, 0.3, 1.0]]))
    assert adv.returns_BT is None


def test_reinforce_pp_whitens_over_the_batch():
    mask = torch.tensor([[1, 1], [1, 1]])
    inputs = _inputs(torch.tensor([[1.0, 0.0]]), torch.ones(1, 2, dtype=torch.bool), mask)
    adv = ReinforcePlusPlusAdvantage().compute(inputs).advantages_BT
    # returns [1, 1, 0, 0]: mean 0.5, unbiased var 4 * 0.25 / 3 = 1/3 -> +-0.5 / sqrt(1/3) = +-0.8660
    torch.testing.assert_close(adv, torch.tensor([[0.8660254, 0.8660254], [-0.8660254, -0.8660254]]))


def test_reinforce_pp_baseline_subtracts_the_group_mean_then_adds_token_rewards():
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 1]])
    tok = torch.tensor([[-0.1, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    rewards = torch.tensor([[1.0, 0.0], [3.0, 1.0]])  # two groups: means 0.5 and 2
    inputs = _inputs(rewards, torch.ones(2, 2, dtype=torch.bool), mask, token_rewards_BT=tok)
    adv = ReinforcePlusPlusBaselineAdvantage(whiten=False).compute(inputs).advantages_BT
    # outcomes [0.5, -0.5, 1, -1] on the last token; row 0 first token adds -0.1: [0.4, 0.5]
    torch.testing.assert_close(adv, torch.tensor([[0.4, 0.5], [-0.5, -0.5], [1.0, 1.0], [-1.0, -1.0]]))


def test_place_token_rewards_on_valid_positions():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    out = place_token_rewards([[0.5, -1.0], [3.0], None], mask)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.5, -1.0, 0.0], [0.0] * 4, [0.0] * 4]))
    with pytest.raises(ValueError, match="one value per completion token"):
        place_token_rewards([[0.5], None, None], mask)


@pytest.mark.parametrize("est", [ReinforcePlusPlusAdvantage(), ReinforcePlusPlusBaselineAdvantage()])
def test_reinforce_pp_estimators_are_advantage_estimators(est):
    assert isinstance(est, AdvantageEstimator)
    with pytest.raises(Exception, match="gamma"):
        type(est)(gamma=1.5).compute(_inputs(torch.tensor([[1.0]]), torch.tensor([[True]]), torch.ones(1, 2)))
