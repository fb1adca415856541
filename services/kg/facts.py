"""Facts for prompt augmentation: which entities a text mentions, and what the graph says.

``mentions`` finds entity names in a text: case-insensitive, whole words, longest names first
(so "ACME Corporation" claims its span before "ACME" can). ``ranked_facts`` turns the edges
around those entities into short sentences, most relevant first:

  1. direct: for each mentioned entity in order of first mention, its type ("Acme is a
     company."), facts linking it to another mentioned entity, then its other facts
     (outgoing, then incoming, in insertion order);
  2. neighbours: the same for the entities those facts reached, in the order reached.

Each fact appears once. The order depends only on the text and the graph.
"""
from __future__ import annotations

import re

import networkx as nx

Edge = tuple[str, str, str]  # (subject key, object key, relation key)


def normalise_text(text: str) -> str:
    return " ".join(text.split()).casefold()


def mentions(g: nx.MultiDiGraph, text: str) -> list[str]:
    """Keys of the entities ``text`` mentions, in order of first mention."""
    haystack = normalise_text(text)
    candidates = sorted((key for key in g.nodes if key and key in haystack),
                        key=lambda k: (-len(k), k))
    claimed: list[tuple[int, int]] = []
    first_at: dict[str, int] = {}
    for key in candidates:
        for m in re.finditer(r"(?<!\w)" + re.escape(key) + r"(?!\w)", haystack):
            span = m.span()
            if any(span[0] < end and start < span[1] for start, end in claimed):
                continue
            claimed.append(span)
            first_at.setdefault(key, span[0])
    return sorted(first_at, key=lambda k: (first_at[k], k))


def sentence(g: nx.MultiDiGraph, edge: Edge) -> str:
    s, o, r = edge
    relation = " ".join(g.edges[s, o, r]["relation"].replace("_", " ").split())
    return f"{g.nodes[s]['name']} {relation} {g.nodes[o]['name']}."


def type_sentence(g: nx.MultiDiGraph, key: str) -> str | None:
    node = g.nodes[key]
    if not node["type"]:
        return None
    article = "an" if node["type"][0].lower() in "aeiou" else "a"
    return f"{node['name']} is {article} {node['type']}."


def ranked_facts(g: nx.MultiDiGraph, text: str) -> tuple[list[str], list[str]]:
    """(direct facts, neighbour facts) about the entities ``text`` mentions."""
    mentioned = mentions(g, text)
    mentioned_set = set(mentioned)
    used: set[Edge] = set()
    reached: dict[str, None] = {}  # neighbours in the order first reached (ordered set)

    def facts_about(key: str, first: set[str]) -> list[str]:
        """Type, then edges whose other end is in ``first``, then out-edges, then in-edges."""
        out = [t] if (t := type_sentence(g, key)) else []
        edges = [(key, o, r) for _, o, r in g.out_edges(key, keys=True)]
        edges += [(s, key, r) for s, _, r in g.in_edges(key, keys=True)]
        edges.sort(key=lambda e: (e[0] if e[1] == key else e[1]) not in first)  # stable
        for edge in edges:
            if edge in used:
                continue
            used.add(edge)
            out.append(sentence(g, edge))
            other = edge[1] if edge[0] == key else edge[0]
            if other not in mentioned_set:
                reached.setdefault(other, None)
        return out

    direct = [f for key in mentioned for f in facts_about(key, mentioned_set)]
    neighbours = []
    for key in list(reached):
        neighbours += facts_about(key, set())
    return direct, neighbours


def fit(facts: list[str], max_tokens: int, count_tokens) -> list[str]:
    """Facts in order, each kept if it still fits the budget (later, shorter ones may)."""
    kept, used = [], 0
    for fact in facts:
        cost = count_tokens(fact)
        if used + cost <= max_tokens:
            kept.append(fact)
            used += cost
    return kept
