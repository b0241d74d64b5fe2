"""Child process: start posttrain's local Ray plus one actor, print every listening socket as JSON.

Run as a script so the Ray it starts (and its process-wide settings) never touch the test process.
"""

from __future__ import annotations

import json
import os

import psutil
import ray

from posttrain.rl.config import ClusterConfig
from posttrain.rl.placement import start_ray


@ray.remote(num_cpus=1)
class Probe:
    def pid(self) -> int:
        return os.getpid()


def main() -> None:
    start_ray(ClusterConfig(num_cpus=1))
    actor_pid = ray.get(Probe.remote().pid.remote())
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    listening = []
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    listening.append({"pid": p.pid, "name": p.name(), "ip": c.laddr.ip, "port": c.laddr.port})
        except psutil.NoSuchProcess:
            pass
    nodes = [n["NodeManagerAddress"] for n in ray.nodes()]
    out = {
        "pids": [p.pid for p in procs],
        "actor_pid": actor_pid,
        "listening": listening,
        "nodes": nodes,
        "auth_mode": os.environ.get("RAY_AUTH_MODE"),
    }
    ray.shutdown()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
