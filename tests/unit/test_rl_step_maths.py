"""The RL step's maths settings, with a real reward graph and fake trainers (hand-computed values):

* a token-level (process) reward node changes the GRPO advantages as the hand computation says;
* KL in the reward reaches a group estimator (GRPO) through the summed score;
* DAPO dynamic sampling filters all-equal groups (counted as filtered, not failed) and refills;
  it judges the advantages the step trains on (overlong filter, process rewards), and the reward
  metrics describe the trained batch;
* PPO epochs: 2 passes over 4 mini-batches, the second pass shuffled, metrics max-combined; each
  later epoch draws its own shuffle;
* the overlong penalty lowers the advantage of a longer sample (its sign, in the fast suite).
"""

from __future__ import annotations

import pytest
import torch
from posttrain.rewards import RewardGraph, RewardNode
from posttrain.rewards.overlong import OverlongPenalty

from posttrain.algorithms.advantages import GRPOAdvantage
from posttrain.algorithms.policy_loss import GRPOLossConfig
from posttrain.rl.config import OnlineRLConfig
from posttrain.rl.step import DynamicSamplingExhausted, Step
from posttrain.types import Completion, ForwardOutputs, Group, PromptRecord


def _group(ordinal: int, answers: list[str], truncated: tuple[int, ...] = ()) -> Group:
    p = PromptRecord(ordinal, "q", [1, 2 + ordinal], {"answer": "7"})
    return Group(p, [Completion(p, i, [10 + len(a)] * len(a), a, [-0.5] * len(a), [0] * len(a), "length" if i in truncated else "stop")
                     for i, a in enumerate(answers)])  # fmt: skip


def exact(sample) -> float:
    return float(sample.completion == sample.fields["answer"])


def per_token_bonus(sample) -> list[float]:
    """A process reward: 0.1 per token of a completion of the right length, else -0.1 per token."""
    n = len(sample.completion)  # one token per character in these groups
    return [0.1 if n == 1 else -0.1] * n


class Trainers:
    def __init__(self, ref_shift: float = 0.0) -> None:
        self.batches, self.ref_shift = [], ref_shift

    def forward(self, batch):
        old = torch.full(batch.input_ids_BT.shape, -1.0)
        return ForwardOutputs(old_logprobs_BT=old, ref_logprobs_BT=old - self.ref_shift)

    def train(self, batch):
        self.batches.append(batch)
        return {"loss": 1.0, "ratio_max": float(len(self.batches))}


class Publisher:
    version = 0

    def publish(self, probe_ids):
        self.version += 1
        return {}


class Ledger:
    def __init__(self) -> None:
        self.written = []

    def write(self, step, groups):
        self.written.append([g.prompt.ordinal for g in groups])

    def scored(self, step, scored):
        pass


def _step(nodes, trainers=None, **algo_kw):
    algo_kw.setdefault("prompts_per_step", 2)
    algo = OnlineRLConfig(advantage=GRPOAdvantage(), loss=GRPOLossConfig(), **algo_kw)
    ledger, trainers = Ledger(), trainers or Trainers()
    return Step(algo, RewardGraph(nodes), trainers, Publisher(), ledger, pad_id=0), trainers, ledger


def _advantages(trainers) -> list[float]:
    """Per-sample advantage (the value on its first response token), in sample order."""
    out = []
    for b in trainers.batches:
        for adv, mask in zip(b.advantages_BT, b.loss_mask_BT, strict=True):
            out.append(float(adv[mask > 0][0]))
    return out


def _grpo(scores: list[float], eps: float = 1e-6) -> list[float]:
    s = torch.tensor(scores)
    return ((s - s.mean()) / (s.std() + eps)).tolist()


def test_process_reward_node_changes_grpo_advantages_as_computed_by_hand():
    nodes = [RewardNode("correct", exact), RewardNode("process", per_token_bonus, token_level=True)]
    step, trainers, _ = _step(nodes)
    groups = [_group(0, ["7", "71", "7", "123"]), _group(1, ["7", "8", "9", "7"])]
    step(groups, 0.0)
    # score = outcome + sum of token rewards: "7" -> 1 + 0.1; "71" -> 0 - 0.2; "123" -> 0 - 0.3; "8" -> 0 + 0.1
    expected = _grpo([1.1, -0.2, 1.1, -0.3]) + _grpo([1.1, 0.1, 0.1, 1.1])
    assert _advantages(trainers) == pytest.approx(expected, abs=1e-5)
    # without the process node the second group's scores are (1, 0, 0, 1): different advantages
    plain, plain_trainers, _ = _step([RewardNode("correct", exact)])
    plain(groups, 0.0)
    assert _advantages(plain_trainers)[4:] == pytest.approx(_grpo([1.0, 0.0, 0.0, 1.0]), abs=1e-5)
    assert _advantages(plain_trainers)[:4] != pytest.approx(expected[:4], abs=1e-3)


def test_kl_in_the_reward_reaches_grpo_through_the_summed_score():
    # old - ref = 0.5 nats on every token (k1): penalty -coef * 0.5 per token, summed per sample
    step, trainers, _ = _step([RewardNode("correct", exact)], trainers=Trainers(ref_shift=0.5), use_reference=True, kl_in_reward_coef=0.2)
    groups = [_group(0, ["7", "71", "7", "123"]), _group(1, ["7", "8", "9", "7"])]
    m = step(groups, 0.0)
    pen = lambda n: -0.2 * 0.5 * n  # noqa: E731
    expected = _grpo([1 + pen(1), pen(2), 1 + pen(1), pen(3)]) + _grpo([1 + pen(1), pen(1), pen(1), 1 + pen(1)])
    assert _advantages(trainers) == pytest.approx(expected, abs=1e-5)
    assert m["kl_in_reward/kl"] == pytest.approx(0.5) and m["kl_in_reward/coef"] == 0.2


def test_dynamic_sampling_filters_all_equal_groups_and_refills():
    step, trainers, ledger = _step([RewardNode("correct", exact)], dynamic_sampling=True)
    made = []

    def refill(count):
        made.append(count)
        # the first refill brings one more all-wrong group, the second a varied one
        answers = ["1", "2", "3", "4"] if len(made) == 1 else ["7", "2", "3", "4"]
        return [_group(10 * len(made) + i, answers) for i in range(count)]

    m = step([_group(0, ["7", "7", "7", "7"]), _group(1, ["7", "8", "9", "9"])], 0.0, refill)
    assert made == [1, 1]  # one round found nothing varied, the second filled the batch
    assert m["samples/filtered_groups"] == 2.0 and m["samples/filtered_samples"] == 8.0 and m["samples/refill_rounds"] == 2.0
    assert m["samples/masked_fraction"] == 0.0  # filtered groups are not failures
    assert ledger.written == [[1, 20]] and sum(b.size for b in trainers.batches) == 8
    with pytest.raises(DynamicSamplingExhausted, match="dynamic_sampling_max_rounds"):
        step([_group(0, ["7", "7", "7", "7"]), _group(1, ["7", "8", "9", "9"])], 0.0, lambda n: [_group(99, ["1"] * 4)])


def test_ppo_epochs_pass_twice_over_four_shuffled_minibatches():
    step, trainers, _ = _step([RewardNode("correct", exact)], prompts_per_step=4, mini_batches=4, ppo_epochs=2)
    groups = [_group(i, ["7", "8", "9", "7"]) for i in range(4)]
    m = step(groups, 0.0)
    assert len(trainers.batches) == 8 and all(b.size == 4 for b in trainers.batches)
    first = [b.input_ids_BT for b in trainers.batches[:4]]
    second = [b.input_ids_BT for b in trainers.batches[4:]]
    as_rows = lambda xs: sorted(map(tuple, torch.cat(xs).tolist()))  # noqa: E731
    assert as_rows(first) == as_rows(second)  # each epoch covers every sample once
    assert any(not torch.equal(a, b) for a, b in zip(first, second, strict=True))  # in another order
    assert all(b.old_logprobs_BT is not None for b in trainers.batches)  # recomputed before the update
    assert all(b.num_tokens == float(b.loss_mask_BT.sum()) for b in trainers.batches)  # each mini-batch's own count
    assert m["ratio_max"] == 8.0 and m["loss"] == 1.0  # _max keys take the max, others the mean


def test_dynamic_sampling_drops_a_group_whose_only_spread_is_overlong_filtered():
    """[7, 7, 7, 8] with the 8 truncated: the overlong filter masks it, the rest all score 1, so the
    group would train on advantages [0, 0, 0, masked]. The old filter (outcomes, no overlong
    filter) kept it: the trained batch had a zero-advantage group."""
    step, trainers, ledger = _step([RewardNode("correct", exact)], dynamic_sampling=True, overlong_filter=True)
    # the refill's group has a truncated sample too, but its other samples vary: it trains
    m = step([_group(0, ["7", "7", "7", "8"], truncated=(3,)), _group(1, ["7", "8", "9", "9"])], 0.0,
             lambda count: [_group(20 + i, ["7", "8", "7", "9"], truncated=(3,)) for i in range(count)])
    assert ledger.written == [[1, 20]]
    assert m["samples/filtered_groups"] == 1.0 and m["samples/refill_rounds"] == 1.0
    assert m["samples/zero_advantage_groups"] == 0.0
    (batch,) = trainers.batches
    valid = batch.loss_mask_BT > 0
    assert valid[7].sum() == 0 and (batch.advantages_BT[valid] != 0).all()  # masked, and non-zero elsewhere
    assert m["reward/correct/mean"] == pytest.approx(3 / 7)  # the trained samples: 1,0,0,0 and 1,0,1 (not the masked 0)


def test_dynamic_sampling_keeps_a_group_that_only_process_rewards_separate():
    """All outcomes 0, process rewards summing to [.1, -.2, .1, -.3]: GRPO gives non-zero
    advantages, so the group trains (the old filter looked at outcomes only and dropped it)."""
    nodes = [RewardNode("correct", exact), RewardNode("process", per_token_bonus, token_level=True)]
    step, trainers, ledger = _step(nodes, dynamic_sampling=True)
    m = step([_group(0, ["8", "12", "9", "123"]), _group(1, ["7", "8", "9", "9"])], 0.0)  # no refill needed
    assert ledger.written == [[0, 1]] and m["samples/filtered_groups"] == 0.0
    assert _advantages(trainers)[:4] == pytest.approx(_grpo([0.1, -0.2, 0.1, -0.3]), abs=1e-5)


def test_dynamic_sampling_reward_metrics_describe_the_trained_batch():
    """The first round's all-right group is filtered: reward/<node>/mean is over the trained groups;
    the filtered ones are counted apart, and the scorer's counters add up over both rounds."""
    step, _, _ = _step([RewardNode("correct", exact)], dynamic_sampling=True)
    m = step([_group(0, ["7", "7", "7", "7"]), _group(1, ["7", "8", "9", "9"])], 0.0,
             lambda count: [_group(20 + i, ["7", "7", "7", "9"]) for i in range(count)])
    assert m["reward/correct/mean"] == pytest.approx((1 + 3) / 8)  # first round alone: 5 / 8
    assert m["reward/mean"] == pytest.approx((1 + 3) / 8)
    assert m["samples/filtered_reward_mean"] == 1.0 and m["samples/filtered_samples"] == 4.0
    assert m["reward/samples"] == 12.0 and m["samples/scored_groups"] == 3.0  # 8 + 4 samples scored


def test_zero_advantage_groups_are_counted_without_dynamic_sampling():
    step, _, _ = _step([RewardNode("correct", exact)])
    m = step([_group(0, ["7", "7", "7", "7"]), _group(1, ["7", "8", "9", "9"])], 0.0)
    assert m["samples/zero_advantage_groups"] == 1.0


def test_each_ppo_epoch_draws_its_own_shuffle():
    """3 epochs of 1 mini-batch: epoch 1 in the generated order, epochs 2 and 3 in the first and
    second permutation drawn from the step's generator (seed + step): different orders."""
    step, trainers, _ = _step([RewardNode("correct", exact)], prompts_per_step=4, ppo_epochs=3)
    groups = [_group(i, ["7", "8", "9", "7"]) for i in range(4)]
    step(groups, 0.0)
    assert len(trainers.batches) == 3
    first = trainers.batches[0].input_ids_BT
    gen = torch.Generator().manual_seed(0 + 1)  # Step(seed=0), step 1
    for epoch, want in zip((1, 2), (torch.randperm(16, generator=gen), torch.randperm(16, generator=gen)), strict=True):
        assert torch.equal(trainers.batches[epoch].input_ids_BT, first[want]), epoch
    assert not torch.equal(trainers.batches[1].input_ids_BT, trainers.batches[2].input_ids_BT)


def test_overlong_penalty_lowers_the_longer_samples_advantage():
    """DAPO's soft overlong punishment (max 6 tokens, soft zone of 2): 4 tokens -> 0, 5 -> -0.5,
    6 -> -1. All four answers are wrong, so the penalty alone orders the advantages."""
    nodes = [RewardNode("correct", exact), RewardNode("overlong", OverlongPenalty(6, 2))]
    step, trainers, _ = _step(nodes, prompts_per_step=1)
    m = step([_group(0, ["1234", "12345", "123456", "1234"])], 0.0)
    assert _advantages(trainers) == pytest.approx(_grpo([0.0, -0.5, -1.0, 0.0]), abs=1e-5)
    assert m["reward/overlong/mean"] == pytest.approx(-1.5 / 4)
