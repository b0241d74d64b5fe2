"""The trainer rank's wiring between its models and the losses, on a real ``TrainerWorker`` (tiny
Llama policy, a frozen reference moved away from it, a critic; one gloo rank, no Ray), checked
against hand computations:

* the policy has moved since sampling (pi_theta != pi_old != mu): the ratio is pi_theta / pi_old,
  the TIS weight min(pi_old / mu, cap), and the loss their clipped product plus the KL term;
* the reference's logprobs come from the reference model at the sampler's temperature only (a
  distribution, as verl), and the KL in the loss is k3 of pi_theta against them;
* the value clip centres on the values of the forward before the update, and binds.

The sampler runs at T = 0.7, top_p = 0.8, so temperature-only and top-p-filtered logprobs differ.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from posttrain.algorithms.advantages import GAEAdvantage
from posttrain.algorithms.logprobs import processed_token_logprobs
from posttrain.algorithms.policy_loss import PolicyLossConfig
from posttrain.engine.trainer import OptimConfig, TrainerConfig
from posttrain.models.factory import TinyModelSpec
from posttrain.models.loading import ModelConfig
from posttrain.rl.config import CriticConfig, OnlineRLConfig, SyncConfig
from posttrain.rl.trainer_worker import TrainerSpec, TrainerWorker
from posttrain.types import ForwardBatch, TrainBatch

SPEC = TinyModelSpec(arch="llama", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
T, TOP_P, CAP, KL_COEF, VALUE_CLIP = 0.7, 0.8, 1.5, 0.1, 0.2
B, L, PROMPT = 4, 9, 4  # rows, tokens per row, prompt tokens (response positions PROMPT..L-1)


def _worker(tmp_path, reference_logprobs: str = "temperature") -> TrainerWorker:
    cfg = TrainerConfig(max_steps=4, global_batch_size=B, micro_batch_size=B, optim=OptimConfig(lr=1e-3))
    loss = PolicyLossConfig(tis_cap=CAP, kl_coef=KL_COEF, kl_estimator="k3")
    algo = OnlineRLConfig(advantage=GAEAdvantage(), loss=loss, use_reference=True, critic=CriticConfig(value_clip=VALUE_CLIP),
                          reference_logprobs=reference_logprobs)  # fmt: skip
    spec = TrainerSpec(1, str(tmp_path / f"store-{reference_logprobs}"), ModelConfig(factory=SPEC), cfg, algo, SyncConfig(),
                       cpus=1, temperature=T, top_p=TOP_P)  # fmt: skip
    worker = TrainerWorker(0, spec)
    with torch.no_grad():  # the reference moves away from the policy (same start, same seed)
        for p in worker.reference.model.parameters():
            p.mul_(1.5)
    return worker


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    assert not dist.is_initialized()
    w = _worker(tmp_path_factory.mktemp("wiring"))
    yield w
    dist.destroy_process_group()


def _rows(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (B, L), generator=g)
    attn = torch.ones(B, L, dtype=torch.long)
    mask = torch.zeros(B, L)
    mask[:, PROMPT:] = 1.0
    mask[1, L - 2 :] = 0.0  # a shorter response
    return ids, attn, mask


def _temperature_logprobs(model_forward, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits / T) of each token under the logits read just before it (position 0: 0)."""
    logits = model_forward(lambda m: m(input_ids=ids).logits).float()
    lp = torch.log_softmax(logits[:, :-1] / T, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.nn.functional.pad(lp, (1, 0))


def _k3(x: torch.Tensor) -> torch.Tensor:  # x = log pi - log ref
    return torch.exp(-x) - 1 + x


def test_ratio_tis_weight_and_loss_when_the_policy_moved_since_sampling(worker):
    ids, attn, mask = _rows(0)
    fwd = worker.forward(ForwardBatch(ids, attn, want_old=True))
    theta = fwd.old_logprobs_BT  # the policy now: the loss's own logprobs before this update
    # pi_old = pi_theta - d1 (ratios e^d1, some past the 0.2 clip); mu = pi_old - d2 (TIS e^d2, some past the cap)
    d1 = torch.tensor([0.1, -0.05, 0.4, -0.3, 0.02]).repeat(B, 1)
    d2 = torch.tensor([0.3, -0.2, 0.8, 0.0, 0.6]).repeat(B, 1)
    old, behaviour = theta.clone(), theta.clone()
    old[:, PROMPT:] = theta[:, PROMPT:] - d1
    behaviour[:, PROMPT:] = old[:, PROMPT:] - d2
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0])[:, None].expand(B, L).clone()
    n = float(mask.sum())
    batch = TrainBatch(ids, attn, mask, behaviour, adv, old, fwd.ref_logprobs_BT, fwd.values_BT, torch.zeros(B, L), n, float(B))
    m = worker.train(batch)
    # by hand, over the valid tokens
    v = mask > 0
    ratio, weight = torch.exp(theta - old)[v], torch.exp(old - behaviour)[v].clamp(max=CAP)
    a = adv[v]
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
    kl = _k3((theta - fwd.ref_logprobs_BT)[v])
    assert m["ratio_mean"] == pytest.approx(float(ratio.mean()), rel=1e-4)
    assert m["is_weight_mean"] == pytest.approx(float(weight.mean()), rel=1e-4)
    assert m["is_frac_over_cap"] == pytest.approx(float((torch.exp(old - behaviour)[v] > CAP).float().mean()))
    assert m["loss"] == pytest.approx(float(((weight * pg).sum() + KL_COEF * kl.sum()) / n), rel=1e-4)
    assert 0 < m["is_frac_over_cap"] < 1 and m["clip_frac_high"] > 0  # both the cap and the clip bind


def test_reference_logprobs_are_the_reference_models_at_temperature_only_and_feed_the_kl(worker):
    ids, attn, mask = _rows(1)
    fwd = worker.forward(ForwardBatch(ids, attn, want_old=True))
    ref_by_hand = _temperature_logprobs(worker.reference.forward, ids)
    policy_by_hand = _temperature_logprobs(worker.policy.forward, ids)
    v = mask > 0
    torch.testing.assert_close(fwd.ref_logprobs_BT[v], ref_by_hand[v], rtol=1e-5, atol=1e-5)
    assert (fwd.ref_logprobs_BT - policy_by_hand)[v].abs().mean() > 0.05  # not the policy's
    # the policy's own logprobs are the sampler's (top-p): somewhere they differ from T-only ones
    assert (fwd.old_logprobs_BT - policy_by_hand)[v].abs().max() > 1e-3
    n = float(mask.sum())
    zeros = torch.zeros(B, L)
    m = worker.train(TrainBatch(ids, attn, mask, fwd.old_logprobs_BT, zeros, fwd.old_logprobs_BT, fwd.ref_logprobs_BT,
                                fwd.values_BT, zeros, n, float(B)))  # fmt: skip
    kl = _k3((fwd.old_logprobs_BT - ref_by_hand)[v])  # pi_theta before the update vs the reference
    assert m["kl_ref"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert m["loss"] == pytest.approx(KL_COEF * float(kl.mean()), rel=1e-4)  # A = 0: the KL term alone


def test_value_clip_centres_on_the_forward_values_and_binds(worker):
    ids, attn, mask = _rows(2)
    fwd = worker.forward(ForwardBatch(ids, attn, want_old=True))
    values_now = fwd.values_BT  # the critic before this update, position t: V(state before token t)
    old_values, returns = values_now - 1.0, values_now + 0.1
    # V_clipped = old + clamp(V - old, +-0.2) = V - 0.8: (V - 0.8 - R)^2 = 0.81 > (V - R)^2 = 0.01
    # (old and returns swapped: V_clipped = V, both terms 1, nothing clipped: the test tells them apart)
    n = float(mask.sum())
    m = worker.train(TrainBatch(ids, attn, mask, fwd.old_logprobs_BT, torch.zeros(B, L), fwd.old_logprobs_BT,
                                fwd.ref_logprobs_BT, old_values, returns, n, float(B)))  # fmt: skip
    assert m["critic/vf_clip_frac"] == 1.0
    assert m["critic/loss"] == pytest.approx(0.5 * 0.9**2, rel=1e-4)


def test_reference_may_match_the_sampler_filtering(worker, tmp_path):
    """reference_logprobs=sampler: the reference scored as the behaviour is (T, then top-p)."""
    sampler = _worker(tmp_path, "sampler")  # joins the module's process group (init_rank is idempotent)
    ids, attn, _ = _rows(3)
    fwd = sampler.forward(ForwardBatch(ids, attn, want_old=False))
    logits = sampler.reference.forward(lambda m: m(input_ids=ids).logits).float()
    want, _ = processed_token_logprobs(logits[:, :-1], ids[:, 1:], T, 0, TOP_P)
    torch.testing.assert_close(fwd.ref_logprobs_BT[:, 1:], want, rtol=1e-5, atol=1e-5)
    assert (want - _temperature_logprobs(sampler.reference.forward, ids)[:, 1:]).abs().max() > 1e-3
