"""The knowledge graph engine (llmos.services.kg): facts, queries, access, durability, augmentation."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import networkx as nx
import pytest

from llmos.services.kg import GraphStore, KgError
from llmos.services.kg import wal as wal_module

ALICE, BOB, ROOT = 1001, 1002, 0

FACTS = [
    ("Alice", "works_at", "Acme"),
    ("Bob", "works_at", "Acme"),
    ("Carol", "works_at", "Initech"),
    ("Acme", "located_in", "Paris"),
    ("Initech", "located_in", "Austin"),
    ("Paris", "capital_of", "France"),
    ("Alice", "knows", "Carol"),
]


@pytest.fixture
def make_store(tmp_path):
    """Open (or reopen) a store under one directory; closes whatever is still open at the end."""
    opened: list[GraphStore] = []

    def make(**kw) -> GraphStore:
        for store in opened:
            store.close()
        opened.append(GraphStore(tmp_path / "kg", **kw))
        return opened[-1]

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store) -> GraphStore:
    s = make_store()
    s.add(ALICE, FACTS, source="fixture")
    return s


def triples(store: GraphStore, uid: int, graph: str = "mine") -> set[tuple[str, str, str]]:
    rows = [json.loads(line) for line in store.export(uid, graph).splitlines()]
    return {(r["s"], r["r"], r["o"]) for r in rows if "s" in r}


# -- add and query ----------------------------------------------------------------------------

def test_add_returns_the_number_of_items_accepted(make_store):
    s = make_store()
    assert s.add(ALICE, FACTS) == len(FACTS)
    assert s.add(ALICE, [{"s": "Dave", "r": "works_at", "o": "Acme", "props": {"since": 2021}},
                         {"entity": "Acme", "type": "company"}]) == 2
    assert s.stats(ALICE)["num_triples"] == len(FACTS) + 1


@pytest.mark.parametrize("bad, words", [
    (("", "works_at", "Acme"), "subject is empty"),
    (("Alice", 7, "Acme"), "relation must be a string"),
    (("Alice", "works_at", "   "), "object is empty"),
    (("A" * 300, "works_at", "Acme"), "limit is 256"),
    (("?x", "works_at", "Acme"), "query variable"),
    (("Alice", "works_at"), "expected (subject, relation, object)"),
    ({"s": "Alice", "r": "r", "o": "B", "props": {"x": object()}}, "not plain JSON"),
])
def test_invalid_triples_are_refused_with_einval_and_nothing_is_written(store, bad, words):
    with pytest.raises(KgError) as err:
        store.add(ALICE, [("Zed", "likes", "Tea"), bad])
    assert err.value.errno == "EINVAL" and words in err.value.message
    assert "item 1" in err.value.message
    assert store.query(ALICE, ("Zed", "?r", "?o")) == []


def test_query_binds_variables_case_insensitively(store):
    assert store.query(ALICE, ("?who", "works_at", "ACME")) == [{"?who": "Alice"}, {"?who": "Bob"}]
    assert store.query(ALICE, ("alice", "?rel", "?what")) == [
        {"?rel": "works_at", "?what": "Acme"}, {"?rel": "knows", "?what": "Carol"}]


def test_query_joins_patterns_on_shared_variables(store):
    pattern = [("?x", "works_at", "?c"), ("?c", "located_in", "?city"), ("?city", "capital_of", "France")]
    assert store.query(ALICE, pattern) == [
        {"?x": "Alice", "?c": "Acme", "?city": "Paris"}, {"?x": "Bob", "?c": "Acme", "?city": "Paris"}]
    assert store.query(ALICE, [("?x", "works_at", "?c"), ("?c", "located_in", "Austin")]) == [
        {"?x": "Carol", "?c": "Initech"}]


def test_query_respects_its_limit_and_unknown_constants_match_nothing(store):
    assert len(store.query(ALICE, ("?s", "?r", "?o"), limit=3)) == 3
    assert store.query(ALICE, ("Nobody", "works_at", "?c")) == []
    with pytest.raises(KgError) as err:
        store.query(ALICE, ("?", "works_at", "?c"))
    assert err.value.errno == "EINVAL"


def test_each_triple_records_who_added_it_when_and_from_where(store):
    before = time.time()
    store.add(ALICE, [("Eve", "audits", "Acme")], source="chat 42")
    edges = store.neighbors(ALICE, "Eve")["edges"]
    assert len(edges) == 1
    prov = edges[0]["provenance"]
    assert prov["uid"] == ALICE and prov["source"] == "chat 42"
    assert before - 1 <= prov["time"] <= time.time() + 1


def test_adding_a_known_triple_merges_props_and_keeps_first_provenance(store):
    store.add(ALICE, [{"s": "alice", "r": "WORKS_AT", "o": "acme", "props": {"role": "cto"}}], source="later")
    (edge,) = [e for e in store.neighbors(ALICE, "Alice")["edges"] if e["o"] == "Acme"]
    assert edge["props"] == {"role": "cto"} and edge["provenance"]["source"] == "fixture"
    assert edge["s"] == "Alice"  # the first spelling is kept
    assert store.stats(ALICE)["num_triples"] == len(FACTS)


# -- neighbours, paths, search ----------------------------------------------------------------

def test_neighbors_follow_depth_and_direction(store):
    one = store.neighbors(ALICE, "alice")
    assert {n["name"] for n in one["nodes"]} == {"Alice", "Acme", "Carol"}
    two = store.neighbors(ALICE, "Alice", depth=2)
    assert {n["name"]: n["depth"] for n in two["nodes"]} == {
        "Alice": 0, "Acme": 1, "Carol": 1, "Bob": 2, "Paris": 2, "Initech": 2}
    inbound = store.neighbors(ALICE, "Acme", direction="in")
    assert {n["name"] for n in inbound["nodes"]} == {"Acme", "Alice", "Bob"}


def test_neighbors_relation_filter_walks_only_that_relation(store):
    result = store.neighbors(ALICE, "Alice", depth=3, relation="works_at")
    assert {n["name"] for n in result["nodes"]} == {"Alice", "Acme", "Bob"}
    assert {e["r"] for e in result["edges"]} == {"works_at"}


def test_neighbors_of_an_unknown_entity_is_enoent(store):
    with pytest.raises(KgError) as err:
        store.neighbors(ALICE, "Nobody")
    assert err.value.errno == "ENOENT"


def test_path_returns_the_triples_along_a_shortest_path(store):
    assert [(t["s"], t["r"], t["o"]) for t in store.path(ALICE, "Bob", "france")] == [
        ("Bob", "works_at", "Acme"), ("Acme", "located_in", "Paris"), ("Paris", "capital_of", "France")]
    assert len(store.path(ALICE, "Bob", "Austin")) == 5  # Bob-Acme-Alice-Carol-Initech-Austin


def test_path_is_enoent_without_a_path_or_entity(store):
    store.add(ALICE, [("Island", "near", "Islet")])
    for a, b in [("Alice", "Island"), ("Alice", "Nobody")]:
        with pytest.raises(KgError) as err:
            store.path(ALICE, a, b)
        assert err.value.errno == "ENOENT"


def test_search_is_case_insensitive_then_substring_then_fuzzy(store):
    store.add(ALICE, [("ACME Corporation", "owns", "Acme"), ("Acme Labs", "part_of", "ACME Corporation")])
    assert [h["name"] for h in store.search(ALICE, "acme")][:3] == ["Acme", "Acme Labs", "ACME Corporation"]
    assert store.search(ALICE, "acme corp")[0]["name"] == "ACME Corporation"
    assert store.search(ALICE, "acme corpration")[0]["name"] == "ACME Corporation"  # a typo
    assert store.search(ALICE, "Pariss")[0]["name"] == "Paris"
    assert store.search(ALICE, "zzzzqqq") == []
    assert len(store.search(ALICE, "a", limit=2)) == 2


# -- removal ----------------------------------------------------------------------------------

def test_rm_removes_a_triple_or_an_entity_with_its_facts(store):
    assert store.rm(ALICE, ("alice", "knows", "carol")) == 1
    assert store.query(ALICE, ("Alice", "knows", "?x")) == []
    assert store.rm(ALICE, "Acme") == 3  # Alice and Bob work there, it is in Paris
    assert store.query(ALICE, ("?x", "works_at", "?c")) == [{"?x": "Carol", "?c": "Initech"}]
    assert store.search(ALICE, "Acme") == []
    with pytest.raises(KgError) as err:
        store.rm(ALICE, ("Alice", "knows", "Carol"))
    assert err.value.errno == "ENOENT"


# -- access -----------------------------------------------------------------------------------

def test_users_cannot_see_each_others_graphs(store):
    assert store.query(BOB, ("?s", "?r", "?o")) == []
    assert store.search(BOB, "Alice") == []
    with pytest.raises(KgError) as err:
        store.query(BOB, ("?s", "?r", "?o"), graph=f"user:{ALICE}")
    assert err.value.errno == "EPERM"
    assert len(store.query(ROOT, ("?s", "?r", "?o"), graph=f"user:{ALICE}")) == len(FACTS)


def test_everyone_reads_the_shared_graph_which_root_writes(store):
    store.add(ROOT, [("llmos", "written_in", "Python")], graph="shared")
    for uid in (ALICE, BOB):
        assert store.query(uid, ("llmos", "written_in", "?lang"), graph="shared") == [{"?lang": "Python"}]
    assert store.search(BOB, "llmos")[0]["graph"] == "shared"


def test_a_normal_user_writes_the_shared_graph_only_when_root_allows_it(make_store):
    s = make_store()
    with pytest.raises(KgError) as err:
        s.add(BOB, [("x", "y", "z")], graph="shared")
    assert err.value.errno == "EPERM"
    with pytest.raises(KgError) as err:
        s.allow_shared_write(ALICE, BOB)
    assert err.value.errno == "EPERM"
    s.allow_shared_write(ROOT, BOB)
    assert s.add(BOB, [("x", "y", "z")], graph="shared") == 1
    s = make_store()  # the grant is durable
    assert s.can_write_shared(BOB) and not s.can_write_shared(ALICE)
    s.allow_shared_write(ROOT, BOB, allowed=False)
    with pytest.raises(KgError):
        s.rm(BOB, "x", graph="shared")


# -- import and export ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["jsonl", "node_link"])
def test_export_then_import_round_trips(store, fmt):
    store.add(ALICE, [{"entity": "Acme", "type": "company", "props": {"size": 50}}, {"entity": "Lonely"},
                      {"s": "Bob", "r": "likes", "o": "Tea", "props": {"a": [1, 2]}}])
    data = store.export(ALICE, fmt=fmt)
    assert store.import_(BOB, data, fmt=fmt) > 0
    assert triples(store, BOB) == triples(store, ALICE)
    assert store.neighbors(BOB, "Acme")["nodes"][0] == {"name": "Acme", "type": "company",
                                                         "props": {"size": 50}, "depth": 0}
    assert store.search(BOB, "Lonely")[0]["name"] == "Lonely"
    edge = [e for e in store.neighbors(BOB, "Tea")["edges"]][0]
    assert edge["props"] == {"a": [1, 2]} and edge["provenance"]["uid"] == BOB  # the importer


def test_node_link_export_is_read_by_networkx(store):
    g = nx.node_link_graph(json.loads(store.export(ALICE, fmt="node_link")))
    assert isinstance(g, nx.MultiDiGraph)
    assert g.number_of_edges() == len(FACTS)
    assert g.nodes["acme"]["name"] == "Acme"
    assert g.edges["alice", "acme", "works_at"]["provenance"]["uid"] == ALICE


def test_bad_import_is_einval_and_adds_nothing(store):
    with pytest.raises(KgError) as err:
        store.import_(BOB, '{"s": "a", "r": "b", "o": "c"}\nnot json\n')
    assert err.value.errno == "EINVAL" and "line 2" in err.value.message
    with pytest.raises(KgError):
        store.import_(BOB, "{}", fmt="graphml")
    assert store.stats(BOB)["num_triples"] == 0


# -- durability -------------------------------------------------------------------------------

WRITER = """
import sys
from llmos.services.kg import GraphStore
root, run, compact_ops = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = GraphStore(root, compact_ops=compact_ops)
i = 0
while True:
    n = f"r{run}-{i}"
    store.add(1, [(n, "next", f"r{run}-{i + 1}"), (n, "in_run", f"run {run}"), {"entity": n, "type": "step"}],
              source=f"run {run}")
    print(i, flush=True)  # acknowledged: add() has returned
    i += 1
"""


def test_every_acknowledged_write_survives_sigkill(tmp_path):
    root, rng = tmp_path / "kg", random.Random(20240611)
    acked: dict[int, int] = {}
    for run in range(22):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(run), str(rng.choice([3, 8, 50]))],
                                stdout=subprocess.PIPE)
        first = proc.stdout.readline()  # the writer is running; now kill it at a random moment
        time.sleep(rng.uniform(0, 0.08))
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate()
        lines = (first + rest).split(b"\n")[:-1]  # a line without its newline was not acknowledged
        acked[run] = int(lines[-1]) if lines else -1

        with GraphStore(root, compact_ops=10_000) as s:  # opens cleanly: nothing corrupt
            for done, last in acked.items():
                steps = s.query(1, ("?a", "in_run", f"run {done}"), limit=10_000)
                count = len(steps)
                # Writes are sequential: what survived is a prefix, holding every acknowledged
                # write and at most the one in flight when the kill came.
                assert last + 1 <= count <= last + 2, (done, last, count)
                assert {b["?a"] for b in steps} == {f"r{done}-{i}" for i in range(count)}
                assert s.query(1, [(f"r{done}-{count - 1}", "next", "?b")]) == [{"?b": f"r{done}-{count}"}]
                node = s.neighbors(1, f"r{done}-{count - 1}", relation="in_run")
                assert node["nodes"][0]["type"] == "step"
                assert node["edges"][0]["provenance"]["source"] == f"run {done}"
    assert sum(a >= 0 for a in acked.values()) == 22


def test_a_torn_last_log_line_is_ignored_and_cut_off(make_store, tmp_path):
    s = make_store()
    s.add(ALICE, FACTS[:2])
    s.add(ALICE, FACTS[2:4])
    log = tmp_path / "kg" / f"user-{ALICE}" / "wal.jsonl"
    good = log.read_bytes()
    s.close()
    with open(log, "ab") as f:
        f.write(good.splitlines(keepends=True)[-1][:-9])  # a record cut short mid-append
    s = make_store()
    assert triples(s, ALICE) == set(FACTS[:4])
    assert log.read_bytes() == good
    s.add(ALICE, FACTS[4:])
    s = make_store()
    assert triples(s, ALICE) == set(FACTS)


def test_a_damaged_record_followed_by_good_ones_is_refused_not_skipped(make_store, tmp_path):
    s = make_store()
    for fact in FACTS[:3]:
        s.add(ALICE, [fact])
    s.close()
    log = tmp_path / "kg" / f"user-{ALICE}" / "wal.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(lines[0] + lines[1].replace(b"Bob", b"Rob") + lines[2])  # crc no longer matches
    s = make_store()
    with pytest.raises(KgError) as err:
        s.query(ALICE, ("?s", "?r", "?o"))
    assert err.value.errno == "EIO"


def test_compaction_shortens_the_log_and_keeps_the_contents(make_store, tmp_path):
    s = make_store(compact_ops=1_000_000)
    for i in range(40):
        s.add(ALICE, [(f"n{i}", "next", f"n{i + 1}")])
    assert s.stats(ALICE)["wal_ops"] == 40
    s = make_store(compact_ops=1_000_000)
    assert s.stats(ALICE)["replayed_at_open"] == 40
    before = s.export(ALICE)

    s = make_store(compact_ops=10)
    s.add(ALICE, [("n40", "next", "n41")])  # the log now holds 41 records: time to compact
    log = tmp_path / "kg" / f"user-{ALICE}" / "wal.jsonl"
    assert s.stats(ALICE)["wal_ops"] == 0 and log.stat().st_size == 0
    for i in range(41, 47):
        s.add(ALICE, [(f"n{i}", "next", f"n{i + 1}")])
    s = make_store(compact_ops=10)
    assert s.stats(ALICE)["replayed_at_open"] == 6  # start-up replays only what came after
    assert triples(s, ALICE) == {(f"n{i}", "next", f"n{i + 1}") for i in range(47)}
    assert set(s.export(ALICE).splitlines()) >= set(before.splitlines())


def test_records_already_in_a_snapshot_are_not_replayed(make_store, monkeypatch):
    s = make_store(compact_ops=1_000_000)
    s.add(ALICE, FACTS)
    s.rm(ALICE, "Acme")
    monkeypatch.setattr(wal_module.WriteAheadLog, "reset", lambda self: None)  # crash before truncating
    s.compact(ALICE)
    assert s.stats(ALICE)["wal_ops"] == 2
    s = make_store()
    assert s.stats(ALICE)["replayed_at_open"] == 0
    assert triples(s, ALICE) == {f for f in FACTS if "Acme" not in f}


def test_a_second_store_on_the_same_directory_is_ebusy(make_store, tmp_path):
    make_store()
    with pytest.raises(KgError) as err:
        GraphStore(tmp_path / "kg")
    assert err.value.errno == "EBUSY"


# -- augmentation -----------------------------------------------------------------------------

def test_facts_for_puts_mentioned_entities_first_then_neighbours(store):
    store.add(ALICE, [{"entity": "Acme", "type": "company"}])
    facts = store.facts_for(ALICE, "Does alice still work at ACME?", max_tokens=1000)
    assert facts == [
        "Alice works at Acme.",   # links two mentioned entities
        "Alice knows Carol.",
        "Acme is a company.",
        "Acme located in Paris.",
        "Bob works at Acme.",
        "Carol works at Initech.",  # neighbours' facts come last
        "Paris capital of France.",
    ]
    assert store.facts_for(ALICE, "Does alice still work at ACME?", max_tokens=1000) == facts


def test_facts_for_keeps_within_the_token_budget(store):
    text = "Tell me about Alice."
    everything = store.facts_for(ALICE, text, max_tokens=1000)
    count = lambda s: len(s.split())  # noqa: E731
    for budget in range(0, 20):
        kept = store.facts_for(ALICE, text, max_tokens=budget, count_tokens=count)
        assert sum(map(count, kept)) <= budget
        assert kept == [f for f in everything if f in kept]  # still in relevance order
    assert store.facts_for(ALICE, text, 8, count_tokens=count) == ["Alice works at Acme.", "Alice knows Carol."]
    assert store.facts_for(ALICE, text, 4, count_tokens=len) == []


def test_facts_for_matches_whole_words_longest_name_first(store):
    store.add(ALICE, [("Acme Labs", "part_of", "Acme"), ("Al", "likes", "Tea")])
    facts = store.facts_for(ALICE, "News from acme labs today; Alice says hi", max_tokens=1000)
    assert facts[0] == "Acme Labs part of Acme."
    assert not any(f.startswith("Al likes") for f in facts)  # "Al" only inside "Alice"
    assert store.facts_for(ALICE, "nothing relevant here", max_tokens=1000) == []


def test_facts_for_reads_the_users_graph_then_the_shared_one(store):
    store.add(ROOT, [("Paris", "population", "2 million")], graph="shared")
    facts = store.facts_for(ALICE, "Paris", max_tokens=1000)
    assert facts == ["Paris capital of France.", "Acme located in Paris.",  # mine: out-, then in-edges
                     "Paris population 2 million.",  # shared: direct facts before any neighbour's
                     "Alice works at Acme.", "Bob works at Acme."]
    assert store.facts_for(BOB, "Paris", max_tokens=1000) == ["Paris population 2 million."]
