"""One payload hand-off between two processes on one host: ``collective`` (a gloo broadcast) vs
``ipc`` (posttrain/sync/ipc.py: a shared-memory handle, mapped and copied by the receiver).

    python bench/sync_handoff.py [--mib 64] [--reps 5] [--out bench/results/sync_handoff.json]

Each transport: the receiver (a spawned process) takes ``reps`` payloads into a preallocated
buffer after one warm-up; the time is the sender's ``broadcast`` call, which for ipc returns once
the receiver acknowledged its copy. This is the transport alone (no buckets, checks or engine
load); bench/weight_sync.py measures whole syncs. On a GPU the ipc path is a device-to-device copy
(bench/gpu/ipc_roundtrip.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import time

import torch

from posttrain.sync.group import UpdateStore, join


def _pattern(nbytes: int) -> torch.Tensor:
    return torch.arange(nbytes, dtype=torch.int64).remainder_(251).to(torch.uint8)


def _receiver(info, nbytes: int, reps: int, queue) -> None:
    torch.set_num_threads(1)
    group = join(info, 1)
    buf = torch.empty(nbytes, dtype=torch.uint8)
    for _ in range(reps + 1):
        group.broadcast(buf)
    queue.put(bool(torch.equal(buf, _pattern(nbytes))))


def _run(backend: str, nbytes: int, reps: int) -> dict:
    ctx = mp.get_context("spawn")
    store = UpdateStore("127.0.0.1", 120)
    info = store.next_group(2, backend, 120)
    queue = ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(info, nbytes, reps, queue))
    proc.start()
    group = join(info, 0)
    src = group.empty(nbytes) if hasattr(group, "empty") else torch.empty(nbytes, dtype=torch.uint8)
    src.copy_(_pattern(nbytes))
    group.broadcast(src)  # warm-up: waits for the receiver's start
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        group.broadcast(src)
        times.append(time.perf_counter() - t0)
    equal = queue.get(timeout=120)
    proc.join(timeout=30)
    times.sort()
    return {"best_ms": round(times[0] * 1e3, 2), "median_ms": round(times[len(times) // 2] * 1e3, 2),
            "gb_per_s_best": round(nbytes / times[0] / 1e9, 2), "bytes_equal": equal}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    nbytes = args.mib << 20
    record = {"name": "sync_handoff", "device": f"cpu {os.cpu_count()} cores (shared machine)",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "payload_mib": args.mib, "reps": args.reps,
              "collective_gloo": _run("gloo", nbytes, args.reps), "ipc_shared_memory": _run("ipc", nbytes, args.reps)}  # fmt: skip
    print(json.dumps(record, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
