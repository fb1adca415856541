"""The ``kg`` service: the knowledge graph behind the ABI.

Thin adapters from checked arguments to ``GraphStore``: each user's own graph (``graph="mine"``)
plus a ``"shared"`` graph everyone reads (root writes it, or users root allowed). Triples are
``[subject, relation, object]`` or ``{s, r, o, props}``; query terms starting with ``?`` are
variables. ``kg_facts`` returns the facts about the entities a text mentions, within a token
budget (what a prompt is augmented with).
"""
from __future__ import annotations

import os
from pathlib import Path

from llmos.services.base import Service
from llmos.services.kg import GraphStore
from llmos.syscalls.table import Arg, Syscall

_GRAPH = Arg("graph", "str", default="mine", max_len=64, doc="mine | shared | user:<uid> (root)")
CALLS = (
    Syscall(0, "kg_add", (Arg("triples", "list", required=True, max_len=10_000), _GRAPH,
                          Arg("source", "str", max_len=1024, doc="provenance: where the facts come from")),
            cap="kg", doc="Add triples (batched, all or nothing), with who/when/source provenance.",
            returns="{added}"),
    Syscall(0, "kg_query", (Arg("pattern", "list", required=True, max_len=16, doc="a triple or a list of triples"),
                            _GRAPH, Arg("limit", "int", default=100, min=1, max=10_000)),
            cap="kg", doc="Match a pattern with ?variables (a list of triples joins on shared variables).",
            returns="[{?var: value}]"),
    Syscall(0, "kg_neighbors", (Arg("entity", "str", required=True, max_len=256), _GRAPH,
                                Arg("depth", "int", default=1, min=1, max=5), Arg("relation", "str", max_len=128),
                                Arg("direction", "str", default="both", choices=("both", "out", "in"))),
            cap="kg", doc="Entities and facts around one entity.", returns="{nodes, edges}"),
    Syscall(0, "kg_path", (Arg("a", "str", required=True, max_len=256), Arg("b", "str", required=True, max_len=256),
                           _GRAPH), cap="kg", doc="The facts along a shortest path between two entities.",
            returns="[triple]"),
    Syscall(0, "kg_search", (Arg("text", "str", required=True, max_len=256),
                             Arg("graph", "str", default="all", max_len=64), Arg("limit", "int", default=10, min=1, max=1000)),
            cap="kg", doc="Entity names, case-insensitive, substring and fuzzy.", returns="[{name, type, score, graph}]"),
    Syscall(0, "kg_rm", (Arg("target", "any", required=True, doc="an entity name or a triple"), _GRAPH),
            cap="kg", doc="Remove a triple, or an entity with its facts.", returns="{removed}"),
    Syscall(0, "kg_export", (_GRAPH, Arg("fmt", "str", default="jsonl", choices=("jsonl", "node_link"))),
            cap="kg", doc="The graph as JSON lines of triples or networkx node-link JSON.", returns="str"),
    Syscall(0, "kg_import", (Arg("data", "str", required=True), _GRAPH,
                             Arg("fmt", "str", default="jsonl", choices=("jsonl", "node_link")),
                             Arg("source", "str", max_len=1024)), cap="kg", doc="Add an exported graph.",
            returns="{added}"),
    Syscall(0, "kg_facts", (Arg("text", "str", required=True, max_len=1 << 20),
                            Arg("max_tokens", "int", default=256, min=1, max=1 << 16),
                            Arg("graph", "str", default="all", max_len=64)),
            cap="kg", doc="Facts about the entities the text mentions, within a (word-count) token budget.",
            returns="[str]"),
)


class KgService(Service):
    name = "kg"
    calls = CALLS

    def setup(self) -> None:
        self.store = GraphStore(Path(os.environ.get("LLMOS_SERVICE_DIR", ".")) / "graphs", lock_wait=10.0)

    def handlers(self):
        s = self.store
        return {
            "kg_add": lambda c, triples, graph, source: {"added": s.add(c["uid"], triples, graph, source)},
            "kg_query": lambda c, pattern, graph, limit: s.query(c["uid"], _pattern(pattern), graph, limit),
            "kg_neighbors": lambda c, entity, graph, depth, relation, direction:
                s.neighbors(c["uid"], entity, depth, relation, direction, graph),
            "kg_path": lambda c, a, b, graph: s.path(c["uid"], a, b, graph),
            "kg_search": lambda c, text, graph, limit: s.search(c["uid"], text, limit, graph),
            "kg_rm": lambda c, target, graph: {"removed": s.rm(c["uid"], _pattern(target), graph)},
            "kg_export": lambda c, graph, fmt: s.export(c["uid"], graph, fmt),
            "kg_import": lambda c, data, graph, fmt, source: {"added": s.import_(c["uid"], data, fmt, graph, source)},
            "kg_facts": lambda c, text, max_tokens, graph: s.facts_for(c["uid"], text, max_tokens, graph=graph),
        }


def _pattern(p):
    """msgpack brings tuples back as lists: a flat 3-list of strings is one triple."""
    if isinstance(p, list) and len(p) == 3 and all(isinstance(t, str) for t in p):
        return tuple(p)
    if isinstance(p, list):
        return [tuple(t) if isinstance(t, list) else t for t in p]
    return p
