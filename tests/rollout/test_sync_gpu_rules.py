"""The GPU rules of the weight path (DESIGN.md, "GPU rules the code must obey"), played on CPU.

No GPU here, so each rule gets a fake that behaves as CUDA/NCCL would, and the real sender and
receiver code (posttrain/sync/collective.py, group.py, ipc.py) runs against it:

- a fake NCCL process group that refuses two ranks on one (node, device), as NCCL does;
- a fake GPU whose current device is per thread (a new thread starts on device 0), and a group
  that, like NCCL, works on the current device: the receiving thread must set the captured one;
- fake streams whose work runs only when an event orders it: a group whose receive returns before
  the payload lands, and a loader whose reads of its views are queued and run late. The loaded
  weights must equal what was sent.
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
import torch
from posttrain.rollout.weight_receiver import ParamManifest, ParamSpec, WeightUpdateSession

from posttrain.sync import group as group_mod
from posttrain.sync.collective import CollectiveSender, receive_version
from posttrain.sync.device import Device
from posttrain.sync.group import UpdateStore, join
from posttrain.weight_sync import WeightSyncError

_local = threading.local()  # the fake GPU's per-thread state: current device index and stream


class FakeStream:
    """Queued work that runs in order, only when an event recorded on it is waited on."""

    def __init__(self) -> None:
        self.ops: list[Callable[[], None]] = []
        self.done = 0
        self.kept: list[torch.Tensor] = []  # record_stream: freed memory stays until the queued work ran
        self.lock = threading.RLock()

    def enqueue(self, op: Callable[[], None]) -> None:
        with self.lock:
            self.ops.append(op)

    def run_until(self, n: int) -> None:
        with self.lock:
            while self.done < n:
                op, self.ops[self.done] = self.ops[self.done], _ran  # a finished op holds no tensor
                op()
                self.done += 1
            if self.done == len(self.ops):
                self.kept.clear()


def _ran() -> None:
    pass


class FakeEvent:
    def __init__(self) -> None:
        self.stream: FakeStream | None = None
        self.pos = 0

    def record(self, stream: FakeStream) -> None:
        self.stream, self.pos = stream, len(stream.ops)

    def wait(self, stream: FakeStream) -> None:  # the waiting stream's later work comes after ours: run ours first
        if self.stream is not None:
            self.stream.run_until(self.pos)

    def synchronize(self) -> None:
        self.wait(None)


class FakeGpu(Device):
    """Device ``index`` of a fake GPU (memory is host memory); current device and stream per thread."""

    def __init__(self, index: int) -> None:
        super().__init__(torch.device("cpu"))
        self._index = index

    @property
    def index(self) -> int:
        return self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FakeGpu) and other._index == self._index

    def __hash__(self) -> int:
        return self._index

    @staticmethod
    def current() -> int:
        return getattr(_local, "device", 0)  # CUDA: a thread starts on device 0

    def make_current(self) -> None:
        _local.device = self._index

    def new_stream(self) -> FakeStream:
        return FakeStream()

    def current_stream(self) -> FakeStream:
        if getattr(_local, "stream", None) is None:
            _local.stream = FakeStream()  # the thread's default stream
        return _local.stream

    @contextlib.contextmanager
    def use_stream(self, stream: FakeStream) -> Iterator[None]:
        before, _local.stream = getattr(_local, "stream", None), stream
        try:
            yield
        finally:
            _local.stream = before

    def new_event(self) -> FakeEvent:
        return FakeEvent()

    def keep_for(self, tensor: torch.Tensor, stream: FakeStream) -> None:
        stream.kept.append(tensor)  # record_stream: the memory lives until the stream's queued work ran


_STATE = {f"layers.{i}.w": torch.randn(32, 32, generator=torch.Generator().manual_seed(i)) for i in range(6)}
_BUCKET = 8 << 10  # two 4 KiB tensors a bucket: 3 buckets, so the receiver's 2 pooled buffers are reused


class _Recorder:
    """Sender side: the messages CollectiveSender broadcasts, with whether each was async (payloads)."""

    device = Device(torch.device("cpu"))

    def __init__(self) -> None:
        self.messages: list[tuple[torch.Tensor, bool]] = []

    def broadcast(self, tensor: torch.Tensor, async_op: bool = False):
        self.messages.append((tensor.clone(), async_op))
        return _NoWork() if async_op else None


class _NoWork:
    def wait(self) -> None:
        pass


class FakeAsyncGroup:
    """Receiver side of the fake NCCL: works on the calling thread's current device (wrong one:
    refused); a payload's copy is queued on the thread's current stream, so ``broadcast`` returns
    before the bytes land. Heads and headers land at once: the code reads them with a host sync."""

    def __init__(self, messages: list[tuple[torch.Tensor, bool]], device: FakeGpu) -> None:
        self.messages, self.device = iter(messages), device

    def broadcast(self, tensor: torch.Tensor, async_op: bool = False):
        if FakeGpu.current() != self.device.index:
            raise RuntimeError(f"NCCL: communicator of device {self.device.index} used on device {FakeGpu.current()}")
        data, deferred = next(self.messages)
        if deferred:
            self.device.current_stream().enqueue(lambda: tensor.copy_(data))
        else:
            tensor.copy_(data)


def _messages() -> list[tuple[torch.Tensor, bool]]:
    recorder = _Recorder()
    CollectiveSender(_BUCKET).send(recorder, _STATE.items(), version=1)
    return recorder.messages


def _late_reader(loaded: dict[str, torch.Tensor], stream: Callable[[], FakeStream]):
    """A loader that queues its reads of each view on its stream (as a GPU kernel would) and keeps
    no reference to the payload (a queued kernel holds none), so the pool may hand the buffer out."""

    def read_later(name: str, view: torch.Tensor) -> None:
        ptr, nbytes, dtype, shape = view.data_ptr(), view.numel() * view.element_size(), view.dtype, view.shape

        def op() -> None:
            raw = torch.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=torch.uint8)
            loaded[name] = raw.view(dtype).view(shape).clone()

        stream().enqueue(op)

    return read_later


def test_receive_thread_sets_the_captured_device_and_loads_exactly_what_was_sent():
    manifest = ParamManifest({n: ParamSpec(t.dtype, tuple(t.shape)) for n, t in _STATE.items()})
    gpu = FakeGpu(1)  # the worker's device, captured at join (here: given)
    gpu.make_current()  # the worker's main thread is on it; the receiving thread starts on device 0
    group = FakeAsyncGroup(_messages(), gpu)
    session = WeightUpdateSession(manifest, 0, 1)
    loaded: dict[str, torch.Tensor] = {}
    read_later = _late_reader(loaded, gpu.current_stream)

    def on_bucket(bucket):
        checked = session.accept(bucket)  # the fingerprint reads the payload now
        for name, view in checked.tensors():
            read_later(name, view)

    pools: dict = {}
    count = receive_version(group, on_bucket, pools)
    session.finish()
    # worst order for the late reads: all the communication first, then the loader's queued reads
    for stream in {id(s): s for s in _streams(gpu)}.values():
        stream.run_until(len(stream.ops))
    gpu.current_stream().run_until(len(gpu.current_stream().ops))
    assert count == 4 and pools["payload"].size == 2  # 3 buckets in 2 pooled buffers, + END
    assert set(loaded) == set(_STATE) and all(torch.equal(loaded[n], t) for n, t in _STATE.items())


def _streams(gpu: FakeGpu) -> list[FakeStream]:
    # the receiving thread's stream is gone with the thread; its queued work was already run by the
    # events (a copy nobody waited on would be a bug the comparison above catches)
    return [gpu.current_stream()]


class FakeNccl:
    """NCCL's constructor rule: one rank per (node, current device) in a communicator."""

    members: dict[int, tuple[str, int]] = {}

    class Options:
        _timeout = None

    def __init__(self, store, rank: int, world_size: int, opts) -> None:
        where = (socket.gethostname(), FakeGpu.current())  # NCCL binds to the current device
        if where in FakeNccl.members.values():
            raise RuntimeError("NCCL error: invalid usage (Duplicate GPU detected)")
        FakeNccl.members[rank] = where


def _join_all(info, devices: list[FakeGpu]) -> list[object]:
    out: list[object] = [None] * len(devices)

    def member(rank: int) -> None:
        try:
            out[rank] = join(info, rank, devices[rank])
        except Exception as err:  # noqa: BLE001 — the test inspects it
            out[rank] = err

    threads = [threading.Thread(target=member, args=(r,)) for r in range(len(devices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


def test_nccl_group_of_a_colocated_pair_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(group_mod, "_NCCL", FakeNccl)
    FakeNccl.members = {}
    store = UpdateStore("127.0.0.1", timeout_s=30)
    # trainer rank 0 and its colocated rollout worker: one GPU
    out = _join_all(store.next_group(2, "nccl", 30), [FakeGpu(0), FakeGpu(0)])
    assert all(isinstance(e, WeightSyncError) and "sync.transport=ipc" in str(e) for e in out), out
    assert FakeNccl.members == {}  # refused before NCCL saw it (NCCL would hang the other rank first)
    # disaggregated: one GPU each, the communicator is built, each on its own device
    out = _join_all(store.next_group(2, "nccl", 30), [FakeGpu(0), FakeGpu(1)])
    assert not any(isinstance(e, Exception) for e in out), out
    assert sorted(d for _, d in FakeNccl.members.values()) == [0, 1]


def test_ipc_pair_on_one_device_builds_no_communicator_and_hands_bytes_over(monkeypatch):
    monkeypatch.setattr(group_mod, "_NCCL", FakeNccl)
    FakeNccl.members = {}
    store = UpdateStore("127.0.0.1", timeout_s=30)
    sender, receiver = _join_all(store.next_group(2, "ipc", 30), [FakeGpu(0), FakeGpu(0)])
    payload = sender.empty(64 << 10)
    payload.copy_(torch.randint(0, 255, (64 << 10,), dtype=torch.uint8))
    got = torch.zeros(64 << 10, dtype=torch.uint8)
    thread = threading.Thread(target=receiver.broadcast, args=(got,))
    thread.start()
    sender.broadcast(payload)  # returns once the receiver acknowledged its copy
    thread.join(timeout=30)
    assert torch.equal(got, payload) and sender.handles == 1 and FakeNccl.members == {}


def test_ipc_abort_stops_a_sender_waiting_for_a_receiver_that_is_gone():
    store = UpdateStore("127.0.0.1", timeout_s=30)
    info = store.next_group(2, "ipc", 30)
    sender = join(info, 0, Device(torch.device("cpu")))
    work = sender.broadcast(sender.empty(64 << 10), async_op=True)  # no receiver will ever ack
    store.abort(info)  # what the publisher does when a worker died mid-sync
    with pytest.raises(WeightSyncError, match="aborted"):
        work.wait()
