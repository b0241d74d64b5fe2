"""The general clipped policy loss, its presets, KL estimators and the clipped value loss.

Expected values are hand-computed (arithmetic in comments), never copied from a run.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from posttrain.algorithms.policy_loss import (
    DAPOLossConfig,
    DrGRPOLossConfig,
    GRPOLossConfig,
    GSPOLossConfig,
    PolicyLossConfig,
    kl_penalty,
    policy_loss,
    value_loss,
)
from posttrain.config.errors import ConfigError

NAN = float("nan")
LN = math.log


def run(cfg, log_ratio, adv, mask=None, old=None, behaviour=None, num_tokens=None, num_seqs=None, **kw):
    """policy_loss with logprobs = old + log_ratio; returns (loss, metrics, grad wrt logprobs)."""
    log_ratio = torch.as_tensor(log_ratio, dtype=torch.float32)
    old = torch.zeros_like(log_ratio) if old is None else torch.as_tensor(old, dtype=torch.float32)
    lp = (old + log_ratio).clone().requires_grad_(True)
    behaviour = old if behaviour is None else torch.as_tensor(behaviour, dtype=torch.float32)
    mask = torch.ones_like(log_ratio) if mask is None else torch.as_tensor(mask)
    n_tok = float(mask.sum()) if num_tokens is None else num_tokens
    n_seq = float(mask.shape[0]) if num_seqs is None else num_seqs
    adv_t = torch.as_tensor(adv, dtype=torch.float32)
    loss, metrics = policy_loss(lp, old, behaviour, adv_t, mask, cfg, n_tok, n_seq, **kw)
    loss.backward()
    return loss, metrics, lp.grad


# ------------------------------------------------------------------ clipping
def test_clipping_at_both_epsilons_removes_gradient():
    # ratios [1.5, 0.5, 1.5, 0.5], advantages [+1, -1, -1, +1], clip 0.2/0.2
    log_ratio = [[LN(1.5), LN(0.5), LN(1.5), LN(0.5)]]
    adv = [[1.0, -1.0, -1.0, 1.0]]
    loss, metrics, grad = run(PolicyLossConfig(), log_ratio, adv)
    # per token max(-A r, -A clip(r)):
    #   t0: max(-1.5, -1.2) = -1.2 (clipped high, A > 0 -> no gradient)
    #   t1: max( 0.5,  0.8) =  0.8 (clipped low,  A < 0 -> no gradient)
    #   t2: max( 1.5,  1.2) =  1.5 (unclipped: d/dlp (-A r) = -A r = 1.5)
    #   t3: max(-0.5, -0.8) = -0.5 (unclipped: d/dlp = -A r = -0.5)
    assert loss.item() == pytest.approx((-1.2 + 0.8 + 1.5 - 0.5) / 4)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, 1.5 / 4, -0.5 / 4]]))
    assert metrics["clip_frac_high"].item() == pytest.approx(0.25)
    assert metrics["clip_frac_low"].item() == pytest.approx(0.25)
    assert metrics["ratio_max"].item() == pytest.approx(1.5)
    assert metrics["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.5 + 0.5) / 4)


def test_clip_higher_lets_a_positive_token_through():
    # DAPO clip_high 0.28 < 0.5: ratio 1.5 still clipped; clip_high 0.6: 1.5 < 1.6, gradient -A r = -1.5
    _, _, grad_dapo = run(DAPOLossConfig(), [[LN(1.5)]], [[1.0]])
    assert grad_dapo.item() == 0.0
    loss, _, grad = run(PolicyLossConfig(clip_low=0.2, clip_high=0.6), [[LN(1.5)]], [[1.0]])
    assert loss.item() == pytest.approx(-1.5)
    assert grad.item() == pytest.approx(-1.5)
    # clip_low is unchanged by clip-higher: ratio 0.7 < 0.8 with A < 0 is clipped -> no gradient
    _, _, grad_low = run(DAPOLossConfig(), [[LN(0.7)]], [[-1.0]])
    assert grad_low.item() == 0.0


def test_dual_clip_bounds_negative_advantage_tokens():
    # ratio 5, A = -1: max(5, 1.2) = 5, dual clip c = 3 -> min(5, 3) = 3, constant -> no gradient
    loss, metrics, grad = run(PolicyLossConfig(dual_clip=3.0), [[LN(5.0), 0.0]], [[-1.0, -1.0]])
    # second token ratio 1: max(1, 1) = 1 -> loss (3 + 1) / 2, gradient -A r / 2 = 0.5
    assert loss.item() == pytest.approx(2.0)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.5]]))
    assert metrics["dual_clip_frac"].item() == pytest.approx(0.5)


def test_dual_clip_leaves_positive_advantages_alone():
    # A = +1: pg = max(-r, -clip(r)); the dual bound -A c = -3 must not apply (it is for A < 0 only).
    # r = 1 -> -1 (a mutant applying the bound gives -3); r = 5 -> max(-5, -1.2) = -1.2, no gradient
    loss, metrics, grad = run(PolicyLossConfig(dual_clip=3.0), [[0.0, LN(5.0)]], [[1.0, 1.0]])
    assert loss.item() == pytest.approx((-1.0 - 1.2) / 2)
    torch.testing.assert_close(grad, torch.tensor([[-0.5, 0.0]]))  # d(-r)/dlogp / 2 at r = 1
    assert metrics["dual_clip_frac"].item() == 0.0


def test_truncated_is_caps_only_from_above():
    # old - behaviour = ln 0.25 -> w = 0.25 < 1/cap: TIS keeps 0.25 (min(w, 2)); never raised to 1/cap
    loss, metrics, grad = run(PolicyLossConfig(tis_cap=2.0), [[0.0]], [[1.0]], old=[[0.0]], behaviour=[[LN(4.0)]])
    assert loss.item() == pytest.approx(-0.25)
    torch.testing.assert_close(grad, torch.tensor([[-0.25]]))
    assert metrics["is_weight_mean"].item() == pytest.approx(0.25)


def test_token_mean_weights_tokens_not_sequences():
    # per-token losses -A r at r = 1: row 0 one token with A = 1, row 1 three tokens with A = -1
    # token_mean: (-1 + 3 * 1) / 4 = 0.5; seq_mean_token_mean: (-1 + 1) / 2 = 0
    adv, mask = [[1.0, 0.0, 0.0], [-1.0, -1.0, -1.0]], [[1, 0, 0], [1, 1, 1]]
    loss, _, grad = run(PolicyLossConfig(aggregation="token_mean"), [[0.0] * 3] * 2, adv, mask=mask)
    assert loss.item() == pytest.approx(0.5)
    torch.testing.assert_close(grad, torch.tensor([[-0.25, 0.0, 0.0], [0.25, 0.25, 0.25]]))
    loss, _, grad = run(PolicyLossConfig(aggregation="seq_mean_token_mean"), [[0.0] * 3] * 2, adv, mask=mask)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(grad, torch.tensor([[-0.5, 0.0, 0.0], [1 / 6, 1 / 6, 1 / 6]]))


# ------------------------------------------------------------------ behaviour importance weights
# old - behaviour = [ln 3, ln 0.5] -> raw weights [3, 0.5]; ratio 1 and A = +1 -> pg = -1 per token
OLD = [[0.0, 0.0]]
BEHAVIOUR = [[-LN(3.0), LN(2.0)]]


@pytest.mark.parametrize(
    ("cfg", "weights", "over_cap"),
    [
        (PolicyLossConfig(), [1.0, 1.0], 0.0),  # no correction
        (PolicyLossConfig(tis_cap=2.0), [2.0, 0.5], 0.5),  # truncated: min(3, 2)
        (PolicyLossConfig(decoupled=True), [3.0, 0.5], 0.0),  # decoupled, uncapped
        (PolicyLossConfig(decoupled=True, tis_cap=2.0), [0.0, 0.5], 0.5),  # AReaL cap drops the token
    ],
)
def test_behaviour_importance_weights(cfg, weights, over_cap):
    loss, metrics, grad = run(cfg, [[0.0, 0.0]], [[1.0, 1.0]], old=OLD, behaviour=BEHAVIOUR)
    # loss = sum(w * -1) / 2; gradient of -w r at r = 1 is -w / 2 (the weight itself is constant)
    assert loss.item() == pytest.approx(-sum(weights) / 2, rel=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-w / 2 for w in weights]]))
    assert metrics["is_weight_max"].item() == pytest.approx(max(weights), rel=1e-6)
    assert metrics["is_frac_over_cap"].item() == pytest.approx(over_cap)
    # mismatch KL(behaviour || old), k3 with x = behaviour - old: e^-x - 1 + x
    k3 = [math.exp(LN(3.0)) - 1 - LN(3.0), math.exp(-LN(2.0)) - 1 + LN(2.0)]
    assert metrics["behaviour_kl"].item() == pytest.approx(sum(k3) / 2, rel=1e-5)


# ------------------------------------------------------------------ GSPO sequence ratio
def test_gspo_sequence_ratio_value_and_gradient():
    # log-ratios [0.2, 0.0, -0.1] (+ a padded NaN): sequence ratio s = exp(0.1 / 3) on every token
    log_ratio = [[0.2, 0.0, -0.1, NAN]]
    mask = [[1, 1, 1, 0]]
    s = math.exp(0.1 / 3)
    wide = GSPOLossConfig(clip_low=0.2, clip_high=0.2)  # s = 1.034 is inside [0.8, 1.2]
    loss, metrics, grad = run(wide, log_ratio, [[1.0] * 4], mask=mask)
    # per-sequence token mean of -A s = -s; d(-s)/dlp_t = -s / 3 (s = exp(mean of lp - old))
    assert loss.item() == pytest.approx(-s, rel=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-s / 3, -s / 3, -s / 3, 0.0]]))
    assert metrics["ratio_mean"].item() == pytest.approx(s, rel=1e-6)
    # GSPO's own clip 3e-4 / 4e-4: s > 1.0004 with A > 0 -> the whole sequence is clipped
    loss_c, metrics_c, grad_c = run(GSPOLossConfig(), log_ratio, [[1.0] * 4], mask=mask)
    assert loss_c.item() == pytest.approx(-(1 + 4e-4), rel=1e-6)
    assert grad_c.abs().sum().item() == 0.0
    assert metrics_c["clip_frac_high"].item() == pytest.approx(1.0)


# ------------------------------------------------------------------ aggregation
def test_aggregation_modes():
    # ratio 1 so pg = -A: sequence 0 has one token (A = 2), sequence 1 three tokens (A = 1)
    adv = [[2.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    mask = [[1, 0, 0], [1, 1, 1]]
    zeros = [[0.0] * 3] * 2
    cases = {
        PolicyLossConfig(): -(2 + 3) / 4,  # token_mean: all tokens / 4 tokens
        GRPOLossConfig(): -(2 / 1 + 3 / 3) / 2,  # mean within each sequence, then / 2 sequences
        DrGRPOLossConfig(norm_length=4): -(2 + 3) / (4 * 2),  # token sums / (norm_length * sequences)
    }
    for cfg, expected in cases.items():
        loss, _, _ = run(cfg, zeros, adv, mask=mask)
        assert loss.item() == pytest.approx(expected), cfg.aggregation


@pytest.mark.parametrize("cfg", [PolicyLossConfig(), GRPOLossConfig(), DrGRPOLossConfig(norm_length=5)])
def test_grad_accumulation_with_global_counts_equals_full_batch(cfg):
    torch.manual_seed(0)
    old = torch.randn(4, 5) * 0.1 - 1.0
    lp = (old + torch.randn(4, 5) * 0.3).requires_grad_(True)  # some ratios outside [0.8, 1.2]
    adv = torch.randn(4, 5)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0]])
    num_tokens, num_seqs = float(mask.sum()), 4.0  # 3 + 4 + 1 + 2 = 10 tokens, 4 sequences

    full, _ = policy_loss(lp, old, old, adv, mask, cfg, num_tokens, num_seqs)
    (full_grad,) = torch.autograd.grad(full, lp)
    halves = [
        policy_loss(lp[rows], old[rows], old[rows], adv[rows], mask[rows], cfg, num_tokens, num_seqs)[0]
        for rows in (slice(0, 2), slice(2, 4))
    ]
    accumulated = halves[0] + halves[1]
    (acc_grad,) = torch.autograd.grad(accumulated, lp)
    torch.testing.assert_close(accumulated, full)
    torch.testing.assert_close(acc_grad, full_grad)
    assert full_grad.abs().sum() > 0


# ------------------------------------------------------------------ masking
@pytest.mark.parametrize(
    "cfg",
    [
        PolicyLossConfig(kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0),
        GSPOLossConfig(kl_coef=0.1, kl_estimator="k2"),
        DrGRPOLossConfig(norm_length=4, decoupled=True, tis_cap=2.0, kl_estimator="k1"),
        DAPOLossConfig(tis_cap=2.0, entropy_coef=0.01),
    ],
)
def test_nan_in_masked_positions_does_not_leak(cfg):
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]])

    def with_nan(valid_value: float, requires_grad: bool = False) -> torch.Tensor:
        t = torch.where(mask.bool(), valid_value, NAN)
        return t.requires_grad_(requires_grad)

    lp = with_nan(-1.0, requires_grad=True)
    entropy = with_nan(2.0, requires_grad=True)
    loss, metrics = policy_loss(
        lp, with_nan(-1.1), with_nan(-1.2), with_nan(0.5), mask, cfg, 3.0, 2.0,
        ref_logprobs_BT=with_nan(-0.9), entropy_BT=entropy,
    )  # fmt: skip
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v).all() for v in metrics.values())
    grads = [lp.grad] + ([entropy.grad] if cfg.entropy_coef > 0 else [])
    for grad in grads:
        assert torch.isfinite(grad).all()
        assert grad[~mask.bool()].eq(0).all()
    assert lp.grad[mask.bool()].abs().sum() > 0


def test_fully_masked_micro_batch_contributes_zero():
    # with grad accumulation a micro-batch may hold only masked samples: loss 0, zero gradient
    for cfg in (PolicyLossConfig(), GRPOLossConfig(), GSPOLossConfig()):
        loss, metrics, grad = run(
            cfg, [[NAN, NAN]], [[NAN, NAN]], mask=[[0, 0]], num_tokens=7.0, num_seqs=3.0
        )
        assert loss.item() == 0.0
        assert grad.eq(0).all()
        assert all(torch.isfinite(v).all() for v in metrics.values())


# ------------------------------------------------------------------ KL and entropy terms
def test_kl_estimators_by_hand():
    lp, ref = torch.tensor([LN(2.0)]), torch.tensor([0.0])
    # x = log(pi/ref) = ln 2: k1 = ln 2, k2 = (ln 2)^2 / 2, k3 = e^-x - 1 + x = 0.5 - 1 + ln 2
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(LN(2.0))
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(LN(2.0) ** 2 / 2)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(LN(2.0) - 0.5)


def test_kl_and_entropy_terms_in_the_loss():
    # A = 0 so only the extra terms remain; logprobs ln 2 above the reference on both tokens
    entropy = torch.tensor([[1.0, 3.0]])
    cfg = PolicyLossConfig(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)
    loss, metrics, grad = run(
        cfg,
        [[0.0, 0.0]],
        [[0.0, 0.0]],
        old=[[LN(2.0)] * 2],
        ref_logprobs_BT=torch.zeros(1, 2),
        entropy_BT=entropy,
    )
    k3 = LN(2.0) - 0.5
    # (0.1 * k3 * 2 - 0.01 * (1 + 3)) / 2 ~ -6.9e-4 (fp32 cancellation: absolute tolerance)
    assert loss.item() == pytest.approx((0.1 * k3 * 2 - 0.01 * 4) / 2, abs=1e-8)
    # d k3 / d lp = 1 - e^-x = 1 - 1/2 -> 0.1 * 0.5 / 2 per token
    torch.testing.assert_close(grad, torch.tensor([[0.025, 0.025]]))
    assert metrics["kl_ref"].item() == pytest.approx(k3, rel=1e-6)
    assert metrics["entropy"].item() == pytest.approx(2.0)


def test_missing_reference_or_entropy_is_a_clear_error():
    with pytest.raises(ValueError, match="ref_logprobs_BT"):
        run(PolicyLossConfig(kl_coef=0.1), [[0.0]], [[1.0]])
    with pytest.raises(ValueError, match="entropy_BT"):
        run(PolicyLossConfig(entropy_coef=0.1), [[0.0]], [[1.0]])


# ------------------------------------------------------------------ config and presets
@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"aggregation": "seq_mean_token_sum_norm"}, "norm_length"),
        ({"norm_length": 100}, "norm_length"),
        ({"dual_clip": 1.0}, "dual_clip"),
        ({"tis_cap": 0.0}, "tis_cap"),
        ({"clip_low": 1.0}, "clip_low"),
        ({"kl_estimator": "k4"}, "kl_estimator"),
        ({"aggregation": "sum"}, "aggregation"),
    ],
)
def test_config_validation_names_the_key(kwargs, key):
    cfg = PolicyLossConfig(**kwargs)
    assert cfg.validate()[0] == key
    with pytest.raises(ConfigError, match=key):
        run(cfg, [[0.0]], [[1.0]])


def test_presets_are_parameterisations_of_one_config():
    presets = [GRPOLossConfig(), DrGRPOLossConfig(norm_length=8), DAPOLossConfig(), GSPOLossConfig()]
    for preset in presets:
        assert isinstance(preset, PolicyLossConfig) and preset.validate() is None
        assert {f.name for f in dataclasses.fields(preset)} == {
            f.name for f in dataclasses.fields(PolicyLossConfig)
        }
    assert DAPOLossConfig().clip_high > DAPOLossConfig().clip_low
    assert GSPOLossConfig().ratio_level == "sequence"
    assert DrGRPOLossConfig().validate()[0] == "norm_length"  # the constant must be chosen


# ------------------------------------------------------------------ value loss
def test_clipped_value_loss():
    values = torch.tensor([[1.0, 2.0, NAN]], requires_grad=True)
    old = torch.tensor([[0.0, 2.0, NAN]])
    returns = torch.tensor([[2.0, 0.0, NAN]])
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = value_loss(values, old, returns, mask, clip=0.5, num_tokens=2.0)
    # t0: (1 - 2)^2 = 1 vs clipped V = 0 + clamp(1, -.5, .5) = 0.5 -> (0.5 - 2)^2 = 2.25 -> 2.25
    # t1: (2 - 0)^2 = 4, V - V_old = 0 so clipped is also 4 -> 4
    assert loss.item() == pytest.approx(0.5 * (2.25 + 4.0) / 2)
    assert metrics["vf_clip_frac"].item() == pytest.approx(0.5)
    loss.backward()
    # t0 takes the clipped branch, which is flat in V; t1: 0.5 * 2 (V - R) / 2 = 1
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 1.0, 0.0]]))

    plain, _ = value_loss(values.detach(), old, returns, mask, clip=None, num_tokens=2.0)
    assert plain.item() == pytest.approx(0.5 * (1.0 + 4.0) / 2)  # plain squared error
