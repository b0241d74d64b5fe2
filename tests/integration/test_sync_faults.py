"""A rollout worker that dies during a weight update (object store or collective), during the
probe, or while being woken or put to sleep (colocated) is replaced like one that dies during
generate: the replacement gets the newest weights, the step's probe passes, and the run ends with
every worker serving the trainer's version."""

from __future__ import annotations

import os
import signal
import sys

import pytest
from posttrain.rollout.actor import RolloutWorker
from test_async_staleness import _overrides, _run

pytestmark = pytest.mark.slow
KILL_FLAG = f"/tmp/posttrain_sync_kill_{os.getpid()}"


def _die_once() -> None:
    """The first worker to claim KILL_FLAG is SIGKILLed here (its call in flight)."""
    try:
        os.close(os.open(KILL_FLAG, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


class DiesInUpdate(RolloutWorker):
    def update_weights(self, buckets, version, restore=False):
        _die_once()
        return super().update_weights(buckets, version, restore)

    def receive_weights(self, version, restore=False):
        _die_once()
        return super().receive_weights(version, restore)


class DiesInProbe(RolloutWorker):
    def score_tokens(self, token_ids_list):
        _die_once()
        return super().score_tokens(token_ids_list)


class DiesInWake(RolloutWorker):
    def wake_up(self, tags=None):
        _die_once()
        return super().wake_up(tags)


class DiesInSleep(RolloutWorker):
    def sleep(self, level=1):
        _die_once()
        return super().sleep(level)


@pytest.fixture(scope="module", autouse=True)
def _ray():
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors cannot import the tests folder
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.parametrize(("worker", "transport"), [("DiesInUpdate", "object_store"), ("DiesInUpdate", "collective"), ("DiesInProbe", "object_store")])
def test_worker_dying_in_a_weight_call_is_replaced(tmp_path, repo_root, worker, transport):
    if os.path.exists(KILL_FLAG):
        os.remove(KILL_FLAG)
    extra = [
        "trainer.max_steps=2", "rollout.num_workers=2", "rollout.cpus_per_worker=0.5", f"sync.transport={transport}",
        f"rollout.worker={__name__}.{worker}",
    ]  # fmt: skip
    steps, _ = _run(repo_root, _overrides(tmp_path, f"{worker}_{transport}", extra), synchronous=True)
    assert os.path.exists(KILL_FLAG)  # a worker died
    assert steps[-1]["rollout/workers_replaced"] >= 1.0  # collective: a worker stuck on the aborted sender too
    for m in steps:  # every worker, the replacement included, serves the trainer's weights
        assert m["sync/probe_gap"] <= 1e-3 and m["sync/worker_version"] == m["step"]


@pytest.mark.parametrize("worker", ["DiesInWake", "DiesInSleep"])
def test_worker_dying_in_wake_or_sleep_is_replaced(tmp_path, repo_root, worker):
    """Colocated placement: a worker killed while being woken (before generate or a weight load)
    or put to sleep (after generate) is replaced, loaded with the newest weights, and the verb
    runs again on the replacement."""
    if os.path.exists(KILL_FLAG):
        os.remove(KILL_FLAG)
    extra = [
        "trainer.max_steps=2", "rollout.num_workers=2", "rollout.cpus_per_worker=0.5", "cluster.placement=colocated",
        f"rollout.worker={__name__}.{worker}",
    ]  # fmt: skip
    steps, _ = _run(repo_root, _overrides(tmp_path, worker, extra))
    assert os.path.exists(KILL_FLAG)  # a worker died
    assert steps[-1]["rollout/workers_replaced"] >= 1.0
    for m in steps:
        assert m["sync/probe_gap"] <= 1e-3 and m["sync/worker_version"] == m["step"]
