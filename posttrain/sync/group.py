"""The model-update process group: one sending trainer rank + every rank of every rollout worker.

    driver (publisher)          UpdateStore: a TCPStore it hosts (port chosen by the OS), one per run
      └─ hands out GroupInfo(host, port, prefix, world_size, backend, timeout_s)
    trainer rank 0              UpdateGroup.join(info, rank=0)          the sender
    rollout worker i, TP rank t UpdateGroup.join(info, rank=offset_i + t)

The group is separate from the trainer's FSDP group and from vLLM's own groups: it is built
from a backend object (``ProcessGroupGloo`` / ``ProcessGroupNCCL``) over a prefix of the store,
not with ``init_process_group``, so it never touches the default group of a process. Every
membership change (a worker replaced, a trainer restart) gets a fresh ``prefix`` on the same
store: members simply join again. Backend: ``gloo`` on CPU, ``nccl`` on GPU; the code is the same.
A third backend, ``ipc`` (:mod:`posttrain.sync.ipc`), is no process group at all: a trainer rank
hands buckets to the engine that shares its device by memory handles (CUDA IPC on GPU, shared
memory files on CPU), with the same messages; :func:`join` picks the class.

Each member captures its device when it joins (:func:`posttrain.sync.device.capture`, in the
joining thread), because CUDA's current device is per thread. NCCL refuses two ranks on one GPU
("Duplicate GPU detected", after every member already blocked in the rendezvous); an ``nccl``
group therefore checks its members' (node, device) through the store first and names the fix.
"""

from __future__ import annotations

import datetime
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from posttrain.sync.device import Device, capture
from posttrain.weight_sync import WeightSyncError


@dataclass(frozen=True)
class GroupInfo:
    """Where and how to join one model-update group (picklable, handed out by the driver)."""

    host: str
    port: int
    prefix: str  # a fresh one per membership: "update0", "update1", ...
    world_size: int  # 1 sender + the ranks of every receiving worker
    backend: str = "gloo"  # "gloo" (CPU tensors), "nccl" (CUDA tensors) or "ipc" (posttrain.sync.ipc)
    timeout_s: float = 1800.0  # every collective of the group gives up after this
    device_kind: str = "cpu"  # ipc: "cuda" (CUDA IPC handles) or "cpu" (shared-memory files)

    @property
    def kind(self) -> str:
        """The kind of device the group's payloads live on."""
        return "cuda" if self.backend == "nccl" else "cpu" if self.backend == "gloo" else self.device_kind


class UpdateStore:
    """The rendezvous store of a run's update groups, hosted by the driver on ``host``."""

    def __init__(self, host: str, timeout_s: float = 1800.0) -> None:
        self.host = host
        self._store = dist.TCPStore(
            host, 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s)
        )
        self.port = self._store.port
        self._count = 0

    def next_group(self, world_size: int, backend: str, timeout_s: float, device_kind: str = "cpu") -> GroupInfo:
        info = GroupInfo(self.host, self.port, f"update{self._count}", world_size, backend, timeout_s, device_kind)
        self._count += 1
        return info

    def abort(self, info: GroupInfo) -> None:
        """Flag ``info``'s group as given up: an ipc member waiting on it raises instead of waiting
        out its timeout (a process group's own abort reaches its peers by closing sockets)."""
        self._store.set(f"{info.prefix}/abort", b"1")


def join(info: GroupInfo, rank: int, device: Device | None = None):
    """This process's member of the group ``info`` (an :class:`UpdateGroup`, or an
    :class:`~posttrain.sync.ipc.IpcGroup` for ``backend="ipc"``); ``device``: captured here if None."""
    if info.backend == "ipc":
        from posttrain.sync.ipc import IpcGroup

        return IpcGroup(info, rank, device)
    return UpdateGroup(info, rank, device)


def node_id() -> str:
    return socket.gethostname()


def device_id(device: Device) -> str:
    """What tells one physical device from another on a node (a GPU's UUID; the index on a fake)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return str(torch.cuda.get_device_properties(device.torch_device).uuid)
    return f"{device.type}:{device.index}"


def check_distinct_devices(store, rank: int, world_size: int, device: Device, timeout_s: float) -> None:
    """NCCL's rule, checked before NCCL sees it: every member on its own (node, device). Each member
    posts its own and reads everyone's; raises WeightSyncError naming the fix on a duplicate."""
    me = f"{node_id()}|{device_id(device)}"
    store.set(f"members/{rank}", me)
    deadline = time.monotonic() + timeout_s
    keys = [f"members/{r}" for r in range(world_size)]
    while not store.check(keys):
        if time.monotonic() > deadline:
            raise WeightSyncError(f"update group: not every member joined within {timeout_s:g} s")
        time.sleep(0.01)
    seen: dict[str, int] = {}
    for r in range(world_size):
        where = store.get(f"members/{r}").decode()
        if where in seen:
            node, dev = where.split("|", 1)
            raise WeightSyncError(
                f"update group ranks {seen[where]} and {r} are both on device {dev} of node {node}: NCCL allows one rank per "
                "GPU in a communicator (a colocated trainer rank and rollout worker share one).\n"
                "  fix: set sync.transport=ipc (CUDA IPC hand-off, the default for colocated placement on GPU), "
                "or cluster.placement=disaggregated"
            )
        seen[where] = r


# The NCCL process-group class (CUDA builds of torch only); tests swap in a fake that refuses what NCCL refuses.
_NCCL = getattr(dist, "ProcessGroupNCCL", None)


class UpdateGroup:
    """This process's membership of one update group; ``broadcast`` from rank 0 (the sender)."""

    def __init__(self, info: GroupInfo, rank: int, device: Device | None = None) -> None:
        if not 0 <= rank < info.world_size:
            raise ValueError(f"update group rank {rank} outside [0, {info.world_size})")
        self.info, self.rank = info, rank
        self.device = device if device is not None else capture(info.kind)  # in the joining thread
        timeout = datetime.timedelta(seconds=info.timeout_s)
        store = dist.TCPStore(info.host, info.port, is_master=False, timeout=timeout)
        prefixed = dist.PrefixStore(info.prefix, store)
        if info.backend == "gloo":
            self._pg = dist.ProcessGroupGloo(prefixed, rank, info.world_size, timeout)
        elif info.backend == "nccl":
            if _NCCL is None:
                raise ValueError("update group backend nccl needs a CUDA build of torch")
            check_distinct_devices(prefixed, rank, info.world_size, self.device, info.timeout_s)
            self.device.make_current()  # NCCL binds the communicator to the current device
            opts = _NCCL.Options()
            opts._timeout = timeout
            self._pg = _NCCL(prefixed, rank, info.world_size, opts)
        else:
            raise ValueError(f"update group backend {info.backend!r}: use gloo, nccl or ipc")

    def broadcast(self, tensor: torch.Tensor, async_op: bool = False):
        """Rank 0's ``tensor`` into every rank's ``tensor`` (same shape and dtype); a Work if async."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        work = self._pg.broadcast([tensor], opts)
        if async_op:
            return work
        work.wait()
        return None

    def abort(self) -> None:
        """Drop the group at once (its peers' pending operations fail instead of waiting)."""
        pg, self._pg = getattr(self, "_pg", None), None
        if pg is not None:
            pg.abort() if hasattr(pg, "abort") else pg.shutdown()

    def close(self) -> None:
        pg, self._pg = getattr(self, "_pg", None), None
        if pg is not None and hasattr(pg, "shutdown"):
            pg.shutdown()
