"""With one mini-batch the trainer skips the forward pass that recomputes the pre-update logprobs
and uses its loss forward's own (detached) logprobs: the update must equal the recomputed one."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from posttrain.algorithms.advantages import GRPOAdvantage
from posttrain.algorithms.policy_loss import GRPOLossConfig
from posttrain.engine.trainer import OptimConfig, TrainerConfig
from posttrain.models.factory import TinyModelSpec
from posttrain.models.loading import ModelConfig
from posttrain.rl.config import OnlineRLConfig, SyncConfig
from posttrain.rl.trainer_worker import TrainerSpec, TrainerWorker
from posttrain.types import ForwardBatch, ForwardOutputs, TrainBatch

SPEC = TinyModelSpec(arch="llama", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture
def worker_pair(tmp_path):
    assert not dist.is_initialized()
    cfg = TrainerConfig(max_steps=4, global_batch_size=8, micro_batch_size=4, optim=OptimConfig(lr=1e-2))
    algo = OnlineRLConfig(advantage=GRPOAdvantage(), loss=GRPOLossConfig(tis_cap=1.5))
    store = str(tmp_path / "store")
    spec = TrainerSpec(1, store, ModelConfig(factory=SPEC), cfg, algo, SyncConfig(), cpus=1)
    pair = [TrainerWorker(0, spec) for _ in range(2)]
    yield pair
    dist.destroy_process_group()


def _rows(seed: int = 0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    B, T = 8, 10
    loss_mask = torch.zeros(B, T)
    loss_mask[:, 6:] = 1.0
    loss_mask[0, 8:] = 0.0  # a shorter response
    return TrainBatch(
        input_ids_BT=torch.randint(5, 100, (B, T), generator=g),
        attention_mask_BT=torch.ones(B, T, dtype=torch.long),
        loss_mask_BT=loss_mask,
        # vLLM's logprobs: off from the trainer's by up to ~1 nat, so the TIS cap bites somewhere
        behaviour_logprobs_BT=-4.8 + torch.randn(B, T, generator=g),
        advantages_BT=torch.randn(B, 1, generator=g).expand(B, T).clone(),
        num_tokens=float(loss_mask.sum()),
        num_seqs=float(B),
    )


def test_skipping_the_old_logprob_forward_gives_the_same_update(worker_pair):
    recomputed, skipped = worker_pair
    for a, b in zip(recomputed.policy.model.parameters(), skipped.policy.model.parameters(), strict=True):
        assert torch.equal(a, b)  # same seed, same start
    for step in range(3):
        rows = _rows(step)
        old = recomputed.forward(ForwardBatch(rows.input_ids_BT, rows.attention_mask_BT, want_old=True))
        assert old.old_logprobs_BT is not None
        assert skipped.forward(ForwardBatch(rows.input_ids_BT, rows.attention_mask_BT, want_old=False)) == ForwardOutputs()
        m_rec = recomputed.train(dataclasses.replace(rows, old_logprobs_BT=old.old_logprobs_BT))
        m_skip = skipped.train(rows)
        assert m_rec["is_frac_over_cap"] > 0  # the correction is exercised, not a no-op
        for key in ("loss", "grad_norm", "is_weight_mean", "ratio_mean", "clip_frac_low", "clip_frac_high"):
            assert m_skip[key] == pytest.approx(m_rec[key], rel=1e-5, abs=1e-6), key
    for a, b in zip(recomputed.policy.model.parameters(), skipped.policy.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_recomputes_only_when_needed():
    assert not OnlineRLConfig().recompute_old
    assert OnlineRLConfig(mini_batches=2).recompute_old
    assert OnlineRLConfig(kl_in_reward_coef=0.1, use_reference=True).recompute_old
    assert OnlineRLConfig(recompute_old_logprobs="always").recompute_old
    assert OnlineRLConfig(recompute_old_logprobs="sometimes").validate()[0] == "recompute_old_logprobs"
