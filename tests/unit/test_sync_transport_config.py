"""``sync.transport`` against the placement (posttrain/sync/config.py): ipc is the default for
colocated placement on GPU, and colocated + collective on GPU (two NCCL ranks on one GPU) is
refused before anything starts, naming the fix."""

from __future__ import annotations

import os

import pytest

from posttrain.sync.config import SyncConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU_RECIPE = os.path.join(REPO, "recipes", "grpo_gpu_qwen_1p5b.yaml")


def test_gpu_recipe_with_collective_is_refused_at_dry_run_naming_ipc(run_cli, tmp_path):
    code, _, err = run_cli("run", GPU_RECIPE, "sync.transport=collective", f"run.output_dir={tmp_path}", "--dry-run")
    assert code == 2, err
    assert "sync.transport" in err and "Duplicate GPU" in err and "fix: set sync.transport=ipc" in err


@pytest.mark.parametrize(
    ("placement", "on_gpu", "want"),
    [("colocated", True, "ipc"), ("colocated", False, "object_store"), ("disaggregated", True, "object_store")],
)
def test_unset_transport_follows_the_placement(placement, on_gpu, want):
    assert SyncConfig().resolved_transport(placement, on_gpu) == want
    assert SyncConfig().check_placement(placement, on_gpu, 1, 1) is None


def test_ipc_needs_each_worker_on_a_trainer_ranks_device():
    ipc = SyncConfig(transport="ipc")
    assert ipc.check_placement("colocated", True, 2, 2) is None
    key, problem, fix = ipc.check_placement("disaggregated", True, 2, 2)
    assert key == "sync.transport" and "colocated" in fix
    key, problem, fix = ipc.check_placement("colocated", False, 3, 2)
    assert "num_workers=3" in problem and "rollout.num_workers <= 2" in fix
    # collective stays fine where every rank has its own GPU, and on CPU (gloo shares a host freely)
    assert SyncConfig(transport="collective").check_placement("disaggregated", True, 2, 2) is None
    assert SyncConfig(transport="collective").check_placement("colocated", False, 1, 1) is None
