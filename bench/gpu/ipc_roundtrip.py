"""IPC weight hand-off between two processes on one GPU (``sync.transport: ipc``), torch only.

    python bench/gpu/ipc_roundtrip.py OUT          # GPU: CUDA IPC handles between two processes
    python bench/gpu/ipc_roundtrip.py OUT --cpu    # CPU smoke: the same code, shared-memory files

``OUT`` is a ``.json`` path, or a directory that gets ``gpu_ipc_roundtrip.json`` (bench/gpu_check.sh
passes its output directory). No vLLM, no Ray: the sender (this process, "trainer rank") sends one
version of a small state dict (fp32, cast to bf16 on the wire, one tensor larger than a bucket)
with posttrain's own ``CollectiveSender`` over an ``IpcGroup``; the receiver (a spawned process,
"the colocated engine") maps each handle, checks every bucket with ``WeightUpdateSession``
(version, order, coverage, dtype, shape, fingerprint) and compares every tensor with the sent one
byte for byte. Then one raw 256 MiB payload times the hand-off alone. Runs in CPU mode when
``--cpu`` is given, ``GPU_CHECK_SMOKE=1`` is set, or no CUDA device is visible.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


def _rollout_package() -> None:
    """``posttrain.rollout`` is the top-level rollout/ folder, mapped by pyproject at install; the
    device machine runs from a bare checkout, so map it here when it is not installed."""
    import importlib.util

    try:
        import posttrain.rollout  # noqa: F401
    except ImportError:
        init = os.path.join(REPO, "rollout", "__init__.py")
        spec = importlib.util.spec_from_file_location("posttrain.rollout", init, submodule_search_locations=[os.path.dirname(init)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["posttrain.rollout"] = module
        spec.loader.exec_module(module)


_rollout_package()

from posttrain.rollout.weight_receiver import ParamManifest, ParamSpec, WeightUpdateSession  # noqa: E402

from posttrain.sync.collective import CollectiveSender, receive_version  # noqa: E402
from posttrain.sync.device import Device  # noqa: E402
from posttrain.sync.group import UpdateStore, join  # noqa: E402

WIRE = torch.bfloat16


def _state(device: str, big: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (512, 256), "layers.0.w": (256, 1024), "layers.0.b": (1024,), "layers.1.big": (big, 1024)}
    return {n: torch.randn(*s, generator=g).to(device) for n, s in shapes.items()}


def _receiver(info, device: str, big: int, raw_bytes: int, queue) -> None:
    try:
        dev = Device(torch.device(device))
        if dev.type == "cuda":
            torch.cuda.set_device(dev.torch_device)
        group = join(info, 1, dev)
        want = {n: t.to(WIRE) for n, t in _state(device, big).items()}
        session = WeightUpdateSession(ParamManifest({n: ParamSpec(WIRE, tuple(t.shape)) for n, t in want.items()}), 0, 1)
        got: dict[str, torch.Tensor] = {}

        def on_bucket(bucket):
            for name, view in session.accept(bucket).tensors():
                got[name] = view.clone()

        buckets = receive_version(group, on_bucket, {})
        session.finish()
        equal = set(got) == set(want) and all(torch.equal(got[n].view(torch.uint8), want[n].view(torch.uint8)) for n in want)
        raw = dev.empty(raw_bytes)
        group.broadcast(raw)
        expected = torch.arange(raw_bytes, dtype=torch.int64, device=device).remainder_(251).to(torch.uint8)
        queue.put({"buckets": buckets, "digest": session.digest, "tensors_equal": bool(equal),
                   "raw_equal": bool(torch.equal(raw, expected)), "error": None})  # fmt: skip
    except Exception as err:  # noqa: BLE001 — reported in the record
        queue.put({"error": f"{type(err).__name__}: {err}"})


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    cpu = "--cpu" in argv or os.environ.get("GPU_CHECK_SMOKE") == "1" or not torch.cuda.is_available()
    out = args[0] if args else "gpu_ipc_roundtrip.json"
    if not out.endswith(".json"):
        os.makedirs(out, exist_ok=True)
        out = os.path.join(out, "gpu_ipc_roundtrip.json")
    device = "cpu" if cpu else "cuda:0"
    big = 256 if cpu else 16384  # rows of 1024 fp32: 1 MiB (CPU) / 64 MiB (GPU), bigger than a bucket
    raw_bytes = (8 if cpu else 256) << 20
    bucket_bytes = (256 << 10) if cpu else (32 << 20)
    record: dict = {"name": "ipc_roundtrip", "device": torch.cuda.get_device_name(0) if not cpu else "cpu",
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "mode": "cpu shared-memory files" if cpu else "cuda ipc handles", "ok": False}  # fmt: skip
    ctx = mp.get_context("spawn")
    store = UpdateStore("127.0.0.1", timeout_s=120)
    info = store.next_group(2, "ipc", 120, device_kind="cpu" if cpu else "cuda")
    queue = ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(info, device, big, raw_bytes, queue))
    proc.start()
    try:
        dev = Device(torch.device(device))
        group = join(info, 0, dev)
        state = _state(device, big)
        t0 = time.perf_counter()
        stats = CollectiveSender(bucket_bytes, WIRE).send(group, state.items(), version=1)
        send_s = time.perf_counter() - t0
        raw = group.empty(raw_bytes)
        raw.copy_(torch.arange(raw_bytes, dtype=torch.int64, device=device).remainder_(251).to(torch.uint8))
        if not cpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        group.broadcast(raw)  # returns once the receiver's copy finished and it acknowledged
        raw_s = time.perf_counter() - t0
        got = queue.get(timeout=120)
        proc.join(timeout=30)
        record.update({
            "receiver": got, "buckets": stats.num_buckets, "bytes": stats.bytes, "handles": group.handles,
            "send_s": round(send_s, 4), "digest_equal": got.get("digest") == stats.digest,
            "raw_bytes": raw_bytes, "raw_s": round(raw_s, 4), "raw_gb_per_s": round(raw_bytes / raw_s / 1e9, 2),
        })  # fmt: skip
        record["ok"] = bool(got.get("error") is None and got["tensors_equal"] and got["raw_equal"] and record["digest_equal"]
                            and group.handles >= stats.num_buckets)  # fmt: skip
    except Exception as err:  # noqa: BLE001 — reported in the record
        record["error"] = f"{type(err).__name__}: {err}"
    finally:
        if proc.is_alive():
            proc.kill()
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record))
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
