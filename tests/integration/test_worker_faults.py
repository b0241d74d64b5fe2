"""A rollout worker SIGKILLed mid-generation, in the synchronous loop and in the asynchronous one
(max_staleness=2): it is replaced, its requests re-dispatched, and the sample ledger shows every
prompt of the stream trained exactly once, within the staleness bound."""

from __future__ import annotations

import os
from collections import Counter

import pytest
from test_async_staleness import _overrides, _ray, _run, _staleness  # noqa: F401 (_ray: autouse fixture)

pytestmark = pytest.mark.slow
STEPS, PROMPTS, N = 3, 4, 4


@pytest.mark.parametrize("k", [0, 2])
def test_killed_rollout_worker_is_replaced_and_nothing_is_lost(tmp_path, repo_root, k):
    import slow_worker

    if os.path.exists(slow_worker.KILL_FLAG):
        os.remove(slow_worker.KILL_FLAG)
    extra = [
        f"trainer.max_steps={STEPS}", f"algorithm.max_staleness={k}", "rollout.num_workers=2", "rollout.cpus_per_worker=0.5",
        "rollout.worker=slow_worker.KilledOnceWorker", "algorithm.loss.tis_cap=2.0",
    ]  # fmt: skip
    steps, ledger = _run(repo_root, _overrides(tmp_path, f"kill_k{k}", extra), synchronous=(k == 0))
    assert os.path.exists(slow_worker.KILL_FLAG)  # a worker was killed
    assert steps[-1]["rollout/workers_replaced"] == 1.0
    # the ledger: every (prompt ordinal, sample) of the stream's first STEPS*PROMPTS prompts exactly once
    keys = Counter((r["ordinal"], r["sample"]) for r in ledger)
    assert set(keys.values()) == {1} and len(keys) == STEPS * PROMPTS * N
    assert sorted({r["ordinal"] for r in ledger}) == list(range(STEPS * PROMPTS))
    assert max(_staleness(r) for r in ledger) <= k
    for m in steps:  # the replacement serves the trainer's weights: probe and versions agree
        assert m["sync/probe_gap"] <= 1e-3 and m["sync/worker_version"] == m["step"]


def test_worker_deaths_past_the_limit_stop_the_run(tmp_path, repo_root):
    import slow_worker

    from posttrain.rl.fleet import RolloutWorkerLost

    if os.path.exists(slow_worker.KILL_FLAG):
        os.remove(slow_worker.KILL_FLAG)
    extra = ["trainer.max_steps=2", "rollout.worker=slow_worker.KilledOnceWorker", "rollout.max_worker_restarts=0"]
    with pytest.raises(RolloutWorkerLost, match="max_worker_restarts=0"):
        _run(repo_root, _overrides(tmp_path, "kill_limit", extra), synchronous=True)
