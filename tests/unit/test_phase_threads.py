"""Threads per phase (cluster.phase_threads): the update and generation each get every core of the
node when they alternate in time on a local Ray, the CPUs they reserved otherwise. No Ray started."""

from __future__ import annotations

import os

import pytest

from posttrain.rl.config import ClusterConfig, RolloutSection
from posttrain.rl.placement import PhaseThreads, actor_options, phase_threads, plan_placement

CORES = len(os.sched_getaffinity(0))


def test_alternating_phases_on_a_local_ray_use_every_core():
    t = phase_threads(ClusterConfig(), RolloutSection(), world=1, alternating=True)
    assert t == PhaseThreads(train=CORES, generate=CORES)
    assert t.metrics() == {"system/generate_threads": float(CORES)}


def test_cores_are_split_among_ranks_and_workers_that_run_at_once():
    t = phase_threads(ClusterConfig(num_cpus=64), RolloutSection(num_workers=2), world=4, alternating=True)
    assert t == PhaseThreads(train=max(1, CORES // 4), generate=max(1, CORES // 2))


def test_a_local_ray_with_fewer_cpus_than_the_machine_caps_the_threads():
    assert phase_threads(ClusterConfig(num_cpus=1), RolloutSection(), 1, True) == PhaseThreads(1, 1)


@pytest.mark.parametrize(
    "cluster, alternating",
    [
        (ClusterConfig(), False),  # the pipelined loop overlaps the phases
        (ClusterConfig(address="10.0.0.1:6379"), True),  # a joined cluster: nodes not visible here
        (ClusterConfig(phase_threads="reserved"), True),
    ],
)
def test_otherwise_each_actor_runs_on_the_cpus_it_reserved(cluster, alternating):
    cluster.cpus_per_trainer_rank = 3.0
    assert phase_threads(cluster, RolloutSection(cpus_per_worker=2.0), 1, alternating) == PhaseThreads(3, 2)


def test_all_gives_every_core_even_to_overlapping_phases():
    assert phase_threads(ClusterConfig(phase_threads="all"), RolloutSection(), 1, False) == PhaseThreads(CORES, CORES)


def test_plan_carries_the_threads_and_colocated_placement_alternates():
    assert plan_placement(ClusterConfig(), RolloutSection(), 1).threads == PhaseThreads(1, 1)
    assert plan_placement(ClusterConfig(), RolloutSection(), 1, alternating=True).threads == PhaseThreads(CORES, CORES)
    colocated = plan_placement(ClusterConfig(placement="colocated"), RolloutSection(), 1)
    assert colocated.threads == PhaseThreads(CORES, CORES)


def test_threads_reach_the_actor_as_its_openmp_environment():
    assert "runtime_env" not in actor_options(None, 0, {"CPU": 1.0})
    opts = actor_options(None, 0, {"CPU": 1.0}, threads=2)
    assert opts["runtime_env"] == {"env_vars": {"OMP_NUM_THREADS": "2"}} and opts["num_cpus"] == 1.0


def test_unknown_policy_is_a_config_error_naming_the_fix():
    key, problem, fix = ClusterConfig(phase_threads="half").validate()
    assert key == "phase_threads" and "half" in problem and "auto" in fix
