"""The collective weight path on real gloo process groups (no Ray, no vLLM): a sender and two
receivers in spawned processes, checked with the same WeightUpdateSession as the object store.
The contract tests also run over ``ipc`` (posttrain/sync/ipc.py: shared-memory handles on CPU,
the code path of CUDA IPC), which must pass exactly what gloo passes."""

from __future__ import annotations

import io
import multiprocessing as mp

import pytest
import torch
from posttrain.rollout.weight_receiver import ParamManifest, WeightUpdateSession

from posttrain.sync.collective import CollectiveSender, receive_version
from posttrain.sync.device import Device
from posttrain.sync.group import UpdateStore, join
from posttrain.weight_sync import WeightSender, WeightSyncError


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(64, 32, generator=g),
        "layers.0.w": torch.randn(32, 48, generator=g),
        "layers.0.b": torch.randn(48, generator=g),
        "layers.1.w": torch.randn(300, 300, generator=g),  # 360 kB: larger than a bucket
        "head.weight": torch.randn(16, 32, generator=g),
    }


def _receiver(info, rank, wire, corrupt, queue) -> None:
    torch.set_num_threads(1)
    manifest = ParamManifest({n: _spec(t, wire) for n, t in _state(0).items()})
    group = join(info, rank)
    got: dict[str, torch.Tensor] = {}
    session = WeightUpdateSession(manifest, 0, 1)

    def on_bucket(bucket):
        if corrupt and bucket.index == 1:
            bucket.payload[0] ^= 1  # one flipped bit in transit
        for name, t in session.accept(bucket).tensors():
            got[name] = t.clone()

    try:
        receive_version(group, on_bucket)
        session.finish()
        # by value (torch.save bytes): a tensor on an mp queue travels as a file descriptor that
        # needs this process alive until the parent reads it
        queue.put((rank, _to_bytes(got), session.digest, None))
    except WeightSyncError as err:
        queue.put((rank, {}, None, str(err)))


def _to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def _from_bytes(data: bytes | dict) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(data), weights_only=True) if isinstance(data, bytes) else data


def _spec(t, wire):
    from posttrain.rollout.weight_receiver import ParamSpec

    return ParamSpec(wire or t.dtype, tuple(t.shape))


def _run(wire: torch.dtype | None, corrupt: bool = False, bucket_bytes: int = 16 << 10, backend: str = "gloo"):
    ctx = mp.get_context("spawn")
    store = UpdateStore("127.0.0.1", timeout_s=60)
    info = store.next_group(world_size=3, backend=backend, timeout_s=60)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(info, r, wire, corrupt and r == 2, queue)) for r in (1, 2)]
    for p in procs:
        p.start()
    group = join(info, 0)
    stats = CollectiveSender(bucket_bytes, wire).send(group, _state(0).items(), version=1)
    out = {}
    for _ in procs:
        rank, tensors, digest, err = queue.get(timeout=60)
        out[rank] = (_from_bytes(tensors), digest, err)
    for p in procs:
        p.join(timeout=30)
    stats.handles = getattr(group, "handles", 0)  # ipc: payloads handed over as shared-memory handles
    return stats, out


@pytest.mark.parametrize("backend", ["gloo", "ipc"])
def test_two_receivers_get_every_tensor_exactly_and_the_same_digest(backend):
    stats, out = _run(wire=None, backend=backend)
    want = _state(0)
    for rank in (1, 2):
        tensors, digest, err = out[rank]
        assert err is None and set(tensors) == set(want)
        assert all(torch.equal(tensors[n], want[n]) for n in want)
        assert digest == stats.digest
    # the same bytes packed for the object store give the same per-bucket fingerprints only when
    # the buckets are the same; the digest must at least differ from another version's
    assert stats.num_buckets >= 3 and stats.bytes == sum(t.numel() * 4 for t in want.values())
    # at most two buckets alive: the open one and the one in flight (the big tensor is its own bucket)
    big = 300 * 300 * 4
    assert stats.peak_bytes <= 2 * max(16 << 10, big) + big
    if backend == "ipc":  # payloads of >= 4 KiB go by handle: [embed, layers.0.*] and [layers.1.w]; [head] (2 KiB) inline
        assert stats.num_buckets == 3 and stats.handles == 2


def test_fp32_sender_feeds_a_bf16_receiver():
    stats, out = _run(wire=torch.bfloat16)
    tensors, digest, err = out[1]
    assert err is None and digest == stats.digest
    for name, t in _state(0).items():
        assert tensors[name].dtype == torch.bfloat16 and torch.equal(tensors[name], t.to(torch.bfloat16))


@pytest.mark.parametrize("backend", ["gloo", "ipc"])
def test_a_corrupted_bucket_is_refused_and_the_sender_is_not_left_hanging(backend):
    stats, out = _run(wire=None, corrupt=True, backend=backend)
    assert out[2][2] is not None and "bucket 1" in out[2][2] and "corrupted" in out[2][2]
    assert out[1][2] is None  # the other receiver got the whole version


def test_fingerprint_sees_a_tiny_update():
    sd = _state(0)
    sender = WeightSender(bucket_bytes=1 << 20)
    a = [b.fingerprint for b in sender.buckets(sd, 1)]
    sd["layers.0.w"][3, 4] += 1e-6  # an AdamW step at lr 1e-6 moves a weight this much
    b = [b.fingerprint for b in sender.buckets(sd, 2)]
    assert a != b


def test_versions_must_increase_unless_restoring():
    sender = CollectiveSender(1 << 20)
    sender.send(None, _state(0).items(), 2)
    with pytest.raises(WeightSyncError, match="not above"):
        sender.send(None, _state(0).items(), 2)
    sender.send(None, _state(0).items(), 1, restore=True)


def test_buffer_pool_reuses_a_buffer_only_once_nothing_holds_a_view():
    from posttrain.sync.collective import BufferPool

    pool = BufferPool(Device(torch.device("cpu")), capacity=1000, size=2)
    a = pool.take(640)
    view = a[64:128].view(torch.float32)  # an engine keeping a view of the bucket
    del a
    b = pool.take(1000)
    assert b.data_ptr() != view.data_ptr() - 64  # the held buffer is not handed out again
    del b
    c = pool.take(512)
    assert c.data_ptr() != view.data_ptr() - 64 and len(pool._buffers) == 2
    del c
    d = pool.take(2000)  # larger than a bucket: a fresh buffer, not kept
    assert d.numel() == 2000 and pool.bytes == 2 * pool.capacity
    del view
    e = pool.take(100)
    assert e.data_ptr() in {buf.data_ptr() for buf, _ in pool._buffers}


def _holding_receiver(info, queue) -> None:
    torch.set_num_threads(1)
    group = join(info, 1)
    pools: dict = {}
    held: dict[str, torch.Tensor] = {}  # views of EVERY bucket until the version ends (vLLM's layerwise reload may)
    receive_version(group, lambda bucket: held.update(bucket.tensors()), pools)
    first = all(torch.equal(held[n], t) for n, t in _state(0).items())
    ptrs = {buf.data_ptr() for buf, _ in pools["payload"]._buffers}
    held.clear()
    pooled: list[bool] = []

    def keep_one(bucket):
        pooled.append(bucket.payload.data_ptr() in ptrs)
        held.update((n, t.clone()) for n, t in bucket.tensors())

    receive_version(group, keep_one, pools)
    second = all(torch.equal(held[n], t) for n, t in _state(1).items())
    queue.put((first, second, sum(pooled), len(pooled)))


@pytest.mark.parametrize("backend", ["gloo", "ipc"])
def test_reused_receive_buffers_never_overwrite_a_bucket_still_held(backend):
    ctx = mp.get_context("spawn")
    store = UpdateStore("127.0.0.1", timeout_s=60)
    info = store.next_group(world_size=2, backend=backend, timeout_s=60)
    queue = ctx.Queue()
    proc = ctx.Process(target=_holding_receiver, args=(info, queue))
    proc.start()
    group = join(info, 0)
    sender = CollectiveSender(8 << 10)  # buckets: [embed] [layers.0.*] [layers.1.w: oversized] [head]
    first = sender.send(group, _state(0).items(), version=1)
    sender.send(group, _state(1).items(), version=2)
    held_ok, second_ok, pooled, buckets = queue.get(timeout=60)
    proc.join(timeout=30)
    assert first.num_buckets == 4 and held_ok and second_ok
    assert pooled == 3 and buckets == 5  # version 2 landed in the kept buffers (but the oversized bucket and END)
    assert sender.pool is not None and sender.pool.bytes == 2 * sender.pool.capacity  # two buckets, kept
