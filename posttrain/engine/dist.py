"""Process groups for the trainer: N ranks on one machine (spawned processes) or a torchrun job.

No Ray here: the RL controller wraps ranks in Ray actors; offline runs spawn them directly.
Rendezvous: ``store`` is either ``tcp://host:port/prefix`` (a TCP store someone hosts and hands
out: the RL driver, so that ranks on other nodes can join) or a file path (a FileStore: spawned
ranks on one machine, no port opened).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def device_for_rank(rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def open_store(store: str, world_size: int, timeout_s: float | None = None) -> dist.Store:
    """The rendezvous store named by ``store``: ``tcp://host:port/prefix`` (a client of a TCP
    store hosted elsewhere, keys under ``prefix``) or a FileStore path."""
    if not store.startswith("tcp://"):
        return dist.FileStore(store, world_size)
    address, _, prefix = store.removeprefix("tcp://").partition("/")
    host, _, port = address.rpartition(":")
    timeout = timedelta(seconds=timeout_s if timeout_s is not None else 1800)
    client = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
    return dist.PrefixStore(prefix, client) if prefix else client


def init_rank(
    rank: int, world_size: int, store_path: str, backend: str = "auto", timeout_s: float | None = None
) -> None:
    """Join the trainer process group as ``rank`` (idempotent) through the store ``store_path``
    (see :func:`open_store`). ``timeout_s`` bounds every collective (torch's default: 10 min for
    NCCL, 30 min for gloo)."""
    if dist.is_initialized():
        return
    backend = default_backend() if backend == "auto" else backend
    if torch.cuda.is_available():
        torch.cuda.set_device(device_for_rank(rank))
    else:
        # Ranks share the cores: oversubscribing threads makes every rank slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    store = open_store(store_path, world_size, timeout_s)
    kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, **kwargs)


def leave_group(ok: bool) -> None:
    """Leave the default process group at the end of a rank's work.

    After success every rank first meets at a barrier: a rank that tears its group down while a
    peer still has collectives in flight (FSDP2 issues its reduce-scatters asynchronously) can
    take that peer down with it (gloo: ``terminate called without an active exception``,
    SIGABRT). After a failure there is no barrier, since a peer may never reach it; the group is
    still destroyed so that the error, not a hang, is what the launcher sees.
    """
    if not dist.is_initialized():
        return
    if ok:
        dist.barrier()
    dist.destroy_process_group()


def _run_rank(fn: Callable[..., Any], rank: int, world_size: int, args: tuple) -> None:
    ok = False
    try:
        fn(rank, world_size, *args)
        ok = True
    finally:
        leave_group(ok)


def _entry(rank: int, fn: Callable[..., Any], world_size: int, store_path: str, backend: str, args: tuple) -> None:
    init_rank(rank, world_size, store_path, backend)
    _run_rank(fn, rank, world_size, args)


def launch(fn: Callable[..., Any], world_size: int, args: tuple = (), backend: str = "auto") -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks.

    One rank runs in this process (cheap, debuggable); more ranks are spawned processes.
    Under torchrun (RANK/WORLD_SIZE set) the existing environment is used instead.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(default_backend() if backend == "auto" else backend)
        _run_rank(fn, dist.get_rank(), dist.get_world_size(), args)
        return
    fd, store_path = tempfile.mkstemp(prefix="posttrain_store_")
    os.close(fd)
    os.unlink(store_path)
    try:
        if world_size == 1:
            _entry(0, fn, 1, store_path, backend, args)
        else:
            mp.spawn(_entry, args=(fn, world_size, store_path, backend, args), nprocs=world_size, join=True)
    finally:
        if os.path.exists(store_path):
            os.unlink(store_path)
