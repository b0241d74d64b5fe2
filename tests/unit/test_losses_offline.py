"""Per-token logprobs, masked reductions, SFT, DPO (sigmoid / IPO / cDPO) and Bradley-Terry losses.

Expected values are computed by hand (arithmetic in the comments) with ``math``, not by the code.
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms.logprobs import entropy_from_logits, masked_mean, masked_whiten, token_logprobs
from posttrain.algorithms.offline_losses import DPOLossConfig, bradley_terry_loss, dpo_loss, sft_loss
from posttrain.config.errors import ConfigError

NAN = float("nan")


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


# ------------------------------------------------------------------ logprobs / entropy / masks
def test_token_logprobs_hand_values_and_ignore_index():
    # logits [0, 0, ln 2] -> probs [1/4, 1/4, 1/2]
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)]] * 3])
    labels = torch.tensor([[2, 0, -100]])
    lp = token_logprobs(logits, labels, chunk_tokens=2)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, torch.tensor([[math.log(0.5), math.log(0.25), 0.0]]))


def test_token_logprobs_matches_log_softmax_gather_in_value_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    weights = torch.randn(3, 5, dtype=torch.float64)
    ours = token_logprobs(logits, labels, chunk_tokens=4)  # 15 rows in chunks of 4
    (ours.double() * weights).sum().backward()
    grad_ours = logits.grad.clone()
    logits.grad = None
    reference = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (reference * weights).sum().backward()
    # ours computes in fp32 from fp64 logits: float32 tolerance
    torch.testing.assert_close(ours.double(), reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_ours, logits.grad, rtol=1e-5, atol=1e-6)


def test_token_logprobs_on_shifted_slice_grads_the_full_logits():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 6, requires_grad=True)
    ids = torch.randint(0, 6, (2, 4))
    ours = token_logprobs(logits[:, :-1], ids[:, 1:], chunk_tokens=2)
    ours.sum().backward()
    grad_ours = logits.grad.clone()
    logits.grad = None
    torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).sum().backward()
    torch.testing.assert_close(grad_ours, logits.grad)
    assert grad_ours[:, -1].eq(0).all()  # the last position predicts nothing


def test_token_logprobs_bf16_logits_give_fp32_logprobs_and_bf16_grad():
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)]]], dtype=torch.bfloat16, requires_grad=True)
    lp = token_logprobs(logits, torch.tensor([[2]]))
    assert lp.dtype == torch.float32
    lp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    # d log p_2 / d logits = onehot(2) - softmax; bf16 holds ln 2 as 0.69140625 so compare loosely
    torch.testing.assert_close(logits.grad.float(), torch.tensor([[[-0.25, -0.25, 0.5]]]), atol=2e-3, rtol=0)


def test_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, math.log(2.0), -math.inf]]])
    # uniform over 4 -> ln 4; probs [1/4, 1/4, 1/2, 0] -> 2 * (1/4) ln 4 + (1/2) ln 2 = 1.5 ln 2
    expected = torch.tensor([[math.log(4.0), 1.5 * math.log(2.0)]])
    torch.testing.assert_close(entropy_from_logits(logits, chunk_tokens=1), expected)


def test_masked_mean_ignores_nan_and_accepts_global_denominator():
    x = torch.tensor([1.0, 2.0, NAN, 5.0])
    mask = torch.tensor([1, 1, 0, 1])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor((1 + 2 + 5) / 3))
    torch.testing.assert_close(masked_mean(x, mask, denom=16.0), torch.tensor(8 / 16))
    torch.testing.assert_close(masked_mean(x, torch.zeros(4)), torch.tensor(0.0))  # empty -> 0, not NaN


def test_masked_whiten_unbiased():
    x = torch.tensor([1.0, 2.0, 3.0, NAN])
    mask = torch.tensor([True, True, True, False])
    # mean 2, unbiased var ((1)^2 + 0 + 1^2) / (3 - 1) = 1 -> [-1, 0, 1], masked -> 0
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor([-1.0, 0.0, 1.0, 0.0]))
    # shift_mean=False adds the mean back: [1, 2, 3]
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), torch.tensor([1.0, 2.0, 3.0, 0.0]))


# ------------------------------------------------------------------ SFT
def test_sft_loss_masks_prompt_and_padding_even_when_nan():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, NAN, -6.0]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    loss, metrics = sft_loss(logprobs, mask, num_tokens=3.0)
    # -(-2 - 3 - 4) / 3 = 3
    torch.testing.assert_close(loss, torch.tensor(3.0))
    torch.testing.assert_close(metrics["nll"], torch.tensor(3.0))
    loss.backward()
    # d/dlp = -1/3 on the 3 valid tokens, exactly 0 elsewhere (also at the NaN)
    expected = torch.tensor([[0.0, -1 / 3, -1 / 3], [-1 / 3, 0.0, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected)


def test_sft_loss_grad_accumulation_equals_full_batch():
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -4.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # global count 5; full loss (1 + 2 + 3 + 1 + 4) / 5 = 2.2
    full, _ = sft_loss(lp, mask, num_tokens=5.0)
    first, _ = sft_loss(lp[:1], mask[:1], num_tokens=5.0)  # (1 + 2) / 5 = 0.6
    second, _ = sft_loss(lp[1:], mask[1:], num_tokens=5.0)  # (3 + 1 + 4) / 5 = 1.6
    torch.testing.assert_close(full, torch.tensor(2.2))
    torch.testing.assert_close(first + second, full)


# ------------------------------------------------------------------ DPO
# pair 0: chosen log-ratio -10 - (-11) = 1, rejected -12 - (-11) = -1 -> h = 2
# pair 1: chosen log-ratio -5 - (-5) = 0,  rejected -5 - (-6) = 1    -> h = -1
POL_C, POL_R = [-10.0, -5.0], [-12.0, -5.0]
REF_C, REF_R = [-11.0, -5.0], [-11.0, -6.0]


def _dpo(cfg: DPOLossConfig, num_pairs: float = 2.0):
    pol_c = torch.tensor(POL_C, requires_grad=True)
    loss, metrics = dpo_loss(
        pol_c, torch.tensor(POL_R), torch.tensor(REF_C), torch.tensor(REF_R), cfg, num_pairs=num_pairs
    )
    return loss, metrics, pol_c


def test_dpo_sigmoid_value_grad_and_metrics():
    loss, metrics, pol_c = _dpo(DPOLossConfig(beta=0.1))
    # -log sigmoid(0.1 * 2) = log(1 + e^-0.2); -log sigmoid(0.1 * -1) = log(1 + e^0.1)
    expected = (softplus(-0.2) + softplus(0.1)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/dpol_chosen of -log sigmoid(beta h) = -beta * sigmoid(-beta h), / num_pairs
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected_grad = [-0.1 * sig(-0.2) / 2, -0.1 * sig(0.1) / 2]
    torch.testing.assert_close(pol_c.grad, torch.tensor(expected_grad))
    # implicit rewards: chosen [0.1, 0.0], rejected [-0.1, 0.1]
    assert metrics["rewards/chosen"].item() == pytest.approx(0.05)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.0, abs=1e-7)
    assert metrics["rewards/margin"].item() == pytest.approx((0.2 + -0.1) / 2)
    assert metrics["rewards/accuracy"].item() == pytest.approx(0.5)  # pair 0 right, pair 1 wrong


def test_dpo_global_num_pairs_divides_local_sum():
    loss, _, _ = _dpo(DPOLossConfig(beta=0.1), num_pairs=8.0)
    assert loss.item() == pytest.approx((softplus(-0.2) + softplus(0.1)) / 8, rel=1e-6)


def test_dpo_ipo():
    loss, _, _ = _dpo(DPOLossConfig(beta=0.1, variant="ipo"))
    # target 1/(2 * 0.1) = 5: ((2 - 5)^2 + (-1 - 5)^2) / 2 = (9 + 36) / 2
    assert loss.item() == pytest.approx(22.5, rel=1e-6)


def test_dpo_cdpo_label_smoothing():
    loss, _, _ = _dpo(DPOLossConfig(beta=0.1, variant="cdpo", label_smoothing=0.1))
    # 0.9 * -log s(beta h) + 0.1 * -log s(-beta h), with beta h = 0.2 and -0.1
    pair0 = 0.9 * softplus(-0.2) + 0.1 * softplus(0.2)
    pair1 = 0.9 * softplus(0.1) + 0.1 * softplus(-0.1)
    assert loss.item() == pytest.approx((pair0 + pair1) / 2, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"variant": "sigmoid", "label_smoothing": 0.1},  # would silently be cDPO
        {"variant": "cdpo", "label_smoothing": 0.0},
        {"variant": "cdpo", "label_smoothing": 0.5},
        {"variant": "ipo", "label_smoothing": 0.2},
        {"variant": "hinge"},
        {"beta": 0.0},
    ],
)
def test_dpo_config_rejects_inconsistent_values(kwargs):
    cfg = DPOLossConfig(**kwargs)
    key, _problem, _fix = cfg.validate()  # the recipe loader turns this into a ConfigError
    assert key in kwargs
    with pytest.raises(ConfigError, match=key):  # built in Python: the loss refuses it too
        _dpo(cfg)


def test_dpo_config_defaults_are_valid():
    assert DPOLossConfig().validate() is None
    assert DPOLossConfig(variant="cdpo", label_smoothing=0.1).validate() is None


# ------------------------------------------------------------------ Bradley-Terry
def test_bradley_terry_loss_accuracy_and_margin():
    chosen = torch.tensor([2.0, 0.0], requires_grad=True)
    rejected = torch.tensor([1.0, 1.0])
    loss, metrics = bradley_terry_loss(chosen, rejected, num_pairs=4.0)
    # diffs [1, -1]: (log(1 + e^-1) + log(1 + e^1)) / 4
    assert loss.item() == pytest.approx((softplus(-1.0) + softplus(1.0)) / 4, rel=1e-6)
    assert metrics["accuracy"].item() == pytest.approx(0.5)
    loss.backward()
    # d/ds_chosen = -sigmoid(-diff) / 4 = -(1 / (1 + e^diff)) / 4
    expected = [-1 / (1 + math.e) / 4, -1 / (1 + math.exp(-1)) / 4]
    torch.testing.assert_close(chosen.grad, torch.tensor(expected))

    margin = torch.tensor([0.5, 0.0])
    loss_m, metrics_m = bradley_terry_loss(chosen.detach(), rejected, num_pairs=2.0, margin_B=margin)
    # diffs minus margin [0.5, -1]
    assert loss_m.item() == pytest.approx((softplus(-0.5) + softplus(1.0)) / 2, rel=1e-6)
    assert metrics_m["accuracy"].item() == pytest.approx(0.5)  # accuracy ignores the margin
