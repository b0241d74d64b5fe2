"""A plain `posttrain run` starts its own local Ray even when this machine knows another one (#28.6):
a stale `ray start` record, or RAY_ADDRESS. Before: Ray joined it and refused num_cpus with
"ValueError: When connecting to an existing cluster, num_cpus and num_gpus must not be provided"."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from local_cluster import free_port

START = """
import logging, ray
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
from posttrain.rl.config import ClusterConfig
from posttrain.rl.placement import start_ray
start_ray(ClusterConfig(num_cpus=1))
print("CPUS", ray.cluster_resources().get("CPU"))
ray.shutdown()
"""


@pytest.mark.parametrize("how", ["stale_ray_start_record", "ray_address_env"])
def test_a_stale_ray_is_explained_and_a_local_one_started(how):
    tmp = tempfile.mkdtemp(prefix="pr", dir="/tmp")  # short: Ray's unix sockets live under it
    dead = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=tmp, RAY_USAGE_STATS_ENABLED="0")
    if how == "stale_ray_start_record":
        os.makedirs(os.path.join(tmp, "ray"))
        with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write(dead)
    else:
        env["RAY_ADDRESS"] = dead
    try:
        r = subprocess.run([sys.executable, "-c", START], env=env, capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CPUS 1.0" in r.stdout
    assert dead in r.stderr and "stale" in r.stderr and "cluster.address=auto" in r.stderr
