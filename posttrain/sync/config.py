"""``sync:`` — how weights travel from the trainer to the rollout workers (a recipe section).

Plain config with no imports from the rest of posttrain: ``posttrain.rl.config`` re-exports it as
the online-RL recipe's ``sync`` section, and the checks take the placement as plain values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


def default_transport(colocated: bool, on_gpu: bool) -> str:
    """``sync.transport: null``: ``ipc`` for colocated placement on GPU (NCCL refuses two ranks on one
    GPU), else ``object_store``."""
    return "ipc" if colocated and on_gpu else "object_store"


@dataclass
class SyncConfig:
    """``sync:`` — how weights travel from the trainer to the rollout workers (infrastructure, not
    algorithm). See posttrain/weight_sync.py for the invariants every update keeps.

    ``transport``: ``object_store`` — trainer rank 0 gathers the full state dict and puts every
    bucket in Ray's object store, each worker fetches and loads them (the sender holds the model
    plus its buckets); ``collective`` — a model-update group of trainer rank 0 and every rank of
    every rollout worker (gloo on CPU, NCCL on GPU): one tensor gathered at a time, buckets
    broadcast as they fill, loaded by the workers while the next is gathered (the sender holds
    two buckets); ``ipc`` — colocated only: each trainer rank hands the same buckets to the engine
    on its own device by memory handles (CUDA IPC on GPU, shared-memory files on CPU;
    posttrain/sync/ipc.py), since NCCL refuses two ranks on one GPU. ``null`` (the default): ``ipc``
    for colocated placement on GPU, else ``object_store`` (every engine and test worker takes it,
    and on one CPU host it needs no sockets); disaggregated GPU recipes set ``collective``.
    """

    bucket_mb: int = 64  # weight-sync bucket size (MiB); a larger tensor travels alone
    probe_tolerance: float | None = None  # nats; None: by the compute dtype (posttrain.weight_sync.PROBE_TOLERANCE)
    transport: Literal["object_store", "collective", "ipc"] | None = None
    # dtype on the wire (float32 | bfloat16 | float16): the trainer's master weights are cast to it.
    # null: the rollout engine's dtype (an fp32 trainer feeds a bf16 engine).
    wire_dtype: str | None = None
    # Testing only: publish a new version without loading it into the workers, to prove that the
    # digest and the probe catch an engine that serves stale weights.
    skip_weight_sync: bool = False

    def validate(self) -> tuple[str, str, str] | None:
        if self.bucket_mb < 1:
            return ("bucket_mb", f"{self.bucket_mb} must be >= 1", "set sync.bucket_mb=64")
        if self.probe_tolerance is not None and self.probe_tolerance <= 0:
            return ("probe_tolerance", f"{self.probe_tolerance} must be > 0", "set sync.probe_tolerance=null (by dtype)")
        if self.transport not in (None, "object_store", "collective", "ipc"):
            return ("transport", f"{self.transport!r} is not a transport", "use object_store, collective, ipc or null (by placement)")
        if self.wire_dtype not in (None, "float32", "bfloat16", "float16"):
            return ("wire_dtype", f"{self.wire_dtype!r} is not a wire dtype",
                    "use float32, bfloat16, float16, or null (the rollout engine's dtype)")  # fmt: skip
        return None

    def resolved_transport(self, placement: str, on_gpu: bool) -> str:
        """``transport``, or for null the placement's default: ``ipc`` colocated on GPU, else ``object_store``."""
        return self.transport or default_transport(placement == "colocated", on_gpu)

    def check_placement(self, placement: str, on_gpu: bool, num_workers: int, world_size: int) -> tuple[str, str, str] | None:
        """What the transport needs of the placement (``cluster.placement``; ``on_gpu``: any GPU per
        trainer rank or worker): (key, problem, fix) or None. See posttrain/sync/ipc.py, group.py."""
        transport = self.resolved_transport(placement, on_gpu)
        if transport == "collective" and placement == "colocated" and on_gpu:
            return ("sync.transport", "collective puts trainer rank 0 and the rollout worker on its GPU in one NCCL "
                    "communicator, and NCCL refuses two ranks on one GPU (\"Duplicate GPU detected\")",
                    "set sync.transport=ipc (CUDA IPC hand-off to the colocated engine; the default when unset), "
                    "or cluster.placement=disaggregated")  # fmt: skip
        if transport == "ipc" and placement != "colocated":
            return ("sync.transport", f"ipc hands weights to an engine on the trainer rank's own device, but "
                    f"cluster.placement={placement}", "set cluster.placement=colocated, or sync.transport=collective")  # fmt: skip
        if transport == "ipc" and num_workers > world_size:
            return ("sync.transport", f"ipc pairs each rollout worker with the trainer rank on its device, but "
                    f"rollout.num_workers={num_workers} > trainer.world_size={world_size}",
                    f"set rollout.num_workers <= {world_size}, or sync.transport=object_store")  # fmt: skip
        return None
