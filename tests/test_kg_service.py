"""The knowledge graph as a service: per-user and shared graphs, queries, durability across restarts."""
import os
import signal

import pytest

from llmos import SyscallError
from fixtures_models import tiny_models  # noqa: F401
from conftest import wait_for


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


def test_spawn_with_kg_puts_the_facts_before_the_prompt(start_kernel, tiny_models):
    k = start_kernel("--service", "kg", "--device", "cpu", "--kv-blocks", "64", "--block-size", "4",
                     model=tiny_models["llama"])
    with k.client() as root:
        wait_for(lambda: kg_up(root))
        alice = k.client(root.user_add("alice")["token"])
    alice.call("kg_add", triples=[["Alice", "works_at", "Acme"], ["Acme", "located_in", "Paris"],
                                  ["Zed", "likes", "tea"]])
    plain = alice.spawn(prompt="Where does Alice work?", max_tokens=2)
    pid = alice.spawn(prompt="Where does Alice work?", max_tokens=2, kg=True)
    info = alice.pinfo(pid)
    assert any("Acme" in f for f in info["kg_facts"]) and not any("Zed" in f for f in info["kg_facts"])
    assert info["tokens_in"] > alice.pinfo(plain)["tokens_in"]           # the facts really went in
    chat = alice.spawn(messages=[{"role": "user", "content": "Tell me about Acme"}], max_tokens=2, kg="mine")
    assert alice.pinfo(chat)["kg_facts"]
    with pytest.raises(SyscallError) as e:
        alice.spawn(prompt_ids=[10, 11], kg=True)
    assert e.value.errno == "EINVAL"
    for p in (plain, pid, chat):
        alice.wait(p)


def test_spawn_with_kg_and_no_kg_service_is_eagain(start_kernel, tiny_models):
    k = start_kernel("--device", "cpu", "--kv-blocks", "64", "--block-size", "4", model=tiny_models["llama"])
    with k.client() as c, pytest.raises(SyscallError) as e:
        c.spawn(prompt="hi", kg=True)
    assert e.value.errno == "EAGAIN"
