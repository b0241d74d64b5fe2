"""Trainer rendezvous through a TCP store someone else hosts (the RL driver's StoreHost on rank 0's
node): two spawned ranks join a gloo group by ``tcp://host:port/prefix`` and all-reduce; a second
group on the same store under another prefix (a restart) does not collide with the first."""

from __future__ import annotations

import datetime
import multiprocessing as mp

import torch
import torch.distributed as dist

from posttrain.engine.dist import init_rank, leave_group


def _rank(rank: int, store: str, queue) -> None:
    init_rank(rank, 2, store, "gloo", timeout_s=60)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    queue.put((rank, float(t)))
    leave_group(ok=True)


def test_two_ranks_rendezvous_through_a_hosted_tcp_store():
    host = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=60))
    ctx = mp.get_context("spawn")
    for prefix in ("trainers0", "trainers1"):  # a restart: same store, fresh prefix
        queue = ctx.Queue()
        procs = [ctx.Process(target=_rank, args=(r, f"tcp://127.0.0.1:{host.port}/{prefix}", queue)) for r in range(2)]
        for p in procs:
            p.start()
        got = sorted(queue.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(timeout=30)
        assert got == [(0, 3.0), (1, 3.0)]
