"""Sequence packing (posttrain.engine.packing): packed micro-batches give the same logits, losses
and gradients as padded ones, for the RL policy and value losses and for SFT.

Tolerance: everything is float32. Packing changes only the shapes of the matmuls ([1, N] instead of
[B, T]) and so the BLAS summation order; measured differences: logits 4e-7, gradients at most
3.8e-7 relative to each parameter's gradient norm. The bounds (1e-5 absolute on logits and losses
of order 0.1-1, 1e-5 relative on gradients) are ~25x that, and far below what a cross-row
attention leak gives (logit errors of ~0.8 when position_ids alone are passed to SDPA). The RL
workers use lr=0 so the second step compares the same weights: AdamW's first steps are ~lr*sign(g)
and would turn 1e-7 gradient noise into a larger weight difference, which is not packing's doing.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from posttrain.algorithms.advantages import GRPOAdvantage
from posttrain.algorithms.policy_loss import PolicyLossConfig
from posttrain.engine import packing
from posttrain.engine.packing import (
    MicroPlan,
    equalize,
    families,
    pack,
    piece_mask,
    plan,
    prefix_order,
)
from posttrain.engine.trainer import OptimConfig, TrainerConfig
from posttrain.models.factory import TinyModelSpec, build_tiny_model
from posttrain.models.loading import ModelConfig
from posttrain.offline.sft import SFT, SFTConfig
from posttrain.rl.config import OnlineRLConfig, SyncConfig
from posttrain.rl.trainer_worker import TrainerSpec, TrainerWorker
from posttrain.types import ForwardBatch, TrainBatch

SPEC = TinyModelSpec(
    arch="llama", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64
)
LENGTHS = [12, 3, 7, 12, 5, 9, 4, 11]  # right-padded to T = 12


def test_plan_first_fit_decreasing_by_hand():
    # sorted: 9(0), 7(2), 5(3), 4(1), 2(4); budget 10: [9], [7], [5, 4] -> 4 joins 5, 2 joins 7
    plans = plan([9, 4, 7, 5, 2], 10)
    assert [p.rows for p in plans] == [[0], [2, 4], [1, 3]]
    assert plan([15, 3], 10)[0].rows == [0]  # a row over the budget gets its own micro-batch


def test_plan_covers_every_row_once_within_budget():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 60, (200,), generator=g).tolist()
    plans = plan(lengths, 128)
    assert sorted(i for p in plans for i in p.rows) == list(range(200))
    assert all(sum(lengths[i] for i in p.rows) <= 128 for p in plans)


def test_equalize_splits_then_adds_dummies():
    plans = equalize([MicroPlan([0, 1, 2, 3]), MicroPlan([4])], 3)
    assert [p.rows for p in plans] == [[0, 1], [2, 3], [4]]
    plans = equalize([MicroPlan([0])], 2)
    assert [(p.rows, p.dummy) for p in plans] == [([0], False), ([0], True)]


def unpack(x_1N: torch.Tensor, batch: dict) -> torch.Tensor:
    """[1, N, ...] packed per-token values -> [B, T, ...] rows through ``packed_tok_BT`` (a shared
    prefix's values in every row of its family), zeros on padding: the layout check of these tests."""
    tok = batch["packed_tok_BT"]
    out = x_1N[0][tok.clamp(min=0)]
    keep = (tok >= 0).reshape(*tok.shape, *([1] * (out.dim() - 2)))
    return torch.where(keep, out, torch.zeros_like(out))


def _padded(
    lengths: list[int], seed: int = 0, group: int = 0, prefix: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random right-padded rows; with ``group``, every ``group`` consecutive rows begin with the same
    ``prefix`` tokens (as far as they reach), like a GRPO group's samples of one prompt."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(5, 100, (n,), generator=g)
        attn[b, :n] = 1
        if group and b % group:
            first = b - b % group
            ids[b, : min(n, prefix)] = ids[first, : min(n, prefix)]
    return ids, attn


def test_pack_positions_restart_and_unpack_round_trips():
    ids, attn = _padded([3, 1, 2])
    p = pack(ids, attn)
    assert p["packed_pos_1N"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert p["packed_cu_S1"].tolist() == [0, 3, 4, 6] and p["packed_parent_S"].tolist() == [-1, -1, -1]
    assert torch.equal(unpack(p["packed_ids_1N"], p), ids)
    with pytest.raises(ValueError, match="right-padded"):
        pack(ids, attn.flip(-1))


def test_pack_shares_a_common_prefix_once_by_hand():
    a, b, c, d, e, f, x = 11, 12, 13, 14, 15, 16, 17
    ids = torch.tensor([[a, b, c, d, 0], [a, b, c, e, f], [a, b, x, 0, 0]])
    attn = (ids > 0).long()
    # common prefixes: row 1 with row 0: 3 (a b c), row 2 with row 1: 2 (a b); sharing 2 tokens over 3
    # rows saves 4, more than 3 over rows 0-1
    assert prefix_order(ids, [4, 5, 3]) == ([0, 1, 2], [0, 3, 2])
    # any order of the rows: lexicographic order makes rows that begin alike neighbours
    assert prefix_order(ids[[2, 0, 1]], [3, 4, 5]) == ([1, 2, 0], [0, 3, 2])
    p = pack(ids, attn, min_shared=2)
    assert p["packed_ids_1N"].tolist() == [[a, b, c, d, c, e, f, x]]
    assert p["packed_pos_1N"].tolist() == [[0, 1, 2, 3, 2, 3, 4, 2]]
    assert p["packed_cu_S1"].tolist() == [0, 2, 4, 7, 8] and p["packed_parent_S"].tolist() == [-1, 0, 0, 0]
    # row 0's c follows the prefix in the packed row; rows 1 and 2 branch off the prefix's last token
    assert p["packed_branch_K2"].tolist() == [[1, c], [1, x]]
    assert torch.equal(unpack(p["packed_ids_1N"], p), ids)
    assert pack(ids, attn, min_shared=3)["packed_parent_S"].tolist() == [-1, 0, 0, -1]  # rows 0-1 share 3
    assert pack(ids, attn, min_shared=4)["packed_parent_S"].tolist() == [-1, -1, -1]


def test_families_maximise_the_tokens_saved():
    assert families([0, 25, 25, 10, 25, 25], 16) == [(0, 3, 25), (3, 6, 25)]  # two groups, not the template
    assert families([0, 25, 25, 10, 25, 25], 8) == [(0, 3, 25), (3, 6, 25)]  # 2*25 + 2*25 > 5*10
    assert families([0, 20, 20, 18], 4) == [(0, 4, 18)]  # 3*18 > 2*20
    assert families([0, 20, 20, 18], 0) == [(0, 1, 0), (1, 2, 0), (2, 3, 0), (3, 4, 0)]
    assert families([0, 3, 20], 4) == [(0, 1, 0), (1, 3, 20)]


def test_plan_keeps_a_family_together_and_counts_its_prefix_once():
    lengths = [10, 10, 10, 10, 10]
    ids = torch.arange(50).reshape(5, 10) + 100
    ids[[0, 2, 3, 4], :6] = torch.arange(6)  # rows 0, 2, 3, 4 share 6 tokens; row 1 shares none
    assert [p.rows for p in plan(lengths, 20)] == [[0, 1], [2, 3], [4]]
    # 6 + 4 * 4 = 22 > 20: the family is cut after 3 rows (6 + 3 * 4 = 18)
    plans = plan(lengths, 20, ids, min_shared=4)
    assert [p.rows for p in plans] == [[0, 2, 3], [1, 4]] and all(p.min_shared == 4 for p in plans)
    assert [p.rows for p in plan(lengths, 40, ids, min_shared=4)] == [[0, 1, 2, 3, 4]]  # 22 + 10
    assert [p.rows for p in plan(lengths, 40, ids, min_shared=7)] == [[0, 1, 2, 3], [4]]  # 6 < 7: rows alone


@pytest.mark.parametrize("group", [0, 4], ids=["rows", "shared-prefix"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_logits_equal_per_row_logits(arch, group):
    """Both CPU paths: per-piece SDPA (the default) and the 4-D piece mask (checkpointing)."""
    model = build_tiny_model(dataclasses.replace(SPEC, arch=arch)).eval()
    ids, attn = _padded(LENGTHS, group=group)
    rows = {"input_ids_BT": ids, "attention_mask_BT": attn, **pack(ids, attn, min_shared=2 if group else 0)}
    assert bool((rows["packed_parent_S"] >= 0).any()) == bool(group)
    impl = model.config._attn_implementation
    with torch.no_grad():
        by_rows = packing.forward(model, rows).logits
        assert model.config._attn_implementation == impl  # selected for the packed forward only
        masked = model(input_ids=rows["packed_ids_1N"], position_ids=rows["packed_pos_1N"],
                       attention_mask=piece_mask(rows["packed_cu_S1"], rows["packed_parent_S"])).logits  # fmt: skip
        for packed in (by_rows, masked):
            packed = unpack(packed, rows)
            for b, n in enumerate(LENGTHS):
                alone = model(input_ids=ids[b : b + 1, :n]).logits[0]
                torch.testing.assert_close(packed[b, :n], alone, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- RL trainer rank
def _batch(loss_cfg: PolicyLossConfig, seed: int = 0, group: int = 0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    ids, attn = _padded(LENGTHS, seed, group=group)
    B, T = ids.shape
    loss_mask = attn.float()
    loss_mask[:, :2] = 0.0  # prompt of 2 tokens
    loss_mask[1] = 0.0  # a fully masked sample: contributes nothing
    return TrainBatch(
        input_ids_BT=ids,
        attention_mask_BT=attn,
        loss_mask_BT=loss_mask,
        behaviour_logprobs_BT=-4.8 + torch.randn(B, T, generator=g),
        advantages_BT=torch.randn(B, 1, generator=g).expand(B, T).clone(),
        values_BT=torch.randn(B, T, generator=g),
        returns_BT=torch.randn(B, T, generator=g),
        num_tokens=float(loss_mask.sum()),
        num_seqs=float((loss_mask.sum(-1) > 0).sum()),
    )


@pytest.fixture
def workers(tmp_path):
    """A padded and a packed trainer rank with the same initial weights."""
    assert not dist.is_initialized()
    made = []

    def make(loss_cfg: PolicyLossConfig, max_tokens: int | None, critic: bool = False) -> TrainerWorker:
        cfg = TrainerConfig(max_steps=4, global_batch_size=8, micro_batch_size=3, grad_clip=0.0, optim=OptimConfig(lr=0.0),
                            max_tokens_per_micro_batch=max_tokens, share_prefix_min_tokens=2)  # fmt: skip
        algo = OnlineRLConfig(advantage=GRPOAdvantage(), loss=loss_cfg)
        if critic:
            from posttrain.rl.config import CriticConfig

            algo = dataclasses.replace(algo, critic=CriticConfig())
        spec = TrainerSpec(
            1, str(tmp_path / "store"), ModelConfig(factory=SPEC), cfg, algo, SyncConfig(), cpus=1
        )
        made.append(TrainerWorker(0, spec))
        return made[-1]

    yield make
    dist.destroy_process_group()


def _capture_grads(engine) -> dict[str, torch.Tensor]:
    """Record the accumulated gradients at clip time (before the optimizer step)."""
    grads: dict[str, torch.Tensor] = {}
    clip = engine._clip_grads

    def spy() -> float:
        grads.update({n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None})
        return clip()

    engine._clip_grads = spy
    return grads


def _assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for n in a:
        scale = max(float(a[n].norm()), 1e-6)
        assert float((a[n] - b[n]).norm()) / scale < 1e-5, n


LOSSES = [
    PolicyLossConfig(aggregation="token_mean"),
    PolicyLossConfig(aggregation="seq_mean_token_mean"),
    PolicyLossConfig(aggregation="seq_mean_token_sum_norm", norm_length=10),
    PolicyLossConfig(aggregation="seq_mean_token_mean", ratio_level="sequence", tis_cap=2.0),
]


@pytest.mark.parametrize("group", [0, 4], ids=["rows", "shared-prefix"])
@pytest.mark.parametrize("loss_cfg", LOSSES, ids=lambda c: f"{c.aggregation}-{c.ratio_level}")
def test_rl_packed_update_equals_padded(workers, loss_cfg, group):
    padded, packed = workers(loss_cfg, None), workers(loss_cfg, 20)
    gp, gk = _capture_grads(padded.policy), _capture_grads(packed.policy)
    batch = _batch(loss_cfg, group=group)
    # old logprobs from the forward verb, packed vs padded, then one step with them
    fp = padded.forward(ForwardBatch(batch.input_ids_BT, batch.attention_mask_BT, want_old=True))
    fk = packed.forward(ForwardBatch(batch.input_ids_BT, batch.attention_mask_BT, want_old=True))
    valid = batch.attention_mask_BT.bool()
    torch.testing.assert_close(fk.old_logprobs_BT[valid], fp.old_logprobs_BT[valid], atol=1e-5, rtol=1e-5)
    assert (fk.old_logprobs_BT[~valid] == 0).all()
    mp = padded.train(dataclasses.replace(batch, old_logprobs_BT=fp.old_logprobs_BT))
    mk = packed.train(dataclasses.replace(batch, old_logprobs_BT=fk.old_logprobs_BT))
    assert abs(mp["loss"] - mk["loss"]) < 1e-5 and mp["loss"] != 0.0
    assert abs(mp["grad_norm"] - mk["grad_norm"]) / mp["grad_norm"] < 1e-5
    _assert_same_grads(gp, gk)
    # a second step without old logprobs (the loss forward's own, detached)
    gp.clear(), gk.clear()
    mp, mk = padded.train(_batch(loss_cfg, 1, group)), packed.train(_batch(loss_cfg, 1, group))
    assert abs(mp["loss"] - mk["loss"]) < 1e-5
    _assert_same_grads(gp, gk)


def test_rl_packing_really_packs(workers, monkeypatch):
    """The packed rank runs fewer, fuller micro-batches (20-token budget over 75 tokens: 4); rows
    that share a prefix hold it once."""
    packed = workers(PolicyLossConfig(), 20)
    seen: list[int] = []
    real = packing.forward
    monkeypatch.setattr(  # the policy's forward: through the fused head's model call (engine/head_logprobs.py)
        "posttrain.engine.head_logprobs.packed_forward",
        lambda m, b: seen.append(b["packed_ids_1N"].shape[1]) or real(m, b),
    )
    packed.train(_batch(PolicyLossConfig()))
    assert sum(seen) == sum(LENGTHS) and max(seen) <= 20 and len(seen) == 4
    seen.clear()
    packed.train(_batch(PolicyLossConfig(), group=4))
    assert sum(seen) < sum(LENGTHS) and max(seen) <= 20


@pytest.mark.parametrize("group", [0, 4], ids=["rows", "shared-prefix"])
def test_ppo_value_loss_packed_equals_padded(workers, group):
    padded, packed = (
        workers(PolicyLossConfig(), None, critic=True),
        workers(PolicyLossConfig(), 20, critic=True),
    )
    gp, gk = _capture_grads(padded.critic), _capture_grads(packed.critic)
    batch = _batch(PolicyLossConfig(), group=group)
    vp = padded.forward(ForwardBatch(batch.input_ids_BT, batch.attention_mask_BT, want_old=False)).values_BT
    vk = packed.forward(ForwardBatch(batch.input_ids_BT, batch.attention_mask_BT, want_old=False)).values_BT
    valid = batch.attention_mask_BT.bool()
    torch.testing.assert_close(vk[valid], vp[valid], atol=1e-5, rtol=1e-5)
    mp, mk = padded.train(batch), packed.train(batch)
    assert abs(mp["critic/loss"] - mk["critic/loss"]) < 1e-5 and mp["critic/loss"] > 0
    _assert_same_grads(gp, gk)


# ---------------------------------------------------------------- SFT
@pytest.mark.parametrize("group", [0, 4], ids=["rows", "shared-prefix"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_sft_packed_loss_and_grads_equal_padded(checkpointing, group):
    model = build_tiny_model(SPEC)
    if checkpointing:  # the packed forward then takes the 4-D piece mask path
        model.gradient_checkpointing_enable()
    model.train()
    sft = SFT(SFTConfig())
    ids, attn = _padded(LENGTHS, group=group)
    loss_mask = attn.float()
    loss_mask[:, :3] = 0.0
    rows = {"input_ids_BT": ids, "attention_mask_BT": attn, "loss_mask_BT": loss_mask}
    count = float(loss_mask.sum())

    def run(micro) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        total = 0.0
        for mb in micro:
            loss, _ = sft.loss(model, mb, count)
            loss.backward()
            total += float(loss.detach())
        return total, {n: p.grad.clone() for n, p in model.named_parameters()}

    padded = [{k: v[i : i + 3] for k, v in rows.items()} for i in range(0, len(LENGTHS), 3)]
    lengths = LENGTHS
    packed = packing.packed_micro_batches(rows, plan(lengths, 20, ids, min_shared=2 if group else 0))
    # sharing makes room: the 75 tokens fit in 3 micro-batches of 20, not 4
    assert len(packed) == (3 if group else 4) and any(
        bool((mb["packed_parent_S"] >= 0).any()) for mb in packed
    ) == bool(group)
    lp, gp = run(padded)
    lk, gk = run(packed)
    assert abs(lp - lk) < 1e-5 and lp > 0
    _assert_same_grads(gp, gk)


def _recipe_run(recipe: str, tmp, name: str, extra: list[str]) -> list[dict]:
    import os

    from posttrain.config.loader import load_recipe
    from posttrain.metrics import read_metrics
    from posttrain.offline.runner import run_offline

    overrides = [
        "model.factory.hidden_size=32", "model.factory.num_layers=2", "model.factory.num_heads=2", "model.factory.num_kv_heads=1",
        "model.factory.intermediate_size=64", "data.train.num_examples=64", "data.eval.num_examples=8", "trainer.max_steps=3",
        "trainer.global_batch_size=16", "trainer.micro_batch_size=4", f"run.output_dir={tmp}", f"run.name={name}",
        "logging.wandb.enabled=false", "logging.progress=false", "eval.every_steps=0", "checkpoint.every_steps=0", *extra,
    ]  # fmt: skip
    cfg, resolved = load_recipe(recipe, overrides)
    run_dir = os.path.join(cfg.run.output_dir, cfg.run.name)
    os.makedirs(run_dir, exist_ok=True)
    run_offline(cfg, resolved, run_dir)
    return [m for m in read_metrics(run_dir) if "loss" in m]


def test_sft_runner_packed_matches_padded(tmp_path, repo_root):
    """Three SFT steps through the runner. Step 1 compares the same weights (tolerance as above);
    later steps follow AdamW updates of ~1e-7-different gradients: rel 1e-4 on the loss."""
    recipe = f"{repo_root}/recipes/sft_tiny_arith.yaml"
    padded = _recipe_run(recipe, tmp_path, "padded", [])
    packed = _recipe_run(recipe, tmp_path, "packed", ["trainer.max_tokens_per_micro_batch=64"])
    assert [m["step"] for m in packed] == [1, 2, 3]
    assert abs(padded[0]["loss"] - packed[0]["loss"]) < 1e-5
    for a, b in zip(padded, packed, strict=True):
        assert abs(a["loss"] - b["loss"]) / abs(a["loss"]) < 1e-4


def test_dpo_runner_packed_matches_padded(tmp_path, repo_root):
    """DPO packs whole pairs (chosen and rejected share their prompt once): same losses as padded."""
    recipe = f"{repo_root}/recipes/dpo_tiny_arith.yaml"
    padded = _recipe_run(recipe, tmp_path, "padded", [])
    packed = _recipe_run(recipe, tmp_path, "packed", ["trainer.max_tokens_per_micro_batch=160", "trainer.share_prefix_min_tokens=4"])
    assert [m["step"] for m in packed] == [1, 2, 3]
    assert abs(padded[0]["loss"] - packed[0]["loss"]) < 1e-5
    for a, b in zip(padded, packed, strict=True):
        assert abs(a["loss"] - b["loss"]) / abs(a["loss"]) < 1e-4


def test_plan_pairs_keeps_chosen_and_rejected_together():
    from posttrain.engine.packing import pair_rows, plan_pairs

    # pairs: (10, 6), (4, 4), (9, 9); rows 0-2 chosen, 3-5 rejected
    lengths = [10, 4, 9, 6, 4, 9]
    plans = pair_rows(plan_pairs(lengths, 18), 3)
    assert [p.rows for p in plans] == [[2, 5], [0, 3], [1, 4]]  # 18, 16, 8: no two fit together
    ids = torch.arange(60).reshape(6, 10)
    ids[3, :5] = ids[0, :5]  # pair 0 shares 5 tokens: 16 - 5 = 11, room for pair 1 (8)
    plans = pair_rows(plan_pairs(lengths, 19, ids, min_shared=4), 3)
    assert [p.rows for p in plans] == [[2, 5], [0, 1, 3, 4]]
    assert plans[1].min_shared == 4


def test_dpo_packed_loss_and_grads_equal_padded_with_a_filler_micro_batch():
    from posttrain.offline.dpo import DPO, DPOConfig

    model = build_tiny_model(SPEC).train()
    dpo = DPO(DPOConfig())
    reference = build_tiny_model(dataclasses.replace(SPEC, seed=1)).eval()
    dpo.reference = type("Frozen", (), {"forward": staticmethod(lambda fn: fn(reference))})()
    ids, attn = _padded([9, 7, 12, 5, 9, 11, 4, 6], group=0)
    P = 4
    ids[P:, :3] = ids[:P, :3]  # chosen and rejected of a pair share a 3-token prompt
    loss_mask = attn.float()
    loss_mask[:, :3] = 0.0
    rows = {"input_ids_BT": ids, "attention_mask_BT": attn, "loss_mask_BT": loss_mask}

    def run(micro) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        total = 0.0
        for mb in micro:
            loss, _ = dpo.loss(model, mb, float(P))
            loss.backward()
            total += float(loss.detach())
        return total, {n: p.grad.clone() for n, p in model.named_parameters()}

    lp, gp = run([rows])
    # pair costs 15, 15, 13, 8 in 24 tokens: [0, 3], [1], [2]; equalized to 5: singles and a filler
    plans = packing.equalize(packing.plan_pairs(attn.sum(-1).tolist(), 24, ids, min_shared=2), 5)
    assert any(p.dummy for p in plans)  # a filler (as FSDP ranks with fewer micro-batches get) adds nothing
    packed = packing.packed_micro_batches(rows, packing.pair_rows(plans, P))
    assert any(bool((mb["packed_parent_S"] >= 0).any()) for mb in packed)
    lk, gk = run(packed)
    assert abs(lp - lk) < 1e-5 and lp > 0
    _assert_same_grads(gp, gk)


def test_reward_model_refuses_packing_with_the_fix(tmp_path, repo_root):
    from posttrain.config.errors import PosttrainError

    with pytest.raises(PosttrainError, match="max_tokens_per_micro_batch.*does not support"):
        _recipe_run(f"{repo_root}/recipes/rm_tiny_arith.yaml", tmp_path, "rm", ["trainer.max_tokens_per_micro_batch=64"])
