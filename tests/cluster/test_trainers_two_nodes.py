"""Trainer ranks on two nodes (#11, multi-node trainers): a GRPO step on a real two-node Ray
cluster (loopback), FSDP2 world size 2 with ``cluster.placement_strategy: SPREAD`` so that rank 0
and rank 1 land on different nodes. The ranks meet through the TCP store served on rank 0's node
(``posttrain.rl.trainers.StoreHost``); the step trains, syncs and passes the probe.

Both nodes share this machine's disk, so the run directory is reachable from each, as a real
multi-node run needs (README: run.output_dir on storage every node mounts).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from local_cluster import start_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    c = start_cluster(head_cpus=2, worker_cpus=2, dashboard=False)
    yield c
    c.stop()


def test_grpo_step_with_one_trainer_rank_on_each_node(cluster, tmp_path, repo_root):
    overrides = [
        "model.path=null", "model.factory={arch: llama, hidden_size: 64, num_layers: 2, num_heads: 2, num_kv_heads: 1, intermediate_size: 128}",
        "data.train.num_examples=32", "data.eval.num_examples=4", "eval.every_steps=0", "algorithm.prompts_per_step=4",
        "rollout.sampling.n=4", "rollout.sampling.max_tokens=5", "trainer.global_batch_size=16", "trainer.micro_batch_size=4",
        "trainer.world_size=2", "trainer.max_steps=1", "trainer.optim.lr=0.01", f"cluster.address={cluster.gcs_address}",
        "cluster.num_cpus=null", "cluster.placement_strategy=SPREAD", "checkpoint.export_hf=false", f"run.output_dir={tmp_path}",
        "run.name=two_nodes", "logging.wandb.enabled=false", "logging.progress=false",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "posttrain.cli", "run", os.path.join(repo_root, "recipes/grpo_tiny_arith.yaml"), *overrides]
    r = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=900, cwd=repo_root)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    line = re.search(r"trainer ranks on (\d+) node\(s\): rank 0: node (\w+) \(.*?\), rank 1: node (\w+)", out)
    assert line, out[-4000:]
    assert line.group(1) == "2" and line.group(2) != line.group(3)  # one rank on each node
    metrics = [json.loads(x) for x in open(os.path.join(tmp_path, "two_nodes", "metrics.jsonl"))]
    step = next(m for m in metrics if "time/step_s" in m)
    assert step["sync/probe_gap"] <= 1e-3 and step["sync/worker_version"] == 1.0  # the workers serve the trained weights
