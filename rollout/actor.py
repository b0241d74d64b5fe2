"""The rollout Ray actor: a few verbs over a plain engine.

:class:`RolloutWorker` is a plain class (tested without Ray); :func:`start_rollout_actor` runs it
as a Ray actor with ``num_cpus`` reserved. The engine is chosen by its config's type
(``VLLMEngineConfig`` -> ``VLLMEngine``, ``HFEngineConfig`` -> ``HFEngine``) and built inside the
actor process, so vLLM's environment (in-process engine core) is set there before vLLM imports.

Weights reach the actor as :class:`~posttrain.weight_sync.WeightBucket` records or Ray object refs
to them (``ray.put(bucket)``: the numpy payload sits in the object store once and is read without
a copy by every actor on the node). Refs are fetched one at a time, so an actor holds one bucket
in flight, not the whole model twice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import ray

from posttrain.diagnose import remote_class, where_now
from posttrain.sync.group import GroupInfo
from posttrain.types import Group, PromptRecord
from posttrain.weight_sync import WeightBucket

from .engine import LoadReport, RolloutEngine
from .hf_engine import HFEngine, HFEngineConfig
from .sampling import SamplingConfig
from .vllm_engine import VLLMEngine, VLLMEngineConfig

log = logging.getLogger(__name__)

EngineConfig = VLLMEngineConfig | HFEngineConfig
SLEEP_TAGS = ("weights", "kv_cache")  # what vLLM's sleep releases, woken separately by tag


def build_engine(config: EngineConfig) -> RolloutEngine:
    """The engine for a config, by the config's type."""
    if isinstance(config, VLLMEngineConfig):
        return VLLMEngine(config)
    if isinstance(config, HFEngineConfig):
        return HFEngine(config)
    raise TypeError(
        f"no rollout engine for config type {type(config).__name__}; use VLLMEngineConfig or HFEngineConfig"
    )


def _resolve(buckets: Sequence[WeightBucket | ray.ObjectRef]) -> Iterator[WeightBucket]:
    for item in buckets:
        yield ray.get(item) if isinstance(item, ray.ObjectRef) else item


class RolloutWorker:
    """The verbs of a rollout actor, delegating to one engine."""

    def __init__(self, config: EngineConfig) -> None:
        from posttrain.metrics import quiet_library_logs

        quiet_library_logs()  # in this actor process, before the engine imports vLLM (logging.verbose)
        self.engine = build_engine(config)
        self.sleeping: set[str] = set()  # vLLM sleep tags still asleep ("weights", "kv_cache")

    @property
    def asleep(self) -> bool:
        return bool(self.sleeping)

    def generate(self, prompts: list[PromptRecord], sampling: SamplingConfig) -> list[Group]:
        if self.asleep:
            raise RuntimeError("rollout worker is asleep: call wake_up() before generate()")
        return self.engine.generate(prompts, sampling)

    def update_weights(
        self, buckets: Sequence[WeightBucket | ray.ObjectRef], version: int, restore: bool = False
    ) -> LoadReport:
        """Load a full version from buckets (or object refs to buckets), in order; ``restore``
        allows going back to an older version (the trainer resumed from a checkpoint)."""
        return self.engine.load_weights(_resolve(buckets), version, restore)

    def join_update_group(self, info: GroupInfo, rank_offset: int) -> None:
        """Join the model-update group (``posttrain.sync.group``); blocks until all members joined."""
        self.engine.join_update_group(info, rank_offset)

    def receive_weights(self, version: int, restore: bool = False) -> LoadReport:
        """Load a full version broadcast by the sender over the update group."""
        return self.engine.receive_weights(version, restore)

    def weight_digest(self) -> tuple[int, int]:
        """``(served version, digest of its buckets)``: the publisher compares it with the sender's."""
        return self.engine.weight_digest()

    def version(self) -> int:
        return self.engine.version

    def score_tokens(self, token_ids_list: list[list[int]]) -> list[list[float]]:
        return self.engine.score_tokens(token_ids_list)

    def sleep(self, level: int = 1) -> dict[str, float] | None:
        """Colocated mode: release accelerator memory for the trainer (a no-op where the engine
        has no sleep mode, e.g. vLLM on CPU); the engine's report (bytes released). Asleep
        already: nothing to do."""
        if self.asleep:
            return None
        report = self.engine.sleep(level)
        self.sleeping = set(SLEEP_TAGS)
        return report

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Take the devices back: ``tags`` of vLLM's (``"weights"`` before a weight load,
        ``"kv_cache"`` once the trainer left the device), None: all. Awake already: nothing."""
        wanted = set(SLEEP_TAGS) if tags is None else set(tags)
        if self.sleeping & wanted:
            if tags is None and self.sleeping == set(SLEEP_TAGS):
                self.engine.wake_up()  # everything (engines without sleep tags take this call)
            else:
                self.engine.wake_up(sorted(self.sleeping & wanted))
        self.sleeping -= wanted

    def health(self) -> dict[str, Any]:
        """Cheap liveness report: engine type, served version, asleep, process id."""
        return {
            "engine": type(self.engine).__name__,
            "version": self.engine.version,
            "asleep": self.asleep,
            "sleep_unavailable": getattr(self.engine, "sleep_unavailable", None),  # why sleep frees nothing
            "pid": os.getpid(),
        }

    @ray.method(concurrency_group="diag")
    def where(self) -> dict[str, Any]:
        """Where this worker is now; answers while a verb is blocked when the actor was created with
        ``concurrency_groups=posttrain.diagnose.DIAG_GROUPS`` (see posttrain.diagnose)."""
        return where_now()

    def close(self) -> None:
        self.engine.close()


def start_rollout_actor(
    config: EngineConfig, num_cpus: float = 1, num_gpus: float = 0, name: str | None = None
):
    """Start a :class:`RolloutWorker` as a Ray actor (requires ``ray.init`` first); returns its handle."""
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if name is not None:
        options["name"] = name
    return remote_class(RolloutWorker).options(**options).remote(config)
