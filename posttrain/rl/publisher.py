"""The weight publisher: the one path by which weights reach rollout workers.

    push (trainer ranks gather, rank 0 packs versioned buckets)
      -> load (every usable worker, or one replacement, or one worker rejoining)
      -> probe (the engine's logprobs on a fixed sequence equal the trainer's)
      -> advance (the run's policy version)

It owns the newest weights ``(bucket refs, version)`` and the lock that keeps a replacement, a
readmission and a sync from interleaving. Every wait has a deadline (the fleet's calls). The
invariants of one update (coverage, dtypes, strictly increasing versions, no partial version
served) are those of :mod:`posttrain.weight_sync`, checked on both sides.

Used by: the step (``publish``), worker replacement (``replace``), a trainer restore
(``restore``) and the pipelined loop's readmission of set-aside workers (``readmit``).
"""

from __future__ import annotations

import threading
import time

import torch

from posttrain.diagnose import ActorLost, CallTimeout, wait_calls
from posttrain.rl.config import SyncConfig
from posttrain.rl.fleet import WorkerFleet
from posttrain.rl.trainers import TrainerGroup
from posttrain.weight_sync import check_probe


class WeightPublisher:
    def __init__(self, trainers: TrainerGroup, fleet: WorkerFleet, sync: SyncConfig, dtype: torch.dtype) -> None:
        self.trainers, self.fleet, self.sync, self.dtype = trainers, fleet, sync, dtype
        self.version = 0  # the policy version the workers serve (after the last publish or restore)
        self._latest: tuple[list, int] | None = None  # bucket refs and version of the newest push
        self._lock = threading.RLock()

    def _load(self, indices: list[int], refs: list, version: int, restore: bool, what: str) -> list[int]:
        """Load ``version`` into these workers; the ones that answered (others were set aside)."""
        return list(self.fleet.call(indices, "update_weights", refs, version, restore, what=what))

    def publish(self, probe_ids: list[list[int]]) -> dict[str, float]:
        """Version v+1 from the trainers to every usable worker, then the probe; the sync stats."""
        t0 = time.perf_counter()
        self.fleet.wake(self.fleet.usable())  # weights load into awake engines
        version = self.version + 1
        refs, stats = self.trainers.push_weights(version)
        with self._lock:
            self._latest = (refs, version)
            targets = self.fleet.usable()
            if not self.sync.skip_weight_sync:
                targets = self._load(targets, refs, version, False, "weight update")
        stats["sync/time_s"] = time.perf_counter() - t0
        self.version = version
        stats.update(self.probe(probe_ids, targets))
        return stats

    def probe(self, probe_ids: list[list[int]], targets: list[int]) -> dict[str, float]:
        """The workers' logprobs on ``probe_ids`` against the trainer's; raises
        ``WeightSyncProbeError`` naming the version when a worker does not serve the new weights."""
        trainer_lp = self.trainers.probe(probe_ids)
        engine_lps = self.fleet.call(targets, "score_tokens", probe_ids, what="probe")
        stats: dict[str, float] = {}
        for engine_lp in engine_lps.values():
            gap = check_probe(engine_lp, trainer_lp, self.version, self.dtype, self.sync.probe_tolerance)
            stats["sync/probe_gap"] = max(stats.get("sync/probe_gap", 0.0), gap)
        versions = self.fleet.call(list(engine_lps), "version", what="version")
        stats["sync/worker_version"] = float(min(versions.values(), default=-1))
        return stats

    def restore(self, version: int) -> None:
        """After the trainers loaded a checkpoint (or restarted from the initial model): every
        worker, set aside or not, goes back to ``version`` (possibly older than what it serves)."""
        self.fleet.rejoin_all()
        refs, _ = self.trainers.push_weights(version)
        self.fleet.wake(self.fleet.usable())
        with self._lock:
            self._latest = (refs, version)
            self._load(self.fleet.usable(), refs, version, True, "weight update (restore)")
        self.version = version

    def replace(self, index: int, err: Exception) -> None:
        """Worker ``index`` died or hung: a new one in its bundle, serving the newest weights."""
        with self._lock:
            worker = self.fleet.respawn(index, err)
            if self._latest is not None:  # restore=True: the newest may be a restored older version
                name = f"rollout worker {index} (replacement)"
                wait_calls({name: (worker, worker.update_weights.remote(*self._latest, True))}, "weight update", self.fleet.deadlines.call_s)
            self.fleet.install(index, worker)

    def readmit(self) -> None:
        """Set-aside workers that answered everything they owed are caught up to the newest
        weights and rejoin. Each wait is bounded by ``rollout.request_timeout_s``: a worker still
        stuck stays aside, owing that call; one that died is replaced."""
        deadline = self.fleet.deadlines.aside_s or self.fleet.deadlines.call_s
        for index in self.fleet.settled():
            with self._lock:
                worker, name = self.fleet.workers[index], f"rollout worker {index}"
                ref = worker.version.remote()
                try:
                    served = wait_calls({name: (worker, ref)}, "version", deadline)[name]
                    # != and restore=True: after a trainer restart the newest version may be an older one
                    if self._latest is not None and served != self._latest[1]:
                        ref = worker.update_weights.remote(*self._latest, True)
                        wait_calls({name: (worker, ref)}, "weight update (rejoin)", deadline)
                except ActorLost as err:
                    self.replace(index, err)
                except CallTimeout:
                    self.fleet.set_aside(index, ref, "it did not answer in time while rejoining")
                    continue
                self.fleet.rejoin(index)
