"""The process journal: what a kernel that dies needs to bring every process back.

``<state>/journal/procs.log`` is a sequence of records, each ``length (4 bytes) | crc32 (4) |
msgpack``. The loop commits a group every ``interval`` seconds (``--journal-interval``,
default 0.05; 0 commits at every turn of the loop): for each process whose record changed since
the last commit, the fields that changed and the tokens it gained (prompt, output, written
turns); for each process reaped, its end; then one write, flush and ``fsync``. So a crash
loses at most the last ``interval`` of generated tokens, and nothing that was acknowledged: the
replies to calls that change processes (``spawn``, ``write``, ``fork``, ``kill``, ``nice``; the
table's ``journaled`` flag) are held back, and the loop commits right after the calls of its
turn whenever one is held (one fsync for all of them), before any reply goes. Tokens are streamed
before they are committed: a kernel that restarts regenerates the same ones, since greedy
decoding and sampling from ``(seed, position)`` are functions of the tokens before them.

At boot ``replay`` reads the records up to the first torn or corrupt one (the rest is cut and
logged), folds them into one record per process (``Saved``), and ``compact`` rewrites the file
as one snapshot per process (write a new file, fsync, rename), so the file stays as large as
what lives. ``kernel.restore`` turns the records back into processes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import struct
import time
import zlib
from pathlib import Path

import msgpack

log = logging.getLogger("llmos.kernel")
HEADER = struct.Struct("<II")       # payload length, crc32 of the payload
MAX_RECORD = 64 << 20
COMPACT_ABOVE = 64 << 20            # bytes of log past which a commit compacts it


def fields(proc) -> dict:
    """A process's record, as the journal keeps it (tokens apart)."""
    io = proc.io
    record = proc.entry.adapter_records.get(proc.adapter) if proc.adapter and proc.entry else None
    return {
        "adapter_label": record.label if record else None,
        "ppid": proc.ppid, "uid": proc.uid, "model": proc.model, "created_at": proc.created_at,
        "nice": proc.nice, "sampling": dataclasses.asdict(proc.sampling), "max_tokens": proc.max_tokens,
        "stop_token_ids": sorted(proc.stop_token_ids), "ignore_eos": proc.ignore_eos,
        "interactive": proc.interactive, "adapter": proc.adapter, "state": proc.state.value,
        "stopped_from": proc.stopped_from.value if proc.stopped_from else None,
        "wait": proc.wait.value if proc.wait else None, "num_prompt_tokens": proc.num_prompt_tokens,
        "turn_start": proc.turn_start, "finish_reason": proc.finish_reason,
        "tokens_in": proc.tokens_in, "tokens_out": proc.tokens_out,
        "num_preemptions": proc.num_preemptions, "num_swaps": proc.num_swaps,
        "num_recomputes": proc.num_recomputes, "num_cached_tokens": proc.num_cached_tokens,
        "stop": list(io.stop), "kg_facts": list(io.kg_facts), "turn_done": io.turn_done,
        "turn_finish_reason": io.finish_reason, "close_after_turn": io.close_after_turn,
        "session": proc.session, "hup": proc.hup, "ended_at": proc.ended_at,
    }


def _signature(proc) -> tuple:
    """Cheap to compute each commit: changes whenever ``fields`` might."""
    io = proc.io
    return (proc.state, proc.num_tokens, proc.nice, proc.max_tokens, proc.finish_reason, proc.turn_start,
            proc.wait, proc.stopped_from, io.turn_done, io.close_after_turn, proc.num_preemptions, proc.session)


@dataclasses.dataclass
class Saved:
    """One process as the journal last recorded it."""
    pid: int
    fields: dict
    token_ids: list[int]


class Journal:
    def __init__(self, directory: Path | None, interval: float = 0.05):
        self.enabled = directory is not None
        self.interval = interval
        self.path = Path(directory) / "procs.log" if directory is not None else None
        self._file = None
        self._known: dict[int, tuple] = {}        # pid -> (signature, fields, tokens journaled)
        self._next_pid = 0
        self._last_commit = 0.0
        self.num_commits = 0
        self.bytes_written = 0

    # -- boot ---------------------------------------------------------------------------------
    def replay(self) -> tuple[list[Saved], int, str | None]:
        """(the processes recorded, the next pid, what was cut off or None)."""
        if not self.enabled or not self.path.exists():
            return [], 1, None
        procs: dict[int, Saved] = {}
        next_pid, damage = 1, None
        data = self.path.read_bytes()
        offset = 0
        while offset < len(data):
            rec, size = _decode(data, offset)
            if rec is None:
                damage = f"{len(data) - offset} bytes at offset {offset} cut off (a torn or corrupt record)"
                break
            offset += size
            try:
                next_pid = _apply(procs, rec, next_pid)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                damage = f"a malformed record at offset {offset - size} and after it cut off ({exc})"
                break
        if damage:
            log.warning("journal %s: %s", self.path, damage)
        return sorted(procs.values(), key=lambda s: s.pid), next_pid, damage

    def open(self, procs, next_pid: int) -> None:
        """Start journaling: the file is rewritten as a snapshot of ``procs`` (compaction)."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._known.clear()
        self._compact(procs, next_pid)

    # -- commits ------------------------------------------------------------------------------
    def due(self, now: float) -> bool:
        return self.enabled and now - self._last_commit >= self.interval

    def commit(self, procs, next_pid: int) -> bool:
        """Record what changed since the last commit; True if anything was written."""
        self._last_commit = time.monotonic()
        if not self.enabled:
            return False
        out = [_encode(r) for r in self._changes(procs, next_pid)]
        if out:
            if self._file is None:
                self._file = open(self.path, "ab")
            blob = b"".join(out)
            self._file.write(blob)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.bytes_written += len(blob)
            self.num_commits += 1
            if self._file.tell() > COMPACT_ABOVE:
                self._compact(procs, next_pid)
        return bool(out)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def discard(self) -> None:
        """Forget every process (``kernel stop --discard``)."""
        self.close()
        self._known.clear()
        if self.enabled and self.path.exists():
            self.path.unlink()

    def _changes(self, procs, next_pid: int):
        seen = set()
        for proc in procs:
            seen.add(proc.pid)
            sig = _signature(proc)
            known = self._known.get(proc.pid)
            if known is not None and known[0] == sig:
                continue
            new = fields(proc)
            old_fields, num_tokens = (known[1], known[2]) if known else ({}, 0)
            diff = {k: v for k, v in new.items() if old_fields.get(k, ...) != v}
            if diff or known is None:
                yield {"k": "p", "pid": proc.pid, "f": diff}
            if proc.num_tokens > num_tokens:
                yield {"k": "t", "pid": proc.pid, "at": num_tokens, "ids": proc.token_ids[num_tokens:]}
            self._known[proc.pid] = (sig, new, proc.num_tokens)
        for pid in [p for p in self._known if p not in seen]:
            del self._known[pid]
            yield {"k": "x", "pid": pid}
        if next_pid != self._next_pid:
            self._next_pid = next_pid
            yield {"k": "n", "next_pid": next_pid}

    def _compact(self, procs, next_pid: int) -> None:
        self.close()
        self._known.clear()
        self._next_pid = 0
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for rec in self._changes(procs, next_pid):
                f.write(_encode(rec))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)


def _apply(procs: dict[int, Saved], rec: dict, next_pid: int) -> int:
    kind, pid = rec["k"], rec.get("pid")
    if kind == "p":
        saved = procs.setdefault(int(pid), Saved(int(pid), {}, []))
        saved.fields.update(rec["f"])
    elif kind == "t":
        saved = procs[int(pid)]
        at, ids = int(rec["at"]), [int(t) for t in rec["ids"]]
        if at > len(saved.token_ids):
            raise ValueError(f"pid {pid}: tokens at {at} after {len(saved.token_ids)}")
        saved.token_ids[at:] = ids
    elif kind == "x":
        procs.pop(int(pid), None)
    elif kind == "n":
        next_pid = max(next_pid, int(rec["next_pid"]))
    else:
        raise ValueError(f"unknown record kind {kind!r}")
    return next_pid


def _encode(rec: dict) -> bytes:
    payload = msgpack.packb(rec, use_bin_type=True)
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _decode(data: bytes, offset: int) -> tuple[dict | None, int]:
    if offset + HEADER.size > len(data):
        return None, 0
    length, crc = HEADER.unpack_from(data, offset)
    start = offset + HEADER.size
    if length > MAX_RECORD or start + length > len(data):
        return None, 0
    payload = data[start:start + length]
    if zlib.crc32(payload) != crc:
        return None, 0
    try:
        rec = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception:
        return None, 0
    if not isinstance(rec, dict):
        return None, 0
    return rec, HEADER.size + length


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
