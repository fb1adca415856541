"""GraphStore: the knowledge graph's engine — named, per-user, durable graphs of facts.

Graphs, and who may use them (``uid`` is the caller's verified user id):
  "mine"      the caller's own graph. Nobody else reads or writes it, except root (uid 0)
              through its explicit name "user:<uid>".
  "shared"    one graph every user reads. Root writes it, and so does any user root has
              allowed with ``allow_shared_write`` (the grant is stored, durably, in the store).
  "all"       for ``search`` and ``facts_for`` only: the caller's graph, then the shared one.
Refusals are ``KgError("EPERM")``; bad arguments ``EINVAL``; unknown entities ``ENOENT``.

Durability: a write returns only after its log record is fsynced (see ``named_graph``/``wal``);
one process owns a store directory at a time (a second opener gets ``EBUSY``). Calls are
serialised by a lock, so one store may be shared by threads.
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import threading
import time
from pathlib import Path
from typing import Callable

import networkx as nx

from llmos.services.kg import exchange, facts, query
from llmos.services.kg.errors import KgError
from llmos.services.kg.named_graph import NamedGraph, add_record
from llmos.services.kg.triples import (MAX_BATCH, Triple, check_name, check_source, entity_key,
                                       parse_batch, parse_item, parse_pattern)
from llmos.services.kg.wal import write_snapshot

__all__ = ["GraphStore", "KgError"]

MINE, SHARED, ALL = "mine", "shared", "all"
ROOT_UID = 0
MAX_QUERY_RESULTS = 10_000
MAX_SEARCH_RESULTS = 1_000
MAX_DEPTH = 6
DIRECTIONS = ("out", "in", "both")
_EMPTY = nx.MultiDiGraph()  # what reading a graph nobody has written yet sees


def _locked(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            if self._closed:
                raise KgError("EBUSY", "the graph store is closed")
            return method(self, *args, **kwargs)
    return wrapper


def _count_words(text: str) -> int:
    return len(text.split())


class GraphStore:
    """All graphs under ``root``: ``root/shared/``, ``root/user-<uid>/``, ``root/policy.json``.

    ``compact_ops``/``compact_bytes``: a graph's log is folded into a snapshot once it holds
    this many records or bytes (and at least a quarter of the snapshot's size), which bounds
    the replay work when the store is opened again.
    """

    def __init__(self, root: Path | str, *, compact_ops: int = 1000, compact_bytes: int = 4 << 20,
                 lock_wait: float = 0.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.compact_ops, self.compact_bytes = compact_ops, compact_bytes
        self._lock = threading.RLock()
        self._closed = False
        self._graphs: dict[str, NamedGraph] = {}  # opened lazily: start-up reads nothing
        self._lock_fd = os.open(self.root / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
        # A dead holder's flock is gone with it; ``lock_wait`` gives one that is exiting (the
        # service of a kernel that died) time to go before this is EBUSY.
        deadline = time.monotonic() + lock_wait
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                os.close(self._lock_fd)
                raise KgError("EBUSY", f"{self.root} is open in another graph store") from None
        policy_path = self.root / "policy.json"
        try:
            policy = json.loads(policy_path.read_text()) if policy_path.exists() else {}
        except (OSError, ValueError) as exc:
            self.close()
            raise KgError("EIO", f"{policy_path}: unreadable: {exc}") from None
        self.shared_writer_uids: set[int] = set(policy.get("shared_writers", []))

    # -- who may use which graph --------------------------------------------------------------

    def can_write_shared(self, uid: int) -> bool:
        return uid == ROOT_UID or uid in self.shared_writer_uids

    @_locked
    def allow_shared_write(self, uid: int, target_uid: int, allowed: bool = True) -> None:
        """Root grants (or revokes) ``target_uid`` the right to write the shared graph."""
        if self._check_uid(uid) != ROOT_UID:
            raise KgError("EPERM", "only root may change who writes the shared graph")
        self._check_uid(target_uid)
        (self.shared_writer_uids.add if allowed else self.shared_writer_uids.discard)(target_uid)
        write_snapshot(self.root / "policy.json", {"shared_writers": sorted(self.shared_writer_uids)})

    def _check_uid(self, uid: object) -> int:
        if not isinstance(uid, int) or isinstance(uid, bool) or uid < 0:
            raise KgError("EINVAL", f"uid must be a non-negative integer, not {uid!r}")
        return uid

    def _dir_name(self, uid: int, graph: object, write: bool) -> str:
        """The directory of the graph ``uid`` names as ``graph``, after the access check."""
        self._check_uid(uid)
        if graph == MINE:
            return f"user-{uid}"
        if graph == SHARED:
            if write and not self.can_write_shared(uid):
                raise KgError("EPERM", f"user {uid} may read the shared graph but not write it")
            return "shared"
        if isinstance(graph, str) and graph.startswith("user:") and graph[5:].isdigit():
            owner = int(graph[5:])
            if owner != uid and uid != ROOT_UID:
                raise KgError("EPERM", f"graph {graph!r} belongs to another user")
            return f"user-{owner}"
        raise KgError("EINVAL", f"unknown graph {graph!r}; use 'mine', 'shared' or 'user:<uid>'")

    def _open(self, uid: int, graph: object) -> NamedGraph:
        name = self._dir_name(uid, graph, write=True)
        if name not in self._graphs:
            self._graphs[name] = NamedGraph(self.root / name, self.compact_ops, self.compact_bytes)
        return self._graphs[name]

    def _read(self, uid: int, graph: object) -> nx.MultiDiGraph:
        name = self._dir_name(uid, graph, write=False)
        if name not in self._graphs and not (self.root / name).exists():
            return _EMPTY
        if name not in self._graphs:
            self._graphs[name] = NamedGraph(self.root / name, self.compact_ops, self.compact_bytes)
        return self._graphs[name].g

    def _reads(self, uid: int, graph: object) -> list[tuple[str, nx.MultiDiGraph]]:
        names = [MINE, SHARED] if graph == ALL else [graph]
        return [(str(name), self._read(uid, name)) for name in names]

    # -- writing ------------------------------------------------------------------------------

    @_locked
    def add(self, uid: int, triples: list, graph: str = MINE, source: str | None = None) -> int:
        """Add a batch of facts (and entity records); returns how many items were accepted.

        Items: ``(s, r, o)``, ``{"s", "r", "o", "props"}`` or ``{"entity", "type", "props"}``.
        The whole batch is validated first (EINVAL names the bad item) and written as one
        durable record: all of it is added, or none.
        """
        items = parse_batch(triples)
        source = check_source(source)
        named = self._open(uid, graph)
        if items:
            named.commit(add_record(items, uid, source))
        return len(items)

    @_locked
    def rm(self, uid: int, target: str | tuple | list | dict, graph: str = MINE) -> int:
        """Remove one triple, or an entity with all its facts; returns the triples removed.

        Entities left with no facts, type or properties by removing a triple go with it.
        ENOENT if the triple or entity is not there.
        """
        named = self._open(uid, graph)
        g = named.g
        if isinstance(target, str):
            key = query.require(g, check_name(target, "entity"))
            removed = len(set(g.out_edges(key, keys=True)) | set(g.in_edges(key, keys=True)))
            named.commit({"op": "rm_entity", "name": g.nodes[key]["name"]})
            return removed
        item = parse_item(target, "triple")
        if not isinstance(item, Triple):
            raise KgError("EINVAL", "rm takes an entity name or a (subject, relation, object) triple")
        if not g.has_edge(entity_key(item.s), entity_key(item.o), entity_key(item.r)):
            raise KgError("ENOENT", f"no triple ({item.s!r}, {item.r!r}, {item.o!r}) in this graph")
        named.commit({"op": "rm_triple", "s": item.s, "r": item.r, "o": item.o})
        return 1

    @_locked
    def import_(self, uid: int, data: str | bytes | dict, fmt: str = "jsonl", graph: str = MINE,
                source: str | None = None) -> int:
        """Add everything in an export (see ``exchange``); returns the items accepted.

        The whole import is validated before anything is written, then written in batches of
        ``MAX_BATCH`` items, each durable; a crash mid-import leaves a prefix of it.
        """
        items = exchange.parse(data, fmt)
        source = check_source(source) or "import"
        named = self._open(uid, graph)
        for start in range(0, len(items), MAX_BATCH):
            named.commit(add_record(items[start:start + MAX_BATCH], uid, source))
        return len(items)

    @_locked
    def compact(self, uid: int, graph: str = MINE) -> None:
        """Fold the graph's log into its snapshot now (normally automatic)."""
        self._open(uid, graph).compact()

    # -- reading ------------------------------------------------------------------------------

    @_locked
    def query(self, uid: int, pattern, graph: str = MINE, limit: int = 100) -> list[dict]:
        """Bindings of the ``?variables`` that satisfy every triple of ``pattern``.

        ``("?x", "works_at", "Acme")`` or ``[("?x", "works_at", "?c"), ("?c", "located_in",
        "Paris")]``; constants compare case-insensitively; at most ``limit`` results.
        """
        patterns = parse_pattern(pattern)
        limit = _check_limit(limit, MAX_QUERY_RESULTS)
        return query.match(self._read(uid, graph), patterns, limit)

    @_locked
    def neighbors(self, uid: int, entity: str, depth: int = 1, relation: str | list | None = None,
                  direction: str = "both", graph: str = MINE) -> dict:
        """``{"nodes": [{name, type, props, depth}], "edges": [triples]}`` within ``depth`` hops,
        following only ``relation`` (a name or list of names) if given."""
        if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= MAX_DEPTH:
            raise KgError("EINVAL", f"depth must be an integer from 1 to {MAX_DEPTH}")
        if direction not in DIRECTIONS:
            raise KgError("EINVAL", f"direction must be one of {', '.join(DIRECTIONS)}")
        relations = None
        if relation is not None:
            names = [relation] if isinstance(relation, str) else relation
            if not isinstance(names, (list, tuple)):
                raise KgError("EINVAL", "relation must be a name or a list of names")
            relations = {entity_key(check_name(r, "relation")) for r in names}
        return query.neighbors(self._read(uid, graph), check_name(entity, "entity"), depth,
                               relations, direction)

    @_locked
    def path(self, uid: int, a: str, b: str, graph: str = MINE, directed: bool = False) -> list[dict]:
        """Triples along a shortest path from ``a`` to ``b`` (ENOENT: unknown entity or no path)."""
        return query.shortest_path(self._read(uid, graph), check_name(a, "entity"),
                                   check_name(b, "entity"), directed)

    @_locked
    def search(self, uid: int, text: str, limit: int = 10, graph: str = ALL) -> list[dict]:
        """Entities by name: exact, prefix, substring, then fuzzy; best first.

        Each result: ``{name, type, props, score, graph}``.
        """
        if not isinstance(text, str):
            raise KgError("EINVAL", "search text must be a string")
        limit = _check_limit(limit, MAX_SEARCH_RESULTS)
        found = [dict(hit, graph=name) for name, g in self._reads(uid, graph)
                 for hit in query.search(g, text, limit)]
        found.sort(key=lambda hit: -hit["score"])  # stable: mine before shared on ties
        return found[:limit]

    @_locked
    def export(self, uid: int, graph: str = MINE, fmt: str = "jsonl") -> str:
        return exchange.export(self._read(uid, graph), fmt)

    @_locked
    def facts_for(self, uid: int, text: str, max_tokens: int,
                  count_tokens: Callable[[str], int] = _count_words, graph: str = ALL) -> list[str]:
        """Sentences about the entities ``text`` mentions that fit in ``max_tokens``.

        Most relevant first: facts about mentioned entities (from every graph read), then facts
        about their neighbours; each kept if it still fits (see ``facts``). Deterministic.
        """
        if not isinstance(text, str):
            raise KgError("EINVAL", "text must be a string")
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise KgError("EINVAL", "max_tokens must be a non-negative integer")
        tiers = [facts.ranked_facts(g, text) for _, g in self._reads(uid, graph)]
        ranked = [f for direct, _ in tiers for f in direct] + [f for _, near in tiers for f in near]
        return facts.fit(list(dict.fromkeys(ranked)), max_tokens, count_tokens)

    @_locked
    def stats(self, uid: int, graph: str = MINE) -> dict:
        """Sizes, and the log's length (what the next start-up would replay)."""
        g = self._read(uid, graph)
        named = self._graphs.get(self._dir_name(uid, graph, write=False))
        return {"num_entities": g.number_of_nodes(), "num_triples": g.number_of_edges(),
                "wal_ops": named.wal.num_ops if named else 0,
                "wal_bytes": named.wal.num_bytes if named else 0,
                "replayed_at_open": named.num_replayed if named else 0}

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for named in self._graphs.values():
                named.close()
            os.close(self._lock_fd)  # releases the flock

    def __enter__(self) -> "GraphStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_limit(limit: object, most: int) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= most:
        raise KgError("EINVAL", f"limit must be an integer from 1 to {most}")
    return limit
