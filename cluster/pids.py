"""Global pids: one number per process in the whole cluster, whichever kernel runs it.

The front hands out global pids (gpids) in order and keeps, for each, where the process lives:
the kernel and that kernel's own (local) pid. A process moved by migration keeps its gpid; only
its location changes, and ``version`` counts the moves so a reply from the old location can be
told from one of the new. Processes the front did not start (a service's, or ones a restarted
kernel brought back) get a gpid the first time the front sees them (``gpid_of``).

``translate`` rewrites the pids in a kernel's result into gpids: the one function that knows
which results carry pids.

The table is saved (``save``: a msgpack snapshot, written to a temporary file and renamed, at
most once per front tick and only when it changed), so a front that restarts and adopts the
kernels (``load``) keeps every process's number.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack


@dataclass
class Where:
    kernel: int
    lpid: int
    uid: int | None = None
    version: int = 0                       # moves so far
    placement: dict = field(default_factory=dict)   # why the front put it there (pinfo shows it)


class PidTable:
    def __init__(self):
        self.next_gpid = 1
        self.where: dict[int, Where] = {}
        self._by_local: dict[tuple[int, int], int] = {}
        self.dirty = False

    def save(self, path: Path) -> None:
        rows = [[g, w.kernel, w.lpid, w.uid, w.version, w.placement] for g, w in self.where.items()]
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(msgpack.packb({"next": self.next_gpid, "where": rows}))
        os.replace(tmp, path)
        self.dirty = False

    def load(self, path: Path) -> int:
        """The table a previous front saved (none: empty); how many processes it names."""
        try:
            data = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
            rows, nxt = data["where"], int(data["next"])
        except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException):
            return 0
        for g, kernel, lpid, uid, version, placement in rows:
            self.where[g] = Where(kernel, lpid, uid, version, placement)
            self._by_local[(kernel, lpid)] = g
        self.next_gpid = max([nxt, *(g + 1 for g in self.where)])
        return len(rows)

    def add(self, kernel: int, lpid: int, uid: int | None = None, placement: dict | None = None) -> int:
        known = self._by_local.get((kernel, lpid))
        if known is not None:
            return known
        gpid = self.next_gpid
        self.next_gpid, self.dirty = gpid + 1, True
        self.where[gpid] = Where(kernel, lpid, uid, 0, placement or {})
        self._by_local[(kernel, lpid)] = gpid
        return gpid

    def gpid_of(self, kernel: int, lpid: int) -> int:
        """The gpid of ``kernel``'s local ``lpid`` (0 stays 0: no parent), made on first sight."""
        if not lpid:
            return 0
        return self.add(kernel, lpid)

    def get(self, gpid: Any) -> Where | None:
        return self.where.get(gpid) if isinstance(gpid, int) and not isinstance(gpid, bool) else None

    def move(self, gpid: int, kernel: int, lpid: int, placement: dict | None = None) -> None:
        w = self.where[gpid]
        self._by_local.pop((w.kernel, w.lpid), None)
        w.kernel, w.lpid, w.version = kernel, lpid, w.version + 1
        if placement is not None:
            w.placement = placement
        self._by_local[(kernel, lpid)] = gpid
        self.dirty = True

    def drop(self, gpid: int) -> None:
        w = self.where.pop(gpid, None)
        if w is not None:
            self._by_local.pop((w.kernel, w.lpid), None)
            self.dirty = True

    def on_kernel(self, kernel: int) -> list[int]:
        return [g for g, w in self.where.items() if w.kernel == kernel]

    def num_live(self, uid: int) -> int:
        return sum(1 for w in self.where.values() if w.uid == uid)


def translate(pids: PidTable, call: str, kernel: int, result: Any, node: str = "") -> Any:
    """``result`` of ``call`` from ``kernel`` with its local pids made global (and, in ``ps``
    and ``pinfo``, the kernel and node that run each process)."""
    if call in ("spawn", "restore") and isinstance(result, int):
        return pids.gpid_of(kernel, result)
    if call == "fork" and isinstance(result, list):
        return [pids.gpid_of(kernel, p) for p in result]
    if call == "ps" and isinstance(result, list):
        return [_row(pids, kernel, r, node) for r in result]
    if call in ("pinfo", "wait", "nice", "write", "checkpoint") and isinstance(result, dict):
        row = _row(pids, kernel, result, node) if call == "pinfo" else dict(result)
        if isinstance(result.get("pid"), int):
            row["pid"] = pids.gpid_of(kernel, result["pid"])
        if call == "pinfo":
            w = pids.get(row["pid"])
            row["placement"] = dict(w.placement) if w else {}
        return row
    return result


def _row(pids: PidTable, kernel: int, row: Any, node: str) -> Any:
    if not isinstance(row, dict):
        return row
    out = dict(row, kernel=kernel, node=node)
    for key in ("pid", "ppid"):
        if isinstance(row.get(key), int):
            out[key] = pids.gpid_of(kernel, row[key])
    return out
