"""The logprob probe calibrated to the compute dtype (posttrain/weight_sync.py, rl/publisher.py).

In bf16, vLLM's attention and HF SDPA differ per token by up to ~0.3 nats with the SAME weights
(vLLM's issue tracker): a probe judged on the max over ~600 tokens against 0.1 trips on a correct
sync. The floor is measured at version 0 (both sides on the same weights) and later syncs are
judged on the mean and p99 above it. A skipped sync at lr 1e-6 is the digest's to catch
(tests/integration/test_sync_collective_grpo.py), not the probe's.
"""

from __future__ import annotations

import random

import pytest
import torch

from posttrain.rl.config import SyncConfig
from posttrain.weight_sync import (
    WeightSyncProbeError,
    check_probe,
    judge_probe,
    measure_floor,
    probe_gap_stats,
)


def _bf16_like(base: list[float], seed: int, spikes: int = 4) -> list[float]:
    """``base`` plus kernel noise as bf16 attention makes it: ~0.02 nats per token and a few
    tokens off by 0.3 (where two near-equal logits swap rounding)."""
    rng = random.Random(seed)
    out = [x + rng.uniform(-0.02, 0.02) for x in base]
    for i in rng.sample(range(len(out)), spikes):
        out[i] -= 0.3
    return out


_TRAINER = [[-1.0 - 0.001 * i for i in range(600)]]  # 600 scored tokens, as a real probe


def test_bf16_kernel_noise_passes_against_its_floor_and_a_wrong_model_does_not():
    floor = measure_floor([_bf16_like(_TRAINER[0], 0)], _TRAINER, torch.bfloat16)
    assert 0.005 < floor.mean < 0.03 and floor.p99 < 0.05  # 4 spikes in 600 tokens stay above p99
    # a correct sync a step later: the same noise, elsewhere; the max (0.3) is above bf16's 0.1
    after = [_bf16_like(_TRAINER[0], 1)]
    gap = judge_probe(after, _TRAINER, version=1, dtype=torch.bfloat16, floor=floor)
    assert gap.max > 0.1 and gap.mean < 0.03
    # the engine serving other weights: every token off by ~0.7 (two seeds of one model)
    wrong = [[x - 0.7 for x in _bf16_like(_TRAINER[0], 2)]]
    with pytest.raises(WeightSyncProbeError, match="version 2.*floor at version 0"):
        judge_probe(wrong, _TRAINER, version=2, dtype=torch.bfloat16, floor=floor)
    # a few layers left stale: a fifth of the tokens off by 0.5 moves the p99 (and the mean) out
    partial = [[x - (0.5 if i % 5 == 0 else 0.0) for i, x in enumerate(after[0])]]
    with pytest.raises(WeightSyncProbeError):
        judge_probe(partial, _TRAINER, version=3, dtype=torch.bfloat16, floor=floor)


def test_a_floor_that_is_already_wide_is_refused():
    # both sides "on the same weights" but 0.7 apart on average: not the same model (wrong checkpoint)
    with pytest.raises(WeightSyncProbeError, match="do not run the same model"):
        measure_floor([[x - 0.7 for x in _TRAINER[0]]], _TRAINER, torch.bfloat16)


def test_gap_stats_nearest_rank_p99_and_nan():
    s = probe_gap_stats([[0.0] * 99 + [1.0]], [[0.0] * 100])
    assert (s.mean, s.p99, s.max) == (pytest.approx(0.01), 0.0, 1.0)  # one token in 100 is above p99
    assert probe_gap_stats([[float("nan")]], [[0.0]]).mean == float("inf")
    assert check_probe([[-1.0]], [[-1.0 - 1e-5]], version=1) == pytest.approx(1e-5)  # still returns the max


class _Fleet:
    colocated = True

    def __init__(self, engine_lp) -> None:
        self.engine_lp, self.calls = engine_lp, []

    def usable(self):
        return [0]

    def wake(self, indices):
        self.calls.append("wake")

    def sleep(self, indices):
        self.calls.append("sleep")

    def call(self, indices, verb, *args, what):
        self.calls.append(verb)
        return {0: self.engine_lp}


class _Trainers:
    def __init__(self, trainer_lp) -> None:
        self.trainer_lp, self.pushed_current, self.probes = trainer_lp, True, 0

    def probe(self, ids):
        self.probes += 1
        return self.trainer_lp


def test_publisher_measures_the_floor_once_with_both_sides_on_one_version_and_records_it():
    from posttrain.rl.publisher import WeightPublisher

    fleet, trainers = _Fleet([_bf16_like(_TRAINER[0], 0)]), _Trainers(_TRAINER)
    pub = WeightPublisher(trainers, fleet, SyncConfig(wire_dtype="bfloat16"), torch.bfloat16)
    m = pub.calibrate([[1, 2]])
    assert m["sync/probe_floor_mean"] == pytest.approx(pub.floor.mean) and m["sync/probe_floor_p99"] == pub.floor.p99
    # colocated: the engines wake to score while the trainers are off the devices, and sleep again
    assert fleet.calls == ["wake", "score_tokens", "sleep"] and trainers.probes == 1
    trainers.pushed_current = False  # trained since: not the same weights any more; the floor stays
    assert pub.calibrate([[1, 2]]) == m and trainers.probes == 1
    fresh = WeightPublisher(trainers, _Fleet(_TRAINER), SyncConfig(), torch.float32)
    assert fresh.calibrate([[1, 2]]) == {} and fresh.floor is None  # never measured on differing weights
