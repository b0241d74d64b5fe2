"""The trainer ranks of a run, as one group with typed verbs: the only place that calls them.

Every verb runs on all ranks at once (the verbs are collectives) and waits at most
``cluster.call_timeout_s``. A rank that dies or does not answer in time raises
:class:`TrainerFailed` naming the rank and where each silent rank is (``posttrain.diagnose``);
:mod:`posttrain.rl.recovery` turns that into a restart from the newest checkpoint.

    TrainerGroup.forward(ForwardBatch) -> ForwardOutputs   rows sharded rank::world, joined back
    TrainerGroup.train(TrainBatch)     -> metrics           one optimizer step per mini-batch
    TrainerGroup.push_weights(version) -> (bucket refs, stats)      sync.transport=object_store
    TrainerGroup.join_update_group / broadcast_weights(..., alongside)  sync.transport=collective:
        the ranks' call runs while ``alongside()`` (the receivers' side of the collective) runs here
    TrainerGroup.probe / save / load / find / export
    TrainerGroup.offload / onload      trainer.offload (colocated): weights and optimizer state to
        host memory while the engines generate; every other verb onloads first
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from posttrain.config.errors import PosttrainError
from posttrain.diagnose import ActorLost, CallTimeout, remote_class, wait_calls
from posttrain.rl.config import Deadlines
from posttrain.rl.placement import Plan, actor_options
from posttrain.rl.trainer_worker import TrainerSpec, TrainerWorker
from posttrain.types import ForwardBatch, ForwardOutputs, TrainBatch

T = TypeVar("T")


_OFF_DEVICE = ("pid", "node", "offload", "onload", "find")  # verbs that do not touch the weights


class TrainerFailed(PosttrainError):
    """A trainer rank died or did not answer in time: the step ended without an update.
    The driver restarts the trainers from the newest checkpoint (``cluster.max_trainer_restarts``)."""


class StoreHost:
    """Serves the trainers' TCP rendezvous store from rank 0's node (a Ray actor, no CPU)."""

    def __init__(self, timeout_s: float | None) -> None:
        from datetime import timedelta

        import ray
        import torch.distributed as dist

        self.host = ray.util.get_node_ip_address()
        self.store = dist.TCPStore(self.host, 0, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=timeout_s or 1800))  # fmt: skip

    def address(self) -> tuple[str, int]:
        return self.host, self.store.port


class TrainerGroup:
    """``spec.world`` trainer ranks as Ray actors in their placement bundles, joined through a TCP
    store on rank 0's node."""

    trainer_class: type = TrainerWorker  # a test may substitute a subclass (fault injection)

    def __init__(self, spec: TrainerSpec, pg: Any, plan: Plan, deadlines: Deadlines) -> None:
        self.spec, self.pg, self.plan, self.deadlines = spec, pg, plan, deadlines
        self.restarts = 0
        # One verb at a time: both loops' threads may call (the rollout thread replaces a worker),
        # and the ranks must see the same order of collectives.
        self._lock = threading.RLock()
        self.pushed_current = True  # no optimizer step or load since the last push (weights = last version sent)
        self._store_host: Any = None  # StoreHost actor on rank 0's node, started with the first ranks
        self.offloaded = False  # trainer.offload: the ranks' weights are in host memory now
        self.offload_stats: dict[str, float] = {}  # rank 0's, of the latest offload and onload
        self.nodes: list[dict[str, str]] = []  # where each rank runs (Ray node id, address)
        self.ranks = self._start()  # they load their models while the caller starts other actors

    def ready(self) -> None:
        """Wait until every rank has started (model loaded, process group joined); say where each runs."""
        self._call("pid", startup=True)
        self.nodes = self._call("node")
        hosts = ", ".join(f"rank {r}: node {n['node_id'][:12]} ({n['ip']})" for r, n in enumerate(self.nodes))
        print(f"[posttrain] trainer ranks on {len({n['node_id'] for n in self.nodes})} node(s): {hosts}", flush=True)

    def _store(self) -> str:
        """Where this start's ranks rendezvous: a TCP store served on rank 0's node (by a small
        actor in rank 0's bundle; its address and port handed to every rank), so ranks on any
        node can join; a fresh key prefix after every restart."""
        import ray

        if self._store_host is None:
            options = actor_options(self.pg, self.plan.trainer_bundle[0], {"CPU": 0.0})
            self._store_host = ray.remote(StoreHost).options(**options).remote(self.deadlines.startup_s)
        host, port = wait_calls({"trainer rendezvous store": (self._store_host, self._store_host.address.remote())},
                                "start", self.deadlines.startup_s)["trainer rendezvous store"]  # fmt: skip
        return f"tcp://{host}:{port}/trainers{self.restarts}"

    def _start(self) -> list:
        """One actor per rank, in a fresh process group (its own rendezvous store); not waited for."""
        spec = dataclasses.replace(self.spec, store_path=self._store())
        cls = remote_class(type(self).trainer_class)
        ranks = [
            cls.options(**actor_options(self.pg, self.plan.trainer_bundle[r], self.plan.trainer_resources, self.plan.threads.train)).remote(r, spec)
            for r in range(spec.world)
        ]
        return ranks

    def restart(self) -> None:
        """Kill every rank (the live ones may be stuck in a collective with a dead one) and start anew."""
        self.kill()
        self.restarts += 1
        self.pushed_current = self.offloaded = False
        self.ranks = self._start()
        self.ready()

    def kill(self) -> None:
        import ray

        for actor in self.ranks:  # the store host stays: the next start uses a fresh key prefix
            with contextlib.suppress(Exception):  # already dead: nothing to stop
                ray.kill(actor, no_restart=True)

    def _call(self, verb: str, *args: Any, per_rank: list[tuple] | None = None, startup: bool = False) -> list:
        """``verb`` on every rank at once; the ranks' results in rank order."""
        return self._alongside(verb, args, lambda: None, per_rank=per_rank, startup=startup)[0]

    def _alongside(
        self, verb: str, args: tuple, alongside: Callable[[], T], per_rank: list[tuple] | None = None, startup: bool = False
    ) -> tuple[list, T]:
        """``verb`` on every rank, and ``alongside()`` here while they run; (ranks' results, its result)."""
        with self._lock:
            if self.offloaded and verb not in _OFF_DEVICE:
                self.onload()
            calls = {
                f"trainer rank {r}": (t, getattr(t, verb).remote(*(per_rank[r] if per_rank else args)))
                for r, t in enumerate(self.ranks)
            }
            try:
                other = alongside()
            except BaseException:
                with contextlib.suppress(Exception):  # the ranks' half cannot finish without the other half
                    wait_calls(calls, f"trainer.{verb}", 1.0)
                raise
            try:
                out = wait_calls(calls, f"trainer.{verb}", self.deadlines.startup_s if startup else self.deadlines.call_s)
            except (ActorLost, CallTimeout) as err:
                raise TrainerFailed(str(err)) from err
            return [out[name] for name in calls], other

    # -- typed verbs -------------------------------------------------------------------------
    def forward(self, batch: ForwardBatch) -> ForwardOutputs:
        """Forward-only scores of every row: each rank scores rows ``rank::world``."""
        world = len(self.ranks)
        parts: list[ForwardOutputs] = self._call("forward", per_rank=[(batch.shard(r, world),) for r in range(world)])
        joined = {}
        for f in dataclasses.fields(ForwardOutputs):
            if getattr(parts[0], f.name) is None:
                continue
            full = torch.zeros(batch.input_ids_BT.shape)
            for r, p in enumerate(parts):
                full[r::world] = getattr(p, f.name)
            joined[f.name] = full
        return ForwardOutputs(**joined)

    def train(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on a mini-batch (its counts already global); the reduced metrics."""
        world = len(self.ranks)
        self.pushed_current = False
        return self._call("train", per_rank=[(batch.shard(r, world),) for r in range(world)])[0]

    def push_weights(self, version: int, wire_dtype: str | None = None) -> tuple[list, dict[str, float]]:
        """Collective gather; rank 0's bucket refs (in Ray's object store) and sync stats."""
        with self._lock:
            out = self._call("push_weights", version, wire_dtype)[0]
            self.pushed_current = True
            return out

    def join_update_group(self, info: Any, alongside: Callable[[], T], per_rank: list[tuple] | None = None) -> T:
        """Rank 0 joins the model-update group ``info`` while ``alongside()`` joins the receivers;
        ``per_rank``: each rank's own ``(info,)`` instead (ipc: one pair group per rank, None: none)."""
        return self._alongside("join_update_group", (info,), alongside, per_rank=per_rank)[1]

    def broadcast_weights(
        self, version: int, wire_dtype: str | None, restore: bool, alongside: Callable[[], T]
    ) -> tuple[dict[str, float], T]:
        """Rank 0 broadcasts ``version`` over the update group while ``alongside()`` receives it;
        (rank 0's sync stats, its result)."""
        with self._lock:
            out, other = self._alongside("broadcast_weights", (version, wire_dtype, restore), alongside)
            self.pushed_current = True
            return out[0], other

    def probe(self, token_ids: list[list[int]]) -> list[list[float]]:
        return self._call("probe", token_ids)[0]

    def save(self, root: str, step: int, extra: dict[str, Any], keep_last: int) -> str:
        return self._call("save", root, step, extra, keep_last)[0]

    def load(self, path: str) -> dict[str, Any]:
        self.pushed_current = False
        return self._call("load", path)[0]

    def find(self, resume: str, root: str) -> str | None:
        return self._call("find", resume, root)[0]

    def export(self, out_dir: str) -> str:
        return self._call("export", out_dir)[0]

    def offload(self) -> None:
        """``trainer.offload``: every rank's weights and optimizer state to host memory (the
        engines are about to generate on the shared devices); otherwise, or offloaded already,
        nothing. The next other verb brings them back (:meth:`onload`)."""
        if self.spec.trainer.offload and not self.offloaded:
            with self._lock:
                self.offload_stats.update(self._call("offload")[0])
                self.offloaded = True

    def onload(self) -> None:
        """The ranks' weights and optimizer state back to their devices (before any verb that uses them)."""
        if self.offloaded:
            with self._lock:
                self.offloaded = False
                self.offload_stats.update(self._call("onload")[0])
