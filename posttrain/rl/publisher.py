"""The weight publisher: the one path by which weights reach rollout workers.

    push (trainer ranks gather; rank 0 packs versioned buckets)
      -> load (every usable worker, or one replacement, or one worker rejoining)
      -> check (each worker's version digest == the sender's; then the logprob probe)
      -> advance (the run's policy version)

``sync.transport`` picks how push -> load travels: ``object_store`` (rank 0 packs every bucket
into Ray's object store, the workers fetch them), ``collective`` (a model-update group of
trainer rank 0 and every rank of the target workers, rendezvous through a TCP store this object
hosts; buckets are broadcast as they fill and loaded while the next is gathered) or ``ipc``
(colocated: one pair group per trainer rank and the worker on its device, the same messages
handed over by memory handles, posttrain/sync/ipc.py). A group is rebuilt whenever its members
change (a replaced worker, a trainer restart, a worker catching up).

It owns the newest version (and, on the object store, its bucket refs) and the lock that keeps a
replacement, a readmission and a sync from interleaving. Every wait has a deadline. The
invariants of one update (coverage, dtypes, strictly increasing versions, no partial version
served, per-bucket fingerprints) are those of :mod:`posttrain.weight_sync`, checked on both sides.

Used by: the step (``publish``), worker replacement (``replace``), a trainer restore
(``restore``) and the pipelined loop's readmission of set-aside workers (``readmit``).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from posttrain.diagnose import ActorLost, CallTimeout, wait_calls
from posttrain.rl.config import SyncConfig
from posttrain.rl.fleet import WorkerFleet
from posttrain.rl.trainers import TrainerFailed, TrainerGroup
from posttrain.weight_sync import (
    PROBE_TOLERANCE,
    ProbeFloor,
    WeightSyncFingerprintError,
    dtype_from_name,
    judge_probe,
    measure_floor,
)


class WeightPublisher:
    def __init__(self, trainers: TrainerGroup, fleet: WorkerFleet, sync: SyncConfig, dtype: torch.dtype, *,
                 drop_weights_on_sleep: bool = False) -> None:  # fmt: skip
        """``drop_weights_on_sleep``: every generation is followed by a publish before the next
        one (no periodic eval, no multi-turn dispatch in between), so once the probe's floor is
        measured the engines may sleep at level 2 (weights dropped, not copied to host)."""
        self.trainers, self.fleet, self.sync, self.dtype = trainers, fleet, sync, dtype
        self.drop_weights_on_sleep = drop_weights_on_sleep
        on_gpu = getattr(getattr(trainers, "plan", None), "trainer_resources", {}).get("GPU", 0) > 0
        self.transport = sync.resolved_transport("colocated" if getattr(fleet, "colocated", False) else "disaggregated", on_gpu)
        self.grouped = self.transport in ("collective", "ipc")  # weights travel over update groups
        self._infos: list = []  # the GroupInfo of every current update group (ipc: one per pair)
        self.version = 0  # the policy version the workers serve (after the last publish or restore)
        self._latest: tuple[list, int] | None = None  # bucket refs (object store) and version of the newest push
        self._lock = threading.RLock()
        engine_dtype = getattr(getattr(fleet, "engine_cfg", None), "dtype", None)
        self.wire_dtype: str | None = sync.wire_dtype or engine_dtype  # None: each tensor's own dtype
        # The probe compares engine and trainer: its tolerance is that of the coarser compute dtype.
        mixed = getattr(getattr(getattr(trainers, "spec", None), "trainer", None), "mixed_precision", "none")
        dtypes = [dtype] + ([dtype_from_name(engine_dtype)] if engine_dtype else []) + ([torch.bfloat16] if mixed == "bf16" else [])
        self.probe_dtype = max(dtypes, key=lambda d: PROBE_TOLERANCE.get(d, 0.0))
        self.floor: ProbeFloor | None = None  # the probe's gap with identical weights (calibrate)
        self._store: Any = None  # posttrain.sync.group.UpdateStore, on first use
        self._group_key: tuple | None = None  # who is in the current update group
        fleet.on_lost = self.replace  # a worker dying in any fleet call is replaced with the newest weights
        # Colocated with trainer.offload: the trainers' weights leave the devices while the engines
        # generate, and come back with the next trainer verb (a push or load included).
        fleet.before_generate = getattr(trainers, "offload", None)

    # -- moving weights ------------------------------------------------------------------------
    def _wire_kw(self) -> dict[str, str]:
        return {} if self.wire_dtype is None else {"wire_dtype": self.wire_dtype}

    def _push_and_load(self, targets: dict[int, Any], version: int, restore: bool, what: str) -> tuple[dict[str, float], list[int]]:
        """Send ``version`` from the trainers to these workers (index -> handle); (sync stats, the
        indices that loaded it). Object store: workers that time out are set aside (fleet rules)."""
        if self.grouped and not self.sync.skip_weight_sync:
            self._latest = ([], version)
            calls: dict[int, Any] = {}
            try:
                return self._broadcast(targets, version, restore, what, calls), list(targets)
            except TrainerFailed:  # the sender died: its sockets closed, the receivers fail by themselves
                raise
            except Exception:  # a worker died mid-broadcast (the sender aborted): replace it, send again
                self._abort_groups()  # ipc: a sender waiting for a dead receiver's ack stops waiting
                fresh = self._replace_failed(targets, calls)
                if fresh == targets:
                    raise
                return self._broadcast(fresh, version, restore, what, {}), list(fresh)
        refs, stats = self.trainers.push_weights(version, **self._wire_kw())
        self._latest = (refs, version)
        if self.sync.skip_weight_sync:
            return stats, list(targets)
        if all(self.fleet.workers[i] is w for i, w in targets.items()):
            return stats, list(self.fleet.call(list(targets), "update_weights", refs, version, restore, what=what))
        self._wait({i: w.update_weights.remote(refs, version, restore) for i, w in targets.items()}, targets, what)
        return stats, list(targets)

    def _broadcast(self, targets: dict[int, Any], version: int, restore: bool, what: str, calls: dict[int, Any]) -> dict[str, float]:
        """Rank 0 broadcasts ``version`` while the targets receive it; ``calls`` gets their refs."""
        self._ensure_group(targets)

        def receive() -> None:
            calls.update({i: w.receive_weights.remote(version, restore) for i, w in targets.items()})
            self._wait_fail_fast(calls, targets, what)

        stats, _ = self.trainers.broadcast_weights(version, self.wire_dtype, restore, receive)
        return stats

    def _wait_fail_fast(self, refs: dict[int, Any], handles: dict[int, Any], what: str) -> None:
        """Wait for every call, but raise as soon as one fails (the others cannot finish then)."""
        import ray

        deadline = None if self.fleet.deadlines.call_s is None else time.monotonic() + self.fleet.deadlines.call_s
        pending = dict(refs)
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(pending.values()), num_returns=1, timeout=left)
            if not ready:
                self._wait(pending, handles, what)  # raises CallTimeout naming the silent workers
            for i in [i for i, ref in pending.items() if ref in ready]:
                self._wait({i: pending.pop(i)}, handles, what)  # raises ActorLost or the worker's error

    def _replace_failed(self, targets: dict[int, Any], calls: dict[int, Any], grace_s: float = 10.0) -> dict[int, Any]:
        """After a failed broadcast: the targets with every dead worker, and every one still stuck
        receiving after ``grace_s`` (it waits on a sender that gave up), replaced in its bundle."""
        import ray

        self._group_key = None
        if calls:
            ray.wait(list(calls.values()), num_returns=len(calls), timeout=grace_s)
        out = {}
        for i, worker in targets.items():
            ref = calls.get(i)
            stuck = ref is not None and not ray.wait([ref], timeout=0)[0]
            try:
                if stuck:
                    raise ActorLost(f"rollout worker {i}", "weight update", RuntimeError("stuck after the sender aborted"))
                wait_calls({f"rollout worker {i}": (worker, worker.health.remote())}, "health", self.fleet.deadlines.call_s)
                out[i] = worker
            except ActorLost as err:
                out[i] = self.fleet.respawn(i, err)  # kills the old actor first
                self.fleet.install(i, out[i])
        return out

    def _wait(self, refs: dict[int, Any], handles: dict[int, Any], what: str) -> dict[int, Any]:
        named = {f"rollout worker {i}": (handles[i], ref) for i, ref in refs.items()}
        out = wait_calls(named, what, self.fleet.deadlines.call_s)
        return {i: out[f"rollout worker {i}"] for i in refs}

    def _ensure_group(self, targets: dict[int, Any]) -> None:
        """An update group of trainer rank 0 + every rank of these workers (rebuilt on change)."""
        key = (self.trainers.restarts, tuple((i, getattr(w, "_actor_id", id(w))) for i, w in sorted(targets.items())))
        if key == self._group_key:
            return
        import ray

        from posttrain.sync.group import UpdateStore

        timeout = self.fleet.deadlines.call_s or 1800.0
        if self._store is None:
            self._store = UpdateStore(ray.util.get_node_ip_address(), timeout)
        tp = int(getattr(self.fleet.engine_cfg, "tensor_parallel_size", 1))
        on_gpu = self.trainers.plan.trainer_resources.get("GPU", 0) > 0
        self._group_key = None
        if self.transport == "ipc":  # worker i shares a device (bundle i) with trainer rank i: one pair each
            kind = "cuda" if on_gpu else "cpu"
            infos = {i: self._store.next_group(1 + tp, "ipc", timeout, device_kind=kind) for i in sorted(targets)}
            per_rank = [(infos.get(r),) for r in range(len(self.trainers.ranks))]
            self._infos = list(infos.values())
            self.trainers.join_update_group(None, lambda: self._wait(
                {i: w.join_update_group.remote(infos[i], 1) for i, w in targets.items()}, targets, "join the update group"),
                per_rank=per_rank)  # fmt: skip
            self._group_key = key
            return
        info = self._store.next_group(1 + tp * len(targets), "nccl" if on_gpu else "gloo", timeout)
        self._infos = [info]
        offsets = {i: 1 + k * tp for k, i in enumerate(sorted(targets))}
        self.trainers.join_update_group(info, lambda: self._wait(
            {i: w.join_update_group.remote(info, offsets[i]) for i, w in targets.items()}, targets, "join the update group"))  # fmt: skip
        self._group_key = key

    def _abort_groups(self) -> None:
        """Tell every member of the current groups to stop waiting (ipc: a sender waiting for acks)."""
        if self._store is not None:
            for info in self._infos:
                self._store.abort(info)

    def _check_digests(self, indices: list[int], stats: dict[str, float], version: int) -> None:
        """Every loaded worker serves ``version`` with the digest the sender computed."""
        sent = stats.get("sync/digest")
        if sent is None:
            return
        served = self.fleet.call(indices, "weight_digest", what="weight digest")
        for i, (v, digest) in served.items():
            if v != version or digest != int(sent):
                raise WeightSyncFingerprintError(
                    f"after step {version}: rollout worker {i} serves weight version {v} (digest {digest:#x}), but the trainer "
                    f"sent version {version} (digest {int(sent):#x}): the worker does not serve the trainer's weights (a "
                    "skipped, partial or stale sync; the logprob probe alone cannot see one optimizer step at a small lr).\n"
                    "  fix: check the workers' logs for a failed weight update; remove sync.skip_weight_sync if it is set"
                )

    # -- the verbs -----------------------------------------------------------------------------
    def publish(self, probe_ids: list[list[int]]) -> dict[str, float]:
        """Version v+1 from the trainers to every usable worker, then digest and probe; the sync stats."""
        t0 = time.perf_counter()
        # Colocated, one GPU: the engines' weights wake (the trainer still holds its memory), the
        # sync lands in them; the probe offloads the trainer (+ empty_cache) before the KV cache wakes.
        self.fleet.wake(self.fleet.usable(), tags=("weights",))
        version = self.version + 1
        with self._lock:
            indices = self.fleet.usable()
            held = [i for i in self.fleet.settled() if i not in indices] if self.grouped else []
            # held workers (replacements, rejoiners that are behind) catch up here
            stats, loaded = self._push_and_load({i: self.fleet.workers[i] for i in indices + held}, version, False, "weight update")
            for i in held:
                self.fleet.rejoin(i)
        stats["sync/time_s"] = time.perf_counter() - t0
        self.version = version
        self._check_digests(loaded, stats, version)
        stats.update(self.probe(probe_ids, loaded))
        return stats

    def calibrate(self, probe_ids: list[list[int]]) -> dict[str, float]:
        """The probe's floor, measured once while the workers serve the trainers' own weights
        (before the first optimizer step: version 0, or a restored version); its metrics on every
        later call. Raises ``WeightSyncProbeError`` if the two sides already disagree then.

        Colocated: the engines score while the trainers are still off the devices, then sleep
        again before the trainers' probe brings them back."""
        if self.floor is None and getattr(self.trainers, "pushed_current", False):
            usable = self.fleet.usable()
            self.fleet.wake(usable)
            engine_lps = self.fleet.call(usable, "score_tokens", probe_ids, what="probe floor")
            self.fleet.sleep(usable)
            trainer_lp = self.trainers.probe(probe_ids)
            floors = [measure_floor(lp, trainer_lp, self.probe_dtype, self.sync.probe_tolerance) for lp in engine_lps.values()]
            self.floor = ProbeFloor(max(f.mean for f in floors), max(f.p99 for f in floors))
            if self.drop_weights_on_sleep and not self.sync.skip_weight_sync:  # a sync follows every wake from now on
                self.fleet.sleep_level = 2
        if self.floor is None:
            return {}
        return {"sync/probe_floor_mean": self.floor.mean, "sync/probe_floor_p99": self.floor.p99}

    def probe(self, probe_ids: list[list[int]], targets: list[int]) -> dict[str, float]:
        """The workers' logprobs on ``probe_ids`` against the trainer's, judged on mean and p99
        above the floor (:meth:`calibrate`); raises ``WeightSyncProbeError`` naming the version
        when a worker does not serve the new weights."""
        trainer_lp = self.trainers.probe(probe_ids)  # while the trainers are on their devices
        self.fleet.wake(self.fleet.usable(), generate=True)  # colocated: trainers offload, then the KV cache wakes
        engine_lps = self.fleet.call(targets, "score_tokens", probe_ids, what="probe")
        stats: dict[str, float] = {}
        for engine_lp in engine_lps.values():
            gap = judge_probe(engine_lp, trainer_lp, self.version, self.probe_dtype, self.sync.probe_tolerance, self.floor)
            for key, value in (("sync/probe_gap", gap.max), ("sync/probe_gap_mean", gap.mean), ("sync/probe_gap_p99", gap.p99)):
                stats[key] = max(stats.get(key, 0.0), value)
        versions = self.fleet.call(list(engine_lps), "version", what="version")
        stats["sync/worker_version"] = float(min(versions.values(), default=-1))
        return stats

    def restore(self, version: int) -> None:
        """After the trainers loaded a checkpoint (or restarted from the initial model): every
        worker, set aside or not, goes back to ``version`` (possibly older than what it serves)."""
        self.fleet.rejoin_all()
        self.fleet.wake(self.fleet.usable())
        with self._lock:
            targets = {i: self.fleet.workers[i] for i in self.fleet.usable()}
            self._push_and_load(targets, version, True, "weight update (restore)")
        self.version = version

    def replace(self, index: int, err: Exception) -> bool:
        """Worker ``index`` died or hung: a new one in its bundle, serving the newest weights.

        Collective: the newest weights come from the trainers, which hold exactly the published
        version unless they have stepped since; then the new worker is held out of service
        until the next publish brings it in (returns False)."""
        with self._lock:
            worker = self.fleet.respawn(index, err)
            if self._latest is None:  # nothing published: the new worker's initial weights are version 0
                self.fleet.install(index, worker)
                return True
            name = f"rollout worker {index} (replacement)"
            if not self.grouped:  # restore=True: the newest may be a restored older version
                wait_calls({name: (worker, worker.update_weights.remote(*self._latest, True))}, "weight update", self.fleet.deadlines.call_s)
            elif self.trainers.pushed_current:
                self._push_and_load({index: worker}, self._latest[1], True, "weight update (replacement)")
            else:
                self.fleet.install(index, worker)
                self.fleet.hold(index, "a replacement waits for the next weight publish")
                return False
            self.fleet.install(index, worker)
            return True

    def readmit(self) -> None:
        """Set-aside workers that answered everything they owed are caught up to the newest
        weights and rejoin. Each wait is bounded by ``rollout.request_timeout_s``: a worker still
        stuck stays aside, owing that call; one that died is replaced. Collective: one that is
        behind stays aside until the next publish, which catches it up."""
        deadline = self.fleet.deadlines.aside_s or self.fleet.deadlines.call_s
        for index in self.fleet.settled():
            with self._lock:
                worker, name = self.fleet.workers[index], f"rollout worker {index}"
                ref = worker.version.remote()
                try:
                    served = wait_calls({name: (worker, ref)}, "version", deadline)[name]
                    # != and restore=True: after a trainer restart the newest version may be an older one
                    if self._latest is not None and served != self._latest[1]:
                        if self.grouped:
                            continue
                        ref = worker.update_weights.remote(*self._latest, True)
                        wait_calls({name: (worker, ref)}, "weight update (rejoin)", deadline)
                except ActorLost as err:
                    if self.replace(index, err):
                        self.fleet.rejoin(index)
                    continue
                except CallTimeout:
                    self.fleet.set_aside(index, ref, "it did not answer in time while rejoining")
                    continue
                self.fleet.rejoin(index)
