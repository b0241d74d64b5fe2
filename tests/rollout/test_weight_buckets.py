"""Bucket format, sender and receiver invariants, probe (no engine)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from posttrain.rollout.sampling import SamplingConfig
from posttrain.rollout.weight_receiver import ParamManifest, ParamSpec, WeightUpdateSession

from posttrain.weight_sync import (
    PROBE_TOLERANCE,
    WeightSender,
    WeightSyncError,
    WeightSyncProbeError,
    check_probe,
    probe_logprob_gap,
)


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(100, 30, generator=g),  # 12,000 bytes
        "b.bias": torch.randn(7, generator=g),
        "c.weight": torch.randn(10, 10, generator=g).to(torch.bfloat16),
        "d.big": torch.randn(5000, generator=g),  # 20,000 bytes > bucket
        "e.int": torch.arange(12, dtype=torch.int64).view(3, 4),
    }


def _manifest(sd: dict[str, torch.Tensor]) -> ParamManifest:
    return ParamManifest({n: ParamSpec(t.dtype, tuple(t.shape)) for n, t in sd.items()})


def test_round_trip_is_bit_exact_and_bucketed():
    sd = _state_dict()
    sender = WeightSender(bucket_bytes=16_000)
    buckets = list(sender.buckets(sd, version=1))
    got = {name: t.clone() for b in buckets for name, t in b.tensors()}
    assert list(got) == list(sd)
    for name, tensor in sd.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)
    # fixed-size buckets: only a tensor larger than the bucket may exceed it, and it travels alone
    for b in buckets:
        assert b.nbytes <= 16_000 or len(b.metas) == 1
    assert len(buckets) >= 3
    assert [b.index for b in buckets] == list(range(len(buckets)))
    assert [b.is_last for b in buckets] == [False] * (len(buckets) - 1) + [True]
    assert buckets[-1].total_tensors == len(sd)
    stats = sender.last_stats
    assert stats.num_tensors == len(sd) and stats.num_buckets == len(buckets)
    assert stats.bytes == sum(t.numel() * t.element_size() for t in sd.values())


def test_wire_dtype_casts_floats_only():
    buckets = list(WeightSender(wire_dtype=torch.bfloat16).buckets(_state_dict(), version=1))
    dtypes = {name: t.dtype for b in buckets for name, t in b.tensors()}
    assert dtypes["a.weight"] == torch.bfloat16 and dtypes["e.int"] == torch.int64


def test_sender_refuses_stale_version_and_duplicates():
    sender = WeightSender()
    list(sender.buckets(_state_dict(), version=3))
    with pytest.raises(WeightSyncError, match="strictly increase"):
        list(sender.buckets(_state_dict(), version=3))
    pairs = [("x", torch.zeros(2)), ("x", torch.ones(2))]
    with pytest.raises(WeightSyncError, match="appears twice"):
        list(WeightSender().buckets(pairs, version=1))


def test_session_accepts_a_complete_version():
    sd = _state_dict()
    session = WeightUpdateSession(_manifest(sd), serving_version=0, version=1)
    for b in WeightSender(bucket_bytes=16_000).buckets(sd, 1):
        session.accept(b)
    session.finish()
    assert session.bytes > 0


def _run(manifest, buckets, serving=0, version=1):
    session = WeightUpdateSession(manifest, serving, version)
    for b in buckets:
        session.accept(b)
    session.finish()


def test_session_refuses_each_broken_invariant():
    sd = _state_dict()
    manifest = _manifest(sd)
    with pytest.raises(WeightSyncError, match="left 1 parameters out"):
        _run(manifest, WeightSender().buckets({k: v for k, v in sd.items() if k != "b.bias"}, 1))
    with pytest.raises(WeightSyncError, match="serves no parameter named 'zzz'"):
        _run(manifest, WeightSender().buckets({**sd, "zzz": torch.zeros(1)}, 1))
    with pytest.raises(WeightSyncError, match="arrived as float32"):
        _run(manifest, WeightSender().buckets({**sd, "c.weight": sd["c.weight"].float()}, 1))
    with pytest.raises(WeightSyncError, match=r"float32\[7, 1\]"):
        _run(manifest, WeightSender().buckets({**sd, "b.bias": sd["b.bias"].view(7, 1)}, 1))
    with pytest.raises(WeightSyncError, match="not above the version being served"):
        _run(manifest, WeightSender().buckets(sd, 2), serving=2, version=2)
    buckets = list(WeightSender(bucket_bytes=16_000).buckets(sd, 1))
    with pytest.raises(WeightSyncError, match="expected bucket 1"):
        _run(manifest, [buckets[0], buckets[2]])
    with pytest.raises(WeightSyncError, match="last bucket never arrived"):
        _run(manifest, buckets[:-1])
    with pytest.raises(WeightSyncError, match="sent twice"):
        _run(manifest, [buckets[0], dataclasses.replace(buckets[0], index=1)])
    with pytest.raises(WeightSyncError, match="version 2 arrived"):
        _run(manifest, WeightSender().buckets(sd, 2), version=1)


def test_aliases_are_dropped_and_optional():
    sd = _state_dict()
    manifest = ParamManifest(_manifest(sd).params, aliases={"lm_head.weight": "a.weight"})
    session = WeightUpdateSession(manifest, 0, 1)
    names = []
    for b in WeightSender().buckets({**sd, "lm_head.weight": sd["a.weight"]}, 1):
        names += [n for n, _ in session.accept(b).tensors()]
    session.finish()
    assert "lm_head.weight" not in names and "a.weight" in names
    _run(manifest, WeightSender().buckets(sd, 1))  # alias absent: fine too
    untied = {**sd, "lm_head.weight": sd["a.weight"] + 1e-3}
    with pytest.raises(WeightSyncError, match="differs from 'a.weight'"):
        _run(manifest, WeightSender(bucket_bytes=16_000).buckets(untied, 1))


def test_probe_gap_and_tolerance():
    assert probe_logprob_gap([[-1.0, -2.0]], [[-1.0, -2.5]]) == pytest.approx(0.5)
    assert probe_logprob_gap([[-1.0, float("nan")]], [[-1.0, -2.0]]) == math.inf
    with pytest.raises(ValueError, match="scored 2 tokens"):
        probe_logprob_gap([[-1.0, -2.0]], [[-1.0]])
    assert check_probe([[-1.0]], [[-1.0 - 1e-5]], version=1) == pytest.approx(1e-5)
    with pytest.raises(WeightSyncProbeError, match="version 4"):
        check_probe([[-1.0]], [[-1.01]], version=4)
    # bf16 engines get a looser bound than fp32
    assert PROBE_TOLERANCE[torch.bfloat16] > PROBE_TOLERANCE[torch.float32]
    check_probe([[-1.0]], [[-1.01]], version=4, dtype=torch.bfloat16)


def test_sampling_config_rejects_bad_values():
    assert SamplingConfig(n=4, temperature=0.0).n == 4
    for bad in ({"n": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_tokens": 0}):
        with pytest.raises(ValueError, match="rollout.sampling"):
            SamplingConfig(**bad)


def test_read_only_payloads_are_read_without_a_copy_or_a_warning():
    """Buckets from Ray's object store arrive as read-only NumPy arrays: the views and fingerprint
    read them in place, and torch's not-writable warning does not reach the worker's log."""
    import warnings

    import numpy as np

    from posttrain.weight_sync import as_tensor, payload_fingerprint

    payload = np.arange(256, dtype=np.uint8)
    payload.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        flat = as_tensor(payload)
        assert payload_fingerprint(payload) == payload_fingerprint(torch.arange(256, dtype=torch.uint8))
    assert flat.data_ptr() == payload.ctypes.data  # a view, not a copy
