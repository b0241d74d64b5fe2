"""`posttrain submit --dry-run` (job spec + placement), describe_placement, and joining a cluster
that is not there: fast, no Ray started."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml
from local_cluster import free_port

from posttrain.rl.config import ClusterConfig, RolloutSection
from posttrain.rl.placement import ClusterError, describe_placement, start_ray

TINY = "model.factory={arch: llama, hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, intermediate_size: 64}"


def test_submit_dry_run_of_rl_recipe_prints_job_and_placement(repo_root, run_cli, tmp_path):
    recipe = os.path.join(repo_root, "recipes/grpo_tiny_arith.yaml")
    code, out, err = run_cli(
        "submit",
        recipe,
        "--dry-run",
        "--job-dir",
        str(tmp_path),
        "model.path=null",
        TINY,
        "rollout.num_workers=2",
    )
    assert code == 0, err
    spec = yaml.safe_load(out)
    assert "$POSTTRAIN run" in spec["entrypoint"] and spec["entrypoint"].endswith("cluster.address=auto")
    assert (
        f"cd {tmp_path}" in spec["entrypoint"]
        and '"$PROJECT"/recipes/grpo_tiny_arith.yaml' in spec["entrypoint"]
    )
    env = spec["runtime_env"]
    assert env["working_dir"] == repo_root and {".venv", "runs", ".git"} <= set(env["excludes"])
    assert spec["run_dir"] == os.path.join(tmp_path, "runs", "grpo_tiny_arith")
    roles = spec["placement"]["roles"]
    assert roles["trainer"] == {"actors": 1, "per_actor": {"CPU": 1.0, "GPU": 0.0}, "bundles": [0]}
    assert roles["rollout"]["actors"] == 2 and roles["rollout"]["bundles"] == [1, 2]
    assert spec["placement"]["totals"]["CPU"] == 3.0
    assert [b["actors"] for b in spec["placement"]["bundles"]] == [
        ["trainer[0]"],
        ["rollout[0]"],
        ["rollout[1]"],
    ]


def test_describe_placement_colocated_shares_bundles():
    plan = describe_placement(ClusterConfig(placement="colocated"), RolloutSection(num_workers=2), 2)
    assert [b["actors"] for b in plan["bundles"]] == [
        ["trainer[0]", "rollout[0]"],
        ["trainer[1]", "rollout[1]"],
    ]
    assert plan["roles"]["trainer"]["per_actor"]["CPU"] == 0.5 and plan["totals"]["CPU"] == 2.0


def test_submit_rejects_recipe_outside_the_project(repo_root, run_cli, tmp_path):
    outside = shutil.copy(os.path.join(repo_root, "recipes/sft_tiny_arith.yaml"), tmp_path / "mine.yaml")
    code, _, err = run_cli("submit", str(outside), "--dry-run")
    assert code == 2 and "outside the project" in err and "fix:" in err


def test_join_of_an_address_nobody_answers_fails_fast():
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match="no Ray cluster answered.*\n  fix: start one"):
        start_ray(ClusterConfig(address=f"127.0.0.1:{free_port()}"))
    assert time.monotonic() - t0 < 15  # not Ray's minutes of retries


def _posttrain_on_cluster(shell: str, path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f'{shell} && echo "POSTTRAIN=$POSTTRAIN"'], env={"PATH": path},
                          capture_output=True, text=True, timeout=60)


def test_job_finds_posttrain_when_the_cluster_path_lacks_the_venv():
    from posttrain.cluster import NOT_FOUND_EXIT, find_posttrain_shell

    r = _posttrain_on_cluster(find_posttrain_shell(), "/usr/bin:/bin")  # before: `posttrain: not found`
    assert r.returncode == 0 and f"POSTTRAIN={sys.executable} -m posttrain.cli" in r.stdout
    r = _posttrain_on_cluster(find_posttrain_shell("/nonexistent/python"), "/usr/bin:/bin")
    assert r.returncode == NOT_FOUND_EXIT and "not found on the Ray cluster" in r.stderr and "fix:" in r.stderr


def test_submit_sends_the_token_of_a_token_auth_cluster(tmp_path, monkeypatch):
    from posttrain.cluster import auth_headers

    token = tmp_path / "auth_token"
    token.write_text("abc123\n")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert auth_headers() == {"Authorization": "Bearer abc123"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "xyz")
    assert auth_headers() == {"Authorization": "Bearer xyz"}
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # Ray's own client adds it then
    assert auth_headers() == {}
