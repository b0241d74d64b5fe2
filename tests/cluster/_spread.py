"""Child process: on the cluster at argv[1], place a STRICT_SPREAD group of 2 bundles and report
which node each bundle's task ran on, plus where a task asking for the ``node2`` resource ran."""

from __future__ import annotations

import json
import sys

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


@ray.remote(num_cpus=1)
def where() -> dict[str, str]:
    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address()}


def main() -> None:
    ray.init(address=sys.argv[1], logging_level="ERROR")
    head = ray.get_runtime_context().get_node_id()  # this driver attached to the head node
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    ray.get(pg.ready(), timeout=60)
    placed = ray.get(
        [
            where.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
            ).remote()
            for i in range(2)
        ]
    )
    node2 = ray.get(where.options(resources={"node2": 1}).remote())
    remove_placement_group(pg)
    print("RESULT " + json.dumps({"head": head, "placed": placed, "node2": node2, "nodes": len(ray.nodes())}))


if __name__ == "__main__":
    main()
