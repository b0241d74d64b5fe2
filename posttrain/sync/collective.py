"""One policy version over the model-update group, bucket by bucket.

    every trainer rank   for (name, tensor) in the model's state dict (fixed order):
                             full = tensor.full_tensor()            FSDP2 all-gather of one tensor
    trainer rank 0           copy (cast to the wire dtype) into the open bucket's payload;
                             bucket full -> wait for the previous bucket's send, send this one
                             (async) and open the next: two buckets alive at most
    every receiver rank  receive_version(group, on_bucket): header, payload -> on_bucket(bucket)
                             (check it, load it into the engine) while the sender gathers on
                             and a receiving thread takes in the next bucket

Messages, all broadcast from rank 0: ``head = int64[3] (kind, header bytes, payload bytes)``,
the JSON header (version, index, tensor metas, fingerprint), then the payload (``uint8``, on the
group's device: host memory for gloo, the GPU for nccl). The version ends with an END message
carrying the tensor count, which the receiver turns into the last (empty) bucket so that
``WeightUpdateSession`` checks coverage exactly as on the object-store path.

A receiver whose check fails keeps receiving (without loading) until END and then raises, so
the sender never blocks on a receiver that gave up.

Devices and streams (``posttrain.sync.device``; no-ops on CPU): the receiving thread first makes
the device captured at join current (the current device is per thread), and receives on a
stream of its own. Each payload is handed to the loader with an event recorded on that stream,
which the loader's stream waits on before it reads a byte. After the loader returns, an event
recorded on its stream fences the pooled buffer: the receiving stream waits on it before the
buffer is written again, so queued reads of the previous bucket never see the next one.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from posttrain.sync.device import Device, Event
from posttrain.sync.group import UpdateGroup
from posttrain.weight_sync import (
    TensorMeta,
    WeightBucket,
    WeightSyncError,
    dtype_name,
    fold_digest,
    payload_fingerprint,
)

_ALIGN = 64  # bytes, as in posttrain.weight_sync: every typed view stays aligned
_BUCKET, _END = 1, 2


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _bytes_tensor(data: bytes, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)


def _use_count(buffer: torch.Tensor) -> int:
    count = getattr(torch._C, "_storage_Use_Count", None)
    return count(buffer.untyped_storage()._cdata) if count is not None else -1


class BufferPool:
    """Up to ``size`` payload buffers of ``capacity`` bytes, reused across buckets and versions.

    A fresh host allocation of a bucket page-faults on its first touch (27 ms for 64 MiB on
    this CPU, four times the copy that fills it); a reused one does not, on either side of the
    transfer. A buffer is handed out again only once nothing else holds a view of it: the
    sender's in-flight payload, or a receiving engine that keeps views of a bucket until a
    layer's last tensor arrives (vLLM's layerwise reload does). A request larger than
    ``capacity`` (a tensor bigger than a bucket) gets a fresh buffer that is not kept.
    """

    def __init__(self, device: Device, capacity: int, size: int = 2,
                 alloc: Callable[[int], torch.Tensor] | None = None) -> None:  # fmt: skip
        self.device, self.capacity, self.size = device, _aligned(capacity), size
        self._alloc = alloc if alloc is not None else device.empty  # ipc senders: exportable memory
        self._buffers: list[tuple[torch.Tensor, int]] = []  # (buffer, its use count with no views)
        self._fences: dict[int, Event] = {}  # buffer address -> event after its last reader

    def owns(self, payload: torch.Tensor) -> bool:
        """``payload`` is one of the kept buffers (or a view at its start)."""
        return any(buffer.data_ptr() == payload.data_ptr() for buffer, _ in self._buffers)

    def fence(self, payload: torch.Tensor, event: Event) -> None:
        """``payload`` (a kept buffer, or a view at its start) was read by work before ``event``:
        the buffer is written again only after a stream waited on it."""
        if self.owns(payload):
            self._fences[payload.data_ptr()] = event

    @property
    def bytes(self) -> int:
        """Bytes held by the pool between versions."""
        return sum(b.numel() for b, _ in self._buffers)

    def take(self, nbytes: int, stream: object = None) -> torch.Tensor:
        """A ``uint8`` tensor of ``nbytes`` (contents undefined), to be written on ``stream``."""
        if nbytes > self.capacity:
            return self._alloc(nbytes)
        for buffer, idle in self._buffers:
            if idle >= 0 and _use_count(buffer) == idle:
                fence = self._fences.pop(buffer.data_ptr(), None)
                if fence is not None:  # the last reader's queued work comes before this write
                    fence.wait(stream)
                return buffer[:nbytes]
        buffer = self._alloc(self.capacity)
        if len(self._buffers) < self.size:
            self._buffers.append((buffer, _use_count(buffer)))
        return buffer[:nbytes]


@dataclass
class SendStats:
    """What one version cost the sender: bytes, seconds, and the peak bytes it held."""

    version: int
    num_tensors: int = 0
    num_buckets: int = 0
    bytes: int = 0  # tensor bytes on the wire
    gather_s: float = 0.0  # materialising full tensors (FSDP all-gathers)
    pack_s: float = 0.0  # copying (and casting) into payloads
    wait_s: float = 0.0  # waiting for a previous bucket's send to finish
    fingerprint_s: float = 0.0  # payload_fingerprint of every bucket
    peak_bytes: int = 0  # payload buffers held (pooled ones even while idle) + the gathered tensor, at most
    fingerprints: list[int] = field(default_factory=list)

    @property
    def digest(self) -> int:
        return fold_digest(self.fingerprints)


class CollectiveSender:
    """Sends versions over an :class:`UpdateGroup` (trainer rank 0); other ranks only gather.

    Args:
        bucket_bytes: payload capacity of a bucket; a tensor larger than this gets a bucket of its own.
        wire_dtype: floating-point tensors are cast to this dtype while being packed (an fp32
            trainer feeding a bf16 engine); None keeps each tensor's dtype.
    """

    def __init__(self, bucket_bytes: int, wire_dtype: torch.dtype | None = None) -> None:
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.bucket_bytes, self.wire_dtype = bucket_bytes, wire_dtype
        self.last_version: int | None = None
        self.pool: BufferPool | None = None  # two payload buffers, kept from version to version
        self.pool_owner: object = None  # the group the pool's buffers were made for

    def send(
        self, group: UpdateGroup | None, tensors: Iterable[tuple[str, torch.Tensor]], version: int, restore: bool = False
    ) -> SendStats:
        """Gather every tensor (all ranks, same order) and, where ``group`` is given, send them.

        ``tensors`` yields ``(engine name, tensor)``; a DTensor is gathered here. Versions must
        increase unless ``restore`` (the trainer went back to a checkpoint).
        """
        if self.last_version is not None and version <= self.last_version and not restore:
            raise WeightSyncError(
                f"weight version {version} is not above the last version sent ({self.last_version}); "
                "versions must strictly increase (pass the trainer's step count + 1)"
            )
        self.last_version = version
        packer = _Packer(self, group, version)
        seen: set[str] = set()
        error: BaseException | None = None
        for name, tensor in tensors:
            if name in seen:
                raise WeightSyncError(f"parameter {name!r} appears twice in the state dict of version {version}")
            seen.add(name)
            t0 = time.perf_counter()
            full = getattr(tensor, "full_tensor", None)
            full = full() if callable(full) else tensor  # every rank, even after a failed send: gathers are collectives
            packer.stats.gather_s += time.perf_counter() - t0
            if group is not None and error is None:
                try:
                    packer.add(name, full.detach())
                except Exception as err:  # a receiver died: abort, so that the others stop waiting
                    error = err
                    group.abort()
        if error is None:
            try:
                return packer.finish()
            except Exception as err:
                error = err
                group.abort()
        raise WeightSyncError(f"sending weight version {version} over the update group failed: {error}") from error


class _Packer:
    """The open bucket of one version and the one in flight (rank 0 only)."""

    def __init__(self, sender: CollectiveSender, group: UpdateGroup | None, version: int) -> None:
        self.sender, self.group, self.version = sender, group, version
        self.stats = SendStats(version)
        if group is not None and (sender.pool is None or sender.pool.device != group.device or sender.pool_owner is not group):
            # ipc: buffers the receiver can map (a shared-memory file on CPU), from the group
            sender.pool = BufferPool(group.device, sender.bucket_bytes, alloc=getattr(group, "empty", None))
            sender.pool_owner = group
        self.pool = sender.pool
        self.payload: torch.Tensor | None = None
        self.metas: list[TensorMeta] = []
        self.cursor = 0
        self.inflight: tuple[object, torch.Tensor] | None = None  # (work, payload)

    def _alive(self) -> int:
        # the pool's buffers count while idle; an oversized (unpooled) payload on top of them
        alive = self.pool.bytes
        for payload in (self.payload, None if self.inflight is None else self.inflight[1]):
            if payload is not None and payload.numel() > self.pool.capacity:
                alive += payload.numel()
        return alive

    def add(self, name: str, tensor: torch.Tensor) -> None:
        wire = self.sender.wire_dtype if self.sender.wire_dtype is not None and tensor.is_floating_point() else tensor.dtype
        nbytes = tensor.numel() * wire.itemsize
        if self.metas and self.cursor + nbytes > self.payload.numel():
            self._flush()
        if self.payload is None:
            self.payload = self.pool.take(_aligned(max(nbytes, self.sender.bucket_bytes)))
        self.stats.peak_bytes = max(self.stats.peak_bytes, self._alive() + tensor.numel() * tensor.element_size())
        t0 = time.perf_counter()
        view = self.payload[self.cursor : self.cursor + nbytes].view(wire).view(tensor.shape)
        view.copy_(tensor)  # casts to the wire dtype and moves to the group's device in one pass
        self.stats.pack_s += time.perf_counter() - t0
        self.metas.append(TensorMeta(name, dtype_name(wire), tuple(tensor.shape), self.cursor, nbytes))
        self.cursor = _aligned(self.cursor + nbytes)
        self.stats.bytes += nbytes
        self.stats.num_tensors += 1

    def _wait(self) -> None:
        if self.inflight is not None:
            t0 = time.perf_counter()
            self.inflight[0].wait()
            self.stats.wait_s += time.perf_counter() - t0
            self.inflight = None

    def _header(self, kind: int, header: dict, payload_bytes: int) -> None:
        data = json.dumps(header).encode()
        device = self.group.device.torch_device
        self.group.broadcast(torch.tensor([kind, len(data), payload_bytes], dtype=torch.int64, device=device))
        self.group.broadcast(_bytes_tensor(data, device))

    def _flush(self) -> None:
        payload = self.payload[: self.cursor]
        t0 = time.perf_counter()
        fingerprint = payload_fingerprint(payload)
        self.stats.fingerprint_s += time.perf_counter() - t0
        self.stats.fingerprints.append(fingerprint)
        metas = [[m.name, m.dtype, list(m.shape), m.offset, m.nbytes] for m in self.metas]
        self._wait()  # messages go out in order: the previous payload first
        header = {"version": self.version, "index": self.stats.num_buckets, "metas": metas, "fingerprint": fingerprint,
                  "capacity": self.pool.capacity}  # fmt: skip
        self._header(_BUCKET, header, payload.numel())
        self.inflight = (self.group.broadcast(payload, async_op=True), self.payload)
        self.stats.num_buckets += 1
        self.payload, self.metas, self.cursor = None, [], 0

    def finish(self) -> SendStats:
        if self.group is None:
            return self.stats
        if self.metas:
            self._flush()
        self._wait()
        end = {"version": self.version, "index": self.stats.num_buckets, "total_tensors": self.stats.num_tensors}
        self._header(_END, end, 0)
        return self.stats


def receive_version(
    group: UpdateGroup, on_bucket: Callable[[WeightBucket], None], pools: dict[str, BufferPool] | None = None
) -> int:
    """Receive one version, calling ``on_bucket`` for each bucket (the last one empty, with
    ``is_last`` and ``total_tensors``); returns the number of buckets. If ``on_bucket`` raises,
    the rest of the version is received and dropped, then the error is raised.

    A thread receives bucket k+1 while ``on_bucket`` loads bucket k in the calling thread (at
    most two payloads alive: the one loading and the one arriving). ``pools``: the caller's
    ``{}`` kept from version to version; payloads are received into a :class:`BufferPool` there
    (sized by the sender's bucket capacity) instead of fresh buffers."""
    slots = threading.Semaphore(2)  # payloads alive on this receiver
    arrived: queue.Queue[tuple[WeightBucket, Event, BufferPool | None] | BaseException] = queue.Queue()
    device: Device = group.device
    consumer = device.current_stream()  # the loader's stream (vLLM's, in this thread)
    receiver = threading.Thread(target=_receive_all, args=(group, pools, slots, arrived, consumer), daemon=True,
                                name="posttrain-receive-version")  # fmt: skip
    receiver.start()
    error: BaseException | None = None
    count = 0
    try:
        while True:
            item = arrived.get()
            if isinstance(item, BaseException):  # the transport failed: nothing more will arrive
                raise item
            bucket, ready, pool = item
            count += 1
            ready.wait(consumer)  # the payload landed (on the receiving stream) before we read it
            if error is None:
                try:
                    on_bucket(bucket)
                except BaseException as err:  # keep the sender unblocked: drain to END, then raise
                    error = err
            if pool is not None:  # the loader's queued reads of this buffer come before its next write
                done = device.new_event()
                done.record(consumer)
                pool.fence(bucket.payload, done)
            is_last = bucket.is_last
            del bucket, item  # the payload's views go before its slot does
            slots.release()
            if is_last:
                break
    finally:
        receiver.join()
    if error is not None:
        raise error
    return count


def _receive_all(group: UpdateGroup, pools: dict[str, BufferPool] | None, slots: threading.Semaphore,
                 arrived: queue.Queue, consumer: object) -> None:  # fmt: skip
    """The receiving thread of :func:`receive_version`: every message of one version, in order,
    on the device captured at join (made current here: a new thread has its own) and a stream
    of its own."""
    device: Device = group.device
    try:
        device.make_current()
        comm = device.new_stream()
        with device.use_stream(comm):
            while True:
                head = torch.zeros(3, dtype=torch.int64, device=device.torch_device)
                group.broadcast(head)
                kind, header_len, payload_len = (int(x) for x in head.tolist())
                raw = torch.empty(header_len, dtype=torch.uint8, device=device.torch_device)
                group.broadcast(raw)
                header = json.loads(bytes(raw.cpu().numpy()))
                slots.acquire()
                if kind == _END:
                    end = WeightBucket(header["version"], header["index"], [], torch.empty(0, dtype=torch.uint8),
                                       is_last=True, total_tensors=header["total_tensors"])  # fmt: skip
                    arrived.put((end, device.new_event(), None))
                    return
                capacity = header.get("capacity", 0)
                pool = None
                if pools is not None and capacity:
                    pool = pools.get("payload")
                    if pool is None or pool.capacity != capacity or pool.device != device:
                        pool = pools["payload"] = BufferPool(device, capacity)
                    payload = pool.take(payload_len, comm)
                else:
                    payload = device.empty(payload_len)
                if pool is None or not pool.owns(payload):
                    device.keep_for(payload, consumer)  # a fresh buffer is freed by the loader's thread, read on its stream
                group.broadcast(payload)
                ready = device.new_event()
                ready.record(comm)
                metas = [TensorMeta(n, d, tuple(s), o, b) for n, d, s, o, b in header["metas"]]
                bucket = WeightBucket(header["version"], header["index"], metas, payload, fingerprint=header["fingerprint"])
                arrived.put((bucket, ready, pool))
                del payload, bucket
    except BaseException as err:
        arrived.put(err)
