"""Reading a graph: pattern matching with joins, neighbourhoods, shortest paths, name search.

Functions here take a ``networkx.MultiDiGraph`` laid out as ``named_graph`` describes and never
change it. Results use display names, and their order is deterministic: it follows the graph's
insertion order, so the same graph gives the same answer.
"""
from __future__ import annotations

import difflib
from collections import deque

import networkx as nx

from llmos.services.kg.errors import KgError
from llmos.services.kg.named_graph import triple_record
from llmos.services.kg.triples import Term, entity_key

Pattern = tuple[Term, Term, Term]


# -- patterns -------------------------------------------------------------------------------

def match(g: nx.MultiDiGraph, patterns: list[Pattern], limit: int) -> list[dict]:
    """Variable bindings that satisfy every pattern (a conjunctive query), at most ``limit``.

    Patterns are evaluated most-constrained first; each binding found so far substitutes into
    the next pattern, so a join walks adjacency lists instead of scanning every edge.
    """
    results: list[dict] = []
    seen: set[tuple] = set()
    order = _plan(patterns)
    relation_vars = {p[1].text for p in patterns if p[1].is_var}
    variables = list(dict.fromkeys(t.text for p in patterns for t in p if t.is_var))

    def extend(depth: int, binding: dict[str, str]) -> bool:
        if depth == len(order):
            frozen = tuple(sorted(binding.items()))
            if frozen not in seen:
                seen.add(frozen)
                results.append(_display(g, binding, variables, relation_vars))
            return len(results) < limit
        for found in _match_one(g, order[depth], binding):
            if not extend(depth + 1, found):
                return False
        return True

    extend(0, {})
    return results


def _plan(patterns: list[Pattern]) -> list[Pattern]:
    """Order patterns so each one shares variables with those before it where possible."""
    remaining, order, bound = list(patterns), [], set()

    def cost(p: Pattern) -> tuple:
        known = [not t.is_var or t.text in bound for t in p]
        anchored = known[0] or known[2]  # can start from one entity's adjacency list
        return (not anchored, known.count(False))

    while remaining:
        best = min(remaining, key=cost)  # min keeps the first of equals: stable
        remaining.remove(best)
        order.append(best)
        bound.update(t.text for t in best if t.is_var)
    return order


def _match_one(g: nx.MultiDiGraph, pattern: Pattern, binding: dict[str, str]):
    """Yield ``binding`` extended by each edge that matches ``pattern`` under it.

    Bound values are keys: entity keys for subject/object, relation keys for relations.
    """
    s, r, o = (binding.get(t.text) if t.is_var else t.key for t in pattern)
    if s is not None and s not in g or o is not None and o not in g:
        return
    if s is not None:
        edges = g.out_edges(s, keys=True)
    elif o is not None:
        edges = g.in_edges(o, keys=True)
    else:
        edges = g.edges(keys=True)
    for es, eo, er in edges:
        if (s is not None and es != s) or (o is not None and eo != o) or (r is not None and er != r):
            continue
        found = dict(binding)
        if not all(_bind(found, term, value) for term, value in zip(pattern, (es, er, eo))):
            continue
        yield found


def _bind(binding: dict, term: Term, value: str) -> bool:
    if not term.is_var:
        return True
    return binding.setdefault(term.text, value) == value


def _display(g: nx.MultiDiGraph, binding: dict[str, str], variables: list[str],
             relation_vars: set[str]) -> dict:
    """Variables in pattern order; entity keys become display names, relations stay keys."""
    return {var: binding[var] if var in relation_vars else g.nodes[binding[var]]["name"]
            for var in variables}


# -- neighbourhoods and paths ---------------------------------------------------------------

def require(g: nx.MultiDiGraph, name: str) -> str:
    key = entity_key(name)
    if key not in g:
        raise KgError("ENOENT", f"no entity {name!r} in this graph")
    return key


def neighbors(g: nx.MultiDiGraph, name: str, depth: int, relations: set[str] | None,
              direction: str) -> dict:
    """Entities within ``depth`` hops of ``name`` and the edges walked to reach them.

    ``relations``: relation keys allowed (None: all). ``direction``: "out" follows edges from
    subject to object, "in" the reverse, "both" either way.
    """
    start = require(g, name)
    distance = {start: 0}
    edges: list[tuple[str, str, str]] = []
    seen_edges: set[tuple[str, str, str]] = set()
    frontier = deque([start])
    while frontier:
        key = frontier.popleft()
        if distance[key] == depth:
            continue
        steps = []
        if direction in ("out", "both"):
            steps += [((key, o, r), o) for _, o, r in g.out_edges(key, keys=True)]
        if direction in ("in", "both"):
            steps += [((s, key, r), s) for s, _, r in g.in_edges(key, keys=True)]
        for edge, other in steps:
            if relations is not None and edge[2] not in relations:
                continue
            if edge not in seen_edges:
                seen_edges.add(edge)
                edges.append(edge)
            if other not in distance:
                distance[other] = distance[key] + 1
                frontier.append(other)
    return {
        "nodes": [dict(entity_view(g, key), depth=d) for key, d in distance.items()],
        "edges": [triple_record(g, *edge) for edge in edges],
    }


def entity_view(g: nx.MultiDiGraph, key: str) -> dict:
    node = g.nodes[key]
    return {"name": node["name"], "type": node["type"], "props": node["props"]}


def shortest_path(g: nx.MultiDiGraph, a: str, b: str, directed: bool) -> list[dict]:
    """The triples along one shortest path from ``a`` to ``b``.

    Undirected by default (a fact links two entities whichever way its relation reads); each
    triple is reported in its stored direction.
    """
    start, goal = require(g, a), require(g, b)
    view = g if directed else g.to_undirected(as_view=True)
    try:
        keys = nx.shortest_path(view, start, goal)
    except nx.NetworkXNoPath:
        raise KgError("ENOENT", f"no path from {a!r} to {b!r}") from None
    triples = []
    for u, v in zip(keys, keys[1:]):
        if g.has_edge(u, v):
            triples.append(triple_record(g, u, v, next(iter(g[u][v]))))
        else:
            triples.append(triple_record(g, v, u, next(iter(g[v][u]))))
    return triples


# -- name search ----------------------------------------------------------------------------

FUZZY_CUTOFF = 0.75


def search(g: nx.MultiDiGraph, text: str, limit: int) -> list[dict]:
    """Entities whose names match ``text`` case-insensitively, best first.

    Score: 3 exact, 2+ prefix, 1+ substring, otherwise the difflib ratio against the whole
    name or its first ``len(text)`` characters, kept if at least ``FUZZY_CUTOFF``.
    Ties break by name, so the order is deterministic.
    """
    query = entity_key(text)
    if not query:
        raise KgError("EINVAL", "search text is empty")
    scored = []
    matcher = difflib.SequenceMatcher(autojunk=False)
    matcher.set_seq2(query)
    for key, attrs in g.nodes(data=True):
        score = _score(matcher, query, key)
        if score is not None:
            scored.append((-score, key, attrs))
    scored.sort(key=lambda t: (t[0], t[1]))
    return [dict(entity_view(g, key), score=round(-neg, 4)) for neg, key, _ in scored[:limit]]


def _score(matcher: difflib.SequenceMatcher, query: str, key: str) -> float | None:
    if key == query:
        return 3.0
    if key.startswith(query):
        return 2.0 + len(query) / len(key)
    if query in key:
        return 1.0 + len(query) / len(key)
    matcher.set_seq1(key)
    if matcher.real_quick_ratio() < FUZZY_CUTOFF * 0.5:
        return None
    ratio = matcher.ratio()
    # "acme corp" against "acme corporation inc": compare against the key cut to the
    # query's length as well, so a long name is not penalised for its extra words.
    if len(key) > len(query):
        ratio = max(ratio, difflib.SequenceMatcher(None, query, key[:len(query)], autojunk=False).ratio())
    return ratio if ratio >= FUZZY_CUTOFF else None
