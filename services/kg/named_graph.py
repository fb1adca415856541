"""One named graph: a networkx MultiDiGraph kept durable by a write-ahead log and snapshots.

The in-memory model:
  node   id = ``entity_key(name)``; attributes ``name`` (first spelling seen), ``type``, ``props``
  edge   (subject key, object key, key = ``entity_key(relation)``); attributes ``relation``
         (display spelling), ``props`` and ``provenance`` = {``uid`` who added it, ``time``
         unix seconds, ``source`` free text}. A triple is stored once: adding it again merges its properties and keeps
         the provenance of its first assertion.

Every change is a record: ``commit`` numbers it, appends it to the log (durable on return) and
only then applies it. ``apply`` is deterministic, so replaying the log rebuilds the same graph.
A snapshot holds the whole graph and the number of the last record it includes; records at or
below that number are skipped on replay, so a crash between writing a snapshot and emptying the
log changes nothing.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import networkx as nx

from llmos.services.kg.errors import KgError
from llmos.services.kg.triples import Entity, Triple, entity_key
from llmos.services.durable import fsync_dir
from llmos.services.kg.wal import WriteAheadLog, read_snapshot, write_snapshot

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = "llmos-kg-snapshot"
SNAPSHOT_VERSION = 1


class NamedGraph:
    """The graph stored in directory ``path``: ``snapshot.json`` plus ``wal.jsonl``."""

    def __init__(self, path: Path, compact_ops: int, compact_bytes: int):
        self.path = path
        self.compact_ops = compact_ops
        self.compact_bytes = compact_bytes
        self.g = nx.MultiDiGraph()
        self.seq = 0                 # number of the last record applied
        self.snapshot_bytes = 0
        self.num_replayed = 0        # log records applied at open (start-up cost)
        if not path.exists():
            path.mkdir(parents=True, mode=0o700)
            fsync_dir(path.parent)
        snapshot = read_snapshot(path / "snapshot.json")
        if snapshot is not None:
            self._load_snapshot(snapshot)
        self.wal = WriteAheadLog(path / "wal.jsonl")
        for record in self.wal.replay():
            if record.get("seq", 0) > self.seq:
                self.apply(record)
                self.num_replayed += 1

    # -- changes ------------------------------------------------------------------------------

    def commit(self, record: dict) -> None:
        """Make ``record`` durable, then apply it; compacts when the log has grown enough."""
        record = {"seq": self.seq + 1, **record}
        self.wal.append(record)
        self.apply(record)
        if self.should_compact():
            try:
                self.compact()
            except OSError as exc:  # the write is durable in the log; compaction can wait
                log.warning("kg: compaction of %s failed: %s", self.path, exc)

    def apply(self, record: dict) -> None:
        op = record["op"]
        if op == "add":
            prov = {k: record[k] for k in ("uid", "time", "source")}
            for item in record["items"]:
                self._apply_item(item, prov)
        elif op == "rm_triple":
            s, o, r = entity_key(record["s"]), entity_key(record["o"]), entity_key(record["r"])
            if self.g.has_edge(s, o, r):
                self.g.remove_edge(s, o, r)
                self._drop_if_bare(s)
                self._drop_if_bare(o)
        elif op == "rm_entity":
            key = entity_key(record["name"])
            if key in self.g:
                self.g.remove_node(key)
        else:
            raise KgError("EIO", f"{self.path}: unknown operation {op!r} in the log")
        self.seq = record["seq"]

    def _apply_item(self, item: dict, prov: dict) -> None:
        if "entity" in item:
            node = self._ensure_node(item["entity"])
            if item.get("type") is not None:
                node["type"] = item["type"]
            node["props"].update(item.get("props") or {})
            return
        s, o = self._ensure_node(item["s"]), self._ensure_node(item["o"])
        s_key, o_key, r_key = entity_key(s["name"]), entity_key(o["name"]), entity_key(item["r"])
        if self.g.has_edge(s_key, o_key, r_key):
            self.g.edges[s_key, o_key, r_key]["props"].update(item.get("props") or {})
            return
        self.g.add_edge(s_key, o_key, key=r_key, relation=item["r"],
                        props=dict(item.get("props") or {}),
                        provenance=dict(item.get("provenance") or prov))

    def _ensure_node(self, name: str) -> dict:
        key = entity_key(name)
        if key not in self.g:
            self.g.add_node(key, name=name, type=None, props={})
        return self.g.nodes[key]

    def _drop_if_bare(self, key: str) -> None:
        """An entity that only existed through a removed fact goes with it."""
        node = self.g.nodes[key]
        if self.g.degree(key) == 0 and node["type"] is None and not node["props"]:
            self.g.remove_node(key)

    # -- snapshots ----------------------------------------------------------------------------

    def should_compact(self) -> bool:
        # The size guard keeps compaction's cost (writing the whole graph) amortised: the log
        # must have grown by a fair share of the snapshot before we rewrite it.
        grown = self.wal.num_ops >= self.compact_ops or self.wal.num_bytes >= self.compact_bytes
        return grown and self.wal.num_bytes >= self.snapshot_bytes // 4

    def compact(self) -> None:
        """Write the whole graph as a snapshot, then empty the log."""
        self.snapshot_bytes = write_snapshot(self.path / "snapshot.json", self.state())
        self.wal.reset()

    def state(self) -> dict:
        """The whole graph as plain JSON (entities, then triples with provenance)."""
        return {
            "format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "seq": self.seq,
            "time": time.time(),
            "entities": [entity_record(attrs) for _, attrs in self.g.nodes(data=True)],
            "triples": [triple_record(self.g, s, o, r) for s, o, r in self.g.edges(keys=True)],
        }

    def _load_snapshot(self, state: dict) -> None:
        if state.get("format") != SNAPSHOT_FORMAT or state.get("version") != SNAPSHOT_VERSION:
            raise KgError("EIO", f"{self.path}: snapshot has an unknown format")
        prov = {"uid": None, "time": None, "source": None}  # each snapshot triple has its own
        for item in state["entities"] + state["triples"]:
            self._apply_item(item, prov)
        self.seq = state["seq"]
        self.snapshot_bytes = (self.path / "snapshot.json").stat().st_size

    def close(self) -> None:
        self.wal.close()


def entity_record(attrs: dict) -> dict:
    return {"entity": attrs["name"], "type": attrs["type"], "props": attrs["props"]}


def triple_record(g: nx.MultiDiGraph, s: str, o: str, r: str) -> dict:
    edge = g.edges[s, o, r]
    return {"s": g.nodes[s]["name"], "r": edge["relation"], "o": g.nodes[o]["name"],
            "props": edge["props"], "provenance": edge["provenance"]}


def add_record(items: list[Triple | Entity], uid: int, source: str | None) -> dict:
    """The log record for one validated ``add`` batch."""
    return {"op": "add", "uid": uid, "time": time.time(), "source": source,
            "items": [item.to_json() for item in items]}
