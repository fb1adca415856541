"""A cluster across simulated nodes (``ray.cluster_utils.Cluster``: one raylet per node): kernels
spread one per node by the placement group, reached over CURVE, services reached from other
nodes, and a node drained by its id."""
from __future__ import annotations

import os

import pytest
from cluster_proc import ClusterProc
from conftest import wait_for

os.environ.setdefault("RAY_AUTH_MODE", "token")


@pytest.fixture(scope="module")
def nodes():
    from ray.cluster_utils import Cluster
    ray_cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                                "object_store_memory": 96 << 20})
    for _ in range(2):
        ray_cluster.add_node(num_cpus=1, object_store_memory=96 << 20)
    cl = ClusterProc("--device", "cpu", "--dtype", "float32", "--address", ray_cluster.address, kernels=3).start()
    yield cl
    cl.cleanup()
    ray_cluster.shutdown()


def test_kernels_spread_one_per_node_and_serve_across_them(nodes):
    with nodes.client() as c:
        st = c.cluster()
        assert sum(n["alive"] for n in st["nodes"]) == 3
        kernels = [k for k in st["kernels"] if k["state"] == "up"]
        assert len({k["node"] for k in kernels}) == 3                 # STRICT_SPREAD
        wait_for(lambda: {s["name"] for s in c.svc_list() if s["state"] == "up"} >= {"fs", "kg"}, timeout=120)
        c.call("kg_add", triples=[["Ada", "works_at", "Acme"]])
        far = next(k for k in kernels if k["kernel"] != 0)
        pid = c.spawn(prompt="Where does Ada work?", max_tokens=8, kg=True, node=far["node"])
        info = c.pinfo(pid)                                           # the graph, from another node
        assert info["kernel"] == far["kernel"] and any("Acme" in f for f in info["kg_facts"])
        c.kill(pid, sig="STOP")
        r = c.cluster_drain(node=far["node"])                         # drain a node by its id
        assert r["kernels"] == [far["kernel"]] and r["moved"] == [pid] and r["failed"] == []
        c.kill(pid, sig="CONT")
        assert c.wait(pid)["usage"]["completion_tokens"] == 8
        assert far["kernel"] not in [k["kernel"] for k in c.cluster()["kernels"] if k["state"] == "up"]
