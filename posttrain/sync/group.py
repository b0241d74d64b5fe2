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
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class GroupInfo:
    """Where and how to join one model-update group (picklable, handed out by the driver)."""

    host: str
    port: int
    prefix: str  # a fresh one per membership: "update0", "update1", ...
    world_size: int  # 1 sender + the ranks of every receiving worker
    backend: str = "gloo"  # "gloo" (CPU tensors) or "nccl" (CUDA tensors)
    timeout_s: float = 1800.0  # every collective of the group gives up after this

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


class UpdateStore:
    """The rendezvous store of a run's update groups, hosted by the driver on ``host``."""

    def __init__(self, host: str, timeout_s: float = 1800.0) -> None:
        self.host = host
        self._store = dist.TCPStore(
            host, 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s)
        )
        self.port = self._store.port
        self._count = 0

    def next_group(self, world_size: int, backend: str, timeout_s: float) -> GroupInfo:
        info = GroupInfo(self.host, self.port, f"update{self._count}", world_size, backend, timeout_s)
        self._count += 1
        return info


class UpdateGroup:
    """This process's membership of one update group; ``broadcast`` from rank 0 (the sender)."""

    def __init__(self, info: GroupInfo, rank: int) -> None:
        if not 0 <= rank < info.world_size:
            raise ValueError(f"update group rank {rank} outside [0, {info.world_size})")
        self.info, self.rank = info, rank
        timeout = datetime.timedelta(seconds=info.timeout_s)
        store = dist.TCPStore(info.host, info.port, is_master=False, timeout=timeout)
        prefixed = dist.PrefixStore(info.prefix, store)
        if info.backend == "gloo":
            self._pg = dist.ProcessGroupGloo(prefixed, rank, info.world_size, timeout)
        elif info.backend == "nccl":
            nccl = dist.ProcessGroupNCCL  # only in CUDA builds of torch
            opts = nccl.Options()
            opts._timeout = timeout
            self._pg = nccl(prefixed, rank, info.world_size, opts)
        else:
            raise ValueError(f"update group backend {info.backend!r}: use gloo or nccl")

    @property
    def device(self) -> torch.device:
        return self.info.device

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
