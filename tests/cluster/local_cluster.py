"""A real two-node Ray cluster on loopback for tests: `ray start --head` plus a second `ray start`.

Every port is chosen free, the temp dir is private and token auth uses a private token, so the
cluster collides with no other Ray on the machine; ``stop()`` ends exactly the processes it started.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import psutil

# Ray replaces a loopback node address by the machine's external IP (binding its servers to all
# interfaces) unless multi-node clustering is off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), and with it
# off `ray start --address` refuses to add a node. So: every process of the cluster, and every driver,
# runs with it off (they keep 127.0.0.1), and only the `ray start` commands turn it back on in-process
# and keep the loopback address as given. Test scaffolding: a loopback-only two-node cluster.
_RAY_START = (
    "import sys, ray._private.ray_constants as c, ray._private.services as s; "
    "c.ENABLE_RAY_CLUSTER = True; s.resolve_ip_for_localhost = lambda h: h; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())"
)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: every socket stays bound until all are picked, so the kernel cannot
    hand the same port out twice (two Ray components on one port fail `ray start`)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


@dataclass
class LocalCluster:
    temp_dir: str
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]
    pids: list[int] = field(default_factory=list)

    def stop(self) -> None:
        """`ray stop` cannot be scoped to one temp dir, so kill this cluster's process trees by pid."""
        procs = []
        for pid in self.pids:
            try:
                p = psutil.Process(pid)
                procs += [p, *p.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        procs += _processes_using(self.temp_dir)
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _processes_using(temp_dir: str) -> list[psutil.Process]:
    """Ray daemons detach from `ray start`; find them by the private temp dir on their command line."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in a for a in p.info["cmdline"] or []):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def _ray_start(args: list[str], env: dict[str, str]) -> None:
    r = subprocess.run(
        [sys.executable, "-c", _RAY_START, "start", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if r.returncode != 0:
        raise RuntimeError(f"ray start {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def start_cluster(head_cpus: int = 2, worker_cpus: int = 2, dashboard: bool = True) -> LocalCluster:
    """Head (``head_cpus``) + a second node (``worker_cpus``, resource ``node2``), all on 127.0.0.1."""
    temp_dir = tempfile.mkdtemp(prefix="ptray_", dir="/tmp")  # short: Ray's unix sockets live here
    token_path = os.path.join(temp_dir, "auth_token")
    with open(token_path, "w") as f:
        f.write(secrets.token_hex(32))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": token_path,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # see _RAY_START
        # as a cluster started outside the venv: its PATH has no `posttrain` (the job's entrypoint finds it)
        "PATH": os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != os.path.dirname(sys.executable)),
    }
    env.pop("RAY_ADDRESS", None)
    gcs_port, dash_port, client_port, *spare = free_ports(3 + 12)
    spare_iter = iter(spare)
    cluster = LocalCluster(temp_dir, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}", env)

    def node_ports() -> list[str]:  # six distinct ports per node, none shared with another node's
        flags = [
            "node-manager",
            "object-manager",
            "dashboard-agent-listen",
            "dashboard-agent-grpc",
            "runtime-env-agent",
            "metrics-export",
        ]
        return [f"--{f}-port={next(spare_iter)}" for f in flags]

    try:
        head = [
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            f"--num-cpus={head_cpus}",
            "--num-gpus=0",
        ]
        head += [f"--temp-dir={temp_dir}", f"--ray-client-server-port={client_port}", *node_ports()]
        head += [
            f"--include-dashboard={str(dashboard).lower()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
        ]
        _ray_start(head, env)
        worker = [
            f"--address={cluster.gcs_address}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={worker_cpus}",
            "--num-gpus=0",
        ]
        worker += ['--resources={"node2": 1}', f"--temp-dir={temp_dir}", *node_ports()]
        _ray_start(worker, env)
        cluster.pids = [p.pid for p in _processes_using(temp_dir)]
        _wait_for_nodes(cluster, 2)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for_nodes(cluster: LocalCluster, n: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address='{cluster.gcs_address}', logging_level='ERROR'); "
             "print(sum(1 for x in ray.nodes() if x['Alive']))"],
            env=cluster.env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if r.returncode == 0 and r.stdout.strip().splitlines()[-1] == str(n):
            return
        time.sleep(1)
    raise RuntimeError(f"the cluster did not reach {n} nodes in {timeout_s:.0f} s")
