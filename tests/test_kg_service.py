"""The knowledge graph as a service: per-user and shared graphs, queries, durability across restarts."""
import os
import signal

import pytest

from llmos import SyscallError
from test_services import wait_for


def kg_up(c, restarts=0) -> bool:
    return any(s["name"] == "kg" and s["state"] == "up" and s["restarts"] == restarts for s in c.svc_list())


@pytest.fixture
def kg_kernel(start_kernel):
    k = start_kernel("--service", "kg")
    with k.client() as root:
        wait_for(lambda: kg_up(root))
        k.alice = k.client(root.user_add("alice")["token"])
        k.bob = k.client(root.user_add("bob")["token"])
    return k


def test_facts_query_neighbors_path_search_through_the_kernel(kg_kernel):
    a = kg_kernel.alice
    added = a.call("kg_add", triples=[["Alice", "works_at", "Acme"], ["Bob", "works_at", "Acme"],
                                      ["Acme", "located_in", "Paris"]], source="hr.csv")
    assert added == {"added": 3}
    got = a.call("kg_query", pattern=["?x", "works_at", "Acme"])
    assert sorted(b["?x"] for b in got) == ["Alice", "Bob"]
    joined = a.call("kg_query", pattern=[["?x", "works_at", "?c"], ["?c", "located_in", "Paris"]])
    assert sorted(b["?x"] for b in joined) == ["Alice", "Bob"]
    assert {n["name"] for n in a.call("kg_neighbors", entity="acme")["nodes"]} >= {"Alice", "Bob", "Paris"}
    assert [t["r"] for t in a.call("kg_path", a="Alice", b="Paris")] == ["works_at", "located_in"]
    assert a.call("kg_search", text="acm")[0]["name"] == "Acme"
    facts = a.call("kg_facts", text="Where does Alice work?", max_tokens=50)
    assert any("Acme" in f for f in facts)
    assert kg_kernel.bob.call("kg_query", pattern=["?x", "works_at", "Acme"]) == []   # alice's graph is hers
    with pytest.raises(SyscallError) as e:
        a.call("kg_add", triples=[["", "x", "y"]])
    assert e.value.errno == "EINVAL"


def test_acknowledged_facts_survive_a_killed_service(kg_kernel):
    a = kg_kernel.alice
    a.call("kg_add", triples=[["Paris", "capital_of", "France"]])
    with kg_kernel.client() as root:
        pid = next(s["pid"] for s in root.svc_list() if s["name"] == "kg")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: kg_up(root, restarts=1))
    assert a.call("kg_query", pattern=["Paris", "capital_of", "?c"]) == [{"?c": "France"}]
