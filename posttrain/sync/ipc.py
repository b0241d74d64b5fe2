"""``sync.transport: ipc``: a trainer rank hands buckets to the engine that shares its device.

    trainer rank r (sender, rank 0 of its pair)        the colocated engine (rank 1 [+ TP ranks])
      payload in an exportable buffer  --handle-->       map the handle, copy into a pooled receive
      (CUDA: reduce_tensor; CPU: a /dev/shm file)          buffer on its own stream, wait, ack
      buffer reused only after every ack

NCCL refuses two ranks on one GPU, so a colocated trainer rank and engine cannot share a
communicator (DESIGN.md, GPU rules); peers hand weights over by CUDA IPC handles instead (vLLM
ships ``IPCWeightTransferEngine``, which keys each handle by the GPU's UUID and rebuilds it with
``rebuild_cuda_tensor`` on the receiver's device index; this does the same). :class:`IpcGroup`
has the interface of :class:`~posttrain.sync.group.UpdateGroup` (``broadcast``, ``device``,
``abort``, ``close``), so the sender (:class:`~posttrain.sync.collective.CollectiveSender`) and the
receiver (:func:`~posttrain.sync.collective.receive_version`) are the collective transport's own,
with its messages (head, JSON header, payload, END) and its bucket contract (version, order,
coverage, dtype, shape, fingerprint, digest), checked by the same ``WeightUpdateSession``.

Messages travel through the run's rendezvous store (a TCP store the driver hosts, under the
group's prefix), numbered in order: small ones (heads, headers) inline, payloads as a handle.
A payload message is acknowledged by every receiver once its copy finished; the sender's
``Work.wait`` returns then, and only then may the sender's pool reuse that buffer.

On CPU the handle is a shared-memory file (``/dev/shm``) that the sender's buffer pool allocated
(:meth:`IpcGroup.empty`), mapped by the receiver with ``torch.from_file(shared=True)``: the same
code path, so CI runs it. One device-local copy per bucket on the receiver keeps the sender's
buffer lifetime independent of how long the engine keeps views of a bucket.
"""

from __future__ import annotations

import collections
import datetime
import itertools
import os
import pickle
import tempfile
import time
import weakref
from typing import Any

import torch
import torch.distributed as dist

from posttrain.sync.device import Device, capture
from posttrain.sync.group import GroupInfo, device_id
from posttrain.weight_sync import WeightSyncError

# Messages below this many bytes (heads, JSON headers) travel inline in the store; payloads as handles.
INLINE_BYTES = 4 << 10
_POLL_S = 0.002  # how often a waiting member looks at the store (and at the abort flag)
_SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
_names = itertools.count()


def _shm_file(nbytes: int) -> tuple[str, torch.Tensor]:
    """A new shared-memory file of ``nbytes`` mapped as a ``uint8`` tensor; removed when the tensor goes."""
    path = os.path.join(_SHM_DIR, f"posttrain-ipc-{os.getpid()}-{next(_names)}")
    tensor = torch.from_file(path, shared=True, size=max(1, nbytes), dtype=torch.uint8)[:nbytes]
    weakref.finalize(tensor, _unlink, path)
    return path, tensor


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Acked:
    """The Work of a payload message: ``wait`` returns once every receiver acknowledged its copy."""

    def __init__(self, group: IpcGroup, seq: int, keep: list[Any]) -> None:
        self.group, self.seq, self.keep = group, seq, keep

    def wait(self) -> None:
        g = self.group
        keys = [f"a{self.seq}/{r}" for r in range(1, g.info.world_size)]
        g._wait_for(keys, f"the receivers' copy of message {self.seq}")
        # Every receiver acknowledged this message, so it read every earlier one too: drop them all.
        read = [s for s in g._inline if s < self.seq]
        g._inline = [s for s in g._inline if s > self.seq]
        for key in (f"m{self.seq}", *keys, *(f"m{s}" for s in read)):
            g._store.delete_key(key)
        self.keep.clear()  # the exported buffer (or a fresh shared-memory copy) may go now


class _Done:
    def wait(self) -> None:
        pass


class IpcGroup:
    """One trainer rank (rank 0, the sender) and the ranks of the engine on its device (1..).

    ``device``: this member's device, captured in the joining thread when None. On CUDA both
    sides must be on the same physical GPU (checked by UUID when a handle is mapped).
    """

    def __init__(self, info: GroupInfo, rank: int, device: Device | None = None) -> None:
        if not 0 <= rank < info.world_size:
            raise ValueError(f"update group rank {rank} outside [0, {info.world_size})")
        self.info, self.rank = info, rank
        self.device = device if device is not None else capture(info.kind)
        timeout = datetime.timedelta(seconds=info.timeout_s)
        self._store = dist.PrefixStore(info.prefix, dist.TCPStore(info.host, info.port, is_master=False, timeout=timeout))
        self._seq = 0
        self._inline: list[int] = []  # sender: inline messages not yet known to be read by every receiver
        self._shared: dict[int, tuple[str, int]] = {}  # CPU: storage address -> (file, bytes) of buffers from empty()
        self._mapped: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()  # CPU receiver: file -> map
        self._closed = False
        self.handles = 0  # messages handed over as handles (sender), for tests and stats

    # -- the buffers a sender exports ---------------------------------------------------------
    def empty(self, nbytes: int) -> torch.Tensor:
        """A ``uint8`` buffer the sender can export without a copy (CUDA: any device buffer;
        CPU: a shared-memory file). The sender's :class:`BufferPool` allocates through this."""
        if self.device.type == "cuda":
            return self.device.empty(nbytes)
        path, tensor = _shm_file(nbytes)
        self._shared[tensor.untyped_storage().data_ptr()] = (path, nbytes)
        weakref.finalize(tensor, self._shared.pop, tensor.untyped_storage().data_ptr(), None)
        return tensor

    def _export(self, tensor: torch.Tensor, keep: list[Any]) -> tuple:
        if tensor.is_cuda:
            from torch.multiprocessing.reductions import reduce_tensor

            _, args = reduce_tensor(tensor)
            keep.append(tensor)  # reduce_tensor's args do not keep the storage alive
            return ("cuda", device_id(self.device), args)
        base = tensor.untyped_storage().data_ptr()
        shared = self._shared.get(base)
        if shared is None:  # not from empty(): one copy into a fresh shared-memory file
            path, copy = _shm_file(tensor.numel())
            copy.copy_(tensor)
            keep.append(copy)
            return ("cpu", path, 0, tensor.numel(), tensor.numel())
        keep.append(tensor)
        return ("cpu", shared[0], tensor.data_ptr() - base, tensor.numel(), shared[1])

    def _import(self, handle: tuple) -> torch.Tensor:
        if handle[0] == "cuda":
            from torch.multiprocessing.reductions import rebuild_cuda_tensor

            _, uuid, args = handle
            if uuid != device_id(self.device):
                raise WeightSyncError(
                    f"sync.transport=ipc: the sender's GPU ({uuid}) is not this engine's ({device_id(self.device)}); "
                    "CUDA IPC hands weights only to an engine on the same GPU.\n  fix: cluster.placement=colocated with "
                    "rollout.num_workers <= trainer.world_size, or sync.transport=collective for disaggregated workers"
                )
            args = list(args)
            args[6] = self.device.index  # the sender's device index means nothing in this process
            return rebuild_cuda_tensor(*args)
        _, path, offset, nbytes, total = handle
        mapped = self._mapped.get(path)
        if mapped is None:
            mapped = self._mapped[path] = torch.from_file(path, shared=True, size=max(1, total), dtype=torch.uint8)
            while len(self._mapped) > 4:  # the sender's two pooled buffers, plus oversized ones passing through
                self._mapped.popitem(last=False)
        self._mapped.move_to_end(path)
        return mapped[offset : offset + nbytes]

    # -- messages -----------------------------------------------------------------------------
    def _wait_for(self, keys: list[str], what: str) -> None:
        deadline = time.monotonic() + self.info.timeout_s
        while not self._store.check(keys):
            if self._store.check(["abort"]):
                raise WeightSyncError(f"ipc update group {self.info.prefix}: aborted while waiting for {what}")
            if time.monotonic() > deadline:
                raise WeightSyncError(f"ipc update group {self.info.prefix}: no {what} within {self.info.timeout_s:g} s")
            time.sleep(_POLL_S)

    def broadcast(self, tensor: torch.Tensor, async_op: bool = False):
        """Rank 0's ``tensor`` into every rank's ``tensor`` (same shape and dtype); a Work if async."""
        if self._closed:
            raise WeightSyncError(f"ipc update group {self.info.prefix} is closed")
        seq, self._seq = self._seq, self._seq + 1
        raw = tensor.reshape(-1).view(torch.uint8)
        if self.rank == 0:
            if raw.numel() < INLINE_BYTES:
                self._store.set(f"m{seq}", b"I" + bytes(raw.cpu().numpy()))
                self._inline.append(seq)
                return _Done() if async_op else None
            keep: list[Any] = []
            handle = self._export(raw, keep)
            self.handles += 1
            self._store.set(f"m{seq}", b"H" + pickle.dumps(handle))
            work = _Acked(self, seq, keep)
            if async_op:
                return work
            work.wait()
            return None
        self._wait_for([f"m{seq}"], f"message {seq} from the sender")
        value = self._store.get(f"m{seq}")
        if value[:1] == b"I":
            raw.copy_(torch.frombuffer(bytearray(value[1:]), dtype=torch.uint8))
            return _Done() if async_op else None
        source = self._import(pickle.loads(value[1:]))
        raw.copy_(source)
        done = self.device.new_event()  # the copy ran on this thread's stream: finished before the ack
        done.record(self.device.current_stream())
        done.synchronize()
        del source  # CUDA: releases this process's reference to the sender's memory
        self._store.set(f"a{seq}/{self.rank}", b"1")
        return _Done() if async_op else None

    def abort(self) -> None:
        """Give up: every member waiting on this group raises instead of waiting out its timeout."""
        if not self._closed:
            self._store.set("abort", b"1")
        self.close()

    def close(self) -> None:
        self._closed = True
        self._mapped.clear()
