"""Metric dicts combine by name: *_max by max, *_min by min, the rest by mean; missing keys are fine."""

from __future__ import annotations

import math

from posttrain.metrics import aggregate_metrics, metric_reduction


def test_reduction_by_suffix():
    assert [metric_reduction(k) for k in ("ratio_max", "is_weight_max", "value_min", "ratio_mean", "loss")] == [
        "max", "max", "min", "mean", "mean",
    ]


def test_max_min_mean_and_a_skipped_step_missing_keys():
    records = [
        {"loss": 1.0, "ratio_max": 1.5, "adv_min": -2.0, "lr": 1e-3},
        {"loss": 3.0, "ratio_max": 4.0, "adv_min": -1.0, "skipped_nonfinite": 1.0},  # no lr
        {"loss": 2.0, "ratio_max": 2.0, "adv_min": -3.0, "lr": 2e-3},
    ]
    out = aggregate_metrics(records)
    assert out["loss"] == 2.0  # (1 + 3 + 2) / 3
    assert out["ratio_max"] == 4.0  # max, not the mean 2.5
    assert out["adv_min"] == -3.0
    assert math.isclose(out["lr"], 1.5e-3)  # over the two records that report it
    assert out["skipped_nonfinite"] == 1.0
    assert list(out) == ["loss", "ratio_max", "adv_min", "lr", "skipped_nonfinite"]
    assert aggregate_metrics([]) == {}
