"""Moving a graph in and out: JSON lines of triples, and networkx's node-link JSON.

``jsonl``: one object per line, entities first (``{"entity", "type", "props"}``, for those
with a type, properties or no facts), then triples (``{"s", "r", "o", "props",
"provenance"}``). The same shapes are what ``add`` accepts, so an export can be imported.

``node_link``: ``networkx.node_link_data`` of the graph itself (node id = entity key; node
attributes ``name``, ``type``, ``props``; edge ``key`` = relation key, attributes ``relation``,
``props``, ``provenance``), so ``networkx.node_link_graph(json.loads(text))`` reads it back.

Imports keep names, types, properties and relations; provenance becomes the importer's (a user
cannot claim facts were added by someone else).
"""
from __future__ import annotations

import json

import networkx as nx

from llmos.services.kg.errors import KgError
from llmos.services.kg.named_graph import entity_record, triple_record
from llmos.services.kg.triples import Entity, Triple, parse_item

FORMATS = ("jsonl", "node_link")
MAX_IMPORT_ITEMS = 1_000_000


def export(g: nx.MultiDiGraph, fmt: str) -> str:
    if fmt == "jsonl":
        rows = [entity_record(attrs) for key, attrs in g.nodes(data=True)
                if attrs["type"] is not None or attrs["props"] or g.degree(key) == 0]
        rows += [triple_record(g, s, o, r) for s, o, r in g.edges(keys=True)]
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if fmt == "node_link":
        return json.dumps(nx.node_link_data(g, edges="edges"), ensure_ascii=False)
    raise KgError("EINVAL", f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def parse(data: str | bytes | dict, fmt: str) -> list[Triple | Entity]:
    """Validated items from an export; any bad item refuses the whole import (EINVAL)."""
    if fmt == "jsonl":
        items = _jsonl_rows(data)
    elif fmt == "node_link":
        items = _node_link_rows(data)
    else:
        raise KgError("EINVAL", f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if len(items) > MAX_IMPORT_ITEMS:
        raise KgError("EINVAL", f"{len(items)} items to import; the limit is {MAX_IMPORT_ITEMS}")
    return [parse_item(item, where) for where, item in items]


def _jsonl_rows(data: str | bytes | dict) -> list[tuple[str, object]]:
    if isinstance(data, bytes):
        data = data.decode("utf-8", errors="replace")
    if not isinstance(data, str):
        raise KgError("EINVAL", "jsonl import data must be text")
    rows = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line)))
        except ValueError as exc:
            raise KgError("EINVAL", f"line {number}: not JSON: {exc}") from None
    return rows


def _node_link_rows(data: str | bytes | dict) -> list[tuple[str, object]]:
    try:
        if isinstance(data, (str, bytes)):
            data = json.loads(data)
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        edges = "edges" if "edges" in data else "links"  # older networkx wrote "links"
        g = nx.node_link_graph(data, directed=True, multigraph=True, edges=edges)
    except (ValueError, KeyError, TypeError, nx.NetworkXError) as exc:
        raise KgError("EINVAL", f"not node-link JSON: {exc}") from None

    def name(node) -> object:
        return g.nodes[node].get("name", node if isinstance(node, str) else str(node))

    rows: list[tuple[str, object]] = []
    for node, attrs in g.nodes(data=True):
        rows.append((f"node {node!r}", {"entity": name(node), "type": attrs.get("type"),
                                         "props": attrs.get("props")}))
    for s, o, key, attrs in g.edges(keys=True, data=True):
        rows.append((f"edge {s!r}->{o!r}", {"s": name(s), "r": attrs.get("relation", key),
                                            "o": name(o), "props": attrs.get("props")}))
    return rows
